"""Recompute or keep the attention probabilities? One stage-1 shifted window attention of a 16x224 clip (64 windows x
3 heads x 392 tokens, head dim 32, windows folded into the head axis), forward + backward, fp32 and bf16 autocast.

    python benchmarks/bench_attention_store.py --repeats 5
    python benchmarks/bench_attention_store.py --model --repeats 5   # the whole training step (bench_model's)

`kernels_bevt.WindowAttentionFunction` (what the model runs on CPU training) keeps the probabilities for backward
when they fit `BEVT_ATTENTION_STORE_MB` (in the input dtype: bf16 under autocast, 2 bytes per entry, ~56 MiB for this
layer) and otherwise recomputes them chunk by chunk in backward (the score product, the bias / mask adds and the
softmax again). This script forces each side (`store=True` / `store=False`), checks both give the same gradients
and times them interleaved (process CPU time, one thread). `--model`: the same choice over a whole training step of
`bench_model.py` (Swin-T dims, one 16x224 clip + 4 images, joint masked-token loss), switched with
`BEVT_ATTENTION_STORE_MB` (default budget vs 0) between interleaved steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bevt.kernels_bevt import WindowAttentionFunction

sys.path.insert(0, str(Path(__file__).resolve().parent))


def model_step_comparison(repeats: int) -> None:
    """Training step with the probabilities kept (default budget) against recomputed (budget 0), fp32 and bf16."""
    from bench_model import build_inputs, build_model, ours_step, precision_context

    def set_budget(value: str | None) -> None:
        if value is None:
            os.environ.pop("BEVT_ATTENTION_STORE_MB", None)
        else:
            os.environ["BEVT_ATTENTION_STORE_MB"] = value

    model = build_model("tiny")
    inputs = build_inputs(16, 224, 4, model.config.vocab_size)
    budgets = {"recompute": "0", "store": os.environ.get("BEVT_ATTENTION_STORE_MB")}  # None: the library default
    for precision in ("fp32", "bf16"):
        def step(name: str, precision: str = precision) -> tuple[float, float]:
            set_budget(budgets[name])
            model.zero_grad(set_to_none=True)
            start = time.process_time()
            with precision_context(precision):
                loss = ours_step(model, inputs)
            return time.process_time() - start, loss.item()

        losses = {name: step(name)[1] for name in budgets}  # warm-up, and the same loss both ways
        times: dict[str, list[float]] = {name: [] for name in budgets}
        for _ in range(repeats):
            for name in budgets:
                times[name].append(step(name)[0])
        med = {name: statistics.median(t) for name, t in times.items()}
        print(
            f"training step {precision}: recompute {med['recompute']:.3f} s ({min(times['recompute']):.3f}-"
            f"{max(times['recompute']):.3f}), store {med['store']:.3f} s ({min(times['store']):.3f}-"
            f"{max(times['store']):.3f}); store is {med['recompute'] / med['store']:.2f}x faster; losses "
            f"{losses['recompute']:.6f} / {losses['store']:.6f}; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    set_budget(budgets["store"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--windows", type=int, default=64, help="64 for stage 1 of a 16x224 clip; fewer for a quick run"
    )
    parser.add_argument("--model", action="store_true", help="time whole training steps instead of one layer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model:
        model_step_comparison(args.repeats)
        return
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

        def step(store: bool, q=q, k=k, v=v, dtype=dtype):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = WindowAttentionFunction.apply(q, k, v, bias, shift, dim**-0.5, store)
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, bias))
            return grads

        recomputed, stored = step(False), step(True)
        worst = max(
            ((a.float() - b.float()).norm() / a.float().norm()).item() for a, b in zip(recomputed, stored)
        )
        times: dict[str, list[float]] = {"recompute": [], "store": []}
        for _ in range(args.repeats):
            for name, store in (("recompute", False), ("store", True)):
                start = time.process_time()
                step(store)
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
