"""Fine-tuning: layer-wise lr decay, EMA, loading pretrained folders (window resize), multi-view evaluation, the
temporal demo data, CLI validation, and end-to-end runs of run_finetuning.py (a few-step fine-tune from a
pretraining folder with multi-view evaluation and a Hub-ready export, evaluation-only mode, exact resume, and
2-process gloo DDP on CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import free_port, load_script  # noqa: E402
from safetensors.torch import load_file
from torch import nn

from bevt import BEVTConfig, BEVTForMaskedVideoModeling, BEVTForVideoClassification, BEVTVideoProcessor
from bevt.conversion_swin import resize_relative_position_bias
from bevt.data.demo_finetuning import DEMO_LABEL_NAMES, demo_samples, make_demo_clip
from bevt.finetuning import load_model_for_finetuning
from bevt.training import ModelEMA, build_param_groups, layer_decay_lr_scale, layer_unit
from bevt.training.evaluation import (
    MultiViewEvalTransform,
    Predictions,
    confusion_matrix,
    evaluation_report,
    predict_multiview,
    save_confusion_matrix_png,
)
from bevt.video_decoding import decode_video

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_finetuning.py"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def script():
    return load_script("run_finetuning.py")


@pytest.fixture(scope="module")
def demo_data(finetuning_demo_data) -> Path:
    """Small demo shards: 48 training and 12 validation clips, 2 shards each (tests/conftest.py)."""
    return finetuning_demo_data


@pytest.fixture(scope="module")
def pretrained(tiny_pretrained_folder) -> Path:
    """A tiny pretraining folder (BEVTForMaskedVideoModeling, window 4x2x2), as run_pretraining.py writes it."""
    return tiny_pretrained_folder


# ----------------------------------------------------------------------------------------------- layer decay


def test_layer_decay_reproduces_the_official_k400_table():
    """Swin-B (2-2-18-2): the powers of 0.9 listed in swin_base_patch244_window877_bevt_finetune_k400.py."""
    depths = BEVTConfig.from_preset("base").depths
    scale = layer_decay_lr_scale(depths, layer_decay=0.9)
    official = {
        "bevt.layernorm.weight": 1,  # backbone.norm
        "bevt.encoder.layers.3.blocks.1.mlp.fc1.weight": 1,
        "bevt.encoder.layers.3.blocks.0.attention.qkv.weight": 2,
        "bevt.encoder.layers.2.downsample.reduction.weight": 3,
        "bevt.encoder.layers.2.blocks.17.layernorm_before.bias": 4,
        "bevt.encoder.layers.2.blocks.0.attention.relative_position_bias_table": 21,
        "bevt.encoder.layers.1.downsample.norm.weight": 22,
        "bevt.encoder.layers.1.blocks.0.attention.proj.weight": 24,
        "bevt.encoder.layers.0.downsample.reduction.weight": 25,
        "bevt.encoder.layers.0.blocks.0.mlp.fc2.bias": 27,
        "bevt.embeddings.patch_embeddings.projection.weight": 28,  # backbone.patch_embed
        "bevt.embeddings.patch_embeddings.norm.weight": 28,
    }
    for name, power in official.items():
        assert scale(name) == pytest.approx(0.9**power), name
    assert scale("classifier.weight") == 1.0
    # the SSv2 recipe: no layer decay, every backbone parameter at 0.1x
    ssv2 = layer_decay_lr_scale(depths, layer_decay=1.0, backbone_lr_multiplier=0.1)
    assert ssv2("bevt.embeddings.patch_embeddings.projection.weight") == pytest.approx(0.1)
    assert ssv2("bevt.layernorm.bias") == pytest.approx(0.1) and ssv2("classifier.bias") == 1.0
    with pytest.raises(ValueError, match="no layer-wise lr decay rule"):
        layer_unit("bevt.something_new.weight", depths)
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_lr_scale(depths, layer_decay=1.5)


def test_param_groups_combine_layer_scales_with_no_decay_on_norms_biases_and_bias_tables():
    model = BEVTForVideoClassification(BEVTConfig.from_preset("test", num_labels=4))
    scale = layer_decay_lr_scale(model.config.depths, 0.5, backbone_lr_multiplier=0.5)
    groups = build_param_groups(model, 0.05, lr_scale=scale, learning_rate=1e-3)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert len(by_name) == sum(1 for _ in model.parameters())
    top = sum(model.config.depths) + len(model.config.depths)  # L + 1 = 9 for 1-1-2-1
    for name, group in by_name.items():
        no_decay = name.endswith(".bias") or "norm" in name or "relative_position_bias_table" in name
        no_decay |= name.endswith("mask_token")
        assert (group["weight_decay"] == 0.0) == no_decay, name
        assert group["lr"] == pytest.approx(1e-3 * scale(name)), name
    assert by_name["classifier.weight"]["lr"] == pytest.approx(1e-3)
    assert by_name["bevt.embeddings.patch_embeddings.projection.weight"]["lr"] == pytest.approx(
        1e-3 * 0.5 * 0.5**top
    )


# ----------------------------------------------------------------------------------------------- EMA


def test_ema_follows_the_formula_and_round_trips():
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    decay = ema.current_decay
    assert decay == pytest.approx(min(0.9, 2 / 11))  # warm-up: (1 + n) / (10 + n) for the first update
    ema.update(model)
    expected = decay * start["weight"] + (1 - decay) * model.weight
    torch.testing.assert_close(ema.module.weight, expected)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    copy = ModelEMA(nn.Linear(3, 2), decay=0.5)
    copy.load_state_dict(ema.state_dict())
    assert copy.decay == 0.9 and copy.num_updates == 1
    torch.testing.assert_close(copy.module.weight, ema.module.weight)
    with pytest.raises(ValueError, match="EMA decay"):
        ModelEMA(model, decay=1.0)


# ----------------------------------------------------------------------------------------------- loading


def test_fine_tuning_from_a_pretraining_folder_resizes_the_window_like_the_official_code(pretrained):
    source = BEVTForMaskedVideoModeling.from_pretrained(pretrained)
    model, report = load_model_for_finetuning(
        pretrained, ["a", "b", "c"], window_size=(8, 2, 2), drop_path_rate=0.2
    )
    assert report.window_resized == ((4, 2, 2), (8, 2, 2)) and report.classifier == "new"
    assert model.config.window_size == (8, 2, 2) and model.config.drop_path_rate == 0.2
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and model.config.problem_type is None
    key = "encoder.layers.2.blocks.1.attention.relative_position_bias_table"
    expected = resize_relative_position_bias(source.bevt.state_dict()[key], (4, 2, 2), (8, 2, 2))
    torch.testing.assert_close(model.bevt.state_dict()[key], expected)
    torch.testing.assert_close(model.bevt.layernorm.weight, source.bevt.layernorm.weight)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(report.frozen) and any("image_projection" in n for n in frozen)
    assert "bevt.embeddings.mask_token" in frozen


def test_classifier_is_kept_only_for_the_same_labels(tmp_path, pretrained):
    model, _ = load_model_for_finetuning(pretrained, ["a", "b"])
    model.save_pretrained(tmp_path / "cls")
    same, report = load_model_for_finetuning(tmp_path / "cls", ["a", "b"])
    assert report.classifier == "loaded"
    torch.testing.assert_close(same.classifier.weight, model.classifier.weight)
    _, other = load_model_for_finetuning(tmp_path / "cls", ["a", "x"])
    assert other.classifier == "new"
    with pytest.raises(ValueError, match="cannot change \\['embed_dim'\\]"):
        load_model_for_finetuning(pretrained, ["a", "b"], embed_dim=32)
    with pytest.raises(ValueError, match="unique"):
        load_model_for_finetuning(pretrained, ["a", "a"])


def test_every_encoder_tensor_of_a_pretraining_folder_is_loaded_none_reinitialised(tmp_path):
    """All backbone weights and buffers come from the folder (Transformers' loading report is silenced there, so a
    renamed key would otherwise be re-initialised without a word); the final norm is the pretraining heads' norm, as
    the official fine-tuning reuses it; the image-stream patch embedding and the mask token are loaded and frozen;
    only the classifier is new (zero bias, truncated normal of std `initializer_range`)."""
    torch.manual_seed(0)
    source = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test"))
    with torch.no_grad():
        for param in source.parameters():  # away from every initial value (zeros, ones, small normals)
            param.add_(torch.rand_like(param) + 1.0)
    source.save_pretrained(tmp_path)
    model, report = load_model_for_finetuning(tmp_path, ["a", "b", "c"])
    expected, loaded = source.bevt.state_dict(), model.bevt.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    classifier = {"classifier.weight", "classifier.bias"}
    assert set(model.state_dict()) == {f"bevt.{k}" for k in expected} | classifier
    assert torch.equal(model.bevt.layernorm.weight, source.bevt.layernorm.weight)  # the heads' `norm`
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    image_stream = {
        f"bevt.embeddings.patch_embeddings.image_{m}.{p}"
        for m in ("projection", "norm")
        for p in ("weight", "bias")
    }
    assert frozen == set(report.frozen) == {"bevt.embeddings.mask_token", *image_stream}
    assert report.classifier == "new" and torch.all(model.classifier.bias == 0)
    std = float(model.classifier.weight.detach().std())
    assert 0.7 * model.config.initializer_range < std < 1.3 * model.config.initializer_range


# ----------------------------------------------------------------------------------------------- evaluation


class _MeanColourClassifier(nn.Module):
    """Logits = a fixed linear map of the mean colour of the clip (easy to compute by hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, pixel_values: torch.Tensor):
        return type("Output", (), {"logits": self.linear(pixel_values.mean(dim=(1, 3, 4)))})()


