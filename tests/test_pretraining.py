"""Pretraining: shared training utilities, demo data, CLI validation, and end-to-end runs of run_pretraining.py
(the demo, exact resume, SIGTERM checkpointing, non-finite losses, and 2-process gloo DDP on CPU)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port, load_script, run_in_process  # noqa: E402
from safetensors.torch import load_file

from bevt import BEVTConfig, BEVTForMaskedVideoModeling
from bevt.data.demo_pretraining import write_demo_pretraining_shards
from bevt.pretraining import (
    PretrainingData,
    PretrainingDataConfig,
    build_mask_generators,
    inflate_video_patch_embedding,
    model_inputs,
    random_tokenizer,
)
from bevt.training import (
    AverageMeter,
    CheckpointManager,
    GracefulExit,
    NonFiniteLossError,
    NonFiniteLossGuard,
    StepTimer,
    ThroughputMeter,
    build_param_groups,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_pretraining.py"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def script():
    return load_script("run_pretraining.py")


# ------------------------------------------------------------------------------------------------- utilities


def test_param_groups_skip_decay_on_norms_biases_bias_tables_and_mask_token():
    model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test"))
    model.head.lm_head.weight.requires_grad_(False)
    groups = build_param_groups(model, weight_decay=0.05, learning_rate=1e-3)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "head.lm_head.weight" not in by_name
    for name, group in by_name.items():
        no_decay = (
            name.endswith(".bias")
            or "norm" in name
            or "relative_position_bias_table" in name
            or name.endswith("mask_token")
        )
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
        assert group["lr"] == 1e-3
    assert by_name["bevt.encoder.layers.0.blocks.0.attention.qkv.weight"]["weight_decay"] == 0.05
    # optional per-parameter lr scales (layer decay) split the groups
    scaled = build_param_groups(
        model, 0.05, lr_scale=lambda n: 0.5 if "layers.0." in n else 1.0, learning_rate=1.0
    )
    assert {(g["weight_decay"], g["lr"]) for g in scaled} == {
        (0.05, 0.5),
        (0.05, 1.0),
        (0.0, 0.5),
        (0.0, 1.0),
    }
    torch.optim.AdamW(scaled)  # valid optimizer groups
    with pytest.raises(ValueError, match="weight_decay"):
        build_param_groups(model, -1.0)


def test_nonfinite_guard_skips_then_stops():
    guard = NonFiniteLossGuard(max_consecutive=3)
    assert guard.update(True)
    assert not guard.update(False) and not guard.update(False)
    assert guard.update(True) and guard.consecutive == 0 and guard.total_skipped == 2
    guard.update(False)
    guard.update(False)
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        guard.update(False, step=7)
    restored = NonFiniteLossGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert restored.total_skipped == 5


def test_graceful_exit_turns_sigterm_into_a_request():
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulExit() as stopper:
        assert not stopper.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stopper.should_stop() and stopper.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_meters():
    meter = AverageMeter()
    meter.update(1.0)
    meter.update(3.0, n=3)
    assert meter.avg == pytest.approx(2.5) and meter.val == 3.0
    rate = ThroughputMeter(window=2)
    for samples, seconds in ((100, 10.0), (10, 1.0), (30, 1.0)):
        rate.update(samples, seconds)
    assert rate.rate == pytest.approx(20.0)  # only the last two updates
    timer = StepTimer()
    with timer.phase("data"):
        time.sleep(0.01)
    assert timer.averages()["data"] >= 0.01
    # the scripts seed with Accelerate's set_seed (random, numpy and torch streams restart from the seed)
    from accelerate.utils import set_seed

    draws = []
    for _ in range(2):
        set_seed(3)
        draws.append((random.random(), float(np.random.rand()), torch.rand(2).tolist()))
    assert draws[0] == draws[1]


class _Counter:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_checkpoint_manager_is_atomic_rotates_and_restores(tmp_path, monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    counter = _Counter()
    accelerator.register_for_checkpointing(counter)
    manager = CheckpointManager(tmp_path, save_total_limit=2)
    assert manager.latest() is None
    for step in (1, 2, 3):
        counter.value = step
        with torch.no_grad():
            model.weight.fill_(step)
        manager.save(accelerator, step, extra_state={"note": step}, data_state={"position": step * 10})
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-2", "checkpoint-3"]  # rotated

    # A save killed half-way leaves only a temporary folder: the latest complete checkpoint is untouched.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(accelerator, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.save(accelerator, 4, data_state={})
    monkeypatch.undo()
    assert (tmp_path / ".tmp-checkpoint-4").is_dir() and not (tmp_path / "checkpoint-4").exists()
    (tmp_path / "checkpoint-9").mkdir()  # a folder that looks like a checkpoint but was never completed
    assert manager.latest() == tmp_path / "checkpoint-3"
    assert manager.resolve("latest") == tmp_path / "checkpoint-3"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        manager.resolve(tmp_path / "checkpoint-9")
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        manager.resolve(tmp_path / "nowhere")

    torch.manual_seed(123)
    manager.save(accelerator, 5, extra_state={"note": 5}, data_state={"position": 50})
    expected_random = torch.rand(3)  # what the RNG gives right after the save
    assert not (tmp_path / ".tmp-checkpoint-5").exists() and not (tmp_path / ".tmp-checkpoint-4").exists()
    with torch.no_grad():
        model.weight.zero_()
    counter.value = -1
    torch.rand(7)
    resumed = manager.load(accelerator, "latest")
    assert resumed.step == 5 and resumed.extra_state == {"note": 5} and resumed.data_state == {"position": 50}
    assert counter.value == 3 and torch.all(accelerator.unwrap_model(model).weight == 3)
    assert torch.equal(torch.rand(3), expected_random)  # the RNG state was restored too

    # Resuming from an older checkpoint abandons the newer ones: they are renamed (kept), so `latest` after a later
    # crash is a checkpoint of the resumed run, never one of the abandoned run.
    with pytest.warns(UserWarning, match="abandoned-checkpoint-5"):
        resumed = manager.load(accelerator, tmp_path / "checkpoint-3")
    assert resumed.step == 3 and manager.latest() == tmp_path / "checkpoint-3"
    assert (tmp_path / "abandoned-checkpoint-5" / "trainer_state.json").is_file()
    manager.save(accelerator, 4, data_state={})
    manager.save(accelerator, 5, data_state={})
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-4", "checkpoint-5"]
    with pytest.warns(UserWarning, match="abandoned-checkpoint-5-2"):
        manager.load(accelerator, tmp_path / "checkpoint-4")
    assert manager.latest() == tmp_path / "checkpoint-4"
    assert (tmp_path / "abandoned-checkpoint-5").is_dir() and (tmp_path / "abandoned-checkpoint-5-2").is_dir()


# ------------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def demo_data(pretraining_demo_data) -> Path:
    """The demo shards (written once per session, tests/conftest.py); copied into each run's output folder."""
    return pretraining_demo_data


