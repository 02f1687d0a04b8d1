"""Model speed and memory: our BEVT against a straightforward reference and torchvision's swin3d_t.

    python benchmarks/bench_model.py                # Swin-T dims, 1 video 16x224 + 4 images 224, CPU
    python benchmarks/bench_model.py --repeats 7 --compile  # + compiled inference and training (slow to compile)

Training step = forward + backward of a BEVT joint pretraining step (video + image streams, masked-token loss).
Our model and the reference (benchmarks/reference_bevt.py: unfused attention, bias gather and shift masks built
per call, full-vocabulary projection) share the same weights and inputs; the run checks that their losses agree,
times them alternately and reports medians and the ratio. Inference = a 16x224 clip through the classifier,
against torchvision `swin3d_t` carrying the same weights. Peak memory of a training step is measured as the growth
of the peak resident set size (VmHWM) of a fresh subprocess over one step (CPU has no allocator statistics).
"""

from __future__ import annotations

import argparse
import copy
import json
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


def alternate(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call, running the candidates in turn so drift hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


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
        "--videos", str(getattr(args, "videos", 1)),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model size preset (default: tiny = Swin-T dims)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--videos", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per candidate (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile'd inference and a training step with the encoder compiled",
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU time instead of wall time (use on a machine shared with other jobs)",
    )
    parser.add_argument("--measure-memory", choices=["ours", "ref"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        measure_memory(args.measure_memory, args)
        return
    torch.set_num_threads(args.threads)
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    results: dict[str, object] = {
        "threads": args.threads,
        "preset": args.preset,
        "clock": "process CPU time" if args.cpu_time else "wall",
    }

    model = build_model(args.preset)
    inputs = build_inputs(args.frames, args.size, args.images, model.config.vocab_size, videos=args.videos)
    with torch.no_grad():
        ours_loss = model(**inputs).loss
        ref_loss = reference_pretraining_loss(model, **inputs)[0]
    results["train_loss_abs_diff"] = abs(ours_loss.item() - ref_loss.item())
    assert results["train_loss_abs_diff"] < 1e-3, results

    def zero():
        model.zero_grad(set_to_none=True)

    candidates = {
        "ours": lambda: (zero(), ours_step(model, inputs)),
        "reference": lambda: (zero(), reference_step(model, inputs)),
    }
    if args.compile:  # the encoder compiled in place, as run_pretraining.py --torch_compile does
        compiled_model = copy.deepcopy(model)
        compiled_model.bevt.encoder.compile(dynamic=False)
        start = time.perf_counter()
        ours_step(compiled_model, inputs)
        results["train_compile_s"] = time.perf_counter() - start
        candidates["ours_compiled"] = lambda: (
            compiled_model.zero_grad(set_to_none=True),
            ours_step(compiled_model, inputs),
        )
    train = alternate(candidates, args.repeats)
    results["train_step_s"] = train
    results["train_speedup_vs_reference"] = train["reference"] / train["ours"]
    if "ours_compiled" in train:
        results["train_speedup_ours_compiled_vs_reference"] = train["reference"] / train["ours_compiled"]
    print(json.dumps(results, indent=1), flush=True)

    classifier = BEVTForVideoClassification(BEVTConfig.from_preset(args.preset, num_labels=400)).eval()
    classifier.bevt.load_state_dict(model.bevt.state_dict())
    clip = inputs["pixel_values"]
    candidates = {}
    if args.preset == "tiny":
        tv = torchvision_swin3d_t_from(classifier)
        with torch.no_grad():
            diff = (tv(clip.transpose(1, 2)) - classifier(clip).logits).abs().max().item()
        results["inference_max_abs_diff_vs_torchvision"] = diff
        candidates["torchvision_swin3d_t"] = lambda: tv(clip.transpose(1, 2))
    candidates["ours"] = lambda: classifier(clip)
    if args.compile:
        compiled = torch.compile(classifier)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(clip)
        results["compile_s"] = time.perf_counter() - start
        candidates["ours_compiled"] = lambda: compiled(clip)
    with torch.no_grad():
        infer = alternate(candidates, args.repeats)
    results["inference_s"] = infer
    if "torchvision_swin3d_t" in infer:
        for name in infer:
            if name.startswith("ours"):
                results[f"inference_speedup_{name}_vs_torchvision"] = infer["torchvision_swin3d_t"] / infer[name]

    if not args.skip_memory:
        ours_mem, ref_mem = memory_of("ours", args), memory_of("ref", args)
        results["train_peak_mib"] = {"ours": ours_mem, "reference": ref_mem}
        results["train_memory_ratio_vs_reference"] = ours_mem / ref_mem if ref_mem > 0 else None
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
