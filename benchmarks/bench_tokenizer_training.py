"""Tokenizer training on CPU: throughput (images/s) and the time a usable small tokenizer takes.

    python benchmarks/bench_tokenizer_training.py throughput            # images/s per config, 1 and 2 threads
    python benchmarks/bench_tokenizer_training.py time-to-usable --data ../shared/data/images   # 32 px, 8x
    python benchmarks/bench_tokenizer_training.py time-to-usable --data demo    # the pretraining demo's scenes

`throughput`: median seconds of `training_step` (forward, backward, Adam) over `--steps` steps after 2 warm-up
steps, for the test tokenizer (32 px, width 8, 4x, 64 codes), the pretraining demo's geometry (32 px, 8x, width 16,
512 codes; VQGAN and dVAE) and a BEVT-sized input (112 px, 8x, width 64, 512 codes).

`time-to-usable`: trains the pretraining demo's tokenizer geometry (32 px input -> 4x4 ids: VQGAN, 8x, width 16,
`--vocab` codes) on 32 px crops of a folder of images (`--data DIR`: the last two files sorted by name are held out,
e.g. hand.jpg and test.jpg of ../shared/data/images) or of the demo's synthetic scenes (`--data demo`:
`bevt.data.demo_pretraining.make_scene_clip`, the crops the demo feeds its tokenizer), evaluating held-out crops every
`--eval-every` steps. "Usable" = the held-out PSNR of `decode(encode(x))` beats the mean-colour baseline (each image
replaced by its mean colour) by `--margin` dB (the ids carry the layout, not just the colour), with more than half of
the codebook in use. Prints the training seconds (evaluation excluded) and steps to get there; for reference also
the PSNR of 8x8 patch means (one token's footprint, unquantised).

The machine is shared: the load average is printed next to the numbers; the process CPU time is printed too.
"""

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from bevt.data.demo_pretraining import make_scene_clip
from bevt.data.transforms import TokenizerTrainingTransform, seeded_generator
from bevt.tokenizer_training import (
    TokenizerTrainingArguments,
    TokenizerTrainingModel,
    evaluate_reconstruction,
    psnr,
    tokenizer_config_for_training,
    training_step,
)

THROUGHPUT_CONFIGS = {
    # name: (tokenizer_type, image_size, width, vocab_size, extra config, batch size)
    "test: vqgan 32px w8 4x 64 codes": ("vqgan", 32, 8, 64, {"vqgan_channel_multipliers": (1, 2, 2)}, 16),
    "demo: vqgan 32px w16 8x 512 codes": ("vqgan", 32, 16, 512, {}, 32),
    "demo: dall-e 32px w16 8x 512 codes": ("dall-e", 32, 16, 512, {}, 32),
    "bevt: vqgan 112px w64 8x 512 codes": ("vqgan", 112, 64, 512, {}, 8),
}


def load() -> str:
    return "load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())


def demo_scene_crops(count: int, seed: int, size: int = 32) -> torch.Tensor:
    """The pretraining demo's tokenizer inputs: 80 px synthetic scenes, crops of 64-100% of the area -> `size`."""
    rng = np.random.default_rng(seed)
    transform = TokenizerTrainingTransform(size, scale=(0.64, 1.0))
    generator = seeded_generator("bench-tokenizer-training", seed)
    scenes = [torch.from_numpy(make_scene_clip(rng, size=80, num_frames=1)[0]) for _ in range(count)]
    return torch.stack([transform(scene, generator=generator)["pixel_values"] for scene in scenes])


def folder_crops(folder: str, count_train: int, count_held_out: int, size: int = 32):
    """Crops of 5-50% of the frame area of the images in `folder`; the last two files (by name) are held out."""
    from PIL import Image

    paths = sorted(p for p in os.listdir(folder) if p.lower().endswith((".jpg", ".jpeg", ".png")))
    if len(paths) < 3:
        raise SystemExit(f"--data {folder}: need at least 3 images (2 are held out), found {len(paths)}")
    images = [torch.from_numpy(np.asarray(Image.open(os.path.join(folder, p)).convert("RGB")).copy()) for p in paths]
    transform = TokenizerTrainingTransform(size, scale=(0.05, 0.5))
    generator = seeded_generator("bench-tokenizer-training", folder)
    train, held_out = images[:-2], images[-2:]
    return (
        torch.stack([transform(train[i % len(train)], generator=generator)["pixel_values"] for i in range(count_train)]),
        torch.stack([transform(held_out[i % 2], generator=generator)["pixel_values"] for i in range(count_held_out)]),
    )


