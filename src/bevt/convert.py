"""Convert checkpoints of the original repositories into `save_pretrained` folders of `bevt` models.

    python -m bevt.convert --format FORMAT --checkpoint PATH --output-dir DIR \
        [--task TASK] [--window-size D H W] [--num-frames N] [--id2label FILE]

Formats (the architecture is always read from the tensors):

- `bevt-pretrain`: official BEVT joint-pretraining checkpoint (mmaction2: `{"state_dict": {"backbone.*",
  "cls_head.lm_head.*", "cls_head.vae_encoder.*"}}`) -> `BEVTForMaskedVideoModeling` (`--task base`: `BEVTModel`).
  The DALL-E weights inside are not converted here (they are reported; use `--format dalle-encoder` on `encoder.pkl`).
- `video-swin`: a video recognizer of the official Video Swin repository or a BEVT fine-tuning run (`backbone.*`,
  `cls_head.fc_cls.*`) -> `BEVTForVideoClassification` (`--task base`: `BEVTModel`).
- `swin2d-image`: a 2D Swin image checkpoint (BEVT's image-stream stage-1 model, a plain image Swin, SimMIM, ...),
  inflated to 3D as the official code does -> `BEVTForMaskedVideoModeling` (`--task base`: `BEVTModel`).
- `torchvision-swin3d`: a state dict of torchvision's `swin3d_t/s/b` -> `BEVTForVideoClassification`.
- `dalle-encoder`, `vqgan-encoder`: visual tokenizers, handled by `bevt.convert_tokenizer` (`--decoder PATH` also
  converts the decoder: OpenAI's `decoder.pkl`, or the taming checkpoint's `decoder.*`).

Conversion is strict: every source tensor is mapped to a parameter or dropped for a stated reason (index buffers,
the tokenizer, an image classification head, `--drop-keys`), and every parameter of the target model comes from
the checkpoint unless the format cannot provide it; those few (e.g. the video prediction head when starting from
a 2D image model) are initialised like a new model and listed in the report. Anything else is an error that lists
the keys. The report is printed and saved as `conversion_report.json` in the output folder.

Python API: `convert_checkpoint` (file -> folder), `convert_state_dict` (in memory), `load_swin2d_into` (initialise
an existing model from a 2D Swin checkpoint, e.g. before pretraining), and the tensor helpers
`inflate_2d_state_dict` / `resize_relative_position_bias` from `bevt.conversion_swin`.
"""

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cli import CLIArgumentParser
from .configuration_bevt import BEVTConfig
from .conversion_swin import (
    DEFAULT_TEMPORAL_PATCH,
    DEFAULT_WINDOW_SIZE,
    Architecture,
    ConversionError,
    droppable_reason,
    infer_architecture,
    inflate_2d_state_dict,
    inflate_patch_embedding,
    inflate_relative_position_bias,
    normalize_mmaction_keys,
    normalize_swin2d_keys,
    normalize_torchvision_keys,
    official_to_bevt_key,
    resize_relative_position_bias,
)
from .modeling_bevt import (
    BEVTForMaskedVideoModeling,
    BEVTForVideoClassification,
    BEVTModel,
    BEVTPreTrainedModel,
)
from .safe_loading import PathLike, load_checkpoint

__all__ = [
    "FORMATS",
    "TASKS",
    "TOKENIZER_FORMATS",
    "ConversionError",
    "ConversionReport",
    "convert_checkpoint",
    "convert_state_dict",
    "extract_state_dict",
    "inflate_2d_state_dict",
    "inflate_patch_embedding",
    "inflate_relative_position_bias",
    "load_swin2d_into",
    "main",
    "read_checkpoint",
    "read_label_file",
    "resize_relative_position_bias",
]