def test_demo_data_is_deterministic_and_cached(tmp_path):
    kwargs = {"num_videos": 4, "num_images": 6, "num_shards": 2, "size": 32, "num_frames": 8}
    first = write_demo_pretraining_shards(tmp_path / "a", **kwargs)
    second = write_demo_pretraining_shards(tmp_path / "b", **kwargs)
    assert len(first.video_shards) == len(first.image_shards) == 2
    for a, b in zip(first.video_shards + first.image_shards, second.video_shards + second.image_shards):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    stamp = os.path.getmtime(first.video_shards[0])
    again = write_demo_pretraining_shards(tmp_path / "a", **kwargs)  # reused, not rewritten
    assert again.video_shards == first.video_shards and os.path.getmtime(first.video_shards[0]) == stamp
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    moved = write_demo_pretraining_shards(tmp_path / "moved", **kwargs)
    assert all(p.startswith(str(tmp_path / "moved")) for p in moved.video_shards + moved.image_shards)


def test_pretraining_data_batches_and_exact_resume(demo_data):
    settings = PretrainingDataConfig(
        image_batch_size=4,
        video_batch_size=2,
        image_size=64,
        num_frames=8,
        frame_interval=2,
        scale_range=(64, 80),
        min_mask_patches=2,
        shuffle_buffer=8,
        num_workers=0,
    )
    shards = write_demo_pretraining_shards(demo_data)
    data = PretrainingData(settings, shards.image_shards, shards.video_shards, seed=3)
    batch = data.next_batch()
    assert batch["pixel_values"].shape == (2, 8, 3, 64, 64)
    assert batch["bool_masked_pos"].shape == (2, 4, 4, 4)
    assert batch["tokenizer_pixel_values"].shape == (2, 8, 3, 32, 32)
    assert batch["image_pixel_values"].shape == (4, 3, 64, 64)
    assert batch["image_bool_masked_pos"].shape == (4, 4, 4) and batch["image_bool_masked_pos"][0].sum() == 8
    state = json.loads(json.dumps(data.state_dict()))  # checkpoints store it as JSON
    expected = data.next_batch()
    data.close()
    resumed = PretrainingData(settings, shards.image_shards, shards.video_shards, seed=3)
    resumed.load_state_dict(state)
    again = resumed.next_batch()
    resumed.close()
    assert set(again) == set(expected)
    for key in expected:
        assert torch.equal(again[key], expected[key]), key

    tokenizer = random_tokenizer(vocab_size=64, image_size=32, seed=0)
    inputs = model_inputs(again, tokenizer, "cpu")
    assert inputs["labels"].shape == (2, 8, 4, 4) and inputs["image_labels"].shape == (4, 4, 4)
    assert inputs["labels"].unique().numel() > 8  # the centred random tokenizer spreads the token ids
    output = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test"))(**inputs)
    assert torch.isfinite(output.loss)


