"""Model speed and memory: our BEVT against a straightforward reference and torchvision's swin3d_t.

    python benchmarks/bench_model.py                # Swin-T dims, 1 video 16x224 + 4 images 224, CPU, fp32 + bf16
    python benchmarks/bench_model.py --repeats 7 --compile  # + compiled inference and training (slow to compile)
    python benchmarks/bench_model.py --threads 1 --cpu-time --profile 15  # on a shared machine; + where time goes
    python benchmarks/bench_model.py --precisions fp32  # the fp32 columns only (as the first AMD table)
    python benchmarks/bench_model.py --smoke        # seconds: every part runs (tests)

Each run prints the machine (CPU model, AVX2 / AVX-512 / AMX from /proc/cpuinfo flags, torch's CPU capability,
threads, load average), the fp32 and bf16 (AMX where present) GEMM rates measured in the run, the FLOPs of every
candidate (`FlopCounterMode`), and a table with fp32 and bf16 (`torch.autocast("cpu", bfloat16)`) columns: seconds
(median and range of interleaved runs), the ratio ours / peer, and the utilisation (FLOP/s over the GEMM rate).

Training step = forward + backward of a BEVT joint pretraining step (video + image streams, masked-token loss).
Our model and the reference (benchmarks/reference_bevt.py: unfused attention, bias gather and shift masks built
per call, full-vocabulary projection) share the same weights and inputs; the run checks that their losses agree,
times them alternately and reports medians and the ratio. Inference = a 16x224 clip through the classifier,
against torchvision `swin3d_t` carrying the same weights. Peak memory of a training step is measured as the growth
of the peak resident set size (VmHWM) of a fresh subprocess over one step (CPU has no allocator statistics).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_bevt import reference_pretraining_loss  # noqa: E402

from bevt import BEVTConfig, BEVTForMaskedVideoModeling, BEVTForVideoClassification  # noqa: E402


def build_inputs(
    frames: int, size: int, images: int, vocab: int, seed: int = 0, videos: int = 1
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grid = size // 16
    block = torch.zeros(grid, grid, dtype=torch.bool)
    block.view(-1)[torch.randperm(grid * grid, generator=g)[: grid * grid // 2]] = True  # 50% of patches
    tube = torch.zeros(frames // 2, grid, grid, dtype=torch.bool)
    tube[: max(1, 3 * frames // 8)] = block  # a 75% temporal span
    inputs = {
        "pixel_values": torch.randn(videos, frames, 3, size, size, generator=g),
        "bool_masked_pos": tube[None].repeat(videos, 1, 1, 1),
        "labels": torch.randint(0, vocab, (videos, frames, grid, grid), generator=g),
    }
    if images:
        inputs.update(
            image_pixel_values=torch.randn(images, 3, size, size, generator=g),
            image_bool_masked_pos=block[None].repeat(images, 1, 1),
            image_labels=torch.randint(0, vocab, (images, grid, grid), generator=g),
        )
    return inputs


def build_model(preset: str, seed: int = 0) -> BEVTForMaskedVideoModeling:
    torch.manual_seed(seed)
    model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset(preset, drop_path_rate=0.0))
    for name, param in model.named_parameters():
        if "relative_position_bias_table" in name:
            param.data.normal_(std=0.5)
    return model.train()


def ours_step(model, inputs) -> torch.Tensor:
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach()


def reference_step(model, inputs) -> torch.Tensor:
    loss = reference_pretraining_loss(model, **inputs)[0]
    loss.backward()
    return loss.detach()


CLOCK = time.perf_counter  # --cpu-time switches to process CPU time (robust when other jobs share the cores)


def timed(fn, *args) -> float:
    start = CLOCK()
    fn(*args)
    return CLOCK() - start


def machine_info(threads: int) -> dict[str, object]:
    """What the numbers were measured on: CPU model, instruction sets (from /proc/cpuinfo flags and torch's own
    dispatch level), the memory allocator (glibc malloc, or a preloaded tcmalloc / jemalloc), threads, load
    average."""
    from bevt.kernels_bevt import cpu_info, memory_allocator

    cpu = cpu_info()
    info: dict[str, object] = {"cpu_model": cpu["model"], "cpu_id": cpu["id"]}
    flags = cpu["flags"]
    isa = [name for name, flag in ISA_FLAGS if flag in flags]
    info["isa"] = isa or ["unknown (no /proc/cpuinfo flags)"]
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["onednn_isa_cap"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip() or None  # e.g. AVX512_CORE_BF16: no AMX
    info["memory_allocator"] = memory_allocator()  # tcmalloc when preloaded: a faster bf16 step (BENCHMARKS.md)
    info["threads"] = threads
    info["logical_cpus"] = os.cpu_count()
    info["torch"] = torch.__version__
    info["load_average_at_start"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    from dataclasses import asdict

    from bevt.kernels_bevt import linear_kernels, native_attention

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:  # the fp32 linear kernels this machine's calibration chose (BEVT_ONEDNN_LINEAR=auto), for these threads
        info["linear_kernels"] = asdict(linear_kernels())
        # the attention softmax: native kernels (built and calibrated on this machine) or PyTorch's ops, per dtype
        info["native_attention"] = {
            name: native_attention(dtype) is not None for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        }
    finally:
        torch.set_num_threads(previous)
    return info


# (printed name, /proc/cpuinfo flag)
ISA_FLAGS = [
    ("AVX2", "avx2"),
    ("AVX-512", "avx512f"),
    ("AVX512-BF16", "avx512_bf16"),
    ("AMX-BF16", "amx_bf16"),
]


def precision_context(precision: str) -> contextlib.AbstractContextManager:
    """float32, or bfloat16 autocast on CPU (what `--mixed_precision bf16` does in the scripts)."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gemm_rate(precision: str, m: int, k: int, n: int, repeats: int) -> float:
    """GFLOP/s of one large (m, k) @ (k, n) product (bf16: under CPU autocast, as the model runs): the median of
    `repeats` calls after a warm-up. The machine's practical limit for the model's dense work."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    with precision_context(precision):
        for _ in range(3):  # warm-up: the first bf16 calls set up AMX tiles and oneDNN primitives
            torch.matmul(a, b)
        times = []
        for _ in range(repeats):
            times.append(timed(torch.matmul, a, b))  # the same clock as the model timings
    return 2 * m * k * n / statistics.median(times) / 1e9


def count_flops(fn) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions, attention) as torch's FlopCounterMode counts them. Under the
    counter our fused paths run the standard aten ops (see kernels_bevt), so every product is seen."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def spread(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def alternate(fns: dict, repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Seconds per call (median, min, max), running the candidates in turn (A, B, A, B, ...) so that drift and other
    jobs on the machine hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: spread(t) for name, t in times.items()}


# op name -> category by substring, first match wins (the profile's summary: where the step time goes besides GEMMs)
OP_CATEGORIES = [
    ("LayerNorm", ("layer_norm",)),
    ("softmax", ("softmax",)),
    ("GELU", ("gelu",)),
    ("GEMM", ("mm", "linear", "matmul", "conv")),
    ("index / masked", ("index", "masked", "nonzero", "gather", "scatter", "where", "embedding")),
    (
        "copies / layout / allocation",
        (
            "copy",
            "clone",
            "contiguous",
            "cat",
            "pad",
            "roll",
            "stack",
            "to_mkldnn",
            "fill",
            "empty",
            "zero",
            "as_strided",
            "permute",
            "transpose",
            "view",
            "reshape",
        ),
    ),  # fmt: skip
    (
        "elementwise / reductions / loss",
        ("add", "mul", "sub", "div", "neg", "exp", "sum", "mean", "nll", "loss"),
    ),
]


def op_category(name: str) -> str:
    op = name.split("::", 1)[-1]
    for category, keys in OP_CATEGORIES:
        if any(k in op for k in keys):
            return category
    return "other"


def profile_steps(fns: dict, rounds: int, top: int) -> dict[str, dict]:
    """torch.profiler over one call of each candidate, in turn (A, B, A, B, ...), `rounds` times: per candidate the
    top ops by self CPU time (mean share over rounds) and the shares of op categories (GEMM, softmax, ...)."""
    from torch.profiler import ProfilerActivity, profile

    shares: dict[str, list[dict[str, float]]] = {name: [] for name in fns}
    calls: dict[str, dict[str, int]] = {name: {} for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
            total = sum(e.self_cpu_time_total for e in events)
            shares[name].append({e.key: e.self_cpu_time_total / total for e in events})
            calls[name] = {e.key: e.count for e in events}
    report = {}
    for name, per_round in shares.items():
        ops = {op for r in per_round for op in r}
        mean = {op: sum(r.get(op, 0.0) for r in per_round) / len(per_round) for op in ops}
        categories: dict[str, float] = {}
        for op, share in mean.items():
            categories[op_category(op)] = categories.get(op_category(op), 0.0) + share
        ranked = sorted(mean.items(), key=lambda kv: -kv[1])[:top]
        report[name] = {
            "top_ops": [
                {"op": op, "self_cpu_share": share, "calls": calls[name].get(op, 0)} for op, share in ranked
            ],
            "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
        }
    return report


def torchvision_swin3d_t_from(model: BEVTForVideoClassification) -> torch.nn.Module:
    """torchvision swin3d_t carrying the weights of a Swin-T-sized BEVT classifier."""
    from torchvision.models.video import swin3d_t

    tv = swin3d_t(num_classes=model.config.num_labels)
    ours = model.state_dict()
    mapped = {}
    for key in tv.state_dict():
        if key.endswith("relative_position_index"):
            mapped[key] = tv.state_dict()[key]
            continue
        k = re.sub(r"^patch_embed\.proj", "bevt.embeddings.patch_embeddings.projection", key)
        k = re.sub(r"^patch_embed\.norm", "bevt.embeddings.patch_embeddings.norm", k)
        if m := re.match(r"^features\.(\d+)\.(\d+)\.(.*)$", k):
            rest = (
                m[3]
                .replace("norm1", "layernorm_before")
                .replace("norm2", "layernorm_after")
                .replace("attn.", "attention.")
                .replace("mlp.0", "mlp.fc1")
                .replace("mlp.3", "mlp.fc2")
            )
            k = f"bevt.encoder.layers.{int(m[1]) // 2}.blocks.{m[2]}.{rest}"
        elif m := re.match(r"^features\.(\d+)\.(reduction|norm)\.(.*)$", k):
            k = f"bevt.encoder.layers.{(int(m[1]) - 1) // 2}.downsample.{m[2]}.{m[3]}"
        k = re.sub(r"^norm\.", "bevt.layernorm.", k)
        k = re.sub(r"^head\.", "classifier.", k)
        mapped[key] = ours[k]
    tv.load_state_dict(mapped)
    return tv.eval()


def measure_memory(kind: str, args) -> None:
    """Run in a fresh subprocess: print the peak-RSS growth (MiB) of one training step."""
    torch.set_num_threads(args.threads)
    model = build_model(args.preset)
    inputs = build_inputs(args.frames, args.size, args.images, model.config.vocab_size, videos=args.videos)
    base = _status_kib("VmRSS")
    try:  # reset the peak-RSS mark (Linux); otherwise fall back to the process-lifetime peak
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    (ours_step if kind == "ours" else reference_step)(model, inputs)
    peak = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (peak - base) / 1024}))


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB (0 where /proc is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_of(kind: str, args) -> float:
    cmd = [
        sys.executable, __file__, "--measure-memory", kind, "--preset", args.preset, "--frames", str(args.frames),
        "--size", str(args.size), "--images", str(args.images), "--threads", str(args.threads),
        "--videos", str(getattr(args, "videos", 1)), "--malloc", args.malloc,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


SMOKE = {"preset": "test", "frames": 8, "size": 64, "images": 2, "repeats": 1, "gemm_size": 256}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="model size preset (default: tiny = Swin-T dims)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--videos", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per candidate (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="comma-separated: fp32 and/or bf16 (bfloat16 autocast on CPU, as --mixed_precision bf16 runs)",
    )
    parser.add_argument(
        "--gemm-size",
        type=int,
        default=1024,
        help="the GEMM-rate probe multiplies (4*S, S) @ (S, S) (default 1024: 4096x1024 @ 1024x1024)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile'd inference and a training step with the encoder compiled (fp32)",
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU time instead of wall time (use on a machine shared with other jobs)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long check that every part runs (preset test, 8x64 clips, 1 repeat, small GEMM, no memory)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile the training steps (ours and the reference, per precision; torch.profiler, 2 interleaved "
        "rounds): top N ops by self CPU time and the share of each op category",
    )
    parser.add_argument(
        "--malloc",
        choices=["tuned", "default"],
        default="tuned",
        help="tuned (default): glibc's malloc keeps large freed blocks, as the training scripts set it on CPU "
        "(bevt.kernels_bevt.keep_freed_memory); default: glibc's own settings. Ours and the peers run under the same.",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--measure-memory", choices=["ours", "ref"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    from bevt.kernels_bevt import keep_freed_memory

    # before any large allocation; a no-op under tcmalloc / jemalloc
    args.malloc_tuned = args.malloc == "tuned" and keep_freed_memory()
    if args.measure_memory:
        measure_memory(args.measure_memory, args)
        return
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.skip_memory = True
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        parser.error(f"--precisions takes fp32 and/or bf16, got {args.precisions!r}")
    torch.set_num_threads(args.threads)
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    results: dict[str, object] = {
        "machine": {**machine_info(args.threads), "malloc_tuned": args.malloc_tuned},
        "preset": args.preset,
        "inputs": f"{args.videos} video(s) {args.frames}x{args.size} + {args.images} image(s) {args.size}",
        "clock": "process CPU time" if args.cpu_time else "wall",
    }
    s = args.gemm_size
    gemm_repeats = 3 if args.smoke else 10
    rates = {p: [gemm_rate(p, 4 * s, s, s, gemm_repeats)] for p in precisions}  # again at the end (drift)

    model = build_model(args.preset)
    inputs = build_inputs(args.frames, args.size, args.images, model.config.vocab_size, videos=args.videos)
    results["train_loss_abs_diff"] = {}
    for p in precisions:
        with torch.no_grad(), precision_context(p):
            ours_loss = model(**inputs).loss
            ref_loss = reference_pretraining_loss(model, **inputs)[0]
        results["train_loss_abs_diff"][p] = diff = abs(ours_loss.item() - ref_loss.item())
        # float32: same math (summation order only); bf16: both round their products to 8 mantissa bits
        assert diff < (1e-3 if p == "fp32" else 5e-2), (p, ours_loss.item(), ref_loss.item())

    def zero():
        model.zero_grad(set_to_none=True)

    def step(fn, precision):
        def run():
            zero()
            with precision_context(precision):
                loss = (
                    model(**inputs).loss
                    if fn is ours_step
                    else reference_pretraining_loss(model, **inputs)[0]
                )
            loss.backward()  # outside autocast, as Accelerate runs it

        return run

    results["train_gflop"] = {
        "ours": count_flops(step(ours_step, "fp32")) / 1e9,
        "reference": count_flops(step(reference_step, "fp32")) / 1e9,
    }
    candidates = {}
    for p in precisions:
        candidates[f"ours_{p}"] = step(ours_step, p)
        candidates[f"reference_{p}"] = step(reference_step, p)
    if args.compile:  # the encoder compiled in place, as run_pretraining.py --torch_compile does
        compiled_model = copy.deepcopy(model)
        compiled_model.bevt.encoder.compile(dynamic=False)
        start = time.perf_counter()
        ours_step(compiled_model, inputs)
        results["train_compile_s"] = time.perf_counter() - start
        candidates["ours_compiled_fp32"] = lambda: (
            compiled_model.zero_grad(set_to_none=True),
            ours_step(compiled_model, inputs),
        )
    train = alternate(candidates, args.repeats)
    results["train_step_s"] = train
    for p in precisions:
        results[f"train_speedup_vs_reference_{p}"] = (
            train[f"reference_{p}"]["median"] / train[f"ours_{p}"]["median"]
        )
    if "bf16" in precisions and "fp32" in precisions:
        results["train_speedup_ours_bf16_vs_reference_fp32"] = (
            train["reference_fp32"]["median"] / train["ours_bf16"]["median"]
        )
    if "ours_compiled_fp32" in train:
        results["train_speedup_ours_compiled_vs_reference"] = (
            train["reference_fp32"]["median"] / train["ours_compiled_fp32"]["median"]
        )
    print(json.dumps(results, indent=1), flush=True)
    if args.profile:
        results["train_profile"] = profile_steps(
            {f"{who}_{p}": candidates[f"{who}_{p}"] for p in precisions for who in ("ours", "reference")},
            rounds=2,
            top=args.profile,
        )

    classifier = BEVTForVideoClassification(BEVTConfig.from_preset(args.preset, num_labels=400)).eval()
    classifier.bevt.load_state_dict(model.bevt.state_dict())
    clip = inputs["pixel_values"]

    def infer(module, precision, layout=lambda x: x):
        def run():
            with torch.no_grad(), precision_context(precision):
                module(layout(clip))

        return run

    # FLOPs with the eager attention (same math): the counter has no formula for SDPA's fused CPU kernel
    classifier.config._attn_implementation = "eager"
    results["inference_gflop"] = {"ours": count_flops(infer(classifier, "fp32")) / 1e9}
    classifier.config._attn_implementation = "sdpa"
    candidates = {}
    tv = None
    if args.preset == "tiny":
        tv = torchvision_swin3d_t_from(classifier)
        with torch.no_grad():
            diff = (tv(clip.transpose(1, 2)) - classifier(clip).logits).abs().max().item()
        results["inference_max_abs_diff_vs_torchvision"] = diff
        results["inference_gflop"]["torchvision_swin3d_t"] = (
            count_flops(infer(tv, "fp32", lambda x: x.transpose(1, 2))) / 1e9
        )
    for p in precisions:
        if tv is not None:
            candidates[f"torchvision_swin3d_t_{p}"] = infer(tv, p, lambda x: x.transpose(1, 2))
        candidates[f"ours_{p}"] = infer(classifier, p)
    if args.compile:
        compiled = torch.compile(classifier)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(clip)
        results["compile_s"] = time.perf_counter() - start
        candidates["ours_compiled_fp32"] = infer(compiled, "fp32")
    inference = alternate(candidates, args.repeats)
    results["inference_s"] = inference
    if tv is not None:
        for name in inference:
            if name.startswith("ours"):
                p = name.rsplit("_", 1)[1]
                results[f"inference_speedup_{name}_vs_torchvision_{p}"] = (
                    inference[f"torchvision_swin3d_t_{p}"]["median"] / inference[name]["median"]
                )

    for p in precisions:
        rates[p].append(gemm_rate(p, 4 * s, s, s, gemm_repeats))
    results["gemm"] = {
        "shape": f"({4 * s}, {s}) @ ({s}, {s})",
        **{f"{p}_gflops": {"start": r[0], "end": r[1], "mean": sum(r) / 2} for p, r in rates.items()},
    }
    # utilisation: the candidate's own FLOPs per second over the machine's GEMM rate in that precision
    utilisation: dict[str, float] = {}
    for kind, times, flops in (
        ("train", train, results["train_gflop"]),
        ("inference", inference, results["inference_gflop"]),
    ):
        for name, t in times.items():
            base, p = name.rsplit("_", 1)
            base = base.removesuffix("_compiled")
            if base in flops:
                utilisation[f"{kind}_{name}"] = (
                    flops[base] / t["median"] / results["gemm"][f"{p}_gflops"]["mean"]
                )
    results["utilisation_of_gemm_rate"] = utilisation

    if not args.skip_memory:
        ours_mem, ref_mem = memory_of("ours", args), memory_of("ref", args)
        results["train_peak_mib"] = {"ours": ours_mem, "reference": ref_mem}
        results["train_memory_ratio_vs_reference"] = ours_mem / ref_mem if ref_mem > 0 else None
    results["machine"]["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps(results, indent=1))
    print(summary(results, precisions))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def summary(results: dict, precisions: list[str]) -> str:
    """A Markdown table of the run: machine, GEMM rates, then per precision ours / peer / ratio / utilisation."""
    m = results["machine"]
    gemm = results["gemm"]
    lines = [
        f"CPU: {m['cpu_model']} ({m.get('cpu_id', '?')}); ISA: {', '.join(m['isa'])}; torch CPU capability "
        f"{m['torch_cpu_capability']}"
        + (f"; oneDNN capped at {cap} (ONEDNN_MAX_CPU_ISA)" if (cap := m.get("onednn_isa_cap")) else "")
        + f"; {m['threads']} threads of {m['logical_cpus']} logical CPUs; torch {m['torch']}; "
        f"allocator {m.get('memory_allocator', '?')}"
        f"{' (tuned: large freed blocks kept)' if m.get('malloc_tuned') else ''}; "
        f"load average {m['load_average_at_start']:.2f} -> {m['load_average_at_end']:.2f}; clock: {results['clock']}",
        "fp32 linears (BEVT_ONEDNN_LINEAR): "
        + (
            f"forward {'oneDNN' if k['forward'] else 'F.linear'}, weight gradient "
            f"{'oneDNN' if k['weight_grad'] else 'torch.mm'} ({k['source']})"
            if (k := m.get("linear_kernels"))
            else "?"
        )
        + "; attention softmax (BEVT_NATIVE_ATTENTION): "
        + (
            ", ".join(f"{name} {'native' if used else 'PyTorch ops'}" for name, used in native.items())
            if (native := m.get("native_attention"))
            else "?"
        ),
        f"GEMM {gemm['shape']}: "
        + ", ".join(
            f"{p} {gemm[f'{p}_gflops']['mean']:.0f} GFLOP/s (start {gemm[f'{p}_gflops']['start']:.0f}, "
            f"end {gemm[f'{p}_gflops']['end']:.0f})"
            for p in precisions
        ),
        f"FLOPs (FlopCounterMode): training step ours {results['train_gflop']['ours']:.4g} GFLOP, reference "
        f"{results['train_gflop']['reference']:.4g}; inference ours {results['inference_gflop']['ours']:.4g}"
        + (
            f", torchvision {results['inference_gflop']['torchvision_swin3d_t']:.4g}"
            if "torchvision_swin3d_t" in results["inference_gflop"]
            else ""
        ),
        "",
        "| measure | precision | ours s (min-max) | peer s (min-max) | ratio | ours util. | peer util. |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    util = results["utilisation_of_gemm_rate"]
    for kind, peer, times in (
        ("train", "reference", results["train_step_s"]),
        ("inference", "torchvision_swin3d_t", results["inference_s"]),
    ):
        rows = [(f"ours_{p}", p, p) for p in precisions]
        if "ours_compiled_fp32" in times:  # --compile
            rows.append(("ours_compiled_fp32", "fp32", "fp32, compiled"))
        for name, p, label in rows:
            ours, other = times[name], times.get(f"{peer}_{p}")
            cells = [f"{ours['median']:.3f} ({ours['min']:.3f}-{ours['max']:.3f})"]
            if other is not None:
                cells += [
                    f"{other['median']:.3f} ({other['min']:.3f}-{other['max']:.3f}) {peer}",
                    f"{other['median'] / ours['median']:.2f}x",
                ]
            else:
                cells += ["-", "-"]
            cells += [
                f"{100 * util[f'{kind}_{name}']:.0f}%" if f"{kind}_{name}" in util else "-",
                f"{100 * util[f'{kind}_{peer}_{p}']:.0f}%" if f"{kind}_{peer}_{p}" in util else "-",
            ]
            lines.append(f"| {kind} | {label} | " + " | ".join(cells) + " |")
    for name, prof in results.get("train_profile", {}).items():
        lines += ["", f"Profile of the training step, {name} (self CPU time shares, mean of 2 rounds):"]
        lines.append(
            "  categories: " + ", ".join(f"{c} {100 * v:.1f}%" for c, v in prof["categories"].items())
        )
        lines += [
            f"  {100 * o['self_cpu_share']:5.1f}%  {o['op']} ({o['calls']} calls)" for o in prof["top_ops"]
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
