"""The arguments of `run_finetuning.py` and its recipes: k400, ssv2, diving48 and the built-in demo.

A recipe (`FinetuningRecipe`) holds the official BEVT fine-tuning values of a dataset
(`configs/recognition/swin/*bevt_finetune*.py`) for every flag it sets, plus the architecture changes the official
recipe makes to the pretrained model it starts from (`pretrained_changes`). `--recipe` picks one; without
`--train_shards` (and without `--do_eval_only`) the demo recipe applies. A flag given on the command line always
wins. With `--model_name_or_path`, the model keeps its own window, frames, image size and drop path unless a flag
(or one of the recipe's `pretrained_changes`) changes them (`bevt.finetuning.resolve_architecture`).

The official repository has no Diving48 config: `DIVING48` is the ssv2 recipe (temporal data: uniform sampling, no
flip) for Diving48's 48 classes; see the README's recipe table for where each value comes from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers.hf_argparser import HfArg

from ..configuration_bevt import BEVTConfig
from ..data.storage import is_url
from ..finetuning import (
    ARCHITECTURE_FIELDS,
    ArchitectureChoice,
    RecipeChange,
    resolve_architecture,
    skipped_recipe_changes,
)
from ..frame_sampling import SAMPLING_MODES
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
    check_model_folder,
    check_non_negative,
    check_positive_ints,
    check_unit_interval,
    fail,
    load_error,
    parse_config_overrides,
)

__all__ = [
    "DATASET_DISPLAY_NAMES",
    "DEMO",
    "DIVING48",
    "FINETUNING_RECIPES",
    "FinetuningArguments",
    "FinetuningRecipe",
    "K400",
    "METRICS",
    "SSV2",
]

METRICS = ("top1_accuracy", "top5_accuracy", "mean_class_accuracy")
DATASET_DISPLAY_NAMES = {
    "kinetics400": "Kinetics-400",
    "something-something-v2": "Something-Something v2",
    "diving48": "Diving48",
    "bevt-synthetic-temporal": "BEVT synthetic temporal demo",
}


@dataclass(frozen=True)
class FinetuningRecipe(Recipe):
    """The values of the flags a fine-tuning recipe sets, and what it changes in a pretrained model."""

    name: str = field(metadata={"flag": False})
    based_on: str | None = field(
        metadata={"flag": False}
    )  # shown in --help only where it differs from that one
    num_labels: int | None = field(
        metadata={"flag": False}
    )  # the dataset's classes (a warning when they differ)
    pretrained_changes: Mapping[str, RecipeChange] = field(metadata={"flag": False})
    model_preset: str
    num_frames: int
    frame_interval: int
    sampling: str
    image_size: int
    short_side: int
    crop_scale: tuple[float, float]
    window_size: tuple[int, int, int]
    drop_path_rate: float
    classifier_dropout: float
    flip_prob: float
    randaug: tuple[int, int] | None
    random_erasing: float
    label_smoothing: float
    ema_decay: float
    learning_rate: float
    weight_decay: float
    layer_decay: float
    backbone_lr_multiplier: float
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    num_train_epochs: float
    warmup_epochs: float
    max_grad_norm: float
    eval_num_clips: int
    eval_num_crops: int
    per_device_eval_batch_size: int
    dataset_name: str | None  # None: the card names no dataset unless --dataset_name is given
    output_dir: str
    checkpointing_steps: int
    logging_steps: int
    num_workers: int
    shuffle_buffer: int
    torch_threads: int | None


# swin_base_patch244_window877_bevt_finetune_k400.py (8 GPUs x 8 clips x accumulation 4).
K400 = FinetuningRecipe(
    name="k400",
    based_on=None,
    num_labels=400,
    pretrained_changes={
        "num_frames": RecipeChange(16, 32, "the official K400 fine-tuning uses 32-frame clips")
    },
    model_preset="base",
    num_frames=32,
    frame_interval=2,
    sampling="dense",
    image_size=224,
    short_side=256,
    crop_scale=(0.08, 1.0),
    window_size=(8, 7, 7),
    drop_path_rate=0.3,
    classifier_dropout=0.5,
    flip_prob=0.5,
    randaug=None,
    random_erasing=0.0,
    label_smoothing=0.0,
    ema_decay=0.0,
    learning_rate=3e-4,
    weight_decay=0.001,
    layer_decay=0.9,
    backbone_lr_multiplier=1.0,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=4,
    num_train_epochs=60.0,
    warmup_epochs=2.5,
    max_grad_norm=40.0,
    eval_num_clips=4,
    eval_num_crops=3,
    per_device_eval_batch_size=1,
    dataset_name=None,
    output_dir="bevt-finetuned-k400",
    checkpointing_steps=1000,
    logging_steps=50,
    num_workers=8,
    shuffle_buffer=1000,
    torch_threads=None,
)
# swin_base_patch244_window1677_bevt_finetune_ssv2.py (8 GPUs x 8 clips x accumulation 8).
SSV2 = dataclasses.replace(
    K400,
    name="ssv2",
    num_labels=174,
    pretrained_changes={
        "num_frames": RecipeChange(16, 32, "the official SSv2 fine-tuning uses 32-frame clips"),
        "window_size": RecipeChange(
            (8, 7, 7), (16, 7, 7), "the official SSv2 fine-tuning uses a 16x7x7 window"
        ),
        "drop_path_rate": RecipeChange(0.3, 0.4, "the official SSv2 fine-tuning uses drop path 0.4"),
    },
    sampling="uniform",
    window_size=(16, 7, 7),
    drop_path_rate=0.4,
    flip_prob=0.0,
    randaug=(4, 7),
    random_erasing=0.25,
    label_smoothing=0.1,
    ema_decay=0.9998,
    learning_rate=5e-4,
    weight_decay=0.05,
    layer_decay=1.0,
    backbone_lr_multiplier=0.1,
    gradient_accumulation_steps=8,
    max_grad_norm=0.0,
    eval_num_clips=1,
    dataset_name=None,
    output_dir="bevt-finetuned-ssv2",
)
# Diving48 (48 dive classes; like SSv2, telling them apart needs the order of the frames). The official repository
# ships no Diving48 config and we could not check a Diving48 hyper-parameter in the paper's text: every value is
# the ssv2 recipe's (uniform sampling, no flip, 16x7x7 window, ...); only the labels and the names differ.
DIVING48 = dataclasses.replace(
    SSV2,
    name="diving48",
    based_on="ssv2",
    num_labels=48,
    pretrained_changes={
        name: RecipeChange(
            change.source, change.target, change.reason + " (diving48 follows the ssv2 recipe)"
        )
        for name, change in SSV2.pretrained_changes.items()
    },
    dataset_name=None,
    output_dir="bevt-finetuned-diving48",
)
# No data flags: a tiny model learns the synthetic temporal classes of bevt.data.demo_finetuning on a CPU.
DEMO = dataclasses.replace(
    K400,
    name="demo",
    num_labels=None,
    pretrained_changes={},
    model_preset="test",
    num_frames=8,
    sampling="uniform",
    image_size=32,
    short_side=36,
    crop_scale=(0.6, 1.0),
    window_size=(4, 2, 2),
    drop_path_rate=0.0,
    classifier_dropout=0.0,
    flip_prob=0.0,  # a flip turns "left to right" into "right to left"
    label_smoothing=0.1,
    learning_rate=1e-3,
    weight_decay=0.05,
    layer_decay=1.0,
    per_device_train_batch_size=16,
    gradient_accumulation_steps=1,
    num_train_epochs=12.0,
    warmup_epochs=1.0,
    max_grad_norm=5.0,
    eval_num_clips=2,
    eval_num_crops=1,
    per_device_eval_batch_size=16,
    dataset_name="bevt-synthetic-temporal",
    output_dir="outputs/bevt-finetuning-demo",
    checkpointing_steps=300,
    logging_steps=25,
    num_workers=1,  # decoding in a worker process while the main process computes
    shuffle_buffer=256,
    torch_threads=1,  # a tiny model gains nothing from intra-op threads; 2 threads on 2 busy cores thrash
)
FINETUNING_RECIPES: dict[str, FinetuningRecipe] = {r.name: r for r in (K400, SSV2, DIVING48, DEMO)}


@dataclass
class FinetuningDataArguments(ArgumentGroup):
    _argument_group_name = "data"

    train_shards: list[str] | None = HfArg(
        default=None, help="Training video shards: globs, folders or files."
    )
    validation_shards: list[str] | None = HfArg(
        default=None, help="Validation video shards (evaluated every epoch)."
    )
    label_names: str | None = HfArg(
        default=None,
        help="Text file of class names, one per line in label-index order (default: labels.txt or "
        "dataset_info.json next to the training shards; for --do_eval_only the model's id2label).",
    )
    recipe: Literal["k400", "ssv2", "diving48"] = HfArg(
        default="k400",
        help="Official defaults to start from (diving48 is the ssv2 recipe for Diving48; the flags below show its "
        "value only where it differs from ssv2's).",
    )
    num_frames: int | None = HfArg(
        default=None,
        help="Frames per clip. With --model_name_or_path: the model's own unless given (the recipes turn the "
        "official 16-frame pretraining into 32). From scratch:",
    )
    frame_interval: int | None = HfArg(default=None, help="Stride between frames in dense sampling.")
    sampling: str | None = HfArg(
        default=None,
        help="dense: clip_len x interval; uniform: one frame per segment.",
        metadata={"choices": SAMPLING_MODES},
    )
    image_size: int | None = HfArg(
        default=None, help="Crop size. With --model_name_or_path: the model's own unless given. From scratch:"
    )
    short_side: int | None = HfArg(default=None, help="Training short side before the random resized crop.")
    crop_scale: tuple[float, float] | None = HfArg(
        default=None, help="Area range of the random resized crop.", metadata={"metavar": ("LOW", "HIGH")}
    )
    flip_prob: float | None = HfArg(default=None, help="Horizontal flip probability.")
    randaug: list[str] | None = HfArg(
        default=None, help="RandAugment ops and magnitude, or 'none'.", metadata={"metavar": "N M"}
    )
    random_erasing: float | None = HfArg(default=None, help="Random erasing probability.")
    mixup: float = HfArg(default=0.0, help="Mixup alpha (0 disables).")
    cutmix: float = HfArg(default=0.0, help="CutMix alpha (0 disables).")
    label_smoothing: float | None = HfArg(default=None, help="Label smoothing of the targets.")
    per_device_train_batch_size: int | None = HfArg(default=None, help="Clips per device per micro-step.")

    def __post_init__(self) -> None:
        check_positive_ints(
            self, ("num_frames", "frame_interval", "image_size", "short_side", "per_device_train_batch_size")
        )
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            fail("--crop_scale", "LOW HIGH with 0 < LOW <= HIGH <= 1", list(self.crop_scale))
        check_unit_interval(self, ("flip_prob", "random_erasing"))
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 1:
            fail("--label_smoothing", "in [0, 1)", self.label_smoothing)
        if isinstance(self.randaug, tuple) and not (self.randaug[0] >= 1 and 0 <= self.randaug[1] <= 30):
            fail("--randaug", "N >= 1 and 0 <= M <= 30 (or 'none')", list(self.randaug))
        check_non_negative(self, ("mixup", "cutmix"))
        super().__post_init__()


@dataclass
class FinetuningEvaluationArguments(ArgumentGroup):
    _argument_group_name = "evaluation"

    eval_num_clips: int | None = HfArg(default=None, help="Clips per validation video.")
    eval_num_crops: Literal[1, 3] | None = HfArg(
        default=None, help="Crops per clip (1 centre, 3 along the long side)."
    )
    eval_short_side: int | None = HfArg(
        default=None,
        help="Short side before the test crops (default: image_size with 3 crops, image_size * 256/224 with 1).",
    )
    per_device_eval_batch_size: int | None = HfArg(
        default=None, help="Validation videos per forward (each with all its views)."
    )
    max_eval_views_per_forward: int | None = HfArg(
        default=None, help="Split the views of a batch (memory bound)."
    )
    eval_every_epochs: float = HfArg(default=1.0, help="Evaluate every this many epochs (and at the end).")
    eval_steps: int | None = HfArg(default=None, help="Evaluate every N optimizer steps (overrides epochs).")
    metric_for_best_model: str = HfArg(
        default="top1_accuracy", help="Metric that picks the best model.", metadata={"choices": METRICS}
    )
    final_model: Literal["best", "last"] = HfArg(
        default="best", help="Weights exported to --output_dir: the best evaluated ones or the last ones."
    )
    do_eval_only: bool = HfArg(
        default=False,
        help="Evaluate --model_name_or_path on --validation_shards; write eval_results.json and "
        "confusion_matrix.png to --output_dir.",
    )

    def __post_init__(self) -> None:
        check_positive_ints(
            self,
            (
                "eval_num_clips",
                "eval_short_side",
                "per_device_eval_batch_size",
                "eval_steps",
                "max_eval_views_per_forward",
            ),
        )
        if not self.eval_every_epochs > 0:
            fail("--eval_every_epochs", "> 0", self.eval_every_epochs)
        super().__post_init__()


@dataclass
class FinetuningModelArguments(ArgumentGroup):
    _argument_group_name = "model"

    window_size: tuple[int, int, int] | None = HfArg(
        default=None,
        help="Attention window. With --model_name_or_path: the model's own unless given (ssv2 turns the official "
        "8x7x7 into 16x7x7); a different window resizes its bias tables. From scratch:",
        metadata={"metavar": ("D", "H", "W")},
    )
    classifier_dropout: float | None = HfArg(default=None, help="Dropout before the classifier.")

    def __post_init__(self) -> None:
        if self.window_size is not None and any(w < 1 for w in self.window_size):
            fail("--window_size", "three positive integers", list(self.window_size))
        if self.classifier_dropout is not None and not 0 <= self.classifier_dropout < 1:
            fail("--classifier_dropout", "in [0, 1)", self.classifier_dropout)
        super().__post_init__()


@dataclass
class FinetuningOptimizerArguments(ArgumentGroup):
    _argument_group_name = "optimizer"

    layer_decay: float | None = HfArg(
        default=None, help="Layer-wise lr decay per block from the top (1 disables)."
    )
    backbone_lr_multiplier: float | None = HfArg(
        default=None, help="lr of every backbone parameter relative to the classifier."
    )
    ema_decay: float | None = HfArg(
        default=None, help="EMA of the weights, evaluated and exported when on (0 disables)."
    )

    def __post_init__(self) -> None:
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            fail("--layer_decay", "in (0, 1]", self.layer_decay)
        check_non_negative(self, ("backbone_lr_multiplier",))
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            fail("--ema_decay", "in [0, 1) (0 disables)", self.ema_decay)
        super().__post_init__()


@dataclass
class FinetuningScheduleArguments(ArgumentGroup):
    _argument_group_name = "schedule"

    warmup_epochs: float | None = HfArg(
        default=None, help="Linear warmup, in epochs (not a fraction as the other scripts' --warmup_ratio)."
    )

    def __post_init__(self) -> None:
        check_non_negative(self, ("warmup_epochs",))
        super().__post_init__()


# --linear_probe: the MAE / VideoMAE protocol trains only a BatchNorm + linear head on frozen features, without
# regularisation; these recipe values are replaced unless given as flags.
LINEAR_PROBE_DEFAULTS: dict[str, Any] = {
    "classifier_dropout": 0.0,
    "label_smoothing": 0.0,
    "random_erasing": 0.0,
    "randaug": None,
    "weight_decay": 0.0,
    "ema_decay": 0.0,
}


@dataclass
class FinetuningProtocolArguments(ArgumentGroup):
    _argument_group_name = "representation evaluation (frozen backbone, few labels)"

    linear_probe: bool = HfArg(
        default=False,
        help="Linear probing (MAE / VideoMAE protocol): the backbone is frozen (and runs in eval mode), a BatchNorm "
        "without affine parameters + the linear classifier are trained on the pooled features; the exported model "
        "folds the BatchNorm into the linear layer (a plain BEVTForVideoClassification). Unless given, "
        "--classifier_dropout, --label_smoothing, --random_erasing, --weight_decay, --ema_decay are 0 and "
        "--randaug none.",
    )
    freeze_backbone: bool = HfArg(
        default=False,
        help="Train the classifier only: the backbone is frozen and runs in eval mode (no drop path).",
    )
    max_train_samples: int | None = HfArg(
        default=None,
        help="Fine-tune on a fixed, seeded subset of N labelled training clips, as even over the classes as "
        "possible (chosen by --seed), written once to <output_dir>/train_subset (subset.json lists the clips).",
    )
    train_fraction: float | None = HfArg(
        default=None, help="Like --max_train_samples, as a fraction in (0, 1] of the labelled training clips."
    )

    def __post_init__(self) -> None:
        check_positive_ints(self, ("max_train_samples",))
        if self.train_fraction is not None and not 0 < self.train_fraction <= 1:
            fail("--train_fraction", "in (0, 1]", self.train_fraction)
        if self.max_train_samples is not None and self.train_fraction is not None:
            fail("--train_fraction", "omitted with --max_train_samples (one subset size)", self.train_fraction)
        super().__post_init__()

    @property
    def frozen_backbone(self) -> bool:
        return self.linear_probe or self.freeze_backbone

    @property
    def protocol(self) -> str:
        if self.linear_probe:
            return "linear probe (frozen backbone, BatchNorm + linear classifier)"
        return "classifier only (frozen backbone)" if self.freeze_backbone else "full fine-tuning"


@dataclass
class ModelCardArguments(ArgumentGroup):
    _argument_group_name = "hub"

    dataset_name: str | None = HfArg(
        default=None,
        help="Dataset id the model card claims (`datasets`, `model-index`), e.g. kinetics400, "
        "something-something-v2, diving48. Not given: the dataset_name the shards' dataset_info.json records "
        "(make_shards --dataset-name), else the card names no dataset (recipes do not claim one).",
    )
    base_model: str | None = HfArg(
        default=None,
        help="Hub id of the starting model for the card (default: --model_name_or_path when it is not a local folder).",
    )


def _parse_randaug(values: list[str]) -> tuple[int, int] | None:
    if values == ["none"]:
        return None
    try:
        n, m = (int(v) for v in values)
    except ValueError:
        fail("--randaug", "two integers N M (e.g. 4 7) or 'none'", values)
    return (n, m)


def pretrained_config(name_or_path: str) -> BEVTConfig:
    """The config of the `--model_name_or_path` folder (its architecture is kept), or a clear error."""
    check_model_folder("--model_name_or_path", name_or_path, BEVTConfig.model_type, "a BEVT model folder")
    try:
        config = BEVTConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError) as err:
        raise load_error("--model_name_or_path", name_or_path, err) from None
    if getattr(config, "model_type", None) != BEVTConfig.model_type:
        raise UsageError(
            f"--model_name_or_path {name_or_path}: not a BEVT model (model_type {config.model_type!r})"
        )
    return config


@dataclass
class FinetuningArguments(
    RecipeArguments,
    FinetuningDataArguments,
    DataLoadingArguments,
    FinetuningEvaluationArguments,
    ModelArguments,
    FinetuningModelArguments,
    ComputeArguments,
    OptimizerArguments,
    FinetuningOptimizerArguments,
    ScheduleArguments,
    FinetuningScheduleArguments,
    FinetuningProtocolArguments,
    CheckpointArguments,
    TrackingArguments,
    HubArguments,
    ModelCardArguments,
    RunControlArguments,
):
    """Every flag of `run_finetuning.py` (`python run_finetuning.py --help`)."""

    demo: bool = field(default=False, init=False)  # no --train_shards (and not --do_eval_only): the demo
    active_recipe: FinetuningRecipe = field(default=K400, init=False, repr=False)
    architecture: dict[str, ArchitectureChoice] = field(default_factory=dict, init=False, repr=False)
    skipped_recipe_changes: list[str] = field(default_factory=list, init=False, repr=False)

    none_display = {"torch_threads": "torch's choice", "dataset_name": "none (no dataset claimed)"}
    help_overrides = {
        "model_name_or_path": "Start from a BEVT folder: run_pretraining.py output, a converted checkpoint, a "
        "fine-tuned model.",
        "drop_path_rate": "Stochastic depth. With --model_name_or_path: the model's own unless given (ssv2 turns the "
        "official 0.3 into 0.4). From scratch:",
        "learning_rate": "Peak lr of the classifier (the recipes' values are for 8 GPUs x 8 clips x accumulation).",
        "output_dir": "Exported model and checkpoints.",
        "num_warmup_steps": "Warmup steps (overrides --warmup_epochs).",
        "num_workers": "Data-loading worker processes per rank (capped at its shards).",
    }

    @classmethod
    def help_recipes(cls) -> tuple[dict[str | None, Recipe], Recipe]:
        return {"k400": K400, "ssv2": SSV2, "diving48": DIVING48}, DEMO

    def __post_init__(self) -> None:
        if self.do_eval_only:
            if not self.model_name_or_path:
                fail("--model_name_or_path", "given with --do_eval_only (the model to evaluate)", None)
            if not self.validation_shards:
                fail("--validation_shards", "given with --do_eval_only", None)
        if "num_labels" in parse_config_overrides(self.config_overrides):
            fail("--config_overrides", "without num_labels (the classes come from the data)", self.config_overrides)
        self.demo = self.train_shards is None and not self.do_eval_only
        if self.demo and self.validation_shards:
            expected = "given together with --train_shards (without both, the demo uses its own data)"
            fail("--validation_shards", expected, self.validation_shards)
        recipe = DEMO if self.demo else FINETUNING_RECIPES[self.recipe]
        self.active_recipe = recipe
        flags = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS if getattr(self, name) is not None}
        randaug, self.randaug = self.randaug, None
        given = self.fill_from(recipe)
        if randaug is not None:
            self.randaug, given = _parse_randaug(randaug), given | {"randaug"}
        if self.do_eval_only and "output_dir" not in given:
            self.output_dir = "bevt-eval"
        if self.do_eval_only and (self.frozen_backbone or self.max_train_samples or self.train_fraction):
            fail("--do_eval_only", "without the training flags --linear_probe, --freeze_backbone, "
                 "--max_train_samples, --train_fraction", True)  # fmt: skip
        if self.linear_probe:
            for name, value in LINEAR_PROBE_DEFAULTS.items():
                if name not in given:
                    setattr(self, name, value)
            if self.per_device_train_batch_size < 2:
                fail("--per_device_train_batch_size", ">= 2 with --linear_probe (its BatchNorm needs a batch)",
                     self.per_device_train_batch_size)  # fmt: skip

        # the architecture: a pretrained model's own unless given (evaluation takes the folder's model as it is)
        pretrained = pretrained_config(self.model_name_or_path) if self.model_name_or_path else None
        if self.do_eval_only:
            saved_as = pretrained.architectures or []
            if saved_as and "BEVTForVideoClassification" not in saved_as:
                fail("--model_name_or_path", "a video classifier (BEVTForVideoClassification) with --do_eval_only: "
                     f"{self.model_name_or_path} is a {saved_as[0]} without a classifier (fine-tune it first)",
                     self.model_name_or_path)  # fmt: skip
            pretrained = None
        self.architecture = resolve_architecture(
            pretrained, flags, recipe.values(), recipe.pretrained_changes, recipe_name=recipe.name
        )
        if pretrained is not None:
            self.skipped_recipe_changes = skipped_recipe_changes(
                pretrained, flags, recipe.pretrained_changes, recipe_name=recipe.name
            )
        for name, choice in self.architecture.items():
            setattr(self, name, choice.value)
        if self.do_eval_only:
            self._clip_settings_from_folder(given)
        if "short_side" not in given and self.image_size != recipe.image_size:
            # the recipe's short side is for its crop size: keep the same ratio for the model's own size
            self.short_side = round(recipe.short_side * self.image_size / recipe.image_size)
        if self.eval_short_side is None:
            self.eval_short_side = (
                self.image_size if self.eval_num_crops == 3 else round(self.image_size * 256 / 224)
            )
        if self.eval_short_side < self.image_size:
            fail("--eval_short_side", f">= --image_size ({self.image_size})", self.eval_short_side)
        if self.label_names is not None and not is_url(self.label_names) and not os.path.isfile(self.label_names):
            fail("--label_names", "an existing text file (one class name per line)", self.label_names)
        super().__post_init__()

    def _clip_settings_from_folder(self, given: set[str]) -> None:
        """--do_eval_only: the clip settings of the model folder's video processor, unless given as flags."""
        path = Path(self.model_name_or_path) / "video_preprocessor_config.json"
        if not path.is_file():
            return
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UsageError(
                f"--model_name_or_path {self.model_name_or_path}: unreadable {path.name}: {err}"
            ) from None
        for key, name in (
            ("num_frames", "num_frames"),
            ("frame_interval", "frame_interval"),
            ("sampling_mode", "sampling"),
        ):
            if key in saved and name not in given:
                setattr(self, name, saved[key])
        crop = (saved.get("crop_size") or {}).get("height")
        if crop and "image_size" not in given:
            self.image_size = int(crop)

    def model_updates(self) -> dict[str, Any]:
        """The config fields a fine-tuning run sets on its model."""
        return {
            "window_size": self.window_size,
            "num_frames": self.num_frames,
            "image_size": self.image_size,
            "drop_path_rate": self.drop_path_rate,
            "classifier_dropout": self.classifier_dropout,
        }

    def video_processor(self, short_side: int | None = None, num_crops: int = 1) -> Any:
        """The `BEVTVideoProcessor` of the run's clips: single view (the exported folder's, for the pipeline) or the
        multi-view evaluation's (`short_side`, `num_crops`)."""
        from ..processing_bevt import BEVTVideoProcessor

        return BEVTVideoProcessor(
            num_frames=self.num_frames,
            frame_interval=self.frame_interval,
            sampling_mode=self.sampling,
            num_crops=num_crops,
            size={"shortest_edge": short_side or round(self.image_size * 256 / 224)},
            crop_size={"height": self.image_size, "width": self.image_size},
        )

    def card_start(self) -> str:
        """What the run started from, for the card: a Hub id, or a local folder by its name (no local paths)."""
        if not self.model_name_or_path:
            overrides = f", {self.config_overrides}" if self.config_overrides else ""
            return f"scratch ({self.model_preset} preset{overrides})"
        if os.path.exists(self.model_name_or_path):
            return f"a local folder `{Path(self.model_name_or_path).resolve().name}`"
        return self.model_name_or_path

    def card_eval_dataset(self) -> Any:
        """The card's evaluation dataset: `--dataset_name`, or, not given, the run's shards without a dataset claim."""
        from ..modelcard import EvalDataset

        if self.dataset_name:
            name = DATASET_DISPLAY_NAMES.get(self.dataset_name, self.dataset_name)
            return EvalDataset(name, self.dataset_name, "validation")
        return EvalDataset("the run's validation shards (no --dataset_name given)", None)

    def card_hyperparameters(self, schedule: Any, num_processes: int) -> dict[str, Any]:
        """The training hyperparameters the model card lists."""
        total_batch = self.per_device_train_batch_size * num_processes * self.gradient_accumulation_steps
        return {
            "start": self.card_start(),
            "clip": f"{self.num_frames} frames, {self.sampling} sampling"
            + (f", interval {self.frame_interval}" if self.sampling == "dense" else ""),
            "optimizer": f"AdamW lr {self.learning_rate:g}, betas ({self.adam_beta1}, {self.adam_beta2}), "
            f"weight decay {self.weight_decay:g}",
            "layer-wise lr decay": self.layer_decay,
            "backbone lr multiplier": self.backbone_lr_multiplier,
            "schedule": f"{self.lr_scheduler_type}, {schedule.num_warmup_steps} warmup steps, {schedule.max_train_steps} steps",
            "total batch": f"{total_batch} ({num_processes} processes x {self.per_device_train_batch_size} x "
            f"{self.gradient_accumulation_steps} accumulation)",
            "window": self.architecture["window_size"].card_text(),
            "frames per clip": self.architecture["num_frames"].card_text(),
            "input size": self.architecture["image_size"].card_text(),
            "drop path": self.architecture["drop_path_rate"].card_text(),
            "protocol": self.protocol,
            "augmentation": f"random resized crop {self.crop_scale}, flip {self.flip_prob}, RandAugment "
            f"{self.randaug or 'none'}, random erasing {self.random_erasing}, mixup {self.mixup}, cutmix {self.cutmix}",
            "label smoothing": self.label_smoothing,
            "EMA": self.ema_decay or "off",
            "gradient clipping": self.max_grad_norm or "off",
            "seed": self.seed,
        }