def test_multiview_transform_orders_views_clip_by_clip():
    processor = BEVTVideoProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transform = MultiViewEvalTransform(processor, num_crops=3)
    clips = torch.zeros(2, 4, 32, 48, 3, dtype=torch.uint8)
    clips[0, ..., :16, 0] = 255  # clip 0: left third red -> only its left crop is red
    clips[1, ..., 32:, 1] = 255  # clip 1: right third green -> only its right crop is green
    views = transform(clips)["pixel_values"]
    assert views.shape == (6, 4, 3, 32, 32)
    red = views[:, :, 0].mean(dim=(1, 2, 3))
    green = views[:, :, 1].mean(dim=(1, 2, 3))
    assert red[0] > red[1] > red[2] and red[0] > red[3:].max()
    assert green[5] > green[4] > green[3] and green[5] > green[:3].max()
    assert transform(clips[0])["pixel_values"].shape == (3, 4, 3, 32, 32)


def test_predict_multiview_averages_softmax_scores_over_views():
    torch.manual_seed(0)
    model = _MeanColourClassifier()
    views = torch.randn(3, 6, 2, 3, 8, 8)  # 3 videos x 6 views
    batch = {"pixel_values": views, "labels": torch.tensor([0, 1, 2]), "__key__": ["c", "a", "b"]}
    predictions = predict_multiview(model, [batch], "cpu", max_views_per_forward=4)
    with torch.no_grad():
        per_view = model(views.flatten(0, 1)).logits.softmax(-1).view(3, 6, 4)
    np.testing.assert_allclose(predictions.scores, per_view.mean(1).numpy(), rtol=1e-6)
    assert predictions.keys == ["c", "a", "b"] and predictions.labels.tolist() == [0, 1, 2]
    assert model.training  # restored
    merged = Predictions.concatenate([predictions, predictions], num_labels=4)  # a repeated rank's share
    assert merged.keys == ["a", "b", "c"] and merged.labels.tolist() == [1, 2, 0]


