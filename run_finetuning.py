#!/usr/bin/env python
"""Fine-tune BEVT for video classification with 🤗 Accelerate, evaluate it with multi-view testing, export it.

    accelerate launch run_finetuning.py                       # built-in demo: tiny model, synthetic shards
    accelerate launch run_finetuning.py --recipe k400 --model_name_or_path bevt-pretrained \\
        --train_shards "k400/train/*.tar" --validation_shards k400/val --label_names k400/labels.txt
    accelerate launch run_finetuning.py --recipe ssv2 --model_name_or_path bevt-pretrained \\
        --train_shards ssv2/train --validation_shards ssv2/val --label_names ssv2/labels.txt
    accelerate launch run_finetuning.py --do_eval_only --model_name_or_path bevt-finetuned-k400 \\
        --validation_shards k400/val --output_dir k400-eval

Start from a BEVT folder (`run_pretraining.py` output, a checkpoint converted with `python -m bevt.convert`, an
earlier fine-tuning run) or from scratch (`--model_preset`). A folder's model keeps its window, frames per clip,
image size and drop path unless a flag changes them (the recipes change only what the official recipe changes in
the official pretraining: 16 -> 32 frames; ssv2 also 8x7x7 -> 16x7x7 and drop path 0.3 -> 0.4). `--recipe` sets
the official defaults of a dataset (every flag still overrides); the window column applies from scratch:

| recipe | clips | window | schedule | augmentation | test views |
|---|---|---|---|---|---|
| k400 | 32 frames, stride 2 | 8x7x7 | AdamW 3e-4, wd 0.001, layer decay 0.9, 60 epochs | crop + flip | 4 clips x 3 crops |
| ssv2 | 32 frames, uniform | 16x7x7 | AdamW 5e-4, wd 0.05, backbone lr x0.1, EMA, 60 epochs | crop, RandAugment n4 m7, random erasing 0.25, label smoothing 0.1, no flip | 1 clip x 3 crops |

The output folder is Hub-ready: config with `id2label`, safetensors weights (EMA weights when `--ema_decay` is set),
a `BEVTVideoProcessor`, the modeling code + `auto_map` (loads with `trust_remote_code=True`), `eval_results.json`,
`confusion_matrix.png` and a model card `README.md` with the results in `model-index`. It holds the best evaluated
weights (`--final_model best`, default) or the last ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from transformers import get_scheduler

import bevt
from bevt import BEVTConfig, BEVTForVideoClassification
from bevt.data.sampling import SAMPLING_MODES
from bevt.data.shards import load_dataset_info, read_labels
from bevt.data.streaming import DataQualityError, StreamDataLoader, build_stream
from bevt.data.transforms import (
    VideoClassificationTrainTransform,
    mixup_cutmix,
    seeded_generator,
)
from bevt.finetuning import (
    ARCHITECTURE_FIELDS,
    ModelEMA,
    MultiViewEvalTransform,
    Predictions,
    RecipeChange,
    compute_metrics,
    evaluation_report,
    freeze_unused_video_parameters,
    gather_predictions,
    is_better,
    layer_decay_lr_scale,
    load_model_for_finetuning,
    predict_multiview,
    resolve_architecture,
    save_confusion_matrix_png,
    skipped_recipe_changes,
    write_json,
)
from bevt.metrics import load_video_accuracy
from bevt.modelcard import EvalDataset, build_model_card, count_flops_per_view
from bevt.processing_bevt import BEVTVideoProcessor
from bevt.script_utils import (
    HUB_IGNORE_PATTERNS,
    HelpFormatter,
    WindowMeters,
    add_adam_args,
    add_checkpoint_args,
    add_compute_args,
    add_hub_args,
    add_run_control_args,
    add_tracking_args,
    clip_and_step,
    compile_encoder,
    fail,
    init_tracking,
    progress_bar,
    push_to_hub,
    reduce_step_stats,
    require_non_negative,
    require_positive_ints,
    require_unit_interval,
    resume_if_requested,
    start_run,
    validate_optimizer_args,
    validate_step_count_args,
    write_demo_data_once,
)
from bevt.training import (
    CheckpointManager,
    GracefulExit,
    NonFiniteLossError,
    NonFiniteLossGuard,
    build_param_groups,
    seed_everything,
)

logger = get_logger(__name__)

TRACKER_PROJECT = "bevt_finetuning"  # Accelerate tracker project: logs under <output_dir>/bevt_finetuning
METRICS = ("top1_accuracy", "top5_accuracy", "mean_class_accuracy")

# Official BEVT fine-tuning recipes (configs/recognition/swin/*bevt_finetune*.py) and the built-in demo.
RECIPES: dict[str, dict[str, Any]] = {
    "k400": {
        "model_preset": "base",
        "num_frames": 32,
        "frame_interval": 2,
        "sampling": "dense",
        "image_size": 224,
        "short_side": 256,
        "crop_scale": (0.08, 1.0),
        "window_size": (8, 7, 7),
        "drop_path_rate": 0.3,
        "classifier_dropout": 0.5,
        "flip_prob": 0.5,
        "randaug": None,
        "random_erasing": 0.0,
        "label_smoothing": 0.0,
        "ema_decay": 0.0,
        "learning_rate": 3e-4,
        "weight_decay": 0.001,
        "layer_decay": 0.9,
        "backbone_lr_multiplier": 1.0,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 4,
        "num_train_epochs": 60.0,
        "warmup_epochs": 2.5,
        "max_grad_norm": 40.0,
        "eval_num_clips": 4,
        "eval_num_crops": 3,
        "per_device_eval_batch_size": 1,
        "dataset_name": "kinetics400",
        "output_dir": "bevt-finetuned-k400",
        "checkpointing_steps": 1000,
        "logging_steps": 50,
        "num_workers": 8,
        "shuffle_buffer": 1000,
        "torch_threads": None,
    },
    "ssv2": {
        "model_preset": "base",
        "num_frames": 32,
        "frame_interval": 2,
        "sampling": "uniform",
        "image_size": 224,
        "short_side": 256,
        "crop_scale": (0.08, 1.0),
        "window_size": (16, 7, 7),
        "drop_path_rate": 0.4,
        "classifier_dropout": 0.5,
        "flip_prob": 0.0,
        "randaug": (4, 7),
        "random_erasing": 0.25,
        "label_smoothing": 0.1,
        "ema_decay": 0.9998,
        "learning_rate": 5e-4,
        "weight_decay": 0.05,
        "layer_decay": 1.0,
        "backbone_lr_multiplier": 0.1,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 8,
        "num_train_epochs": 60.0,
        "warmup_epochs": 2.5,
        "max_grad_norm": 0.0,
        "eval_num_clips": 1,
        "eval_num_crops": 3,
        "per_device_eval_batch_size": 1,
        "dataset_name": "something-something-v2",
        "output_dir": "bevt-finetuned-ssv2",
        "checkpointing_steps": 1000,
        "logging_steps": 50,
        "num_workers": 8,
        "shuffle_buffer": 1000,
        "torch_threads": None,
    },
    # No data flags: a tiny model learns the synthetic temporal classes of bevt.data.demo_finetuning on a CPU.
    "demo": {
        "model_preset": "test",
        "num_frames": 8,
        "frame_interval": 2,
        "sampling": "uniform",
        "image_size": 32,
        "short_side": 36,
        "crop_scale": (0.6, 1.0),
        "window_size": (4, 2, 2),
        "drop_path_rate": 0.0,
        "classifier_dropout": 0.0,
        "flip_prob": 0.0,  # a flip turns "left to right" into "right to left"
        "randaug": None,
        "random_erasing": 0.0,
        "label_smoothing": 0.1,
        "ema_decay": 0.0,
        "learning_rate": 1e-3,
        "weight_decay": 0.05,
        "layer_decay": 1.0,
        "backbone_lr_multiplier": 1.0,
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 12.0,
        "warmup_epochs": 1.0,
        "max_grad_norm": 5.0,
        "eval_num_clips": 2,
        "eval_num_crops": 1,
        "per_device_eval_batch_size": 16,
        "dataset_name": "bevt-synthetic-temporal",
        "output_dir": "outputs/bevt-finetuning-demo",
        "checkpointing_steps": 300,
        "logging_steps": 25,
        "num_workers": 1,  # decoding in a worker process while the main process computes
        "shuffle_buffer": 256,
        "torch_threads": 1,  # a tiny model gains nothing from intra-op threads; 2 threads on 2 busy cores thrash
    },
}
# What the official recipes change in the pretrained model they start from (BEVT-B pretraining: 16 frames, window
# 8x7x7, drop path 0.3; configs/recognition/swin/*bevt_finetune*.py). Every other architecture value of a
# pretrained folder is kept unless a flag changes it (see `bevt.finetuning.resolve_architecture`).
RECIPE_PRETRAINED_CHANGES: dict[str, dict[str, RecipeChange]] = {
    "k400": {
        "num_frames": RecipeChange(16, 32, "the official K400 fine-tuning uses 32-frame clips"),
    },
    "ssv2": {
        "num_frames": RecipeChange(16, 32, "the official SSv2 fine-tuning uses 32-frame clips"),
        "window_size": RecipeChange((8, 7, 7), (16, 7, 7), "the official SSv2 fine-tuning uses a 16x7x7 window"),
        "drop_path_rate": RecipeChange(0.3, 0.4, "the official SSv2 fine-tuning uses drop path 0.4"),
    },
    "demo": {},
}
DATASET_DISPLAY_NAMES = {
    "kinetics400": "Kinetics-400",
    "something-something-v2": "Something-Something v2",
    "bevt-synthetic-temporal": "BEVT synthetic temporal demo",
}


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


def _recipe_default(name: str) -> str:
    """ "(default: k400 X, ssv2 Y; demo: Z)" for flags set by the recipe."""

    def show(value: Any) -> str:
        if value is None:
            return "none"
        if isinstance(value, tuple):
            return " ".join(str(v) for v in value)
        return str(value)

    k400, ssv2, demo = (show(RECIPES[r][name]) for r in ("k400", "ssv2", "demo"))
    if k400 == ssv2:
        return f"(default: {k400}; demo: {demo})"
    return f"(default: k400 {k400}, ssv2 {ssv2}; demo: {demo})"


def _parse_randaug(values: list[str] | None) -> tuple[int, int] | None | str:
    if values is None:
        return "unset"
    if values == ["none"]:
        return None
    try:
        n, m = (int(v) for v in values)
    except ValueError:
        raise SystemExit(
            f"error: --randaug must be two integers N M (e.g. 4 7) or 'none', got {values!r}"
        ) from None
    return (n, m)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; recipe-dependent ones show the k400 / ssv2 / demo defaults in their help."""
    p = argparse.ArgumentParser(
        description="Fine-tune BEVT for video classification with Accelerate. Without --train_shards (and "
        "without --do_eval_only), runs the built-in demo on synthetic temporal-reasoning data.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--train_shards", nargs="+", default=None, help="Training video shards: globs, folders or files."
    )
    g.add_argument(
        "--validation_shards",
        nargs="+",
        default=None,
        help="Validation video shards (evaluated every epoch).",
    )
    g.add_argument(
        "--label_names",
        default=None,
        help="Text file of class names, one per line in label-index order (default: labels.txt or "
        "dataset_info.json next to the training shards; for --do_eval_only the model's id2label).",
    )
    g.add_argument(
        "--recipe",
        choices=("k400", "ssv2"),
        default="k400",
        help="Official defaults to start from (see the table in the script docstring).",
    )
    g.add_argument(
        "--num_frames", type=int, default=None, help=f"Frames per clip. With --model_name_or_path: the model's own unless given (the recipes turn the "
        f"official 16-frame pretraining into 32). From scratch: {_recipe_default('num_frames')}"
    )
    g.add_argument(
        "--frame_interval",
        type=int,
        default=None,
        help=f"Stride between frames in dense sampling. {_recipe_default('frame_interval')}",
    )
    g.add_argument(
        "--sampling",
        choices=SAMPLING_MODES,
        default=None,
        help=f"dense: clip_len x interval; uniform: one frame per segment. {_recipe_default('sampling')}",
    )
    g.add_argument(
        "--image_size",
        type=int,
        default=None,
        help=f"Crop size. With --model_name_or_path: the model's own unless given. From scratch: "
        f"{_recipe_default('image_size')}",
    )
    g.add_argument(
        "--short_side",
        type=int,
        default=None,
        help=f"Training short side before the random resized crop. {_recipe_default('short_side')}",
    )
    g.add_argument(
        "--crop_scale",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help=f"Area range of the random resized crop. {_recipe_default('crop_scale')}",
    )
    g.add_argument(
        "--flip_prob",
        type=float,
        default=None,
        help=f"Horizontal flip probability. {_recipe_default('flip_prob')}",
    )
    g.add_argument(
        "--randaug",
        nargs="+",
        default=None,
        metavar="N M",
        help=f"RandAugment ops and magnitude, or 'none'. {_recipe_default('randaug')}",
    )
    g.add_argument(
        "--random_erasing",
        type=float,
        default=None,
        help=f"Random erasing probability. {_recipe_default('random_erasing')}",
    )
    g.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha (0 disables).")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0 disables).")
    g.add_argument(
        "--label_smoothing",
        type=float,
        default=None,
        help=f"Label smoothing of the targets. {_recipe_default('label_smoothing')}",
    )
    g.add_argument(
        "--shuffle_buffer",
        type=int,
        default=None,
        help=f"Samples per shuffle block of the training stream. {_recipe_default('shuffle_buffer')}",
    )
    g.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help=f"Data-loading worker processes per rank (capped at its shards). {_recipe_default('num_workers')}",
    )

    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval_num_clips",
        type=int,
        default=None,
        help=f"Clips per validation video. {_recipe_default('eval_num_clips')}",
    )
    g.add_argument(
        "--eval_num_crops",
        type=int,
        choices=(1, 3),
        default=None,
        help=f"Crops per clip (1 centre, 3 along the long side). {_recipe_default('eval_num_crops')}",
    )
    g.add_argument(
        "--eval_short_side",
        type=int,
        default=None,
        help="Short side before the test crops (default: image_size with 3 crops, image_size * 256/224 with 1).",
    )
    g.add_argument(
        "--per_device_eval_batch_size",
        type=int,
        default=None,
        help=f"Validation videos per forward (each with all its views). {_recipe_default('per_device_eval_batch_size')}",
    )
    g.add_argument(
        "--max_eval_views_per_forward",
        type=int,
        default=None,
        help="Split the views of a batch (memory bound).",
    )
    g.add_argument(
        "--eval_every_epochs",
        type=float,
        default=1.0,
        help="Evaluate every this many epochs (and at the end).",
    )
    g.add_argument(
        "--eval_steps", type=int, default=None, help="Evaluate every N optimizer steps (overrides epochs)."
    )
    g.add_argument(
        "--metric_for_best_model",
        choices=METRICS,
        default="top1_accuracy",
        help="Metric that picks the best model.",
    )
    g.add_argument(
        "--final_model",
        choices=("best", "last"),
        default="best",
        help="Weights exported to --output_dir: the best evaluated ones or the last ones.",
    )
    g.add_argument(
        "--do_eval_only",
        action="store_true",
        help="Evaluate --model_name_or_path on --validation_shards; write eval_results.json and "
        "confusion_matrix.png to --output_dir.",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--model_name_or_path",
        default=None,
        help="Start from a BEVT folder: run_pretraining.py output, a converted checkpoint, a fine-tuned model.",
    )
    g.add_argument(
        "--model_preset",
        choices=sorted(bevt.PRESETS),
        default=None,
        help=f"Architecture when training from scratch. {_recipe_default('model_preset')}",
    )
    g.add_argument(
        "--window_size",
        type=int,
        nargs=3,
        default=None,
        metavar=("D", "H", "W"),
        help="Attention window. With --model_name_or_path: the model's own unless given (ssv2 turns the official "
        "8x7x7 into 16x7x7); a different window resizes its bias tables. From scratch: "
        f"{_recipe_default('window_size')}",
    )
    g.add_argument(
        "--drop_path_rate",
        type=float,
        default=None,
        help="Stochastic depth. With --model_name_or_path: the model's own unless given (ssv2 turns the official "
        f"0.3 into 0.4). From scratch: {_recipe_default('drop_path_rate')}",
    )
    g.add_argument(
        "--classifier_dropout",
        type=float,
        default=None,
        help=f"Dropout before the classifier. {_recipe_default('classifier_dropout')}",
    )
    g.add_argument(
        "--per_device_train_batch_size",
        type=int,
        default=None,
        help=f"Clips per device per micro-step. {_recipe_default('per_device_train_batch_size')}",
    )
    add_compute_args(g)
    g.add_argument(
        "--torch_threads",
        type=int,
        default=None,
        help="Intra-op CPU threads per process (torch.set_num_threads). (default: torch's choice; demo: 1)",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help=f"Peak lr of the classifier (the recipes' values are for 8 GPUs x 8 clips x accumulation). "
        f"{_recipe_default('learning_rate')}",
    )
    g.add_argument(
        "--weight_decay",
        type=float,
        default=None,
        help=f"AdamW weight decay (none on norms, biases, bias tables). {_recipe_default('weight_decay')}",
    )
    g.add_argument(
        "--layer_decay",
        type=float,
        default=None,
        help=f"Layer-wise lr decay per block from the top (1 disables). {_recipe_default('layer_decay')}",
    )
    g.add_argument(
        "--backbone_lr_multiplier",
        type=float,
        default=None,
        help=f"lr of every backbone parameter relative to the classifier. {_recipe_default('backbone_lr_multiplier')}",
    )
    add_adam_args(g, scheduler_help="Schedule after the warmup.")
    g.add_argument(
        "--warmup_epochs", type=float, default=None, help=f"Linear warmup. {_recipe_default('warmup_epochs')}"
    )
    g.add_argument(
        "--num_warmup_steps", type=int, default=None, help="Warmup steps (overrides --warmup_epochs)."
    )
    g.add_argument(
        "--num_train_epochs",
        type=float,
        default=None,
        help=f"Epochs (needs dataset_info.json next to the shards). {_recipe_default('num_train_epochs')}",
    )
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps (overrides epochs).")
    g.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=None,
        help=f"Micro-steps per optimizer step. {_recipe_default('gradient_accumulation_steps')}",
    )
    g.add_argument(
        "--max_grad_norm",
        type=float,
        default=None,
        help=f"Gradient clipping norm (0 disables). {_recipe_default('max_grad_norm')}",
    )
    g.add_argument(
        "--ema_decay",
        type=float,
        default=None,
        help=f"EMA of the weights, evaluated and exported when on (0 disables). {_recipe_default('ema_decay')}",
    )
    add_run_control_args(
        g,
        mixed_precision_help="Overrides the Accelerate config.",
        seed_help="Seed of the init, data order and augmentations.",
    )

    g = p.add_argument_group("checkpoints, logging, Hub")
    add_checkpoint_args(
        g,
        output_dir_help=f"Exported model and checkpoints. {_recipe_default('output_dir')}",
        checkpointing_steps_help="Save a checkpoint every N optimizer steps (0: at the end/on signals only). "
        f"{_recipe_default('checkpointing_steps')}",
        save_total_limit_help="Keep at most this many checkpoints.",
        logging_steps_help=f"Log every N optimizer steps. {_recipe_default('logging_steps')}",
    )
    add_tracking_args(g)
    g.add_argument(
        "--dataset_name",
        default=None,
        help=f"Dataset id shown in the model card (`datasets`, `model-index`). {_recipe_default('dataset_name')}",
    )
    g.add_argument(
        "--base_model",
        default=None,
        help="Hub id of the starting model for the card (default: --model_name_or_path when it is not a local folder).",
    )
    add_hub_args(g, push_help="Upload the exported folder to the Hub.")
    args = p.parse_args(argv)
    args.randaug = _parse_randaug(args.randaug)
    apply_recipe_defaults(args)
    validate_args(args)
    return args


