"""The arguments of `run_pretraining.py` and its two recipes: the official BEVT-B one and the built-in demo.

`PretrainingArguments` is the shared groups of `bevt.training.arguments` plus the pretraining data and model
groups. Without `--video_shards` and `--image_shards` the run is the demo (a tiny model on synthetic shards): every
flag the recipes set and that is not given takes the demo's value, otherwise the official recipe's
(`PRETRAINING_RECIPE`: the data settings are `PretrainingDataConfig`'s defaults).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers.hf_argparser import HfArg

from ..pretraining import PretrainingDataConfig
from .arguments import (
    ArgumentGroup,
    CheckpointArguments,
    ComputeArguments,
    DataLoadingArguments,
    HubArguments,
    ModelArguments,
    OptimizerArguments,
    Recipe,
    RecipeArguments,
    RunControlArguments,
    ScheduleArguments,
    TrackingArguments,
    UsageError,
    check_local_source,
    check_non_negative,
    check_positive_ints,
    check_unit_interval,
    fail,
    parse_config_overrides,
)

__all__ = [
    "PRETRAINING_DEMO",
    "PRETRAINING_RECIPE",
    "PretrainingArguments",
    "PretrainingRecipe",
    "parse_config_overrides",
]

STAGES = ("image", "joint")


@dataclass(frozen=True)
class PretrainingRecipe(Recipe):
    """Values of the flags whose default depends on the mode (official recipe or demo)."""

    name: str = field(metadata={"flag": False})
    data: PretrainingDataConfig = field(metadata={"flag": False})
    target: str
    freeze_video_patch_embedding: bool
    model_preset: str
    drop_path_rate: float
    learning_rate: float
    weight_decay: float
    max_grad_norm: float
    gradient_accumulation_steps: int
    max_train_steps: int | None
    num_train_epochs: float | None
    warmup_ratio: float
    checkpointing_steps: int
    logging_steps: int
    output_dir: str
    torch_threads: int | None

    def values(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.data), **super().values()}


# swin_base_patch244_window877_bevt_in1k_k400.py: Swin-B, 224 px, 16x8 clips, drop path 0.3, AdamW 5e-4, wd 0.05,
# grad clip 3.0, 150 epochs with 10 of warmup (the per-GPU accumulation 2 is a flag of the README's command).
PRETRAINING_RECIPE = PretrainingRecipe(
    name="recipe",
    data=PretrainingDataConfig(),
    target="tokenizer",
    freeze_video_patch_embedding=False,
    model_preset="base",
    drop_path_rate=0.3,
    learning_rate=5e-4,
    weight_decay=0.05,
    max_grad_norm=3.0,
    gradient_accumulation_steps=1,
    max_train_steps=None,
    num_train_epochs=150.0,
    warmup_ratio=10 / 150,
    checkpointing_steps=1000,
    logging_steps=50,
    output_dir="bevt-pretraining",
    torch_threads=None,
)
# No data flags: a tiny model on 64 px synthetic shards, a minute on a laptop CPU, predicting normalised pixels:
# informative targets with nothing to download (the recipe's tokenizer ids need a converted or trained tokenizer).
# Pixels, not HOG: the tiny model's HOG stays at the mean predictor (README: "Choosing the target"). The video patch
# embedding stays at its initial weights: trained on pixels it averages the two frames of each tubelet, and a
# fine-tuning on a motion task from the folder then ends near chance (BENCHMARKS.md: "Transfer").
PRETRAINING_DEMO = PretrainingRecipe(
    name="demo",
    data=PretrainingDataConfig(
        image_size=64,
        num_frames=8,
        frame_interval=2,
        scale_range=(64, 80),
        min_mask_patches=2,
        video_batch_size=4,
        image_batch_size=16,
        shuffle_buffer=64,
        num_workers=0,
    ),
    target="pixel",
    freeze_video_patch_embedding=True,
    model_preset="test",
    drop_path_rate=0.0,
    learning_rate=2e-3,
    weight_decay=0.05,
    max_grad_norm=3.0,
    gradient_accumulation_steps=1,
    max_train_steps=120,
    num_train_epochs=None,
    warmup_ratio=0.1,
    checkpointing_steps=60,
    logging_steps=10,
    output_dir="outputs/bevt-pretraining-demo",
    torch_threads=None,
)


@dataclass
class PretrainingDataArguments(ArgumentGroup):
    _argument_group_name = "data"

    video_shards: list[str] | None = HfArg(default=None, help="Video .tar shards: globs, folders or files.")
    image_shards: list[str] | None = HfArg(default=None, help="Image .tar shards: globs, folders or files.")
    stage: Literal["image", "joint"] = HfArg(
        default="joint", help="image: stage 1 (images only); joint: stage 2."
    )
    image_size: int | None = HfArg(default=None, help="Crop size (multiple of 32).")
    num_frames: int | None = HfArg(default=None, help="Frames per clip (even).")
    frame_interval: int | None = HfArg(default=None, help="Stride between sampled frames.")
    scale_range: tuple[int, int] | None = HfArg(
        default=None,
        help="Random short-side rescale range before the crop, in pixels (not an area fraction like the other "
        "scripts' --crop_scale).",
        metadata={"metavar": ("LOW", "HIGH")},
    )
    tokenizer_size: int | None = HfArg(
        default=None, help="Tokenizer input size (image_size // 2 gives one token per 16-px patch)."
    )
    flip_prob: float | None = HfArg(default=None, help="Horizontal flip probability.")
    color_jitter: float | None = HfArg(
        default=None, help="Image colour jitter (brightness/contrast/saturation)."
    )
    mask_ratio: float | None = HfArg(
        default=None, help="Fraction of the 16-px patch grid masked (98 of 196 at 224 px)."
    )
    min_mask_patches: int | None = HfArg(default=None, help="Smallest mask block, in patches.")
    tube_range: tuple[float, float] | None = HfArg(
        default=None, help="Tube length range, as a fraction of T/2.", metadata={"metavar": ("LOW", "HIGH")}
    )
    video_batch_size: int | None = HfArg(
        default=None,
        help="Videos per device per micro-step (one batch per stream; run_finetuning.py's single stream: "
        "--per_device_train_batch_size).",
    )
    image_batch_size: int | None = HfArg(
        default=None, help="Images per device per micro-step (one batch per stream)."
    )

    def __post_init__(self) -> None:
        check_positive_ints(
            self,
            (
                "image_size",
                "num_frames",
                "frame_interval",
                "tokenizer_size",
                "video_batch_size",
                "image_batch_size",
            ),
        )
        if self.image_size is not None and self.image_size % 32:
            fail("--image_size", "a multiple of 32 (the heads meet stages 3 and 4)", self.image_size)
        if self.num_frames is not None and self.num_frames % 2:
            fail("--num_frames", "even (patches span 2 frames)", self.num_frames)
        if self.scale_range is not None and self.image_size is not None:
            low, high = self.scale_range
            if not self.image_size <= low <= high:
                expected = f"LOW HIGH with {self.image_size} (--image_size) <= LOW <= HIGH"
                fail("--scale_range", expected, list(self.scale_range))
        if self.tokenizer_size is not None and self.image_size is not None:
            if self.tokenizer_size > self.image_size or self.tokenizer_size % 8:
                fail("--tokenizer_size", "a multiple of 8 and at most --image_size", self.tokenizer_size)
        if self.mask_ratio is not None and not 0 < self.mask_ratio < 1:
            fail("--mask_ratio", "in (0, 1)", self.mask_ratio)
        check_positive_ints(self, ("min_mask_patches",))
        if self.tube_range is not None and not 0 <= self.tube_range[0] <= self.tube_range[1] <= 1:
            fail("--tube_range", "LOW HIGH with 0 <= LOW <= HIGH <= 1", list(self.tube_range))
        check_unit_interval(self, ("flip_prob",))
        check_non_negative(self, ("color_jitter",))
        super().__post_init__()


@dataclass
class PretrainingModelArguments(ArgumentGroup):
    _argument_group_name = "model"

    swin2d_checkpoint: str | None = HfArg(
        default=None, help="Initialise from a 2D Swin image checkpoint (official inflation)."
    )
    target: Literal["tokenizer", "hog", "pixel"] | None = HfArg(
        default=None,
        help="What masked positions predict: tokenizer (visual-token ids of --tokenizer_name_or_path, the paper's), "
        "hog (per-patch histograms of oriented gradients, MaskFeat) or pixel (per-patch normalised pixels, MAE). "
        "A --model_name_or_path model keeps its own unless given; a tokenizer flag alone implies tokenizer.",
    )
    tokenizer_name_or_path: str | None = HfArg(
        default=None,
        help="BEVTVisualTokenizer folder (--target tokenizer): converted DALL-E encoder (python -m bevt.convert) or "
        "one trained with run_tokenizer_training.py.",
    )
    random_tokenizer: bool = HfArg(
        default=False,
        help="--target tokenizer with a RANDOM-weight tokenizer (tests only: its targets mean nothing).",
    )
    freeze_video_patch_embedding: bool | None = HfArg(
        default=None,
        metadata={"nargs": "?", "const": True},  # the bare flag means true, as for the other booleans
        help="Keep the video patch embedding (the Conv3d over 2-frame tubelets) at its initial weights, as MoCo v3 "
        "freezes its patch projection (`--freeze_video_patch_embedding false` trains it). Measured (BENCHMARKS.md, "
        "Transfer): on the tiny demo model, pixel / token targets make the trained Conv3d average the two frames "
        "of each tubelet, and fine-tuning on a motion task then fails.",
    )
    video_loss_weight: float = HfArg(default=1.0, help="Weight of the video loss (joint stage).")
    image_loss_weight: float = HfArg(default=1.0, help="Weight of the image loss.")

    def __post_init__(self) -> None:
        check_non_negative(self, ("video_loss_weight", "image_loss_weight"))
        if self.model_name_or_path and self.swin2d_checkpoint:
            expected = "omitted when --model_name_or_path is given (choose one initialisation)"
            fail("--swin2d_checkpoint", expected, self.swin2d_checkpoint)
        if self.swin2d_checkpoint is not None and not os.path.isfile(self.swin2d_checkpoint):
            fail("--swin2d_checkpoint", "an existing file", self.swin2d_checkpoint)
        super().__post_init__()


@dataclass
class PretrainingScheduleArguments(ArgumentGroup):
    _argument_group_name = "schedule"

    warmup_ratio: float | None = HfArg(
        default=None,
        help="Warmup as a fraction of the training steps (run_finetuning.py counts it in epochs: --warmup_epochs).",
    )

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            fail("--warmup_ratio", "in [0, 1)", self.warmup_ratio)
        super().__post_init__()


@dataclass
class PretrainingTrackingArguments(ArgumentGroup):
    _argument_group_name = "tracking"

    log_sample_keys: bool = HfArg(
        default=False,
        help="Append the keys of the samples each rank trains on to <output_dir>/sample_keys_rank<R>.txt.",
    )
    visualize_steps: int | None = HfArg(
        default=None,
        help="Every N optimizer steps, and at the end, a PNG per stream under <output_dir>/visualizations/ (input, "
        "mask, targets, prediction at the masked patches; also TensorBoard images with --with_tracking). Unset: at "
        "the end only; 0: never.",
    )

    def __post_init__(self) -> None:
        if self.visualize_steps is not None and (
            isinstance(self.visualize_steps, bool) or self.visualize_steps < 0
        ):
            fail("--visualize_steps", "a non-negative integer (0: no pictures)", self.visualize_steps)
        super().__post_init__()


@dataclass
class PretrainingArguments(
    RecipeArguments,
    PretrainingDataArguments,
    DataLoadingArguments,
    ModelArguments,
    PretrainingModelArguments,
    ComputeArguments,
    OptimizerArguments,
    ScheduleArguments,
    PretrainingScheduleArguments,
    CheckpointArguments,
    TrackingArguments,
    PretrainingTrackingArguments,
    HubArguments,
    RunControlArguments,
):
    """Every flag of `run_pretraining.py` (`python run_pretraining.py --help`)."""

    demo: bool = field(default=False, init=False)  # no data flags: the built-in demo
    target_given: bool = field(default=False, init=False)  # --target given (else the recipe's / the model's)
    drop_path_rate_given: bool = field(default=False, init=False)  # a loaded model keeps its own otherwise

    none_display = {
        "tokenizer_size": "image_size // 2",
        "max_train_steps": "from --num_train_epochs",
        "num_train_epochs": "unused",
        "torch_threads": "torch's choice",
        "visualize_steps": "at the end only",
    }
    help_overrides = {
        "model_name_or_path": "Start from a saved BEVT folder (e.g. the stage-1 output).",
        "drop_path_rate": "Stochastic depth of a new model (a --model_name_or_path model keeps its own unless given).",
        "learning_rate": "Peak learning rate (the recipe's 5e-4 is for 32 GPUs x 64 images; scale linearly with the "
        "total batch).",
        "num_warmup_steps": "Warmup steps (overrides --warmup_ratio).",
        "num_train_epochs": "Epochs over the video shards (joint) or image shards (image stage); needs "
        "dataset_info.json next to the shards.",
    }

    @classmethod
    def help_recipes(cls) -> tuple[dict[str | None, Recipe], Recipe]:
        return {None: PRETRAINING_RECIPE}, PRETRAINING_DEMO

    @property
    def recipe(self) -> PretrainingRecipe:
        return PRETRAINING_DEMO if self.demo else PRETRAINING_RECIPE

    def __post_init__(self) -> None:
        self.demo = self.video_shards is None and self.image_shards is None
        self.drop_path_rate_given = self.drop_path_rate is not None
        given = self.fill_from(self.recipe)
        self.target_given = "target" in given
        self._check_target_flags(given)
        if self.tokenizer_size is None:
            self.tokenizer_size = self.image_size // 2
        if not self.demo:
            if self.image_shards is None:
                fail("--image_shards", "given (both stages train on images)", None)
            if self.stage == "joint" and self.video_shards is None:
                fail("--video_shards", "given with --stage joint (or use --stage image)", None)
            if self.stage == "image" and self.video_shards is not None:
                expected = "omitted with --stage image (stage 1 trains on images only)"
                fail("--video_shards", expected, self.video_shards)
        if self.stage == "joint" and self.video_loss_weight == 0 and self.image_loss_weight == 0:
            fail("--video_loss_weight/--image_loss_weight", "not both 0", 0)
        if self.stage == "image" and self.image_loss_weight == 0:
            fail("--image_loss_weight", "> 0 with --stage image (the only loss)", self.image_loss_weight)
        super().__post_init__()

    def _check_target_flags(self, given: set[str]) -> None:
        """Tokenizer flags belong to `--target tokenizer`: with hog/pixel they are an error naming both flags;
        without `--target` they select it (e.g. the demo with `--tokenizer_name_or_path`)."""
        tokenizer_flags = [
            flag
            for flag, is_set in (
                ("--tokenizer_name_or_path", self.tokenizer_name_or_path is not None),
                ("--random_tokenizer", self.random_tokenizer),
                ("--tokenizer_size", "tokenizer_size" in given),
            )
            if is_set
        ]
        if not tokenizer_flags:
            return
        if self.target_given and self.target != "tokenizer":
            raise UsageError(
                f"{tokenizer_flags[0]} is a tokenizer flag: it cannot be combined with --target {self.target} "
                f"({self.target} targets are computed from the pixels, without a tokenizer); drop "
                f"{tokenizer_flags[0]} or use --target tokenizer"
            )
        self.target = "tokenizer"
        if self.tokenizer_name_or_path is not None and self.random_tokenizer:
            raise UsageError(
                "--random_tokenizer and --tokenizer_name_or_path are exclusive (random weights or a trained tokenizer)"
            )
        if self.tokenizer_name_or_path is not None:
            check_local_source("--tokenizer_name_or_path", self.tokenizer_name_or_path)

    def data_config(self) -> PretrainingDataConfig:
        """The resolved data settings: no tokenizer copy of the frames unless the targets come from a tokenizer
        (HOG / pixel targets are computed from the model input)."""
        config = PretrainingDataConfig.from_values(self)
        if self.target != "tokenizer":
            config = dataclasses.replace(config, tokenizer_size=0)
        return config


