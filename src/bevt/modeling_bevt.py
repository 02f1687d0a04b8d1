"""BEVT models: a Video Swin Transformer encoder that runs on videos and on images with one set of weights,
the BEVT masked visual-token prediction heads, and a video classification head.

Shapes used below: B batch, T frames, C channels, H x W pixels; after the 2x4x4 patch embedding a video has a
(D, Hp, Wp) = (T/2, H/4, W/4) token grid, an image a (Hp, Wp) = (H/4, W/4) grid. Inside the encoder tensors are
channels-last: video (B, D, H, W, C), image (B, H, W, C).

The fast paths (oneDNN linears, chunked window attention, recomputed LayerNorm/GELU) live in `kernels_bevt.py`;
each is one call here (`BEVTLinear`, the "sdpa" attention, `norm_linear`, `activation_linear`) that runs the plain
PyTorch code whenever the fast path does not apply. Input checks live in `inputs_bevt.py`; the output dataclasses,
losses, metrics and the multi-view score in `outputs_bevt.py`. Saved folders carry all three (remote code).
"""

import itertools
from collections.abc import Callable
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import AttentionInterface
from transformers.utils import logging

from .configuration_bevt import BEVTConfig
from .inputs_bevt import (
    check_class_ids,
    check_class_labels,
    check_mask,
    check_masked_labels,
    check_masked_modeling_stream,
    check_pixel_values,
    check_token_range,
    views_per_video,
)
from .kernels_bevt import (
    INFERENCE_CACHE_ATTRIBUTE,
    BEVTLinear,
    activation_linear,
    inference_cache,
    norm_linear,
    parameter_key,
    sdpa_window_attention_forward,
    window_attention_mask,
)
from .outputs_bevt import (
    BEVTMaskedVideoModelingOutput,
    BEVTModelOutput,
    average_views,
    classification_loss,
    masked_prediction_loss,
)

logger = logging.get_logger(__name__)

# Value of the shifted-window mask between tokens from different image regions: finite (not -inf), so it stays
# finite in half precision, as the original code's -100. Unlike -100 it makes the softmax weight of a masked pair
# exactly 0 instead of exp(-100) ~ 4e-44, a float32 denormal: on CPUs, arithmetic on denormals is many times slower
# (each masked row made the softmax, its gradient and the attention products 3-4x slower; a Swin-T training step
# 1.08x fp32 / 1.12x bf16 faster with this value; BENCHMARKS.md "Denormals and the native attention softmax").
# Same results: a weight of 4e-44 next to unmasked ones is below float32 resolution.
SHIFT_MASK_VALUE = -1.0e4


# ----------------------------------------------------------------------------------------------------------------
# Window helpers (work for any number of spatial axes: 2 for images, 3 for videos)
# ----------------------------------------------------------------------------------------------------------------


