"""Fine-tuning helpers for `run_finetuning.py`: layer-wise lr decay, EMA, model loading, multi-view evaluation.

- `layer_decay_lr_scale(depths, layer_decay, backbone_lr_multiplier)`: the official BEVT fine-tuning rule, to pass
  as `lr_scale` to `bevt.training.build_param_groups`. Backbone "layers" are counted from the top: the final norm
  and the last block get `decay**1`, each earlier block or patch-merging layer one more power, the patch embedding
  `decay**(L + 1)` with `L = sum(depths) + num_stages - 1` (0.9**28 for Swin-B). Every backbone parameter is also
  multiplied by `backbone_lr_multiplier`; the classifier keeps the base lr.
- `ModelEMA`: an exponential moving average of the weights (evaluated and saved instead of the raw weights).
- `resolve_architecture`: which window, clip length, input size and drop path a run uses: a pretrained model's
  own values unless a flag (or an official recipe's documented change, e.g. SSv2's 16x7x7 window) says otherwise.
- `load_model_for_finetuning`: a `BEVTForVideoClassification` from any BEVT folder (pretraining output, converted
  official checkpoint, earlier fine-tuning run), with new labels and, when `window_size` differs, the relative
  position bias tables resized as the official code does (trilinear over the offset volume, e.g. 8x7x7 -> 16x7x7).
- Multi-view evaluation: `MultiViewEvalTransform` (clips x crops per video through `BEVTVideoProcessor`),
  `predict_multiview` (softmax scores averaged over views), `gather_predictions` (across ranks, without per-batch
  collectives, so ranks may hold different numbers of videos), `compute_metrics` (the bundled `evaluate` metric),
  `confusion_matrix`, `save_confusion_matrix_png` (PIL) and `evaluation_report`.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .configuration_bevt import BEVTConfig
from .modeling_bevt import BEVTForVideoClassification, BEVTModel

__all__ = [
    "ARCHITECTURE_FIELDS",
    "ArchitectureChoice",
    "FINETUNING_CONFIG_FIELDS",
    "LoadReport",
    "ModelEMA",
    "MultiViewEvalTransform",
    "Predictions",
    "compute_metrics",
    "confusion_matrix",
    "evaluation_report",
    "freeze_unused_video_parameters",
    "gather_predictions",
    "layer_decay_lr_scale",
    "layer_unit",
    "load_model_for_finetuning",
    "num_layer_units",
    "predict_multiview",
    "RecipeChange",
    "resolve_architecture",
    "save_confusion_matrix_png",
    "skipped_recipe_changes",
]

# ---------------------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay
# ---------------------------------------------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"^encoder\.layers\.(\d+)\.(?:blocks\.(\d+)|(downsample))\.")


def num_layer_units(depths: Sequence[int]) -> int:
    """Blocks plus patch-merging layers of the encoder (`L`): 27 for Swin-B (2-2-18-2)."""
    return sum(depths) + len(depths) - 1


def layer_unit(name: str, depths: Sequence[int], prefix: str = "bevt.") -> int | None:
    """Position of a backbone parameter counted from the bottom: embeddings 0, then every block and patch-merging
    layer in forward order 1..L, the final norm L (shared with the last block). None outside the backbone.

    Raises:
        ValueError: a backbone parameter that fits no rule (a new module the rule does not know).
    """
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    if rest.startswith("embeddings."):
        return 0
    if rest.startswith("layernorm."):
        return num_layer_units(depths)
    match = _BLOCK_RE.match(rest)
    if match is None:
        raise ValueError(f"no layer-wise lr decay rule for backbone parameter {name!r}")
    stage = int(match.group(1))
    if stage >= len(depths):
        raise ValueError(f"parameter {name!r} is in stage {stage}, but the config has {len(depths)} stages")
    before = sum(depths[:stage]) + stage  # blocks and patch-merging layers of the earlier stages
    if match.group(3):
        return before + depths[stage] + 1
    return before + int(match.group(2)) + 1


def layer_decay_lr_scale(
    depths: Sequence[int],
    layer_decay: float = 1.0,
    backbone_lr_multiplier: float = 1.0,
    prefix: str = "bevt.",
) -> Callable[[str], float]:
    """`name -> lr multiplier`: `backbone_lr_multiplier * layer_decay ** (L + 1 - layer_unit(name))` for backbone
    parameters, 1 for the others (the classifier). See the module docstring."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    if not backbone_lr_multiplier >= 0:
        raise ValueError(f"backbone_lr_multiplier must be >= 0, got {backbone_lr_multiplier!r}")
    top = num_layer_units(depths) + 1

    def scale(name: str) -> float:
        unit = layer_unit(name, depths, prefix)
        if unit is None:
            return 1.0
        return backbone_lr_multiplier * layer_decay ** (top - unit)

    return scale


