"""Crash safety of pretraining: `kill -9` at random points (during a step, during a checkpoint save), then
`--resume_from_checkpoint latest` until the run completes, gives the same final weights as an uninterrupted run.

Each run is `python run_pretraining.py` on the built-in demo data (tiny model, CPU, fixed seed), checkpointing
every 2 steps with `--save_total_limit 2`. After every kill, the newest complete checkpoint must be intact and
loadable, and a save that was cut short must have left only a temporary folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import free_port
from safetensors.torch import load_file

from bevt.data.demo_pretraining import write_demo_pretraining_shards
from bevt.training import COMPLETE_MARKER, TRAINER_STATE_NAME, CheckpointManager

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_pretraining.py"
STEPS = 12
ARGS = [
    "--max_train_steps",
    str(STEPS),
    "--checkpointing_steps",
    "2",
    "--save_total_limit",
    "2",
    "--logging_steps",
    "1",
    "--video_batch_size",
    "2",
    "--image_batch_size",
    "4",
    "--seed",
    "7",
]
RUN_TIMEOUT = 150
DDP_STEPS = 8  # the 2-rank runs


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("crash_demo") / "demo_data"
    write_demo_pretraining_shards(folder)
    return folder


def _start(out: Path, demo_data: Path, resume: bool, ranks: int = 1) -> subprocess.Popen:
    """The run in its own process group: `python run_pretraining.py`, or with `ranks` > 1 (and DDP_STEPS steps)
    that many CPU ranks (gloo DDP) through `accelerate launch`."""
    if not (out / "demo_data").exists():
        shutil.copytree(demo_data, out / "demo_data")
    args, launcher = ARGS, [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if ranks > 1:
        args = [a if a != str(STEPS) else str(DDP_STEPS) for a in ARGS]
        launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu"]
        launcher += [
            "--num_processes",
            str(ranks),
            "--num_machines",
            "1",
            "--main_process_port",
            str(free_port()),
        ]
        env["ACCELERATE_USE_CPU"] = "1"
    command = [*launcher, str(SCRIPT), "--output_dir", str(out), *args]
    if resume:
        command += ["--resume_from_checkpoint", "latest"]
    log = open(out / "log.txt", "a")  # noqa: SIM115 - closed by the caller through _finish/_kill
    log.write(f"\n===== {' '.join(command[len(launcher) + 1 :])}\n")
    log.flush()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    process.log = log  # type: ignore[attr-defined]
    return process


def _wait_for(process: subprocess.Popen, condition: Callable[[], bool], out: Path, poll: float) -> bool:
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(poll)
    process.kill()
    raise AssertionError(f"timed out; log:\n{(out / 'log.txt').read_text()[-3000:]}")


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (the launcher and every rank at once: a node failure)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    process.log.close()  # type: ignore[attr-defined]


def _finish(process: subprocess.Popen, out: Path) -> None:
    code = process.wait(timeout=RUN_TIMEOUT)
    process.log.close()  # type: ignore[attr-defined]
    assert code == 0, (out / "log.txt").read_text()[-4000:]


def _temporary(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp-checkpoint-"))


def _check_checkpoints_intact(out: Path) -> int:
    """Every complete checkpoint is whole and loadable; returns the newest step (0: none yet)."""
    manager = CheckpointManager(out)
    for checkpoint in manager.checkpoints():
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
        assert state["step"] == int(checkpoint.name.split("-")[1])
        assert json.loads((checkpoint / COMPLETE_MARKER).read_text())["step"] == state["step"]
        weights = load_file(checkpoint / "model.safetensors")
        assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
        for name in ("optimizer.bin", "data_state_rank0.json", "random_states_0.pkl"):
            assert (checkpoint / name).is_file(), f"{checkpoint.name} lacks {name}"
    assert (
        len(manager.checkpoints()) <= 3
    )  # --save_total_limit 2 (+1 if killed between the rename and the rotation)
    latest = manager.latest()
    return CheckpointManager.step_of(latest) if latest is not None else 0


def _completed_step(out: Path) -> Callable[[], bool]:
    return lambda: CheckpointManager(out).latest() is not None


def _saving(out: Path) -> Callable[[], bool]:
    return lambda: bool(_temporary(out))


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted")
    _finish(_start(out, demo_data, resume=False), out)
    assert [p.name for p in CheckpointManager(out).checkpoints()] == [
        f"checkpoint-{STEPS - 2}",
        f"checkpoint-{STEPS}",
    ]
    return _final_weights(out)


def _assert_same(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert weights.keys() == reference.keys()
    different = {
        n: (t - weights[n]).abs().max().item() for n, t in reference.items() if not torch.equal(t, weights[n])
    }
    assert not different, different


def _log_offset(out: Path) -> int:
    log = out / "log.txt"
    return log.stat().st_size if log.exists() else 0


def _logged_step(out: Path, offset: int, step: int) -> Callable[[], bool]:
    """True once the process started at log byte `offset` has logged optimizer step `step`."""
    line = f"step {step}/{STEPS} |".encode()

    def condition() -> bool:
        with open(out / "log.txt", "rb") as f:
            f.seek(offset)
            return line in f.read()

    return condition


def _newest_step(out: Path) -> int:
    latest = CheckpointManager(out).latest()
    return CheckpointManager.step_of(latest) if latest is not None else 0


@pytest.mark.slow
def test_kill_during_steps_then_resume_gives_identical_weights(
    tmp_path: Path, demo_data: Path, uninterrupted
):
    out = tmp_path / "run"
    out.mkdir()
    rng = random.Random(1234)
    first = rng.randint(3, 5)
    kill_points = (first, rng.randint(first + 3, STEPS - 3))  # after these steps are logged, + a random delay
    for i, step in enumerate(kill_points):
        offset = _log_offset(out)
        process = _start(out, demo_data, resume=i > 0)
        assert _wait_for(process, _logged_step(out, offset + 1, step), out, poll=0.005), (
            out / "log.txt"
        ).read_text()[-3000:]
        time.sleep(rng.uniform(0.0, 0.08))  # inside the next step, or the save that follows an even step
        assert process.poll() is None, "the run finished before it could be killed"
        _kill(process)
        newest = _check_checkpoints_intact(out)
        assert newest >= step - 2, (step, newest)  # the checkpoint before the logged step is there
    _finish(_start(out, demo_data, resume=True), out)
    log = (out / "log.txt").read_text()
    assert log.count("resumed from") == 2
    assert not _temporary(out)  # leftovers of killed saves are cleaned up by the next save
    _assert_same(_final_weights(out), uninterrupted)


def _saving_after(out: Path, step: int) -> Callable[[], bool]:
    """True while a checkpoint newer than `step` is being written, once `step`'s checkpoint is complete."""

    def condition() -> bool:
        saving = [int(name.rsplit("-", 1)[1]) for name in _temporary(out)]
        return any(s > step for s in saving) and (step == 0 or _newest_step(out) >= step)

    return condition


