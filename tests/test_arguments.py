"""Typed arguments of the training scripts: `--config run.yaml|run.json` (the command line wins), clear errors with
exit status 2, `training_args.json` (resolved, tokens masked, reusable as `--config`), the recipes (diving48 is the
ssv2 recipe for 48 classes; the pretraining data settings come from `PretrainingDataConfig`), and a tracked run
whose tracker config and saved arguments never contain the Hub token."""

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

from bevt import BEVTConfig, BEVTForVideoClassification
from bevt.pretraining import PretrainingDataConfig
from bevt.training.arguments import MASKED, BEVTArgumentParser, UsageError, save_training_args, tracker_config
from bevt.training.finetuning_arguments import DIVING48, SSV2, FinetuningArguments
from bevt.training.runtime import run_script

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_NotARealTokenButSecret1234567890"


def test_yaml_config_gives_typed_values_and_flags_override_it(pretraining, tmp_path):
    config = tmp_path / "run.yaml"
    # 5e-4 is a string for YAML 1.1 and [64, 96] a list: both are converted like command-line values
    config.write_text(
        "video_shards: [v.tar]\nimage_shards: i.tar\nlearning_rate: 5e-4\nscale_range: [64, 96]\n"
        "with_tracking: true\nimage_size: 64\nmax_train_steps: 7\n"
    )
    args = pretraining.parse_args(["--config", str(config), "--max_train_steps", "9"])
    assert not args.demo and args.video_shards == ["v.tar"] and args.image_shards == ["i.tar"]
    assert args.learning_rate == 5e-4 and args.scale_range == (64, 96) and args.with_tracking is True
    assert args.image_size == 64 and args.tokenizer_size == 32  # derived from the file's image size
    assert args.max_train_steps == 9  # the command line wins
    assert args.weight_decay == 0.05 and args.num_frames == 16  # the rest: the official recipe


def test_json_config_selects_a_recipe_and_still_checks_values(finetuning, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"recipe": "ssv2", "train_shards": ["t.tar"], "layer_decay": 0.5, "mixup": 0.2}))
    args = finetuning.parse_args(["--config", str(config)])
    assert (args.recipe, args.window_size, args.layer_decay, args.mixup) == ("ssv2", (16, 7, 7), 0.5, 0.2)
    assert args.randaug == (4, 7) and args.config == str(config)
    config.write_text(json.dumps({"train_shards": ["t.tar"], "layer_decay": 0}))
    with pytest.raises(SystemExit, match=r"--layer_decay must be in \(0, 1\], got 0") as err:
        finetuning.parse_args(["--config", str(config)])
    assert err.value.code == 2


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("run.yaml", "learning_rat: 0.1\n", r"unknown setting 'learning_rat' \(did you mean 'learning_rate'\?\)"),
        ("run.yaml", "- 1\n- 2\n", "expected a mapping of flag names to values, got list"),
        ("run.yaml", "image_size: [64, 96]\n", "'image_size' takes one value"),
        ("run.yaml", "a: [1\n", "not valid YAML"),
        ("run.json", "{not json", "not valid JSON"),
        ("run.txt", "x: 1\n", "--config must be a .yaml, .yml or .json file"),
        (None, "", "--config must be an existing file"),
    ],
)
def test_config_file_errors_name_the_file_and_the_problem(pretraining, tmp_path, name, content, message):
    path = tmp_path / (name or "missing.yaml")
    if name is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message) as err:
        pretraining.parse_args(["--config", str(path)])
    assert err.value.code == 2


def test_training_args_json_is_resolved_masks_tokens_and_works_as_config(finetuning, tmp_path):
    args = finetuning.parse_args(["--recipe", "ssv2", "--train_shards", "t.tar", "--hub_token", SECRET])
    path = save_training_args(args, tmp_path)
    text = path.read_text()
    assert SECRET not in text
    saved = json.loads(text)
    assert saved["hub_token"] == MASKED and saved["window_size"] == [16, 7, 7] and saved["learning_rate"] == 5e-4
    assert saved["randaug"] == [4, 7] and "architecture" not in saved  # flags only
    config = tracker_config(args)
    assert config["hub_token"] == MASKED and SECRET not in json.dumps(config)
    assert all(isinstance(v, int | float | str | bool) for v in config.values())
    again = finetuning.parse_args(["--config", str(path)])  # the resolved file reproduces the run's arguments
    for key, value in saved.items():
        if key not in ("hub_token", "config"):
            expected = tuple(value) if isinstance(value, list) and key not in ("train_shards",) else value
            assert getattr(again, key) == expected, key
    assert again.hub_token is None  # a masked token is not read back