def freeze_unused_video_parameters(model: BEVTForVideoClassification) -> list[str]:
    """Freeze what video classification never uses (the image-stream patch embedding and the mask token), so the
    optimizer skips them and DDP finds no unused parameters. Returns the frozen names."""
    frozen = []
    for name, param in model.named_parameters():
        if ".image_projection." in name or ".image_norm." in name or name.endswith("embeddings.mask_token"):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


# ---------------------------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------------------------


class ModelEMA:
    """Exponential moving average of a model's floating-point weights and buffers.

    After every optimizer step, `update(model)` sets `ema = d * ema + (1 - d) * weights` with
    `d = min(decay, (1 + n) / (10 + n))` (n = updates so far: the average follows the weights closely at first).
    `module` is a frozen copy in eval mode, on the device of the model it was made from (move it with `.to`).
    `state_dict()` / `load_state_dict()` make it a checkpointable object (`accelerator.register_for_checkpointing`).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def to(self, device: torch.device | str) -> ModelEMA:
        self.module.to(device)
        return self

    @property
    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend `model`'s current weights into the average (call after each optimizer step)."""
        decay = self.current_decay
        source = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = source[name].detach().to(ema_value.device)
            if ema_value.is_floating_point():
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - decay)
            else:
                ema_value.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])


# ---------------------------------------------------------------------------------------------------------------
# Loading a model for fine-tuning
# ---------------------------------------------------------------------------------------------------------------

# Config fields that may change when fine-tuning a pretrained model (the rest define the weights' shapes).
FINETUNING_CONFIG_FIELDS: tuple[str, ...] = (
    "window_size",
    "num_frames",
    "image_size",
    "drop_path_rate",
    "classifier_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)


@dataclass
class LoadReport:
    """What `load_model_for_finetuning` did."""

    source: str
    source_architecture: str | None = None
    classifier: str = "new"  # "new" (random init) or "loaded" (same labels as the source)
    window_resized: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    frozen: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"backbone from {self.source} ({self.source_architecture or 'unknown class'})"]
        parts.append("classifier loaded (same labels)" if self.classifier == "loaded" else "new classifier")
        if self.window_resized:
            source, target = ("x".join(map(str, w)) for w in self.window_resized)
            parts.append(f"relative position bias resized {source} -> {target}")
        if self.frozen:
            parts.append(f"{len(self.frozen)} image-stream/mask-token tensors frozen (unused for videos)")
        return "; ".join(parts)


