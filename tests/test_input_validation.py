"""Input validation: a wrong value gets an error that names the field and the value expected, raised by bevt itself
(never a stack trace from deep inside torch, PIL or argparse internals for a user error).

Covers configs (`BEVTConfig`, `BEVTVisualTokenizerConfig`), model inputs, `BEVTVideoProcessor` inputs, the data
layer's arguments, and the command lines of `python -m bevt.convert` and `python -m bevt.data.make_shards`. (The
training scripts' flags are covered by their own tests.)
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import bevt
from bevt import (
    BEVTConfig,
    BEVTForMaskedVideoModeling,
    BEVTForVideoClassification,
    BEVTModel,
    BEVTVideoProcessor,
)
from bevt.configuration_tokenizer import BEVTVisualTokenizerConfig
from bevt.convert import main as convert_main
from bevt.data.make_shards import main as make_shards_main
from bevt.data.shards import ShardWriter, write_shards
from bevt.data.streaming import StreamDataLoader, build_stream
from bevt.data.transforms import PretrainingImageTransform, PretrainingVideoTransform
from bevt.video_decoding import VideoDecodingError

BEVT_SOURCE = str(Path(bevt.__file__).parent)


def raised_by_bevt(error: type[Exception], match: str, call: Callable[[], object]) -> Exception:
    """`call()` raises `error` whose message matches `match`, from bevt's own code (its last frame is ours)."""
    with pytest.raises(error, match=match) as info:
        call()
    last = traceback.extract_tb(info.tb)[-1]
    assert last.filename.startswith(BEVT_SOURCE), f"raised from {last.filename}:{last.lineno}, not by bevt"
    return info.value


# ------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embed_dim": 0}, "`embed_dim` must be a positive integer, got 0"),
        ({"image_size": "224"}, "`image_size` must be a positive integer, got '224'"),
        ({"window_size": (7, 7)}, r"`window_size` must have 3 values \(time, height, width\), got \(7, 7\)"),
        ({"patch_size": (0, 4, 4)}, "`patch_size` must contain positive integers"),
        ({"depths": (1, 1)}, "`depths` .* and `num_heads` .* must have the same length"),
        ({"num_heads": (3, 2, 2, 4)}, r"`num_heads\[0\]`=3 does not divide the stage-1 channels 16"),
        ({"mlp_ratio": "4"}, "`mlp_ratio` must be a number, got '4'"),
        ({"drop_path_rate": 1.5}, r"`drop_path_rate` must be in \[0, 1\), got 1.5"),
        ({"hidden_act": "relu6x"}, "`hidden_act` must be one of .*'gelu'.*, got 'relu6x'"),
        ({"layer_norm_eps": 0.0}, "`layer_norm_eps` must be positive"),
        ({"video_loss_weight": -1.0}, "`video_loss_weight` must be >= 0"),
    ],
)
def test_bevt_config_errors_name_the_field(overrides: dict, message: str):
    raised_by_bevt(ValueError, message, lambda: BEVTConfig.from_preset("test", **overrides))


def test_unknown_preset_lists_the_choices():
    raised_by_bevt(
        ValueError,
        r"unknown preset 'huge'; choose one of \['base', 'large', 'small', 'test', 'tiny'\]",
        lambda: BEVTConfig.from_preset("huge"),
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tokenizer_type": "vq-vae"}, "`tokenizer_type` must be one of"),
        ({"vocab_size": 1}, "`vocab_size` must be at least 2, got 1"),
        ({"logit_laplace_eps": 0.7}, r"`logit_laplace_eps` must be in \[0, 0.5\)"),
        ({"dalle_hidden_size": 30}, "`dalle_hidden_size` must be a multiple of 4, got 30"),
        ({"autocast_dtype": "float8"}, "`autocast_dtype` must be one of"),
    ],
)
def test_tokenizer_config_errors_name_the_field(overrides: dict, message: str):
    raised_by_bevt(ValueError, message, lambda: BEVTVisualTokenizerConfig(**overrides))