def window_and_shift(
    grid: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Video Swin rule: along an axis no longer than the window, the window shrinks to the axis and the shift is 0."""
    out_window, out_shift = list(window), list(shift)
    for i, (g, w) in enumerate(zip(grid, window)):
        if g <= w:
            out_window[i], out_shift[i] = g, 0
    return tuple(out_window), tuple(out_shift)


def window_partition(x: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """(B, *grid, C) with grid divisible by window -> (B, num_windows, prod(window), C)."""
    batch, *grid, channels = x.shape
    n = len(grid)
    split = [batch]
    for g, w in zip(grid, window):
        split += [g // w, w]
    x = x.view(*split, channels)
    # (B, g0, w0, g1, w1, ..., C) -> (B, g0, g1, ..., w0, w1, ..., C)
    order = [0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1]
    x = x.permute(*order)
    num_windows = 1
    volume = 1
    for g, w in zip(grid, window):
        num_windows *= g // w
        volume *= w
    return x.reshape(batch, num_windows, volume, channels)


def window_reverse(windows: torch.Tensor, window: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `window_partition`: (B, num_windows, prod(window), C) -> (B, *grid, C)."""
    batch, channels = windows.shape[0], windows.shape[-1]
    n = len(grid)
    counts = [g // w for g, w in zip(grid, window)]
    x = windows.view(batch, *counts, *window, channels)
    # (B, g0, g1, ..., w0, w1, ..., C) -> (B, g0, w0, g1, w1, ..., C)
    order = [0]
    for i in range(n):
        order += [1 + i, 1 + n + i]
    order.append(2 * n + 1)
    return x.permute(*order).reshape(batch, *grid, channels)


def shift_and_partition(x: torch.Tensor, window: tuple[int, ...], shift: tuple[int, ...]) -> torch.Tensor:
    """(B, *grid, C) -> zero-pad to whole windows -> cyclic shift by -shift -> windows (B, nW, N, C)."""
    grid = x.shape[1:-1]
    pad = []
    for g, w in zip(reversed(grid), reversed(window)):
        pad += [0, (w - g % w) % w]
    if any(pad):
        x = F.pad(x, [0, 0, *pad])
    if any(shift):
        x = torch.roll(x, shifts=tuple(-s for s in shift), dims=tuple(range(1, len(grid) + 1)))
    return window_partition(x, window)


def merge_and_unshift(
    windows: torch.Tensor, window: tuple[int, ...], shift: tuple[int, ...], grid: tuple[int, ...]
) -> torch.Tensor:
    """Inverse of `shift_and_partition`: windows (B, nW, N, C) -> padded grid -> shift back -> crop to (B, *grid, C)."""
    padded = tuple(-(-g // w) * w for g, w in zip(grid, window))
    x = window_reverse(windows, window, padded)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=tuple(range(1, len(grid) + 1)))
    if padded != grid:
        x = x[(slice(None), *[slice(0, g) for g in grid])]
    return x


def make_shift_mask(
    grid: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Additive mask (num_windows, N, N) for shifted windows on a padded `grid`: 0 within a region, SHIFT_MASK_VALUE
    across.

    Cached per (grid, window, shift, device) in eager mode; traced (and constant-folded) under torch.compile.
    """
    if torch.compiler.is_compiling():
        return _build_shift_mask(grid, window, shift, device)
    return _cached_shift_mask(grid, window, shift, device)


@lru_cache(maxsize=64)
def _cached_shift_mask(
    grid: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    with torch.inference_mode(False):  # cached across calls: never an inference-mode tensor
        return _build_shift_mask(grid, window, shift, device)


def _build_shift_mask(
    grid: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    # Regions are numbered as in Swin: along each axis [0, -window), [-window, -shift), [-shift, end).
    labels = torch.zeros(grid, dtype=torch.float32, device=device)
    ranges = [((0, g - w), (g - w, g - s), (g - s, g)) for g, w, s in zip(grid, window, shift)]
    for count, parts in enumerate(itertools.product(range(3), repeat=len(grid))):
        labels[tuple(slice(*ranges[axis][part]) for axis, part in enumerate(parts))] = count
    windows = window_partition(labels[None, ..., None], window)[0, ..., 0]  # (nW, N)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, SHIFT_MASK_VALUE, 0.0)


def relative_position_index(window: tuple[int, int, int]) -> torch.Tensor:
    """(N, N) index into the ((2Wd-1)(2Wh-1)(2Ww-1), heads) bias table for a (Wd, Wh, Ww) window, N = Wd*Wh*Ww."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel = rel + torch.tensor([w - 1 for w in window])
    wd, wh, ww = window
    return rel[..., 0] * (2 * wh - 1) * (2 * ww - 1) + rel[..., 1] * (2 * ww - 1) + rel[..., 2]


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    window_bias: torch.Tensor | None = None,
    window_shift_mask: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain matmul-softmax attention. query/key/value (B', heads', N, head_dim); the mask is `attention_mask` or,
    when None, built from `window_bias` (heads, N, N) and `window_shift_mask` (windows, N, N)."""
    if attention_mask is None and window_bias is not None:
        attention_mask = window_attention_mask(window_bias, window_shift_mask, query.dtype)
    attn_weights = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


# Model-local attention interface (the Transformers pattern for overriding a global implementation): "sdpa" is
# window-aware (kernels_bevt.sdpa_window_attention_forward); other registered implementations stay available.
ALL_ATTENTION_FUNCTIONS = AttentionInterface()
ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_window_attention_forward


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


class BEVTPatchEmbeddings(nn.Module):
    """Video: Conv3d with a (2, 4, 4) kernel/stride; image: Conv2d (4, 4). Inputs are zero-padded to multiples of the
    patch size. Each has its own optional LayerNorm. Outputs are channels-last token grids."""

    def __init__(self, config: BEVTConfig):
        super().__init__()
        self.patch_size = tuple(config.patch_size)
        self.projection = nn.Conv3d(
            config.num_channels, config.embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps) if config.patch_norm else None
        self.image_projection = nn.Conv2d(
            config.num_channels, config.embed_dim, kernel_size=self.patch_size[1:], stride=self.patch_size[1:]
        )
        self.image_norm = (
            nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps) if config.patch_norm else None
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, D, Hp, Wp, E) or (B, C, H, W) -> (B, Hp, Wp, E)."""
        is_video = pixel_values.ndim == 5
        patch = self.patch_size if is_video else self.patch_size[1:]
        pad = []
        for size, p in zip(reversed(pixel_values.shape[2:]), reversed(patch)):
            pad += [0, (p - size % p) % p]
        if any(pad):
            pixel_values = F.pad(pixel_values, pad)
        projection, norm = (
            (self.projection, self.norm) if is_video else (self.image_projection, self.image_norm)
        )
        x = projection(pixel_values)
        x = x.permute(0, *range(2, x.ndim), 1)
        return norm(x) if norm is not None else x


class BEVTEmbeddings(nn.Module):
    """Patch embeddings + learned mask token + dropout."""

    def __init__(self, config: BEVTConfig):
        super().__init__()
        self.patch_embeddings = BEVTPatchEmbeddings(config)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`pixel_values` channels-first (B, C, T, H, W) or (B, C, H, W); `bool_masked_pos` a (B, *mask_grid) bool
        grid, nearest-upsampled to the patch grid. Masked patches become the mask token."""
        x = self.patch_embeddings(pixel_values)
        if bool_masked_pos is not None:
            grid = x.shape[1:-1]
            mask = F.interpolate(bool_masked_pos[:, None].to(x.dtype), size=grid, mode="nearest")[:, 0]
            x = torch.where(mask[..., None].bool(), self.mask_token.to(x.dtype), x)
        return self.dropout(x)


class BEVTAttention(nn.Module):
    """Window multi-head self-attention with a learned 3D relative position bias (fused qkv projection).

    The image stream uses the temporal-offset-0 part of the same bias table (the first Wh*Ww rows/columns of the
    3D index), as the original BEVT code does.
    """

    def __init__(self, config: BEVTConfig, dim: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.window_size = tuple(config.window_size)
        wd, wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads)
        )
        self.register_buffer(
            "relative_position_index", relative_position_index(self.window_size), persistent=False
        )
        self.qkv = BEVTLinear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = BEVTLinear(dim, dim)
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)

    def __getstate__(self) -> dict:
        """Pickling (`torch.save(model)`) and `copy.deepcopy` (an EMA copy) leave out what `inference_cache` kept:
        derived tensors (up to `BEVT_MASK_CACHE_MB` per mask) that the copy rebuilds at its first call."""
        state = super().__getstate__()
        state.pop(INFERENCE_CACHE_ATTRIBUTE, None)
        return state

    def relative_position_bias(self, num_tokens: int) -> torch.Tensor:
        """(heads, N, N) bias for windows of N tokens (the first N rows/columns of the full-window index); kept
        between calls without gradients while the table is unchanged (`inference_cache`)."""

        def gather() -> torch.Tensor:
            index = self.relative_position_index[:num_tokens, :num_tokens].reshape(-1)
            # index_select (not advanced indexing): its backward is an index_add, ~4x faster on CPU than the
            # accumulating index_put that `table[index]` uses for the many repeated rows. Gathered along the table's
            # rows of its (heads, entries) transpose, so the bias comes out contiguous in (heads, N, N): the
            # attention reads it row by row (a gather to (N, N, heads) + permute needed a copy per call; forward +
            # backward 7.9 -> 2.5 ms per call at 12 heads x 392 tokens on an Intel Xeon).
            table = self.relative_position_bias_table
            return table.t().index_select(1, index).view(self.num_heads, num_tokens, num_tokens)

        table = self.relative_position_bias_table
        return inference_cache(self, ("bias", num_tokens), lambda: (parameter_key(table),), gather)

    def forward(
        self, windows: torch.Tensor, shift_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """windows (B, nW, N, C); shift_mask (nW, N, N) additive or None -> (B, nW, N, C) (see `attend`)."""
        return self.attend(self.qkv(windows), shift_mask, output_attentions)

    def attend(
        self, qkv: torch.Tensor, shift_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention from the fused projection: qkv (B, nW, N, 3C) -> output (B, nW, N, C) and, with
        `output_attentions`, the attention probabilities (B*nW, heads, N, N) (else None)."""
        batch, num_windows, num_tokens, channels = *qkv.shape[:3], qkv.shape[3] // 3
        qkv = qkv.view(batch, num_windows, num_tokens, 3, self.num_heads, self.head_dim)
        bias = self.relative_position_bias(num_tokens)
        if shift_mask is None:
            # Windows go to the batch axis; one (heads, N, N) bias broadcasts over them.
            qkv = qkv.permute(3, 0, 1, 4, 2, 5).reshape(
                3, batch * num_windows, self.num_heads, num_tokens, -1
            )
        else:
            # Windows go to the head axis, so the (windows x heads) mask broadcasts over the batch without a copy.
            qkv = qkv.permute(3, 0, 1, 4, 2, 5).reshape(
                3, batch, num_windows * self.num_heads, num_tokens, -1
            )
        query, key, value = qkv.unbind(0)
        implementation = self.config._attn_implementation
        if output_attentions and implementation != "eager":
            logger.warning_once(
                f"`output_attentions=True` needs the eager attention (attn_implementation={implementation!r} returns "
                "no attention probabilities): this call uses eager attention. Load the model with "
                '`attn_implementation="eager"` to avoid this warning.'
            )
            implementation = "eager"
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            window_bias=bias,
            window_shift_mask=shift_mask,
        )
        # out: (B', N, heads', head_dim) -> (B, nW, N, C)
        if shift_mask is None:
            out = out.reshape(batch, num_windows, num_tokens, channels)
        else:
            out = out.view(batch, num_tokens, num_windows, channels).transpose(1, 2)
        if output_attentions:  # (B', heads', N, N) -> (B*nW, heads, N, N)
            weights = weights.reshape(batch * num_windows, self.num_heads, num_tokens, num_tokens)
        else:
            weights = None
        return self.proj_dropout(self.proj(out)), weights


class BEVTMLP(nn.Module):
    def __init__(self, config: BEVTConfig, dim: int):
        super().__init__()
        hidden = int(dim * config.mlp_ratio)
        self.fc1 = BEVTLinear(dim, hidden)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = BEVTLinear(hidden, dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """x (..., C) -> fc1 -> act -> dropout -> fc2 -> dropout -> (..., C); with `norm`, the MLP of `norm(x)`. The
        norm and the activation are recomputed in backward rather than stored (`norm_linear`, `activation_linear`)."""
        hidden = norm_linear(x, norm, self.fc1) if norm is not None else self.fc1(x)
        return self.dropout(activation_linear(hidden, self.act, self.fc2, self.dropout))


class BEVTLayer(GradientCheckpointingLayer):
    """One (shifted-)window Swin block: x + Attn(LN(x)), then x + MLP(LN(x)), with stochastic depth."""

    def __init__(self, config: BEVTConfig, dim: int, num_heads: int, drop_path_rate: float):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = BEVTAttention(config, dim, num_heads)
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = BEVTMLP(config, dim)
        self.drop_path_rate = drop_path_rate

    def forward(
        self,
        hidden_states: torch.Tensor,
        window: tuple[int, ...],
        shift: tuple[int, ...],
        shift_mask: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, *grid, C) channels-last; `shift_mask` (nW, N, N) or None (built on the padded grid).
        Returns the block output (B, *grid, C) and the attention probabilities (B*nW, heads, N, N) or None."""
        grid = tuple(hidden_states.shape[1:-1])
        # norm -> shift -> partition -> qkv projection: one call, so that in training the normalized copy is
        # recomputed in backward rather than stored
        to_windows = partial(shift_and_partition, window=window, shift=shift)
        qkv = norm_linear(hidden_states, self.layernorm_before, self.attention.qkv, then=to_windows)
        attended, attentions = self.attention.attend(qkv, shift_mask, output_attentions)
        x = merge_and_unshift(attended, window, shift, grid)
        hidden_states = hidden_states + drop_path(x, self.drop_path_rate, self.training)
        x = self.mlp(hidden_states, norm=self.layernorm_after)
        return hidden_states + drop_path(x, self.drop_path_rate, self.training), attentions


class BEVTPatchMerging(nn.Module):
    """2x2 spatial merge: concat the four neighbours (zero-padding odd H/W), LayerNorm(4C), Linear(4C -> 2C)."""

    def __init__(self, config: BEVTConfig, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=config.layer_norm_eps)
        self.reduction = BEVTLinear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, [D,] H, W, C) -> (B, [D,] ceil(H/2), ceil(W/2), 2C)."""
        height, width = x.shape[-3], x.shape[-2]
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat(
            [x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]],
            dim=-1,
        )
        return self.reduction(self.norm(x))


class BEVTStage(nn.Module):
    """A stage of Swin blocks (alternating regular / shifted windows) followed by optional patch merging."""

    def __init__(self, config: BEVTConfig, index: int, drop_path_rates: list[float]):
        super().__init__()
        dim = config.stage_dims[index]
        self.window_size = tuple(config.window_size)
        self.shift_size = tuple(w // 2 for w in self.window_size)
        self.blocks = nn.ModuleList(
            [BEVTLayer(config, dim, config.num_heads[index], rate) for rate in drop_path_rates]
        )
        self.downsample = BEVTPatchMerging(config, dim) if index < len(config.depths) - 1 else None

    def _windows(self, grid: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
        """Window and shift for this grid, and whether the shift mask applies to every block (image quirk)."""
        if len(grid) == 3:
            window, shift = window_and_shift(grid, self.window_size, self.shift_size)
            return window, shift, False
        # Image mode, as the original BEVT code: the window is (Wh, Ww) and odd blocks roll even when the grid equals
        # the window, and the 2D shift mask is given to every block of the stage. Axes shorter than the window (not
        # accepted by the original code) fall back to the video rule.
        window, shift = [], []
        for g, w, s in zip(grid, self.window_size[1:], self.shift_size[1:]):
            window.append(g if g < w else w)
            shift.append(0 if g < w else s)
        return tuple(window), tuple(shift), True

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(B, *grid, C) -> (output before merging, output after merging, per-block attention probabilities
        (B*nW, heads, N, N) when `output_attentions`, else [])."""
        grid = tuple(hidden_states.shape[1:-1])
        window, shift, mask_every_block = self._windows(grid)
        shift_mask = None
        if any(shift):
            padded = tuple(-(-g // w) * w for g, w in zip(grid, window))
            shift_mask = make_shift_mask(padded, window, shift, hidden_states.device)
        no_shift = (0,) * len(grid)
        attentions = []
        for i, block in enumerate(self.blocks):
            shifted = i % 2 == 1
            hidden_states, weights = block(
                hidden_states,
                window,
                shift if shifted else no_shift,
                shift_mask if (shifted or mask_every_block) else None,
                output_attentions=output_attentions,
            )
            if weights is not None:
                attentions.append(weights)
        merged = self.downsample(hidden_states) if self.downsample is not None else hidden_states
        return hidden_states, merged, attentions


class BEVTEncoder(nn.Module):
    def __init__(self, config: BEVTConfig):
        super().__init__()
        total = sum(config.depths)  # stochastic depth grows linearly from 0 to drop_path_rate over all blocks
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        start = 0
        for i, depth in enumerate(config.depths):
            self.layers.append(BEVTStage(config, i, rates[start : start + depth]))
            start += depth

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Channels-last token grid -> (each stage's output before patch merging, every block's attention
        probabilities when `output_attentions`, else [])."""
        outputs, attentions = [], []
        for stage in self.layers:
            before, hidden_states, weights = stage(hidden_states, output_attentions)
            outputs.append(before)
            attentions += weights
        return outputs, attentions


# ----------------------------------------------------------------------------------------------------------------
# Pretrained models
# ----------------------------------------------------------------------------------------------------------------


# Written into every saved config so a folder loads with `trust_remote_code=True` where `bevt` is not installed
# (Transformers itself only records the Auto class of the head being saved).
AUTO_MAP = {
    "AutoConfig": "configuration_bevt.BEVTConfig",
    "AutoModel": "modeling_bevt.BEVTModel",
    "AutoModelForVideoClassification": "modeling_bevt.BEVTForVideoClassification",
    "AutoModelForPreTraining": "modeling_bevt.BEVTForMaskedVideoModeling",
}


class BEVTPreTrainedModel(PreTrainedModel):
    config_class = BEVTConfig
    config: BEVTConfig
    base_model_prefix = "bevt"
    main_input_name = "pixel_values"
    input_modalities = ("video", "image")
    supports_gradient_checkpointing = True
    _no_split_modules = ["BEVTStage"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r".*relative_position_index.*"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; also records `auto_map` for every BEVT Auto class and copies the
        modeling/configuration files (when the classes are registered for Auto classes, as `import bevt` does)."""
        if getattr(self, "_auto_class", None) is not None:
            self.config.auto_map = {**AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, BEVTEmbeddings):
            init.trunc_normal_(module.mask_token, std=std)
        elif isinstance(module, BEVTAttention):
            init.trunc_normal_(module.relative_position_bias_table, std=std)
            init.copy_(module.relative_position_index, relative_position_index(module.window_size))


class BEVTModel(BEVTPreTrainedModel):
    """The BEVT encoder (Video Swin Transformer). Videos (B, T, C, H, W) and images (B, C, H, W) share all blocks,
    patch merging layers, norms and relative position bias tables; each has its own patch embedding."""

    def __init__(self, config: BEVTConfig):
        super().__init__(config)
        self.embeddings = BEVTEmbeddings(config)
        self.encoder = BEVTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def encode(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        name: str = "pixel_values",
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Validate, embed and run the stages. Returns (patch embeddings, stage outputs before merging) channels-last,
        and every block's attention probabilities when `output_attentions` (else [])."""
        check_pixel_values(pixel_values, self.config, name)
        # As Transformers' vision models do (ViT, CLIP): the input follows the weights' dtype (fp16 pixels, fp32 model)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        if bool_masked_pos is not None:
            check_mask(bool_masked_pos, pixel_values, self.config, name)
        if pixel_values.ndim == 5:  # (B, T, C, H, W) -> (B, C, T, H, W)
            pixel_values = pixel_values.transpose(1, 2)
        embeddings = self.embeddings(pixel_values, bool_masked_pos)
        return embeddings, *self.encoder(embeddings, output_attentions)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BEVTModelOutput | tuple:
        """pixel_values: video (B, T, C, H, W) or images (B, C, H, W). bool_masked_pos: optional mask, video
        (B, T/2, H/16, W/16), image (B, H/16, W/16). `output_attentions`: one attention map per block."""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = (
            output_attentions if output_attentions is not None else self.config.output_attentions
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        embeddings, stages, attentions = self.encode(
            pixel_values, bool_masked_pos, output_attentions=output_attentions
        )
        last = self.layernorm(stages[-1]).flatten(1, -2)
        pooled = last.mean(dim=1)
        hidden_states = reshaped = None
        if output_hidden_states:
            grids = [embeddings, *stages]
            hidden_states = tuple(g.flatten(1, -2) for g in grids)
            reshaped = tuple(g.permute(0, g.ndim - 1, *range(1, g.ndim - 1)) for g in grids)
        attentions = tuple(attentions) if output_attentions else None
        if not return_dict:
            return tuple(v for v in (last, pooled, hidden_states, reshaped, attentions) if v is not None)
        return BEVTModelOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=hidden_states,
            reshaped_hidden_states=reshaped,
            attentions=attentions,
        )


class BEVTMaskedModelingHead(nn.Module):
    """BEVT prediction heads: upsample stage 4 spatially x2, concat with stage 3 (stage 3 first), Linear(1.5C -> C);
    for videos also upsample time x2; then the encoder's final LayerNorm (applied by the caller) and one shared
    Linear(C -> vocab_size) (token logits), or Linear(C -> target_dim) for regression targets (HOG / pixels)."""

    def __init__(self, config: BEVTConfig):
        super().__init__()
        dim = config.hidden_size
        self.video_spatial_upsample = nn.ConvTranspose3d(dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.video_fuse = BEVTLinear(dim + dim // 2, dim)
        self.video_temporal_upsample = nn.ConvTranspose3d(dim, dim, kernel_size=(2, 1, 1), stride=(2, 1, 1))
        self.image_upsample = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.image_fuse = BEVTLinear(dim + dim // 2, dim)
        self.lm_head = BEVTLinear(dim, config.head_output_size)

    def forward(self, stage3: torch.Tensor, stage4: torch.Tensor) -> torch.Tensor:
        """Channels-last stage outputs -> fused features (B, [2D,] 2*H4, 2*W4, C) before the norm."""
        is_video = stage4.ndim == 5
        up = self.video_spatial_upsample if is_video else self.image_upsample
        x4 = up(stage4.permute(0, stage4.ndim - 1, *range(1, stage4.ndim - 1)))
        x4 = x4.permute(0, *range(2, x4.ndim), 1)
        x = torch.cat([stage3, x4], dim=-1)
        if not is_video:
            return self.image_fuse(x)
        x = self.video_fuse(x).permute(0, 4, 1, 2, 3)
        return self.video_temporal_upsample(x).permute(0, 2, 3, 4, 1)


class BEVTForMaskedVideoModeling(BEVTPreTrainedModel):
    """BEVT pretraining: predict the targets of masked patches, for a video stream and/or an image stream that share
    the encoder. The targets follow `config.target_type`: visual-token ids (cross-entropy, the paper's), or per-patch
    HOG / normalised pixels (`bevt.targets`; L2 loss on the masked positions only), through the same heads."""

    def __init__(self, config: BEVTConfig):
        super().__init__(config)
        self.bevt = BEVTModel(config)
        self.head = BEVTMaskedModelingHead(config)
        self.post_init()

    def _stream(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None,
        labels: torch.Tensor | None,
        is_video: bool,
        return_logits: bool,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor | None, ...]:
        """One stream -> (loss, accuracy or R^2, logits, masked_logits, attentions)."""
        name = "pixel_values" if is_video else "image_pixel_values"
        check_masked_modeling_stream(pixel_values, bool_masked_pos, labels, is_video, self.config)
        _, stages, attentions = self.bevt.encode(pixel_values, bool_masked_pos, name, output_attentions)
        features = self.head(stages[-2], stages[-1])  # (B, [T,] h, w, C)
        token_grid = tuple(features.shape[1:-1])
        batch = features.shape[0]
        regression = self.config.is_regression_target

        loss = quality = masked_logits = None
        if labels is not None:
            check_masked_labels(labels, (batch, *token_grid), is_video, self.config)
            loss_mask = bool_masked_pos.bool()
            if is_video:  # the input mask covers pairs of frames: upsample x2 in time
                loss_mask = loss_mask.repeat_interleave(self.config.patch_size[0], dim=1)
            target = labels[loss_mask]
            if not regression:
                target = target.long()
                check_token_range(target, is_video, self.config)
            masked_logits = self.head.lm_head(self.bevt.layernorm(features[loss_mask]))
            loss, quality = masked_prediction_loss(masked_logits, target, regression)
        logits = None
        if labels is None or return_logits:
            logits = self.head.lm_head(self.bevt.layernorm(features)).flatten(1, -2)
        return loss, quality, logits, masked_logits, tuple(attentions) if output_attentions else None

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_pixel_values: torch.Tensor | None = None,
        image_bool_masked_pos: torch.Tensor | None = None,
        image_labels: torch.Tensor | None = None,
        return_logits: bool = False,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BEVTMaskedVideoModelingOutput | tuple:
        """Video stream: pixel_values (B, T, C, H, W), bool_masked_pos (B, T/2, H/16, W/16), labels token ids
        (B, T, H/16, W/16). Image stream: image_pixel_values (B, C, H, W), image_bool_masked_pos (B, H/16, W/16),
        image_labels (B, H/16, W/16). For `config.target_type` "hog"/"pixel" the labels are float targets with a
        last dimension of `config.target_dim`: (B, T, H/16, W/16, D) and (B, H/16, W/16, D) (`bevt.targets`).
        Either stream may be absent. With labels, only masked positions go through the output projection unless
        `return_logits=True`. `output_attentions`: one attention map per block and stream."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_attentions = (
            output_attentions if output_attentions is not None else self.config.output_attentions
        )
        if pixel_values is None and image_pixel_values is None:
            raise ValueError("give `pixel_values` (videos) and/or `image_pixel_values` (images)")
        video = image = (None,) * 5
        if pixel_values is not None:
            video = self._stream(
                pixel_values, bool_masked_pos, labels, True, return_logits, output_attentions
            )
        elif labels is not None:
            raise ValueError("`labels` given without `pixel_values`")
        if image_pixel_values is not None:
            image = self._stream(
                image_pixel_values,
                image_bool_masked_pos,
                image_labels,
                False,
                return_logits,
                output_attentions,
            )
        elif image_labels is not None:
            raise ValueError("`image_labels` given without `image_pixel_values`")
        loss = None
        if video[0] is not None:
            loss = self.config.video_loss_weight * video[0]
        if image[0] is not None:
            weighted = self.config.image_loss_weight * image[0]
            loss = weighted if loss is None else loss + weighted
        regression = self.config.is_regression_target
        output = BEVTMaskedVideoModelingOutput(
            loss=loss,
            video_loss=video[0],
            image_loss=image[0],
            video_mask_accuracy=None if regression else video[1],
            image_mask_accuracy=None if regression else image[1],
            video_mask_r2=video[1] if regression else None,
            image_mask_r2=image[1] if regression else None,
            logits=video[2],
            image_logits=image[2],
            masked_logits=video[3],
            image_masked_logits=image[3],
            attentions=video[4],
            image_attentions=image[4],
        )
        return output if return_dict else output.to_tuple()


class BEVTForVideoClassification(BEVTPreTrainedModel):
    """BEVT encoder -> mean-pooled final-norm features -> dropout -> linear classifier."""

    def __init__(self, config: BEVTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bevt = BEVTModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = (
            BEVTLinear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_views: int | torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """pixel_values (B, T, C, H, W) (or images (B, C, H, W)); labels (B,) class ids, or float (B, num_labels)
        class distributions (soft targets from mixup/cutmix/label smoothing: cross-entropy against them) unless
        `config.problem_type` is "multi_label_classification" (then BCE, as Transformers). Returns logits.

        num_views: the views per video when `pixel_values` holds `B * num_views` views, consecutive per video (what
        `BEVTVideoProcessor` returns for several clips / crops, as `num_views` `(B,)`): the logits are then per video,
        `(B, num_labels)`, the log of the views' mean softmax (see `losses_bevt.average_views`), and labels are per video.
        `hidden_states` / `attentions` on request, see `BEVTModelOutput`."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        views = None
        if num_views is not None and isinstance(pixel_values, torch.Tensor) and pixel_values.ndim:
            views = views_per_video(num_views, pixel_values.shape[0])
        check_class_ids(labels, self.num_labels, self.config.problem_type)
        outputs = self.bevt(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))
        if views is not None:
            logits = average_views(logits, views, self.config.problem_type)
        loss = None
        if labels is not None:
            check_class_labels(labels, logits, self.config)
            loss = classification_loss(logits, labels, self.num_labels, self.config.problem_type)
        if not return_dict:
            out = tuple(v for v in (logits, outputs.hidden_states, outputs.attentions) if v is not None)
            return ((loss,) + out) if loss is not None else out
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "BEVTPreTrainedModel",
    "BEVTModel",
    "BEVTForMaskedVideoModeling",
    "BEVTForVideoClassification",
    "BEVTModelOutput",
    "BEVTMaskedVideoModelingOutput",
]