def throughput(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {load()}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, (kind, size, width, vocab, extra, batch) in THROUGHPUT_CONFIGS.items():
            torch.manual_seed(0)
            model = TokenizerTrainingModel(tokenizer_config_for_training(kind, vocab, size, width, **extra))
            optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-3, foreach=True)
            images = torch.rand(batch, 3, size, size)
            for step in range(2):
                training_step(model, images, optimizer, step)
            wall, cpu = [], []
            for step in range(args.steps):
                start, start_cpu = time.perf_counter(), time.process_time()
                training_step(model, images, optimizer, step + 2)
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            seconds = statistics.median(wall)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"{threads} thread(s)  {name:<38} batch {batch:>2}  {params:5.2f}M params  "
                  f"{seconds * 1000:7.0f} ms/step  {batch / seconds:7.1f} images/s  "
                  f"({batch / statistics.median(cpu):6.1f} images per CPU-second)", flush=True)
    print(f"end: {load()}")


def time_to_usable(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads[0])
    if args.data == "demo":
        train_pool, held_out = demo_scene_crops(args.train_crops, seed=0), demo_scene_crops(256, seed=1)
    else:
        train_pool, held_out = folder_crops(args.data, args.train_crops, 256)
    patch_means = F.interpolate(F.avg_pool2d(held_out, 8), scale_factor=8, mode="nearest")
    mean_colour = float(psnr(held_out.mean(dim=(2, 3), keepdim=True).expand_as(held_out), held_out).mean())
    target = mean_colour + args.margin
    print(f"torch {torch.__version__}, {args.threads[0]} thread(s), {load()}; data {args.data}; held-out PSNR: mean "
          f"colour {mean_colour:.2f} dB (usable: >= {target:.2f} dB), 8x8 patch means "
          f"{float(psnr(patch_means, held_out).mean()):.2f} dB")
    for vocab in args.vocab:
        torch.manual_seed(0)
        config = tokenizer_config_for_training("vqgan", vocab_size=vocab, image_size=32, width=args.width)
        training = TokenizerTrainingArguments(ema_decay=args.ema_decay, dead_code_restart_steps=args.restart_steps)
        model = TokenizerTrainingModel(config, training)
        optimizer = torch.optim.Adam(model.trainable_parameters(), lr=args.lr, foreach=True)
        generator = torch.Generator().manual_seed(0)
        seconds, cpu_seconds, usable_at, results = 0.0, 0.0, None, {}
        for step in range(args.max_steps):
            batch = train_pool[torch.randint(len(train_pool), (args.batch_size,), generator=generator)]
            start, start_cpu = time.perf_counter(), time.process_time()
            training_step(model, batch, optimizer, step)
            seconds += time.perf_counter() - start
            cpu_seconds += time.process_time() - start_cpu
            if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
                results = evaluate_reconstruction(model, held_out)
                usable = results["psnr"] >= target and results["codebook_usage"] > 0.5
                print(f"  vocab {vocab:>3} step {step + 1:>4}  {seconds:6.1f} s  psnr {results['psnr']:5.2f}  "
                      f"usage {results['codebook_usage']:.2f}  perplexity {results['perplexity']:6.1f}"
                      f"{'  <- usable' if usable and usable_at is None else ''}", flush=True)
                if usable and usable_at is None:
                    usable_at = (step + 1, seconds, cpu_seconds)
                    if not args.keep_going:
                        break
        if usable_at is None:
            print(f"vocab {vocab}: not usable within {args.max_steps} steps ({seconds:.1f} s)")
        else:
            print(f"vocab {vocab}: usable after {usable_at[0]} steps, {usable_at[1]:.1f} s "
                  f"({usable_at[2]:.1f} CPU-s; {args.batch_size * usable_at[0] / usable_at[1]:.0f} images/s); "
                  f"psnr {results['psnr']:.2f} dB, usage {results['codebook_usage']:.2f}, "
                  f"perplexity {results['perplexity']:.1f}")
    print(f"end: {load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("throughput", "time-to-usable"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (time-to-usable: first)")
    parser.add_argument("--steps", type=int, default=5, help="throughput: timed steps per config")
    parser.add_argument("--vocab", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.9)
    parser.add_argument("--restart-steps", type=int, default=10)
    parser.add_argument("--data", default="demo", help="'demo' (synthetic scenes) or a folder of images")
    parser.add_argument("--margin", type=float, default=2.0, help="dB above the mean-colour baseline for 'usable'")
    parser.add_argument("--train-crops", type=int, default=1024)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--keep-going", action="store_true", help="train --max-steps even once usable")
    args = parser.parse_args()
    throughput(args) if args.mode == "throughput" else time_to_usable(args)


if __name__ == "__main__":
    main()
