"""Fast paths of the BEVT model: the same math as `modeling_bevt`, computed with less time or memory.

The model calls each one through a single function that checks whether the fast path applies and otherwise runs
the plain PyTorch code (so results never depend on it beyond summation order):

- `BEVTLinear` / `fast_linear`: `nn.Linear` whose float32 CPU products run through oneDNN where a calibration on
  the running machine measured it faster (`linear_kernels`, cached; BEVT_ONEDNN_LINEAR=auto / 1 / 0).
- `sdpa_window_attention_forward`: the model's "sdpa" attention; on CPU training it is `WindowAttentionFunction`,
  chunked window attention without an autograd graph over the scores (probabilities kept within a memory budget,
  `BEVT_ATTENTION_STORE_MB`, else recomputed in backward). Its bias + mask + softmax (and the softmax gradient with
  the bias gradient) run as one native pass per row where a C++ compiler is present and a calibration on the running
  machine measured it faster (`native_attention`, built once and cached; BEVT_NATIVE_ATTENTION=auto / 1 / 0).
- `norm_linear(x, norm, linear, then)`: `linear(then(norm(x)))` with the LayerNorm (and `then`: padding, shift,
  window partition) recomputed in backward instead of stored.
- `activation_linear(h, act, linear)`: `linear(act(h))` with the GELU recomputed in backward.

The fused paths step aside (plain modules run) under torch.compile, TorchScript tracing, torch.func transforms and
dispatch modes, and for modules that were replaced or hooked (adapters such as LoRA keep their own forward).
This file is copied next to `modeling_bevt.py` into saved folders (remote code): it imports only torch and
transformers.
"""

import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from transformers.activations import GELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.utils import logging as hf_logging

logger = hf_logging.get_logger(__name__)


def custom_autograd_allowed() -> bool:
    """Whether custom autograd functions may run: plain eager autograd, not while torch.compile or a TorchScript
    trace records the graph (they make their own choices) and not under torch.func transforms (grad, vmap, ...),
    which need functions written for them."""
    return not (
        torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()
    )


