"""The arguments of `run_tokenizer_training.py` and its two recipes: training on your data, and the built-in demo.

`TokenizerArguments` is the shared groups of `bevt.training.arguments` plus the tokenizer's data, architecture and
objective groups. Without `--image_shards` and `--video_shards` the run is the demo (a tiny tokenizer on the
pretraining demo's synthetic images, usable as the targets of `run_pretraining.py`'s demo): every flag the recipes
set and that is not given takes the demo's value, otherwise the recipe's (`TOKENIZER_RECIPE`). The architecture and
objective map onto `bevt.tokenizer_training.tokenizer_config_for_training` and `TokenizerTrainingArguments`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers.hf_argparser import HfArg

from ..configuration_tokenizer import BEVTVisualTokenizerConfig
from ..tokenizer_training import TokenizerTrainingArguments, tokenizer_config_for_training
from .arguments import (
    ArgumentGroup,
    CheckpointArguments,
    ComputeArguments,
    DataLoadingArguments,
    HubArguments,
    OptimizerArguments,
    Recipe,
    RecipeArguments,
    RunControlArguments,
    ScheduleArguments,
    TrackingArguments,
    check_non_negative,
    check_positive_ints,
    check_unit_interval,
    fail,
)
from .pretraining_arguments import PretrainingScheduleArguments

__all__ = ["TOKENIZER_DEMO", "TOKENIZER_RECIPE", "TokenizerArguments", "TokenizerRecipe"]

# Flags of one method only: giving another value with the other --tokenizer_type is an error.
VQGAN_ONLY = (
    "channel_multipliers", "codebook_dim", "l2_normalize_codes", "reconstruction_loss", "codebook_update",
    "ema_decay", "commitment_weight", "dead_code_threshold", "dead_code_restart_steps", "perceptual_weight",
    "perceptual_weights",
)  # fmt: skip
DALLE_ONLY = ("temperature_start", "temperature_end", "temperature_anneal_steps", "kl_weight", "kl_warmup_steps")


@dataclass(frozen=True)
class TokenizerRecipe(Recipe):
    """Values of the flags whose default depends on the mode (your data or the demo)."""

    name: str = field(metadata={"flag": False})
    image_size: int
    num_frames: int
    frame_interval: int
    crop_scale: tuple[float, float]
    image_batch_size: int
    video_batch_size: int
    held_out_samples: int
    shuffle_buffer: int
    num_workers: int
    vocab_size: int
    width: int
    ema_decay: float
    dead_code_restart_steps: int
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


# BEVT's tokenizer geometry (112 px -> 14x14 ids, 8192 codes like DALL-E's), the VQGAN defaults of
# `bevt.tokenizer_training` (Adam-style lr 2e-4, no weight decay, EMA 0.99) and crops of 25-100% of the frame.
TOKENIZER_RECIPE = TokenizerRecipe(
    name="recipe",
    image_size=112,
    num_frames=4,
    frame_interval=8,
    crop_scale=(0.25, 1.0),
    image_batch_size=32,
    video_batch_size=4,
    held_out_samples=256,
    shuffle_buffer=1000,
    num_workers=4,
    vocab_size=8192,
    width=64,
    ema_decay=0.99,
    dead_code_restart_steps=100,
    learning_rate=2e-4,
    weight_decay=0.0,
    max_grad_norm=1.0,
    gradient_accumulation_steps=1,
    max_train_steps=None,
    num_train_epochs=20.0,
    warmup_ratio=0.01,
    checkpointing_steps=1000,
    logging_steps=50,
    output_dir="bevt-tokenizer",
    torch_threads=None,
)
# No data flags: the pretraining demo's target geometry (preset `test`: 64 px model input -> 32 px tokenizer input,
# 8x -> 4x4 ids, 64 codes) on its synthetic images (crops of 64-100% of the 80 px scenes, as the pretraining demo's
# 64-80 px rescale + 64 px crop). One thread: tiny convolutions run faster on one core (BENCHMARKS.md).
TOKENIZER_DEMO = TokenizerRecipe(
    name="demo",
    image_size=32,
    num_frames=4,
    frame_interval=2,
    crop_scale=(0.64, 1.0),
    image_batch_size=32,
    video_batch_size=4,
    held_out_samples=32,
    shuffle_buffer=64,
    num_workers=0,
    vocab_size=64,
    width=16,
    ema_decay=0.9,
    dead_code_restart_steps=10,
    learning_rate=2e-3,
    weight_decay=0.0,
    max_grad_norm=1.0,
    gradient_accumulation_steps=1,
    max_train_steps=200,
    num_train_epochs=None,
    warmup_ratio=0.0,
    checkpointing_steps=100,
    logging_steps=20,
    output_dir="outputs/bevt-tokenizer-demo",
    torch_threads=1,
)


@dataclass
class TokenizerDataArguments(ArgumentGroup):
    _argument_group_name = "data"

    image_shards: list[str] | None = HfArg(default=None, help="Image .tar shards: globs, folders, files or URLs.")
    video_shards: list[str] | None = HfArg(
        default=None, help="Video .tar shards (frames sampled from clips): globs, folders, files or URLs."
    )
    image_size: int | None = HfArg(
        default=None, help="Tokenizer input size (a multiple of its downsampling; BEVT: half the model's input)."
    )
    num_frames: int | None = HfArg(
        default=None, aliases=["--clip_len"], help="Frames sampled from each clip (dense sampling)."
    )
    frame_interval: int | None = HfArg(default=None, help="Stride between the frames sampled from a clip.")
    crop_scale: tuple[float, float] | None = HfArg(
        default=None, help="Area range of the random resized crop.", metadata={"metavar": ("LOW", "HIGH")}
    )
    flip_prob: float = HfArg(default=0.5, help="Horizontal flip probability.")
    image_batch_size: int | None = HfArg(default=None, help="Images per device per micro-step.")
    video_batch_size: int | None = HfArg(
        default=None, help="Clips per device per micro-step (each gives --num_frames training frames)."
    )
    held_out_samples: int | None = HfArg(
        default=None,
        help="Samples kept out of training for the reconstruction metrics and picture, per shard flag: the first N "
        "of the shards in listed order (centre squares; videos: the middle frame).",
    )
    eval_steps: int | None = HfArg(
        default=None, help="Evaluate on the held-out samples every N optimizer steps (default: only at the end)."
    )

    def __post_init__(self) -> None:
        names = ("image_size", "num_frames", "frame_interval", "image_batch_size", "video_batch_size")
        check_positive_ints(self, (*names, "held_out_samples", "eval_steps"))
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            fail("--crop_scale", "LOW HIGH with 0 < LOW <= HIGH <= 1 (area fractions)", list(self.crop_scale))
        check_unit_interval(self, ("flip_prob",))
        super().__post_init__()


@dataclass
class TokenizerModelArguments(ArgumentGroup):
    _argument_group_name = "tokenizer"

    tokenizer_type: Literal["vqgan", "dall-e"] = HfArg(
        default="vqgan",
        help="vqgan: encoder + nearest-code quantizer + decoder; dall-e: the dVAE (Gumbel-softmax, KL to uniform).",
    )
    tokenizer_name_or_path: str | None = HfArg(
        default=None,
        help="Continue training this BEVTVisualTokenizer folder (it needs a decoder) instead of a new tokenizer; "
        "its architecture flags are then the folder's.",
    )
    vocab_size: int | None = HfArg(default=None, help="Codebook size (the ids BEVT predicts).")
    width: int | None = HfArg(default=None, help="Channels of the first level (DALL-E: n_hid).")
    channel_multipliers: tuple[int, ...] = HfArg(
        default=(1, 1, 2, 2),
        help="VQGAN: width multiplier of each level; L levels downsample 2^(L-1)x (4 levels: 8x, BEVT's 112 -> 14).",
    )
    codebook_dim: int = HfArg(default=8, help="VQGAN: dimension of the codes.")
    l2_normalize_codes: bool = HfArg(
        default=True, help="VQGAN: compare latents and codes on the unit sphere (--no_l2_normalize_codes: off)."
    )

    def __post_init__(self) -> None:
        check_positive_ints(self, ("width", "codebook_dim"))
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or self.vocab_size < 2):
            fail("--vocab_size", "an integer >= 2", self.vocab_size)
        if any(m < 1 for m in self.channel_multipliers):
            fail("--channel_multipliers", "positive integers", list(self.channel_multipliers))
        if self.tokenizer_name_or_path is not None and not os.path.isdir(self.tokenizer_name_or_path):
            fail("--tokenizer_name_or_path", "an existing tokenizer folder", self.tokenizer_name_or_path)
        super().__post_init__()

    @property
    def downsample_factor(self) -> int:
        return 8 if self.tokenizer_type == "dall-e" else 2 ** (len(self.channel_multipliers) - 1)


@dataclass
class TokenizerObjectiveArguments(ArgumentGroup):
    _argument_group_name = "objective"

    reconstruction_loss: Literal["l1", "l2"] = HfArg(default="l1", help="VQGAN: pixel loss on [0, 1] pixels.")
    codebook_update: Literal["ema", "straight-through"] = HfArg(
        default="ema",
        help="VQGAN: moving averages of the assigned latents (ema), or gradients with the codebook loss.",
    )
    ema_decay: float | None = HfArg(default=None, help="VQGAN: decay of the EMA codebook statistics.")
    commitment_weight: float = HfArg(default=0.25, help="VQGAN: weight of the commitment loss.")
    dead_code_threshold: float = HfArg(
        default=0.1, help="VQGAN: a code whose EMA use falls below this fraction of the mean is re-seeded."
    )
    dead_code_restart_steps: int | None = HfArg(
        default=None, help="VQGAN: look for dead codes every N steps (0: never)."
    )
    perceptual_weight: float = HfArg(default=0.0, help="VQGAN: weight of the VGG16 perceptual loss (0: off).")
    perceptual_weights: str | None = HfArg(
        default=None,
        help="VQGAN: a local torchvision vgg16 state dict (default: torchvision's cache, if there; nothing is "
        "downloaded: without weights the perceptual loss is skipped with a warning).",
    )
    temperature_start: float = HfArg(default=1.0, help="DALL-E: Gumbel-softmax temperature at step 0.")
    temperature_end: float = HfArg(default=1 / 16, help="DALL-E: temperature at the end of the annealing.")
    temperature_anneal_steps: int | None = HfArg(
        default=None, help="DALL-E: steps of the cosine temperature annealing (default: the whole run)."
    )
    kl_weight: float = HfArg(default=6.6, help="DALL-E: final weight of the KL to the uniform prior.")
    kl_warmup_steps: int | None = HfArg(
        default=None,
        help="DALL-E: steps of the cosine ramp of the KL weight from 0 (default: 5000, at most a tenth of the run).",
    )

    def __post_init__(self) -> None:
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            fail("--ema_decay", "in [0, 1)", self.ema_decay)
        check_non_negative(
            self,
            ("commitment_weight", "dead_code_threshold", "dead_code_restart_steps", "perceptual_weight",
             "kl_weight", "temperature_anneal_steps", "kl_warmup_steps"),
        )  # fmt: skip
        for name in ("temperature_start", "temperature_end"):
            if not getattr(self, name) > 0:
                fail(f"--{name}", "> 0", getattr(self, name))
        if self.perceptual_weights is not None and not os.path.isfile(self.perceptual_weights):
            fail("--perceptual_weights", "an existing file", self.perceptual_weights)
        super().__post_init__()


@dataclass
class TokenizerArguments(
    RecipeArguments,
    TokenizerDataArguments,
    DataLoadingArguments,
    TokenizerModelArguments,
    TokenizerObjectiveArguments,
    ComputeArguments,
    OptimizerArguments,
    ScheduleArguments,
    PretrainingScheduleArguments,
    CheckpointArguments,
    TrackingArguments,
    HubArguments,
    RunControlArguments,
):
    """Every flag of `run_tokenizer_training.py` (`python run_tokenizer_training.py --help`)."""

    demo: bool = field(default=False, init=False)  # no data flags: the built-in demo

    none_display = {
        "max_train_steps": "from --num_train_epochs",
        "num_train_epochs": "unused",
        "torch_threads": "torch's choice",
    }
    help_overrides = {
        "learning_rate": "Peak learning rate (AdamW).",
        "num_train_epochs": "Epochs over the video shards (or the image shards without videos); needs "
        "dataset_info.json next to the shards (else they are counted).",
        "num_workers": "Data-loading worker processes per rank and stream (capped at the rank's shards).",
        "torch_compile": "Compile the tokenizer's encoder and decoder with torch.compile (static shapes).",
        "gradient_checkpointing": "Not supported by tokenizer training (an error).",
    }

    @classmethod
    def help_recipes(cls) -> tuple[dict[str | None, Recipe], Recipe]:
        return {None: TOKENIZER_RECIPE}, TOKENIZER_DEMO

    @property
    def recipe(self) -> TokenizerRecipe:
        return TOKENIZER_DEMO if self.demo else TOKENIZER_RECIPE

    @property
    def streams(self) -> dict[str, list[str] | None]:
        """The shard flags given, by stream kind (`{"image": None}` in the demo until the demo data is written)."""
        shards = {"image": self.image_shards, "video": self.video_shards}
        return {kind: files for kind, files in shards.items() if files is not None} or {"image": None}

    def __post_init__(self) -> None:
        self.demo = self.image_shards is None and self.video_shards is None
        self.fill_from(self.recipe)
        if self.gradient_checkpointing:
            fail("--gradient_checkpointing", "off (tokenizer training does not support it)", True)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        wrong = VQGAN_ONLY if self.tokenizer_type == "dall-e" else DALLE_ONLY
        for name in wrong:
            value = getattr(self, name)
            if value != defaults[name] and (name not in TOKENIZER_DEMO.values() or value != self.recipe.values()[name]):
                fail(f"--{name}", f"left out with --tokenizer_type {self.tokenizer_type} (it is not used)", value)
        factor = self.downsample_factor
        if self.tokenizer_name_or_path is None and self.image_size % factor:
            expected = f"a multiple of {factor} (the {factor}x downsampling of --tokenizer_type {self.tokenizer_type})"
            fail("--image_size", expected, self.image_size)
        super().__post_init__()

    # -- what the library takes ---------------------------------------------------------------------------------

    def tokenizer_config(self) -> BEVTVisualTokenizerConfig:
        """The architecture of a new tokenizer (`tokenizer_config_for_training`)."""
        extra: dict[str, Any] = {}
        if self.tokenizer_type == "vqgan":
            extra = dict(
                vqgan_channel_multipliers=tuple(self.channel_multipliers),
                vqgan_embed_dim=self.codebook_dim,
                vqgan_l2_normalize_codes=self.l2_normalize_codes,
            )
        return tokenizer_config_for_training(
            self.tokenizer_type, vocab_size=self.vocab_size, image_size=self.image_size, width=self.width, **extra
        )

    def objective(self, max_train_steps: int) -> TokenizerTrainingArguments:
        """The training objective; the DALL-E schedules default to the run's length."""
        kl_warmup = self.kl_warmup_steps
        if kl_warmup is None:
            kl_warmup = min(5000, max_train_steps // 10)
        return TokenizerTrainingArguments(
            reconstruction_loss=self.reconstruction_loss,
            codebook_update=self.codebook_update,
            ema_decay=self.ema_decay,
            commitment_weight=self.commitment_weight,
            dead_code_threshold=self.dead_code_threshold,
            dead_code_restart_steps=self.dead_code_restart_steps,
            perceptual_weight=self.perceptual_weight,
            perceptual_weights=self.perceptual_weights,
            temperature_start=self.temperature_start,
            temperature_end=self.temperature_end,
            temperature_anneal_steps=self.temperature_anneal_steps
            if self.temperature_anneal_steps is not None
            else max_train_steps,
            kl_weight=self.kl_weight,
            kl_warmup_steps=kl_warmup,
        )