def apply_recipe_defaults(args: argparse.Namespace) -> None:
    """Fill unset flags from the recipe (or the demo); the architecture (window, frames, image size, drop path) of
    a pretrained `--model_name_or_path` is kept unless given as flags. Sets `args.demo` and `args.architecture`."""
    args.demo = args.train_shards is None and not args.do_eval_only
    recipe = "demo" if args.demo else args.recipe
    defaults = RECIPES[recipe]
    flags = {name: getattr(args, name) for name in ARCHITECTURE_FIELDS if getattr(args, name) is not None}
    short_side_given = args.short_side is not None
    for name, value in defaults.items():
        current = getattr(args, name)
        if (current == "unset") if name == "randaug" else (current is None):
            setattr(args, name, value)
    if args.do_eval_only and args.output_dir == defaults["output_dir"]:
        args.output_dir = "bevt-eval"
    args.crop_scale = tuple(args.crop_scale)

    pretrained = pretrained_config(args.model_name_or_path) if args.model_name_or_path else None
    if args.do_eval_only:
        pretrained = None  # evaluation takes the folder's model as it is (clip settings: its video processor)
    args.architecture = resolve_architecture(
        pretrained, flags, defaults, RECIPE_PRETRAINED_CHANGES[recipe], recipe_name=recipe
    )
    args.skipped_recipe_changes = (
        skipped_recipe_changes(pretrained, flags, RECIPE_PRETRAINED_CHANGES[recipe], recipe_name=recipe)
        if pretrained is not None
        else []
    )
    for name, choice in args.architecture.items():
        setattr(args, name, choice.value)
    if not short_side_given and args.image_size != defaults["image_size"]:
        # the recipe's short side is for its crop size: keep the same ratio for the model's own size
        args.short_side = round(defaults["short_side"] * args.image_size / defaults["image_size"])
    if args.eval_short_side is None:
        args.eval_short_side = (
            args.image_size if args.eval_num_crops == 3 else round(args.image_size * 256 / 224)
        )


