"""BEVT models: a Video Swin Transformer encoder that runs on videos and on images with one set of weights,
the BEVT masked visual-token prediction heads, and a video classification head.

Shapes used below: B batch, T frames, C channels, H x W pixels; after the 2x4x4 patch embedding a video has a
(D, Hp, Wp) = (T/2, H/4, W/4) token grid, an image a (Hp, Wp) = (H/4, W/4) grid. Inside the encoder tensors are
channels-last: video (B, D, H, W, C), image (B, H, W, C).
"""

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput, ModelOutput
from transformers.modeling_utils import AttentionInterface

from .configuration_bevt import BEVTConfig

# Value of the shifted-window mask between tokens from different image regions (as the original code: not -inf,
# so it stays finite in half precision).
SHIFT_MASK_VALUE = -100.0


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


def make_shift_mask(
    grid: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Additive mask (num_windows, N, N) for shifted windows on a padded `grid`: 0 within a region, -100 across.

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


def window_attention_mask(
    bias: torch.Tensor, shift_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The additive attention mask of a window layout: (1, heads, N, N) from the relative position bias alone, or
    (1, windows*heads, N, N) = bias + shift mask when windows are folded into the head axis (shifted blocks)."""
    if shift_mask is None:
        return bias[None].to(dtype)
    num_windows, n = shift_mask.shape[0], shift_mask.shape[-1]
    return (bias[None] + shift_mask[:, None]).reshape(1, num_windows * bias.shape[0], n, n).to(dtype)


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


def _custom_autograd_allowed() -> bool:
    """Whether this model's custom autograd functions may run: plain eager autograd, not while torch.compile or a
    TorchScript trace records the graph (they make their own choices) and not under torch.func transforms (grad,
    vmap, ...), which need functions written for them."""
    return not (
        torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()
    )


class WindowAttentionFunction(torch.autograd.Function):
    """Softmax window attention that stores no attention matrix: the backward pass recomputes the probabilities
    chunk by chunk (and returns the gradient of the relative position bias). Same math as the eager path.

    query/key/value (B', H', N, D). Head h' of the layout uses `bias[h' % heads]` and, when a shift mask
    (windows, N, N) is given (windows folded into the head axis, H' = windows * heads), `shift_mask[h' // heads]`.
    """

    CHUNK_BYTES = 8 * 2**20  # temporaries per chunk: a few cache-sized (rows, N, N) blocks

    @staticmethod
    def _chunks(batch: int, heads_total: int, n: int, heads: int):
        per_head = n * n * 4
        head_chunk = max(
            heads, min(heads_total, WindowAttentionFunction.CHUNK_BYTES // per_head // heads * heads)
        )
        batch_chunk = max(1, WindowAttentionFunction.CHUNK_BYTES // (per_head * head_chunk))
        for b0 in range(0, batch, batch_chunk):
            for h0 in range(0, heads_total, head_chunk):
                yield slice(b0, min(batch, b0 + batch_chunk)), slice(h0, min(heads_total, h0 + head_chunk))

    @staticmethod
    def _scores(q, k, bias, shift_mask, hs: slice, heads: int, scaling: float) -> torch.Tensor:
        """Scaled scores + bias (+ shift mask) of one chunk, float32 (b, rows, N, N); chunks hold whole windows."""
        scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scaling)
        n = scores.shape[-1]
        per_window = scores.view(scores.shape[0], -1, heads, n, n)  # (b, windows in chunk, heads, N, N)
        per_window += bias
        if shift_mask is not None:
            per_window += shift_mask[hs.start // heads : hs.stop // heads, None]
        return scores

    @staticmethod
    def forward(ctx, query, key, value, bias, shift_mask, scaling):
        heads = bias.shape[0]
        out = torch.empty_like(query)
        for bs, hs in WindowAttentionFunction._chunks(query.shape[0], query.shape[1], query.shape[2], heads):
            scores = WindowAttentionFunction._scores(
                query[bs, hs], key[bs, hs], bias, shift_mask, hs, heads, scaling
            )
            probs = torch.softmax(scores, dim=-1).to(value.dtype)
            out[bs, hs] = torch.matmul(probs, value[bs, hs])
        ctx.save_for_backward(query, key, value, bias, shift_mask)
        ctx.scaling = scaling
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, bias, shift_mask = ctx.saved_tensors
        scaling, heads = ctx.scaling, bias.shape[0]
        grad_q, grad_k, grad_v = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        grad_out = grad_out.contiguous()
        for bs, hs in WindowAttentionFunction._chunks(query.shape[0], query.shape[1], query.shape[2], heads):
            q, k, v, go = query[bs, hs], key[bs, hs], value[bs, hs], grad_out[bs, hs]
            probs = torch.softmax(
                WindowAttentionFunction._scores(q, k, bias, shift_mask, hs, heads, scaling), -1
            )
            grad_v[bs, hs] = torch.matmul(probs.transpose(-1, -2).to(go.dtype), go)
            grad_probs = torch.matmul(go, v.transpose(-1, -2)).float()
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, torch.float32)
            grad_bias += grad_scores.view(grad_scores.shape[0], -1, *bias.shape).sum((0, 1))
            grad_scores = grad_scores.mul_(scaling).to(q.dtype)
            grad_q[bs, hs] = torch.matmul(grad_scores, k)
            grad_k[bs, hs] = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, grad_bias.to(bias.dtype), None, None


def sdpa_window_attention_forward(
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
) -> tuple[torch.Tensor, None]:
    """BEVT's "sdpa": `torch.nn.functional.scaled_dot_product_attention` with the window mask (on CUDA its
    memory-efficient kernel also gives the bias gradient). When gradients are needed on CPU, where SDPA falls back
    to a math path that keeps the whole attention matrix, `WindowAttentionFunction` computes the same attention
    without storing it."""
    if attention_mask is None and window_bias is not None:
        needs_grad = torch.is_grad_enabled() and (query.requires_grad or window_bias.requires_grad)
        eligible = query.device.type == "cpu" and dropout == 0.0 and _custom_autograd_allowed()
        if needs_grad and eligible:
            out = WindowAttentionFunction.apply(query, key, value, window_bias, window_shift_mask, scaling)
            return out.transpose(1, 2).contiguous(), None
        attention_mask = window_attention_mask(window_bias, window_shift_mask, query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)


# Model-local attention interface (the Transformers pattern for overriding a global implementation): "sdpa" is the
# window-aware version above; other registered implementations stay available.
ALL_ATTENTION_FUNCTIONS = AttentionInterface()
ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_window_attention_forward


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BEVTModelOutput(ModelOutput):
    """Output of `BEVTModel`.

    Args:
        last_hidden_state: (B, L, C_last) stage-4 tokens after the final LayerNorm, L = D*H4*W4 (video, (t, h, w)
            order) or H4*W4 (image).
        pooler_output: (B, C_last) mean of `last_hidden_state` over all positions.
        hidden_states: on request, the patch embeddings and each stage's output before patch merging, (B, L_i, C_i).
        reshaped_hidden_states: the same, channels-first: (B, C_i, D, H_i, W_i) for videos, (B, C_i, H_i, W_i) for
            images.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class BEVTMaskedVideoModelingOutput(ModelOutput):
    """Output of `BEVTForMaskedVideoModeling`.

    Args:
        loss: `video_loss_weight * video_loss + image_loss_weight * image_loss` (streams that are present).
        video_loss / image_loss: cross-entropy over the masked positions of each stream.
        video_mask_accuracy / image_mask_accuracy: fraction of masked positions whose token id is predicted.
        logits: (B, T*h*w, vocab_size) for every video position in (t, h, w) order; computed when no labels are given
            or when `return_logits=True` (with labels only the masked positions are projected to the vocabulary).
        image_logits: (B, h*w, vocab_size), same rule.
        masked_logits / image_masked_logits: (num_masked, vocab_size), the logits the losses were computed on.
    """

    loss: torch.FloatTensor | None = None
    video_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    video_mask_accuracy: torch.FloatTensor | None = None
    image_mask_accuracy: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_logits: torch.FloatTensor | None = None
    masked_logits: torch.FloatTensor | None = None
    image_masked_logits: torch.FloatTensor | None = None


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

    def relative_position_bias(self, num_tokens: int) -> torch.Tensor:
        """(heads, N, N) bias for windows of N tokens (the first N rows/columns of the full-window index)."""
        index = self.relative_position_index[:num_tokens, :num_tokens].reshape(-1)
        # index_select (not advanced indexing): its backward is an index_add, ~4x faster on CPU than the
        # accumulating index_put that `table[index]` uses for the many repeated rows.
        bias = self.relative_position_bias_table.index_select(0, index).view(
            num_tokens, num_tokens, self.num_heads
        )
        return bias.permute(2, 0, 1)

    def forward(self, windows: torch.Tensor, shift_mask: torch.Tensor | None = None) -> torch.Tensor:
        """windows (B, nW, N, C); shift_mask (nW, N, N) additive or None -> (B, nW, N, C)."""
        return self.attend(self.qkv(windows), shift_mask)

    def attend(self, qkv: torch.Tensor, shift_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention from the fused projection: qkv (B, nW, N, 3C) -> (B, nW, N, C)."""
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
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention_interface(
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
        return self.proj_dropout(self.proj(out))


# ----------------------------------------------------------------------------------------------------------------
# Linear layers through oneDNN on CPU
# ----------------------------------------------------------------------------------------------------------------
#
# On CPU, `F.linear` in float32 runs MKL's sgemm. `torch.ops.mkldnn._linear_pointwise` runs the same float32 product
# through oneDNN, which uses the CPU's widest vector units (on the AMD Zen 5 benchmark machine MKL takes its AVX2
# path and reaches ~200 GFLOP/s on two cores, oneDNN's AVX-512 kernels ~400). Same math in float32; only the
# summation order differs (relative differences ~1e-7). Set BEVT_ONEDNN_LINEAR=0 to use `F.linear` everywhere.


@lru_cache(maxsize=1)
def _onednn_linear_op() -> Callable | None:
    if os.environ.get("BEVT_ONEDNN_LINEAR", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise.default
        # one tiny self-check per process: the op runs here and gives F.linear's numbers
        g = torch.Generator().manual_seed(0)
        rows, weight, bias = (
            torch.randn(5, 7, generator=g),
            torch.randn(3, 7, generator=g),
            torch.randn(3, generator=g),
        )
        with torch.no_grad():
            if not torch.allclose(
                op(rows, weight, bias, "none", [], ""), F.linear(rows, weight, bias), atol=1e-5
            ):
                return None
        return op
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def _onednn_eligible(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `hidden @ weight.T` can go through oneDNN: plain float32 CPU tensors, eager mode (not compiling or
    tracing), no autocast, no dispatch mode."""
    return (
        _custom_autograd_allowed()
        and not torch.is_autocast_enabled("cpu")
        # under a dispatch mode (FlopCounterMode, FakeTensorMode, ...) tools expect the standard aten ops
        and _get_current_dispatch_mode() is None
        and hidden.device.type == "cpu"
        and hidden.dtype == torch.float32
        and weight.dtype == torch.float32
        and hidden.layout == torch.strided
        and type(weight) in (torch.Tensor, nn.Parameter)
        and hidden.ndim >= 2
        and hidden.numel() > 0
        and _onednn_linear_op() is not None  # last: its one-time self-check must run in plain eager mode
    )


def _onednn_matmul(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows (M, K) @ weight (N, K).T (+ bias (N,)) -> (M, N) through oneDNN."""
    return _onednn_linear_op()(rows, weight, bias, "none", [], "")


# oneDNN's weight-gradient kernel needs both operands converted to its own tensor type (one copy each, ~M*(N+K)
# values); it pays off once each copied value feeds enough multiply-adds, i.e. when N*K/(N+K) is large.
ONEDNN_WEIGHT_GRAD_MIN_DEPTH = 128


def _linear_weight_grad(grad_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """grad_rows (M, N).T @ rows (M, K) -> (N, K): the weight gradient of a linear layer."""
    n, k = grad_rows.shape[1], rows.shape[1]
    if n * k >= ONEDNN_WEIGHT_GRAD_MIN_DEPTH * (n + k) and _onednn_eligible(rows, grad_rows):
        try:
            weight = torch.empty(n, k, dtype=rows.dtype)  # only its shape is read
            grad_weight, _ = torch.mkldnn_linear_backward_weights(
                grad_rows.contiguous().to_mkldnn(), rows.contiguous().to_mkldnn(), weight, False
            )
            return grad_weight
        except (RuntimeError, NotImplementedError):
            pass
    return grad_rows.t() @ rows


def _linear_input_grad(grad_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_rows (M, N) @ weight (N, K) -> (M, K): the input gradient of a linear layer (oneDNN where eligible)."""
    if _onednn_eligible(grad_rows, weight):
        return _onednn_matmul(grad_rows, weight.t().contiguous(), None)
    return grad_rows @ weight


def _linear_no_autograd(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows (M, K) @ weight.T (+ bias) -> (M, N) with autograd off: oneDNN where eligible, else `F.linear` (which
    follows autocast)."""
    if _onednn_eligible(rows, weight):
        return _onednn_matmul(rows, weight, bias)
    return F.linear(rows, weight, bias)


class OneDNNLinearFunction(torch.autograd.Function):
    """`F.linear(hidden, weight, bias)` whose forward and input gradient run through oneDNN (float32, CPU)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias):
        rows = hidden.reshape(-1, hidden.shape[-1])
        out = _onednn_matmul(rows, weight, bias)
        ctx.save_for_backward(hidden, weight)
        ctx.has_bias = bias is not None
        return out.view(*hidden.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = _linear_input_grad(grad_rows, weight).view(hidden.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = _linear_weight_grad(grad_rows, hidden.reshape(-1, hidden.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_hidden, grad_weight, grad_bias


def fast_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear`, through oneDNN for float32 CPU tensors in eager mode (see above); `F.linear` otherwise."""
    if not _onednn_eligible(hidden, weight):
        return F.linear(hidden, weight, bias)
    if torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return OneDNNLinearFunction.apply(hidden, weight, bias)
    out = _onednn_matmul(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    return out.view(*hidden.shape[:-1], weight.shape[0])


class BEVTLinear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose CPU float32 forward/backward use `fast_linear`."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return fast_linear(hidden, self.weight, self.bias)


class PreparedLinearFunction(torch.autograd.Function):
    """`linear(prepare(x, *prepare_params), weight, bias)` that keeps `x` (not prepare's output) for the backward
    pass and recomputes `prepare` there. `prepare` is cheap (a LayerNorm, padding, rolling, window partition): the
    block input is kept anyway, so the normalized copy that a plain `nn.Linear` would store (C values per token) is
    never stored. The linear's own products are not recomputed.

    x (..., C_in) -> prepare -> (..., K) -> (..., N). Autocast is recorded in forward and restored for the
    recomputation."""

    @staticmethod
    def forward(ctx, prepare, x, weight, bias, *prepare_params):
        device = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        rows = prepare(x, *prepare_params)
        shape = rows.shape[:-1]
        out = _linear_no_autograd(rows.reshape(-1, rows.shape[-1]), weight, bias)
        ctx.prepare, ctx.has_bias = prepare, bias is not None
        ctx.save_for_backward(x, weight, *prepare_params)
        return out.view(*shape, weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            inputs = [x.detach().requires_grad_(needs[1])]
            inputs += [p.detach().requires_grad_(need) for p, need in zip(params, needs[4:])]
            rows = ctx.prepare(*inputs)
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        flat = rows.detach().reshape(-1, rows.shape[-1]).to(grad_rows.dtype)
        grad_weight = grad_bias = None
        if needs[2]:
            grad_weight = _linear_weight_grad(grad_rows, flat).to(weight.dtype)
        if ctx.has_bias and needs[3]:
            grad_bias = grad_rows.sum(0)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(())
        if wanted:
            grad_flat = _linear_input_grad(grad_rows, weight.to(grad_rows.dtype))
            grads = iter(torch.autograd.grad(rows, wanted, grad_flat.view(rows.shape).to(rows.dtype)))
        grad_inputs = [next(grads) if t.requires_grad else None for t in inputs]
        return None, grad_inputs[0], grad_weight, grad_bias, *grad_inputs[1:]


def _is_plain(module: nn.Module, cls: type) -> bool:
    """True when `module` is exactly `cls` with no hooks, so a fused path may use its parameters directly (a
    module replaced or wrapped by an adapter library, or hooked, keeps its own forward)."""
    return (
        type(module) is cls
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


class GeluLinearFunction(torch.autograd.Function):
    """`linear(gelu(h), weight, bias)` that keeps only `h` for the backward pass and recomputes the (cheap,
    elementwise) GELU there: the MLP then stores 4C instead of 8C values per token."""

    @staticmethod
    def forward(ctx, hidden, weight, bias):
        dtype = hidden.dtype  # under autocast fc1 already produced the autocast dtype
        activated = F.gelu(hidden)
        out = _linear_no_autograd(
            activated.reshape(-1, activated.shape[-1]),
            weight.to(dtype),
            bias.to(dtype) if bias is not None else None,
        ).view(*hidden.shape[:-1], weight.shape[0])
        ctx.save_for_backward(hidden, weight, bias)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias = ctx.saved_tensors
        dtype = hidden.dtype
        grad_out = grad_out.to(dtype)
        activated = F.gelu(hidden)
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = _linear_weight_grad(grad_rows, activated.reshape(-1, activated.shape[-1]))
        grad_bias = grad_rows.sum(0) if bias is not None else None
        grad_activated = _linear_input_grad(grad_rows, weight.to(dtype)).view(hidden.shape)
        grad_hidden = torch.ops.aten.gelu_backward(grad_activated, hidden)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
        )


class BEVTMLP(nn.Module):
    def __init__(self, config: BEVTConfig, dim: int):
        super().__init__()
        hidden = int(dim * config.mlp_ratio)
        self.fc1 = BEVTLinear(dim, hidden)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = BEVTLinear(hidden, dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.memory_lean = config.hidden_act == "gelu"

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """x (..., C) -> (..., C); with `norm`, the MLP of `norm(x)`, which is then recomputed in backward rather
        than stored."""
        lean = not (self.training and self.dropout.p > 0) and _memory_lean_autograd(x, self)
        if lean and norm is not None and _is_plain(norm, nn.LayerNorm) and _is_plain(self.fc1, BEVTLinear):
            hidden = PreparedLinearFunction.apply(
                partial(_layer_norm, eps=norm.eps), x, self.fc1.weight, self.fc1.bias, norm.weight, norm.bias
            )
        else:
            hidden = self.fc1(norm(x) if norm is not None else x)
        if not lean:
            return self.dropout(self.fc2(self.dropout(self.act(hidden))))
        if self.memory_lean and _is_plain(self.fc2, BEVTLinear):
            return GeluLinearFunction.apply(hidden, self.fc2.weight, self.fc2.bias)
        return self.fc2(self.act(hidden))


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _memory_lean_autograd(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether the memory-lean autograd functions apply: gradients are being recorded, in plain eager mode (see
    `_custom_autograd_allowed`; under torch.compile inductor makes its own recompute choices)."""
    return (
        torch.is_grad_enabled()
        and _custom_autograd_allowed()
        and (x.requires_grad or any(p.requires_grad for p in module.parameters()))
    )


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
    ) -> torch.Tensor:
        """hidden_states (B, *grid, C) channels-last; `shift_mask` (nW, N, N) or None (built on the padded grid)."""
        grid = tuple(hidden_states.shape[1:-1])
        padded = tuple(-(-g // w) * w for g, w in zip(grid, window))
        norm, qkv = self.layernorm_before, self.attention.qkv
        if (
            _memory_lean_autograd(hidden_states, self)
            and _is_plain(norm, nn.LayerNorm)
            and _is_plain(qkv, BEVTLinear)
        ):
            # LayerNorm -> pad -> roll -> windows is recomputed in backward instead of stored (see
            # PreparedLinearFunction); the qkv projection reads the block input directly.
            prepare = partial(self._normed_windows, eps=norm.eps, window=window, shift=shift)
            projected = PreparedLinearFunction.apply(
                prepare, hidden_states, qkv.weight, qkv.bias, norm.weight, norm.bias
            )
            x = self.attention.attend(projected, shift_mask)
        else:
            x = self.attention(self._windows(norm(hidden_states), window, shift), shift_mask)
        x = window_reverse(x, window, padded)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=tuple(range(1, len(grid) + 1)))
        if padded != grid:
            x = x[(slice(None), *[slice(0, g) for g in grid])]
        hidden_states = hidden_states + drop_path(x, self.drop_path_rate, self.training)
        mlp_out = self.mlp(hidden_states, norm=self.layernorm_after)
        return hidden_states + drop_path(mlp_out, self.drop_path_rate, self.training)

    @staticmethod
    def _windows(x: torch.Tensor, window: tuple[int, ...], shift: tuple[int, ...]) -> torch.Tensor:
        """(B, *grid, C) -> zero-pad to whole windows -> cyclic shift by -shift -> (B, nW, N, C) windows."""
        grid = x.shape[1:-1]
        pad = []
        for g, w in zip(reversed(grid), reversed(window)):
            pad += [0, (w - g % w) % w]
        if any(pad):
            x = F.pad(x, [0, 0, *pad])
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=tuple(range(1, len(grid) + 1)))
        return window_partition(x, window)

    @staticmethod
    def _normed_windows(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        eps: float,
        window: tuple[int, ...],
        shift: tuple[int, ...],
    ) -> torch.Tensor:
        return BEVTLayer._windows(_layer_norm(x, weight, bias, eps), window, shift)


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

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, *grid, C) -> (output before merging, output after merging)."""
        grid = tuple(hidden_states.shape[1:-1])
        window, shift, mask_every_block = self._windows(grid)
        shift_mask = None
        if any(shift):
            padded = tuple(-(-g // w) * w for g, w in zip(grid, window))
            shift_mask = make_shift_mask(padded, window, shift, hidden_states.device)
        no_shift = (0,) * len(grid)
        for i, block in enumerate(self.blocks):
            shifted = i % 2 == 1
            hidden_states = block(
                hidden_states,
                window,
                shift if shifted else no_shift,
                shift_mask if (shifted or mask_every_block) else None,
            )
        merged = self.downsample(hidden_states) if self.downsample is not None else hidden_states
        return hidden_states, merged


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

    def forward(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """Channels-last token grid -> each stage's output before patch merging."""
        outputs = []
        for stage in self.layers:
            before, hidden_states = stage(hidden_states)
            outputs.append(before)
        return outputs


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


def _check_pixel_values(pixel_values: torch.Tensor, config: BEVTConfig, name: str = "pixel_values") -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim not in (4, 5):
        raise ValueError(
            f"`{name}` must be a video (B, T, C, H, W) or an image batch (B, C, H, W), got shape "
            f"{tuple(pixel_values.shape)}"
        )
    channels = pixel_values.shape[-3]
    if channels != config.num_channels:
        raise ValueError(
            f"`{name}` has {channels} channels (dim -3 of shape {tuple(pixel_values.shape)}), the model expects "
            f"{config.num_channels}; videos are (B, T, C, H, W)"
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"`{name}` must be a floating point tensor (normalized pixels), got {pixel_values.dtype}"
        )
    if pixel_values.shape[0] == 0 or any(s == 0 for s in pixel_values.shape):
        raise ValueError(f"`{name}` is empty: shape {tuple(pixel_values.shape)}")


def mask_grid_shape(pixel_values_shape: tuple[int, ...], config: BEVTConfig) -> tuple[int, ...]:
    """Expected `bool_masked_pos` grid for inputs of this shape: video (ceil(T/pt), ceil(H/16), ceil(W/16)),
    image (ceil(H/16), ceil(W/16)) for the default 2x4x4 patches (16 = 4 x patch size)."""
    pt, ph, pw = config.patch_size
    spatial = (-(-pixel_values_shape[-2] // (4 * ph)), -(-pixel_values_shape[-1] // (4 * pw)))
    if len(pixel_values_shape) == 5:
        return (-(-pixel_values_shape[1] // pt), *spatial)
    return spatial


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
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Validate, embed and run the stages. Returns (patch embeddings, stage outputs before merging), channels-last."""
        _check_pixel_values(pixel_values, self.config, name)
        # As Transformers' vision models do (ViT, CLIP): the input follows the weights' dtype (fp16 pixels, fp32 model)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        if bool_masked_pos is not None:
            expected = (pixel_values.shape[0], *mask_grid_shape(tuple(pixel_values.shape), self.config))
            if tuple(bool_masked_pos.shape) != expected:
                raise ValueError(
                    f"mask for `{name}` of shape {tuple(pixel_values.shape)} must have shape {expected} "
                    f"(batch, {'time/2, ' if pixel_values.ndim == 5 else ''}height/16, width/16), "
                    f"got {tuple(bool_masked_pos.shape)}"
                )
            if bool_masked_pos.is_floating_point() or bool_masked_pos.is_complex():
                raise ValueError(
                    f"mask for `{name}` must be a bool (or integer 0/1) tensor, got {bool_masked_pos.dtype}"
                )
        if pixel_values.ndim == 5:  # (B, T, C, H, W) -> (B, C, T, H, W)
            pixel_values = pixel_values.transpose(1, 2)
        embeddings = self.embeddings(pixel_values, bool_masked_pos)
        return embeddings, self.encoder(embeddings)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BEVTModelOutput | tuple:
        """pixel_values: video (B, T, C, H, W) or images (B, C, H, W). bool_masked_pos: optional mask, video
        (B, T/2, H/16, W/16), image (B, H/16, W/16)."""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        embeddings, stages = self.encode(pixel_values, bool_masked_pos)
        last = self.layernorm(stages[-1]).flatten(1, -2)
        pooled = last.mean(dim=1)
        hidden_states = reshaped = None
        if output_hidden_states:
            grids = [embeddings, *stages]
            hidden_states = tuple(g.flatten(1, -2) for g in grids)
            reshaped = tuple(g.permute(0, g.ndim - 1, *range(1, g.ndim - 1)) for g in grids)
        if not return_dict:
            return tuple(v for v in (last, pooled, hidden_states, reshaped) if v is not None)
        return BEVTModelOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=hidden_states,
            reshaped_hidden_states=reshaped,
        )


class BEVTMaskedModelingHead(nn.Module):
    """BEVT prediction heads: upsample stage 4 spatially x2, concat with stage 3 (stage 3 first), Linear(1.5C -> C);
    for videos also upsample time x2; then the encoder's final LayerNorm (applied by the caller) and one shared
    Linear(C -> vocab_size)."""

    def __init__(self, config: BEVTConfig):
        super().__init__()
        dim = config.hidden_size
        self.video_spatial_upsample = nn.ConvTranspose3d(dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.video_fuse = BEVTLinear(dim + dim // 2, dim)
        self.video_temporal_upsample = nn.ConvTranspose3d(dim, dim, kernel_size=(2, 1, 1), stride=(2, 1, 1))
        self.image_upsample = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.image_fuse = BEVTLinear(dim + dim // 2, dim)
        self.lm_head = BEVTLinear(dim, config.vocab_size)

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
    """BEVT pretraining: predict the visual-token ids of masked patches, for a video stream and/or an image stream
    that share the encoder."""

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
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        name = "pixel_values" if is_video else "image_pixel_values"
        expected_rank = 5 if is_video else 4
        if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim != expected_rank:
            raise ValueError(
                f"`{name}` must be {'a video batch (B, T, C, H, W)' if is_video else 'an image batch (B, C, H, W)'}, "
                f"got shape {tuple(pixel_values.shape)}"
            )
        _check_pixel_values(pixel_values, self.config, name)
        height, width = pixel_values.shape[-2:]
        stride = 8 * self.config.patch_size[1], 8 * self.config.patch_size[2]
        if height % stride[0] or width % stride[1]:
            raise ValueError(
                f"the masked-modeling heads need `{name}` height and width to be multiples of "
                f"{stride[0]}x{stride[1]} (stage 4 upsampled x2 meets stage 3), got {height}x{width}"
            )
        if is_video and pixel_values.shape[1] % self.config.patch_size[0]:
            raise ValueError(
                f"the masked-modeling head needs the number of frames of `{name}` to be a multiple of "
                f"{self.config.patch_size[0]}, got {pixel_values.shape[1]}"
            )
        if labels is not None and bool_masked_pos is None:
            raise ValueError(
                f"labels for `{name}` need its mask (`bool_masked_pos` / `image_bool_masked_pos`)"
            )
        _, stages = self.bevt.encode(pixel_values, bool_masked_pos, name)
        features = self.head(stages[-2], stages[-1])  # (B, [T,] h, w, C)
        token_grid = tuple(features.shape[1:-1])
        batch = features.shape[0]

        loss = accuracy = masked_logits = None
        if labels is not None:
            expected = (batch, *token_grid)
            if tuple(labels.shape) != expected:
                raise ValueError(
                    f"labels for `{name}` must be visual-token ids of shape {expected} (one {token_grid[-2]}x"
                    f"{token_grid[-1]} grid per {'frame' if is_video else 'image'}), got {tuple(labels.shape)}"
                )
            if labels.is_floating_point():
                raise ValueError(f"labels for `{name}` must be integer token ids, got {labels.dtype}")
            loss_mask = bool_masked_pos.bool()
            if is_video:  # the input mask covers pairs of frames: upsample x2 in time
                loss_mask = loss_mask.repeat_interleave(self.config.patch_size[0], dim=1)
            target = labels[loss_mask].long()
            if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.config.vocab_size):
                raise ValueError(
                    f"labels for `{name}` must be in [0, {self.config.vocab_size}) (vocab_size), got values in "
                    f"[{int(target.min())}, {int(target.max())}]"
                )
            selected = self.bevt.layernorm(features[loss_mask])
            masked_logits = self.head.lm_head(selected)
            if target.numel():
                loss = F.cross_entropy(masked_logits.float(), target)
                accuracy = (masked_logits.argmax(-1) == target).float().mean().detach()
            else:  # nothing masked: a zero loss that keeps the graph
                loss = masked_logits.sum() * 0.0
                accuracy = torch.full((), float("nan"), device=features.device)
        logits = None
        if labels is None or return_logits:
            logits = self.head.lm_head(self.bevt.layernorm(features)).flatten(1, -2)
        return loss, accuracy, logits, masked_logits

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_pixel_values: torch.Tensor | None = None,
        image_bool_masked_pos: torch.Tensor | None = None,
        image_labels: torch.Tensor | None = None,
        return_logits: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BEVTMaskedVideoModelingOutput | tuple:
        """Video stream: pixel_values (B, T, C, H, W), bool_masked_pos (B, T/2, H/16, W/16), labels token ids
        (B, T, H/16, W/16). Image stream: image_pixel_values (B, C, H, W), image_bool_masked_pos (B, H/16, W/16),
        image_labels (B, H/16, W/16). Either stream may be absent. With labels, only masked positions are projected
        to the vocabulary unless `return_logits=True`."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is None and image_pixel_values is None:
            raise ValueError("give `pixel_values` (videos) and/or `image_pixel_values` (images)")
        video = image = (None, None, None, None)
        if pixel_values is not None:
            video = self._stream(pixel_values, bool_masked_pos, labels, True, return_logits)
        elif labels is not None:
            raise ValueError("`labels` given without `pixel_values`")
        if image_pixel_values is not None:
            image = self._stream(
                image_pixel_values, image_bool_masked_pos, image_labels, False, return_logits
            )
        elif image_labels is not None:
            raise ValueError("`image_labels` given without `image_pixel_values`")
        loss = None
        if video[0] is not None:
            loss = self.config.video_loss_weight * video[0]
        if image[0] is not None:
            weighted = self.config.image_loss_weight * image[0]
            loss = weighted if loss is None else loss + weighted
        output = BEVTMaskedVideoModelingOutput(
            loss=loss,
            video_loss=video[0],
            image_loss=image[0],
            video_mask_accuracy=video[1],
            image_mask_accuracy=image[1],
            logits=video[2],
            image_logits=image[2],
            masked_logits=video[3],
            image_masked_logits=image[3],
        )
        return output if return_dict else output.to_tuple()


class BEVTForVideoClassification(BEVTPreTrainedModel):
    """BEVT encoder -> mean-pooled final-norm features -> dropout -> linear classifier."""

    def _classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Transformers' rules for `config.problem_type`, decided per call (the config is never written, so one
        batch of class ids does not turn later soft targets into a different loss): num_labels == 1 -> MSE;
        integer labels -> cross-entropy; float (B, num_labels) -> cross-entropy against class distributions,
        or BCE-with-logits for problem_type "multi_label_classification"."""
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.is_floating_point():
                problem = "soft_labels"
            else:
                problem = "single_label_classification"
        logits = logits.float()
        if problem == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(-1), labels.float().squeeze(-1))
            return F.mse_loss(logits, labels.float())
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        if labels.is_floating_point():  # soft targets (mixup/cutmix, label smoothing)
            return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))

    @staticmethod
    def _views_per_video(num_views: int | torch.Tensor, num_inputs: int) -> int:
        """Check `num_views` (an int, or the processor's `num_views` `(B,)`) against `num_inputs` views; returns V."""
        batch = None
        views: object = num_views
        if isinstance(num_views, torch.Tensor):
            values = num_views.flatten().tolist()
            if len(set(values)) != 1:
                raise ValueError(
                    f"`num_views` must give every video the same number of views (one `num_views` per video), got {values}"
                )
            batch, views = len(values), values[0]
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"`num_views` must be a positive integer (views per video), got {num_views!r}")
        if num_inputs % views or (batch is not None and batch * views != num_inputs):
            raise ValueError(
                f"`pixel_values` holds {num_inputs} views: {num_inputs} views cannot be split into videos of {views} "
                "views" + (f" for {batch} videos" if batch is not None else "")
            )
        return views

    def _average_views(self, logits: torch.Tensor, views: int) -> torch.Tensor:
        """Per-view logits `(B * V, num_labels)` -> per-video `(B, num_labels)`: the log of the mean softmax over the V
        views of each video (so `softmax` of the result is the multi-view score), or the mean logits for regression /
        multi-label models."""
        if views == 1:
            return logits
        grouped = logits.float().view(-1, views, logits.shape[-1])
        if self.config.problem_type in ("regression", "multi_label_classification"):
            return grouped.mean(1).to(logits.dtype)
        return (torch.logsumexp(grouped.log_softmax(-1), dim=1) - math.log(views)).to(logits.dtype)

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
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """pixel_values (B, T, C, H, W) (or images (B, C, H, W)); labels (B,) class ids, or float (B, num_labels)
        class distributions (soft targets from mixup/cutmix/label smoothing: cross-entropy against them) unless
        `config.problem_type` is "multi_label_classification" (then BCE, as Transformers). Returns logits.

        num_views: the views per video when `pixel_values` holds `B * num_views` views, consecutive per video (what
        `BEVTVideoProcessor` returns for several clips / crops, as `num_views` `(B,)`): the logits are then per video,
        `(B, num_labels)`, the log of the views' mean softmax (see `_average_views`), and labels are per video."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        views = None
        if num_views is not None and isinstance(pixel_values, torch.Tensor) and pixel_values.ndim:
            views = self._views_per_video(num_views, pixel_values.shape[0])
        if (
            isinstance(labels, torch.Tensor)
            and labels.is_floating_point()
            and labels.ndim == 1
            and self.num_labels > 1
            and self.config.problem_type != "regression"
        ):
            raise ValueError(
                f"float `labels` of shape {tuple(labels.shape)}: class ids must be an integer tensor "
                f"(`labels.long()`), float labels must be class distributions ({labels.shape[0]}, {self.num_labels}) "
                "(batch, num_labels)"
            )
        outputs = self.bevt(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        if views is not None:
            logits = self._average_views(logits, views)
        loss = None
        if labels is not None:
            if not labels.is_floating_point() and labels.ndim == 1 and self.num_labels > 1:
                if labels.shape[0] != logits.shape[0]:
                    raise ValueError(
                        f"`labels` has {labels.shape[0]} entries for a batch of {logits.shape[0]}"
                    )
                if int(labels.min()) < 0 or int(labels.max()) >= self.num_labels:
                    raise ValueError(
                        f"`labels` must be class ids in [0, {self.num_labels}), got values in "
                        f"[{int(labels.min())}, {int(labels.max())}]"
                    )
            if (
                labels.is_floating_point()
                and labels.ndim > 1
                and labels.shape != logits.shape
                and self.config.problem_type != "regression"
            ):
                raise ValueError(
                    f"float `labels` (class distributions) must have the logits' shape {tuple(logits.shape)} "
                    f"(batch, num_labels), got {tuple(labels.shape)}"
                )
            loss = self._classification_loss(logits, labels)
        if not return_dict:
            out = (logits, outputs.hidden_states) if outputs.hidden_states is not None else (logits,)
            return ((loss,) + out) if loss is not None else out
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = [
    "BEVTPreTrainedModel",
    "BEVTModel",
    "BEVTForMaskedVideoModeling",
    "BEVTForVideoClassification",
    "BEVTModelOutput",
    "BEVTMaskedVideoModelingOutput",
]