def test_mask_generators_follow_the_official_ratio():
    tube, block = build_mask_generators(224, 16)
    assert tube.shape == (8, 14, 14) and block.shape == (14, 14)
    assert int(block().sum()) == 98 and tube.min_tube_len == 4 and tube.max_tube_len == 8


# ------------------------------------------------------------------------------------------------- CLI


def test_help_documents_every_flag_with_its_default(script):
    parser = script.build_parser()
    formatter = parser.formatter_class(parser.prog)
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert "(default:" in formatter._get_help_string(action) % {"default": action.default}, action.dest


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image_size", "100"], "--image_size must be a multiple of 32"),
        (["--num_frames", "7"], "--num_frames must be even"),
        (["--mask_ratio", "1.5"], "--mask_ratio must be in (0, 1)"),
        (["--scale_range", "32", "40"], "--scale_range must be LOW HIGH"),
        (["--image_shards", "x.tar"], "--video_shards must be given with --stage joint"),
        (
            ["--stage", "image", "--image_shards", "a", "--video_shards", "b"],
            "--video_shards must be omitted",
        ),
        (["--learning_rate", "0"], "--learning_rate must be > 0"),
        (["--save_total_limit", "0"], "--save_total_limit must be a positive integer"),
        (["--swin2d_checkpoint", "missing.pth"], "--swin2d_checkpoint must be an existing file"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive integer"),
        (
            ["--target", "hog", "--tokenizer_name_or_path", "tok"],
            "--tokenizer_name_or_path is a tokenizer flag: it cannot be combined with --target hog",
        ),
        (
            ["--target", "pixel", "--random_tokenizer"],
            "--random_tokenizer is a tokenizer flag: it cannot be combined with --target pixel",
        ),
        (
            ["--target", "hog", "--tokenizer_size", "32"],
            "--tokenizer_size is a tokenizer flag: it cannot be combined with --target hog",
        ),
        (
            ["--random_tokenizer", "--tokenizer_name_or_path", "tok"],
            "--random_tokenizer and --tokenizer_name_or_path are exclusive",
        ),
    ],
)
def test_bad_flags_name_the_flag_and_the_expected_value(script, argv, message):
    with pytest.raises(SystemExit) as err:
        script.parse_args(argv)
    assert message in str(err.value)


