"""Built-in synthetic data for the pretraining demo: moving textured shapes (MP4) and still shapes (JPEG).

Every sample is a scene of 1-3 shapes (disc, square, triangle) filled with a texture (stripes at a random angle
and frequency, a checkerboard, or a flat colour) over a textured background (a colour gradient with faint
stripes). In videos the shapes move at constant speed and bounce off the borders. Images are single scenes.
The scenes have what masked visual-token prediction needs: local texture that continues under a mask, and
shapes whose position is predictable from neighbouring frames.

Videos are H.264 MP4 made with PyAV (single-threaded encoder: the bytes are deterministic) and images are JPEG;
both are written as WebDataset tar shards with `bevt.data.shards.write_shards`, so `run_pretraining.py` reads
them exactly like K400/ImageNet shards.

    >>> from bevt.data.demo_pretraining import write_demo_pretraining_shards
    >>> demo = write_demo_pretraining_shards("demo_data")
    >>> demo.video_shards, demo.image_shards
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .demo_finetuning import encode_mp4

__all__ = [
    "DemoPretrainingShards",
    "demo_image_samples",
    "demo_video_samples",
    "encode_jpeg",
    "encode_mp4",
    "make_scene_clip",
    "write_demo_pretraining_shards",
]

SHAPES = ("disc", "square", "triangle")
TEXTURES = ("stripes", "checker", "flat")


@dataclass(frozen=True)
class DemoPretrainingShards:
    """Where `write_demo_pretraining_shards` put the data."""

    video_shards: list[str]
    image_shards: list[str]
    num_videos: int
    num_images: int


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float texture in [0, 255] of the given kind, random colours and frequency."""
    a, b = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    if kind == "flat":
        return np.broadcast_to(a, (size, size, 3)).astype(np.float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(4.0, 10.0)
    if kind == "stripes":
        angle = rng.uniform(0, np.pi)
        phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
        weight = 0.5 + 0.5 * np.sin(2 * np.pi * phase)
    elif kind == "checker":
        weight = ((np.floor(xs / period) + np.floor(ys / period)) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {kind!r}; choose one of {TEXTURES}")
    return (a * weight[..., None] + b * (1 - weight[..., None])).astype(np.float32)


def _shape_alpha(kind: str, size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """(size, size) float alpha in [0, 1] of a shape centred at (cy, cx)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = ys - cy, xs - cx
    if kind == "disc":
        inside = radius - np.sqrt(dy**2 + dx**2)
    elif kind == "square":
        inside = radius - np.maximum(np.abs(dy), np.abs(dx))
    elif kind == "triangle":  # apex up: below the two slanted edges and above the base
        inside = np.minimum(radius - dy, (dy + radius) * 0.5 - np.abs(dx))
    else:
        raise ValueError(f"unknown shape {kind!r}; choose one of {SHAPES}")
    return np.clip(inside + 0.5, 0.0, 1.0)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    top, bottom = rng.uniform(20, 200, size=3), rng.uniform(20, 200, size=3)
    mix = (ys * rng.uniform(0.3, 1.0) + xs * rng.uniform(0.0, 0.7))[..., None]
    gradient = top * (1 - mix) + bottom * mix
    return 0.8 * gradient + 0.2 * _texture("stripes", size, rng)


def make_scene_clip(rng: np.random.Generator, size: int = 80, num_frames: int = 24) -> np.ndarray:
    """One scene of moving textured shapes: uint8 (num_frames, size, size, 3). `num_frames=1` gives a still."""
    if size < 16 or size % 2:
        raise ValueError(f"demo size must be an even number >= 16 (H.264 needs even sizes), got {size!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames!r}")
    background = _background(size, rng)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(0.12, 0.25) * size
        objects.append(
            {
                "shape": SHAPES[int(rng.integers(len(SHAPES)))],
                "texture": _texture(TEXTURES[int(rng.integers(len(TEXTURES)))], size, rng),
                "radius": radius,
                "pos": rng.uniform(radius, size - radius, size=2),
                "vel": rng.uniform(-0.04, 0.04, size=2) * size,
            }
        )
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        frame = background.copy()
        for obj in objects:
            alpha = _shape_alpha(obj["shape"], size, obj["pos"][0], obj["pos"][1], obj["radius"])[..., None]
            frame = frame * (1 - alpha) + obj["texture"] * alpha
            obj["pos"] = obj["pos"] + obj["vel"]
            for axis in range(2):  # bounce off the borders
                low, high = obj["radius"], size - obj["radius"]
                if not low <= obj["pos"][axis] <= high:
                    obj["vel"][axis] *= -1
                    obj["pos"][axis] = np.clip(obj["pos"][axis], low, high)
        frames[t] = np.clip(frame, 0, 255).round().astype(np.uint8)
    return frames


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    """JPEG bytes of a uint8 (H, W, 3) image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def demo_video_samples(
    num_videos: int, seed: int = 0, size: int = 80, num_frames: int = 24
) -> Iterator[tuple[str, str, bytes, dict]]:
    """`(key, "mp4", bytes, meta)` samples for `write_shards`; deterministic for a given seed."""
    if num_videos < 1:
        raise ValueError(f"num_videos must be positive, got {num_videos!r}")
    rng = np.random.default_rng([seed, 1])
    for index in range(num_videos):
        key = f"video_{index:06d}"
        clip = make_scene_clip(rng, size=size, num_frames=num_frames)
        yield key, "mp4", encode_mp4(clip), {"label": None, "path": f"synthetic/{key}.mp4"}


def demo_image_samples(
    num_images: int, seed: int = 0, size: int = 80
) -> Iterator[tuple[str, str, bytes, dict]]:
    """`(key, "jpg", bytes, meta)` samples for `write_shards`; deterministic for a given seed."""
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images!r}")
    rng = np.random.default_rng([seed, 2])
    for index in range(num_images):
        key = f"image_{index:06d}"
        image = make_scene_clip(rng, size=size, num_frames=1)[0]
        yield key, "jpg", encode_jpeg(image), {"label": None, "path": f"synthetic/{key}.jpg"}


def _write_split(samples: Iterator, output_dir: Path, prefix: str, num_shards: int) -> list[str]:
    """Write the samples as exactly `num_shards` shards of (nearly) equal size, so ranks can split them evenly."""
    from .shards import write_shards

    return [str(p) for p in write_shards(list(samples), output_dir, prefix=prefix, num_shards=num_shards)]


def write_demo_pretraining_shards(
    output_dir: str | Path,
    num_videos: int = 64,
    num_images: int = 256,
    num_shards: int = 4,
    size: int = 80,
    num_frames: int = 24,
    seed: int = 0,
) -> DemoPretrainingShards:
    """Write the demo video and image shards under `output_dir` (reused when already written with these settings).

    `num_shards` shards per stream (a multiple of the number of training processes lets every rank read whole
    shards). A `demo_manifest.json`, written last, records the settings and the shard paths.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be positive, got {num_shards!r}")
    if num_shards > min(num_videos, num_images):
        raise ValueError(
            f"num_shards ({num_shards}) cannot exceed num_videos ({num_videos}) or num_images ({num_images})"
        )
    output_dir = Path(output_dir)
    manifest_path = output_dir / "demo_manifest.json"
    settings = {
        "num_videos": num_videos,
        "num_images": num_images,
        "num_shards": num_shards,
        "size": size,
        "num_frames": num_frames,
        "seed": seed,
        "version": 1,
    }
    if (
        manifest_path.is_file()
    ):  # paths are stored relative to `output_dir`: the folder can be moved or copied
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings and "shards" in manifest:
            stored = manifest["shards"]
            shards = DemoPretrainingShards(
                video_shards=[str(output_dir / p) for p in stored["video_shards"]],
                image_shards=[str(output_dir / p) for p in stored["image_shards"]],
                num_videos=stored["num_videos"],
                num_images=stored["num_images"],
            )
            if all(Path(p).is_file() for p in shards.video_shards + shards.image_shards):
                return shards
    output_dir.mkdir(parents=True, exist_ok=True)
    videos = _write_split(
        demo_video_samples(num_videos, seed, size=size, num_frames=num_frames),
        output_dir / "videos",
        "demo-videos",
        num_shards,
    )
    images = _write_split(
        demo_image_samples(num_images, seed, size=size), output_dir / "images", "demo-images", num_shards
    )
    shards = DemoPretrainingShards(videos, images, num_videos, num_images)
    relative = asdict(shards)
    for name in ("video_shards", "image_shards"):
        relative[name] = [os.path.relpath(p, output_dir) for p in relative[name]]
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps({"settings": settings, "shards": relative}, indent=2))
    tmp.replace(manifest_path)
    return shards
