"""Training utilities shared by `run_pretraining.py` and `run_finetuning.py`.

Everything here is independent of the model and the data; the scripts combine the pieces:

- `build_param_groups(model, weight_decay, ...)`: AdamW parameter groups with no weight decay on norms, biases,
  relative position bias tables and the mask token, and optional per-parameter learning-rate scales (layer-wise
  decay for fine-tuning).
- `CheckpointManager(output_dir, save_total_limit)`: atomic checkpoints (written to a temporary folder, renamed
  into place once complete), `latest()` complete checkpoint, rotation that never deletes the newest one, and the
  per-rank state Accelerate does not keep (data position of every rank, trainer counters).
- `GracefulExit`: SIGTERM/SIGINT set a flag (a second signal interrupts at once); `should_stop(accelerator)`
  agrees across ranks so every rank leaves the loop at the same step.
- `NonFiniteLossGuard(max_consecutive)`: decides whether a step is applied; raises `NonFiniteLossError` with a clear
  message after too many non-finite steps in a row.
- `seed_everything(seed, process_index=0)`; meters: `AverageMeter`, `ThroughputMeter`, `StepTimer`.

Typical loop::

    manager = CheckpointManager(args.output_dir, save_total_limit=args.save_total_limit)
    accelerator.register_for_checkpointing(lr_scheduler)   # model/optimizer/scaler/RNG: saved by Accelerate
    if args.resume_from_checkpoint:
        path = manager.resolve(args.resume_from_checkpoint)
        resumed = manager.load(accelerator, path)           # -> ResumedState(step, extra_state, data_state)
        dataset.load_state_dict(resumed.data_state)
    with GracefulExit() as stopper:
        while step < max_steps:
            ...
            if step % args.checkpointing_steps == 0 or stopper.should_stop(accelerator):
                manager.save(accelerator, step, extra_state={...}, data_state=dataset.state_dict())
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "DEFAULT_NO_DECAY_KEYWORDS",
    "AverageMeter",
    "CheckpointManager",
    "GracefulExit",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "ResumedState",
    "StepTimer",
    "ThroughputMeter",
    "build_param_groups",
    "is_finite",
    "seed_everything",
]

# Parameters whose name contains one of these get no weight decay (as in the official BEVT/Swin recipes), in
# addition to every 1-D parameter (norm weights, biases).
DEFAULT_NO_DECAY_KEYWORDS: tuple[str, ...] = (
    "relative_position_bias_table",
    "mask_token",
    "position_embeddings",
    "absolute_pos_embed",
    "cls_token",
)


# ---------------------------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------------------------


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    skip_keywords: Iterable[str] = DEFAULT_NO_DECAY_KEYWORDS,
    lr_scale: Callable[[str], float] | None = None,
    learning_rate: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on weight matrices/kernels, none on 1-D parameters (norms, biases) and
    on parameters whose name contains one of `skip_keywords`.

    Args:
        model: the (unwrapped) model; frozen parameters (`requires_grad=False`) are left out.
        weight_decay: decay of the decayed group (>= 0).
        skip_keywords: name substrings that disable decay (relative position bias tables, mask token, ...).
        lr_scale: optional `name -> float` learning-rate multiplier (e.g. layer-wise decay). Parameters are grouped
            by (decay, scale); each group records its `lr_scale`.
        learning_rate: when given, every group gets `lr = learning_rate * lr_scale`. LambdaLR-based schedulers
            (Transformers' `get_scheduler`) multiply each group's initial lr, so the scales survive the schedule.

    Returns:
        A list of dicts for `torch.optim.AdamW(...)`, each with `params`, `weight_decay`, `lr_scale` (and `lr`),
        and `param_names` (for inspection; ignored by the optimizer). Empty groups are dropped.
    """
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
    keywords = tuple(skip_keywords)
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in keywords)
        scale = float(lr_scale(name)) if lr_scale is not None else 1.0
        if not scale >= 0 or not math.isfinite(scale):
            raise ValueError(f"`lr_scale` returned {scale!r} for {name!r}; it must be a finite number >= 0")
        key = (not no_decay, scale)
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if key[0] else 0.0,
                "lr_scale": scale,
            }
            if learning_rate is not None:
                groups[key]["lr"] = learning_rate * scale
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    # Stable order: decayed before non-decayed, then by scale, so optimizer state dicts line up across runs.
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], k[1]))]


