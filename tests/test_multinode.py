"""Several machines on Accelerate: the README's two-machine commands, run as two machine ranks on this host (CPU,
gloo, one process each), read disjoint samples and end with identical weights."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port

from bevt import BEVTConfig, BEVTForMaskedVideoModeling
from bevt.training.engine import weights_digest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_multinode_commands() -> list[str]:
    """The commands of the README's "Several machines" section, one per machine rank (continuations joined)."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Several machines", 1)[1].split("\n### ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_weights_digest_sees_every_value():
    torch.manual_seed(0)
    model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test"))
    torch.manual_seed(0)
    twin = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test"))
    assert weights_digest(model) == weights_digest(twin)
    param = next(twin.parameters())
    with torch.no_grad():
        param.view(-1)[3] = torch.nextafter(param.view(-1)[3], torch.tensor(1.0))  # one ulp
    assert weights_digest(model) != weights_digest(twin)


@pytest.mark.slow
def test_two_machine_ranks_read_disjoint_samples_and_end_with_identical_weights(
    tmp_path, pretraining_demo_data
):
    import shutil

    commands = readme_multinode_commands()
    assert len(commands) == 2 and [f"--machine_rank {r}" in c for r, c in enumerate(commands)] == [True, True]
    out = tmp_path / "run"
    shutil.copytree(pretraining_demo_data, out / "demo_data")
    port = str(free_port())
    processes, logs = [], []
    for rank, command in enumerate(commands):
        argv = shlex.split(command.replace("29500", port).replace("outputs/multinode-demo", str(out)))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        while "=" in argv[0]:  # leading VAR=value assignments
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
        assert argv[0] == "accelerate"
        argv[0] = str(BIN / "accelerate")
        log = open(tmp_path / f"machine{rank}.log", "w")
        logs.append(log)
        processes.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + 300
    try:
        while any(p.poll() is None for p in processes) and time.time() < deadline:
            time.sleep(0.5)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    texts = [(tmp_path / f"machine{rank}.log").read_text() for rank in (0, 1)]
    assert [p.returncode for p in processes] == [0, 0], texts[0][-3000:] + "\n=====\n" + texts[1][-3000:]
    for rank, text in enumerate(texts):
        assert "Distributed environment: DistributedType.MULTI_CPU  Backend: gloo" in text
        assert (
            f"Process index: {rank}" in text
            and "Num processes: 2" in text
            and "Local process index: 0" in text
        )
    assert "(2 processes x 1 accumulation)" in texts[0]

    # disjoint samples: each rank logged the keys it trained on (2 steps x (4 videos + 16 images))
    keys = [(out / f"sample_keys_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 2 * (4 + 16)
    assert not set(keys[0]) & set(keys[1])

    # identical weights: every rank's own digest, read from its own machine's log, and the saved model's
    digests = [
        re.search(rf"final weights of rank {rank}: sha256 ([0-9a-f]{{64}})", t)[1]
        for rank, t in enumerate(texts)
    ]
    assert digests[0] == digests[1]
    assert "final weights identical on all 2 ranks" in texts[0]
    saved = BEVTForMaskedVideoModeling.from_pretrained(out)
    assert weights_digest(saved) == digests[0]
    fresh = BEVTForMaskedVideoModeling(saved.config)
    assert weights_digest(fresh) != digests[0]  # it trained


def _fake_accelerator(kind: str, processes: int, plugin=None):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    return SimpleNamespace(
        num_processes=processes,
        distributed_type=DistributedType[kind],
        device=torch.device("cpu"),
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )


def test_launch_without_a_process_group_is_refused_and_ignored_sharding_is_said(monkeypatch, caplog):
    """On a CPU-only host Accelerate 1.16 forms no process group for `--multi_gpu`/FSDP/DeepSpeed launches without
    ACCELERATE_USE_CPU=1 (each process: 1 process), and with it runs plain DDP for FSDP configs."""
    from accelerate import PartialState

    from bevt.training.arguments import UsageError
    from bevt.training.runtime import check_launch

    PartialState()  # the warning goes through Accelerate's logger (single process, set up before WORLD_SIZE=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"WORLD_SIZE=2 .* no process group .* ACCELERATE_USE_CPU=1"):
        check_launch(_fake_accelerator("DEEPSPEED", 1))
    check_launch(_fake_accelerator("MULTI_CPU", 2))  # a real group: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level("WARNING"):
        check_launch(_fake_accelerator("MULTI_CPU", 2))
    assert "asks for FSDP, but Accelerate runs MULTI_CPU on cpu" in caplog.text
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(_fake_accelerator("NO", 1))


def test_deepspeed_micro_batch_is_set_from_the_per_device_batch():
    from types import SimpleNamespace

    from bevt.training.runtime import set_deepspeed_micro_batch

    class Plugin:
        def __init__(self, value):
            self.deepspeed_config = {"train_micro_batch_size_per_gpu": value}

        def is_auto(self, key):
            return self.deepspeed_config[key] == "auto"

    cases = [
        (SimpleNamespace(stage="joint", video_batch_size=8, image_batch_size=64), "auto", 8),
        (SimpleNamespace(stage="image", video_batch_size=8, image_batch_size=64), "auto", 64),
        (SimpleNamespace(per_device_train_batch_size=6), "auto", 6),
        (SimpleNamespace(per_device_train_batch_size=6), 3, 3),  # an explicit value is kept
    ]
    for args, value, expected in cases:
        plugin = Plugin(value)
        set_deepspeed_micro_batch(_fake_accelerator("DEEPSPEED", 2, plugin), args)
        assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == expected
    set_deepspeed_micro_batch(_fake_accelerator("MULTI_CPU", 2), cases[0][0])  # no plugin: nothing to do


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only launch")
def test_cpu_multi_process_launch_without_accelerate_use_cpu_stops_with_one_error(
    tmp_path, pretraining_demo_data
):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(pretraining_demo_data, out / "demo_data")
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    command = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()), str(REPO / "run_pretraining.py"), "--output_dir", str(out),
        "--max_train_steps", "1",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "error: this process was launched as one of WORLD_SIZE=2 processes" in result.stderr
    assert "Traceback" not in result.stderr.split("error: this process", 1)[0][-2000:]
    assert not (out / "model.safetensors").exists()
