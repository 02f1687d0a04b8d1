"""State-dict transformations behind `bevt.convert`: key layouts, architecture inference, 2D -> 3D inflation
and relative-position-bias resizing for Swin / Video Swin / BEVT checkpoints.

Every source format is first brought to one *official layout*: the parameter names of the official BEVT backbone
(`SwinTransformerBEVT` in xyzforever/BEVT, a superset of Video Swin's `SwinTransformer3D`) without the `backbone.`
prefix, e.g. `patch_embed.proj.weight`, `layers.0.blocks.1.attn.qkv.weight`, `layers.0.downsample.reduction.weight`,
`norm.weight`, `fpn_s.0.weight`, plus `cls_head.lm_head.*` / `cls_head.fc_cls.*` for the heads. That layout is then
renamed to the `bevt` parameter names with one table (`OFFICIAL_TO_BEVT`).

Shapes: a 3D relative-position-bias table of a (Wd, Wh, Ww) window is ((2Wd-1)(2Wh-1)(2Ww-1), heads), rows in
(d, h, w) order; a 2D one of a (Wh, Ww) window is ((2Wh-1)(2Ww-1), heads).
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "OFFICIAL_TO_BEVT",
    "Architecture",
    "ConversionError",
    "droppable_reason",
    "infer_architecture",
    "infer_window",
    "inflate_2d_state_dict",
    "inflate_patch_embedding",
    "inflate_relative_position_bias",
    "normalize_mmaction_keys",
    "normalize_swin2d_keys",
    "normalize_torchvision_keys",
    "official_to_bevt_key",
    "resize_relative_position_bias",
    "window_candidates",
]

DEFAULT_WINDOW_SIZE = (8, 7, 7)
DEFAULT_TEMPORAL_PATCH = 2

_BLOCK = r"^layers\.(\d+)\.blocks\.(\d+)\."
_ENC = "bevt.encoder.layers.{0}.blocks.{1}."

# Official layout -> bevt names. Each entry: (pattern, template with {0}, {1}, ... = the pattern's groups).
OFFICIAL_TO_BEVT: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), template)
    for pattern, template in (
        (r"^patch_embed\.proj\.(weight|bias)$", "bevt.embeddings.patch_embeddings.projection.{0}"),
        (r"^patch_embed\.norm\.(weight|bias)$", "bevt.embeddings.patch_embeddings.norm.{0}"),
        (r"^patch_embed_2d\.proj\.(weight|bias)$", "bevt.embeddings.patch_embeddings.image_projection.{0}"),
        (r"^patch_embed_2d\.norm\.(weight|bias)$", "bevt.embeddings.patch_embeddings.image_norm.{0}"),
        (r"^mask_token$", "bevt.embeddings.mask_token"),
        (_BLOCK + r"norm1\.(weight|bias)$", _ENC + "layernorm_before.{2}"),
        (_BLOCK + r"attn\.(qkv|proj)\.(weight|bias)$", _ENC + "attention.{2}.{3}"),
        (_BLOCK + r"attn\.relative_position_bias_table$", _ENC + "attention.relative_position_bias_table"),
        (_BLOCK + r"norm2\.(weight|bias)$", _ENC + "layernorm_after.{2}"),
        (_BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)$", _ENC + "mlp.{2}.{3}"),
        (r"^layers\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)$", "bevt.encoder.layers.{0}.downsample.{1}.{2}"),
        (r"^norm\.(weight|bias)$", "bevt.layernorm.{0}"),
        (r"^fpn_s\.0\.(weight|bias)$", "head.video_spatial_upsample.{0}"),
        (r"^lm_down_st\.0\.(weight|bias)$", "head.video_fuse.{0}"),
        (r"^fpn_t\.0\.(weight|bias)$", "head.video_temporal_upsample.{0}"),
        (r"^fpn\.0\.(weight|bias)$", "head.image_upsample.{0}"),
        (r"^lm_down\.(weight|bias)$", "head.image_fuse.{0}"),
        (r"^cls_head\.lm_head\.(weight|bias)$", "head.lm_head.{0}"),
        (r"^cls_head\.fc_cls\.(weight|bias)$", "classifier.{0}"),
    )
)

# Official-layout keys that never become parameters, with the reason reported to the user.
_ALWAYS_DROPPED: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|\.)relative_position_index$"), "relative position index buffer (recomputed from the window)"),
    (re.compile(r"(^|\.)attn_mask$"), "shifted-window mask buffer (recomputed)"),
    (
        re.compile(r"^cls_head\.vae_encoder\."),
        "visual tokenizer (DALL-E encoder) inside the pretraining checkpoint; convert it with --format dalle-encoder",
    ),
    (
        re.compile(r"(^|\.)unknown_relative_position_bias_table$"),
        "bias table of the official 'time removal' variant, never used at inference",
    ),
)
# Extra keys of 2D image checkpoints that have no counterpart in a video model.
_SWIN2D_DROPPED: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^head\."), "image classification head of the 2D model"),
    (re.compile(r"^decoder\."), "pixel decoder of a SimMIM-style image pretraining model"),
    (re.compile(r"^encoder_k\."), "momentum (key) encoder"),
)


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the problem and lists the keys involved."""