def _label_config(label_names: Sequence[str]) -> dict[str, Any]:
    if len(label_names) < 2:
        raise ValueError(f"need at least 2 class names, got {len(label_names)}")
    if len(set(label_names)) != len(label_names):
        duplicates = sorted({n for n in label_names if list(label_names).count(n) > 1})
        raise ValueError(f"class names must be unique; repeated: {duplicates[:5]}")
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def _same_labels(config: BEVTConfig, label_names: Sequence[str]) -> bool:
    labels = getattr(config, "id2label", None) or {}
    return len(labels) == len(label_names) and all(labels.get(i) == n for i, n in enumerate(label_names))


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence Transformers' loading report (warnings) inside the block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_model_for_finetuning(
    name_or_path: str | Path,
    label_names: Sequence[str],
    **config_updates: Any,
) -> tuple[BEVTForVideoClassification, LoadReport]:
    """A `BEVTForVideoClassification` initialised from a saved BEVT folder (any head) for `label_names`.

    Args:
        name_or_path: a `save_pretrained` folder (or Hub id) of any BEVT model class.
        label_names: class names in index order. When the source is a classifier with the very same labels, its
            classifier is kept; otherwise a new one is initialised.
        config_updates: fields of `FINETUNING_CONFIG_FIELDS` to change (e.g. `window_size=(16, 7, 7)`,
            `drop_path_rate=0.4`). A new `window_size` resizes every relative position bias table.

    Raises:
        ValueError: an update of a field that defines weight shapes, or a source that is not a BEVT model.
    """
    bad = sorted(set(config_updates) - set(FINETUNING_CONFIG_FIELDS))
    if bad:
        raise ValueError(
            f"cannot change {bad} of a pretrained model (they define its weights); changeable: "
            f"{list(FINETUNING_CONFIG_FIELDS)}"
        )
    source_config = BEVTConfig.from_pretrained(name_or_path)
    if getattr(source_config, "model_type", None) != BEVTConfig.model_type:
        raise ValueError(f"{name_or_path} is not a BEVT model (model_type {source_config.model_type!r})")
    architecture = (source_config.architectures or [None])[0]
    config = copy.deepcopy(source_config)
    for key, value in config_updates.items():
        setattr(config, key, value)
    # problem_type None: hard labels and soft (mixup / smoothing) targets both work (the loss picks per call).
    config = BEVTConfig(
        **{**config.to_dict(), **_label_config(label_names), "architectures": None, "problem_type": None}
    )
    model = BEVTForVideoClassification(config)

    with _quiet_transformers():  # the head of the source is "unexpected" for BEVTModel: expected here
        backbone = BEVTModel.from_pretrained(name_or_path)
    state = backbone.state_dict()
    report = LoadReport(source=str(name_or_path), source_architecture=architecture)
    source_window, target_window = tuple(source_config.window_size), tuple(config.window_size)
    if source_window != target_window:
        from .conversion_swin import resize_relative_position_bias

        for key in state:
            if key.endswith("relative_position_bias_table"):
                state[key] = resize_relative_position_bias(state[key], source_window, target_window)
        report.window_resized = (source_window, target_window)
    model.bevt.load_state_dict(state, strict=True)
    del backbone

    if architecture == "BEVTForVideoClassification" and _same_labels(source_config, label_names):
        with _quiet_transformers():
            source = BEVTForVideoClassification.from_pretrained(name_or_path)
        model.classifier.load_state_dict(source.classifier.state_dict())
        report.classifier = "loaded"
    report.frozen = freeze_unused_video_parameters(model)
    return model, report


# ---------------------------------------------------------------------------------------------------------------
# Which architecture a fine-tuning run uses
# ---------------------------------------------------------------------------------------------------------------

# Settings a saved model carries that fine-tuning can change without changing weight shapes; a pretrained model's
# own values win over recipe defaults (a window or clip length it was not pretrained with costs accuracy).
ARCHITECTURE_FIELDS: tuple[str, ...] = ("window_size", "num_frames", "image_size", "drop_path_rate")


@dataclass(frozen=True)
class RecipeChange:
    """An architecture change an official fine-tuning recipe makes to the pretrained model it starts from, e.g.
    SSv2's window 8x7x7 -> 16x7x7. It applies only to models that have `source` (the official pretraining's value)."""

    source: Any
    target: Any
    reason: str


@dataclass(frozen=True)
class ArchitectureChoice:
    """The value one architecture field gets in a fine-tuning run and why."""

    name: str
    value: Any
    pretrained: Any = None  # the model folder's value (None when training from scratch)
    origin: str = "recipe"  # "pretrained" | "flag" | "recipe"
    reason: str = ""

    @property
    def changed(self) -> bool:
        return self.pretrained is not None and self.value != self.pretrained

    def describe(self) -> str:
        """One line for the log: what changed, from, to, why and what it may cost ("" when nothing changed)."""
        if not self.changed:
            return ""
        line = f"{self.name} {_show(self.pretrained)} -> {_show(self.value)} ({self.reason})"
        cost = _CHANGE_COSTS.get(self.name, "")
        if self.origin == "flag" and cost:
            line += f": {cost}; omit --{self.name} to keep the pretrained {_show(self.pretrained)}"
        elif self.name == "window_size":
            line += ": relative position bias tables resized"
        return line

    def card_text(self) -> str:
        """`8x7x7 (pretrained model)`, `16x7x7 (changed from 8x7x7: ssv2 recipe)`: for the model card."""
        if self.pretrained is None:
            return f"{_show(self.value)} ({self.reason})"
        if not self.changed:
            return f"{_show(self.value)} (pretrained model)"
        return f"{_show(self.value)} (changed from {_show(self.pretrained)}: {self.reason})"