def pretrained_config(name_or_path: str) -> BEVTConfig:
    """The config of the `--model_name_or_path` folder (its architecture is kept), or a clear error."""
    try:
        config = BEVTConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(f"error: --model_name_or_path {name_or_path}: {err}") from None
    if getattr(config, "model_type", None) != BEVTConfig.model_type:
        raise SystemExit(
            f"error: --model_name_or_path {name_or_path}: not a BEVT model (model_type {config.model_type!r})"
        )
    return config


def validate_args(args: argparse.Namespace) -> None:
    """Check flag values; errors name the flag and what it expects."""
    if args.do_eval_only:
        if not args.model_name_or_path:
            fail("--model_name_or_path", "given with --do_eval_only (the model to evaluate)", None)
        if not args.validation_shards:
            fail("--validation_shards", "given with --do_eval_only", None)
    if args.demo and args.validation_shards:
        fail(
            "--validation_shards",
            "given together with --train_shards (without both, the demo uses its own data)",
            args.validation_shards,
        )
    require_positive_ints(
        args,
        (
            "num_frames",
            "frame_interval",
            "image_size",
            "short_side",
            "eval_num_clips",
            "eval_short_side",
            "per_device_eval_batch_size",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "max_nonfinite_steps",
        ),
    )
    if args.eval_short_side < args.image_size:
        fail("--eval_short_side", f">= --image_size ({args.image_size})", args.eval_short_side)
    low, high = args.crop_scale
    if not 0 < low <= high <= 1:
        fail("--crop_scale", "LOW HIGH with 0 < LOW <= HIGH <= 1", list(args.crop_scale))
    if any(w < 1 for w in args.window_size):
        fail("--window_size", "three positive integers", list(args.window_size))
    require_unit_interval(args, ("flip_prob", "random_erasing"))
    for name in ("drop_path_rate", "classifier_dropout", "label_smoothing"):
        if not 0 <= getattr(args, name) < 1:
            fail(f"--{name}", "in [0, 1)", getattr(args, name))
    if args.randaug is not None and not (args.randaug[0] >= 1 and 0 <= args.randaug[1] <= 30):
        fail("--randaug", "N >= 1 and 0 <= M <= 30 (or 'none')", list(args.randaug))
    require_non_negative(args, ("mixup", "cutmix", "weight_decay", "max_grad_norm"))
    if not 0 < args.layer_decay <= 1:
        fail("--layer_decay", "in (0, 1]", args.layer_decay)
    if not args.backbone_lr_multiplier >= 0:
        fail("--backbone_lr_multiplier", ">= 0", args.backbone_lr_multiplier)
    if not 0 <= args.ema_decay < 1:
        fail("--ema_decay", "in [0, 1) (0 disables)", args.ema_decay)
    validate_optimizer_args(args)
    require_non_negative(args, ("warmup_epochs",))
    validate_step_count_args(args)
    if not args.eval_every_epochs > 0:
        fail("--eval_every_epochs", "> 0", args.eval_every_epochs)
    for name in ("eval_steps", "max_eval_views_per_forward", "save_total_limit", "torch_threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name}", "a positive integer", value)
    require_non_negative(args, ("checkpointing_steps", "shuffle_buffer", "num_workers", "seed"))
    if args.label_names is not None and not os.path.isfile(args.label_names):
        fail("--label_names", "an existing text file (one class name per line)", args.label_names)