def _key_list(keys: Iterable[str], limit: int = 30) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------------------------------------------
# Source layouts -> official layout. Each returns (official-layout tensors, official key -> original key).
# --------------------------------------------------------------------------------------------------------------


def _strip_prefixes(
    state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Remove each prefix (in order) from the start of every key, as the official loaders' `re.sub` calls do."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new = key
        for prefix in prefixes:
            new = new.removeprefix(prefix)
        if new in out:
            raise ConversionError(f"keys {origin[new]!r} and {key!r} both become {new!r} after removing prefixes")
        out[new], origin[new] = value, key
    return out, origin


def normalize_mmaction_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """mmaction2 recognizer checkpoint (`backbone.*`, `cls_head.*`, optionally under DDP's `module.`) -> official
    layout. A bare backbone state dict (no prefix) passes through unchanged."""
    return _strip_prefixes(state_dict, ("module.", "backbone."))


def normalize_swin2d_keys(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """2D Swin image checkpoint -> official (2D) layout, as the official `inflate_weights` reads it.

    Removes `module.`, `backbone.`, `encoder.` prefixes; `fc_norm.*` replaces `norm.*` (the official code copies it
    over); a top-level `lm_head.*` is taken as the prediction head `cls_head.lm_head.*`.

    Returns:
        (tensors, official key -> original key, dropped original key -> reason)
    """
    tensors, origin = _strip_prefixes(state_dict, ("module.", "backbone.", "encoder."))
    dropped: dict[str, str] = {}
    if "fc_norm.weight" in tensors:
        for param in ("weight", "bias"):
            if f"norm.{param}" in tensors:
                dropped[origin.pop(f"norm.{param}")] = "replaced by fc_norm, as the official inflation does"
                del tensors[f"norm.{param}"]
            if f"fc_norm.{param}" in tensors:
                tensors[f"norm.{param}"] = tensors.pop(f"fc_norm.{param}")
                origin[f"norm.{param}"] = origin.pop(f"fc_norm.{param}")
    for key in [k for k in tensors if k.startswith("lm_head.")]:
        new = "cls_head." + key
        tensors[new], origin[new] = tensors.pop(key), origin.pop(key)
    return tensors, origin, dropped


def normalize_torchvision_keys(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """torchvision `swin3d_t/s/b` state dict -> official layout.

    `features.{2i}.{j}.*` is block j of stage i (`mlp.0`/`mlp.3` are `fc1`/`fc2`), `features.{2i+1}.*` the patch
    merging after stage i, `head.*` the classifier (`cls_head.fc_cls.*`). Unknown keys are kept as they are (and
    reported as unmapped later).
    """
    tensors, origin = _strip_prefixes(state_dict, ("module.",))
    out: dict[str, torch.Tensor] = {}
    out_origin: dict[str, str] = {}
    for key, value in tensors.items():
        new = key
        if m := re.match(r"^features\.(\d+)\.(\d+)\.(.*)$", key):
            index, block, rest = int(m[1]), m[2], m[3]
            if index % 2 == 0:
                rest = re.sub(r"^mlp\.0\.", "mlp.fc1.", re.sub(r"^mlp\.3\.", "mlp.fc2.", rest))
                new = f"layers.{index // 2}.blocks.{block}.{rest}"
        elif m := re.match(r"^features\.(\d+)\.(reduction|norm)\.(.*)$", key):
            if int(m[1]) % 2 == 1:
                new = f"layers.{(int(m[1]) - 1) // 2}.downsample.{m[2]}.{m[3]}"
        elif m := re.match(r"^head\.(weight|bias)$", key):
            new = f"cls_head.fc_cls.{m[1]}"
        out[new], out_origin[new] = value, origin[key]
    return out, out_origin


def droppable_reason(key: str, image_checkpoint: bool = False) -> str | None:
    """Why an official-layout key is not converted (e.g. index buffers, the tokenizer), or None if it should be."""
    rules = _ALWAYS_DROPPED + (_SWIN2D_DROPPED if image_checkpoint else ())
    for pattern, reason in rules:
        if pattern.search(key):
            return reason
    return None


def official_to_bevt_key(key: str) -> str | None:
    """Official-layout key -> `bevt` parameter name (as in `BEVTForMaskedVideoModeling` /
    `BEVTForVideoClassification`), or None when the key has no counterpart."""
    for pattern, template in OFFICIAL_TO_BEVT:
        if m := pattern.match(key):
            return template.format(*m.groups())
    return None


# --------------------------------------------------------------------------------------------------------------
# Architecture inference
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """What the tensors of an official-layout state dict say about the model.

    `window_size` is the checkpoint's own window: 3 values for video checkpoints, 2 for image checkpoints.
    `patch_size` is (pt, ph, pw) for video checkpoints and (ph, pw) for image ones.
    """

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    patch_size: tuple[int, ...]
    num_channels: int
    window_size: tuple[int, ...]
    mlp_ratio: float
    qkv_bias: bool
    patch_norm: bool
    vocab_size: int | None = None
    num_labels: int | None = None

    @property
    def is_image(self) -> bool:
        return len(self.patch_size) == 2


def window_candidates(table_length: int, ndim: int) -> list[tuple[int, ...]]:
    """Windows with square spatial part whose bias table has `table_length` rows.

    ndim 2: (W, W) with (2W-1)^2 = L. ndim 3: (Wd, W, W) with (2Wd-1)(2W-1)^2 = L and W >= 2 (the 1x1 spatial
    window is only listed when nothing else fits).
    """
    if ndim == 2:
        side = round(table_length**0.5)
        return [((side + 1) // 2,) * 2] if side * side == table_length and side % 2 == 1 else []
    found = []
    for side in range(3, int(table_length**0.5) + 1, 2):
        depth, rest = divmod(table_length, side * side)
        if rest == 0 and depth % 2 == 1:
            found.append(((depth + 1) // 2, (side + 1) // 2, (side + 1) // 2))
    if not found and table_length % 2 == 1:
        found.append(((table_length + 1) // 2, 1, 1))
    return found


def _table_length(window: tuple[int, ...]) -> int:
    length = 1
    for w in window:
        length *= 2 * w - 1
    return length


def infer_window(
    table_lengths: Mapping[str, int],
    ndim: int,
    given: tuple[int, ...] | None = None,
    preferred: Iterable[tuple[int, ...]] = (),
) -> tuple[int, ...]:
    """The checkpoint's window from its bias-table lengths (all tables must agree).

    Args:
        table_lengths: bias-table key -> number of rows.
        ndim: 3 for video checkpoints, 2 for image checkpoints.
        given: the window the user says the checkpoint has; checked against the tables.
        preferred: windows to pick, in order, when several fit (e.g. the target window, then 8x7x7).
    """
    lengths = set(table_lengths.values())
    if not lengths:
        raise ConversionError("the checkpoint has no relative_position_bias_table: cannot tell the window size")
    if len(lengths) > 1:
        by_length: dict[int, list[str]] = {}
        for key, length in table_lengths.items():
            by_length.setdefault(length, []).append(key)
        detail = "; ".join(f"{n} rows: {_key_list(keys, 3)}" for n, keys in sorted(by_length.items()))
        raise ConversionError(f"relative_position_bias_table sizes disagree (one window for all blocks expected): {detail}")
    length = lengths.pop()
    if given is not None:
        given = tuple(given[-ndim:])
        if _table_length(given) != length:
            raise ConversionError(
                f"the checkpoint window {'x'.join(map(str, given))} needs bias tables of {_table_length(given)} rows, "
                f"the checkpoint's have {length}"
            )
        return given
    candidates = window_candidates(length, ndim)
    if not candidates:
        raise ConversionError(
            f"no {'(Wd, W, W)' if ndim == 3 else '(W, W)'} window gives bias tables of {length} rows; give the "
            "checkpoint's window with --checkpoint-window-size"
        )
    for window in preferred:
        window = tuple(window[-ndim:])
        if window in candidates:
            return window
    if len(candidates) > 1:
        raise ConversionError(
            f"bias tables of {length} rows fit several windows {candidates}; give the checkpoint's window with "
            "--checkpoint-window-size"
        )
    return candidates[0]


def _stage_indices(keys: Iterable[str]) -> dict[int, set[int]]:
    stages: dict[int, set[int]] = {}
    for key in keys:
        if m := re.match(_BLOCK, key):
            stages.setdefault(int(m[1]), set()).add(int(m[2]))
    return stages


def infer_architecture(
    state_dict: Mapping[str, torch.Tensor],
    window_size: tuple[int, ...] | None = None,
    preferred_windows: Iterable[tuple[int, ...]] = (DEFAULT_WINDOW_SIZE,),
) -> Architecture:
    """Read the architecture from an official-layout state dict.

    embed dim, input channels and patch size from `patch_embed.proj.weight` ((E, C, pt, ph, pw) for video,
    (E, C, ph, pw) for image checkpoints); depths from the block indices of each stage; heads from the bias tables'
    second dimension; the window from their length (see `infer_window`); MLP ratio from `fc1`; qkv bias and patch
    norm from the presence of their keys; vocabulary / label count from `cls_head.lm_head` / `cls_head.fc_cls`.

    Raises:
        ConversionError: a required tensor is missing or tensors disagree (the message lists the keys).
    """
    if "patch_embed.proj.weight" not in state_dict:
        raise ConversionError(
            "no patch embedding (patch_embed.proj.weight) in the checkpoint; keys look like: "
            f"{_key_list(state_dict, 8)}"
        )
    patch = state_dict["patch_embed.proj.weight"]
    if patch.ndim not in (4, 5):
        raise ConversionError(f"patch_embed.proj.weight has shape {tuple(patch.shape)}; expected a Conv2d/Conv3d weight")
    embed_dim, num_channels = int(patch.shape[0]), int(patch.shape[1])
    patch_size = tuple(int(s) for s in patch.shape[2:])

    stages = _stage_indices(state_dict)
    if not stages:
        raise ConversionError("no transformer blocks (layers.{i}.blocks.{j}.*) found in the checkpoint")
    if sorted(stages) != list(range(len(stages))):
        raise ConversionError(f"stages found: {sorted(stages)}; expected 0..{len(stages) - 1}")
    depths, heads, tables = [], [], {}
    ratios: dict[str, float] = {}
    for stage in range(len(stages)):
        blocks = sorted(stages[stage])
        if blocks != list(range(len(blocks))):
            raise ConversionError(f"stage {stage} has blocks {blocks}; expected 0..{len(blocks) - 1}")
        depths.append(len(blocks))
        stage_heads = set()
        for block in blocks:
            prefix = f"layers.{stage}.blocks.{block}."
            table_key = prefix + "attn.relative_position_bias_table"
            fc1_key = prefix + "mlp.fc1.weight"
            for key in (table_key, fc1_key):
                if key not in state_dict:
                    raise ConversionError(f"missing {key}")
            table = state_dict[table_key]
            tables[table_key] = int(table.shape[0])
            stage_heads.add(int(table.shape[1]))
            fc1 = state_dict[fc1_key]
            ratios[fc1_key] = fc1.shape[0] / fc1.shape[1]
            dim = embed_dim * 2**stage
            if fc1.shape[1] != dim:
                raise ConversionError(
                    f"{fc1_key} takes {fc1.shape[1]} channels; stage {stage} of a model with embed dim {embed_dim} "
                    f"has {dim}"
                )
        if len(stage_heads) != 1:
            raise ConversionError(f"the bias tables of stage {stage} disagree on the number of heads: {stage_heads}")
        heads.append(stage_heads.pop())
    if len(set(ratios.values())) != 1:
        raise ConversionError(f"MLP ratios differ between blocks: {sorted(set(ratios.values()))}")
    window = infer_window(tables, len(patch_size), window_size, preferred_windows)
    lm_head = state_dict.get("cls_head.lm_head.weight")
    fc_cls = state_dict.get("cls_head.fc_cls.weight")
    return Architecture(
        embed_dim=embed_dim,
        depths=tuple(depths),
        num_heads=tuple(heads),
        patch_size=patch_size,
        num_channels=num_channels,
        window_size=window,
        mlp_ratio=next(iter(ratios.values())),
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in state_dict,
        patch_norm="patch_embed.norm.weight" in state_dict,
        vocab_size=int(lm_head.shape[0]) if lm_head is not None else None,
        num_labels=int(fc_cls.shape[0]) if fc_cls is not None else None,
    )


# --------------------------------------------------------------------------------------------------------------
# Tensor transformations
# --------------------------------------------------------------------------------------------------------------


def _check_table(table: torch.Tensor, window: tuple[int, ...], name: str) -> None:
    if table.ndim != 2 or table.shape[0] != _table_length(window):
        raise ConversionError(
            f"{name}: a {'x'.join(map(str, window))} window needs a ({_table_length(window)}, heads) bias table, "
            f"got shape {tuple(table.shape)}"
        )


def resize_relative_position_bias(
    table: torch.Tensor, source_window: tuple[int, int, int], target_window: tuple[int, int, int]
) -> torch.Tensor:
    """Resize a 3D bias table to another window, as the official fine-tuning code does (e.g. 8x7x7 -> 16x7x7 for
    Something-Something v2): the table is viewed as a (heads, 2Wd-1, 2Wh-1, 2Ww-1) volume and trilinearly
    interpolated (align_corners=False).

    Args:
        table: ((2Sd-1)(2Sh-1)(2Sw-1), heads) for the source window (Sd, Sh, Sw).
    Returns:
        ((2Td-1)(2Th-1)(2Tw-1), heads) for the target window; the input itself when the windows are equal.
    """
    source_window, target_window = tuple(source_window), tuple(target_window)
    _check_table(table, source_window, "relative_position_bias_table")
    if source_window == target_window:
        return table
    heads = table.shape[1]
    volume = table.float().t().reshape(1, heads, *(2 * w - 1 for w in source_window))
    resized = F.interpolate(volume, size=tuple(2 * w - 1 for w in target_window), mode="trilinear")
    return resized.reshape(heads, -1).t().contiguous().to(table.dtype)


def inflate_relative_position_bias(
    table: torch.Tensor, source_window: tuple[int, int], target_window: tuple[int, int, int]
) -> torch.Tensor:
    """2D bias table -> 3D, as the official inflation: bicubic-resize (align_corners=False) the (2Sh-1, 2Sw-1)
    table to (2Wh-1, 2Ww-1) when the spatial windows differ, then repeat it for each of the 2Wd-1 temporal offsets
    (every temporal offset gets the same spatial bias).

    Args:
        table: ((2Sh-1)(2Sw-1), heads).
    Returns:
        ((2Wd-1)(2Wh-1)(2Ww-1), heads).
    """
    source_window, target_window = tuple(source_window), tuple(target_window)
    _check_table(table, source_window, "2D relative_position_bias_table")
    if source_window != target_window[1:]:
        heads = table.shape[1]
        grid = table.float().t().reshape(1, heads, *(2 * w - 1 for w in source_window))
        grid = F.interpolate(grid, size=tuple(2 * w - 1 for w in target_window[1:]), mode="bicubic")
        table = grid.reshape(heads, -1).t().contiguous().to(table.dtype)
    return table.repeat(2 * target_window[0] - 1, 1)


def inflate_patch_embedding(weight: torch.Tensor, temporal_patch: int) -> torch.Tensor:
    """Conv2d patch weight (E, C, ph, pw) -> Conv3d (E, C, pt, ph, pw): repeated over time and divided by pt, so a
    clip of identical frames gets the 2D embedding of the frame."""
    if weight.ndim != 4:
        raise ConversionError(f"expected a 2D patch-embedding weight (E, C, ph, pw), got shape {tuple(weight.shape)}")
    return weight.unsqueeze(2).repeat(1, 1, temporal_patch, 1, 1) / temporal_patch


def inflate_2d_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    source_window: tuple[int, int],
    target_window: tuple[int, int, int] = DEFAULT_WINDOW_SIZE,
    temporal_patch: int = DEFAULT_TEMPORAL_PATCH,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Official-layout 2D Swin state dict -> official-layout BEVT (3D) state dict, as `inflate_weights` does.

    `patch_embed.*` is copied to the image patch embedding `patch_embed_2d.*`; `patch_embed.proj.weight` is inflated
    to a Conv3d weight (`inflate_patch_embedding`); bias tables go through `inflate_relative_position_bias`. All other
    tensors are kept as they are.

    Returns:
        (inflated state dict, new key -> the key it was made from) for the keys that were derived or changed.
    """
    out = dict(state_dict)
    derived: dict[str, str] = {}
    for key in [k for k in state_dict if k.startswith("patch_embed.")]:
        image_key = "patch_embed_2d." + key.removeprefix("patch_embed.")
        out[image_key] = state_dict[key]
        derived[image_key] = key
    out["patch_embed.proj.weight"] = inflate_patch_embedding(state_dict["patch_embed.proj.weight"], temporal_patch)
    derived["patch_embed.proj.weight"] = "patch_embed.proj.weight"
    for key in [k for k in state_dict if k.endswith("attn.relative_position_bias_table")]:
        out[key] = inflate_relative_position_bias(state_dict[key], source_window, target_window)
        derived[key] = key
    return out, derived
