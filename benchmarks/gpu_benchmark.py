"""One prepared GPU benchmark (sized for < 8 minutes on one H200).

    python benchmarks/gpu_benchmark.py                       # on a CUDA machine; writes JSON to $OUT if set
    python benchmarks/gpu_benchmark.py --smoke               # CPU, tiny sizes: checks the script itself

Measures, in bf16 autocast with SDPA attention:
  1. the Swin-B BEVT joint pretraining step (8 videos 16x224 + 64 images 224 per step, DALL-E tokenizer on the
     112x112 copies, masked-token loss, backward, fused AdamW), eager and torch.compile'd: clips/s, images/s,
     achieved TFLOP/s and MFU against the peak (790 TFLOP/s bf16 dense by default), the tokenizer's share of
     the step, peak memory;
  2. the same model step (forward + backward, no tokenizer or optimizer) against the straightforward reference
     implementation of `reference_bevt.py`, both in bf16 autocast, alternating: the speed-up (target >= 2x);
  3. Swin-B 32-frame video classification inference: clips/s.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from reference_bevt import reference_pretraining_loss
from torch.utils.flop_counter import FlopCounterMode

from bevt import BEVTConfig, BEVTForMaskedVideoModeling, BEVTForVideoClassification
from bevt.configuration_tokenizer import BEVTVisualTokenizerConfig
from bevt.masking import BlockMaskGenerator, TubeMaskGenerator
from bevt.modeling_tokenizer import BEVTVisualTokenizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batch(videos: int, images: int, frames: int, size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = size // 16
    tube = TubeMaskGenerator(num_frames=frames // 2, height=grid, width=grid, num_masking_patches=grid * grid // 2)
    block = BlockMaskGenerator(height=grid, width=grid, num_masking_patches=grid * grid // 2)
    batch = {
        "pixel_values": torch.randn(videos, frames, 3, size, size, generator=g),
        "bool_masked_pos": torch.stack([tube(generator=g) for _ in range(videos)]),
        "tokenizer_pixel_values": torch.rand(videos, frames, 3, size // 2, size // 2, generator=g),
        "image_pixel_values": torch.randn(images, 3, size, size, generator=g),
        "image_bool_masked_pos": torch.stack([block(generator=g) for _ in range(images)]),
        "image_tokenizer_pixel_values": torch.rand(images, 3, size // 2, size // 2, generator=g),
    }
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model, tokenizer, optimizer, batch, dtype, timings: dict | None = None):
    device = batch["pixel_values"].device
    with torch.autocast(device.type, dtype=dtype):
        start = time.perf_counter()
        with torch.no_grad():
            # all frames of all clips and all images in one tokenizer call
            frames = batch["tokenizer_pixel_values"]
            flat = torch.cat([frames.flatten(0, 1), batch["image_tokenizer_pixel_values"]])
            ids = tokenizer.get_codebook_indices(flat)
            labels = ids[: frames.shape[0] * frames.shape[1]].view(*frames.shape[:2], *ids.shape[1:])
            image_labels = ids[frames.shape[0] * frames.shape[1] :]
        if timings is not None:
            sync(device)
            timings["tokenizer"] += time.perf_counter() - start
        out = model(
            pixel_values=batch["pixel_values"],
            bool_masked_pos=batch["bool_masked_pos"],
            labels=labels,
            image_pixel_values=batch["image_pixel_values"],
            image_bool_masked_pos=batch["image_bool_masked_pos"],
            image_labels=image_labels,
        )
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.detach()


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_train(args, device, dtype, compile_model: bool) -> dict:
    torch.manual_seed(0)
    config = BEVTConfig.from_preset(args.preset, drop_path_rate=0.1, vocab_size=args.vocab_size)
    model = BEVTForMaskedVideoModeling(config).to(device).train()
    tokenizer = BEVTVisualTokenizer(BEVTVisualTokenizerConfig(**args.tokenizer_kwargs)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = make_batch(args.videos, args.images, args.frames, args.size, device)
    result: dict = {"compiled": compile_model}
    if compile_model:  # the encoder, in place, as run_pretraining.py --torch_compile does (static shapes)
        model.bevt.encoder.compile(dynamic=False)
    start = time.perf_counter()
    train_step(model, tokenizer, optimizer, batch, dtype)  # first step: compile / cudnn autotune
    sync(device)
    result["first_step_s"] = time.perf_counter() - start
    for _ in range(args.warmup):
        train_step(model, tokenizer, optimizer, batch, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    timings = {"tokenizer": 0.0}
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(model, tokenizer, optimizer, batch, dtype, timings)
    sync(device)
    step_s = (time.perf_counter() - start) / args.steps
    flops = count_flops(lambda: train_step(model, tokenizer, optimizer, batch, dtype)) if not compile_model else None
    result.update(
        step_s=step_s,
        clips_per_s=args.videos / step_s,
        images_per_s=args.images / step_s,
        tokenizer_share=timings["tokenizer"] / args.steps / step_s,
        final_loss=float(loss),
    )
    if flops:
        result["step_tflop"] = flops / 1e12
        result["achieved_tflops"] = flops / step_s / 1e12
        result["mfu"] = flops / step_s / 1e12 / args.peak_tflops
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def bench_vs_reference(args, device, dtype) -> dict:
    """Model forward + backward (random token ids as labels), ours against the reference, same weights and batch."""
    torch.manual_seed(0)
    config = BEVTConfig.from_preset(args.preset, drop_path_rate=0.0, vocab_size=args.vocab_size)
    model = BEVTForMaskedVideoModeling(config).to(device).train()
    batch = make_batch(args.videos, args.images, args.frames, args.size, device)
    g = torch.Generator().manual_seed(1)
    grid = args.size // 16
    inputs = {
        "pixel_values": batch["pixel_values"],
        "bool_masked_pos": batch["bool_masked_pos"],
        "labels": torch.randint(0, args.vocab_size, (args.videos, args.frames, grid, grid), generator=g).to(device),
        "image_pixel_values": batch["image_pixel_values"],
        "image_bool_masked_pos": batch["image_bool_masked_pos"],
        "image_labels": torch.randint(0, args.vocab_size, (args.images, grid, grid), generator=g).to(device),
    }

    def ours():
        with torch.autocast(device.type, dtype=dtype):
            loss = model(**inputs).loss
        loss.backward()
        return loss.detach()

    def reference():
        with torch.autocast(device.type, dtype=dtype):
            loss = reference_pretraining_loss(model, **inputs)[0]
        loss.backward()
        return loss.detach()

    times: dict[str, list[float]] = {"ours": [], "reference": []}
    losses = {}
    for i in range(args.warmup + args.steps):
        for name, fn in (("ours", ours), ("reference", reference)):
            model.zero_grad(set_to_none=True)
            sync(device)
            start = time.perf_counter()
            losses[name] = float(fn())
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return {
        "step_s": median,
        "speedup_vs_reference": median["reference"] / median["ours"],
        "loss_abs_diff": abs(losses["ours"] - losses["reference"]),
    }


def bench_inference(args, device, dtype) -> dict:
    config = BEVTConfig.from_preset(args.preset, num_labels=400, num_frames=args.inference_frames)
    model = BEVTForVideoClassification(config).to(device).eval()
    clips = torch.randn(args.inference_batch, args.inference_frames, 3, args.size, args.size, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        for _ in range(args.warmup + 1):
            model(clips)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            model(clips)
        sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    return {"frames": args.inference_frames, "batch": args.inference_batch, "clips_per_s": args.inference_batch / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="peak bf16 dense TFLOP/s for MFU")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--output", default=None, help="JSON file (default: $OUT/gpu_benchmark.json if $OUT)")
    args = parser.parse_args()

    if args.smoke:
        device = torch.device("cpu")
        args.preset, args.vocab_size, args.size, args.frames = "test", 64, 64, 8
        args.videos, args.images, args.inference_frames, args.inference_batch = 2, 4, 8, 2
        args.steps, args.warmup = 2, 1
        args.tokenizer_kwargs = {"dalle_hidden_size": 8, "vocab_size": 64}
        dtype = torch.bfloat16
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_benchmark.py needs a CUDA GPU (use --smoke to check the script on CPU)")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        args.preset, args.vocab_size, args.size, args.frames = "base", 8192, 224, 16
        args.videos, args.images, args.inference_frames, args.inference_batch = 8, 64, 32, 8
        args.tokenizer_kwargs = {}
        dtype = torch.bfloat16

    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "per_step": {"videos": args.videos, "frames": args.frames, "images": args.images, "size": args.size},
        "train": [bench_train(args, device, dtype, compile_model=False)],
    }
    print(json.dumps(results, indent=1), flush=True)
    if not args.no_compile and not args.smoke:
        try:
            results["train"].append(bench_train(args, device, dtype, compile_model=True))
        except Exception as err:  # noqa: BLE001 - record it; the other measurements still run
            results["train"].append({"compiled": True, "error": f"{type(err).__name__}: {str(err)[:2000]}"})
        print(json.dumps(results["train"][-1], indent=1), flush=True)
    results["train_vs_reference"] = bench_vs_reference(args, device, dtype)
    print(json.dumps(results["train_vs_reference"], indent=1), flush=True)
    results["inference"] = bench_inference(args, device, dtype)
    print(json.dumps(results, indent=1), flush=True)
    output = args.output or (os.path.join(os.environ["OUT"], "gpu_benchmark.json") if os.environ.get("OUT") else None)
    if output:
        Path(output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