FORMATS = ("bevt-pretrain", "video-swin", "swin2d-image", "torchvision-swin3d")
TOKENIZER_FORMATS = ("dalle-encoder", "vqgan-encoder")
TASKS: dict[str, type[BEVTPreTrainedModel]] = {
    "pretraining": BEVTForMaskedVideoModeling,
    "classification": BEVTForVideoClassification,
    "base": BEVTModel,
}
# Tasks each format can produce; the first is the default.
FORMAT_TASKS: dict[str, tuple[str, ...]] = {
    "bevt-pretrain": ("pretraining", "base"),
    "video-swin": ("classification", "base"),
    "swin2d-image": ("pretraining", "base"),
    "torchvision-swin3d": ("classification", "base"),
}
# (frames, frame interval, short side) written to the config (frames: read by the video-classification pipeline)
# and to the saved video processor: 16x8 for BEVT pretraining; 32x2 for Kinetics recognition, tested at short side
# 224 by Video Swin / BEVT fine-tuning and at 256 (then centre crop 224) by torchvision's swin3d weights.
DEFAULT_CLIP = {
    "bevt-pretrain": (16, 8, 224),
    "swin2d-image": (16, 8, 224),
    "video-swin": (32, 2, 224),
    "torchvision-swin3d": (32, 2, 256),
}

# Target parameters a format cannot provide, with the reason shown in the report. Everything else is required.
_VIDEO_CHECKPOINT_NEW = (
    (
        r"^bevt\.embeddings\.patch_embeddings\.image_(projection|norm)\.",
        "image-stream patch embedding: a video recognition checkpoint has none (used only for image inputs)",
    ),
    (r"^bevt\.embeddings\.mask_token$", "mask token: not in a video recognition checkpoint (used only with masks)"),
)
_IMAGE_CHECKPOINT_NEW = (
    (r"^bevt\.embeddings\.mask_token$", "mask token: not in this image checkpoint"),
    (
        r"^head\.video_",
        "video prediction head: an image checkpoint has none (the official two-stream pretraining also starts it "
        "from scratch)",
    ),
    (r"^head\.(image_|lm_head\.)", "image prediction head: not in this image checkpoint"),
    (r"^classifier\.", "classification layer: not in an image checkpoint"),
)
_NEW_INIT_ALLOWED: dict[str, tuple[tuple[str, str], ...]] = {
    "bevt-pretrain": (),
    "video-swin": _VIDEO_CHECKPOINT_NEW,
    "torchvision-swin3d": _VIDEO_CHECKPOINT_NEW,
    "swin2d-image": _IMAGE_CHECKPOINT_NEW,
}


@dataclass
class ConversionReport:
    """What happened to every tensor. Keys of `mapped`/`new_init`/`transformed` are target parameter names;
    keys of `dropped` are source keys as they appear in the checkpoint.

    Attributes:
        mapped: target parameter -> source key it was loaded from.
        transformed: target parameter -> how its source tensor was changed (inflated, resized).
        dropped: source key -> why it was not converted.
        new_init: target parameter -> why the checkpoint could not provide it (initialised like a new model).
        ignored_entries: top-level entries of the file besides the weights (e.g. `meta`, `optimizer`).
    """

    format: str
    task: str
    model_class: str
    source_window_size: tuple[int, ...] = ()
    window_size: tuple[int, ...] = ()
    checkpoint: str | None = None
    mapped: dict[str, str] = field(default_factory=dict)
    transformed: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    new_init: dict[str, str] = field(default_factory=dict)
    ignored_entries: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self, examples: int = 3) -> str:
        """Human-readable summary: counts, and the dropped / newly initialised keys grouped by reason."""
        window = "x".join(map(str, self.window_size))
        source = "x".join(map(str, self.source_window_size))
        lines = [
            f"{self.format} -> {self.model_class} (task {self.task}); window {source} -> {window}",
            f"  loaded {len(self.mapped)} parameters from the checkpoint"
            + (f" ({len(self.transformed)} inflated/resized)" if self.transformed else ""),
        ]
        for title, entries in (("dropped source tensors", self.dropped), ("NEWLY INITIALISED", self.new_init)):
            if not entries:
                continue
            lines.append(f"  {title}: {len(entries)}")
            for reason, keys in _group_by_reason(entries).items():
                shown = ", ".join(keys[:examples]) + (f", ... (+{len(keys) - examples})" if len(keys) > examples else "")
                lines.append(f"    - {reason}: {shown}")
        if self.ignored_entries:
            lines.append(f"  ignored top-level entries (not weights): {', '.join(self.ignored_entries)}")
        return "\n".join(lines)


