"""oneDNN or the standard kernels for the float32 CPU linears? What the calibration chose on this machine, the linear
shapes of a Swin-T training step timed both ways, and the whole fp32 step with each choice.

    python benchmarks/bench_linear_kernels.py --repeats 5

`kernels_bevt.linear_kernels()` (BEVT_ONEDNN_LINEAR=auto, the default) times oneDNN against `F.linear` / `torch.mm`
on two layer shapes at the first float32 CPU linear of a process and keeps oneDNN where it is >= 5% faster (cached
per CPU model, torch version and threads). This script checks that choice against the model's own shapes (the
qkv / proj / fc1 / fc2 products of every stage of a 16x224 clip, forward and weight gradient) and over whole training
steps of `bench_model.py` (Swin-T dims, one 16x224 clip + 4 images, joint masked-token loss), switching
BEVT_ONEDNN_LINEAR between interleaved steps: "1" (always oneDNN, the behaviour before the calibration), "0"
(never) and the calibrated choice. Process CPU time, `--threads` threads (default 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bevt import kernels_bevt

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Rows and (in, out) features of the linears of a Swin-T step on one 16x224 clip: 8x56x56 tokens at stage 1, a
# quarter of them per stage after; qkv (C -> 3C), proj (C -> C), fc1 (C -> 4C), fc2 (4C -> C).
STAGES = ((25088, 96), (6272, 192), (1568, 384), (392, 768))


def shape_table(repeats: int, row_divisor: int = 1) -> None:
    op = kernels_bevt.onednn_linear_op()
    g = torch.Generator().manual_seed(0)
    names = ("forward_aten", "forward_onednn", "weight_grad_aten", "weight_grad_onednn")
    totals = dict.fromkeys(names, 0.0)
    print("| rows | in -> out | forward F.linear / oneDNN (ms) | weight grad mm / oneDNN (ms) |")
    print("| ---: | --- | ---: | ---: |")
    with torch.no_grad():
        for rows, c in STAGES:
            rows = max(1, rows // row_divisor)
            for k, n in ((c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)):
                # the calibration's own candidates, with the weight gradient of shallow layers too
                runs = kernels_bevt._calibration_candidates(op, rows, k, n, g, all_weight_grads=True)
                for run in runs.values():
                    run()
                ms = {
                    name: 1e3 * kernels_bevt._median_seconds(runs[name], repeats, time.process_time) for name in names
                }
                for name, value in ms.items():
                    totals[name] += value
                fa, fo, wa, wo = (ms[name] for name in names)
                deep = n * k >= kernels_bevt.ONEDNN_WEIGHT_GRAD_MIN_DEPTH * (n + k)
                print(
                    f"| {rows} | {k} -> {n} | {fa:.1f} / {fo:.1f} ({fa / fo:.2f}x) | {wa:.1f} / {wo:.1f} "
                    f"({wa / wo:.2f}x{'' if deep else ', shallow: mm always'}) |",
                    flush=True,
                )
    fa, fo, wa, wo = (totals[name] for name in names)
    print(
        f"all shapes: forward {fa:.0f} / {fo:.0f} ms ({fa / fo:.2f}x for oneDNN), weight gradient {wa:.0f} / "
        f"{wo:.0f} ms ({wa / wo:.2f}x)",
        flush=True,
    )


def step_comparison(repeats: int, smoke: bool = False) -> None:
    from bench_model import build_inputs, build_model, ours_step

    model = build_model("test" if smoke else "tiny")
    inputs = build_inputs(8, 64, 2, model.config.vocab_size) if smoke else build_inputs(16, 224, 4, model.config.vocab_size)
    settings = {"oneDNN always (1)": "1", "never (0)": "0", "calibrated (auto)": "auto"}

    def step(setting: str) -> tuple[float, float]:
        os.environ["BEVT_ONEDNN_LINEAR"] = setting
        kernels_bevt.onednn_linear_op.cache_clear()  # "0" disables the op itself
        model.zero_grad(set_to_none=True)
        start = time.process_time()
        loss = ours_step(model, inputs)
        return time.process_time() - start, loss.item()

    losses = {name: step(value)[1] for name, value in settings.items()}  # warm-up (and the calibration, if due)
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, value in settings.items():
            times[name].append(step(value)[0])
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["oneDNN always (1)"]
    for name, t in times.items():
        print(
            f"fp32 training step, {name}: {med[name]:.3f} s ({min(t):.3f}-{max(t):.3f}), {base / med[name]:.3f}x "
            f"the always-oneDNN step; loss {losses[name]:.6f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-step", action="store_true", help="only the per-shape table")
    parser.add_argument("--smoke", action="store_true", help="seconds: 1/64 of the rows, the test preset, 1 repeat")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    if kernels_bevt.onednn_linear_op() is None:
        raise SystemExit("oneDNN is not available in this torch build: nothing to compare")
    os.environ.pop("BEVT_ONEDNN_LINEAR", None)
    choice = kernels_bevt.linear_kernels()
    print(f"CPU: {kernels_bevt._cpu_model()}; torch {torch.__version__}; {args.threads} threads; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    print(
        f"calibration ({choice.source}, {kernels_bevt.linear_calibration_path()}): forward "
        f"{'oneDNN' if choice.forward else 'F.linear'}, deep weight gradient "
        f"{'oneDNN' if choice.weight_grad else 'torch.mm'}; seconds {choice.timings}",
        flush=True,
    )
    shape_table(args.repeats, row_divisor=64 if args.smoke else 1)
    if not args.skip_step:
        step_comparison(args.repeats, smoke=args.smoke)


if __name__ == "__main__":
    main()