def test_diving48_is_the_ssv2_recipe_for_48_classes(finetuning):
    differs = {k for k, v in DIVING48.values().items() if v != SSV2.values()[k]}
    assert differs == {"output_dir"}  # no recipe claims a dataset in the model card (issue 17): --dataset_name
    assert DIVING48.num_labels == 48 and DIVING48.based_on == "ssv2"
    args = finetuning.parse_args(["--recipe", "diving48", "--train_shards", "t.tar"])
    assert (args.sampling, args.flip_prob, args.window_size, args.eval_num_clips) == ("uniform", 0.0, (16, 7, 7), 1)
    assert args.dataset_name is None and args.output_dir == "bevt-finetuned-diving48"
    # --help lists diving48's value only where it differs from ssv2's
    parser = BEVTArgumentParser(FinetuningArguments)
    mentions = {a.dest for a in parser._actions if "diving48" in (a.help or "") and a.dest != "recipe"}
    assert mentions == {"dataset_name", "output_dir"}  # dataset_name: its help's example ids
    by_dest = {a.dest: " ".join(a.help.split()) for a in parser._actions}
    assert by_dest["dataset_name"].endswith("(default: none (no dataset claimed); demo: bevt-synthetic-temporal)")
    assert by_dest["layer_decay"].endswith("(default: k400 0.9, ssv2 1.0; demo: 1.0)")


def test_finetuning_config_overrides_shape_a_new_model_only(finetuning, tmp_path):
    """`--config_overrides` (as in run_pretraining.py) sets the architecture of a model fine-tuned from scratch, after
    the recipe's fields; it is refused with --model_name_or_path, with num_labels (the data gives the classes) and
    with a field that does not exist."""
    PartialState(cpu=True)  # build_model logs through Accelerate
    args = finetuning.parse_args(["--config_overrides", "embed_dim=32,depths=(1,1,1,1),window_size=(2,2,2)"])
    model = finetuning.build_model(args, ["a", "b", "c"])
    config = model.config
    assert (config.embed_dim, config.depths, config.window_size, config.num_labels) == (32, (1, 1, 1, 1), (2, 2, 2), 3)
    assert config.num_frames == args.num_frames and config.image_size == args.image_size  # the rest: the demo's
    assert model.classifier.in_features == 32 * 8  # the last stage's width follows the override
    assert args.card_start() == "scratch (test preset, embed_dim=32,depths=(1,1,1,1),window_size=(2,2,2))"
    for argv, message in (
        (["--config_overrides", "num_labels=5"], "without num_labels"),
        (["--config_overrides", "embeddim=32"], "did you mean 'embed_dim'"),
        (["--config_overrides", "embed_dim"], "key=value pairs"),
    ):
        with pytest.raises(SystemExit, match=f"--config_overrides.*{message}"):
            finetuning.parse_args(argv)
    folder = tmp_path / "model"
    BEVTForVideoClassification(BEVTConfig.from_preset("test", num_labels=2)).save_pretrained(folder)
    with pytest.raises(SystemExit, match="--config_overrides.*omitted with --model_name_or_path"):
        finetuning.parse_args(["--model_name_or_path", str(folder), "--config_overrides", "embed_dim=32"])
    with pytest.raises(SystemExit, match="--config_overrides.*--num_heads|--config_overrides.*invalid config"):
        finetuning.build_model(finetuning.parse_args(["--config_overrides", "num_heads=(1,2)"]), ["a", "b"])


