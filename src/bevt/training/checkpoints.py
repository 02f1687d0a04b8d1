"""Atomic, rotated, exactly resumable training checkpoints (`CheckpointManager`).

A checkpoint folder `checkpoint-<step>/` holds Accelerate's state (model, optimizer, grad scaler, registered objects
such as the lr scheduler and the EMA, the RNG of every rank), the data position of every rank
(`data_state_rank<r>.json`) and the loop's counters (`trainer_state.json`). It is written to `.tmp-checkpoint-<step>/`
and renamed into place once complete, so a kill at any moment leaves the newest complete checkpoint intact.

    manager = CheckpointManager(args.output_dir, save_total_limit=args.save_total_limit)
    accelerator.register_for_checkpointing(lr_scheduler)   # model/optimizer/scaler/RNG: saved by Accelerate
    resumed = manager.load(accelerator, manager.resolve("latest"))   # -> ResumedState(step, extra_state, data_state)
    manager.save(accelerator, step, extra_state={...}, data_state=dataset.state_dict())

`bevt.training.TrainingEngine` drives it; use it directly only outside the engine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .faults import kill_if_requested

__all__ = [
    "COMPLETE_MARKER",
    "DATA_STATE_PATTERN",
    "TRAINER_STATE_NAME",
    "CheckpointManager",
    "ResumedState",
]

TRAINER_STATE_NAME = "trainer_state.json"
DATA_STATE_PATTERN = "data_state_rank{rank}.json"
COMPLETE_MARKER = "checkpoint_complete.json"


@dataclass
class ResumedState:
    """What `CheckpointManager.load` returns besides the Accelerate state it restores."""

    path: Path
    step: int
    extra_state: dict[str, Any] = field(default_factory=dict)
    data_state: Any = None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store a {type(value).__name__} in checkpoint state (use JSON-compatible values)")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Atomic, rotated training checkpoints under `output_dir`, named `checkpoint-{step}`.

    `save` writes into `output_dir/.tmp-checkpoint-{step}` (Accelerate state: model, optimizer, scaler, registered
    objects such as the lr scheduler, RNG of every rank; plus `data_state_rank{r}.json` for every rank, and
    `trainer_state.json` with the step and `extra_state`), marks it complete, and only then renames it to
    `checkpoint-{step}`. A kill while saving leaves at most a `.tmp-*` folder, never a damaged checkpoint;
    `latest()` only returns complete ones. Rotation (`save_total_limit`) deletes the oldest complete checkpoints
    after the new one is in place.

    The output directory must be on a file system every rank sees (as Accelerate's `save_state` requires).
    All methods taking `accelerator` must be called on every rank.
    """

    prefix = "checkpoint-"
    _name_re = re.compile(r"^checkpoint-(\d+)$")

    def __init__(self, output_dir: str | os.PathLike, save_total_limit: int | None = None):
        if save_total_limit is not None and save_total_limit < 1:
            raise ValueError(
                f"`save_total_limit` must be >= 1 (or None to keep all), got {save_total_limit!r}"
            )
        self.output_dir = Path(output_dir)
        self.save_total_limit = save_total_limit

    # -- discovery ---------------------------------------------------------------------------------------------

    def _complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of the complete checkpoints, oldest first."""
        if not self.output_dir.is_dir():
            return []
        found = []
        for child in self.output_dir.iterdir():
            match = self._name_re.match(child.name)
            if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (by step)."""
        return [p for _, p in self._complete()]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def resolve(self, resume_from_checkpoint: str | os.PathLike) -> Path:
        """Turn a `--resume_from_checkpoint` value (`latest` or a path) into a complete checkpoint folder."""
        if str(resume_from_checkpoint) == "latest":
            path = self.latest()
            if path is None:
                raise FileNotFoundError(
                    f"--resume_from_checkpoint latest: no complete checkpoint-* folder in {self.output_dir}"
                )
            return path
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a folder (or use 'latest')")
        if not (path / COMPLETE_MARKER).is_file():
            looks_like_checkpoint = (path / TRAINER_STATE_NAME).is_file() or "checkpoint-" in path.name
            if not looks_like_checkpoint:
                inside = sorted(p.name for p in path.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file())
                saved_model = (path / "config.json").is_file()
                what = "a saved model (config.json)" if saved_model else "not a checkpoint folder"
                hint = (
                    f"its checkpoints: {', '.join(inside)} (or 'latest' with --output_dir {path})"
                    if inside
                    else "a checkpoint-<step> folder of a run's --output_dir, or 'latest'"
                )
                raise ValueError(
                    f"--resume_from_checkpoint: {path} is {what}, not a training checkpoint (no "
                    f"{TRAINER_STATE_NAME}); pass {hint}"
                )
            raise ValueError(
                f"--resume_from_checkpoint: {path} is not a complete checkpoint (no {COMPLETE_MARKER}); it may "
                "have been interrupted while saving. Use another checkpoint or 'latest'."
            )
        return path

    @staticmethod
    def step_of(path: str | os.PathLike) -> int:
        """The step recorded in a checkpoint folder."""
        with open(Path(path) / TRAINER_STATE_NAME) as f:
            return int(json.load(f)["step"])

    # -- saving ------------------------------------------------------------------------------------------------

    def save(
        self,
        accelerator: Any,
        step: int,
        extra_state: dict[str, Any] | None = None,
        data_state: Any = None,
    ) -> Path:
        """Save a checkpoint for optimizer step `step` (call on every rank). Returns the final folder.

        `extra_state` (main process's, JSON-compatible) is stored in `trainer_state.json`; `data_state` is this
        rank's data-pipeline position (JSON-compatible, e.g. a streaming dataset's `state_dict()`), stored per rank.
        """
        final = self.output_dir / f"{self.prefix}{step}"
        tmp = self.output_dir / f".tmp-{self.prefix}{step}"
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            tmp.mkdir()
        accelerator.wait_for_everyone()

        accelerator.save_state(str(tmp))
        _write_json(tmp / DATA_STATE_PATTERN.format(rank=accelerator.process_index), data_state)
        kill_if_requested("save", step)  # tests only: a kill in the middle of this save
        if accelerator.is_main_process:
            state = {
                "step": int(step),
                "num_processes": accelerator.num_processes,
                "extra_state": extra_state or {},
            }
            _write_json(tmp / TRAINER_STATE_NAME, state)
        accelerator.wait_for_everyone()

        if accelerator.is_main_process:
            missing = [
                r
                for r in range(accelerator.num_processes)
                if not (tmp / DATA_STATE_PATTERN.format(rank=r)).is_file()
            ]
            if missing:
                raise RuntimeError(
                    f"checkpoint {tmp}: data state of ranks {missing} not found; is {self.output_dir} on a file "
                    "system shared by all ranks?"
                )
            _write_json(tmp / COMPLETE_MARKER, {"step": int(step), "time": time.time()})
            self._move_into_place(tmp, final)
            self._rotate(keep=final)
        accelerator.wait_for_everyone()
        return final

    def _remove_leftovers(self) -> None:
        """Delete temporary folders of saves or deletions that were killed half-way (never complete checkpoints);
        a checkpoint moved aside by a re-save that was killed before its replacement arrived is put back."""
        for child in self.output_dir.iterdir():
            if not child.is_dir():
                continue
            if child.name.startswith(".old-"):
                original = child.with_name(child.name.removeprefix(".old-"))
                if (
                    not original.exists()
                ):  # killed between the two renames of a re-save: the old one is the good one
                    os.replace(child, original)
                    continue
            if child.name.startswith((f".tmp-{self.prefix}", f".deleting-{self.prefix}", ".old-")):
                shutil.rmtree(child, ignore_errors=True)

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        old = None
        if final.exists():  # same step saved again (e.g. after a resume): swap, then delete the old one
            old = final.with_name(f".old-{final.name}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _rotate(self, keep: Path) -> None:
        if self.save_total_limit is None:
            return
        found = [p for p in self.checkpoints() if p != keep]
        excess = len(found) + 1 - self.save_total_limit
        for path in found[: max(excess, 0)]:
            # Rename first so a kill mid-delete never leaves a half-deleted folder that looks complete.
            doomed = path.with_name(f".deleting-{path.name}")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def _set_aside_newer_than(self, step: int) -> list[Path]:
        """Rename complete checkpoints of a later step (left by the run that was abandoned by resuming from an older
        checkpoint) to `abandoned-checkpoint-{step}[-k]`, so that `latest` and rotation follow the resumed run. They
        are kept, not deleted."""
        moved = []
        for saved_step, path in self._complete():
            if saved_step <= step:
                continue
            target = path.with_name(f"abandoned-{path.name}")
            k = 1
            while target.exists():
                k += 1
                target = path.with_name(f"abandoned-{path.name}-{k}")
            os.replace(path, target)
            moved.append(target)
        if moved:
            warnings.warn(
                f"resumed at step {step} while {len(moved)} newer checkpoint(s) existed in {self.output_dir}: renamed "
                f"to {', '.join(p.name for p in moved)} so that `latest` follows this run (delete them when unneeded)",
                stacklevel=3,
            )
        return moved

    # -- loading -----------------------------------------------------------------------------------------------

    def load(self, accelerator: Any, path: str | os.PathLike, strict_data_state: bool = True) -> ResumedState:
        """Restore the Accelerate state (model, optimizer, scaler, registered objects, this rank's RNG) from `path`
        and return the step, the extra state and this rank's data state. Call on every rank.

        With a different number of processes than at save time the data position cannot be restored exactly:
        `strict_data_state=True` raises; False warns and returns `data_state=None` (start the data stream over).
        Complete checkpoints in `output_dir` with a later step than the resumed one belong to the abandoned run: they
        are renamed `abandoned-checkpoint-*` (kept, with a warning) so a later `latest` never jumps back to them.
        """
        path = self.resolve(path)
        with open(path / TRAINER_STATE_NAME) as f:
            trainer_state = json.load(f)
        saved_world = int(trainer_state.get("num_processes", 1))
        data_state = None
        if saved_world != accelerator.num_processes:
            message = (
                f"checkpoint {path} was saved by {saved_world} processes, this run has "
                f"{accelerator.num_processes}: the data position of each rank cannot be restored exactly"
            )
            if strict_data_state:
                raise ValueError(message + "; resume with the same number of processes.")
            warnings.warn(message + "; the data stream starts over.", stacklevel=2)
        else:
            with open(path / DATA_STATE_PATTERN.format(rank=accelerator.process_index)) as f:
                data_state = json.load(f)
        # Accelerate unpickles registered objects' states (custom_checkpoint_*.pkl: the lr scheduler, the EMA) with
        # weights_only=False. Read each one safely first: anything but tensors and plain containers raises
        # UnsafeCheckpointError (naming the global) before any code from the file can run.
        from ..safe_loading import load_checkpoint

        for custom_state in sorted(path.glob("custom_checkpoint_*.pkl")):
            load_checkpoint(custom_state)
        accelerator.load_state(str(path))
        step = int(trainer_state["step"])
        if accelerator.is_main_process:
            self._set_aside_newer_than(step)
        accelerator.wait_for_everyone()
        return ResumedState(
            path=path,
            step=step,
            extra_state=trainer_state.get("extra_state", {}),
            data_state=data_state,
        )
