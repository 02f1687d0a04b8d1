"""Fine-tuning keeps a pretrained model's architecture (window, frames, image size, drop path) unless a flag
changes it; recipes apply their values to new models, and to pretrained ones only where the official recipe
changes them (SSv2: window 8x7x7 -> 16x7x7, 16 -> 32 frames, drop path 0.3 -> 0.4). Issue: a silent window swap
cost 15 points of top-1 in a low-label run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import PartialState
from helpers import load_script

from bevt import BEVTConfig, BEVTForMaskedVideoModeling
from bevt.data.demo_finetuning import write_demo_shards
from bevt.finetuning import RecipeChange, resolve_architecture, skipped_recipe_changes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_script("run_finetuning.py")


def _save(folder: Path, **overrides) -> Path:
    torch.manual_seed(0)
    BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test", **overrides)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def custom_folder(tmp_path_factory) -> Path:
    """A pretraining folder whose window, frames, image size and drop path all differ from every recipe."""
    return _save(
        tmp_path_factory.mktemp("custom"),
        window_size=(2, 2, 2),
        num_frames=4,
        image_size=32,
        drop_path_rate=0.05,
    )


@pytest.fixture(scope="module")
def official_like_folder(tmp_path_factory) -> Path:
    """A folder with the official BEVT-B pretraining's architecture values (tiny dims): 8x7x7, 16 frames, 0.3."""
    return _save(
        tmp_path_factory.mktemp("official"),
        window_size=(8, 7, 7),
        num_frames=16,
        image_size=224,
        drop_path_rate=0.3,
    )


def test_resolution_rules():
    pretrained = BEVTConfig.from_preset("test", window_size=(4, 2, 2), num_frames=8, drop_path_rate=0.1)
    recipe = {"window_size": (8, 7, 7), "num_frames": 32, "image_size": 224, "drop_path_rate": 0.3}
    changes = {"window_size": RecipeChange((8, 7, 7), (16, 7, 7), "official")}

    kept = resolve_architecture(pretrained, {}, recipe, changes, "ssv2")
    assert {n: c.value for n, c in kept.items()} == {
        "window_size": (4, 2, 2),
        "num_frames": 8,
        "image_size": 64,
        "drop_path_rate": 0.1,
    }
    assert not any(c.changed for c in kept.values()) and all(c.describe() == "" for c in kept.values())
    assert kept["window_size"].card_text() == "4x2x2 (pretrained model)"
    assert skipped_recipe_changes(pretrained, {}, changes, "ssv2") == [
        "ssv2 recipe: the official fine-tuning changes window_size 8x7x7 -> 16x7x7; this model has 4x2x2, "
        "kept (pass --window_size to change it)"
    ]

    flagged = resolve_architecture(pretrained, {"window_size": [8, 7, 7], "num_frames": 8}, recipe, changes)
    window = flagged["window_size"]
    assert window.value == (8, 7, 7) and window.changed and window.origin == "flag"
    assert window.describe() == (
        "window_size 4x2x2 -> 8x7x7 (--window_size): the relative position bias tables are resized to a window "
        "the model was not pretrained with, which can cost accuracy; omit --window_size to keep the pretrained "
        "4x2x2"
    )
    assert not flagged["num_frames"].changed  # a flag equal to the model's value is no change
    assert skipped_recipe_changes(pretrained, {"window_size": (8, 7, 7)}, changes) == []

    official = BEVTConfig.from_preset("test", window_size=(8, 7, 7))
    applied = resolve_architecture(official, {}, recipe, changes, "ssv2")["window_size"]
    assert applied.value == (16, 7, 7) and applied.origin == "recipe"
    assert applied.describe() == "window_size 8x7x7 -> 16x7x7 (ssv2 recipe: official): relative position bias tables resized"
    assert applied.card_text() == "16x7x7 (changed from 8x7x7: ssv2 recipe: official)"

    scratch = resolve_architecture(None, {"drop_path_rate": 0.2}, recipe, changes, "k400")
    assert scratch["window_size"].value == (8, 7, 7) and scratch["drop_path_rate"].value == 0.2
    assert not any(c.changed for c in scratch.values())
    assert scratch["window_size"].card_text() == "8x7x7 (k400 recipe)"


@pytest.mark.parametrize("recipe", ["k400", "ssv2"])
def test_a_pretrained_folder_keeps_its_architecture_under_every_recipe(script, custom_folder, recipe):
    args = script.parse_args(
        ["--recipe", recipe, "--train_shards", "x.tar", "--model_name_or_path", str(custom_folder)]
    )
    assert (args.window_size, args.num_frames, args.image_size, args.drop_path_rate) == ((2, 2, 2), 4, 32, 0.05)
    # the recipe's short side (256 for 224) scales with the model's own crop size; 3-crop testing at that size
    assert (args.short_side, args.eval_short_side) == (round(256 * 32 / 224), 32)
    # from scratch the recipe's values apply as before
    scratch = script.parse_args(["--recipe", recipe, "--train_shards", "x.tar"])
    assert scratch.window_size == ((8, 7, 7) if recipe == "k400" else (16, 7, 7)) and scratch.image_size == 224


