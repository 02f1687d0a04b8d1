"""Visual tokenizer throughput: token ids per second for 112x112 frames (full-size DALL-E encoder, random weights).

    python benchmarks/bench_tokenizer.py                       # CPU, batch 8
    python benchmarks/bench_tokenizer.py --device cuda         # GPU: bf16 autocast + channels_last vs float32

Each 112x112 frame gives 14x14 = 196 ids. CPU runs in float32 (contiguous and channels_last are both timed). On
GPU the default is one BEVT step's worth of frames (8 clips x 16 frames + 64 images = 192) per call, timed for
the model's default (bf16 autocast, channels_last), float16, and float32, with the share of ids that agree with
float32. "ids per CPU-second" (process CPU time) is less sensitive than wall time to other load on a shared CPU.
"""

import argparse
import statistics
import time

import torch

from bevt import BEVTVisualTokenizer, BEVTVisualTokenizerConfig


def time_calls(fn, repeats: int, sync) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds per call, after one warm-up call."""
    fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def report(label: str, frames: int, seconds: tuple[float, float], tokens_per_frame: int) -> None:
    wall, cpu = seconds
    print(
        f"{label:<38} {frames / wall:9.1f} frames/s {frames * tokens_per_frame / wall:11.0f} ids/s "
        f"({wall * 1000:8.1f} ms / {frames} frames; {frames * tokens_per_frame / cpu:9.0f} ids per CPU-second)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="frames per call (CPU 8, GPU 192)")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch_size or (192 if device.type == "cuda" else 8)

    torch.manual_seed(0)
    model = BEVTVisualTokenizer(BEVTVisualTokenizerConfig()).to(device)
    frames = torch.rand(batch, 3, args.size, args.size, device=device)
    tokens = (args.size // model.config.downsample_factor) ** 2
    print(f"torch {torch.__version__}, device {device} ({torch.get_num_threads()} CPU threads), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.size}x{args.size} frames")

    if device.type == "cpu":
        sync = lambda: None  # noqa: E731
        report("cpu float32", batch, time_calls(lambda: model.get_codebook_indices(frames), args.repeats, sync),
               tokens)
        model.to(memory_format=torch.channels_last)
        frames_cl = frames.contiguous(memory_format=torch.channels_last)
        report("cpu float32 channels_last", batch,
               time_calls(lambda: model.get_codebook_indices(frames_cl), args.repeats, sync), tokens)
        return

    sync = torch.cuda.synchronize
    results = {}
    for dtype in ("float32", "float16", "bfloat16"):
        model.config.autocast_dtype = dtype
        results[dtype] = model.get_codebook_indices(frames)
        seconds = time_calls(lambda: model.get_codebook_indices(frames), args.repeats, sync)
        agree = (results[dtype] == results["float32"]).float().mean().item()
        report(f"cuda {dtype} channels_last (agree {agree:.1%})", batch, seconds, tokens)
    video = frames[: (batch // 16) * 16].reshape(-1, 16, 3, args.size, args.size)
    model.config.autocast_dtype = "bfloat16"
    torch.cuda.reset_peak_memory_stats()
    seconds = time_calls(lambda: model.get_codebook_indices(video), args.repeats, sync)
    report(f"cuda bfloat16 video {tuple(video.shape[:2])}", video.shape[0] * 16, seconds, tokens)
    print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