def test_confusion_matrix_report_and_png(tmp_path):
    labels = np.array([0, 0, 1, 2, 2, 2])
    scores = np.eye(3)[[0, 1, 1, 2, 0, 2]]
    matrix = confusion_matrix(labels, scores.argmax(1), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    report = evaluation_report(
        Predictions([str(i) for i in range(6)], scores, labels),
        {"top1_accuracy": 4 / 6},
        ["a", "b", "c", "d"],
    )
    assert report["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": pytest.approx(2 / 3), "d": None}
    assert report["num_videos"] == 6 and report["confusion_matrix"][3] == [0, 0, 0, 0]
    from PIL import Image

    path = save_confusion_matrix_png(report["confusion_matrix"], ["a", "b", "c", "d"], tmp_path / "cm.png")
    image = Image.open(path)
    assert image.format == "PNG" and image.width >= 4 * 48
    big = save_confusion_matrix_png(
        np.ones((400, 400), int), [str(i) for i in range(400)], tmp_path / "big.png"
    )
    assert Image.open(big).height >= 400
    with pytest.raises(ValueError, match="class ids"):
        confusion_matrix(np.array([3]), np.array([0]), 3)


# ----------------------------------------------------------------------------------------------- demo data


def _object_mask(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) bool: pixels of the moving object (they change over time and are brighter than the background)."""
    grey = frames.astype(np.float32).mean(-1)
    changing = grey.std(axis=0) > 25
    return changing[None] & (grey > np.median(grey, axis=(1, 2), keepdims=True) + 40)


def _centroid_x(frames: np.ndarray) -> np.ndarray:
    mask = _object_mask(frames)
    xs = np.arange(frames.shape[2])[None, None, :]
    return (mask * xs).sum(axis=(1, 2)) / np.maximum(mask.sum(axis=(1, 2)), 1)


def test_demo_clips_are_encoded_near_lossless_in_every_frame():
    """The demo encoder's fixed quantizer reaches the encoder: with the option ignored, rate control left the
    last frames of a clip at ~24 dB PSNR (blocky, motion blurred away)."""
    from bevt.data.demo_finetuning import encode_mp4

    clip = make_demo_clip(0, np.random.default_rng(1), size=32, num_frames=24)
    decoded = np.asarray(decode_video(encode_mp4(clip)), dtype=np.float64)
    mse = ((decoded - clip.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    frame_psnr = 10 * np.log10(255.0**2 / mse)
    assert frame_psnr.min() > 30.0, np.round(frame_psnr, 1)


def test_demo_classes_need_the_order_of_frames_and_data_is_deterministic():
    rng = np.random.default_rng(0)
    right, left = make_demo_clip(0, rng), make_demo_clip(1, rng)
    assert right.shape == (16, 32, 32, 3) and right.dtype == np.uint8
    assert _centroid_x(right)[-1] > _centroid_x(right)[0] + 5  # moves right
    assert _centroid_x(left)[-1] < _centroid_x(left)[0] - 5  # moves left
    grow, shrink = make_demo_clip(4, rng), make_demo_clip(5, rng)
    assert _object_mask(grow)[-1].sum() > 2 * _object_mask(grow)[0].sum()
    assert _object_mask(shrink)[0].sum() > 2 * _object_mask(shrink)[-1].sum()
    first = list(demo_samples(6, seed=3, split="train"))
    again = list(demo_samples(6, seed=3, split="train"))
    assert [s[2] for s in first] == [s[2] for s in again]
    assert [s[3]["label"] for s in first] == list(range(6))
    assert decode_video(first[0][2]).shape == (16, 32, 32, 3)


# ----------------------------------------------------------------------------------------------- CLI


def test_recipe_defaults(script):
    k400 = script.parse_args(["--train_shards", "x.tar"])
    assert not k400.demo and (k400.num_frames, k400.frame_interval, k400.sampling) == (32, 2, "dense")
    assert (k400.window_size, k400.layer_decay, k400.learning_rate, k400.weight_decay) == (
        (8, 7, 7),
        0.9,
        3e-4,
        1e-3,
    )
    assert (k400.eval_num_clips, k400.eval_num_crops, k400.eval_short_side, k400.flip_prob) == (
        4,
        3,
        224,
        0.5,
    )
    ssv2 = script.parse_args(["--recipe", "ssv2", "--train_shards", "x.tar"])
    assert (ssv2.sampling, ssv2.window_size, ssv2.flip_prob, ssv2.randaug) == (
        "uniform",
        (16, 7, 7),
        0.0,
        (4, 7),
    )
    assert (ssv2.random_erasing, ssv2.label_smoothing, ssv2.ema_decay, ssv2.backbone_lr_multiplier) == (
        0.25,
        0.1,
        0.9998,
        0.1,
    )
    assert (ssv2.gradient_accumulation_steps, ssv2.drop_path_rate, ssv2.eval_num_clips) == (8, 0.4, 1)
    overridden = script.parse_args(["--recipe", "ssv2", "--train_shards", "x.tar", "--randaug", "none"])
    assert overridden.randaug is None
    demo = script.parse_args([])
    assert demo.demo and demo.flip_prob == 0.0 and demo.model_preset == "test"
    assert script.parse_args(["--eval_num_crops", "1", "--train_shards", "x"]).eval_short_side == 256


def test_help_documents_recipe_defaults(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--layer_decay", "--backbone_lr_multiplier", "--ema_decay", "--eval_num_clips", "--randaug"):
        assert flag in text
    assert "k400 0.9, ssv2 1.0; demo: 1.0" in " ".join(text.split())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layer_decay", "0"], "--layer_decay must be in (0, 1]"),
        (["--ema_decay", "1"], "--ema_decay must be in [0, 1)"),
        (["--randaug", "4"], "--randaug must be two integers"),
        (["--crop_scale", "0.5", "0.2"], "--crop_scale must be LOW HIGH"),
        (["--do_eval_only"], "--model_name_or_path must be given with --do_eval_only"),
        (["--label_names", "/nonexistent.txt"], "--label_names must be an existing text file"),
        (["--validation_shards", "v.tar"], "--validation_shards must be given together with --train_shards"),
    ],
)
def test_bad_flags_name_the_flag(script, argv, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        script.parse_args(argv)


# ----------------------------------------------------------------------------------------------- end to end


def _run(
    args: list[str], output_dir: Path | None = None, launcher: list[str] | None = None, env=None, timeout=300
):
    command = [*(launcher or [sys.executable]), str(SCRIPT), *args]
    if output_dir is not None:
        command += ["--output_dir", str(output_dir)]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run(command, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _data_args(demo_data: Path) -> list[str]:
    return [
        "--train_shards",
        str(demo_data / "train"),
        "--validation_shards",
        str(demo_data / "validation"),
        "--label_names",
        str(demo_data / "train" / "labels.txt"),
    ]


TINY = [
    "--model_preset", "test", "--window_size", "4", "2", "2", "--gradient_accumulation_steps", "1", "--image_size", "32", "--short_side", "36", "--crop_scale", "0.6", "1.0", "--num_frames", "8", "--sampling",
    "uniform", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--num_workers", "0",
    "--learning_rate", "1e-3", "--warmup_epochs", "0", "--logging_steps", "2", "--dataset_name",
    "bevt-synthetic-temporal",
]  # fmt: skip


@pytest.mark.slow
def test_few_step_finetune_from_pretraining_with_multiview_eval_and_hub_ready_export(
    tmp_path, demo_data, pretrained
):
    out = tmp_path / "run"
    args = [
        *_data_args(demo_data),
        *TINY,
        "--model_name_or_path", str(pretrained), "--window_size", "8", "2", "2",
        "--max_train_steps", "6", "--eval_steps", "3", "--eval_num_clips", "2", "--eval_num_crops", "3",
        "--ema_decay", "0.9", "--label_smoothing", "0.1", "--mixup", "0.8", "--cutmix", "1.0",
        "--layer_decay", "0.75", "--checkpointing_steps", "3",
    ]  # fmt: skip
    result = _run(args, out)
    log = result.stderr
    assert "relative position bias resized 4x2x2 -> 8x2x2" in log
    assert log.count("evaluated 12 videos x 6 views") == 2, log[-3000:]
    assert "validation accuracy:" in result.stdout

    # Hub-ready folder: config + labels, safetensors, processor, remote code, eval results, confusion matrix, card
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(DEMO_LABEL_NAMES)}
    assert config["window_size"] == [8, 2, 2] and config["num_frames"] == 8 and config["image_size"] == 32
    assert config["auto_map"]["AutoModelForVideoClassification"] == "modeling_bevt.BEVTForVideoClassification"
    for name in (
        "model.safetensors",
        "video_preprocessor_config.json",
        "modeling_bevt.py",
        "confusion_matrix.png",
    ):
        assert (out / name).is_file(), name
    processor = json.loads((out / "video_preprocessor_config.json").read_text())
    assert (processor["num_frames"], processor["sampling_mode"], processor["crop_size"]["height"]) == (
        8,
        "uniform",
        32,
    )
    report = json.loads((out / "eval_results.json").read_text())
    assert (
        report["num_videos"] == 12 and (report["num_clips"], report["num_crops"]) == (2, 3) and report["ema"]
    )
    history = json.loads((out / "eval_history.json").read_text())
    assert [h["step"] for h in history] == [3, 6]
    best = max(history, key=lambda h: h["top1_accuracy"])  # first best wins ties
    assert report["step"] == best["step"] and report["metrics"]["top1_accuracy"] == best["top1_accuracy"]
    assert sum(map(sum, report["confusion_matrix"])) == 12
    # what was fitted beside what was exported: the training loss / accuracy of the first step and the last window
    results = json.loads((out / "training_results.json").read_text())
    assert results["steps"] == 6 and results["mode"] == "full" and results["exported_model"] == "best"
    assert results["exported_step"] == best["step"] and results["validation"] == report["metrics"]
    assert set(results["first"]) == set(results["final_window"]) == {"loss", "accuracy"}
    assert 0.0 <= results["final_window"]["accuracy"] <= 1.0 and results["first"]["loss"] > 0

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["pipeline_tag"] == "video-classification" and meta["library_name"] == "transformers"
    assert meta["datasets"] == ["bevt-synthetic-temporal"]
    metrics = {m["type"]: m for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["accuracy"]["value"] == pytest.approx(report["metrics"]["top1_accuracy"], abs=1e-6)
    assert metrics["accuracy"]["args"] == {"num_clips": 2, "num_crops": 3}
    assert "FLOPs per view" in card and "8 frames of 32x32" in card

    # The exported weights are the EMA weights of the best step: evaluation-only mode reproduces its numbers.
    checkpoint = out / f"checkpoint-{best['step']}"
    assert (checkpoint / "custom_checkpoint_1.pkl").is_file()  # the EMA state
    eval_out = tmp_path / "eval"
    evaluated = _run(
        ["--do_eval_only", "--model_name_or_path", str(out), "--validation_shards", str(demo_data / "validation"),
         "--eval_num_clips", "2", "--eval_num_crops", "3", "--num_workers", "0"],
        eval_out,
    )  # fmt: skip
    again = json.loads((eval_out / "eval_results.json").read_text())
    assert again["metrics"] == pytest.approx(report["metrics"])
    assert again["confusion_matrix"] == report["confusion_matrix"]
    assert (eval_out / "confusion_matrix.png").is_file() and "Evaluation of" in evaluated.stdout

    # And the pipeline uses the exported processor on a real (synthetic) video file.
    from transformers import pipeline

    video = tmp_path / "clip.mp4"
    video.write_bytes(next(demo_samples(1, seed=9, split="x"))[2])
    predictions = pipeline("video-classification", model=str(out))(str(video), top_k=3)
    assert len(predictions) == 3 and all(p["label"] in DEMO_LABEL_NAMES for p in predictions)


@pytest.mark.slow
def test_resume_from_a_checkpoint_gives_identical_weights_and_ema(tmp_path, demo_data):
    args = [
        *_data_args(demo_data),
        *TINY,
        "--max_train_steps", "6", "--checkpointing_steps", "3", "--eval_steps", "100", "--final_model", "last",
        "--ema_decay", "0.9", "--label_smoothing", "0.1", "--mixup", "0.8", "--drop_path_rate", "0.1",
        "--gradient_accumulation_steps", "2",
    ]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(args, straight)
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    second = _run([*args, "--resume_from_checkpoint", "latest"], resumed)
    assert "at step 3" in second.stderr
    for name in ("model.safetensors",):  # the exported (EMA) weights
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    raw_a = load_file(straight / "checkpoint-6" / "model.safetensors")
    raw_b = load_file(resumed / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)  # the raw training weights too
    report_a = json.loads((straight / "eval_results.json").read_text())
    report_b = json.loads((resumed / "eval_results.json").read_text())
    assert report_a["metrics"] == report_b["metrics"] and report_a["step"] == 6


@pytest.mark.slow
def test_two_cpu_ranks_evaluate_every_video_once(tmp_path, demo_data):
    launcher = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    args = [
        *_data_args(demo_data),
        *TINY,
        "--max_train_steps", "2", "--eval_steps", "2", "--eval_num_clips", "2", "--eval_num_crops", "1",
    ]  # fmt: skip
    result = _run(args, tmp_path / "run", launcher=launcher, env={"ACCELERATE_USE_CPU": "1"}, timeout=420)
    assert "(2 processes x 4 x 1 accumulation)" in (tmp_path / "run" / "README.md").read_text()
    assert "evaluated 12 videos x 2 views" in result.stderr
    report = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert report["num_videos"] == 12 and sum(map(sum, report["confusion_matrix"])) == 12
    assert math.isclose(
        sum(report["per_class_accuracy"][n] * 2 for n in DEMO_LABEL_NAMES) / 12,
        report["metrics"]["top1_accuracy"],
    )