def _group_by_reason(entries: Mapping[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key, reason in sorted(entries.items()):
        groups.setdefault(reason, []).append(key)
    return groups


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def read_checkpoint(path: PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a checkpoint file safely (`torch.load(weights_only=True)` or safetensors, see `bevt.safe_loading`) and
    return (state dict, top-level entries that are not the weights)."""
    return extract_state_dict(load_checkpoint(path))


def extract_state_dict(checkpoint: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of a loaded checkpoint: the mapping itself when it holds only tensors, else its `model`,
    `module` or `state_dict` entry (first found, the official loaders' order).

    Returns:
        (state dict, names of the other top-level entries, e.g. ["meta", "optimizer"]).
    """
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint), []
    for name in ("model", "module", "state_dict"):
        inner = checkpoint.get(name)
        if isinstance(inner, Mapping):
            bad = [k for k, v in inner.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise ConversionError(f"checkpoint[{name!r}] holds non-tensor entries: {bad[:10]}")
            return dict(inner), sorted(str(k) for k in checkpoint if k != name)
    raise ConversionError(
        "cannot find the weights: the checkpoint is neither a flat state dict nor has a 'model', 'module' or "
        f"'state_dict' entry (top-level keys: {sorted(map(str, checkpoint))[:10]})"
    )


def read_label_file(path: PathLike) -> list[str]:
    """Class names, one per line (trailing blank lines ignored). Blank or duplicate names are errors."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [i + 1 for i, name in enumerate(lines) if not name]
    if blank:
        raise ConversionError(f"{path}: blank class names on lines {blank[:10]}")
    seen: dict[str, int] = {}
    duplicates = []
    for i, name in enumerate(lines):
        if name in seen:
            duplicates.append(f"{name!r} (lines {seen[name] + 1} and {i + 1})")
        seen.setdefault(name, i)
    if duplicates:
        raise ConversionError(f"{path}: duplicate class names: {duplicates[:10]}")
    if not lines:
        raise ConversionError(f"{path}: no class names")
    return lines


# --------------------------------------------------------------------------------------------------------------
# Conversion steps
# --------------------------------------------------------------------------------------------------------------


def _normalize(
    fmt: str, state_dict: Mapping[str, torch.Tensor], drop_keys: Iterable[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """Source state dict -> (official-layout tensors, official key -> source key, dropped source key -> reason)."""
    dropped: dict[str, str] = {}
    kept = dict(state_dict)
    for pattern in drop_keys:
        regex = re.compile(pattern)
        for key in [k for k in kept if regex.search(k)]:
            dropped[key] = f"dropped on request (--drop-keys {pattern})"
            del kept[key]
    if fmt == "torchvision-swin3d":
        tensors, origin = normalize_torchvision_keys(kept)
    elif fmt == "swin2d-image":
        tensors, origin, more = normalize_swin2d_keys(kept)
        dropped.update(more)
    else:
        tensors, origin = normalize_mmaction_keys(kept)
    for key in list(tensors):
        reason = droppable_reason(key, image_checkpoint=fmt == "swin2d-image")
        if reason is not None:
            dropped[origin.pop(key)] = reason
            del tensors[key]
    return tensors, origin, dropped


def _to_bevt_keys(
    tensors: Mapping[str, torch.Tensor], origin: Mapping[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Official layout -> bevt names. Returns (tensors, bevt key -> source key); unknown keys are an error."""
    out: dict[str, torch.Tensor] = {}
    out_origin: dict[str, str] = {}
    unknown = []
    for key, value in tensors.items():
        target = official_to_bevt_key(key)
        if target is None:
            unknown.append(origin.get(key, key))
            continue
        out[target], out_origin[target] = value, origin.get(key, key)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} checkpoint tensors have no counterpart in a BEVT model (wrong --format? otherwise drop "
            f"them explicitly with --drop-keys REGEX): {', '.join(sorted(unknown)[:40])}"
            + (" ..." if len(unknown) > 40 else "")
        )
    return out, out_origin


def _load_strict(
    model: BEVTPreTrainedModel,
    tensors: Mapping[str, torch.Tensor],
    origin: Mapping[str, str],
    allowed_new: Iterable[tuple[str, str]],
    report: ConversionReport,
) -> None:
    """Load `tensors` (bevt names of the full models, `bevt.*` / `head.*` / `classifier.*`) into `model`.

    Keys of heads the model does not have are dropped (reported); any other key the model does not have, any shape
    mismatch, and any model parameter that is neither loaded nor allowed by `allowed_new` is an error.
    """
    is_base = isinstance(model, BEVTModel)
    expected = model.state_dict()
    loadable: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in tensors.items():
        name = key.removeprefix("bevt.") if is_base else key
        is_head = not key.startswith("bevt.")
        if is_head and name not in expected:
            report.dropped[origin[key]] = f"not part of {type(model).__name__}"
            continue
        if name not in expected:
            unexpected.append(f"{origin[key]} -> {name}")
        elif tuple(value.shape) != tuple(expected[name].shape):
            mismatched.append(f"{origin[key]} {tuple(value.shape)} -> {name} {tuple(expected[name].shape)}")
        else:
            loadable[name] = value
            report.mapped[name] = origin[key]
    if unexpected or mismatched:
        problems = []
        if unexpected:
            problems.append(f"tensors the inferred architecture has no parameter for: {', '.join(unexpected[:30])}")
        if mismatched:
            problems.append(f"shape mismatches: {', '.join(mismatched[:30])}")
        raise ConversionError("the checkpoint does not fit the model; " + "; ".join(problems))

    rules = [(re.compile(pattern), reason) for pattern, reason in allowed_new]
    missing = []
    for name in expected:
        if name in loadable:
            continue
        full = f"bevt.{name}" if is_base else name
        reason = next((r for p, r in rules if p.search(full)), None)
        if reason is None:
            missing.append(name)
        else:
            report.new_init[name] = reason
    if missing:
        raise ConversionError(
            f"{len(missing)} parameters of {type(model).__name__} are not in the checkpoint (nothing is left "
            f"randomly initialised silently): {', '.join(missing[:40])}" + (" ..." if len(missing) > 40 else "")
        )
    incompatible = model.load_state_dict(loadable, strict=False)
    if incompatible.unexpected_keys:  # cannot happen after the checks above; never ignore it silently
        raise ConversionError(f"unexpected keys while loading: {incompatible.unexpected_keys[:10]}")


def _check_format(fmt: str, arch: Architecture) -> None:
    if fmt == "swin2d-image" and not arch.is_image:
        raise ConversionError(
            "--format swin2d-image expects a 2D patch embedding (E, C, ph, pw); this checkpoint's is 3D "
            f"{arch.patch_size}: use --format video-swin or bevt-pretrain"
        )
    if fmt != "swin2d-image" and arch.is_image:
        raise ConversionError(
            f"--format {fmt} expects a video checkpoint, but its patch embedding is 2D: use --format swin2d-image"
        )
    if fmt == "video-swin" and arch.num_labels is None and arch.vocab_size is not None:
        raise ConversionError(
            "--format video-swin expects a recognizer (cls_head.fc_cls); this checkpoint has the pretraining "
            "head cls_head.lm_head: use --format bevt-pretrain"
        )
    if fmt == "bevt-pretrain" and arch.vocab_size is None and arch.num_labels is not None:
        raise ConversionError(
            "--format bevt-pretrain expects the pretraining head cls_head.lm_head; this checkpoint has a "
            "classifier cls_head.fc_cls: use --format video-swin"
        )


def _config_for(
    arch: Architecture,
    window_size: tuple[int, int, int],
    num_frames: int,
    vocab_size: int | None,
    id2label: Sequence[str] | None,
    **config_kwargs: Any,
) -> BEVTConfig:
    patch_size = arch.patch_size if not arch.is_image else (DEFAULT_TEMPORAL_PATCH, *arch.patch_size)
    kwargs: dict[str, Any] = {
        "embed_dim": arch.embed_dim,
        "depths": arch.depths,
        "num_heads": arch.num_heads,
        "patch_size": patch_size,
        "num_channels": arch.num_channels,
        "window_size": window_size,
        "mlp_ratio": arch.mlp_ratio,
        "qkv_bias": arch.qkv_bias,
        "patch_norm": arch.patch_norm,
        "num_frames": num_frames,
    }
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    if arch.num_labels is not None:
        if id2label is not None:
            if len(id2label) != arch.num_labels:
                raise ConversionError(
                    f"the label file has {len(id2label)} class names, the checkpoint's classifier has "
                    f"{arch.num_labels} outputs"
                )
            kwargs["id2label"] = dict(enumerate(id2label))
            kwargs["label2id"] = {name: i for i, name in enumerate(id2label)}
        else:
            kwargs["num_labels"] = arch.num_labels
    return BEVTConfig(**{**kwargs, **config_kwargs})


def convert_state_dict(
    fmt: str,
    state_dict: Mapping[str, torch.Tensor],
    *,
    task: str | None = None,
    window_size: Sequence[int] | None = None,
    checkpoint_window_size: Sequence[int] | None = None,
    num_frames: int | None = None,
    id2label: Sequence[str] | None = None,
    drop_keys: Iterable[str] = (),
    **config_kwargs: Any,
) -> tuple[BEVTPreTrainedModel, ConversionReport]:
    """Convert an in-memory state dict of one of `FORMATS` into a `bevt` model (eval mode, float32).

    Args:
        fmt: source format, one of `FORMATS`.
        state_dict: the weights (already unwrapped from `state_dict`/`model`, see `extract_state_dict`).
        task: "pretraining", "classification" or "base" (the model class); default: the format's natural one.
        window_size: target attention window (D, H, W). Default: the checkpoint's own window for video checkpoints,
            8x7x7 for image checkpoints. A different window resizes the bias tables (trilinear, as the official
            fine-tuning code; 2D tables: bicubic, then repeated over time).
        checkpoint_window_size: the checkpoint's window, when its bias-table size fits several windows.
        num_frames: clip length stored in the config (read by the video-classification pipeline).
        id2label: class names, in classifier order (their number must match the classifier).
        drop_keys: regular expressions of source keys to drop on purpose (reported).
        **config_kwargs: other `BEVTConfig` fields that the weights do not determine (e.g. `drop_path_rate`).

    Returns:
        (model, report).
    """
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; choose one of {FORMATS + TOKENIZER_FORMATS}")
    task = task or FORMAT_TASKS[fmt][0]
    if task not in FORMAT_TASKS[fmt]:
        raise ConversionError(f"--format {fmt} converts to task {' or '.join(FORMAT_TASKS[fmt])}, not {task!r}")
    tensors, origin, dropped = _normalize(fmt, state_dict, drop_keys)
    target_window = tuple(window_size) if window_size is not None else None
    preferred = [w for w in (target_window, DEFAULT_WINDOW_SIZE) if w is not None]
    given = tuple(checkpoint_window_size) if checkpoint_window_size is not None else None
    arch = infer_architecture(tensors, window_size=given, preferred_windows=preferred)
    _check_format(fmt, arch)
    if target_window is None:
        target_window = DEFAULT_WINDOW_SIZE if arch.is_image else arch.window_size
    if len(target_window) != 3:
        raise ConversionError(f"window size must be 3 numbers (D H W), got {target_window}")

    report = ConversionReport(
        format=fmt,
        task=task,
        model_class=TASKS[task].__name__,
        source_window_size=arch.window_size,
        window_size=target_window,
        dropped=dropped,
    )
    if task == "classification" and arch.num_labels is None:
        raise ConversionError("no classifier (cls_head.fc_cls / head) in the checkpoint: use --task base")
    if id2label is not None and task != "classification":
        raise ConversionError(f"class names (--id2label) only apply to classification models, not task {task!r}")
    config = _config_for(
        arch, target_window, num_frames or DEFAULT_CLIP[fmt][0], arch.vocab_size, id2label, **config_kwargs
    )
    tensors = _transform(tensors, origin, arch, config, report)
    bevt_tensors, bevt_origin = _to_bevt_keys(tensors, origin)
    model = TASKS[task](config)
    _load_strict(model, bevt_tensors, bevt_origin, _NEW_INIT_ALLOWED[fmt], report)
    if isinstance(model, BEVTModel):
        _base_names(report)
    return model.eval(), report


def _transform(
    tensors: dict[str, torch.Tensor],
    origin: dict[str, str],
    arch: Architecture,
    config: BEVTConfig,
    report: ConversionReport,
) -> dict[str, torch.Tensor]:
    """Inflate an image checkpoint to 3D or resize the bias tables of a video checkpoint to `config.window_size`.
    Records what changed in `report.transformed` (under official-layout names; renamed later)."""
    window = tuple(config.window_size)
    notes: dict[str, str] = {}
    if arch.is_image:
        tensors, derived = inflate_2d_state_dict(tensors, arch.window_size, window, config.patch_size[0])
        for key, source in derived.items():
            origin[key] = origin[source]
            if key == "patch_embed.proj.weight":
                notes[key] = f"2D patch embedding repeated over {config.patch_size[0]} frames / {config.patch_size[0]}"
            elif key.endswith("relative_position_bias_table"):
                resize = "bicubic-resized, " if arch.window_size != window[1:] else ""
                notes[key] = f"2D bias table {resize}repeated over {2 * window[0] - 1} temporal offsets"
    elif arch.window_size != window:
        for key in [k for k in tensors if k.endswith("attn.relative_position_bias_table")]:
            tensors[key] = resize_relative_position_bias(tensors[key], arch.window_size, window)
            notes[key] = f"trilinear-resized from window {arch.window_size} to {window}"
    for key, note in notes.items():
        target = official_to_bevt_key(key)
        if target is not None:
            report.transformed[target] = note
    return tensors


def _base_names(report: ConversionReport) -> None:
    """For a `BEVTModel`, `transformed` keys lose their `bevt.` prefix like the parameters do."""
    report.transformed = {k.removeprefix("bevt."): v for k, v in report.transformed.items()}


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------


def convert_checkpoint(
    fmt: str,
    checkpoint: PathLike,
    output_dir: PathLike | None = None,
    *,
    task: str | None = None,
    window_size: Sequence[int] | None = None,
    checkpoint_window_size: Sequence[int] | None = None,
    num_frames: int | None = None,
    id2label: Sequence[str] | PathLike | None = None,
    drop_keys: Iterable[str] = (),
    frame_interval: int | None = None,
    sampling_mode: str = "dense",
    **config_kwargs: Any,
) -> tuple[BEVTPreTrainedModel, ConversionReport]:
    """Read `checkpoint` safely, convert it (see `convert_state_dict`) and, with `output_dir`, write a folder that
    loads with `from_pretrained` / the Auto classes: the model (config.json + safetensors), a `BEVTVideoProcessor`
    (`num_frames` frames, `frame_interval` apart) and `conversion_report.json`.

    `id2label` is a list of class names or the path of a text file with one name per line.
    """
    state_dict, ignored = read_checkpoint(checkpoint)
    if isinstance(id2label, str | os.PathLike):
        id2label = read_label_file(id2label)
    model, report = convert_state_dict(
        fmt,
        state_dict,
        task=task,
        window_size=window_size,
        checkpoint_window_size=checkpoint_window_size,
        num_frames=num_frames,
        id2label=id2label,
        drop_keys=drop_keys,
        **config_kwargs,
    )
    report.checkpoint = str(checkpoint)
    report.ignored_entries = ignored
    if output_dir is not None:
        output_dir = Path(output_dir)
        model.save_pretrained(output_dir)
        _, default_interval, short_side = DEFAULT_CLIP[fmt]
        _save_video_processor(model.config, output_dir, frame_interval or default_interval, sampling_mode, short_side)
        (output_dir / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return model, report


def _save_video_processor(
    config: BEVTConfig, output_dir: Path, frame_interval: int, sampling_mode: str, short_side: int
) -> bool:
    """Write a `BEVTVideoProcessor` matching the clip length, so the folder works with `pipeline(...)`: resize the
    short side to `short_side`, centre crop `config.image_size`."""
    try:
        from .processing_bevt import BEVTVideoProcessor
    except ImportError:  # the video processor needs torchvision
        return False
    processor = BEVTVideoProcessor(
        num_frames=config.num_frames,
        frame_interval=frame_interval,
        sampling_mode=sampling_mode,
        size={"shortest_edge": max(short_side, config.image_size)},
        crop_size={"height": config.image_size, "width": config.image_size},
    )
    processor.save_pretrained(output_dir)
    return True


def load_swin2d_into(
    model: BEVTPreTrainedModel,
    checkpoint: PathLike | Mapping[str, Any],
    *,
    checkpoint_window_size: Sequence[int] | None = None,
    drop_keys: Iterable[str] = (),
) -> ConversionReport:
    """Initialise `model` (any BEVT class) in place from a 2D Swin image checkpoint, inflated as the official code
    does (see `inflate_2d_state_dict`), for the window and temporal patch size of `model.config`.

    The checkpoint's architecture must match the model's (embed dim, depths, heads, patch size, MLP ratio). Parameters
    an image checkpoint cannot provide (video head, mask token or prediction head if absent, classifier) keep their
    current values and are listed in `report.new_init`; everything else comes from the checkpoint.

    Args:
        checkpoint: a file path, or an already loaded checkpoint / state dict.
    Returns:
        The conversion report.
    """
    if isinstance(checkpoint, Mapping):
        state_dict, ignored = extract_state_dict(checkpoint)
        source = None
    else:
        state_dict, ignored = read_checkpoint(checkpoint)
        source = str(checkpoint)
    config = model.config
    tensors, origin, dropped = _normalize("swin2d-image", state_dict, drop_keys)
    given = tuple(checkpoint_window_size) if checkpoint_window_size is not None else None
    arch = infer_architecture(tensors, window_size=given, preferred_windows=[tuple(config.window_size)])
    _check_format("swin2d-image", arch)
    differences = [
        f"{name}: checkpoint {theirs}, model {ours}"
        for name, theirs, ours in (
            ("embed_dim", arch.embed_dim, config.embed_dim),
            ("depths", arch.depths, tuple(config.depths)),
            ("num_heads", arch.num_heads, tuple(config.num_heads)),
            ("patch_size (h, w)", arch.patch_size, tuple(config.patch_size[1:])),
            ("num_channels", arch.num_channels, config.num_channels),
            ("mlp_ratio", arch.mlp_ratio, config.mlp_ratio),
            ("qkv_bias", arch.qkv_bias, config.qkv_bias),
            ("patch_norm", arch.patch_norm, config.patch_norm),
        )
        if theirs != ours
    ]
    if differences:
        raise ConversionError(f"the 2D checkpoint does not match the model: {'; '.join(differences)}")
    report = ConversionReport(
        format="swin2d-image",
        task="load_swin2d_into",
        model_class=type(model).__name__,
        source_window_size=arch.window_size,
        window_size=tuple(config.window_size),
        checkpoint=source,
        dropped=dropped,
        ignored_entries=ignored,
    )
    tensors = _transform(tensors, origin, arch, config, report)
    bevt_tensors, bevt_origin = _to_bevt_keys(tensors, origin)
    _load_strict(model, bevt_tensors, bevt_origin, _IMAGE_CHECKPOINT_NEW, report)
    if isinstance(model, BEVTModel):
        _base_names(report)
    return report


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = CLIArgumentParser(
        prog="python -m bevt.convert",
        description="Convert original BEVT / Video Swin / Swin / torchvision checkpoints into bevt model folders.",
    )
    parser.add_argument("--format", required=True, choices=FORMATS + TOKENIZER_FORMATS)
    parser.add_argument("--checkpoint", required=True, type=Path, help=".pth/.pt/.bin/.ckpt/.pkl or .safetensors")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument(
        "--task",
        choices=tuple(TASKS),
        help="model class: pretraining (BEVTForMaskedVideoModeling), classification (BEVTForVideoClassification) "
        "or base (BEVTModel); default: pretraining for bevt-pretrain/swin2d-image, classification otherwise",
    )
    parser.add_argument(
        "--window-size",
        type=int,
        nargs=3,
        metavar=("D", "H", "W"),
        help="attention window of the converted model; default: the checkpoint's (8 7 7 for 2D checkpoints). "
        "A different one interpolates the relative position bias tables.",
    )
    parser.add_argument(
        "--checkpoint-window-size",
        type=int,
        nargs="+",
        metavar="N",
        help="the checkpoint's own window (D H W, or H W for 2D), if its bias-table size is ambiguous",
    )
    parser.add_argument("--num-frames", type=int, help="clip length stored in the config and the video processor")
    parser.add_argument("--frame-interval", type=int, help="frame step of the saved video processor (default 8 or 2)")
    parser.add_argument(
        "--sampling-mode",
        "--sampling",
        choices=("dense", "uniform"),
        default="dense",
        help="frame sampling of the saved video processor (uniform for Something-Something)",
    )
    parser.add_argument(
        "--label-names",
        "--id2label",
        dest="id2label",
        type=Path,
        metavar="FILE",
        help="text file with one class name per line, in classifier order",
    )
    parser.add_argument(
        "--drop-keys",
        action="append",
        default=[],
        metavar="REGEX",
        help="drop source tensors whose key matches REGEX (repeatable); reported in the summary",
    )
    parser.add_argument("--vqgan-norm-groups", type=int, default=32, help="GroupNorm groups (vqgan-encoder only)")
    parser.add_argument(
        "--decoder",
        type=Path,
        help="tokenizer formats only: also convert the decoder (decode(ids) -> pixels): OpenAI's decoder.pkl for "
        "dalle-encoder; for vqgan-encoder a taming checkpoint with post_quant_conv.* and decoder.* (usually the "
        "--checkpoint file itself)",
    )
    return parser


def _convert_tokenizer(args: argparse.Namespace) -> str:
    from .convert_tokenizer import convert_tokenizer_files

    model = convert_tokenizer_files(
        args.format, args.checkpoint, args.output_dir, args.decoder, args.vqgan_norm_groups
    )
    decoder = " with decoder" if getattr(model.config, "has_decoder", False) else ""
    return f"{args.format} -> {type(model).__name__}{decoder} (vocab {model.config.vocab_size})"


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad flag values before reading anything (argparse's usage error: exit status 2, no traceback)."""
    for flag, value in (("--num-frames", args.num_frames), ("--frame-interval", args.frame_interval)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be a positive integer, got {value}")
    if args.window_size is not None and min(args.window_size) < 1:
        parser.error(f"--window-size must be three positive integers (D H W), got {' '.join(map(str, args.window_size))}")
    given = args.checkpoint_window_size
    if given is not None and (len(given) not in (2, 3) or min(given) < 1):
        parser.error(
            f"--checkpoint-window-size must be D H W (3D) or H W (2D) positive integers, got {' '.join(map(str, given))}"
        )
    if args.vqgan_norm_groups < 1:
        parser.error(f"--vqgan-norm-groups must be a positive integer, got {args.vqgan_norm_groups}")
    if args.id2label is not None and not args.id2label.is_file():
        parser.error(f"--id2label: file not found: {args.id2label}")
    if args.decoder is not None and args.format not in TOKENIZER_FORMATS:
        parser.error(f"--decoder is for the tokenizer formats ({', '.join(TOKENIZER_FORMATS)}), not {args.format}")
    for pattern in args.drop_keys:
        try:
            re.compile(pattern)
        except re.error as error:
            parser.error(f"--drop-keys {pattern!r} is not a valid regular expression: {error}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 on success, 1 when the checkpoint cannot be converted,
    2 for invalid flags)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        if args.format in TOKENIZER_FORMATS:
            summary = _convert_tokenizer(args)
        else:
            _, report = convert_checkpoint(
                args.format,
                args.checkpoint,
                args.output_dir,
                task=args.task,
                window_size=args.window_size,
                checkpoint_window_size=args.checkpoint_window_size,
                num_frames=args.num_frames,
                id2label=read_label_file(args.id2label) if args.id2label else None,
                drop_keys=args.drop_keys,
                frame_interval=args.frame_interval,
                sampling_mode=args.sampling_mode,
            )
            summary = report.summary()
    except (ValueError, OSError) as error:
        # ConversionError and UnsafeCheckpointError are ValueErrors, like a corrupt or wrong-format checkpoint;
        # OSError: missing / unreadable files. A user error, not a crash: one line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary)
    print(f"saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
