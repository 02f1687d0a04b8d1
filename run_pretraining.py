#!/usr/bin/env python
"""BEVT pretraining (masked image + masked video modeling) with 🤗 Accelerate.

    accelerate launch run_pretraining.py                      # built-in demo: tiny model, synthetic shards
    accelerate launch run_pretraining.py --stage image --image_shards "imagenet/train-*.tar" ...
    accelerate launch run_pretraining.py --stage joint --model_name_or_path stage1_output \\
        --video_shards "k400/train-*.tar" --image_shards "imagenet/train-*.tar" \\
        --tokenizer_name_or_path dall-e-tokenizer --output_dir bevt-base-pretrained

Stage 1 (`--stage image`) trains the encoder on masked image modeling only; stage 2 (`--stage joint`) feeds one
image batch and one video batch through the shared encoder at every step, loss =
`video_loss_weight * video_loss + image_loss_weight * image_loss`. Targets are the token ids of a frozen visual
tokenizer (`BEVTVisualTokenizer`) on a half-size copy of the input; masks are BEiT blocks (images) and BEVT tubes
(videos). Without data flags, a small synthetic dataset is written under the output folder and a tiny model is
trained on it for a short schedule (see the README).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import pickle
import signal
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
from bevt import BEVTConfig, BEVTForMaskedVideoModeling
from bevt.data.streaming import DataQualityError
from bevt.modeling_tokenizer import BEVTVisualTokenizer
from bevt.pretraining import PretrainingData, model_inputs, random_tokenizer
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

STAGES = ("image", "joint")
TRACKER_PROJECT = "bevt_pretraining"  # Accelerate tracker project: logs under <output_dir>/bevt_pretraining

# Values of the flags whose default depends on the mode: the full recipe (Swin-B, 224 px, 16x8 clips) or the
# built-in demo (no data flags: a tiny model on 64 px synthetic data, a few minutes on a laptop CPU).
RECIPE_DEFAULTS: dict[str, Any] = {
    "model_preset": "base",
    "drop_path_rate": 0.3,  # swin_base_patch244_window877_bevt_in1k_k400.py
    "image_size": 224,
    "num_frames": 16,
    "frame_interval": 8,
    "scale_range": (256, 320),
    "tokenizer_size": None,  # image_size // 2
    "min_mask_patches": 16,
    "video_batch_size": 8,
    "image_batch_size": 64,
    "learning_rate": 5e-4,
    "max_train_steps": None,
    "num_train_epochs": 150.0,
    "warmup_ratio": 10 / 150,
    "checkpointing_steps": 1000,
    "logging_steps": 50,
    "num_workers": 8,
    "shuffle_buffer": 1000,
    "output_dir": "bevt-pretraining",
}
DEMO_DEFAULTS: dict[str, Any] = {
    "model_preset": "test",
    "drop_path_rate": 0.0,
    "image_size": 64,
    "num_frames": 8,
    "frame_interval": 2,
    "scale_range": (64, 80),
    "tokenizer_size": 32,
    "min_mask_patches": 2,
    "video_batch_size": 4,
    "image_batch_size": 16,
    "learning_rate": 2e-3,
    "max_train_steps": 120,
    "num_train_epochs": None,
    "warmup_ratio": 0.1,
    "checkpointing_steps": 60,
    "logging_steps": 10,
    "num_workers": 0,
    "shuffle_buffer": 64,
    "output_dir": "outputs/bevt-pretraining-demo",
}


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


def _mode_default(name: str) -> str:
    """Help suffix `(default: X; demo: Y)` for a flag whose default depends on the mode."""
    display = {
        ("tokenizer_size", None): "image_size // 2",
        ("max_train_steps", None): "from --num_train_epochs",
        ("num_train_epochs", None): "unused",
    }

    def show(value: Any) -> str:
        if isinstance(value, tuple):
            return " ".join(str(v) for v in value)
        return display.get((name, value), str(value))

    return f"(default: {show(RECIPE_DEFAULTS[name])}; demo: {show(DEMO_DEFAULTS[name])})"


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags; every flag's help states its default (recipe and demo defaults where they differ)."""
    p = argparse.ArgumentParser(
        description="BEVT pretraining (masked image/video modeling) with Accelerate. Without --video_shards and "
        "--image_shards, runs the built-in demo on synthetic data.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--video_shards", nargs="+", default=None, help="Video .tar shards: globs, folders or files."
    )
    g.add_argument(
        "--image_shards", nargs="+", default=None, help="Image .tar shards: globs, folders or files."
    )
    g.add_argument(
        "--stage", choices=STAGES, default="joint", help="image: stage 1 (images only); joint: stage 2."
    )
    g.add_argument(
        "--image_size",
        type=int,
        default=None,
        help=f"Crop size (multiple of 32). {_mode_default('image_size')}",
    )
    g.add_argument(
        "--num_frames", type=int, default=None, help=f"Frames per clip (even). {_mode_default('num_frames')}"
    )
    g.add_argument(
        "--frame_interval",
        type=int,
        default=None,
        help=f"Stride between sampled frames. {_mode_default('frame_interval')}",
    )
    g.add_argument(
        "--scale_range",
        type=int,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help=f"Random short-side rescale range before the crop. {_mode_default('scale_range')}",
    )
    g.add_argument(
        "--tokenizer_size",
        type=int,
        default=None,
        help=f"Tokenizer input size (image_size // 2 gives one token per 16-px patch). {_mode_default('tokenizer_size')}",
    )
    g.add_argument("--flip_prob", type=float, default=0.5, help="Horizontal flip probability.")
    g.add_argument(
        "--color_jitter",
        type=float,
        default=0.4,
        help="Image colour jitter (brightness/contrast/saturation).",
    )
    g.add_argument(
        "--mask_ratio",
        type=float,
        default=0.5,
        help="Fraction of the 16-px patch grid masked (98 of 196 at 224 px).",
    )
    g.add_argument(
        "--min_mask_patches",
        type=int,
        default=None,
        help=f"Smallest mask block, in patches. {_mode_default('min_mask_patches')}",
    )
    g.add_argument(
        "--tube_range",
        type=float,
        nargs=2,
        default=(0.5, 1.0),
        metavar=("LOW", "HIGH"),
        help="Tube length range, as a fraction of T/2.",
    )
    g.add_argument(
        "--shuffle_buffer",
        type=int,
        default=None,
        help=f"Samples in the streaming shuffle buffer (0: no shuffling). {_mode_default('shuffle_buffer')}",
    )
    g.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help=f"Data-loading worker processes per rank and stream. {_mode_default('num_workers')}",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--model_name_or_path", default=None, help="Start from a saved BEVT folder (e.g. the stage-1 output)."
    )
    g.add_argument(
        "--model_preset",
        choices=sorted(bevt.PRESETS),
        default=None,
        help=f"Architecture when training from scratch. {_mode_default('model_preset')}",
    )
    g.add_argument(
        "--drop_path_rate",
        type=float,
        default=None,
        help="Stochastic depth of a new model (a --model_name_or_path model keeps its own unless given). "
        f"{_mode_default('drop_path_rate')}",
    )
    g.add_argument(
        "--config_overrides",
        default=None,
        help='Config overrides from scratch, e.g. "drop_path_rate=0.2,embed_dim=96".',
    )
    g.add_argument(
        "--swin2d_checkpoint",
        default=None,
        help="Initialise from a 2D Swin image checkpoint (official inflation).",
    )
    g.add_argument(
        "--tokenizer_name_or_path",
        default=None,
        help="Converted BEVTVisualTokenizer folder. Without it, a RANDOM tokenizer is used (demo/tests only).",
    )
    g.add_argument(
        "--video_batch_size",
        type=int,
        default=None,
        help=f"Videos per device per micro-step. {_mode_default('video_batch_size')}",
    )
    g.add_argument(
        "--image_batch_size",
        type=int,
        default=None,
        help=f"Images per device per micro-step. {_mode_default('image_batch_size')}",
    )
    g.add_argument(
        "--video_loss_weight", type=float, default=1.0, help="Weight of the video loss (joint stage)."
    )
    g.add_argument("--image_loss_weight", type=float, default=1.0, help="Weight of the image loss.")
    add_compute_args(g)

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help=f"Peak learning rate (the recipe's 5e-4 is for 32 GPUs x 64 images; scale linearly with the total batch). {_mode_default('learning_rate')}",
    )
    g.add_argument(
        "--weight_decay",
        type=float,
        default=0.05,
        help="AdamW weight decay (none on norms, biases, bias tables, mask token).",
    )
    add_adam_args(g, scheduler_help="Schedule after the linear warmup.")
    g.add_argument(
        "--num_warmup_steps", type=int, default=None, help="Warmup steps (overrides --warmup_ratio)."
    )
    g.add_argument(
        "--warmup_ratio",
        type=float,
        default=None,
        help=f"Warmup as a fraction of the training steps. {_mode_default('warmup_ratio')}",
    )
    g.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help=f"Optimizer steps (overrides --num_train_epochs). {_mode_default('max_train_steps')}",
    )
    g.add_argument(
        "--num_train_epochs",
        type=float,
        default=None,
        help=f"Epochs over the video shards (joint) or image shards (image stage); needs dataset_info.json next to the shards. {_mode_default('num_train_epochs')}",
    )
    g.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step."
    )
    g.add_argument("--max_grad_norm", type=float, default=3.0, help="Gradient clipping norm (0 disables).")
    add_run_control_args(
        g,
        mixed_precision_help="Overrides the Accelerate config (fp16 needs a GPU).",
        seed_help="Seed of the model init, data order, augmentations and masks.",
    )

    g = p.add_argument_group("checkpoints and logging")
    add_checkpoint_args(
        g,
        output_dir_help=f"Where checkpoints and the final model go. {_mode_default('output_dir')}",
        checkpointing_steps_help="Save a checkpoint every N optimizer steps (0: only at the end/on signals). "
        f"{_mode_default('checkpointing_steps')}",
        save_total_limit_help="Keep at most this many checkpoints (oldest deleted).",
        logging_steps_help=f"Log every N optimizer steps. {_mode_default('logging_steps')}",
    )
    g.add_argument(
        "--log_sample_keys",
        action="store_true",
        help="Append the keys of the samples each rank trains on to <output_dir>/sample_keys_rank<R>.txt.",
    )
    add_tracking_args(g)
    add_hub_args(g, push_help="Push the final folder to the Hub.")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, fill the mode-dependent defaults (recipe or demo) and validate."""
    args = build_parser().parse_args(argv)
    apply_mode_defaults(args)
    validate_args(args)
    return args


def apply_mode_defaults(args: argparse.Namespace) -> None:
    """Fill the flags left unset with the recipe or the demo default; sets `args.demo`."""
    args.demo = args.video_shards is None and args.image_shards is None
    args.drop_path_rate_given = args.drop_path_rate is not None  # a loaded model keeps its own otherwise
    defaults = DEMO_DEFAULTS if args.demo else RECIPE_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tokenizer_size is None:
        args.tokenizer_size = args.image_size // 2
    args.scale_range = tuple(args.scale_range)
    args.tube_range = tuple(args.tube_range)


def validate_args(args: argparse.Namespace) -> None:
    """Check flag values; errors name the flag and what it expects."""
    if not args.demo:
        if args.image_shards is None:
            fail("--image_shards", "given (both stages train on images)", None)
        if args.stage == "joint" and args.video_shards is None:
            fail("--video_shards", "given with --stage joint (or use --stage image)", None)
        if args.stage == "image" and args.video_shards is not None:
            fail(
                "--video_shards",
                "omitted with --stage image (stage 1 trains on images only)",
                args.video_shards,
            )
    require_positive_ints(
        args,
        (
            "image_size",
            "num_frames",
            "frame_interval",
            "tokenizer_size",
            "video_batch_size",
            "image_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "max_nonfinite_steps",
        ),
    )
    if args.image_size % 32:
        fail("--image_size", "a multiple of 32 (the heads meet stages 3 and 4)", args.image_size)
    if args.num_frames % 2:
        fail("--num_frames", "even (patches span 2 frames)", args.num_frames)
    low, high = args.scale_range
    if not args.image_size <= low <= high:
        fail(
            "--scale_range",
            f"LOW HIGH with {args.image_size} (--image_size) <= LOW <= HIGH",
            list(args.scale_range),
        )
    if args.tokenizer_size > args.image_size or args.tokenizer_size % 8:
        fail("--tokenizer_size", "a multiple of 8 and at most --image_size", args.tokenizer_size)
    if not 0 < args.mask_ratio < 1:
        fail("--mask_ratio", "in (0, 1)", args.mask_ratio)
    if args.min_mask_patches < 1:
        fail("--min_mask_patches", "a positive integer", args.min_mask_patches)
    if not 0 <= args.tube_range[0] <= args.tube_range[1] <= 1:
        fail("--tube_range", "LOW HIGH with 0 <= LOW <= HIGH <= 1", list(args.tube_range))
    require_unit_interval(args, ("flip_prob",))
    require_non_negative(
        args, ("color_jitter", "weight_decay", "max_grad_norm", "video_loss_weight", "image_loss_weight")
    )
    if args.stage == "joint" and args.video_loss_weight == 0 and args.image_loss_weight == 0:
        fail("--video_loss_weight/--image_loss_weight", "not both 0", 0)
    validate_optimizer_args(args)
    if not 0 <= args.warmup_ratio < 1:
        fail("--warmup_ratio", "in [0, 1)", args.warmup_ratio)
    validate_step_count_args(args)
    require_non_negative(args, ("checkpointing_steps", "shuffle_buffer", "num_workers", "seed"))
    if args.save_total_limit is not None and args.save_total_limit < 1:
        fail("--save_total_limit", "a positive integer", args.save_total_limit)
    if args.model_name_or_path and args.swin2d_checkpoint:
        fail(
            "--swin2d_checkpoint",
            "omitted when --model_name_or_path is given (choose one initialisation)",
            args.swin2d_checkpoint,
        )
    if args.model_name_or_path and args.config_overrides:
        fail(
            "--config_overrides",
            "omitted with --model_name_or_path (it only applies to new models)",
            args.config_overrides,
        )
    if args.swin2d_checkpoint is not None and not os.path.isfile(args.swin2d_checkpoint):
        fail("--swin2d_checkpoint", "an existing file", args.swin2d_checkpoint)
    if args.stage == "image" and args.image_loss_weight == 0:
        fail("--image_loss_weight", "> 0 with --stage image (the only loss)", args.image_loss_weight)


# ---------------------------------------------------------------------------------------------------------------
# Model and tokenizer
# ---------------------------------------------------------------------------------------------------------------


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """`"a=1,b=0.5,c=(2,2,6,2)"` -> {"a": 1, "b": 0.5, "c": (2, 2, 6, 2)} (values parsed as JSON/tuples)."""
    if not text:
        return {}
    overrides: dict[str, Any] = {}
    for item in _split_top_level(text):
        if "=" not in item:
            fail(
                "--config_overrides",
                'comma-separated key=value pairs, e.g. "embed_dim=96,drop_path_rate=0.2"',
                text,
            )
        key, raw = (part.strip() for part in item.split("=", 1))
        known = {f.name for f in dataclasses.fields(BEVTConfig)} | {"num_labels"}
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r} for {key!r}?" if close else f"{key!r} is not one"
            fail("--config_overrides", f"key=value pairs of BEVTConfig fields ({hint})", text)
        raw_json = raw.replace("(", "[").replace(")", "]")
        try:
            value = json.loads(raw_json)
        except json.JSONDecodeError:
            value = raw
        overrides[key] = tuple(value) if isinstance(value, list) else value
    return overrides


def _split_top_level(text: str) -> list[str]:
    """Split at the commas that are not inside brackets: "a=1,b=(2,2)" -> ["a=1", "b=(2,2)"]."""
    items, depth, current = [], 0, ""
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def build_model(args: argparse.Namespace, vocab_size: int | None) -> BEVTForMaskedVideoModeling:
    """From `--model_name_or_path`, or a new model from `--model_preset` (+ overrides, + `--swin2d_checkpoint`)."""
    if args.model_name_or_path:
        try:
            updates = {"drop_path_rate": args.drop_path_rate} if args.drop_path_rate_given else {}
            model = BEVTForMaskedVideoModeling.from_pretrained(args.model_name_or_path, **updates)
        except (OSError, ValueError, pickle.UnpicklingError) as err:
            raise SystemExit(f"error: --model_name_or_path {args.model_name_or_path}: {err}") from None
        if vocab_size is not None and model.config.vocab_size != vocab_size:
            fail(
                "--tokenizer_name_or_path",
                f"a tokenizer with vocab_size {model.config.vocab_size} (the model's)",
                vocab_size,
            )
    else:
        overrides = {
            "image_size": args.image_size,
            "num_frames": args.num_frames,
            "drop_path_rate": args.drop_path_rate,
        }
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        overrides.update(parse_config_overrides(args.config_overrides))
        try:
            config = BEVTConfig.from_preset(args.model_preset, **overrides)
        except (TypeError, ValueError) as err:
            raise SystemExit(
                f"error: --model_preset/--config_overrides give an invalid config: {err}"
            ) from None
        model = BEVTForMaskedVideoModeling(config)
        if args.swin2d_checkpoint:
            from bevt.convert import load_swin2d_into

            try:
                report = load_swin2d_into(model, args.swin2d_checkpoint)
            except ValueError as err:  # UnsafeCheckpointError, ConversionError, a corrupt file
                raise SystemExit(f"error: --swin2d_checkpoint {args.swin2d_checkpoint}: {err}") from None
            logger.info(
                f"Initialised from the 2D Swin checkpoint {args.swin2d_checkpoint}:\n{report.summary()}"
            )
    model.config.video_loss_weight = args.video_loss_weight
    model.config.image_loss_weight = args.image_loss_weight
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def load_tokenizer(args: argparse.Namespace) -> BEVTVisualTokenizer:
    """The frozen target tokenizer from `--tokenizer_name_or_path` (a converted `BEVTVisualTokenizer` folder)."""
    try:
        tokenizer = BEVTVisualTokenizer.from_pretrained(args.tokenizer_name_or_path)
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        raise SystemExit(f"error: --tokenizer_name_or_path {args.tokenizer_name_or_path}: {err}") from None
    expected = args.image_size // 16 * tokenizer.config.downsample_factor
    if args.tokenizer_size != expected:
        fail(
            "--tokenizer_size",
            f"{expected} (one {tokenizer.config.downsample_factor}-px tokenizer cell per 16-px patch of "
            f"--image_size {args.image_size})",
            args.tokenizer_size,
        )
    return tokenizer.eval()


def build_random_tokenizer(args: argparse.Namespace, vocab_size: int) -> BEVTVisualTokenizer:
    """Without `--tokenizer_name_or_path`: a random-weight tokenizer (demo and tests only), with a loud warning."""
    logger.warning(
        "\n"
        + "!" * 100
        + "\n!! No --tokenizer_name_or_path: the visual tokenizer has RANDOM weights. Its targets "
        "are meaningless for real\n!! pretraining: use this for the demo and tests only. Convert the DALL-E encoder "
        "with `python -m bevt.convert`\n!! (see the README) and pass the folder with --tokenizer_name_or_path.\n"
        + "!"
        * 100
    )
    if args.tokenizer_size != args.image_size // 2:
        fail(
            "--tokenizer_size",
            f"{args.image_size // 2} (--image_size // 2) with the random tokenizer",
            args.tokenizer_size,
        )
    return random_tokenizer(vocab_size, args.tokenizer_size, seed=args.seed)


def build_data(args: argparse.Namespace, accelerator: Accelerator) -> PretrainingData:
    """This rank's image (and, in the joint stage, video) streams."""
    key_log = (
        Path(args.output_dir) / f"sample_keys_rank{accelerator.process_index}.txt"
        if args.log_sample_keys
        else None
    )
    try:
        return PretrainingData(
            args.image_shards,
            args.video_shards if args.stage == "joint" else None,
            image_batch_size=args.image_batch_size,
            video_batch_size=args.video_batch_size,
            image_size=args.image_size,
            num_frames=args.num_frames,
            frame_interval=args.frame_interval,
            scale_range=args.scale_range,
            tokenizer_size=args.tokenizer_size,
            flip_prob=args.flip_prob,
            color_jitter=args.color_jitter,
            mask_ratio=args.mask_ratio,
            min_mask_patches=args.min_mask_patches,
            tube_range=args.tube_range,
            shuffle_buffer=args.shuffle_buffer,
            num_workers=args.num_workers,
            seed=args.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            key_log=key_log,
        )
    except FileNotFoundError as err:
        raise SystemExit(f"error: --image_shards/--video_shards: {err}") from None


