"""`run_tokenizer_training.py`: the demo trains and writes a tokenizer folder (+ results, picture, card) whose ids
the pretraining script uses; the reported numbers are those of the saved folder on the held-out images; kill -9 and
resume gives the weights of an uninterrupted run; bad input is one error line with exit status 2.

Runs are subprocesses on the pretraining demo's shards (copied to `<output_dir>/demo_data`, where the demo finds them),
shortened: 6 steps of 8 crops, width 8, 8 held-out images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_script, run_in_process
from PIL import Image
from safetensors.torch import load_file

from bevt import BEVTVisualTokenizer
from bevt.data.demo_pretraining import write_demo_pretraining_shards
from bevt.data.tokenizer_data import load_held_out
from bevt.tokenizer_training import TokenizerTrainingModel, evaluate_reconstruction
from bevt.training.faults import KILL_AT_ENV
from bevt.training.runtime import run_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_tokenizer_training.py"
ARGS = [
    "--max_train_steps", "6", "--checkpointing_steps", "3", "--image_batch_size", "8", "--held_out_samples", "8",
    "--width", "8", "--logging_steps", "1", "--seed", "3",
]  # fmt: skip


def run(
    script: Path, output_dir: Path, args: list[str], demo_data: Path | None = None, env=None, timeout=240
):
    if demo_data is not None and not (output_dir / "demo_data").exists():
        shutil.copytree(demo_data, output_dir / "demo_data")
    command = [sys.executable, str(script), "--output_dir", str(output_dir), *args]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run_env.pop(KILL_AT_ENV, None)
    run_env.update(env or {})
    return subprocess.run(command, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def script():
    return load_script("run_tokenizer_training.py")


@pytest.fixture(scope="module")
def demo_run(script, tmp_path_factory, pretraining_demo_data) -> Path:
    """The demo, shortened, with the VQGAN (EMA codebook: its statistics must survive a resume)."""
    out = tmp_path_factory.mktemp("tokenizer") / "run"
    assert run_in_process(script, out, [*ARGS, "--tokenizer_type", "vqgan"], pretraining_demo_data) == 0
    return out


# ---------------------------------------------------------------------------------------------------- arguments


def test_help_documents_every_flag_with_its_default(script):
    parser = script.build_parser()
    formatter = parser.formatter_class(parser.prog)
    for action in parser._actions:
        if action.dest != "help":
            assert "(default:" in formatter._get_help_string(action) % {"default": action.default}, (
                action.dest
            )
    text = parser.format_help()
    assert "--tokenizer_type {vqgan,dall-e}" in text and "--clip_len" in text and "--shard_cache_dir" in text


def test_demo_and_recipe_defaults_map_onto_the_library(script):
    demo = script.parse_args([])
    assert demo.demo and (demo.image_size, demo.vocab_size, demo.tokenizer_type) == (32, 64, "dall-e")
    config = demo.tokenizer_config()
    assert config.downsample_factor == 8 and config.image_size // config.downsample_factor == 4  # 4x4 ids
    assert script.parse_args(["--image_shards", "i.tar"]).tokenizer_type == "vqgan"
    recipe = script.parse_args(["--image_shards", "i.tar", "--tokenizer_type", "dall-e", "--kl_weight", "2"])
    assert not recipe.demo and (recipe.image_size, recipe.vocab_size, recipe.learning_rate) == (
        112,
        8192,
        2e-4,
    )
    objective = recipe.objective(max_train_steps=1000)
    assert (objective.kl_weight, objective.kl_warmup_steps, objective.temperature_anneal_steps) == (
        2.0,
        100,
        1000,
    )
    assert recipe.tokenizer_config().tokenizer_type == "dall-e"
    video = script.parse_args(
        ["--video_shards", "v", "--clip_len", "3", "--codebook_update", "straight-through"]
    )
    assert video.num_frames == 3 and video.objective(10).codebook_update == "straight-through"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--vocab_size", "1"], "--vocab_size must be an integer >= 2"),
        (["--image_size", "36"], "--image_size must be a multiple of 8"),
        (
            ["--tokenizer_type", "vqgan", "--channel_multipliers", "1", "2", "--image_size", "33"],
            "--image_size must be a multiple of 2",
        ),
        (
            ["--tokenizer_type", "dall-e", "--codebook_update", "straight-through"],
            "--codebook_update must be left out",
        ),
        (
            ["--tokenizer_type", "vqgan", "--kl_weight", "1"],
            "--kl_weight must be left out with --tokenizer_type vqgan",
        ),
        (["--crop_scale", "0", "1"], "--crop_scale must be LOW HIGH"),
        (["--gradient_checkpointing"], "--gradient_checkpointing must be off"),
        (["--tokenizer_name_or_path", "missing-folder"], "--tokenizer_name_or_path missing-folder: no such folder"),
    ],
)
def test_bad_flags_name_the_flag(script, argv, message):
    with pytest.raises(SystemExit) as err:
        script.parse_args(argv)
    assert err.value.code == 2 and message in str(err.value)


def test_bad_input_is_one_error_line_with_exit_status_2(script, tmp_path, pretraining_demo_data, capsys):
    """An unknown --tokenizer_type, a vocabulary that does not fit, no shards, shards with no images; --help."""
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--tokenizer_type", "nonsense"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()  # one line, no usage text
    assert line.endswith(
        ": error: argument --tokenizer_type/--tokenizer-type: invalid choice: 'nonsense' "
        "(choose from 'vqgan', 'dall-e') (see --help)"
    )
    video_shards = write_demo_pretraining_shards(
        pretraining_demo_data
    ).video_shards  # reuses the complete folder
    cases = {
        "vocab": (["--vocab_size", "0"], "error: --vocab_size must be an integer >= 2, got 0"),
        "missing": (["--image_shards", str(tmp_path / "none-*.tar")], "error: --image_shards: "),
        "no images": (
            ["--image_shards", *video_shards],
            "error: --image_shards: no image found in 4 shard(s): 0 ok, 64 skipped (missing_media 64)",
        ),
    }
    for name, (argv, message) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run_script(
                lambda argv=argv, name=name: script.main([*argv, "--output_dir", str(tmp_path / name)])
            )
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and lines[-1].startswith(message), (name, lines[-3:])
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0 and "--held_out_samples" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- the run


def test_demo_writes_a_tokenizer_folder_whose_reported_numbers_are_the_folders(demo_run):
    tokenizer = BEVTVisualTokenizer.from_pretrained(demo_run)
    config = tokenizer.config
    assert (config.tokenizer_type, config.vocab_size, config.image_size, config.has_decoder) == (
        "vqgan",
        64,
        32,
        True,
    )
    results = json.loads((demo_run / "training_results.json").read_text())
    assert results["steps"] == 6 and results["samples"] == {"image": 48} and results["demo"] is True
    held = results["held_out"]
    assert held["images"] == {"image": 8} and held["num_images"] == 8

    # The held-out images: the first 8 of the demo shards in listed order, never in a training batch.
    shards = write_demo_pretraining_shards(demo_run / "demo_data").image_shards  # reuses the complete folder
    held_out = load_held_out(shards, "image", 8, 32)
    assert len(held_out.keys) == 8 and not held_out.exhausted
    again = evaluate_reconstruction(tokenizer, held_out.images)
    for name in ("psnr", "mean_colour_psnr", "l1", "perplexity", "codes_used"):
        assert again[name] == pytest.approx(held[name], rel=1e-5), name
    assert held["psnr_margin_over_mean_colour"] == pytest.approx(held["psnr"] - held["mean_colour_psnr"])

    ids = tokenizer.get_codebook_indices(held_out.images)
    assert ids.shape == (8, 4, 4) and int(ids.max()) < 64
    pixels = tokenizer.decode(ids)
    assert pixels.shape == (8, 3, 32, 32) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1

    # The saved folder gives the ids of the trained model of the last checkpoint (a second, independent path).
    model = TokenizerTrainingModel(tokenizer.config)
    state = load_file(demo_run / "checkpoint-6" / "model.safetensors")
    model.load_state_dict(state)
    assert torch.equal(model.get_codebook_indices(held_out.images), ids)
    assert float(state["cluster_size"].sum()) > 0  # the EMA statistics are checkpointed

    picture = Image.open(demo_run / "reconstructions.png")
    assert picture.size == (
        8 * 64 + 7 * 2,
        2 * 64 + 2,
    )  # 8 held-out images at 2x: originals above reconstructions
    card = (demo_run / "README.md").read_text()
    assert "run_tokenizer_training.py" in card and f"{held['psnr']:.2f} dB" in card and "Demo run" in card
    assert json.loads((demo_run / "training_args.json").read_text())["tokenizer_type"] == "vqgan"


def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, demo_run, pretraining_demo_data):
    out = tmp_path / "run"
    args = [*ARGS, "--tokenizer_type", "vqgan"]
    killed = run(SCRIPT, out, args, pretraining_demo_data, env={KILL_AT_ENV: "step:4"})
    assert killed.returncode == -9 and not (out / "model.safetensors").exists()  # SIGKILL after step 4
    assert (out / "checkpoint-3").is_dir() and not (out / "checkpoint-6").exists()
    resumed = run(SCRIPT, out, [*args, "--resume_from_checkpoint", "latest"], pretraining_demo_data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 3" in resumed.stderr
    expected, got = load_file(demo_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), [
        k for k in expected if not torch.equal(expected[k], got[k])
    ]
    first = json.loads((demo_run / "training_results.json").read_text())["held_out"]
    second = json.loads((out / "training_results.json").read_text())["held_out"]
    assert first == second


def test_the_output_is_a_drop_in_tokenizer_for_pretraining(tmp_path, demo_run, pretraining_demo_data):
    """`run_pretraining.py --tokenizer_name_or_path <tokenizer output>` (the pretraining demo's 64 px model, 32 px
    tokenizer input): the model takes the tokenizer's vocabulary and trains on its ids."""
    out = tmp_path / "pretraining"
    args = ["--tokenizer_name_or_path", str(demo_run), "--stage", "image", "--max_train_steps", "2",
            "--image_batch_size", "4", "--checkpointing_steps", "0", "--logging_steps", "1"]  # fmt: skip
    assert run_in_process(load_script("run_pretraining.py"), out, args, pretraining_demo_data) == 0
    assert json.loads((out / "training_results.json").read_text())["tokenizer"] == str(demo_run)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64