def test_explicit_flags_change_the_architecture_and_are_logged(script, custom_folder, caplog):
    args = script.parse_args(
        ["--train_shards", "x.tar", "--model_name_or_path", str(custom_folder), "--window_size", "4", "2", "2",
         "--num_frames", "8", "--image_size", "64", "--short_side", "72"]
    )  # fmt: skip
    assert (args.window_size, args.num_frames, args.image_size, args.short_side) == ((4, 2, 2), 8, 64, 72)
    assert args.drop_path_rate == 0.05  # not given: the model's
    PartialState()
    with caplog.at_level("INFO"):
        model = script.build_model(args, ["a", "b", "c"])
    assert model.config.window_size == (4, 2, 2) and model.config.num_frames == 8
    lines = [r.getMessage() for r in caplog.records if "Architecture change" in r.getMessage()]
    assert len(lines) == 3, lines
    assert any("Architecture change: window_size 2x2x2 -> 4x2x2 (--window_size): the relative position bias "
               "tables are resized" in line for line in lines)  # fmt: skip
    assert any("num_frames 4 -> 8 (--num_frames)" in line and "can cost accuracy" in line for line in lines)
    assert any("image_size 32 -> 64 (--image_size)" in line for line in lines)
    warnings = [r for r in caplog.records if "Architecture change" in r.getMessage()]
    assert all(r.levelname == "WARNING" for r in warnings)


def test_ssv2_recipe_turns_the_official_8x7x7_window_into_16x7x7(script, official_like_folder, caplog):
    args = script.parse_args(
        ["--recipe", "ssv2", "--train_shards", "x.tar", "--model_name_or_path", str(official_like_folder)]
    )
    assert (args.window_size, args.num_frames, args.image_size, args.drop_path_rate) == ((16, 7, 7), 32, 224, 0.4)
    PartialState()
    with caplog.at_level("INFO"):
        model = script.build_model(args, ["a", "b"])
    assert model.config.window_size == (16, 7, 7) and model.config.drop_path_rate == 0.4
    table = model.bevt.encoder.layers[0].blocks[0].attention.relative_position_bias_table
    assert table.shape[0] == 31 * 13 * 13
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "relative position bias resized 8x7x7 -> 16x7x7" in messages
    assert "window_size 8x7x7 -> 16x7x7 (ssv2 recipe: the official SSv2 fine-tuning uses a 16x7x7 window)" in messages
    # k400 keeps the 8x7x7 window and turns the 16-frame pretraining into 32-frame clips, as the official config
    k400 = script.parse_args(["--train_shards", "x.tar", "--model_name_or_path", str(official_like_folder)])
    assert (k400.window_size, k400.num_frames, k400.drop_path_rate) == ((8, 7, 7), 32, 0.3)


def test_a_missing_model_folder_is_named(script, tmp_path):
    with pytest.raises(SystemExit, match="--model_name_or_path"):
        script.parse_args(["--train_shards", "x.tar", "--model_name_or_path", str(tmp_path / "missing")])


@pytest.mark.slow
def test_fine_tuning_run_keeps_the_folder_architecture_end_to_end(tmp_path, custom_folder):
    data = tmp_path / "data"
    write_demo_shards(data, num_train=8, num_validation=4)
    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO / "run_finetuning.py"), "--model_name_or_path", str(custom_folder),
        "--train_shards", str(data / "train"), "--validation_shards", str(data / "validation"),
        "--label_names", str(data / "train" / "labels.txt"), "--sampling", "uniform", "--flip_prob", "0",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--max_train_steps", "2", "--eval_num_clips", "1", "--eval_num_crops", "1", "--num_workers", "0",
        "--warmup_epochs", "0", "--logging_steps", "1", "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Architecture change" not in result.stderr and "relative position bias resized" not in result.stderr
    assert "window 2x2x2, 4 frames at 32 px" in result.stderr

    config = json.loads((out / "config.json").read_text())
    assert (config["window_size"], config["num_frames"], config["image_size"], config["drop_path_rate"]) == (
        [2, 2, 2],
        4,
        32,
        0.05,
    )
    processor = json.loads((out / "video_preprocessor_config.json").read_text())
    assert (processor["num_frames"], processor["crop_size"]["height"]) == (4, 32)
    card = (out / "README.md").read_text()
    yaml.safe_load(card.split("---\n")[1])
    assert "2x2x2 (pretrained model)" in card and "4 (pretrained model)" in card