def is_finite(value: torch.Tensor | float) -> bool:
    """True when `value` (a number or a tensor, all elements) is finite."""
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


class NonFiniteLossError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss (or gradient norm)."""


class NonFiniteLossGuard:
    """Skip optimizer steps whose loss (or gradient norm) is NaN/inf; stop after `max_consecutive` in a row.

    Call `update(finite)` once per optimizer step with whether the step is usable (in multi-process training pass
    the value agreed by all ranks, so every rank skips the same steps). Returns True when the step should be
    applied. `total_skipped` counts every skipped step (log it). Raises `NonFiniteLossError` when the
    `max_consecutive`-th consecutive non-finite step is seen.
    """

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"`max_consecutive` must be >= 1, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def update(self, finite: bool, step: int | None = None) -> bool:
        if finite:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            where = f" (last at step {step})" if step is not None else ""
            raise NonFiniteLossError(
                f"the loss or gradient norm was NaN/inf for {self.consecutive} optimizer steps in a row{where}; "
                "stopping. Lower --learning_rate, use --mixed_precision bf16 instead of fp16, check the data, or "
                "resume from an earlier checkpoint."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total_skipped = int(state.get("total_skipped", 0))


def seed_everything(seed: int, process_index: int = 0, deterministic: bool = False) -> int:
    """Seed `random`, `numpy` and `torch` (all devices) with `seed + process_index`; returns the seed used.

    `deterministic=True` also asks torch for deterministic algorithms (slower; errors on ops without one).
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}")
    value = seed + process_index
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(value)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------

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
        from .safe_loading import load_checkpoint

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


# ---------------------------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------------------------


class GracefulExit:
    """Context manager turning SIGTERM/SIGINT into a stop request, so the loop can save a checkpoint and exit.

    The first signal sets `requested` (and `signal_number`); a second one restores the default handlers and
    re-raises (KeyboardInterrupt for SIGINT), so a stuck job can still be interrupted. `should_stop(accelerator)`
    agrees across ranks (any rank's request stops all), costing one tiny all-reduce; call it at the same point on
    every rank. Handlers can only be installed from the main thread; elsewhere this is a no-op.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:  # second signal: give up gracefully, behave as without us
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.requested = True
        self.signal_number = signum

    def __enter__(self) -> GracefulExit:
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def should_stop(self, accelerator: Any = None) -> bool:
        """Whether any rank received a stop signal (collective when `accelerator` runs several processes)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    @property
    def exit_code(self) -> int:
        """Conventional exit status after a signal: 128 + signal number (0 when none was received)."""
        return 128 + self.signal_number if self.signal_number is not None else 0


# ---------------------------------------------------------------------------------------------------------------
# Meters
# ---------------------------------------------------------------------------------------------------------------


class AverageMeter:
    """Running mean of a scalar since the last `reset()` (`avg`), plus its last value (`val`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.val = float(value)
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else float("nan")


class ThroughputMeter:
    """Samples per second over the last `window` updates (each update: samples processed, seconds taken)."""

    def __init__(self, window: int = 20):
        if window < 1:
            raise ValueError(f"`window` must be >= 1, got {window!r}")
        self._samples: deque[float] = deque(maxlen=window)
        self._seconds: deque[float] = deque(maxlen=window)

    def update(self, num_samples: float, seconds: float) -> None:
        self._samples.append(float(num_samples))
        self._seconds.append(max(float(seconds), 0.0))

    @property
    def rate(self) -> float:
        total = sum(self._seconds)
        return sum(self._samples) / total if total > 0 else float("nan")


class StepTimer:
    """Time spent per phase of a training step (e.g. "data" waiting for the batch vs "step" computing).

    Use `with timer.phase("data"): batch = next(it)`; `averages()` gives the mean seconds per phase since the last
    `reset()`, `last` the seconds of each phase's most recent measurement.
    """

    def __init__(self) -> None:
        self.meters: dict[str, AverageMeter] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.meters.setdefault(name, AverageMeter()).update(time.perf_counter() - start)

    @property
    def last(self) -> dict[str, float]:
        return {name: meter.val for name, meter in self.meters.items()}

    def averages(self) -> dict[str, float]:
        return {name: meter.avg for name, meter in self.meters.items()}

    def reset(self) -> None:
        for meter in self.meters.values():
            meter.reset()