_CHANGE_COSTS = {
    "window_size": "the relative position bias tables are resized to a window the model was not pretrained "
    "with, which can cost accuracy",
    "num_frames": "clips of another length than in pretraining change what the temporal windows see, which can "
    "cost accuracy",
    "image_size": "another input size than in pretraining changes the scale of what the windows see, which can "
    "cost accuracy",
}


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "x".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _normalise(name: str, value: Any) -> Any:
    return tuple(int(v) for v in value) if name == "window_size" else value


def resolve_architecture(
    pretrained: BEVTConfig | None,
    flags: Mapping[str, Any],
    recipe_values: Mapping[str, Any],
    recipe_changes: Mapping[str, RecipeChange] | None = None,
    recipe_name: str = "recipe",
) -> dict[str, ArchitectureChoice]:
    """Window, clip length, input size and drop path of a fine-tuning run (`ARCHITECTURE_FIELDS`).

    From scratch (`pretrained` None): a flag, else the recipe's value. From a pretrained model: a flag (the change
    is reported with what it may cost), else the recipe's documented change when the model has the value the
    official recipe starts from (e.g. ssv2: window 8x7x7 -> 16x7x7), else **the model's own value**.

    Args:
        pretrained: the config of the model folder fine-tuning starts from, or None.
        flags: the fields given explicitly on the command line (name -> value); absent fields were not given.
        recipe_values: the recipe's value of every field (used from scratch).
        recipe_changes: the recipe's documented changes to pretrained models, by field.
        recipe_name: shown in the reasons ("ssv2 recipe").
    """
    choices: dict[str, ArchitectureChoice] = {}
    for name in ARCHITECTURE_FIELDS:
        if pretrained is None:
            if name in flags:
                choices[name] = ArchitectureChoice(name, _normalise(name, flags[name]), None, "flag", f"--{name}")
            else:
                value = _normalise(name, recipe_values[name])
                choices[name] = ArchitectureChoice(name, value, None, "recipe", f"{recipe_name} recipe")
            continue
        own = _normalise(name, getattr(pretrained, name))
        change = (recipe_changes or {}).get(name)
        if name in flags:
            choices[name] = ArchitectureChoice(name, _normalise(name, flags[name]), own, "flag", f"--{name}")
        elif change is not None and _normalise(name, change.source) == own:
            target = _normalise(name, change.target)
            choices[name] = ArchitectureChoice(name, target, own, "recipe", f"{recipe_name} recipe: {change.reason}")
        else:
            choices[name] = ArchitectureChoice(name, own, own, "pretrained", "pretrained model")
    return choices


def skipped_recipe_changes(
    pretrained: BEVTConfig,
    flags: Mapping[str, Any],
    recipe_changes: Mapping[str, RecipeChange],
    recipe_name: str = "recipe",
) -> list[str]:
    """Log lines for the recipe changes that did not apply: the model does not have the official starting value."""
    lines = []
    for name, change in recipe_changes.items():
        own = _normalise(name, getattr(pretrained, name))
        if name not in flags and own != _normalise(name, change.source):
            lines.append(
                f"{recipe_name} recipe: the official fine-tuning changes {name} {_show(change.source)} -> "
                f"{_show(change.target)}; this model has {_show(own)}, kept (pass --{name} to change it)"
            )
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Multi-view evaluation
# ---------------------------------------------------------------------------------------------------------------


