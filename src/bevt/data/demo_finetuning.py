"""Built-in synthetic data for the fine-tuning demo: short clips whose class needs **temporal** reasoning.

Something-Something style: every clip shows one object (a disc of random colour, size and position) on a noisy
background with a static distractor square, and the class is what the object does over time:

    0 "Moving something from left to right"    3 "Moving something down"
    1 "Moving something from right to left"    4 "Something getting bigger"
    2 "Moving something up"                    5 "Something getting smaller"

Any single frame is compatible with every class (start positions and sizes are random), and a left/right flip
turns class 0 into class 1: only the order of the frames tells the classes apart, so training must not flip.
Clips are encoded as MPEG-4 MP4 with PyAV (the bytes are deterministic) and
written as tar shards (`bevt.data.shards.write_shards`) that `run_finetuning.py` reads like real data.

    >>> from bevt.data.demo_finetuning import write_demo_shards
    >>> demo = write_demo_shards("demo_shards", num_train=600, num_validation=120)
    >>> demo.train_shards, demo.validation_shards, demo.label_names
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEMO_LABEL_NAMES",
    "DemoShards",
    "MotionRanges",
    "demo_samples",
    "encode_mp4",
    "make_demo_clip",
    "trajectory",
    "write_demo_shards",
]

DEMO_LABEL_NAMES: tuple[str, ...] = (
    "Moving something from left to right",
    "Moving something from right to left",
    "Moving something up",
    "Moving something down",
    "Something getting bigger",
    "Something getting smaller",
)


@dataclass(frozen=True)
class DemoShards:
    """Where `write_demo_shards` put the data: shard paths per split and the label-names file."""

    train_shards: list[str]
    validation_shards: list[str]
    label_names_file: str
    label_names: tuple[str, ...] = DEMO_LABEL_NAMES


def _disc(height: int, width: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """(H, W) float alpha of an anti-aliased disc."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    dist = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)
    return np.clip(radius - dist + 0.5, 0.0, 1.0)


@dataclass(frozen=True)
class MotionRanges:
    """The random ranges of a clip's motion, as fractions of the clip size: the radius and travel of the objects that
    move along an axis (classes 0-3), the smallest radius and the growth factor of those that grow or shrink
    (classes 4, 5), and which of classes 0-3 run backwards along their axis."""

    radius: tuple[float, float] = (0.09, 0.15)
    travel: tuple[float, float] = (0.35, 0.55)
    small: tuple[float, float] = (0.06, 0.1)
    growth: tuple[float, float] = (2.2, 3.0)
    reversed_labels: tuple[int, ...] = (1, 2)  # right-to-left and up (DEMO_LABEL_NAMES)


def trajectory(
    label: int, size: int, num_frames: int, rng: np.random.Generator, ranges: MotionRanges = MotionRanges()
) -> list[tuple[float, float, float]]:
    """(cy, cx, radius) of the object in every frame for class `label`: classes 0/1 move horizontally, 2/3
    vertically, 4 grows and 5 shrinks."""
    t = np.linspace(0.0, 1.0, num_frames)
    if label in (0, 1, 2, 3):
        radius = rng.uniform(*ranges.radius) * size
        travel = rng.uniform(*ranges.travel) * size
        margin = radius + 1
        start = rng.uniform(margin, size - margin - travel)  # along the motion axis
        across = rng.uniform(margin, size - margin)  # the other axis, constant
        along = start + travel * t
        if label in ranges.reversed_labels:
            along = along[::-1]
        if label in (0, 1):
            return [(across, a, radius) for a in along]
        return [(a, across, radius) for a in along]
    if label in (4, 5):
        small = rng.uniform(*ranges.small) * size
        big = small * rng.uniform(*ranges.growth)
        radii = small + (big - small) * t
        if label == 5:
            radii = radii[::-1]
        cy, cx = (rng.uniform(big + 1, size - big - 1) for _ in range(2))
        return [(cy, cx, r) for r in radii]
    raise ValueError(f"label must be in [0, {len(DEMO_LABEL_NAMES)}), got {label!r}")