def is_plain(module: nn.Module | None, cls: type) -> bool:
    """True when `module` is exactly `cls` with no hooks, so a fused path may use its parameters directly (a
    module replaced or wrapped by an adapter library, or hooked, keeps its own forward)."""
    return (
        type(module) is cls
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


def _records_gradients(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Gradients are being recorded for `x` or the parameters of `modules`, in plain eager autograd."""
    return (
        torch.is_grad_enabled()
        and custom_autograd_allowed()
        and (x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters()))
    )


# ----------------------------------------------------------------------------------------------------------------
# Window attention
# ----------------------------------------------------------------------------------------------------------------


def window_attention_mask(
    bias: torch.Tensor, shift_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The additive attention mask of a window layout: (1, heads, N, N) from the relative position bias alone, or
    (1, windows*heads, N, N) = bias + shift mask when windows are folded into the head axis (shifted blocks)."""
    if shift_mask is None:
        return bias[None].to(dtype)
    num_windows, n = shift_mask.shape[0], shift_mask.shape[-1]
    return (bias[None] + shift_mask[:, None]).reshape(1, num_windows * bias.shape[0], n, n).to(dtype)


def mask_cache_budget() -> int:
    """Bytes of one attention mask an attention layer may keep between inference calls (per dtype and device):
    `BEVT_MASK_CACHE_MB` (MiB, default 128; 0 never keeps one). See `inference_window_attention_mask`."""
    return _megabytes("BEVT_MASK_CACHE_MB", "128", "0 keeps none")


INFERENCE_CACHE_ATTRIBUTE = "_bevt_inference_cache"  # the module attribute `inference_cache` keeps values in


def inference_cache(
    module: nn.Module,
    slot: tuple,
    key_of: Callable[[], tuple],
    build: Callable[[], torch.Tensor],
    budget: Callable[[], int] | None = None,
) -> torch.Tensor:
    """`build()`, kept on `module` under `slot` between calls without gradients while `key_of()` is unchanged; a
    value over `budget()` bytes is not kept (the budget is read only when a value is built). Calls that record
    gradients, torch.compile / tracing, torch.func transforms and dispatch modes build every time (and never call
    `key_of`: their tensors may have no storage).
    `key[0]` is the `parameter_key` of the parameter the value is made of (storage and version counter),
    so an optimizer step, `load_state_dict` or a moved / cast model rebuilds it, and a rebuild drops every value the
    module kept from other parameter values (a model moved to another device does not hold its old masks);
    inference-mode values are kept apart."""
    if torch.is_grad_enabled() or not custom_autograd_allowed() or _get_current_dispatch_mode() is not None:
        return build()
    try:
        key = key_of()
    except RuntimeError:  # a tensor without storage (a DTensor shard): nothing to key on
        return build()
    kept = module.__dict__.setdefault(INFERENCE_CACHE_ATTRIBUTE, {})
    slot = (*slot, torch.is_inference_mode_enabled())
    if slot in kept and kept[slot][0] == key:
        return kept[slot][1]
    for stale in [s for s, (k, _) in kept.items() if k[0] != key[0]]:
        del kept[stale]
    value = build()
    if budget is None or value.numel() * value.element_size() <= budget():
        kept[slot] = (key, value)
    else:
        kept.pop(slot, None)
    return value


def parameter_key(tensor: torch.Tensor) -> tuple:
    """What identifies a parameter's current values for `inference_cache`: storage, version counter, device."""
    return (tensor.data_ptr(), tensor._version, tensor.device, tuple(tensor.shape))


def inference_window_attention_mask(
    module: nn.Module, bias: torch.Tensor, shift_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """`window_attention_mask` (made contiguous, as SDPA wants it), kept on `module` between calls without gradients
    (inference, evaluation) while its relative position bias table, the shift mask and the window size are
    unchanged; one mask per dtype and device, so that alternating fp32 and bf16 calls keep both. A shifted block's
    mask is (windows x heads, N, N): building it (the bias added to every window's shift mask, then cast) took ~1/4
    of a bf16 Swin-T inference on a 16x224 clip. Masks over `mask_cache_budget()` bytes are rebuilt every call."""
    table = getattr(module, "relative_position_bias_table", None)

    def build() -> torch.Tensor:
        return window_attention_mask(bias, shift_mask, dtype).contiguous()

    if not isinstance(table, torch.Tensor):
        return build()

    def key_of() -> tuple:
        shift = None if shift_mask is None else (parameter_key(shift_mask),)
        return (parameter_key(table), tuple(bias.shape), shift)

    return inference_cache(module, ("mask", dtype, table.device), key_of, build, mask_cache_budget)


def _megabytes(name: str, default: str, zero: str) -> int:
    """Bytes from the MiB count in environment variable `name` (a clear error for anything but a number >= 0)."""
    value = os.environ.get(name, default)
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of MiB ({zero}), got {value!r}") from None
    if megabytes < 0 or megabytes != megabytes:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return int(megabytes * 2**20)


def attention_store_budget() -> int:
    """Bytes of attention probabilities one `WindowAttentionFunction` call may keep for its backward pass instead of
    recomputing them: `BEVT_ATTENTION_STORE_MB` (MiB, default 256; 0 always recomputes). Storing skips the score
    product, the bias / mask adds and the softmax in backward (a Swin-T training step on a 16x224 clip: 1.10x fp32,
    1.22-1.31x bf16 on an Intel Xeon, `benchmarks/bench_attention_store.py --model`) at the cost of the (B', H', N, N)
    probabilities in the input dtype; a call over the budget (large batches, long clips) recomputes them chunk by
    chunk and keeps nothing."""
    return _megabytes("BEVT_ATTENTION_STORE_MB", "256", "0 recomputes")


class WindowAttentionFunction(torch.autograd.Function):
    """Softmax window attention without an autograd graph over the (N x N) scores: chunk by chunk, the probabilities
    are either kept for backward (when they fit `attention_store_budget()`) or recomputed there, and backward returns
    the gradient of the relative position bias. Same math as the eager path; the query is scaled before the score
    product ((N x D) instead of (N x N) multiplies), which changes the rounding only.

    query/key/value (B', H', N, D). Head h' of the layout uses `bias[h' % heads]` and, when a shift mask
    (windows, N, N) is given (windows folded into the head axis, H' = windows * heads), `shift_mask[h' // heads]`.
    `store`: None follows the budget, True / False forces keeping / recomputing the probabilities.
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
    def _masked_scores(raw, bias, shift_mask, hs: slice, heads: int) -> torch.Tensor:
        """raw + bias (+ shift mask), float32 (b, rows, N, N), for `raw` = (scaled q) k^T of one chunk of whole
        windows (a float32 `raw` is updated in place). bf16 products are widened to float32 by the mask addition
        itself (one pass, no separate cast)."""
        b, rows, n = raw.shape[0], raw.shape[1], raw.shape[-1]
        mask = bias if shift_mask is None else bias + shift_mask[hs.start // heads : hs.stop // heads, None]
        if raw.dtype == torch.float32:
            raw.view(b, -1, heads, n, n).add_(mask)  # (b, windows in chunk, heads, N, N)
            return raw
        return torch.add(raw.view(b, -1, heads, n, n), mask.float()).view(b, rows, n, n)

    @staticmethod
    def _scores(q_scaled, k, bias, shift_mask, hs: slice, heads: int) -> torch.Tensor:
        """(scaled q) k^T + bias (+ shift mask) of one chunk, float32 (b, rows, N, N)."""
        return WindowAttentionFunction._masked_scores(
            torch.matmul(q_scaled, k.transpose(-1, -2)), bias, shift_mask, hs, heads
        )

    @staticmethod
    def _softmax_into(scores: torch.Tensor, target: torch.Tensor) -> None:
        """softmax(scores) written into `target` (float32 straight into a contiguous one, else cast on the copy)."""
        if target.dtype == torch.float32 and target.is_contiguous():
            torch.ops.aten._softmax.out(scores, -1, False, out=target)
        else:
            target.copy_(torch.softmax(scores, dim=-1))

    @staticmethod
    def _softmax_backward(probs, grad_probs, grad_bias, heads: int) -> torch.Tensor:
        """The scores' gradient (dtype of `probs`) from the probabilities' gradient; its sum over batch and windows
        is added to the float32 (heads, N, N) `grad_bias`."""
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_bias += grad_scores.view(grad_scores.shape[0], -1, heads, *grad_bias.shape[1:]).sum(
            (0, 1), dtype=torch.float32
        )
        return grad_scores

    @staticmethod
    def _native_for(query, value, bias, shift_mask) -> tuple[object, torch.Tensor, torch.Tensor] | None:
        """When the native softmax applies to this call (`native_attention`): its module and the float32 bias and
        shift mask (empty when None) it reads; else None."""
        if query.dtype != value.dtype or _get_current_dispatch_mode() is not None:
            return None
        native = native_attention(value.dtype)
        if native is None:
            return None
        mask = torch.empty(0) if shift_mask is None else shift_mask.float().contiguous()
        return native, bias.float().contiguous(), mask

    @staticmethod
    def forward(ctx, query, key, value, bias, shift_mask, scaling, store=None):
        # every chunk reads the (heads, N, N) bias row by row: contiguous (the model gathers it so; a permuted view
        # read with a stride of heads cost a Swin-T training step 3% in bf16 on an Intel Xeon)
        bias = bias.contiguous()
        heads = bias.shape[0]
        batch, heads_total, n = query.shape[:3]
        if store is None:
            store = batch * heads_total * n * n * value.element_size() <= attention_store_budget()
        out = torch.empty_like(query)
        probs = torch.empty(batch, heads_total, n, n, dtype=value.dtype, device=value.device) if store else None
        native = WindowAttentionFunction._native_for(query, value, bias, shift_mask)
        for bs, hs in WindowAttentionFunction._chunks(batch, heads_total, n, heads):
            raw = torch.matmul(query[bs, hs] * scaling, key[bs, hs].transpose(-1, -2))
            chunk = None if probs is None else probs[bs, hs]  # chunks are contiguous slices of the kept tensor
            if native is not None and raw.dtype == value.dtype:  # one pass: bias + mask + softmax (+ cast)
                module, native_bias, native_mask = native
                target = chunk if chunk is not None and chunk.is_contiguous() else raw
                module.softmax_forward(raw, native_bias, native_mask, heads, hs.start // heads, target)
                if chunk is None:
                    chunk = target
                elif target is not chunk:
                    chunk.copy_(target)
            else:
                scores = WindowAttentionFunction._masked_scores(raw, bias, shift_mask, hs, heads)
                if chunk is None:
                    chunk = torch.softmax(scores, dim=-1).to(value.dtype)
                else:
                    WindowAttentionFunction._softmax_into(scores, chunk)
            out[bs, hs] = torch.matmul(chunk, value[bs, hs])
        ctx.save_for_backward(query, key, value, bias, shift_mask, probs)
        ctx.scaling = scaling
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, bias, shift_mask, stored = ctx.saved_tensors
        scaling, heads = ctx.scaling, bias.shape[0]
        grad_q, grad_k, grad_v = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        grad_out = grad_out.contiguous()
        native = WindowAttentionFunction._native_for(query, value, bias, shift_mask)
        for bs, hs in WindowAttentionFunction._chunks(query.shape[0], query.shape[1], query.shape[2], heads):
            q_scaled, k, v, go = query[bs, hs] * scaling, key[bs, hs], value[bs, hs], grad_out[bs, hs]
            if stored is not None:  # kept in the input dtype: the softmax gradient in that dtype too
                probs = stored[bs, hs]
            elif native is not None:  # recomputed in the input dtype, as kept ones
                module, native_bias, native_mask = native
                probs = torch.matmul(q_scaled, k.transpose(-1, -2)).to(value.dtype)
                module.softmax_forward(probs, native_bias, native_mask, heads, hs.start // heads, probs)
            else:
                probs = torch.softmax(
                    WindowAttentionFunction._scores(q_scaled, k, bias, shift_mask, hs, heads), dim=-1
                )
            grad_v[bs, hs] = torch.matmul(probs.transpose(-1, -2).to(go.dtype), go)
            grad_probs = torch.matmul(go, v.transpose(-1, -2)).to(probs.dtype)
            if native is not None:  # probabilities in the input dtype here (kept or recomputed)
                native[0].softmax_backward(probs.contiguous(), grad_probs, grad_bias, heads)  # in place
                grad_scores = grad_probs
            else:
                grad_scores = WindowAttentionFunction._softmax_backward(probs, grad_probs, grad_bias, heads)
            grad_scores = grad_scores.to(q_scaled.dtype)
            grad_q[bs, hs] = torch.matmul(grad_scores, k).mul_(scaling)
            grad_k[bs, hs] = torch.matmul(grad_scores.transpose(-1, -2), q_scaled)
        return grad_q, grad_k, grad_v, grad_bias.to(bias.dtype), None, None, None


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
    without storing it. query/key/value (B', H', N, D) -> (B', N, H', D)."""
    if attention_mask is None and window_bias is not None:
        needs_grad = torch.is_grad_enabled() and (query.requires_grad or window_bias.requires_grad)
        eligible = query.device.type == "cpu" and dropout == 0.0 and custom_autograd_allowed()
        if needs_grad and eligible:
            out = WindowAttentionFunction.apply(query, key, value, window_bias, window_shift_mask, scaling)
            return out.transpose(1, 2).contiguous(), None
        attention_mask = inference_window_attention_mask(module, window_bias, window_shift_mask, query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)


# ----------------------------------------------------------------------------------------------------------------
# Linear layers through oneDNN on CPU
# ----------------------------------------------------------------------------------------------------------------
#
# On CPU, `F.linear` in float32 runs MKL's sgemm. `torch.ops.mkldnn._linear_pointwise` runs the same float32 product
# through oneDNN, which uses the CPU's widest vector units (on the AMD Zen 5 benchmark machine MKL takes its AVX2
# path and reaches ~200 GFLOP/s on two cores, oneDNN's AVX-512 kernels ~400). Same math in float32; only the
# summation order differs (relative differences ~1e-7). Whether it is faster depends on the CPU (on an Intel Sapphire
# Rapids VM MKL already runs AVX-512 and oneDNN's weight gradient was slower), so the choice is measured on the
# running machine (`linear_kernels`: a short calibration, cached per CPU model, torch version and thread count).
# BEVT_ONEDNN_LINEAR: "auto" (default, calibrated), "1" (always oneDNN), "0" (`F.linear` everywhere).


@lru_cache(maxsize=1)
def onednn_linear_op() -> Callable | None:
    """oneDNN's linear op, or None where it is unavailable, disabled (BEVT_ONEDNN_LINEAR=0) or fails its check."""
    if _onednn_setting() == "off":
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


def _kernel_setting(name: str) -> str:
    """A kernel switch in environment variable `name`: "off" (0 / false / no / off), "on" (1 / true / yes / on) or
    "auto" (unset, empty, "auto"); a clear error for anything else."""
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(f"{name} must be auto, 1 or 0, got {value!r}")


def _onednn_setting() -> str:
    """BEVT_ONEDNN_LINEAR: "off", "on" (always oneDNN) or "auto" (the calibration's choice)."""
    return _kernel_setting("BEVT_ONEDNN_LINEAR")


@dataclass(frozen=True)
class LinearKernels:
    """Which float32 CPU products go through oneDNN: `forward` (the forward and input-gradient products) and
    `weight_grad` (the weight gradients of deep layers, N*K/(N+K) >= ONEDNN_WEIGHT_GRAD_MIN_DEPTH); `source`:
    "calibrated" (measured now), "cache" (measured earlier on this machine), "forced" / "disabled"
    (BEVT_ONEDNN_LINEAR=1 / 0 or oneDNN unavailable); `timings`: the calibration's seconds per candidate."""

    forward: bool
    weight_grad: bool
    source: str
    timings: dict | None = None


# oneDNN's weight-gradient kernel needs both operands converted to its own tensor type (one copy each, ~M*(N+K)
# values); it pays off once each copied value feeds enough multiply-adds, i.e. when N*K/(N+K) is large.
ONEDNN_WEIGHT_GRAD_MIN_DEPTH = 128

# Shapes of the calibration, (rows, in, out): a shallow and a deep projection of a Swin block (the qkv of a 128-wide
# stage, an MLP of a 384-wide one); the weight gradient is measured on the deep one only (the only kind that may use
# oneDNN's). After a warm-up, two alternating rounds time each candidate `CALIBRATION_REPEATS` times; the lower
# of its two medians counts, summed over the shapes.
CALIBRATION_SHAPES = ((2048, 128, 384), (2048, 384, 1536))
CALIBRATION_REPEATS = 5
CALIBRATION_MARGIN = 0.95  # oneDNN must take less than 95% of the standard product's time to be chosen
CALIBRATION_VERSION = 1


def linear_calibration_path() -> Path:
    """Where measured choices are kept: BEVT_KERNEL_CACHE, else `$XDG_CACHE_HOME/bevt/kernels.json` (default
    `~/.cache`)."""
    if os.environ.get("BEVT_KERNEL_CACHE"):
        return Path(os.environ["BEVT_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bevt" / "kernels.json"


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, object]:
    """The CPU this process runs on, from the first processor of /proc/cpuinfo (else `platform`): `model` (its
    model name), `id` ("vendor family F model M"), `flags` (frozenset of ISA flags: avx2, avx512f, amx_bf16, ...;
    empty where unknown). What benchmarks print and the kernel calibration's cache key: never a decision."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" not in line:
                if fields:
                    break  # the first processor only
                continue
            key, value = (part.strip() for part in line.split(":", 1))
            fields.setdefault(key.lower(), value)
    except OSError:
        pass
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "id": f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}",
        "flags": frozenset(fields.get("flags", "").split()),
    }


# Shared libraries that replace malloc when preloaded (LD_PRELOAD), as they appear in /proc/self/maps.
MEMORY_ALLOCATORS = {"libtcmalloc": "tcmalloc", "libjemalloc": "jemalloc", "libmimalloc": "mimalloc"}
PROCESS_MAPS = "/proc/self/maps"


def memory_allocator() -> str:
    """The allocator behind this process's `malloc`: "tcmalloc" / "jemalloc" / "mimalloc" when such a library is
    mapped (preloaded), else "glibc malloc" (or "system malloc" off glibc). What benchmarks print and what the
    training scripts' CPU hint reads (a CPU training step spends part of its time in page faults and allocation:
    BENCHMARKS.md, "Memory allocator")."""
    try:
        with open(PROCESS_MAPS) as maps:
            for line in maps:
                name = os.path.basename(line.rstrip().rsplit(" ", 1)[-1])
                for prefix, allocator in MEMORY_ALLOCATORS.items():
                    if name.startswith(prefix):
                        return allocator
    except OSError:
        pass
    return "glibc malloc" if platform.libc_ver()[0] == "glibc" else "system malloc"


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
MALLOC_TRIM_THRESHOLD = 2**30  # free memory at the top of the heap is returned to the system above 1 GiB


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep large freed blocks for reuse instead of unmapping them: no block is served by its
    own mmap (M_MMAP_MAX 0: all come from the heap), and the heap's free top is returned to the system only beyond
    1 GiB. By default glibc maps every block over 128 KiB-32 MiB afresh and unmaps it on free, so a CPU training
    step, whose large temporaries are the same every step, has them mapped and zeroed by the kernel every step
    (100-300k page faults a Swin-T step). Measured on an Intel Xeon (BENCHMARKS.md "Denormals and the native
    attention softmax"): page faults 200k -> < 11k a step, step 1.04x faster in fp32 and 1.12x in bf16, as much as
    preloading tcmalloc.

    Process-wide, so the training scripts call it for CPU runs only (BEVT_MALLOC_TUNING=0 keeps glibc's defaults);
    True where it was applied: glibc's malloc in use (not a preloaded tcmalloc / jemalloc) and mallopt accepted it."""
    if _kernel_setting("BEVT_MALLOC_TUNING") == "off" or memory_allocator() != "glibc malloc":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


def _cpu_model() -> str:
    """The CPU's model name (`cpu_info`): a cache key only, never a decision."""
    return str(cpu_info()["model"])


def _calibration_key(threads: int) -> str:
    return f"v{CALIBRATION_VERSION}|{_cpu_model()}|torch {torch.__version__}|{threads} threads"


def _median_seconds(
    run: Callable[[], object], repeats: int = CALIBRATION_REPEATS, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median seconds of `repeats` calls of `run`, on `clock` (wall time; benchmarks pass process CPU time)."""
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return statistics.median(times)


def choose_linear_kernels(timings: dict[str, float]) -> tuple[bool, bool]:
    """(forward, weight_grad) from calibration timings: oneDNN where it beats the standard product by the margin.
    `timings`: seconds of "forward_aten" / "forward_onednn" (summed over the shapes) and "weight_grad_aten" /
    "weight_grad_onednn"."""
    forward = timings["forward_onednn"] < CALIBRATION_MARGIN * timings["forward_aten"]
    weight_grad = timings["weight_grad_onednn"] < CALIBRATION_MARGIN * timings["weight_grad_aten"]
    return forward, weight_grad


def _calibration_candidates(
    op: Callable, rows: int, k: int, n: int, g: torch.Generator, all_weight_grads: bool = False
) -> dict[str, Callable]:
    """The products compared on one shape (rows, in `k`, out `n`): "forward_aten" / "forward_onednn", and for a deep
    layer (or any, with `all_weight_grads`) "weight_grad_aten" / "weight_grad_onednn"."""
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    candidates = {"forward_aten": partial(F.linear, x, w, b), "forward_onednn": partial(op, x, w, b, "none", [], "")}
    if all_weight_grads or n * k >= ONEDNN_WEIGHT_GRAD_MIN_DEPTH * (n + k):
        grad = torch.randn(rows, n, generator=g)
        candidates["weight_grad_aten"] = partial(torch.mm, grad.t(), x)
        candidates["weight_grad_onednn"] = lambda: torch.mkldnn_linear_backward_weights(
            grad.to_mkldnn(), x.to_mkldnn(), w, False
        )
    return candidates


def _calibrate(op: Callable) -> dict[str, float]:
    """Seconds of the standard and the oneDNN products on `CALIBRATION_SHAPES` with the current threads."""
    g = torch.Generator().manual_seed(0)
    timings = dict.fromkeys(("forward_aten", "forward_onednn", "weight_grad_aten", "weight_grad_onednn"), 0.0)
    with torch.no_grad():
        for rows, k, n in CALIBRATION_SHAPES:
            candidates = _calibration_candidates(op, rows, k, n, g)
            for run in candidates.values():
                run()  # warm-up: first-call allocations, oneDNN primitive creation
            for name, seconds in _alternating_seconds(candidates).items():
                timings[name] += seconds
    return timings


def _alternating_seconds(candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Seconds of each candidate: two alternating rounds (a slow spell of the machine hits all of them) of
    `_median_seconds`, the lower median of each. Warm them up first."""
    measured: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(2):
        for name, run in candidates.items():
            measured[name].append(_median_seconds(run))
    return {name: min(values) for name, values in measured.items()}


def _read_calibration(path: Path, key: str, fields: tuple[str, ...] = ("forward", "weight_grad")) -> dict | None:
    """The cached entry under `key` when it is a dict with `fields`; None for a missing, unreadable or damaged one."""
    try:
        entry = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) and set(fields) <= set(entry) else None


def _write_calibration(path: Path, key: str, entry: dict) -> None:
    """Add `entry` under `key` (atomic replace; an unwritable cache only costs a calibration per process)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data[key] = entry
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(data, handle, indent=1)
        os.replace(handle.name, path)
    except OSError:
        pass


def linear_kernels() -> LinearKernels:
    """The oneDNN choices for this process at the current `torch.get_num_threads()` (see `LinearKernels`)."""
    return _linear_kernels(torch.get_num_threads(), _onednn_setting())


@lru_cache(maxsize=8)
def _linear_kernels(threads: int, setting: str) -> LinearKernels:
    op = onednn_linear_op()
    if op is None:
        return LinearKernels(False, False, "disabled")
    if setting == "on":
        return LinearKernels(True, True, "forced")
    path, key = linear_calibration_path(), _calibration_key(threads)
    cached = _read_calibration(path, key)
    if cached is not None:
        forward, weight_grad = bool(cached["forward"]), bool(cached["weight_grad"])
        return LinearKernels(forward, weight_grad, "cache", cached.get("timings"))
    try:
        timings = _calibrate(op)
    except (RuntimeError, NotImplementedError):
        return LinearKernels(False, False, "disabled")
    forward, weight_grad = choose_linear_kernels(timings)
    choice = LinearKernels(forward, weight_grad, "calibrated", timings)
    _write_calibration(path, key, {k: v for k, v in asdict(choice).items() if k != "source"})
    return choice


# bfloat16 on CPU pays only where the CPU multiplies bf16 faster than float32 (AMX: ~5x on the Intel Xeon of
# BENCHMARKS.md); with oneDNN kept to AVX-512-BF16 the same products ran at 0.59x float32 there. Measured, not read
# from CPU flags: one (rows, in) @ (in, out) product in both dtypes, cached like the linear calibration (the key
# also names an ONEDNN_MAX_CPU_ISA cap, which changes the kernels oneDNN may use).
BF16_PROBE_SHAPE = (2048, 384, 1536)


def bf16_matmul_speedup() -> float | None:
    """float32 seconds / bfloat16 seconds of one `BF16_PROBE_SHAPE` linear product on this CPU at the current
    `torch.get_num_threads()`: > 1 where bf16 products are faster. Measured once (~0.2 s; two alternating rounds,
    the lower median of each; one call each where bf16 is over 5x slower) and cached in `linear_calibration_path()`;
    None where a bf16 product fails."""
    return _bf16_matmul_speedup(torch.get_num_threads(), os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper())


@lru_cache(maxsize=8)
def _bf16_matmul_speedup(threads: int, isa_cap: str) -> float | None:
    path = linear_calibration_path()
    key = f"bf16 matmul|{_calibration_key(threads)}|isa cap {isa_cap or 'none'}"
    cached = _read_calibration(path, key, ("speedup",))
    if cached is not None and isinstance(cached["speedup"], int | float) and cached["speedup"] > 0:
        return float(cached["speedup"])
    rows, k, n = BF16_PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    x16, w16 = x.bfloat16(), w.bfloat16()
    candidates = {"float32": partial(F.linear, x, w), "bfloat16": partial(F.linear, x16, w16)}
    try:
        with torch.no_grad():
            # warm-up; a bf16 product 5x slower than float32 even then is answer enough (a CPU whose bf16 path is a
            # slow fallback would otherwise spend seconds on the rounds)
            seconds = {name: _median_seconds(run, repeats=1) for name, run in candidates.items()}
            if seconds["bfloat16"] <= 5 * seconds["float32"]:
                seconds = _alternating_seconds(candidates)
    except (RuntimeError, NotImplementedError):
        return None
    speedup = seconds["float32"] / max(seconds["bfloat16"], 1e-9)
    _write_calibration(path, key, {"speedup": speedup, "seconds": seconds})
    return speedup


# ----------------------------------------------------------------------------------------------------------------
# Native attention softmax (C++, built on the running machine)
# ----------------------------------------------------------------------------------------------------------------
#
# The chunked window attention spends most of its non-GEMM time in passes over (rows, N, N) score blocks: the bias
# and shift-mask additions (which also widen bf16 scores to float32), the softmax, the cast of the probabilities,
# then in backward the softmax gradient, the bias-gradient sum and casts. Two small C++ loops do each direction in
# one pass per row, float32 inside, reading and writing the input dtype (float32 or bfloat16): one (rows, N, N)
# block of one chunk (Swin-T stage 1, bf16) takes 4.1 ms instead of 22 ms forward and 1.9 instead of 3.4 ms backward
# on an Intel Xeon (BENCHMARKS.md "Denormals and the native attention softmax"). They are compiled once per machine
# with the host's instruction set (torch.utils.cpp_extension; Linux, a C++ compiler and ninja), into the kernel
# cache's folder, and used only where a calibration on the machine measured them faster (cached with the linear
# calibration).
# Underflow gives exact zeros, never float32 denormals (slow arithmetic on CPUs; see SHIFT_MASK_VALUE).

NATIVE_ATTENTION_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void put(float* p, float v) { *p = v; }
inline void put(at::BFloat16* p, float v) {  // round to nearest even; a NaN stays a NaN
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  p->x = static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

constexpr float kSmallestNormal = 1.17549435e-38f;

// exp(x) for x <= 0: range reduction by ln 2 and a degree-6 polynomial (Cephes' expf coefficients), branch-free
// so that the compiler vectorises it; below -87 (a denormal result) it returns 0.
inline float exp_nonpositive(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  float n = x * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;  // round to the nearest integer
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return underflow ? 0.0f : p * scale;
}

// Row r of the (b, heads_chunk, n, n) block is query i = r % n of layout head l = (r / n) % heads_chunk, which uses
// bias[l % heads] and mask[window0 + l / heads].
template <typename in_t, typename out_t>
void forward_rows(const in_t* scores, const float* bias, const float* mask, out_t* out, int64_t rows, int64_t n,
                  int64_t heads_chunk, int64_t heads, int64_t window0) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(n);
    float* t = buffer.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % n, layout_head = (r / n) % heads_chunk;
      const float* b = bias + ((layout_head % heads) * n + i) * n;
      const in_t* s = scores + r * n;
      float top = -3.0e38f;
      if (mask != nullptr) {
        const float* m = mask + ((window0 + layout_head / heads) * n + i) * n;
#pragma omp simd reduction(max : top)
        for (int64_t j = 0; j < n; ++j) {
          t[j] = widen(s[j]) + b[j] + m[j];
          top = t[j] > top ? t[j] : top;
        }
      } else {
#pragma omp simd reduction(max : top)
        for (int64_t j = 0; j < n; ++j) {
          t[j] = widen(s[j]) + b[j];
          top = t[j] > top ? t[j] : top;
        }
      }
      float total = 0.0f;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < n; ++j) {
        t[j] = exp_nonpositive(t[j] - top);
        total += t[j];
      }
      const float inverse = 1.0f / total;
      out_t* o = out + r * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float v = t[j] * inverse;
        put(o + j, v < kSmallestNormal ? 0.0f : v);
      }
    }
  });
}

// grad <- probs * (grad - sum(grad * probs)) row by row, and its sum over batch and windows added to grad_bias
// (heads, n, n). Parallel over the rows of the bias, so no two threads add to one.
template <typename p_t, typename g_t>
void backward_rows(const p_t* probs, g_t* grad, float* grad_bias, int64_t batch, int64_t n, int64_t heads_chunk,
                   int64_t heads) {
  const int64_t groups = batch * (heads_chunk / heads);
  at::parallel_for(0, heads * n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bias_row = begin; bias_row < end; ++bias_row) {
      const int64_t h = bias_row / n, i = bias_row % n;
      float* gb = grad_bias + bias_row * n;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t row = (g * heads + h) * n + i;
        const p_t* p = probs + row * n;
        g_t* d = grad + row * n;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < n; ++j) dot += widen(p[j]) * widen(d[j]);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const float v = widen(p[j]) * (widen(d[j]) - dot);
          gb[j] += v;
          put(d + j, v);
        }
      }
    }
  });
}

void require(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == dims, name, " must be a contiguous ", dims,
              "-d CPU tensor");
}

}  // namespace

void softmax_forward(at::Tensor scores, at::Tensor bias, at::Tensor mask, int64_t heads, int64_t window0,
                     at::Tensor out) {
  require(scores, "scores", 4);
  require(bias, "bias", 3);
  require(out, "out", 4);
  const int64_t n = scores.size(3), heads_chunk = scores.size(1);
  TORCH_CHECK(scores.size(2) == n && out.sizes() == scores.sizes() && bias.scalar_type() == at::kFloat &&
                  bias.size(1) == n && bias.size(2) == n && bias.size(0) == heads && heads_chunk % heads == 0,
              "softmax_forward: mismatched shapes or dtypes");
  const float* m = nullptr;
  if (mask.numel() > 0) {
    require(mask, "mask", 3);
    TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.size(1) == n && mask.size(2) == n &&
                    window0 >= 0 && window0 + heads_chunk / heads <= mask.size(0),
                "softmax_forward: mismatched mask");
    m = mask.data_ptr<float>();
  }
  const float* b = bias.data_ptr<float>();
  const int64_t rows = scores.numel() / n;
  const auto in = scores.scalar_type(), to = out.scalar_type();
  if (in == at::kFloat && to == at::kFloat)
    forward_rows(scores.data_ptr<float>(), b, m, out.data_ptr<float>(), rows, n, heads_chunk, heads, window0);
  else if (in == at::kBFloat16 && to == at::kBFloat16)
    forward_rows(scores.data_ptr<at::BFloat16>(), b, m, out.data_ptr<at::BFloat16>(), rows, n, heads_chunk, heads,
                 window0);
  else
    TORCH_CHECK(false, "softmax_forward: scores and out must both be float32 or both bfloat16");
}

void softmax_backward(at::Tensor probs, at::Tensor grad, at::Tensor grad_bias, int64_t heads) {
  require(probs, "probs", 4);
  require(grad, "grad", 4);
  require(grad_bias, "grad_bias", 3);
  const int64_t n = probs.size(3), heads_chunk = probs.size(1);
  TORCH_CHECK(grad.sizes() == probs.sizes() && grad.scalar_type() == probs.scalar_type() &&
                  grad_bias.scalar_type() == at::kFloat && grad_bias.size(0) == heads && grad_bias.size(1) == n &&
                  grad_bias.size(2) == n && heads_chunk % heads == 0,
              "softmax_backward: mismatched shapes or dtypes");
  float* gb = grad_bias.data_ptr<float>();
  if (probs.scalar_type() == at::kFloat)
    backward_rows(probs.data_ptr<float>(), grad.data_ptr<float>(), gb, probs.size(0), n, heads_chunk, heads);
  else if (probs.scalar_type() == at::kBFloat16)
    backward_rows(probs.data_ptr<at::BFloat16>(), grad.data_ptr<at::BFloat16>(), gb, probs.size(0), n, heads_chunk,
                  heads);
  else
    TORCH_CHECK(false, "softmax_backward: float32 or bfloat16 only");
}
"""
NATIVE_ATTENTION_FUNCTIONS = ["softmax_forward", "softmax_backward"]
NATIVE_ATTENTION_CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # host vector units (per machine); at::parallel_for
NATIVE_ATTENTION_DTYPES = (torch.float32, torch.bfloat16)
# Calibration block: one chunk of `WindowAttentionFunction` at Swin-T's stage-1 video window (3 heads, 8x7x7 tokens;
# 4 shifted windows, 30% of their pairs masked).
NATIVE_CALIBRATION_SHAPE = (1, 12, 392, 3)  # (batch, layout heads, tokens, heads)


def _native_attention_setting() -> str:
    """BEVT_NATIVE_ATTENTION: "off", "on" (used wherever it builds) or "auto" (where the calibration measures it
    faster)."""
    return _kernel_setting("BEVT_NATIVE_ATTENTION")


def native_attention_build_name() -> str:
    """The extension's name: a digest of its source, flags, the torch version and this CPU's model and ISA flags, so
    a cache folder shared by machines with other CPUs (a cluster's home directory) never loads a foreign build."""
    info = cpu_info()
    digest = hashlib.sha256(
        "|".join(
            [NATIVE_ATTENTION_SOURCE, *NATIVE_ATTENTION_CFLAGS, torch.__version__, str(info["model"]),
             " ".join(sorted(info["flags"]))]
        ).encode()
    ).hexdigest()[:16]
    return f"bevt_attention_{digest}"


def native_attention_module():
    """The compiled native attention module, or None: BEVT_NATIVE_ATTENTION=0, not Linux, no C++ compiler or ninja,
    a failed build, or a result that disagrees with PyTorch's on a small check. Built once into
    `<kernel cache folder>/extensions/` (~30 s on two cores), loaded from there afterwards."""
    if _native_attention_setting() == "off":
        return None
    return _native_attention_module()


@lru_cache(maxsize=1)
def _native_attention_module():
    if platform.system() != "Linux":  # built and tested with GCC on Linux only (macOS' clang has no -fopenmp)
        logger.info("Native attention kernels off: built on Linux only.")
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        logger.info(f"Native attention kernels off: no C++ compiler ({compiler!r}) on PATH.")
        return None
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)  # its import warns about CUDA_HOME on CUDA builds without a CUDA runtime
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)
    if not cpp_extension.is_ninja_available():
        logger.info("Native attention kernels off: ninja is not installed (pip install ninja).")
        return None
    name = native_attention_build_name()
    folder = linear_calibration_path().parent / "extensions" / name
    built = any(folder.glob(f"{name}*.so"))
    if not built:
        logger.info(f"Compiling the native attention kernels for this CPU once (~30 s), into {folder}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load_inline(
            name,
            cpp_sources=[NATIVE_ATTENTION_SOURCE],
            functions=NATIVE_ATTENTION_FUNCTIONS,
            extra_cflags=NATIVE_ATTENTION_CFLAGS,
            extra_ldflags=["-fopenmp"],  # libgomp: the OpenMP runtime torch's CPU build already loaded
            build_directory=str(folder),
            verbose=False,
        )
        agrees = _native_attention_agrees(module)
    except Exception as error:  # a compiler, linker or loader failure of any kind: the PyTorch path runs
        logger.warning(f"Native attention kernels off: building them failed ({type(error).__name__}: {error}).")
        return None
    if not agrees:
        logger.warning("Native attention kernels off: their result disagrees with PyTorch's on this machine.")
        return None
    return module


def _native_attention_agrees(module) -> bool:
    """A small forward / backward of the native kernels against PyTorch's ops, float32 and bfloat16."""
    g = torch.Generator().manual_seed(0)
    batch, heads, n = 2, 2, 9
    bias, mask = torch.randn(heads, n, n, generator=g), torch.where(torch.rand(3, n, n, generator=g) < 0.3, -1e4, 0.0)
    for dtype in NATIVE_ATTENTION_DTYPES:
        raw = torch.randn(batch, 2 * heads, n, n, generator=g).to(dtype)
        expected = (raw.float().view(batch, 2, heads, n, n) + bias + mask[1:3, None]).softmax(-1).view_as(raw)
        probs = torch.empty_like(raw)
        module.softmax_forward(raw, bias, mask, heads, 1, probs)
        grad = torch.randn(raw.shape, generator=g).to(dtype)
        expected_grad = torch._softmax_backward_data(grad.float(), probs.float(), -1, torch.float32)
        grad_bias = torch.zeros(heads, n, n)
        module.softmax_backward(probs, grad, grad_bias, heads)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        if not (
            torch.allclose(probs.float(), expected, atol=tolerance)
            and torch.allclose(grad.float(), expected_grad, atol=tolerance)
            and torch.allclose(grad_bias, expected_grad.view(batch, 2, heads, n, n).sum((0, 1)), atol=tolerance)
        ):
            return False
    return True


def native_attention(dtype: torch.dtype):
    """The native attention module for `dtype` scores on this CPU at the current threads, or None: off, not built,
    or (BEVT_NATIVE_ATTENTION=auto) slower than PyTorch's ops in this machine's calibration."""
    if dtype not in NATIVE_ATTENTION_DTYPES:
        return None
    setting = _native_attention_setting()
    if setting == "off":
        return None
    return _native_attention_choice(torch.get_num_threads(), setting, dtype)


@lru_cache(maxsize=8)
def _native_attention_choice(threads: int, setting: str, dtype: torch.dtype):
    module = _native_attention_module()
    if module is None or setting == "on":
        return module
    path = linear_calibration_path()
    key = f"native attention|{native_attention_build_name()}|{_calibration_key(threads)}|{dtype}"
    cached = _read_calibration(path, key, ("native",))
    if cached is None:
        try:
            timings = _calibrate_native_attention(module, dtype)
        except (RuntimeError, NotImplementedError):
            return None
        cached = {"native": timings["native"] < CALIBRATION_MARGIN * timings["torch"], "timings": timings}
        _write_calibration(path, key, cached)
        logger.info(
            f"Native attention kernels, {dtype}: {'used' if cached['native'] else 'not used'} (calibration: "
            f"{timings['native'] * 1e3:.2f} ms against PyTorch's {timings['torch'] * 1e3:.2f} ms)."
        )
    return module if cached["native"] else None


def _calibrate_native_attention(module, dtype: torch.dtype) -> dict[str, float]:
    """Seconds of one forward + backward softmax pass over a `NATIVE_CALIBRATION_SHAPE` block, PyTorch's ops (as
    `WindowAttentionFunction` runs them) against the native kernels."""
    batch, rows, n, heads = NATIVE_CALIBRATION_SHAPE
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(batch, rows, n, n, generator=g).to(dtype)
    bias = torch.randn(heads, n, n, generator=g)
    mask = torch.where(torch.rand(rows // heads, n, n, generator=g) < 0.3, -1e4, 0.0)
    probs, grad = torch.empty_like(raw), torch.randn(raw.shape, generator=g).to(dtype)
    work, grad_bias = torch.empty_like(grad), torch.zeros(heads, n, n)

    def with_torch():
        scores = WindowAttentionFunction._masked_scores(raw.clone(), bias, mask, slice(0, rows), heads)
        WindowAttentionFunction._softmax_into(scores, probs)
        WindowAttentionFunction._softmax_backward(probs, grad, grad_bias, heads)

    def native():
        module.softmax_forward(raw, bias, mask, heads, 0, probs)
        work.copy_(grad)  # (the model's backward writes into its fresh product instead)
        module.softmax_backward(probs, work, grad_bias, heads)

    candidates = {"torch": with_torch, "native": native}
    with torch.no_grad():
        for run in candidates.values():
            run()
        return _alternating_seconds(candidates)


def _onednn_usable(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `hidden @ weight.T` can go through oneDNN: plain float32 CPU tensors, eager mode (not compiling or
    tracing), no autocast, no dispatch mode."""
    return (
        custom_autograd_allowed()
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
        and onednn_linear_op() is not None  # last: its one-time self-check must run in plain eager mode
    )


def _onednn_eligible(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the forward / input-gradient product `hidden @ weight.T` goes through oneDNN: usable, and chosen for
    this machine (`linear_kernels().forward`)."""
    return _onednn_usable(hidden, weight) and linear_kernels().forward


def _onednn_matmul(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows (M, K) @ weight (N, K).T (+ bias (N,)) -> (M, N) through oneDNN."""
    return onednn_linear_op()(rows, weight, bias, "none", [], "")


def _linear_weight_grad(grad_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """grad_rows (M, N).T @ rows (M, K) -> (N, K): the weight gradient of a linear layer."""
    n, k = grad_rows.shape[1], rows.shape[1]
    if (
        n * k >= ONEDNN_WEIGHT_GRAD_MIN_DEPTH * (n + k)
        and _onednn_usable(rows, grad_rows)
        and linear_kernels().weight_grad
    ):
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


# ----------------------------------------------------------------------------------------------------------------
# Recompute instead of store: LayerNorm in front of a linear layer, GELU between the two MLP layers
# ----------------------------------------------------------------------------------------------------------------


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


def _norm_then(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    then: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """then(layer_norm(x)): what PreparedLinearFunction recomputes in backward for `norm_linear`."""
    x = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return then(x) if then is not None else x


def norm_linear(
    x: torch.Tensor,
    norm: nn.Module,
    linear: nn.Module,
    then: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`linear(then(norm(x)))`. `then` only moves values (padding, cyclic shift, window partition), no parameters.

    When gradients are recorded in eager mode and `norm` / `linear` are a plain `nn.LayerNorm` / `BEVTLinear`, the
    normalized tensor is recomputed in backward from `x` (kept anyway as the residual) instead of stored."""
    if _records_gradients(x, norm, linear) and is_plain(norm, nn.LayerNorm) and is_plain(linear, BEVTLinear):
        return PreparedLinearFunction.apply(
            partial(_norm_then, eps=norm.eps, then=then), x, linear.weight, linear.bias, norm.weight, norm.bias
        )
    x = norm(x)
    return linear(then(x) if then is not None else x)


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


def _is_exact_gelu(act: nn.Module) -> bool:
    return (is_plain(act, GELUActivation) and act.act is F.gelu) or (
        is_plain(act, nn.GELU) and act.approximate == "none"
    )


def activation_linear(
    hidden: torch.Tensor, act: nn.Module, linear: nn.Module, dropout: nn.Module | None = None
) -> torch.Tensor:
    """`linear(dropout(act(hidden)))`. With an exact GELU, a plain `BEVTLinear`, no active dropout and gradients
    recorded in eager mode, the activation is recomputed in backward instead of stored."""
    active_dropout = dropout is not None and dropout.training and dropout.p > 0
    if (
        not active_dropout
        and _records_gradients(hidden, linear)
        and _is_exact_gelu(act)
        and is_plain(linear, BEVTLinear)
    ):
        return GeluLinearFunction.apply(hidden, linear.weight, linear.bias)
    hidden = act(hidden)
    return linear(dropout(hidden) if dropout is not None else hidden)