class MultiViewEvalTransform:
    """Stream transform for evaluation: clips `uint8 (T, H, W, 3)` or `(num_clips, T, H, W, 3)` -> every view
    `pixel_values` `(num_clips * num_crops, T, 3, S, S)` (clip-major, as `BEVTVideoProcessor` orders them).

    `processor` (a `BEVTVideoProcessor`) does the geometry: short side to `size["shortest_edge"]`, then the centre
    crop (`num_crops=1`) or three crops along the long side (`num_crops=3`), rescale and normalisation.
    """

    def __init__(self, processor: Any, num_crops: int = 1) -> None:
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops!r}")
        self.processor = processor
        self.num_crops = num_crops

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_crops={self.num_crops}, processor={type(self.processor).__name__})"

    def __call__(
        self, clips: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        clips = torch.as_tensor(clips)
        if clips.ndim == 4:
            clips = clips[None]
        if clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(
                f"expected clips (T, H, W, 3) or (num_clips, T, H, W, 3), got {tuple(clips.shape)}"
            )
        out = self.processor(
            list(clips), do_sample_frames=False, num_clips=1, num_crops=self.num_crops, return_tensors="pt"
        )
        return {"pixel_values": out["pixel_values"]}


@dataclass
class Predictions:
    """Per-video results: sample keys, view-averaged class probabilities `(N, C)` and true labels `(N,)`."""

    keys: list[str]
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def concatenate(cls, parts: Iterable[Predictions], num_labels: int) -> Predictions:
        """Merge parts, dropping repeated keys (first wins), sorted by key (same order on every rank)."""
        seen: dict[str, tuple[np.ndarray, int]] = {}
        for part in parts:
            for key, score, label in zip(part.keys, part.scores, part.labels):
                seen.setdefault(key, (score, int(label)))
        keys = sorted(seen)
        scores = np.stack([seen[k][0] for k in keys]) if keys else np.zeros((0, num_labels), np.float32)
        labels = np.asarray([seen[k][1] for k in keys], dtype=np.int64)
        return cls(keys, scores.astype(np.float32), labels)


@torch.no_grad()
def predict_multiview(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    device: torch.device | str,
    max_views_per_forward: int | None = None,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> Predictions:
    """Run `model` on every view of every video and average the softmax scores over each video's views.

    Args:
        model: a video classifier (called as `model(pixel_values=...)`, returning `.logits`); put in eval mode here.
        batches: dicts with `pixel_values` `(B, V, T, 3, S, S)`, `labels` `(B,)`, `__key__` (list of B keys).
        device: where to run.
        max_views_per_forward: split the `B * V` views into forward passes of at most this many (memory bound).
        autocast: a context-manager factory (e.g. `accelerator.autocast`) for mixed precision.
    """
    was_training = model.training
    model.eval()
    keys: list[str] = []
    scores: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    context = autocast or nullcontext
    try:
        for batch in batches:
            pixel_values = batch["pixel_values"]
            if pixel_values.ndim != 6:
                raise ValueError(
                    f"evaluation batches need pixel_values (batch, views, frames, 3, H, W), got {tuple(pixel_values.shape)}"
                )
            num_videos, num_views = pixel_values.shape[:2]
            views = pixel_values.flatten(0, 1)
            chunk = max_views_per_forward or views.shape[0]
            logits = []
            for part in views.split(chunk):
                with context():
                    logits.append(model(pixel_values=part.to(device, non_blocking=True)).logits.float())
            probs = torch.cat(logits).softmax(-1).view(num_videos, num_views, -1).mean(1)
            scores.append(probs.cpu())
            labels.append(torch.as_tensor(batch["labels"]).cpu().long())
            keys.extend(batch["__key__"])
    finally:
        model.train(was_training)
    if not keys:
        return Predictions([], np.zeros((0, 0), np.float32), np.zeros((0,), np.int64))
    return Predictions(keys, torch.cat(scores).numpy(), torch.cat(labels).numpy())


def gather_predictions(accelerator: Any, local: Predictions, num_labels: int) -> Predictions:
    """Every rank's predictions on every rank (one `gather_object`; ranks may hold different counts)."""
    parts = [local]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([local])
    parts = [p for p in parts if len(p)]
    return Predictions.concatenate(parts, num_labels)


def compute_metrics(metric: Any, predictions: Predictions, top_k: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k and mean-class accuracy through the bundled `evaluate` metric (`bevt.metrics.load_video_accuracy()`)."""
    if len(predictions) == 0:
        raise ValueError("no evaluation samples: the validation shards gave no decodable, labelled video")
    return metric.compute(predictions=predictions.scores, references=predictions.labels, top_k=list(top_k))


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts `(num_labels, num_labels)`: rows true class, columns predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ in shape")
    for name, values in (("labels", labels), ("predictions", predicted)):
        if values.size and (values.min() < 0 or values.max() >= num_labels):
            raise ValueError(
                f"{name} must be class ids in [0, {num_labels}), got [{values.min()}, {values.max()}]"
            )
    return np.bincount(labels * num_labels + predicted, minlength=num_labels * num_labels).reshape(
        num_labels, num_labels
    )


def _cell_colour(fraction: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1)."""
    low, high = np.array([255, 255, 255]), np.array([8, 48, 107])
    return tuple(int(v) for v in np.round(low + (high - low) * min(max(fraction, 0.0), 1.0)))


def draw_length(font: Any, text: str) -> float:
    """Width in pixels of `text` drawn with a PIL font."""
    return font.getlength(text) if hasattr(font, "getlength") else 6 * len(text)


def save_confusion_matrix_png(
    matrix: np.ndarray, label_names: Sequence[str], path: str | Path, title: str = "Confusion matrix"
) -> Path:
    """Draw a row-normalised confusion matrix (rows: true class, columns: predicted) as a PNG with PIL.

    Cells are shaded by the fraction of the row; with up to 40 classes the rows carry the class names and the cells
    their percentage (when large enough). Any number of classes works (cells shrink down to 1 pixel).
    """
    from PIL import Image, ImageDraw, ImageFont

    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    if matrix.shape != (n, n) or n != len(label_names):
        raise ValueError(
            f"matrix {matrix.shape} must be square with one row per class name ({len(label_names)})"
        )
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    cell = int(min(48, max(1, 800 // max(n, 1))))
    font = ImageFont.load_default()
    names = [name if len(name) <= 48 else name[:47] + "~" for name in label_names] if n <= 40 else []
    name_width = int(max((draw_length(font, name) for name in names), default=0))
    top, left = 40, name_width + 16
    width, height = left + n * cell + 10, top + n * cell + 10
    image = Image.new("RGB", (max(width, 360), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black", font=font)
    draw.text(
        (10, 22), "rows: true class, columns: predicted class (row-normalised)", fill="dimgray", font=font
    )
    for i in range(n):
        for j in range(n):
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_cell_colour(rows[i, j]))
            if cell >= 28 and matrix[i, j] > 0:
                colour = "white" if rows[i, j] > 0.5 else "black"
                draw.text((x0 + 3, y0 + cell // 2 - 5), f"{100 * rows[i, j]:.0f}", fill=colour, font=font)
        if names:
            draw.text((8, top + i * cell + max(cell // 2 - 5, 0)), names[i], fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def evaluation_report(
    predictions: Predictions,
    metrics: Mapping[str, float],
    label_names: Sequence[str],
    **details: Any,
) -> dict[str, Any]:
    """A JSON-ready report: metrics, per-class accuracy (None for classes absent from the data), the confusion
    matrix (counts) and any `details` (model, shards, views...)."""
    num_labels = len(label_names)
    predicted = predictions.scores.argmax(axis=1) if len(predictions) else np.zeros((0,), np.int64)
    matrix = confusion_matrix(predictions.labels, predicted, num_labels)
    totals = matrix.sum(axis=1)
    per_class = {
        name: (float(matrix[i, i] / totals[i]) if totals[i] else None) for i, name in enumerate(label_names)
    }
    return {
        **details,
        "num_videos": len(predictions),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "per_class_accuracy": per_class,
        "label_names": list(label_names),
        "confusion_matrix": matrix.tolist(),
    }


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON (NaN-free floats expected)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    return path


def is_better(value: float, best: float | None) -> bool:
    """Higher is better; NaN never is."""
    return not math.isnan(value) and (best is None or value > best)