def skipped_samples(data: PretrainingData, accelerator: Accelerator) -> dict[str, int]:
    """Samples skipped by the data layer per stream, summed over ranks (collective: call on every rank)."""
    local = data.skipped_counts()
    counts = torch.tensor([float(v) for v in local.values()], device=accelerator.device)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, "sum")
    return {kind: int(v) for kind, v in zip(local, counts.tolist())}


# ---------------------------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------------------------


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW without weight decay on norms, biases, relative position bias tables and the mask token."""
    groups = build_param_groups(model, args.weight_decay)
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


def resolve_training_steps(
    args: argparse.Namespace, samples_per_epoch: int | None, num_processes: int
) -> None:
    """Set `args.max_train_steps` (from epochs when not given) and `args.num_warmup_steps`."""
    if args.max_train_steps is None:
        if samples_per_epoch is None:
            fail(
                "--max_train_steps",
                "given when the shards have no dataset_info.json (needed to turn --num_train_epochs into steps)",
                None,
            )
        batch = (args.video_batch_size if args.stage == "joint" else args.image_batch_size) * num_processes
        steps_per_epoch = math.ceil(samples_per_epoch / (batch * args.gradient_accumulation_steps))
        args.max_train_steps = max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    if args.num_warmup_steps is None:
        args.num_warmup_steps = int(args.warmup_ratio * args.max_train_steps)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

# Per-step statistics reduced across ranks, in this order.
STAT_NAMES = ("loss", "video_loss", "image_loss", "video_mask_accuracy", "image_mask_accuracy")


@dataclass
class TrainState:
    """Counters carried across checkpoints (stored in `trainer_state.json`).

    `first_metrics` are those of the first optimizer step, `last_window` the mean over the last logging window.
    """

    step: int = 0
    samples: dict[str, int] = field(default_factory=lambda: {"video": 0, "image": 0})
    first_metrics: dict[str, float] = field(default_factory=dict)
    last_window: dict[str, float] = field(default_factory=dict)
    guard: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "first_metrics": self.first_metrics,
            "last_window": self.last_window,
            "guard": self.guard,
        }

    @classmethod
    def from_checkpoint(cls, step: int, extra: dict[str, Any]) -> TrainState:
        return cls(
            step=step,
            samples=dict(extra.get("samples", {"video": 0, "image": 0})),
            first_metrics=dict(extra.get("first_metrics", {})),
            last_window=dict(extra.get("last_window", {})),
            guard=dict(extra.get("guard", {})),
        )


@dataclass
class StepResult:
    """Outcome of one optimizer step: metrics averaged over micro-batches and ranks (NaN when skipped)."""

    metrics: dict[str, float]
    grad_norm: float
    applied: bool


def micro_batch_stats(output: Any) -> torch.Tensor:
    """(len(STAT_NAMES),) detached float32 statistics of one micro-batch; an absent stream gives 0."""
    zero = torch.zeros((), device=output.loss.device)
    return torch.stack(
        [
            getattr(output, n).detach().float().reshape(()) if getattr(output, n) is not None else zero
            for n in STAT_NAMES
        ]
    )


def optimizer_step(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    guard: NonFiniteLossGuard,
    micro_stats: list[torch.Tensor],
    step: int,
) -> StepResult:
    """Clip, then apply the update unless the loss or gradient norm is NaN/inf on any rank (agreed collectively).

    With the fp16 grad scaler, `optimizer.step()` always runs: the scaler itself skips steps with inf/NaN gradients
    and lowers its scale. Skipped steps still advance the schedule, so `--max_train_steps` bounds the run.
    """
    mean, finite = reduce_step_stats(accelerator, micro_stats)
    values = mean.tolist() if finite else [math.nan] * len(STAT_NAMES)
    applied, grad_norm = clip_and_step(
        accelerator,
        model,
        optimizer,
        lr_scheduler,
        guard,
        finite=finite,
        max_grad_norm=args.max_grad_norm,
        step=step,  # DeepSpeed clips itself and returns no norm
    )
    if not applied:
        logger.warning(
            f"step {step}: non-finite loss or gradient norm, update skipped ({guard.consecutive} in a row, "
            f"{guard.total_skipped} in total; the run stops at {guard.max_consecutive} in a row)"
        )
    return StepResult(dict(zip(STAT_NAMES, values)), grad_norm, applied)


def train(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: BEVTVisualTokenizer,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    data: PretrainingData,
    manager: CheckpointManager,
    state: TrainState,
) -> int:
    """The training loop; returns the exit code: 0, or 128 + signal number after a signal-triggered checkpoint."""
    guard = NonFiniteLossGuard(args.max_nonfinite_steps)
    if state.guard:
        guard.load_state_dict(state.guard)
    per_step = {  # samples of each stream per optimizer step, all ranks together
        stream: batch * args.gradient_accumulation_steps * accelerator.num_processes
        for stream, batch in (("video", args.video_batch_size), ("image", args.image_batch_size))
        if stream in data.streams
    }
    meters = WindowMeters.of((*STAT_NAMES, "grad_norm"), streams=per_step)
    main_stream, unit = ("video", "clips/s") if "video" in per_step else ("image", "img/s")
    progress = progress_bar(accelerator, args.max_train_steps, state.step, "pretraining")
    model.train()
    micro_stats: list[torch.Tensor] = []
    step_started = time.perf_counter()
    with GracefulExit() as stopper, progress:
        while state.step < args.max_train_steps:
            # A DataLoader draws its base seed from the global RNG when it starts: keep that out of the model's
            # random stream (drop path), so a resumed run continues it exactly.
            with meters.timer.phase("data"), torch.random.fork_rng(devices=[]):
                batch = data.next_batch()
            with meters.timer.phase("compute"), accelerator.accumulate(model):
                with accelerator.autocast():
                    output = model(**model_inputs(batch, tokenizer, accelerator.device))
                micro_stats.append(micro_batch_stats(output))
                accelerator.backward(output.loss)
                if not accelerator.sync_gradients:
                    continue
                result = optimizer_step(
                    args, accelerator, model, optimizer, lr_scheduler, guard, micro_stats, state.step + 1
                )
                micro_stats.clear()

            state.step += 1
            seconds, step_started = time.perf_counter() - step_started, time.perf_counter()
            for stream, count in per_step.items():
                state.samples[stream] += count
                meters.throughput[stream].update(count, seconds)
            if result.applied:
                for name, value in result.metrics.items():
                    meters.window[name].update(value)
                meters.window["grad_norm"].update(result.grad_norm)
                state.first_metrics = state.first_metrics or result.metrics
            progress.update(1)
            progress.set_postfix(
                {"loss": f"{result.metrics['loss']:.3f}", unit: f"{meters.throughput[main_stream].rate:.1f}"},
                refresh=False,
            )
            if state.step % args.logging_steps == 0 or state.step == args.max_train_steps:
                log_metrics(args, accelerator, state, meters, guard, data, lr_scheduler)

            stop = stopper.should_stop(accelerator)
            if stop or (args.checkpointing_steps and state.step % args.checkpointing_steps == 0):
                state.guard = guard.state_dict()
                path = manager.save(accelerator, state.step, state.to_dict(), data_state=data.state_dict())
                logger.info(f"saved checkpoint {path}")
            if stop:
                cause = (
                    f"received signal {stopper.signal_number}"
                    if stopper.requested
                    else "a rank received a signal"
                )
                logger.warning(
                    f"{cause}: checkpoint saved at step {state.step}; continue with --resume_from_checkpoint latest"
                )
                return stopper.exit_code or 128 + signal.SIGTERM  # another rank got the signal
    return 0


def log_metrics(
    args: argparse.Namespace,
    accelerator: Accelerator,
    state: TrainState,
    meters: WindowMeters,
    guard: NonFiniteLossGuard,
    data: PretrainingData,
    lr_scheduler: Any,
) -> None:
    """One log line on the main process and, with --with_tracking, the tracker scalars; then resets the window."""
    skipped = skipped_samples(data, accelerator)  # collective: every rank calls it
    averages = meters.averages()
    timing = meters.timer.averages()
    rates = {stream: meter.rate for stream, meter in meters.throughput.items()}
    lr = lr_scheduler.get_last_lr()[0]
    if not math.isnan(averages["loss"]):
        state.last_window = {name: averages[name] for name in STAT_NAMES}
        rate_text = ", ".join(
            f"{rate:.1f} {'clips' if s == 'video' else 'images'}/s" for s, rate in rates.items()
        )
        logger.info(
            f"step {state.step}/{args.max_train_steps} | {_format_metrics(averages, args.stage)} | lr {lr:.2e} | "
            f"grad norm {averages['grad_norm']:.2f} | {rate_text} | data {timing.get('data', 0):.3f}s, compute "
            f"{timing.get('compute', 0):.3f}s per micro-step | skipped samples {sum(skipped.values())}"
        )
    if args.with_tracking:
        values = meters.tracker_values(averages, lr, guard)
        values.update({f"time/{phase}_seconds_per_micro_step": v for phase, v in timing.items()})
        values.update({f"throughput/{stream}_per_second": rate for stream, rate in rates.items()})
        values.update({f"data/{stream}_samples_skipped": count for stream, count in skipped.items()})
        values.update({f"data/{stream}_samples_seen": state.samples[stream] for stream in rates})
        accelerator.log(values, step=state.step)
    meters.reset()


def _format_metrics(metrics: dict[str, float], stage: str) -> str:
    if stage == "image":
        return f"loss {metrics['loss']:.4f} | masked-token acc {metrics['image_mask_accuracy']:.3f}"
    return (
        f"loss {metrics['loss']:.4f} (video {metrics['video_loss']:.4f}, image {metrics['image_loss']:.4f}) | "
        f"masked-token acc video {metrics['video_mask_accuracy']:.3f}, image {metrics['image_mask_accuracy']:.3f}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Setup, final save
# ---------------------------------------------------------------------------------------------------------------


def prepare_demo_data(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Write (once) the synthetic demo shards under `<output_dir>/demo_data` and point the data flags at them."""
    from bevt.data.demo_pretraining import write_demo_pretraining_shards

    demo = write_demo_data_once(
        accelerator, Path(args.output_dir) / "demo_data", write_demo_pretraining_shards
    )
    args.image_shards = demo.image_shards
    args.video_shards = demo.video_shards if args.stage == "joint" else None