def test_demo_defaults_and_recipe_defaults(script):
    demo = script.parse_args([])
    assert demo.demo and demo.image_size == 64 and demo.tokenizer_size == 32 and demo.max_train_steps == 120
    assert demo.target == "pixel" and not demo.target_given  # informative targets, nothing to download
    recipe = script.parse_args(["--image_shards", "i.tar", "--video_shards", "v.tar"])
    assert not recipe.demo and recipe.image_size == 224 and recipe.tokenizer_size == 112
    assert recipe.target == "tokenizer"  # the paper's
    # the demo keeps the tubelet embedding at its initial weights (trained on pixels it stops seeing motion);
    # the official recipe trains it; either way the flag wins
    assert demo.freeze_video_patch_embedding is True and recipe.freeze_video_patch_embedding is False
    assert script.parse_args(["--freeze_video_patch_embedding", "false"]).freeze_video_patch_embedding is False
    given = script.parse_args(["--image_shards", "i.tar", "--video_shards", "v.tar", "--freeze_video_patch_embedding"])
    assert given.freeze_video_patch_embedding is True
    # a tokenizer flag alone selects the tokenizer target (e.g. the demo data with a real tokenizer)
    assert script.parse_args(["--tokenizer_name_or_path", "tok"]).target == "tokenizer"
    assert script.parse_args(["--random_tokenizer"]).target == "tokenizer"
    assert (recipe.video_batch_size, recipe.image_batch_size, recipe.learning_rate) == (8, 64, 5e-4)
    assert (recipe.num_frames, recipe.frame_interval, recipe.max_grad_norm, recipe.weight_decay) == (
        16,
        8,
        3.0,
        0.05,
    )


def test_tokenizer_target_without_a_tokenizer_says_how_to_get_one(script, tmp_path, tiny_pretrained_folder):
    out = tmp_path / "run"
    recipe = ["--image_shards", "i.tar", "--video_shards", "v.tar", "--output_dir", str(out)]
    with pytest.raises(SystemExit) as err:
        script.main(recipe)
    message = str(err.value)
    assert err.value.code == 2 and "--target tokenizer needs --tokenizer_name_or_path" in message
    assert "python -m bevt.convert" in message and "run_tokenizer_training.py" in message
    assert "--target hog / --target pixel" in message
    assert not out.exists()  # refused before anything was written
    # a --model_name_or_path model keeps its own target; another --target is refused, naming both
    with pytest.raises(SystemExit, match="--target hog does not match --model_name_or_path"):
        script.main(
            ["--model_name_or_path", str(tiny_pretrained_folder), "--target", "hog", "--output_dir", str(out)]
        )
    with pytest.raises(SystemExit, match="--target tokenizer needs"):  # its target is token ids
        script.main(["--model_name_or_path", str(tiny_pretrained_folder), "--output_dir", str(out)])


# ------------------------------------------------------------------------------------------------- end to end