def test_pretraining_data_settings_come_from_one_config(pretraining):
    recipe = pretraining.parse_args(["--image_shards", "i.tar", "--video_shards", "v.tar"])
    assert recipe.data_config() == PretrainingDataConfig(tokenizer_size=112)
    demo = pretraining.parse_args(["--flip_prob", "0.25", "--target", "tokenizer", "--random_tokenizer"]).data_config()
    assert (demo.image_size, demo.num_frames, demo.tokenizer_input_size, demo.flip_prob) == (64, 8, 32, 0.25)
    transform = demo.video_transform()
    assert (transform.image_size, transform.flip_prob, transform.tokenizer_size) == (64, 0.25, 32)
    # HOG / pixel targets read the model input: the workers make no half-size tokenizer copy of the frames
    for target in ("pixel", "hog"):
        config = pretraining.parse_args(["--target", target]).data_config()
        assert config.tokenizer_input_size == 0
        sample = config.video_transform()(torch.zeros(8, 72, 72, 3, dtype=torch.uint8))
        assert set(sample) == {"pixel_values"}
    assert pretraining.parse_args([]).data_config().tokenizer_input_size == 0  # the demo's default: pixel
    tube, block = demo.mask_generators()
    assert block.shape == (4, 4) and tube.shape == (4, 4, 4)


def test_usage_errors_exit_with_status_2_and_one_error_line(capsys):
    def main() -> int:
        raise UsageError("--num_frames must be even (patches span 2 frames), got 7")

    with pytest.raises(SystemExit) as err:
        run_script(main)
    assert err.value.code == 2
    assert capsys.readouterr().err == "error: --num_frames must be even (patches span 2 frames), got 7\n"
    result = subprocess.run(
        [sys.executable, str(REPO / "run_pretraining.py"), "--num_frames", "7"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --num_frames must be even (patches span 2 frames), got 7"
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_tracked_run_never_records_the_hub_token(tmp_path, finetuning_demo_data):
    """`--with_tracking` sends the run's arguments to the tracker (TensorBoard hparams + hparams.yml) and the run
    saves training_args.json: the token appears in none of the files the run writes."""
    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO / "run_finetuning.py"), "--train_shards", str(finetuning_demo_data / "train"),
        "--model_preset", "test", "--window_size", "4", "2", "2", "--image_size", "32", "--short_side", "36",
        "--num_frames", "8", "--sampling", "uniform", "--per_device_train_batch_size", "4", "--num_workers", "0",
        "--gradient_accumulation_steps", "1", "--max_train_steps", "1", "--logging_steps", "1",
        "--with_tracking", "--report_to", "tensorboard", "--hub_token", SECRET, "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    hparams = list((out / "bevt_finetuning").rglob("hparams.yml"))
    assert hparams and yaml.safe_load(hparams[0].read_text())["hub_token"] == MASKED
    assert json.loads((out / "training_args.json").read_text())["hub_token"] == MASKED
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("events.out.tfevents" in p.name for p in files)
    leaking = [str(p.relative_to(out)) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaking, leaking


def test_remote_shard_flags_reach_the_streams(pretraining, finetuning):
    args = pretraining.parse_args(
        ["--image_shards", "https://example.org/in1k/{00000..00003}.tar", "--stage", "image",
         "--shard_cache_dir", "/tmp/cache", "--shard_max_retries", "2", "--shard_timeout", "5",
         "--storage_options", '{"anon": true}']
    )  # fmt: skip
    assert args.stream_options() == {
        "max_failure_fraction": 0.1,
        "cache_dir": "/tmp/cache",
        "max_retries": 2,
        "timeout": 5.0,
        "storage_options": {"anon": True},
    }
    assert pretraining.parse_args(["--image_shards", "x.tar", "--stage", "image"]).stream_options()["cache_dir"] is None
    for argv, message in [
        (["--storage_options", "anon=true"], "--storage_options must be a JSON object"),
        (["--shard_timeout", "0"], "--shard_timeout must be > 0 seconds"),
        (["--shard_max_retries", "-1"], "--shard_max_retries must be"),
    ]:
        with pytest.raises(SystemExit, match=message):
            pretraining.parse_args(["--image_shards", "x.tar", "--stage", "image", *argv])
    # a label file may be a URL too (read next to remote shards); a missing local file is still refused early
    url = finetuning.parse_args(["--train_shards", "hf://datasets/org/k400/train", "--label_names", "hf://datasets/org/k400/labels.txt"])
    assert url.label_names == "hf://datasets/org/k400/labels.txt"
    with pytest.raises(SystemExit, match="--label_names must be an existing text file"):
        finetuning.parse_args(["--train_shards", "x.tar", "--label_names", "/nonexistent/labels.txt"])
