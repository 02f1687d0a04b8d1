"""Recompute or store the attention probabilities? One stage-1 shifted window attention of a 16x224 clip (64 windows x
3 heads x 392 tokens, head dim 32, windows folded into the head axis), forward + backward, fp32 and bf16 autocast.

    python benchmarks/bench_attention_store.py --repeats 5

`kernels_bevt.WindowAttentionFunction` (what the model runs on CPU) stores no attention matrix and recomputes the
probabilities chunk by chunk in backward. `StoredProbabilities` below is a prototype of the other side of the trade
(not used by the model): the same chunked forward, keeping the probabilities in the input dtype (bf16 under autocast:
2 bytes per entry, ~59 MB for this layer) so that backward skips the score product, the bias/mask adds and the
softmax. The run checks both give the same gradients and times them interleaved (process CPU time, one thread).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bevt.kernels_bevt import WindowAttentionFunction


class StoredProbabilities(torch.autograd.Function):
    """WindowAttentionFunction's math, with the (B', H', N, N) probabilities stored instead of recomputed."""

    @staticmethod
    def forward(ctx, query, key, value, bias, shift_mask, scaling):
        heads = bias.shape[0]
        out = torch.empty_like(query)
        probs = torch.empty(*query.shape[:3], query.shape[2], dtype=value.dtype)
        for bs, hs in WindowAttentionFunction._chunks(query.shape[0], query.shape[1], query.shape[2], heads):
            scores = WindowAttentionFunction._scores(
                query[bs, hs], key[bs, hs], bias, shift_mask, hs, heads, scaling
            )
            probs[bs, hs] = torch.softmax(scores, dim=-1).to(value.dtype)
            out[bs, hs] = torch.matmul(probs[bs, hs], value[bs, hs])
        ctx.save_for_backward(query, key, value, probs)
        ctx.scaling, ctx.bias_shape = scaling, bias.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, probs = ctx.saved_tensors
        heads = ctx.bias_shape[0]
        grad_q, grad_k, grad_v = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        grad_bias = torch.zeros(ctx.bias_shape)
        grad_out = grad_out.contiguous()
        for bs, hs in WindowAttentionFunction._chunks(query.shape[0], query.shape[1], query.shape[2], heads):
            p, go = probs[bs, hs], grad_out[bs, hs]
            grad_v[bs, hs] = torch.matmul(p.transpose(-1, -2), go)
            grad_probs = torch.matmul(go, value[bs, hs].transpose(-1, -2)).float()
            grad_scores = torch._softmax_backward_data(grad_probs, p.float(), -1, torch.float32)
            grad_bias += grad_scores.view(grad_scores.shape[0], -1, *ctx.bias_shape).sum((0, 1))
            grad_scores = grad_scores.mul_(ctx.scaling).to(query.dtype)
            grad_q[bs, hs] = torch.matmul(grad_scores, key[bs, hs])
            grad_k[bs, hs] = torch.matmul(grad_scores.transpose(-1, -2), query[bs, hs])
        return grad_q, grad_k, grad_v, grad_bias, None, None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--windows", type=int, default=64, help="64 for stage 1 of a 16x224 clip; fewer for a quick run"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, heads, dim = 392, 3, 32
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(heads, n, n, generator=g).requires_grad_()
    shift = torch.where(torch.rand(args.windows, n, n, generator=g) < 0.3, -100.0, 0.0)
    for precision in ("fp32", "bf16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        q, k, v = (
            torch.randn(1, args.windows * heads, n, dim, generator=g).to(dtype).requires_grad_()
            for _ in range(3)
        )

        def step(fn, q=q, k=k, v=v, dtype=dtype):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = fn.apply(q, k, v, bias, shift, dim**-0.5)
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, bias))
            return grads

        recomputed, stored = step(WindowAttentionFunction), step(StoredProbabilities)
        worst = max(
            ((a.float() - b.float()).norm() / a.float().norm()).item() for a, b in zip(recomputed, stored)
        )
        times: dict[str, list[float]] = {"recompute": [], "store": []}
        for _ in range(args.repeats):
            for name, fn in (("recompute", WindowAttentionFunction), ("store", StoredProbabilities)):
                start = time.process_time()
                step(fn)
                times[name].append(time.process_time() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(
            f"{precision}: recompute {med['recompute']:.3f} s ({min(times['recompute']):.3f}-{max(times['recompute']):.3f}), "
            f"store {med['store']:.3f} s ({min(times['store']):.3f}-{max(times['store']):.3f}); "
            f"store is {med['recompute'] / med['store']:.2f}x faster, keeps "
            f"{args.windows * heads * n * n * (2 if precision == 'bf16' else 4) / 2**20:.0f} MiB; "
            f"gradients differ by {worst:.1e} (relative); load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