# ---------------------------------------------------------------------------------------------------------------
# Labels and model
# ---------------------------------------------------------------------------------------------------------------


def resolve_label_names(args: argparse.Namespace, model_config: BEVTConfig | None = None) -> list[str]:
    """Class names: --label_names, else the model's (eval only), else labels.txt / dataset_info.json of the shards."""
    if args.label_names:
        names = read_labels(args.label_names)
        source = args.label_names
    elif args.do_eval_only and model_config is not None:
        names = [model_config.id2label[i] for i in range(model_config.num_labels)]
        source = f"{args.model_name_or_path} (id2label)"
    else:
        names, source = [], None
        first = (args.train_shards or args.validation_shards or [None])[0]
        folder = Path(first).parent if first and not os.path.isdir(first) else Path(first or ".")
        if (folder / "labels.txt").is_file():
            names, source = read_labels(folder / "labels.txt"), str(folder / "labels.txt")
        else:
            info = load_dataset_info(folder) or {}
            names, source = list(info.get("labels") or []), str(folder / "dataset_info.json")
        if not names:
            fail(
                "--label_names",
                "given: no labels.txt or labels in dataset_info.json next to the shards",
                None,
            )
    if len(names) < 2:
        fail("--label_names", "a file with at least 2 class names", source)
    if len(set(names)) != len(names):
        fail("--label_names", "a file of unique class names", source)
    return names


def _config_updates(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "window_size": args.window_size,
        "num_frames": args.num_frames,
        "image_size": args.image_size,
        "drop_path_rate": args.drop_path_rate,
        "classifier_dropout": args.classifier_dropout,
    }