@pytest.mark.slow
def test_kill_during_checkpoint_saves_never_damages_the_latest_checkpoint(
    tmp_path: Path, demo_data: Path, uninterrupted
):
    out = tmp_path / "run"
    out.mkdir()
    cut_saves = []
    # SIGKILL the moment a checkpoint's temporary folder appears, i.e. while it is being saved: during the first
    # save (nothing to resume from yet), then during the save after checkpoint-2, then after checkpoint-6. On a
    # loaded machine a kill can land just after the rename: then kill the next save too (at most 3 more).
    targets = [0, 2, 6]
    while targets:
        complete = targets.pop(0)
        process = _start(out, demo_data, resume=bool(cut_saves) or complete > 0)
        if not _wait_for(process, _saving_after(out, complete), out, poll=0.001):
            process.log.close()  # type: ignore[attr-defined]
            break  # the run finished first
        _kill(process)
        cut_saves.append(bool(_temporary(out)))  # the save was cut: only its temporary folder is left
        newest = _check_checkpoints_intact(out)
        assert newest >= complete  # the previous good checkpoint survived the kill
        if not targets and sum(cut_saves) < 2 and len(cut_saves) < 6 and newest + 2 < STEPS:
            targets.append(newest)
    assert sum(cut_saves) >= 2, f"the kills did not land inside checkpoint saves: {cut_saves}"
    _finish(_start(out, demo_data, resume=True), out)
    log = (out / "log.txt").read_text()
    if cut_saves[0]:  # killed during the very first save: the first resume had nothing to resume from
        assert "no checkpoint in" in log and "starting from scratch" in log
    assert log.count("resumed from") >= 2
    assert not _temporary(out)
    assert [p.name for p in CheckpointManager(out).checkpoints()] == [
        f"checkpoint-{STEPS - 2}",
        f"checkpoint-{STEPS}",
    ]
    _assert_same(_final_weights(out), uninterrupted)


@pytest.mark.slow
def test_two_rank_ddp_kill_then_resume_gives_identical_weights(tmp_path: Path, demo_data: Path):
    """2-rank DDP: kill -9 of every process mid-run, then `latest` resumes each rank's model, optimizer, RNG and
    data position: the final weights equal an uninterrupted 2-rank run's."""
    reference = tmp_path / "uninterrupted"
    reference.mkdir()
    _finish(_start(reference, demo_data, resume=False, ranks=2), reference)
    assert (reference / f"checkpoint-{DDP_STEPS}" / "data_state_rank1.json").is_file()

    out = tmp_path / "run"
    out.mkdir()
    rng = random.Random(99)
    step = rng.randint(3, 5)
    process = _start(out, demo_data, resume=False, ranks=2)
    line = f"step {step}/{DDP_STEPS} |"
    assert _wait_for(process, lambda: line in (out / "log.txt").read_text(), out, poll=0.01), (
        out / "log.txt"
    ).read_text()[-3000:]
    time.sleep(rng.uniform(0.0, 0.08))
    assert process.poll() is None, "the run finished before it could be killed"
    _kill(process)
    assert _newest_step(out) >= step - 2
    _finish(_start(out, demo_data, resume=True, ranks=2), out)
    assert "resumed from" in (out / "log.txt").read_text()
    _assert_same(_final_weights(out), _final_weights(reference))
