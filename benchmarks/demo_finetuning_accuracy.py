#!/usr/bin/env python
"""The fine-tuning demo's accuracy run: `accelerate launch run_finetuning.py` with no data flags, timed end to end.

Runs the demo from a clean output folder (so writing the synthetic shards is part of the time), optionally from a
pretraining folder (`--model_name_or_path`, e.g. the output of the pretraining demo), then reports the wall time,
the final validation accuracy the script prints, and when each evaluation happened (`eval_history.json`), in
particular when top-1 accuracy first reached the target. Exits with status 1 when the target accuracy or the time
budget is missed.

    python benchmarks/demo_finetuning_accuracy.py                                   # from scratch
    python benchmarks/demo_finetuning_accuracy.py --model_name_or_path outputs/bevt-pretraining-demo
    python benchmarks/demo_finetuning_accuracy.py --threads 1 --json result.json  # OMP_NUM_THREADS=1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--output_dir", default="outputs/bench-finetuning-demo", help="Removed first, then written."
    )
    p.add_argument(
        "--model_name_or_path", default=None, help="Start from this BEVT folder instead of scratch."
    )
    p.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS for the run (default: torch's)."
    )
    p.add_argument("--target", type=float, default=0.90, help="Top-1 accuracy the demo must reach.")
    p.add_argument("--budget_s", type=float, default=600.0, help="Wall-time budget in seconds.")
    p.add_argument("--json", default=None, help="Also write the result here.")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="Further run_finetuning.py flags (after --).")
    return p.parse_args(argv)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output_dir)
    shutil.rmtree(output, ignore_errors=True)
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--cpu"]
    command += [str(ROOT / "run_finetuning.py"), "--output_dir", str(output)]
    if args.model_name_or_path:
        command += ["--model_name_or_path", args.model_name_or_path]
    command += [a for a in args.extra if a != "--"]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    load_before = load_average()
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (output / "benchmark_log.txt").parent.mkdir(parents=True, exist_ok=True)
    (output / "benchmark_log.txt").write_text(result.stdout + "\n" + result.stderr)
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
        print(f"run_finetuning.py failed with status {result.returncode}", file=sys.stderr)
        return 1
    match = re.search(r"validation accuracy: ([0-9.]+)%", result.stdout)
    if match is None:
        print(result.stdout[-2000:], file=sys.stderr)
        print("no 'validation accuracy' line in the output", file=sys.stderr)
        return 1
    accuracy = float(match.group(1)) / 100
    history = json.loads((output / "eval_history.json").read_text())
    reached = next((h for h in history if h["top1_accuracy"] >= args.target), None)
    report = {
        "start": args.model_name_or_path or "scratch",
        "wall_s": round(wall, 1),
        "final_top1_accuracy": accuracy,
        "target": args.target,
        "first_eval_reaching_target": reached,
        "evaluations": history,
        "threads": args.threads or "default",
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": platform.platform(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"fine-tuning demo from {report['start']}: validation top-1 {100 * accuracy:.2f}% in {wall:.0f}s wall "
        f"(threads {report['threads']}, load average {load_before} -> {report['load_average_after']})"
    )
    if reached:
        print(
            f"first reached {100 * args.target:.0f}% at step {reached['step']} (epoch {reached['epoch']:.1f}), "
            f"{reached['elapsed_s']:.0f}s into training"
        )
    ok = accuracy >= args.target and wall <= args.budget_s
    print("PASS" if ok else f"FAIL (target {100 * args.target:.0f}% within {args.budget_s:.0f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
