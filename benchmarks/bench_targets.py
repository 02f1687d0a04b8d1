"""CPU cost of each pretraining target (`--target tokenizer|hog|pixel`) per pretraining step.

    python benchmarks/bench_targets.py                 # 1 thread, median of 5 calls after a warm-up
    python benchmarks/bench_targets.py --threads 2 --repeats 3

Two geometries:
- demo: one step of the pretraining demo (4 clips x 8 frames + 16 images, 64 px, preset `test`): the time to compute
  the targets (`model_inputs`), and the full training step (targets + forward + backward of the model) for each
  target; the tokenizer is the demo-sized random one (`--random_tokenizer`) and, for comparison, the full DALL-E
  encoder (53.8M parameters) on the same 32 px copies.
- recipe: per frame at 224 px (what one step of the BEVT-B recipe, 8 clips x 16 frames + 64 images = 192 frames per
  GPU, pays per frame): HOG and pixels on the 224 px input; the tokenizer's full-size DALL-E encoder on 112 px
  copies is in the "Visual tokenizer" table of BENCHMARKS.md (`bench_tokenizer.py`).

Times are wall-clock medians and process CPU seconds (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bevt import BEVTConfig, BEVTForMaskedVideoModeling, BEVTVisualTokenizer, BEVTVisualTokenizerConfig
from bevt.kernels_bevt import cpu_info
from bevt.pretraining import model_inputs, random_tokenizer
from bevt.targets import PatchTargets


def time_calls(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) per call, after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def demo_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A collated demo batch: what `BEVTPretrainingCollator` gives (normalised input, [0, 1] half-size copy, masks)."""
    return {
        "pixel_values": torch.randn(4, 8, 3, 64, 64, generator=generator),
        "tokenizer_pixel_values": torch.rand(4, 8, 3, 32, 32, generator=generator),
        "bool_masked_pos": torch.rand(4, 4, 4, 4, generator=generator) < 0.5,
        "image_pixel_values": torch.randn(16, 3, 64, 64, generator=generator),
        "image_tokenizer_pixel_values": torch.rand(16, 3, 32, 32, generator=generator),
        "image_bool_masked_pos": torch.rand(16, 4, 4, generator=generator) < 0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {cpu_info()['model']}"
    )

    batch = demo_batch(torch.Generator().manual_seed(0))
    dalle = BEVTVisualTokenizer(BEVTVisualTokenizerConfig(vocab_size=8192, image_size=32)).eval()
    sources = {
        "pixel": (PatchTargets("pixel"), "pixel"),
        "hog": (PatchTargets("hog"), "hog"),
        "tokenizer (demo random, 64 ids)": (random_tokenizer(64, 32), "tokenizer"),
        "tokenizer (full DALL-E, 8192 ids)": (dalle, "tokenizer"),
    }
    print("\ndemo step: 4 clips x 8 frames + 16 images, 64 px (48 frames)")
    print(
        f"{'target':<36} {'targets ms':>11} {'(CPU ms)':>9} {'full step ms':>13} {'(CPU ms)':>9} {'share':>6}"
    )
    for name, (targets, kind) in sources.items():
        vocab = 8192 if "DALL-E" in name else 64
        model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test", target_type=kind, vocab_size=vocab))

        def compute(targets=targets):
            with torch.no_grad():
                return model_inputs(batch, targets, "cpu")

        def step(targets=targets, model=model):
            model.zero_grad(set_to_none=True)
            model(**model_inputs(batch, targets, "cpu")).loss.backward()

        t_wall, t_cpu = time_calls(compute, args.repeats)
        s_wall, s_cpu = time_calls(step, args.repeats)
        print(
            f"{name:<36} {t_wall * 1e3:11.1f} {t_cpu * 1e3:9.1f} {s_wall * 1e3:13.1f} {s_cpu * 1e3:9.1f} "
            f"{t_cpu / s_cpu:6.0%}"
        )

    print("\nrecipe geometry: per 224 px frame (one BEVT-B step per GPU = 192 frames)")
    frames = torch.randn(16, 3, 224, 224)
    for kind in ("pixel", "hog"):
        targets = PatchTargets(kind)
        wall, cpu = time_calls(lambda targets=targets: targets(frames), args.repeats)
        print(
            f"{kind:<8} {wall / 16 * 1e3:7.2f} ms/frame ({cpu / 16 * 1e3:7.2f} CPU ms) -> "
            f"{wall / 16 * 192:6.2f} s per 192-frame step"
        )


if __name__ == "__main__":
    main()