def build_model(args: argparse.Namespace, label_names: list[str]) -> BEVTForVideoClassification:
    """From --model_name_or_path (any BEVT folder; window resized when it differs) or from scratch."""
    if args.model_name_or_path:
        try:
            model, report = load_model_for_finetuning(
                args.model_name_or_path, label_names, **_config_updates(args)
            )
        except (OSError, ValueError, pickle.UnpicklingError) as err:
            raise SystemExit(f"error: --model_name_or_path {args.model_name_or_path}: {err}") from None
        logger.info(f"Model: {report.describe()}")
        for choice in args.architecture.values():
            if choice.changed:
                log = logger.warning if choice.origin == "flag" else logger.info
                log(f"Architecture change: {choice.describe()}")
        for line in args.skipped_recipe_changes:
            logger.info(line)
    else:
        config = BEVTConfig.from_preset(
            args.model_preset,
            **_config_updates(args),
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
        model = BEVTForVideoClassification(config)
        frozen = freeze_unused_video_parameters(model)
        logger.info(
            f"Model: new {args.model_preset} model from scratch ({len(frozen)} unused image-stream tensors frozen)"
        )
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def build_optimizer(args: argparse.Namespace, model: BEVTForVideoClassification) -> torch.optim.Optimizer:
    """AdamW with layer-wise lr decay and the backbone multiplier; no weight decay on norms, biases, bias tables."""
    scale = layer_decay_lr_scale(model.config.depths, args.layer_decay, args.backbone_lr_multiplier)
    groups = build_param_groups(model, args.weight_decay, lr_scale=scale, learning_rate=args.learning_rate)
    for group in groups:
        group.pop("param_names", None)
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def video_processor(
    args: argparse.Namespace, short_side: int | None = None, num_crops: int = 1
) -> BEVTVideoProcessor:
    """The processor of the exported folder (single view for the pipeline) or of the multi-view evaluation."""
    return BEVTVideoProcessor(
        num_frames=args.num_frames,
        frame_interval=args.frame_interval,
        sampling_mode=args.sampling,
        num_crops=num_crops,
        size={"shortest_edge": short_side or round(args.image_size * 256 / 224)},
        crop_size={"height": args.image_size, "width": args.image_size},
    )


def build_train_loader(args: argparse.Namespace, accelerator: Accelerator) -> StreamDataLoader:
    """This rank's infinite, resumable stream of augmented training clips."""
    transform = VideoClassificationTrainTransform(
        image_size=args.image_size,
        short_side=args.short_side,
        area_range=args.crop_scale,
        flip=args.flip_prob,
        randaug=args.randaug,
        random_erasing=args.random_erasing,
    )
    try:
        stream = build_stream(
            args.train_shards,
            kind="video",
            transform=transform,
            clip_len=args.num_frames,
            frame_interval=args.frame_interval,
            sampling=args.sampling,
            shuffle_buffer=args.shuffle_buffer,
            seed=args.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            repeat=True,
            require_label=True,
        )
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: --train_shards: {err}") from None
    return StreamDataLoader(
        stream, args.per_device_train_batch_size, num_workers=args.num_workers, drop_last=True
    )


class Evaluator:
    """Multi-view evaluation of a model on the validation shards (this rank's part, gathered on every rank)."""

    def __init__(self, args: argparse.Namespace, accelerator: Accelerator, label_names: list[str]) -> None:
        self.args = args
        self.accelerator = accelerator
        self.label_names = label_names
        self.metric = load_video_accuracy()
        transform = MultiViewEvalTransform(
            video_processor(args, args.eval_short_side, args.eval_num_crops), args.eval_num_crops
        )
        try:
            self.stream = build_stream(
                args.validation_shards,
                kind="video",
                transform=transform,
                clip_len=args.num_frames,
                frame_interval=args.frame_interval,
                sampling=args.sampling,
                num_clips=args.eval_num_clips,
                test_mode=True,
                shuffle_buffer=0,
                shuffle_shards=False,
                seed=args.seed,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
                repeat=False,
                require_label=True,
            )
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: --validation_shards: {err}") from None
        self.loader = StreamDataLoader(
            self.stream, args.per_device_eval_batch_size, num_workers=args.num_workers, drop_last=False
        )

    @property
    def num_views(self) -> tuple[int, int]:
        return self.args.eval_num_clips, self.args.eval_num_crops

    def run(self, model: torch.nn.Module) -> tuple[dict[str, float], Predictions]:
        """Metrics and predictions of `model` (unwrapped) on all validation videos. Call on every rank."""
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # evaluating never changes the training's random stream
            local = predict_multiview(
                model,
                self.loader,
                self.accelerator.device,
                max_views_per_forward=self.args.max_eval_views_per_forward,
                autocast=self.accelerator.autocast,
            )
        predictions = gather_predictions(self.accelerator, local, len(self.label_names))
        if len(predictions) and predictions.labels.max() >= len(self.label_names):
            raise SystemExit(
                f"error: --validation_shards hold label {predictions.labels.max()} but there are only "
                f"{len(self.label_names)} class names (--label_names)"
            )
        metrics = compute_metrics(self.metric, predictions, top_k=(1, 5))
        logger.info(
            f"evaluated {len(predictions)} videos x {self.num_views[0] * self.num_views[1]} views in "
            f"{time.perf_counter() - started:.1f}s: "
            + ", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items())
            + f" (skipped samples: {self.loader.stats.num_failed})"
        )
        return metrics, predictions

    def report(self, predictions: Predictions, metrics: dict[str, float], **details: Any) -> dict[str, Any]:
        return evaluation_report(
            predictions,
            metrics,
            self.label_names,
            validation_shards=[str(s) for s in self.args.validation_shards],
            num_clips=self.num_views[0],
            num_crops=self.num_views[1],
            num_frames=self.args.num_frames,
            frame_interval=self.args.frame_interval,
            sampling=self.args.sampling,
            image_size=self.args.image_size,
            eval_short_side=self.args.eval_short_side,
            skipped_samples=self.loader.stats.num_failed,
            **details,
        )


def write_eval_outputs(
    folder: str | Path, report: dict[str, Any], label_names: list[str], title: str
) -> None:
    """eval_results.json + confusion_matrix.png in `folder` (main process)."""
    folder = Path(folder)
    write_json(folder / "eval_results.json", report)
    top1 = report["metrics"].get("top1_accuracy")
    caption = f"{title} - top-1 {100 * top1:.2f}%" if top1 is not None else title
    save_confusion_matrix_png(
        report["confusion_matrix"], label_names, folder / "confusion_matrix.png", caption
    )


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Counters carried across checkpoints (stored in `trainer_state.json`)."""

    step: int = 0
    samples: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    last_eval_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    guard: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    @classmethod
    def from_checkpoint(cls, step: int, extra: dict[str, Any]) -> TrainState:
        return cls(step=step, **{k: v for k, v in extra.items() if k in cls.__dataclass_fields__})


@dataclass
class Schedule:
    """Steps derived from the data size: per epoch, in total, warmup, between evaluations."""

    steps_per_epoch: int | None
    max_train_steps: int
    num_warmup_steps: int
    eval_steps: int | None


def resolve_schedule(args: argparse.Namespace, samples_per_epoch: int | None, num_processes: int) -> Schedule:
    per_step = args.per_device_train_batch_size * num_processes * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(samples_per_epoch / per_step) if samples_per_epoch else None
    if args.max_train_steps is not None:
        max_steps = args.max_train_steps
    elif steps_per_epoch is None:
        fail(
            "--max_train_steps",
            "given when the shards have no dataset_info.json (epochs need the sample count)",
            None,
        )
    else:
        max_steps = max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    if args.num_warmup_steps is not None:
        warmup = args.num_warmup_steps
    elif steps_per_epoch is not None:
        warmup = round(args.warmup_epochs * steps_per_epoch)
    else:
        warmup = 0
    warmup = min(warmup, max_steps - 1) if max_steps > 1 else 0
    if args.eval_steps is not None:
        eval_steps = args.eval_steps
    elif steps_per_epoch is not None:
        eval_steps = max(1, round(args.eval_every_epochs * steps_per_epoch))
    else:
        eval_steps = None  # only at the end
    return Schedule(steps_per_epoch, max_steps, warmup, eval_steps)


def training_targets(
    args: argparse.Namespace,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    num_labels: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): mixup/cutmix + label smoothing give soft targets `(B, num_labels)`, else class ids."""
    if args.mixup == 0 and args.cutmix == 0 and args.label_smoothing == 0:
        return pixel_values, labels
    return mixup_cutmix(
        pixel_values,
        labels,
        num_labels,
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        label_smoothing=args.label_smoothing,
        generator=generator,
    )


class Exporter:
    """Writes the Hub-ready folder: weights + config, video processor, eval results, confusion matrix, model card."""

    def __init__(
        self, args: argparse.Namespace, label_names: list[str], num_views: tuple[int, int] | None
    ) -> None:
        self.args = args
        self.label_names = label_names
        self.num_views = num_views
        self._flops: int | None = None
        self.last_report: dict[str, Any] | None = None  # of the latest evaluation (main process)

    def flops(self, model: torch.nn.Module) -> int | None:
        if self._flops is None:
            try:
                self._flops = count_flops_per_view(model)
            except Exception as err:  # noqa: BLE001 - the card can do without it
                logger.warning(f"could not count FLOPs per view: {err}")
        return self._flops

    def base_model(self) -> str | None:
        if self.args.base_model:
            return self.args.base_model
        path = self.args.model_name_or_path
        return path if path and not os.path.exists(path) else None

    def export(
        self,
        model: BEVTForVideoClassification,
        metrics: dict[str, float] | None,
        report: dict[str, Any] | None,
        hyperparameters: dict[str, Any],
    ) -> None:
        """Main process only."""
        out = Path(self.args.output_dir)
        model.save_pretrained(out)
        video_processor(self.args).save_pretrained(out)
        if report is not None:
            write_eval_outputs(out, report, self.label_names, f"{out.name}")
        dataset = self.args.dataset_name
        card = build_model_card(
            model_name=Path(self.args.hub_model_id or out.resolve().name).name,
            config=model.config,
            pipeline_tag="video-classification",
            tags=["video-classification", "bevt-finetuned"] + (["demo"] if self.args.demo else []),
            datasets=[dataset] if dataset else (),
            base_model=self.base_model(),
            eval_results=metrics,
            eval_dataset=EvalDataset(DATASET_DISPLAY_NAMES.get(dataset, dataset), dataset, "validation")
            if metrics
            else None,
            num_views=self.num_views,
            flops_per_view=self.flops(model),
            num_parameters=sum(p.numel() for p in model.parameters()),
            hyperparameters=hyperparameters,
            repo_id=self.args.hub_model_id,
        )
        card.save(out / "README.md")


def card_hyperparameters(args: argparse.Namespace, schedule: Schedule, num_processes: int) -> dict[str, Any]:
    total_batch = args.per_device_train_batch_size * num_processes * args.gradient_accumulation_steps
    return {
        "start": args.model_name_or_path or f"scratch ({args.model_preset} preset)",
        "clip": f"{args.num_frames} frames, {args.sampling} sampling"
        + (f", interval {args.frame_interval}" if args.sampling == "dense" else ""),
        "optimizer": f"AdamW lr {args.learning_rate:g}, betas ({args.adam_beta1}, {args.adam_beta2}), "
        f"weight decay {args.weight_decay:g}",
        "layer-wise lr decay": args.layer_decay,
        "backbone lr multiplier": args.backbone_lr_multiplier,
        "schedule": f"{args.lr_scheduler_type}, {schedule.num_warmup_steps} warmup steps, {schedule.max_train_steps} steps",
        "total batch": f"{total_batch} ({num_processes} processes x {args.per_device_train_batch_size} x "
        f"{args.gradient_accumulation_steps} accumulation)",
        "window": args.architecture["window_size"].card_text(),
        "frames per clip": args.architecture["num_frames"].card_text(),
        "input size": args.architecture["image_size"].card_text(),
        "drop path": args.architecture["drop_path_rate"].card_text(),
        "augmentation": f"random resized crop {args.crop_scale}, flip {args.flip_prob}, RandAugment "
        f"{args.randaug or 'none'}, random erasing {args.random_erasing}, mixup {args.mixup}, cutmix {args.cutmix}",
        "label smoothing": args.label_smoothing,
        "EMA": args.ema_decay or "off",
        "gradient clipping": args.max_grad_norm or "off",
        "seed": args.seed,
    }


def train(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    loader: StreamDataLoader,
    evaluator: Evaluator | None,
    ema: ModelEMA | None,
    manager: CheckpointManager,
    state: TrainState,
    schedule: Schedule,
    exporter: Exporter,
    hyperparameters: dict[str, Any],
) -> int:
    """The training loop with periodic evaluation; returns the exit code (0, or 128 + signal after a save)."""
    guard = NonFiniteLossGuard(args.max_nonfinite_steps)
    if state.guard:
        guard.load_state_dict(state.guard)
    num_labels = accelerator.unwrap_model(model).config.num_labels
    world = accelerator.num_processes
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    meters = WindowMeters.of(("loss", "accuracy", "grad_norm"), streams=("video",))
    throughput = meters.throughput["video"]
    progress = progress_bar(accelerator, schedule.max_train_steps, state.step, "fine-tuning")

    def save_checkpoint() -> None:
        state.guard = guard.state_dict()
        path = manager.save(
            accelerator, state.step, extra_state=state.to_dict(), data_state=loader.state_dict()
        )
        logger.info(f"saved checkpoint {path}")

    def evaluate_now() -> None:
        eval_model = ema.module if ema is not None else accelerator.unwrap_model(model)
        metrics, predictions = evaluator.run(eval_model)
        epoch = state.step / schedule.steps_per_epoch if schedule.steps_per_epoch else None
        elapsed = round(time.perf_counter() - run_started, 1)  # seconds since this process started training
        state.history.append({"step": state.step, "epoch": epoch, "elapsed_s": elapsed, **metrics})
        state.last_eval_step = state.step
        if args.with_tracking:
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
        value = metrics[args.metric_for_best_model]
        if accelerator.is_main_process:
            exporter.last_report = evaluator.report(
                predictions, metrics, model=args.output_dir, step=state.step, epoch=epoch, ema=ema is not None
            )
        if args.final_model == "best" and is_better(value, state.best_metric):
            state.best_metric, state.best_step, state.best_metrics = value, state.step, metrics
            if accelerator.is_main_process:
                exporter.export(eval_model, metrics, exporter.last_report, hyperparameters)
                logger.info(
                    f"new best {args.metric_for_best_model} {100 * value:.2f}%: exported to {args.output_dir}"
                )
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(Path(args.output_dir) / "eval_history.json", state.history)

    run_started = time.perf_counter()
    model.train()
    iterator = iter(loader)
    micro_stats: list[torch.Tensor] = []
    step_started = time.perf_counter()
    with GracefulExit() as stopper:
        while state.step < schedule.max_train_steps:
            # The DataLoader draws its base seed from the global RNG when it starts: keep that out of the RNG
            # stream of the model (drop path), so a resumed run continues it exactly.
            with meters.timer.phase("data"), torch.random.fork_rng(devices=[]):
                batch = next(iterator)
            with meters.timer.phase("compute"), accelerator.accumulate(model):
                labels = batch["labels"]
                generator = seeded_generator(
                    args.seed, "mix", state.step, len(micro_stats), accelerator.process_index
                )
                pixel_values, targets = training_targets(
                    args, batch["pixel_values"], labels, num_labels, generator
                )
                device = accelerator.device
                with accelerator.autocast():
                    output = model(pixel_values=pixel_values.to(device), labels=targets.to(device))
                correct = (output.logits.detach().argmax(-1).cpu() == labels).float().mean()
                micro_stats.append(torch.stack([output.loss.detach().float().cpu(), correct]))
                accelerator.backward(output.loss)
                if not accelerator.sync_gradients:
                    continue
                mean, finite = reduce_step_stats(accelerator, micro_stats)
                micro_stats.clear()
                loss, accuracy = mean.tolist()
                apply, grad_norm = clip_and_step(
                    accelerator,
                    model,
                    optimizer,
                    lr_scheduler,
                    guard,
                    finite=finite,
                    max_grad_norm=args.max_grad_norm,
                    step=state.step + 1,
                )
                if not apply:
                    logger.warning(f"step {state.step + 1}: non-finite loss or gradient norm, update skipped")
                if ema is not None and apply:
                    ema.update(accelerator.unwrap_model(model))

            state.step += 1
            state.samples += per_step
            seconds = time.perf_counter() - step_started
            step_started = time.perf_counter()
            throughput.update(per_step, seconds)
            if apply:
                meters.window["loss"].update(loss)
                meters.window["accuracy"].update(accuracy)
                meters.window["grad_norm"].update(grad_norm)
            progress.update(1)
            progress.set_postfix({"loss": f"{loss:.3f}", "clips/s": f"{throughput.rate:.1f}"}, refresh=False)
            if state.step % args.logging_steps == 0 or state.step == schedule.max_train_steps:
                log_train(args, accelerator, state, schedule, meters, lr_scheduler, guard)
            if (
                evaluator is not None
                and schedule.eval_steps
                and (state.step % schedule.eval_steps == 0 or state.step == schedule.max_train_steps)
            ):
                evaluate_now()
            stop = stopper.should_stop(accelerator)
            if (args.checkpointing_steps and state.step % args.checkpointing_steps == 0) or stop:
                save_checkpoint()
            if stop:
                logger.warning(
                    f"received signal {stopper.signal_number}: saved a checkpoint at step {state.step}; resume with "
                    "--resume_from_checkpoint latest"
                )
                progress.close()
                return stopper.exit_code or 143
    progress.close()
    if evaluator is not None and state.last_eval_step != state.step:
        evaluate_now()
    return 0


def log_train(
    args: argparse.Namespace,
    accelerator: Accelerator,
    state: TrainState,
    schedule: Schedule,
    meters: WindowMeters,
    lr_scheduler: Any,
    guard: NonFiniteLossGuard,
) -> None:
    """One log line (main process) and tracker scalars; resets the window."""
    averages = meters.averages()
    timing = meters.timer.averages()
    throughput = meters.throughput["video"]
    lr = max(lr_scheduler.get_last_lr())
    epoch = f" (epoch {state.step / schedule.steps_per_epoch:.2f})" if schedule.steps_per_epoch else ""
    if not math.isnan(averages["loss"]):
        logger.info(
            f"step {state.step}/{schedule.max_train_steps}{epoch} | loss {averages['loss']:.4f} | train acc "
            f"{averages['accuracy']:.3f} | lr {lr:.2e} | grad norm {averages['grad_norm']:.2f} | "
            f"{throughput.rate:.1f} clips/s | data {timing.get('data', 0):.3f}s compute {timing.get('compute', 0):.3f}s "
            "per micro-step"
        )
    if args.with_tracking:
        values = meters.tracker_values(averages, lr, guard)
        values.update({"throughput/clips_per_second": throughput.rate, "train/samples": state.samples})
        accelerator.log(values, step=state.step)
    meters.reset()


# ---------------------------------------------------------------------------------------------------------------
# Setup, evaluation-only mode, Hub
# ---------------------------------------------------------------------------------------------------------------


def prepare_demo_data(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Write (once) the synthetic shards under `<output_dir>/demo_data` and point the data flags at them."""
    from bevt.data.demo_finetuning import write_demo_shards

    demo = write_demo_data_once(accelerator, Path(args.output_dir) / "demo_data", write_demo_shards)
    args.train_shards = demo.train_shards
    args.validation_shards = demo.validation_shards
    if args.label_names is None:
        args.label_names = demo.label_names_file


def processor_defaults_from_folder(args: argparse.Namespace, argv: list[str] | None) -> None:
    """--do_eval_only: take the clip settings of the model folder's video processor unless given as flags."""
    path = Path(args.model_name_or_path) / "video_preprocessor_config.json"
    given = set(argv if argv is not None else sys.argv[1:])
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    mapping = {"num_frames": "num_frames", "frame_interval": "frame_interval", "sampling_mode": "sampling"}
    for key, flag in mapping.items():
        if key in saved and f"--{flag}" not in given:
            setattr(args, flag, saved[key])
    crop = (saved.get("crop_size") or {}).get("height")
    if crop and "--image_size" not in given:
        args.image_size = int(crop)
        if "--eval_short_side" not in given:
            args.eval_short_side = (
                args.image_size if args.eval_num_crops == 3 else round(args.image_size * 256 / 224)
            )


def evaluate_only(args: argparse.Namespace, accelerator: Accelerator, argv: list[str] | None) -> int:
    """Evaluate --model_name_or_path on --validation_shards; write the JSON report and the confusion matrix."""
    processor_defaults_from_folder(args, argv)
    try:
        model = BEVTForVideoClassification.from_pretrained(args.model_name_or_path)
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        raise SystemExit(f"error: --model_name_or_path {args.model_name_or_path}: {err}") from None
    label_names = resolve_label_names(args, model.config)
    if len(label_names) != model.config.num_labels:
        fail("--label_names", f"{model.config.num_labels} names (the model's classes)", len(label_names))
    model.to(accelerator.device)
    evaluator = Evaluator(args, accelerator, label_names)
    metrics, predictions = evaluator.run(model)
    if accelerator.is_main_process:
        report = evaluator.report(predictions, metrics, model=str(args.model_name_or_path))
        write_eval_outputs(args.output_dir, report, label_names, Path(args.model_name_or_path).name)
        print(
            f"\nEvaluation of {args.model_name_or_path} on {len(predictions)} videos "
            f"({args.eval_num_clips} clips x {args.eval_num_crops} crops): "
            + ", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items())
            + f"\nReport: {Path(args.output_dir) / 'eval_results.json'}, "
            f"{Path(args.output_dir) / 'confusion_matrix.png'}",
            flush=True,
        )
    accelerator.wait_for_everyone()
    return 0


def summarize(args: argparse.Namespace, state: TrainState, final_metrics: dict[str, float] | None) -> None:
    """Print the outcome (the demo's accuracy line is what the benchmark script reads)."""
    lines = [f"\nFine-tuning done: {state.step} steps."]
    if final_metrics:
        chosen = "best" if args.final_model == "best" else "last"
        lines.append(
            f"Validation ({chosen} model, step {state.best_step if chosen == 'best' else state.step}): "
            + ", ".join(f"{k} {100 * v:.2f}%" for k, v in final_metrics.items())
        )
        lines.append(f"validation accuracy: {100 * final_metrics['top1_accuracy']:.2f}%")
    lines.append(f"Model saved to {args.output_dir}")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    accelerator = start_run(args, quiet_accelerate=False)
    if args.do_eval_only:
        return evaluate_only(args, accelerator, argv)
    if args.demo:
        logger.info(
            "No --train_shards given: running the built-in demo (synthetic temporal classes, tiny model)."
        )
        prepare_demo_data(args, accelerator)
    seed_everything(args.seed)  # the same initial weights on every rank

    label_names = resolve_label_names(args)
    model = build_model(args, label_names)
    loader = build_train_loader(args, accelerator)
    evaluator = Evaluator(args, accelerator, label_names) if args.validation_shards else None
    schedule = resolve_schedule(args, loader.stream.total_examples, accelerator.num_processes)
    optimizer = build_optimizer(args, model)
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=schedule.num_warmup_steps,
        num_training_steps=schedule.max_train_steps,
    )
    ema = ModelEMA(model, args.ema_decay) if args.ema_decay else None
    model, optimizer = accelerator.prepare(model, optimizer)
    if args.torch_compile:
        compile_encoder(accelerator.unwrap_model(model))
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    manager = CheckpointManager(args.output_dir, save_total_limit=args.save_total_limit)

    def load_data_state(data_state: Any) -> None:
        if data_state is not None:
            loader.load_state_dict(data_state)

    resumed = resume_if_requested(args, accelerator, manager, load_data_state)
    state = TrainState.from_checkpoint(resumed.step, resumed.extra_state) if resumed else TrainState()
    init_tracking(args, accelerator, TRACKER_PROJECT)

    unwrapped = accelerator.unwrap_model(model)
    total_batch = (
        args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    )
    logger.info(
        f"***** Fine-tuning{' (demo)' if args.demo else ''} *****\n"
        f"  model: {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M parameters, {len(label_names)} classes, "
        f"window {'x'.join(map(str, unwrapped.config.window_size))}, {args.num_frames} frames at {args.image_size} px\n"
        f"  data: {loader.stream.total_examples or '?'} training clips, {total_batch} per optimizer step; "
        f"{schedule.steps_per_epoch or '?'} steps per epoch\n"
        f"  steps: {schedule.max_train_steps} (warmup {schedule.num_warmup_steps}), evaluation every "
        f"{schedule.eval_steps or 'end'} steps, starting at {state.step}"
    )
    hyperparameters = card_hyperparameters(args, schedule, accelerator.num_processes)
    exporter = Exporter(args, label_names, evaluator.num_views if evaluator else None)
    try:
        exit_code = train(
            args,
            accelerator,
            model,
            optimizer,
            lr_scheduler,
            loader,
            evaluator,
            ema,
            manager,
            state,
            schedule,
            exporter,
            hyperparameters,
        )
    except (NonFiniteLossError, DataQualityError) as err:  # a clear stop, not a traceback
        logger.error(f"error: {err}", main_process_only=False)
        exit_code = 1
    final_metrics = None
    if exit_code == 0:
        final_metrics = finish(args, accelerator, model, ema, evaluator, exporter, state, hyperparameters)
        if accelerator.is_main_process:
            summarize(args, state, final_metrics)
            if args.push_to_hub:
                push_to_hub(
                    args,
                    commit_message="BEVT fine-tuning: model, video processor, evaluation results",
                    ignore_patterns=(*HUB_IGNORE_PATTERNS, f"{TRACKER_PROJECT}/*"),
                )
    if args.with_tracking:
        accelerator.end_training()
    return exit_code


def finish(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    ema: ModelEMA | None,
    evaluator: Evaluator | None,
    exporter: Exporter,
    state: TrainState,
    hyperparameters: dict[str, Any],
) -> dict[str, float] | None:
    """Export the last weights unless the best ones are already exported; returns the exported model's metrics."""
    accelerator.wait_for_everyone()
    if args.final_model == "best" and state.best_step is not None:
        return state.best_metrics
    final = ema.module if ema is not None else accelerator.unwrap_model(model)
    metrics = state.history[-1] if state.history and state.history[-1]["step"] == state.step else None
    metrics = {k: v for k, v in metrics.items() if k in METRICS} if metrics else None
    if accelerator.is_main_process:
        exporter.export(final, metrics, exporter.last_report if metrics else None, hyperparameters)
    accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    sys.exit(main())
