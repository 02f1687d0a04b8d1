"""Pretraining building blocks used by `run_pretraining.py`: masks, per-rank data streams, tokenizer targets.

- `build_mask_generators(image_size, num_frames, ...)`: the tube (video) and block (image) mask generators on the
  16-pixel patch grid, scaled from the official 98-of-196 setting.
- `PretrainingData`: this rank's infinite, exactly resumable image (and video) batch streams over WebDataset
  shards, each rank reading a disjoint part.
- `model_inputs(batch, tokenizer, device)`: a collated batch -> `BEVTForMaskedVideoModeling` inputs, with
  token-id labels from the frozen visual tokenizer.
- `random_tokenizer(vocab_size, image_size, seed)`: a small random-weight tokenizer for demos and tests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .configuration_tokenizer import BEVTVisualTokenizerConfig
from .data.collator import BEVTPretrainingCollator
from .data.streaming import StreamDataLoader, build_stream
from .data.transforms import PretrainingImageTransform, PretrainingVideoTransform
from .masking import BlockMaskGenerator, TubeMaskGenerator
from .modeling_tokenizer import BEVTVisualTokenizer

__all__ = [
    "PretrainingData",
    "build_mask_generators",
    "calibration_images",
    "model_inputs",
    "random_tokenizer",
]

PATCH_GRID_STRIDE = 16  # pixels per mask/token cell: patch 4 x the 4x downsampling to stage 3 (heads at H/16)


def build_mask_generators(
    image_size: int,
    num_frames: int,
    mask_ratio: float = 0.5,
    min_mask_patches: int = 16,
    tube_range: tuple[float, float] = (0.5, 1.0),
) -> tuple[TubeMaskGenerator, BlockMaskGenerator]:
    """Tube (video, `(T/2, S/16, S/16)`) and block (image, `(S/16, S/16)`) mask generators.

    `round(mask_ratio * grid cells)` patches are masked (98 of 196 at 224 px); the smallest block is
    `min_mask_patches`, capped at the number masked (small test grids).
    """
    grid = image_size // PATCH_GRID_STRIDE
    num_masked = max(1, round(mask_ratio * grid * grid))
    min_patches = min(min_mask_patches, num_masked)
    tube = TubeMaskGenerator(
        num_frames=num_frames // 2,
        height=grid,
        width=grid,
        num_masking_patches=num_masked,
        tube_range=tuple(tube_range),
        min_num_patches=min_patches,
    )
    block = BlockMaskGenerator(grid, grid, num_masking_patches=num_masked, min_num_patches=min_patches)
    return tube, block


class _KeyRecordingCollate:
    """The pretraining collator, plus the batch's sample keys under `__keys__` (picklable for workers)."""

    def __init__(self, collator: BEVTPretrainingCollator) -> None:
        self.collator = collator

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(samples)
        batch["__keys__"] = [s["__key__"] for s in samples]
        return batch


