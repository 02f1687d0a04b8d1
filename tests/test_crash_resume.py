"""Crash safety of pretraining: `kill -9` at deterministic points (right after an optimizer step, in the middle of a
checkpoint save), then `--resume_from_checkpoint latest` until the run completes, gives the same final weights as an
uninterrupted run.

Each run is `python run_pretraining.py` on the built-in demo data (tiny model, CPU, fixed seed), checkpointing
every 2 steps with `--save_total_limit 2`. The kill is the test-only hook `BEVT_TEST_KILL_AT` (`step:N`: every rank
SIGKILLs itself right after optimizer step N, before that step's checkpoint; `save:N`: in the middle of saving
checkpoint N). After every kill, the newest complete checkpoint must be the expected one, whole and loadable, and a
save that was cut short must have left only its temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port
from safetensors.torch import load_file

from bevt.training import COMPLETE_MARKER, TRAINER_STATE_NAME, CheckpointManager
from bevt.training.faults import KILL_AT_ENV

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_pretraining.py"
STEPS = 12
ARGS = [
    "--max_train_steps", str(STEPS), "--checkpointing_steps", "2", "--save_total_limit", "2", "--logging_steps", "1",
    "--video_batch_size", "2", "--image_batch_size", "4", "--seed", "7",
]  # fmt: skip
RUN_TIMEOUT = 240
DDP_STEPS = 8  # the 2-rank runs


def _run(out: Path, demo_data: Path, resume: bool, kill_at: str | None = None, ranks: int = 1) -> int:
    """One run in its own process group: `python run_pretraining.py`, or with `ranks` > 1 (and DDP_STEPS steps) that
    many CPU ranks (gloo DDP) through `accelerate launch`. With `kill_at`, every rank SIGKILLs itself there (the
    process group is killed afterwards too: a node failure leaves nothing behind). Returns the exit status."""
    if not (out / "demo_data").exists():
        shutil.copytree(demo_data, out / "demo_data")
    args, launcher = ARGS, [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop(KILL_AT_ENV, None)
    if kill_at is not None:
        env[KILL_AT_ENV] = kill_at
    if ranks > 1:
        args = [a if a != str(STEPS) else str(DDP_STEPS) for a in ARGS]
        launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu"]
        launcher += ["--num_processes", str(ranks), "--num_machines", "1", "--main_process_port", str(free_port())]
        env["ACCELERATE_USE_CPU"] = "1"
    command = [*launcher, str(SCRIPT), "--output_dir", str(out), *args]
    if resume:
        command += ["--resume_from_checkpoint", "latest"]
    with open(out / "log.txt", "a") as log:
        log.write(f"\n===== {KILL_AT_ENV}={kill_at} {' '.join(command[len(launcher) + 1 :])}\n")
        log.flush()
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=RUN_TIMEOUT)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
    if kill_at is None:
        assert code == 0, (out / "log.txt").read_text()[-4000:]
    else:
        assert code != 0, f"the run was not killed at {kill_at}:\n" + (out / "log.txt").read_text()[-3000:]
    return code


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
    assert len(manager.checkpoints()) <= 2  # --save_total_limit 2
    latest = manager.latest()
    return CheckpointManager.step_of(latest) if latest is not None else 0


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def demo_data(pretraining_demo_data: Path) -> Path:
    return pretraining_demo_data


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(out, demo_data, resume=False)
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


@pytest.mark.slow
def test_kill_during_steps_then_resume_gives_identical_weights(tmp_path: Path, demo_data: Path, uninterrupted):
    out = tmp_path / "run"
    out.mkdir()
    # after step 3 (checkpoint-2 is the newest), then after step 8 of the resumed run, before checkpoint-8's save
    for i, (kill_at, newest) in enumerate((("step:3", 2), ("step:8", 6))):
        code = _run(out, demo_data, resume=i > 0, kill_at=kill_at)
        assert code == -signal.SIGKILL, code
        assert _check_checkpoints_intact(out) == newest
        assert not (out / "model.safetensors").exists()  # interrupted: no final model
    _run(out, demo_data, resume=True)
    log = (out / "log.txt").read_text()
    assert log.count("resumed from") == 2 and "at step 6" in log
    assert not _temporary(out)
    _assert_same(_final_weights(out), uninterrupted)


@pytest.mark.slow
def test_kill_during_checkpoint_saves_never_damages_the_latest_checkpoint(
    tmp_path: Path, demo_data: Path, uninterrupted
):
    out = tmp_path / "run"
    out.mkdir()
    # killed while saving the very first checkpoint (nothing to resume from yet), then while saving checkpoint-6
    # (checkpoint-4 is the newest), then while saving checkpoint-10 (checkpoint-8 is the newest)
    for i, (kill_at, newest) in enumerate((("save:2", 0), ("save:6", 4), ("save:10", 8))):
        _run(out, demo_data, resume=i > 0, kill_at=kill_at)
        assert _temporary(out) == [f".tmp-checkpoint-{kill_at.split(':')[1]}"]  # only the cut save's folder
        assert _check_checkpoints_intact(out) == newest  # the previous good checkpoint survived the kill
    _run(out, demo_data, resume=True)
    log = (out / "log.txt").read_text()
    assert "no checkpoint in" in log and "starting from scratch" in log  # the first resume had nothing
    assert log.count("resumed from") == 2
    assert not _temporary(out)  # leftovers of killed saves are cleaned up by the next save
    assert [p.name for p in CheckpointManager(out).checkpoints()] == [
        f"checkpoint-{STEPS - 2}",
        f"checkpoint-{STEPS}",
    ]
    _assert_same(_final_weights(out), uninterrupted)


@pytest.mark.slow
def test_two_rank_ddp_kill_then_resume_gives_identical_weights(tmp_path: Path, demo_data: Path):
    """2-rank DDP: every rank killed (-9) after step 5, then `latest` resumes each rank's model, optimizer, RNG and
    data position: the final weights equal an uninterrupted 2-rank run's."""
    reference = tmp_path / "uninterrupted"
    reference.mkdir()
    _run(reference, demo_data, resume=False, ranks=2)
    assert (reference / f"checkpoint-{DDP_STEPS}" / "data_state_rank1.json").is_file()

    out = tmp_path / "run"
    out.mkdir()
    _run(out, demo_data, resume=False, ranks=2, kill_at="step:5")
    assert _check_checkpoints_intact(out) == 4
    assert (CheckpointManager(out).latest() / "data_state_rank1.json").is_file()
    _run(out, demo_data, resume=True, ranks=2)
    assert "resumed from" in (out / "log.txt").read_text()
    _assert_same(_final_weights(out), _final_weights(reference))