def test_the_dalle_dvae_demo_default_trains_and_saves(script, tmp_path, pretraining_demo_data):
    out = tmp_path / "dalle"
    assert (
        run_in_process(
            script,
            out,
            ["--max_train_steps", "2", "--checkpointing_steps", "0", *ARGS[4:]],
            pretraining_demo_data,
        )
        == 0
    )
    tokenizer = BEVTVisualTokenizer.from_pretrained(out)
    assert tokenizer.config.tokenizer_type == "dall-e" and tokenizer.config.has_decoder
    results = json.loads((out / "training_results.json").read_text())
    assert (
        results["tokenizer_type"] == "dall-e"
        and results["steps"] == 2
        and results["held_out"]["num_images"] == 8
    )
    assert set(results["final_window"]) >= {"nll", "kl", "temperature", "kl_weight", "psnr"}


def test_held_out_keys_never_reach_the_training_stream(pretraining_demo_data):
    """The held-out samples (first N in listed order) are skipped by the training stream, and nothing else is."""
    from bevt.data.streaming import build_stream

    shards = write_demo_pretraining_shards(pretraining_demo_data).image_shards  # reuses the complete folder
    held_out = load_held_out(shards, "image", 8, 32)
    everything = [s["__key__"] for s in build_stream(shards, kind="image", shuffle_buffer=4)]
    assert len(set(held_out.keys)) == 8 and set(held_out.keys) < set(everything)
    stream = build_stream(shards, kind="image", shuffle_buffer=4, exclude_keys=held_out.keys)
    trained = [s["__key__"] for s in stream]
    assert sorted(trained) == sorted(set(everything) - set(held_out.keys))
    assert stream.stats.num_failed == 0  # skipped, not counted as failures


def test_training_continues_from_a_tokenizer_folder(script, tmp_path, demo_run, pretraining_demo_data):
    """`--tokenizer_name_or_path`: the folder's weights are the start (its input size kept), and the run moves them."""
    out = tmp_path / "continued"
    args = ["--tokenizer_name_or_path", str(demo_run), "--tokenizer_type", "vqgan", "--max_train_steps", "1",
            "--checkpointing_steps", "0", *ARGS[4:]]  # fmt: skip
    assert run_in_process(script, out, args, pretraining_demo_data) == 0
    start, end = load_file(demo_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert start.keys() == end.keys() and not torch.equal(
        start["decoder.conv_out.weight"], end["decoder.conv_out.weight"]
    )
    assert (
        BEVTVisualTokenizer.from_pretrained(out).config.to_diff_dict()
        == BEVTVisualTokenizer.from_pretrained(demo_run).config.to_diff_dict()
    )
    with pytest.raises(SystemExit, match="--tokenizer_type must be 'vqgan'"):
        script.main([*args[:2], "--tokenizer_type", "dall-e", "--output_dir", str(tmp_path / "wrong")])