class PretrainingData:
    """This rank's pretraining batches: one infinite stream per kind ("image", and "video" when `video_shards`).

    Every rank reads a disjoint part of the shards (`build_stream(rank=, world_size=)`; whole shards when their
    number is a multiple of `world_size`), repeats them epoch after epoch (so no rank runs out before the others;
    stop on a step count), and decodes in its own DataLoader workers. Augmentations and masks are seeded per
    sample from `(seed, epoch, key)`, and `state_dict()` is the exact position after the last delivered batch:
    a resumed run sees exactly the batches an uninterrupted one would.

    Args:
        image_shards / video_shards: shard globs, folders, files or URLs (`hf://datasets/...`, `https://`,
            `s3://`...; see `bevt.data.shards.list_shards`).
        image_batch_size / video_batch_size: samples per batch of each stream on this rank.
        image_size, scale_range, tokenizer_size, flip_prob, color_jitter: train transforms
            (`PretrainingImageTransform` / `PretrainingVideoTransform`).
        num_frames, frame_interval: dense clip sampling.
        mask_ratio, min_mask_patches, tube_range: see `build_mask_generators`.
        shuffle_buffer, num_workers, seed, rank, world_size: see `build_stream` / `StreamDataLoader`.
        key_log: a file path; the keys of every delivered sample are appended to it (audits rank splits).
        stream_options: further `build_stream` keywords for both streams, e.g. for shards given as URLs
            `{"cache_dir": ..., "storage_options": {...}, "max_retries": ..., "timeout": ...}`.
    """

    def __init__(
        self,
        image_shards: str | Sequence[str],
        video_shards: str | Sequence[str] | None = None,
        *,
        image_batch_size: int,
        video_batch_size: int = 1,
        image_size: int = 224,
        num_frames: int = 16,
        frame_interval: int = 8,
        scale_range: tuple[int, int] = (256, 320),
        tokenizer_size: int | None = None,
        flip_prob: float = 0.5,
        color_jitter: float = 0.4,
        mask_ratio: float = 0.5,
        min_mask_patches: int = 16,
        tube_range: tuple[float, float] = (0.5, 1.0),
        shuffle_buffer: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        key_log: str | os.PathLike | None = None,
        stream_options: Mapping[str, Any] | None = None,
    ) -> None:
        tube, block = build_mask_generators(image_size, num_frames, mask_ratio, min_mask_patches, tube_range)
        collate = _KeyRecordingCollate(BEVTPretrainingCollator(tube, block, seed=seed))
        geometry = {
            "image_size": image_size,
            "scale_range": scale_range,
            "tokenizer_size": tokenizer_size,
            "flip": flip_prob,
        }
        specs: dict[str, tuple[Any, Any, int]] = {
            "image": (
                image_shards,
                PretrainingImageTransform(**geometry, color_jitter=color_jitter),
                image_batch_size,
            )
        }
        if video_shards is not None:
            specs["video"] = (video_shards, PretrainingVideoTransform(**geometry), video_batch_size)
        self.streams: dict[str, StreamDataLoader] = {}
        for kind, (files, transform, batch_size) in specs.items():
            stream = build_stream(
                files,
                kind=kind,
                transform=transform,
                clip_len=num_frames,
                frame_interval=frame_interval,
                shuffle_buffer=shuffle_buffer,
                seed=seed,
                rank=rank,
                world_size=world_size,
                repeat=True,
                **dict(stream_options or {}),
            )
            self.streams[kind] = StreamDataLoader(
                stream,
                batch_size,
                collate_fn=collate,
                num_workers=num_workers,
                drop_last=True,
                pin_memory=torch.cuda.is_available(),  # page-locked batches: asynchronous host-to-GPU copies
            )
        self._iterators: dict[str, Any] = {}
        self._key_log = open(key_log, "a") if key_log is not None else None  # noqa: SIM115 - closed in close()

    def samples_per_epoch(self) -> int | None:
        """Samples (all ranks) of the stream that defines an epoch: videos when present, else images; None when
        the shards have no `dataset_info.json`."""
        return self.streams["video" if "video" in self.streams else "image"].stream.total_examples

    def next_batch(self) -> dict[str, Any]:
        """The next batch of every stream, merged into one dict (the collator's keys of both streams)."""
        merged: dict[str, Any] = {}
        keys: list[str] = []
        for kind, loader in self.streams.items():
            if kind not in self._iterators:
                self._iterators[kind] = iter(loader)  # created lazily: after any load_state_dict
            batch = next(self._iterators[kind])
            keys.extend(batch.pop("__keys__"))
            merged.update(batch)
        if self._key_log is not None:
            self._key_log.write("\n".join(keys) + "\n")
            self._key_log.flush()
        return merged

    def state_dict(self) -> dict[str, Any]:
        """Position of every stream after the last delivered batch (JSON-compatible; save one per rank)."""
        return {kind: loader.state_dict() for kind, loader in self.streams.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batch at which `state` was taken. Call before the first `next_batch()`."""
        missing = set(self.streams) - set(state)
        if missing:
            raise ValueError(
                f"the saved data position has no {sorted(missing)} stream (was --stage changed?)"
            )
        if self._iterators:
            raise RuntimeError("load the data state before the first batch")
        for kind, loader in self.streams.items():
            loader.load_state_dict(state[kind])

    def skipped_counts(self) -> dict[str, int]:
        """Samples this rank skipped so far (undecodable, bad metadata, ...), per stream."""
        return {kind: loader.stats.num_failed for kind, loader in self.streams.items()}

    def close(self) -> None:
        self._iterators.clear()
        if self._key_log is not None:
            self._key_log.close()
            self._key_log = None


def model_inputs(
    batch: dict[str, torch.Tensor], tokenizer: BEVTVisualTokenizer, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """A collated batch (video and/or image keys) -> `BEVTForMaskedVideoModeling` inputs on `device`, with the
    token ids of the frozen tokenizer (no grad; it runs its trunk under autocast on GPU) as labels."""
    inputs: dict[str, torch.Tensor] = {}
    for prefix in ("", "image_"):
        if f"{prefix}pixel_values" not in batch:
            continue
        tokenizer_pixels = batch[f"{prefix}tokenizer_pixel_values"].to(device, non_blocking=True)
        inputs[f"{prefix}pixel_values"] = batch[f"{prefix}pixel_values"].to(device, non_blocking=True)
        inputs[f"{prefix}bool_masked_pos"] = batch[f"{prefix}bool_masked_pos"].to(device, non_blocking=True)
        inputs[f"{prefix}labels"] = tokenizer.get_codebook_indices(tokenizer_pixels)
    return inputs


def calibration_images(size: int, count: int = 64, seed: int = 0) -> torch.Tensor:
    """Synthetic scenes (`bevt.data.demo_pretraining`) resized to `size`: float (count, 3, size, size) in [0, 1]."""
    from .data.demo_pretraining import make_scene_clip

    rng = np.random.default_rng([seed, 3])
    scenes = np.stack([make_scene_clip(rng, size=80, num_frames=1)[0] for _ in range(count)])
    images = torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def random_tokenizer(vocab_size: int, image_size: int, seed: int = 0) -> BEVTVisualTokenizer:
    """A small DALL-E-style tokenizer with random (seeded) weights, for demos and tests only.

    A random DALL-E encoder puts most positions on a handful of token ids (its ReLU features share a positive mean
    direction), so the output bias is centred on synthetic scenes: the ids then spread over the codebook and the
    targets carry information to learn, while staying a fixed function of the pixels.
    """
    config = BEVTVisualTokenizerConfig(
        vocab_size=vocab_size, image_size=image_size, dalle_hidden_size=16, dalle_num_blocks_per_group=1
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = BEVTVisualTokenizer(config).eval()
    with torch.no_grad():
        logits = tokenizer(calibration_images(image_size, seed=seed)).logits
        bias = tokenizer.encoder.output_conv.bias
        bias -= logits.mean(dim=(0, 2, 3)).to(bias.dtype)
    return tokenizer