def _run(
    args: list[str], output_dir: Path, demo_data: Path, launcher: list[str] | None = None, env=None, **kw
):
    if not (output_dir / "demo_data").exists():
        shutil.copytree(demo_data, output_dir / "demo_data")
    command = [*(launcher or [sys.executable]), str(SCRIPT), "--output_dir", str(output_dir), *args]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, cwd=REPO, env=run_env, capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_demo_loss_falls_and_resume_gives_identical_weights(tmp_path, demo_data):
    """The demo (no flags: pixel targets) learns what is under the masks, and resumes to the same weights."""
    out = tmp_path / "run"
    args = ["--max_train_steps", "30", "--checkpointing_steps", "20", "--logging_steps", "10"]
    launcher = [str(BIN / "accelerate"), "launch", "--num_processes", "1"]
    first = _run(args, out, demo_data, launcher=launcher, timeout=420)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "RANDOM weights" not in first.stderr and "targets: pixels" in first.stderr
    results = json.loads((out / "training_results.json").read_text())
    start, end = results["first"], results["final_window"]
    assert results["target"] == "pixel" and "tokenizer" not in results
    assert end["loss"] < start["loss"] - 0.1, results
    assert end["video_mask_r2"] > start["video_mask_r2"] + 0.1, results
    assert end["image_mask_r2"] > start["image_mask_r2"] + 0.1, results
    assert (out / "checkpoint-20" / "checkpoint_complete.json").is_file()

    from transformers import AutoModelForPreTraining, AutoVideoProcessor

    model = AutoModelForPreTraining.from_pretrained(out)
    assert isinstance(model, BEVTForMaskedVideoModeling) and model.config.target_type == "pixel"
    assert AutoVideoProcessor.from_pretrained(out).num_frames == 8
    card = (out / "README.md").read_text()
    assert "BEVTForMaskedVideoModeling" in card and "run_pretraining.py" in card
    assert "video_mask_r2" in card and "masked-patch R^2" in card and "normalised pixels" in card
    uninterrupted = load_file(out / "model.safetensors")

    resume = [*args, "--resume_from_checkpoint", str(out / "checkpoint-20")]
    second = _run(resume, out, demo_data, launcher=launcher, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stderr and "at step 20" in second.stderr
    resumed = load_file(out / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    different = {
        n: (t - resumed[n]).abs().max().item()
        for n, t in uninterrupted.items()
        if not torch.equal(t, resumed[n])
    }
    assert not different, different


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "target", "quality"),
    [
        (["--target", "hog", "--visualize_steps", "2", "--with_tracking"], "hog", "mask_r2"),
        (["--random_tokenizer"], "tokenizer", "mask_accuracy"),
    ],
)
def test_each_target_trains_saves_reloads_and_resumes_exactly(
    tmp_path, demo_data, script, flags, target, quality
):
    """`--target hog` and `--target tokenizer` (here with the random tokenizer) on the demo data, 4 tiny steps: the
    saved folder keeps the target, a run resumed at step 2 ends on the same weights, and a later run from the
    folder keeps its target."""
    out = tmp_path / "run"
    args = [*flags, "--max_train_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "2"]
    args += ["--video_batch_size", "2", "--image_batch_size", "4"]
    first = _run(args, out, demo_data, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert ("RANDOM weights" in first.stderr) == (target == "tokenizer")
    results = json.loads((out / "training_results.json").read_text())
    assert results["target"] == target and results["steps"] == 4
    expected = {"loss", "video_loss", "image_loss", f"video_{quality}", f"image_{quality}"}
    assert set(results["final_window"]) == expected
    assert np.isfinite(list(results["final_window"].values())).all()
    model = BEVTForMaskedVideoModeling.from_pretrained(out)
    assert model.config.target_type == target
    assert model.head.lm_head.out_features == (108 if target == "hog" else model.config.vocab_size)
    uninterrupted = load_file(out / "model.safetensors")
    # pictures: every --visualize_steps and at the end (by default at the end only), one per stream
    from PIL import Image

    steps = (2, 4) if "--visualize_steps" in flags else (4,)
    pictures = sorted(p.name for p in (out / "visualizations").iterdir())
    assert pictures == [f"step-{s:06d}-{stream}.png" for s in steps for stream in ("image", "video")]
    with Image.open(out / "visualizations" / "step-000004-video.png") as picture:
        assert picture.size == (96 + 8 * 130 - 2, 4 * 130 - 2)  # 8 frames x 4 rows of 128-px panels
    if "--with_tracking" in flags:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        images = {}  # tag -> steps, over the run's event files (Accelerate writes one per logged folder)
        for events in {p.parent for p in (out / "bevt_pretraining").rglob("events.out.tfevents.*")}:
            accumulator = EventAccumulator(str(events))
            accumulator.Reload()
            for tag in accumulator.Tags()["images"]:
                images[tag] = [e.step for e in accumulator.Images(tag)]
        assert images == {"pictures/video": [2, 4], "pictures/image": [2, 4]}, images

    second = _run([*args, "--resume_from_checkpoint", str(out / "checkpoint-2")], out, demo_data, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "at step 2" in second.stderr
    resumed = load_file(out / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[n], resumed[n]) for n in uninterrupted)
    # the folder as --model_name_or_path (the next stage): its target, without --target
    later = script.parse_args(["--model_name_or_path", str(out), "--output_dir", str(tmp_path / "next")])
    later.random_tokenizer = target == "tokenizer"
    assert script.resolve_target(later) == target
    if target == "hog":  # a tokenizer flag cannot turn it into a token model
        with pytest.raises(SystemExit, match="--random_tokenizer gives token targets.*target_type 'hog'"):
            script.resolve_target(script.parse_args(["--model_name_or_path", str(out), "--random_tokenizer"]))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path, demo_data):
    out = tmp_path / "run"
    shutil.copytree(demo_data, out / "demo_data")
    log = open(tmp_path / "log.txt", "w")
    process = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--output_dir",
            str(out),
            "--max_train_steps",
            "500",
            "--logging_steps",
            "1",
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 240
    while "step 2/500" not in (tmp_path / "log.txt").read_text() and time.time() < deadline:
        assert process.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=120)
    log.close()
    text = (tmp_path / "log.txt").read_text()
    assert returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "received signal 15" in text
    latest = CheckpointManager(out).latest()
    assert latest is not None and CheckpointManager.step_of(latest) >= 2
    assert not (out / "model.safetensors").exists()  # interrupted: no final model