# ------------------------------------------------------------------------------------------------- model inputs


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return (
        BEVTModel(BEVTConfig.from_preset("test")).eval(),
        BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test")).eval(),
        BEVTForVideoClassification(BEVTConfig.from_preset("test", num_labels=3)).eval(),
    )


VIDEO = torch.randn(2, 8, 3, 64, 64)
MASK = torch.ones(2, 4, 4, 4, dtype=torch.bool)


def test_model_input_errors_name_the_argument_and_the_expected_shape(models):
    model, mim, classifier = models
    cases = [
        (
            lambda: model(torch.randn(3, 64, 64)),
            r"must be a video \(B, T, C, H, W\) or an image batch \(B, C, H, W\)",
        ),
        (lambda: model(torch.randn(2, 8, 64, 64, 3)), r"has 64 channels .* the model expects 3"),
        (lambda: model(torch.randn(2, 1, 64, 64)), "has 1 channels"),
        (lambda: model(torch.zeros(1, 8, 3, 64, 64, dtype=torch.uint8)), "must be a floating point tensor"),
        (lambda: model(np.zeros((1, 8, 3, 64, 64), np.float32)), "must be a torch.Tensor, got ndarray"),
        (lambda: model(torch.randn(0, 8, 3, 64, 64)), "is empty"),
        (
            lambda: mim(VIDEO, bool_masked_pos=torch.zeros(2, 4, 3, 3, dtype=torch.bool)),
            r"must have shape \(2, 4, 4, 4\)",
        ),
        (lambda: mim(VIDEO, bool_masked_pos=torch.zeros(2, 4, 4, 4)), "must be a bool"),
        (
            lambda: mim(VIDEO, bool_masked_pos=MASK, labels=torch.full((2, 8, 4, 4), 64)),
            r"must be in \[0, 64\) \(vocab_size\)",
        ),
        (
            lambda: mim(VIDEO, bool_masked_pos=MASK, labels=torch.zeros(2, 4, 4, 4, dtype=torch.long)),
            r"of shape \(2, 8, 4, 4\)",
        ),
        (lambda: mim(VIDEO, labels=torch.zeros(2, 8, 4, 4, dtype=torch.long)), "need its mask"),
        (lambda: mim(), "give `pixel_values` \\(videos\\) and/or `image_pixel_values` \\(images\\)"),
        (lambda: classifier(VIDEO, labels=torch.tensor([0, 3])), r"`labels` must be class ids in \[0, 3\)"),
        (
            lambda: classifier(VIDEO, labels=torch.tensor([0, 1, 2])),
            "`labels` has 3 entries for a batch of 2",
        ),
        (lambda: classifier(VIDEO, labels=torch.rand(2, 5)), r"must have the logits' shape \(2, 3\)"),
    ]
    with torch.no_grad():
        for call, message in cases:
            raised_by_bevt(ValueError, message, call)
        # soft targets of the right shape are fine
        assert torch.isfinite(classifier(VIDEO, labels=torch.softmax(torch.randn(2, 3), -1)).loss)


# ------------------------------------------------------------------------------------------------- processor


