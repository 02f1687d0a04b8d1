"""How the BEVT pretraining step scales with frames, resolution and batch size.

    python benchmarks/bench_scaling.py                  # Swin-T dims, video stream, CPU
    python benchmarks/bench_scaling.py --cpu-time       # process CPU time (machine shared with other jobs)

For each setting: forward + backward time of a masked-video-modeling step (median of --repeats) and the peak
resident memory growth of one step in a fresh subprocess. The scaling exponent is the least-squares slope of
log(time) (or log(memory)) against log(tokens) over each sweep: 1.0 is linear in tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import build_inputs, build_model, ours_step  # noqa: E402

SWEEPS = {
    "frames": [{"frames": f, "size": 224, "videos": 1} for f in (8, 16, 32)],
    "resolution": [{"frames": 16, "size": s, "videos": 1} for s in (160, 224)],
    "batch": [{"frames": 16, "size": 224, "videos": b} for b in (1, 2)],
}


def tokens(setting: dict) -> int:
    return setting["videos"] * (setting["frames"] // 2) * (setting["size"] // 4) ** 2


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def step_time(model, setting: dict, repeats: int, clock) -> float:
    inputs = build_inputs(setting["frames"], setting["size"], 0, model.config.vocab_size, videos=setting["videos"])
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = clock()
        ours_step(model, inputs)
        if i:  # first run is warm-up
            times.append(clock() - start)
    return statistics.median(times)


def step_memory(setting: dict, args) -> float:
    cmd = [
        sys.executable, str(Path(__file__).resolve().parent / "bench_model.py"), "--measure-memory", "ours",
        "--preset", args.preset, "--frames", str(setting["frames"]), "--size", str(setting["size"]),
        "--images", "0", "--videos", str(setting["videos"]), "--threads", str(args.threads),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall time")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    model = build_model(args.preset)
    report: dict = {"preset": args.preset, "threads": args.threads, "clock": "cpu" if args.cpu_time else "wall"}
    for name, settings in SWEEPS.items():
        rows = []
        for setting in settings:
            row = {**setting, "tokens": tokens(setting), "step_s": step_time(model, setting, args.repeats, clock)}
            if not args.skip_memory:
                row["peak_mib"] = step_memory(setting, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
        sweep = {"rows": rows, "time_exponent": slope([r["tokens"] for r in rows], [r["step_s"] for r in rows])}
        if not args.skip_memory:
            sweep["memory_exponent"] = slope([r["tokens"] for r in rows], [r["peak_mib"] for r in rows])
        report[name] = sweep
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