def save_final_model(
    args: argparse.Namespace, accelerator: Accelerator, model: torch.nn.Module, state: TrainState
) -> None:
    """`save_pretrained` folder: model + config, video processor, model card, training results."""
    from bevt.processing_bevt import BEVTVideoProcessor

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP / DeepSpeed shards
    unwrapped.save_pretrained(
        args.output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=state_dict,
    )
    if accelerator.is_main_process:
        processor = BEVTVideoProcessor(
            num_frames=args.num_frames,
            frame_interval=args.frame_interval,
            size={"shortest_edge": args.image_size},
            crop_size={"height": args.image_size, "width": args.image_size},
        )
        processor.save_pretrained(args.output_dir)
        results = {
            "stage": args.stage,
            "steps": state.step,
            "samples": {k: v for k, v in state.samples.items() if v},
            "first": state.first_metrics,
            "final_window": state.last_window,
            "demo": args.demo,
            "tokenizer": args.tokenizer_name_or_path or "random (demo)",
        }
        Path(args.output_dir, "training_results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_model_card(args, unwrapped, results)
    accelerator.wait_for_everyone()


def write_model_card(
    args: argparse.Namespace, model: BEVTForMaskedVideoModeling, results: dict[str, Any]
) -> None:
    """README.md model card (`bevt.modelcard.build_model_card`) with the run's setup and how the metrics moved."""
    from bevt.modelcard import build_model_card

    first, final = results["first"], results["final_window"]
    names = [n for n in STAT_NAMES if args.stage == "joint" or not n.startswith("video")]
    rows = "\n".join(f"| {n} | {first.get(n, math.nan):.4f} | {final.get(n, math.nan):.4f} |" for n in names)
    task = "masked image modeling" if args.stage == "image" else "masked image + masked video modeling"
    demo_note = (
        "\n\n**Demo run** (tiny model, synthetic data, random tokenizer): shows the pipeline works; it is not a useful "
        "pretrained model."
        if args.demo
        else ""
    )
    summary = (
        f"A `BEVTForMaskedVideoModeling` checkpoint of the `bevt` package (BEVT: BERT Pretraining of Video "
        f"Transformers, Wang et al., CVPR 2022) after the {args.stage} stage ({task}) of `run_pretraining.py`, "
        f"{results['steps']} optimizer steps.{demo_note}\n\n"
        f"| metric | first step | mean of the last {args.logging_steps} steps |\n|---|---|---|\n{rows}"
    )
    data = "built-in synthetic demo data" if args.demo else f"images {args.image_shards}"
    if args.stage == "joint" and not args.demo:
        data += f"; videos {args.video_shards}"
    hyperparameters = {
        "stage": args.stage,
        "data": data,
        "visual tokenizer (targets)": results["tokenizer"],
        "samples seen": ", ".join(f"{v} {k}s" for k, v in results["samples"].items()),
        "input": f"{args.image_size}x{args.image_size}, {args.num_frames} frames, interval {args.frame_interval}",
        "masking": f"ratio {args.mask_ratio}, tube length {args.tube_range[0]}-{args.tube_range[1]} of T/2",
        "batch per device": (f"{args.video_batch_size} videos + " if args.stage == "joint" else "")
        + f"{args.image_batch_size} images, accumulation {args.gradient_accumulation_steps}",
        "optimizer": f"AdamW lr {args.learning_rate}, weight decay {args.weight_decay}, grad clip {args.max_grad_norm}",
        "schedule": f"{args.lr_scheduler_type}, {args.num_warmup_steps} warmup of {args.max_train_steps} steps",
    }
    card = build_model_card(
        model_name=Path(args.output_dir).resolve().name,
        config=model.config,
        summary=summary,
        tags=["pretraining", "masked-video-modeling"],
        num_parameters=model.num_parameters(),
        hyperparameters=hyperparameters,
        repo_id=args.hub_model_id,
    )
    card.save(Path(args.output_dir) / "README.md")


def summarize(args: argparse.Namespace, state: TrainState) -> None:
    """Print how the metrics moved (first optimizer step -> mean of the last logging window) and where the model is."""
    first, last = state.first_metrics, state.last_window
    names = [n for n in STAT_NAMES if args.stage == "joint" or not n.startswith("video")]
    moves = "\n".join(f"  {n:<20} {first.get(n, math.nan):.4f} -> {last.get(n, math.nan):.4f}" for n in names)
    print(
        f"\nPretraining done: {state.step} steps (first step -> mean of the last {args.logging_steps}):\n{moves}\n"
        f"Model saved to {args.output_dir}",
        flush=True,
    )


def log_run_header(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    data: PretrainingData,
    state: TrainState,
) -> None:
    per_step = ", ".join(
        f"{batch * args.gradient_accumulation_steps * accelerator.num_processes} {stream}s"
        for stream, batch in (("video", args.video_batch_size), ("image", args.image_batch_size))
        if stream in data.streams
    )
    config = accelerator.unwrap_model(model).config
    logger.info(
        f"***** Pretraining ({args.stage} stage{', demo' if args.demo else ''}) *****\n"
        f"  model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {config.vocab_size}\n"
        f"  per optimizer step: {per_step} ({accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation)\n"
        f"  steps: {args.max_train_steps} (warmup {args.num_warmup_steps}), starting at {state.step}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = start_run(args, quiet_accelerate=True)  # Accelerate's per-file save logs off
    if args.demo:
        logger.info(
            "No --video_shards/--image_shards given: running the built-in demo (synthetic data, tiny model)."
        )
        prepare_demo_data(args, accelerator)
    seed_everything(args.seed)  # the same initial weights on every rank

    tokenizer = load_tokenizer(args) if args.tokenizer_name_or_path else None
    model = build_model(args, tokenizer.config.vocab_size if tokenizer is not None else None)
    if tokenizer is None:
        tokenizer = build_random_tokenizer(args, model.config.vocab_size)
    tokenizer.to(accelerator.device)

    data = build_data(args, accelerator)
    resolve_training_steps(args, data.samples_per_epoch(), accelerator.num_processes)
    optimizer = build_optimizer(args, model)
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if args.torch_compile:
        compile_encoder(accelerator.unwrap_model(model))
    accelerator.register_for_checkpointing(lr_scheduler)  # stepped by us once per optimizer step

    manager = CheckpointManager(args.output_dir, save_total_limit=args.save_total_limit)
    resumed = resume_if_requested(args, accelerator, manager, data.load_state_dict)
    state = TrainState.from_checkpoint(resumed.step, resumed.extra_state) if resumed else TrainState()

    init_tracking(args, accelerator, TRACKER_PROJECT)
    log_run_header(args, accelerator, model, data, state)
    try:
        exit_code = train(args, accelerator, model, tokenizer, optimizer, lr_scheduler, data, manager, state)
    except (NonFiniteLossError, DataQualityError) as err:  # a clear stop, not a traceback
        logger.error(f"error: {err}", main_process_only=False)
        exit_code = 1
    if exit_code == 0:
        save_final_model(args, accelerator, model, state)
        if accelerator.is_main_process:
            summarize(args, state)
            if args.push_to_hub:
                push_to_hub(
                    args,
                    commit_message=f"BEVT pretraining ({args.stage} stage), step {args.max_train_steps}",
                    ignore_patterns=(*HUB_IGNORE_PATTERNS, f"{TRACKER_PROJECT}/*", "sample_keys_rank*"),
                )
    if args.with_tracking:
        accelerator.end_training()
    data.close()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