def make_demo_clip(label: int, rng: np.random.Generator, size: int = 32, num_frames: int = 16) -> np.ndarray:
    """One synthetic clip of class `label`: uint8 (num_frames, size, size, 3)."""
    if size < 16 or size % 2:
        raise ValueError(
            f"demo clip size must be an even number >= 16 (4:2:0 video needs even sizes), got {size!r}"
        )
    if num_frames < 2:
        raise ValueError(f"a temporal demo clip needs at least 2 frames, got {num_frames!r}")
    background = rng.uniform(0, 90, size=3)
    colour = rng.uniform(150, 255, size=3)
    distractor = rng.uniform(100, 200, size=3)
    side = int(rng.integers(3, max(4, size // 6)))
    dy, dx = (int(rng.integers(0, size - side)) for _ in range(2))
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for i, (cy, cx, radius) in enumerate(trajectory(label, size, num_frames, rng)):
        frame = np.broadcast_to(background, (size, size, 3)).copy()
        frame += rng.normal(0.0, 6.0, size=(size, size, 1))
        frame[dy : dy + side, dx : dx + side] = distractor
        alpha = _disc(size, size, cy, cx, radius)[..., None]
        frame = frame * (1 - alpha) + colour * alpha
        frames[i] = np.clip(frame, 0, 255).round().astype(np.uint8)
    return frames


FF_QP2LAMBDA = 118  # FFmpeg's lambda units per quantizer step (global_quality = q * FF_QP2LAMBDA)


def encode_mp4(frames: np.ndarray, fps: int = 8, bit_rate: int | None = None) -> bytes:
    """MPEG-4 Part 2 MP4 bytes of uint8 (T, H, W, 3) frames, deterministic: near-lossless (a fixed quantizer), or
    at `bit_rate` bits/s when given.

    FFmpeg's own `mpeg4` encoder, single-threaded with explicit timestamps, gives the same bytes on every run;
    libx264 in the PyAV wheel was measured to vary (even in decoded pixels) on a loaded machine.
    """
    import av

    from ..video_decoding import reformat_frame

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if bit_rate is not None:
            stream.codec_context.bit_rate = bit_rate
        else:
            # Near-lossless fixed quantizer (q 2), no rate control. `qscale` is an option of the ffmpeg command line,
            # not of the encoder: given as a codec option it was ignored and the default rate control made the last
            # frames of a clip blocky (~24 dB PSNR at 32 px against ~33 dB with this).
            stream.options = {"flags": "+qscale", "global_quality": str(2 * FF_QP2LAMBDA)}
        for index, array in enumerate(frames):
            frame = reformat_frame(av.VideoFrame.from_ndarray(array, format="rgb24"), format="yuv420p")
            frame.pts = index  # without explicit timestamps the encoder output varies from run to run
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def demo_samples(
    num_samples: int, seed: int, split: str, size: int = 32, num_frames: int = 16
) -> Iterator[tuple[str, str, bytes, dict]]:
    """`(key, "mp4", bytes, meta)` samples for `write_shards`, classes balanced and interleaved, deterministic."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples!r}")
    rng = np.random.default_rng([seed, sum(split.encode())])
    for index in range(num_samples):
        label = index % len(DEMO_LABEL_NAMES)
        clip = make_demo_clip(label, rng, size=size, num_frames=num_frames)
        key = f"{split}_{index:06d}"
        meta = {"label": label, "label_name": DEMO_LABEL_NAMES[label], "path": f"synthetic/{key}.mp4"}
        yield key, "mp4", encode_mp4(clip), meta


def write_demo_shards(
    output_dir: str | Path,
    num_train: int = 600,
    num_validation: int = 120,
    seed: int = 0,
    size: int = 32,
    num_frames: int = 16,
    num_shards: int = 2,
) -> DemoShards:
    """Write the demo train/validation shards (with `dataset_info.json` and `labels.txt`) under `output_dir`.

    Each split has `num_shards` shards of equal size (2 by default, so two ranks read whole shards). A
    `demo_manifest.json` records the arguments; a folder written with the same arguments is reused as is.
    """
    from .shards import LABELS_FILE, write_shards

    output_dir = Path(output_dir)
    manifest_path = output_dir / "demo_manifest.json"
    settings = {
        "num_train": num_train,
        "num_validation": num_validation,
        "seed": seed,
        "size": size,
        "num_frames": num_frames,
        "num_shards": num_shards,
        "labels": list(DEMO_LABEL_NAMES),
    }
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings and all(
            Path(p).is_file() for p in manifest["train"] + manifest["validation"]
        ):
            return DemoShards(manifest["train"], manifest["validation"], manifest["label_names_file"])
    output_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, count in (("train", num_train), ("validation", num_validation)):
        samples = list(demo_samples(count, seed, split, size=size, num_frames=num_frames))
        paths = write_shards(
            samples,
            output_dir / split,
            num_shards=min(num_shards, count),
            prefix=f"demo-{split}",
            labels=DEMO_LABEL_NAMES,
        )
        splits[split] = [str(p) for p in paths]
    manifest = {
        "settings": settings,
        "train": splits["train"],
        "validation": splits["validation"],
        "label_names_file": str(output_dir / "train" / LABELS_FILE),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return DemoShards(splits["train"], splits["validation"], manifest["label_names_file"])