@pytest.mark.slow
def test_nonfinite_losses_stop_the_run_with_a_clear_message(tmp_path, demo_data):
    args = [
        "--learning_rate",
        "1e30",
        "--num_warmup_steps",
        "0",
        "--max_nonfinite_steps",
        "2",
        "--max_train_steps",
        "20",
    ]
    result = _run(args, tmp_path / "run", demo_data, timeout=300)
    assert result.returncode == 1
    assert "update skipped" in result.stderr
    assert "NaN/inf for 2 optimizer steps in a row" in result.stderr


@pytest.mark.slow
def test_two_cpu_ranks_with_gloo_ddp_read_disjoint_samples(tmp_path, demo_data):
    out = tmp_path / "run"
    launcher = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
    ]
    args = [
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "3",
        "--logging_steps",
        "1",
        "--log_sample_keys",
    ]
    result = _run(args, out, demo_data, launcher=launcher, env={"ACCELERATE_USE_CPU": "1"}, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(2 processes x 1 accumulation)" in result.stderr
    from bevt.kernels_bevt import memory_allocator

    if memory_allocator() == "glibc malloc":  # a CPU run keeps freed blocks for the next step (keep_freed_memory)
        assert "glibc's malloc keeps large freed blocks for reuse" in result.stderr
    keys = [(out / f"sample_keys_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    # each step: 4 videos + 16 images per rank
    assert len(keys[0]) == len(keys[1]) == 3 * (4 + 16)
    assert not set(keys[0]) & set(keys[1])
    checkpoint = out / "checkpoint-3"
    for rank in (0, 1):
        assert (checkpoint / f"data_state_rank{rank}.json").is_file()
        assert (checkpoint / f"random_states_{rank}.pkl").is_file()


@pytest.mark.slow
def test_torch_compile_flag_trains_like_eager(tmp_path, demo_data):
    """`--torch_compile` compiles the encoder (static shapes): the first loss equals eager's, training proceeds and
    the saved weights keep their names (no `_orig_mod.` prefix)."""
    args = ["--max_train_steps", "3", "--logging_steps", "1"]
    eager = _run(args, tmp_path / "eager", demo_data, timeout=300)
    assert eager.returncode == 0, eager.stdout[-3000:] + eager.stderr[-3000:]
    compiled = _run([*args, "--torch_compile"], tmp_path / "compiled", demo_data, timeout=900)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    first = [json.loads((tmp_path / run / "training_results.json").read_text()) for run in ("eager", "compiled")]
    assert first[1]["steps"] == 3
    assert abs(first[0]["first"]["loss"] - first[1]["first"]["loss"]) < 1e-4, first
    assert first[1]["final_window"]["loss"] < first[1]["first"]["loss"]
    saved = load_file(tmp_path / "compiled" / "model.safetensors")
    assert saved.keys() == load_file(tmp_path / "eager" / "model.safetensors").keys()


def test_inflate_video_patch_embedding_embeds_a_still_clip_like_its_frame():
    model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test")).eval()
    inflated = inflate_video_patch_embedding(model.state_dict())
    model.load_state_dict(inflated)
    embeddings = model.bevt.embeddings.patch_embeddings
    frame = torch.randn(2, 3, 64, 64)
    still = frame[:, :, None].repeat(1, 1, 2, 1, 1)  # (B, C, T=2, H, W): one temporal patch of identical frames
    with torch.no_grad():
        torch.testing.assert_close(embeddings(still)[:, 0], embeddings(frame), atol=1e-5, rtol=1e-5)
    key = "bevt.embeddings.patch_embeddings."
    assert torch.equal(inflated[key + "norm.weight"], inflated[key + "image_norm.weight"])
    assert all(torch.equal(inflated[k], v) for k, v in model.state_dict().items() if "patch_embeddings" not in k)


@pytest.mark.slow
def test_image_only_training_saves_an_inflated_video_patch_embedding(tmp_path, demo_data, script):
    """`--stage image` (and a zero video loss weight) never train the Conv3d patch embedding: the saved folder has
    it made from the trained Conv2d one, so stage 2 and video fine-tuning do not start from random embeddings (also
    under the demo's --freeze_video_patch_embedding, which only keeps it out of training)."""
    out = tmp_path / "stage1"
    args = ["--stage", "image", "--max_train_steps", "2", "--image_batch_size", "4", "--checkpointing_steps", "0"]
    assert run_in_process(script, out, args, demo_data) == 0
    saved = load_file(out / "model.safetensors")
    key = "bevt.embeddings.patch_embeddings."
    expected = inflate_video_patch_embedding(saved)
    assert all(torch.equal(saved[key + k], expected[key + k]) for k in ("projection.weight", "norm.bias"))
    initial = BEVTForMaskedVideoModeling(BEVTConfig.from_pretrained(out)).state_dict()  # any random init differs
    assert not torch.equal(saved[key + "projection.weight"], initial[key + "projection.weight"])


@pytest.mark.slow
def test_freeze_video_patch_embedding_keeps_the_conv3d_and_trains_the_rest(
    tmp_path, demo_data, script, tiny_pretrained_folder
):
    out = tmp_path / "frozen"
    args = ["--model_name_or_path", str(tiny_pretrained_folder), "--random_tokenizer", "--freeze_video_patch_embedding",
            "--max_train_steps", "2", "--video_batch_size", "2", "--image_batch_size", "4", "--checkpointing_steps", "0"]  # fmt: skip
    assert run_in_process(script, out, args, demo_data) == 0
    before, after = load_file(tiny_pretrained_folder / "model.safetensors"), load_file(out / "model.safetensors")
    key = "bevt.embeddings.patch_embeddings."
    assert torch.equal(before[key + "projection.weight"], after[key + "projection.weight"])
    assert torch.equal(before[key + "projection.bias"], after[key + "projection.bias"])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert key + "image_projection.weight" in changed and key + "norm.weight" in changed
    assert any(k.startswith("bevt.encoder.") for k in changed)