def test_processor_input_errors_name_the_problem(tmp_path: Path):
    processor = BEVTVideoProcessor(
        num_frames=4, frame_interval=2, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    video = np.zeros((8, 40, 48, 3), np.uint8)
    assert processor(video)["pixel_values"][0].shape == (4, 3, 32, 32)
    expected = "videos must be a path, URL, bytes, a \\(T, H, W, C\\) array/tensor"
    raised_by_bevt(ValueError, expected + ".*got NoneType", lambda: processor(None))
    raised_by_bevt(ValueError, "got list \\(empty\\)", lambda: processor([]))
    raised_by_bevt(
        ValueError,
        r"video 0 of the batch has no frames \(shape \(0, 40, 48, 3\)\)",
        lambda: processor(np.zeros((0, 40, 48, 3), np.uint8)),
    )
    raised_by_bevt(
        ValueError, "num_frames must be a positive integer, got 0", lambda: processor(video, num_frames=0)
    )
    raised_by_bevt(
        ValueError, r"num_crops must be 1 \(centre crop\) or 3", lambda: processor(video, num_crops=2)
    )
    raised_by_bevt(
        ValueError,
        r"sampling_mode must be one of \['dense', 'uniform'\], got 'random'",
        lambda: processor(video, sampling_mode="random"),
    )
    raised_by_bevt(
        VideoDecodingError,
        "video 0 of the batch: video file not found: .*missing.mp4",
        lambda: processor(str(tmp_path / "missing.mp4")),
    )
    raised_by_bevt(
        VideoDecodingError,
        "video 0 of the batch: cannot open video <366 bytes of video>",
        lambda: processor(b"not a video" * 32 + b"ab" * 7),
    )


# ------------------------------------------------------------------------------------------------- data layer


def test_data_layer_arguments_are_checked(tmp_path: Path):
    write_shards([("a", "jpg", b"x", {"label": 0})], tmp_path)
    checks = [
        (lambda: build_stream(tmp_path, kind="audio"), "kind must be 'video' or 'image', got 'audio'"),
        (lambda: build_stream(tmp_path, rank=2, world_size=2), "need 0 <= rank < world_size, got rank=2"),
        (lambda: build_stream(tmp_path, shuffle_buffer=-1), "shuffle_buffer must be >= 0, got -1"),
        (
            lambda: build_stream(tmp_path, max_failure_fraction=1.5),
            r"max_failure_fraction must be in \[0, 1\]",
        ),
        (lambda: build_stream(tmp_path, num_labels=0), "num_labels must be a positive int or None, got 0"),
        (lambda: build_stream(tmp_path / "nothing-here"), "shard file not found"),
        (lambda: StreamDataLoader(build_stream(tmp_path), batch_size=0), "batch_size must be >= 1, got 0"),
        (lambda: ShardWriter(tmp_path / "w", shard_size_mb=0), "shard_size_mb must be > 0, got 0"),
        (lambda: ShardWriter(tmp_path / "w", prefix="a.b"), "invalid shard prefix 'a.b'"),
        (lambda: write_shards([("k.1", "mp4", b"x", None)], tmp_path / "k"), "invalid sample key 'k.1'"),
        (
            lambda: write_shards([("k", "mov", b"x", None)], tmp_path / "m"),
            "unsupported media extension 'mov'",
        ),
        (
            lambda: write_shards([("k", "mp4", b"x", {"label": -3})], tmp_path / "l"),
            "'label' must be an int class index >= 0",
        ),
        (
            lambda: write_shards([("k", "mp4", b"x", {"label": "3"})], tmp_path / "s"),
            "'label' must be an int",
        ),
        (
            lambda: PretrainingVideoTransform(image_size=224, scale_range=(128, 160)),
            r"scale_range \(128, 160\) must satisfy image_size \(224\) <= low <= high",
        ),
        (
            lambda: PretrainingImageTransform(color_jitter=(0.4, 0.4)),
            r"color_jitter must be a float or \(brightness, contrast, saturation\)",
        ),
        (
            lambda: PretrainingVideoTransform(32, (32, 40))(torch.zeros(4, 40, 40, 3)),
            "expected uint8 pixels, got torch.float32",
        ),
        (
            lambda: PretrainingVideoTransform(32, (32, 40))(torch.zeros(4, 3, 40, 40, dtype=torch.uint8)),
            r"expected shape \(T, H, W, 3\), got \(4, 3, 40, 40\)",
        ),
    ]
    for call, message in checks:
        with pytest.raises((ValueError, TypeError, FileNotFoundError), match=message):
            call()


# ------------------------------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def recognizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_convert import recognizer_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "recognizer.pth"
    torch.save(recognizer_checkpoint(), path)
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-frames", "0"], "--num-frames must be a positive integer, got 0"),
        (["--frame-interval", "-1"], "--frame-interval must be a positive integer, got -1"),
        (
            ["--window-size", "0", "7", "7"],
            r"--window-size must be three positive integers \(D H W\), got 0 7 7",
        ),
        (
            ["--checkpoint-window-size", "1", "2", "3", "4"],
            r"--checkpoint-window-size must be D H W \(3D\) or H W",
        ),
        (["--drop-keys", "("], "--drop-keys '\\(' is not a valid regular expression"),
        (["--vqgan-norm-groups", "0"], "--vqgan-norm-groups must be a positive integer, got 0"),
        (["--sampling-mode", "random"], "argument --sampling-mode(/--sampling)?: invalid choice: 'random'"),
        (["--id2label", "missing_labels.txt"], "--id2label: file not found: missing_labels.txt"),
    ],
)
def test_convert_cli_rejects_bad_flags_before_any_work(
    recognizer_file: Path, tmp_path: Path, capsys, flags, message
):
    argv = [
        "--format",
        "video-swin",
        "--checkpoint",
        str(recognizer_file),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        convert_main([*argv, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "o").exists()  # nothing half-written


def test_convert_cli_user_errors_are_one_line(recognizer_file: Path, tmp_path: Path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    argv = ["--checkpoint", str(recognizer_file), "--output-dir", str(tmp_path / "o")]
    for extra, message in (
        (
            ["--format", "video-swin", "--id2label", str(labels)],
            "the label file has 2 class names, the checkpoint's classifier has 5 outputs",
        ),
        (
            ["--format", "video-swin", "--task", "pretraining"],
            "--format video-swin converts to task classification or base",
        ),
        (
            ["--format", "bevt-pretrain"],
            "this checkpoint has a classifier cls_head.fc_cls: use --format video-swin",
        ),
        (["--format", "vqgan-encoder"], "not a taming-transformers VQGAN checkpoint"),
    ):
        assert convert_main([*argv, *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard-size-mb", "0"], "--shard-size-mb must be > 0, got 0.0"),
        (["--num-shards", "0"], "--num-shards must be a positive integer, got 0"),
        (["--max-samples-per-shard", "-2"], "--max-samples-per-shard must be a positive integer, got -2"),
        (["--gop", "0"], "--gop must be a positive integer, got 0"),
        (["--crf", "60"], r"--crf must be an x264 quality in \[0, 51\], got 60"),
        (["--preset", "quick"], "--preset must be an x264 preset, one of ultrafast, .*; got 'quick'"),
        (["--prefix", "train.v1"], "--prefix must be a non-empty file name prefix without '/' or '.'"),
        (["--short-side", "-1"], "--short-side must be >= 0, got -1"),
        (["--log-level", "loud"], "--log-level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        (["--labels", "missing_labels.txt"], "--labels: file not found: missing_labels.txt"),
        (["--kind", "audio"], "argument --kind: invalid choice: 'audio'"),
        (["--label-column", "category"], "--label-column applies to a CSV --input"),
    ],
)
def test_make_shards_cli_rejects_bad_flags(tmp_path: Path, capsys, flags, message):
    (tmp_path / "root" / "cls").mkdir(parents=True)
    argv = ["--root", str(tmp_path / "root"), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        make_shards_main([*argv, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_make_shards_cli_data_errors_are_one_line(tmp_path: Path, shared_data: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_shards_main(["--root", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--root must be an existing folder" in capsys.readouterr().err
    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    for i, path in enumerate(sorted((shared_data / "images").glob("*.jpg"))[:2]):
        (images / f"{i}.jpg").write_bytes(path.read_bytes())
    code = make_shards_main(
        ["--root", str(tmp_path / "images"), "--output-dir", str(tmp_path / "o"), "--num-shards", "5"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "num_shards=5" in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------------- run_pretraining.py
# User errors of the pretraining script must end in one `error:` line (SystemExit / exit status 1), not a traceback.


@pytest.fixture(scope="module")
def pretraining_script():
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "run_pretraining.py"
    spec = importlib.util.spec_from_file_location("run_pretraining", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_pretraining_rejects_unknown_config_overrides(pretraining_script, tmp_path: Path):
    """A typo in --config_overrides must not be ignored silently (it was: `embeddim=96` trained embed_dim 16); it
    fails with the arguments, before any data is read."""
    with pytest.raises(SystemExit, match="--config_overrides.*embeddim") as err:
        pretraining_script.parse_args(["--config_overrides", "embeddim=96", "--output_dir", str(tmp_path)])
    assert "embed_dim" in str(err.value)  # the field it probably means


def _small_run(tmp_path: Path) -> list[str]:
    """Flags for a tiny non-demo run whose shards hold nothing decodable (the run fails as soon as it reads data)."""
    write_shards([(f"v{i}", "mp4", b"not a video", {"label": 0}) for i in range(4)], tmp_path / "videos")
    write_shards([(f"i{i}", "jpg", b"not an image", {"label": 0}) for i in range(4)], tmp_path / "images")
    argv = ["--video_shards", str(tmp_path / "videos"), "--image_shards", str(tmp_path / "images")]
    argv += ["--model_preset", "test", "--image_size", "64", "--num_frames", "8", "--frame_interval", "2"]
    argv += ["--scale_range", "64", "80", "--tokenizer_size", "32", "--min_mask_patches", "2"]
    argv += ["--random_tokenizer"]  # token targets (the recipe's) need a tokenizer
    argv += [
        "--video_batch_size",
        "2",
        "--image_batch_size",
        "2",
        "--num_workers",
        "0",
        "--shuffle_buffer",
        "0",
    ]
    return [*argv, "--max_train_steps", "2", "--output_dir", str(tmp_path / "out")]


@pytest.mark.parametrize(
    "flag", ["--model_name_or_path", "--tokenizer_name_or_path", "--resume_from_checkpoint"]
)
def test_pretraining_missing_folders_are_clear_errors(pretraining_script, tmp_path: Path, flag: str):
    """A missing local folder is named as such: not a Hub repo-id error or a FileNotFoundError with a traceback."""
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(SystemExit, match=f"{flag}.*{re.escape(missing)}"):
        if flag == "--resume_from_checkpoint":
            pretraining_script.main([*_small_run(tmp_path), flag, missing])
        else:
            args = pretraining_script.parse_args([flag, missing, "--output_dir", str(tmp_path / "out")])
            if flag == "--model_name_or_path":
                pretraining_script.build_model(args, None)
            else:
                pretraining_script.load_tokenizer(args)


def test_pretraining_stops_cleanly_on_unusable_data(pretraining_script, tmp_path: Path):
    """Shards where nothing decodes: exit status 1 with the DataQualityError message, like a non-finite loss stop."""
    assert pretraining_script.main(_small_run(tmp_path)) == 1


def test_finetuning_stops_cleanly_on_unusable_data(tmp_path: Path):
    """run_finetuning.py: training shards where nothing decodes end with exit status 1, not a traceback."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "run_finetuning.py"
    spec = importlib.util.spec_from_file_location("run_finetuning", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    samples = [(f"v{i}", "mp4", b"not a video", {"label": i % 2}) for i in range(4)]
    write_shards(samples, tmp_path / "train", labels=["a", "b"])
    argv = ["--train_shards", str(tmp_path / "train"), "--model_preset", "test", "--image_size", "64"]
    argv += [
        "--num_frames",
        "8",
        "--frame_interval",
        "2",
        "--window_size",
        "4",
        "2",
        "2",
        "--short_side",
        "64",
    ]
    argv += ["--eval_short_side", "64", "--per_device_train_batch_size", "2", "--max_train_steps", "2"]
    argv += ["--num_workers", "0", "--shuffle_buffer", "0", "--output_dir", str(tmp_path / "out")]
    assert script.main(argv) == 1
