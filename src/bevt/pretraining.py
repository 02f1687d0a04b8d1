"""Pretraining building blocks used by `run_pretraining.py`: data settings, masks, per-rank data streams, targets.

- `PretrainingDataConfig`: every data setting of pretraining in one place (sampling, augmentation, masks, batch
  sizes, loading), with the official BEVT-B values as defaults; it builds the transforms and mask generators.
- `build_mask_generators(image_size, num_frames, ...)`: the tube (video) and block (image) mask generators on the
  16-pixel patch grid, scaled from the official 98-of-196 setting.
- `PretrainingData(config, image_shards, video_shards)`: this rank's infinite, exactly resumable image (and video)
  batch streams over WebDataset shards, each rank reading a disjoint part.
- `model_inputs(batch, targets, device)`: a collated batch -> `BEVTForMaskedVideoModeling` inputs, with labels
  from the frozen visual tokenizer (token ids) or from `bevt.targets.PatchTargets` (HOG / normalised pixels).
- `random_tokenizer(vocab_size, image_size, seed)`: a small random-weight tokenizer for tests (`--random_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .configuration_tokenizer import BEVTVisualTokenizerConfig
from .data.collator import BEVTPretrainingCollator
from .data.streaming import StreamDataLoader, build_stream, counted_examples
from .data.transforms import PretrainingImageTransform, PretrainingVideoTransform
from .masking import BlockMaskGenerator, TubeMaskGenerator
from .modeling_tokenizer import BEVTVisualTokenizer
from .targets import PatchTargets

__all__ = [
    "PretrainingData",
    "PretrainingDataConfig",
    "build_mask_generators",
    "calibration_images",
    "inflate_video_patch_embedding",
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


@dataclass(frozen=True)
class PretrainingDataConfig:
    """The data settings of BEVT pretraining; the defaults are the official BEVT-B recipe
    (`swin_base_patch244_window877_bevt_in1k_k400.py`: 224 px, 16x8 clips, short side 256-320, flip 0.5, colour
    jitter 0.4 on images, 98 of 196 patches masked, tubes of 4-8 of the 8 temporal positions, 8 videos + 64 images
    per GPU).

    Attributes:
        image_size: crop size `S` (a multiple of 32); the mask grid is `S // 16`.
        num_frames, frame_interval: dense clip sampling (`num_frames` even: patches span 2 frames).
        scale_range: random short-side rescale range before the crop (`image_size <= low <= high`).
        tokenizer_size: the tokenizer's input size (None: `image_size // 2`, one token per 16-px patch; 0: no
            tokenizer copy of the frames, for HOG / pixel targets, which read the model input).
        flip_prob: horizontal flip probability (videos and images).
        color_jitter: brightness / contrast / saturation jitter of images.
        mask_ratio, min_mask_patches, tube_range: see `build_mask_generators`.
        video_batch_size, image_batch_size: samples per micro-batch of each stream on one rank.
        shuffle_buffer, num_workers: streaming shuffle buffer and DataLoader workers per stream.
    """

    image_size: int = 224
    num_frames: int = 16
    frame_interval: int = 8
    scale_range: tuple[int, int] = (256, 320)
    tokenizer_size: int | None = None
    flip_prob: float = 0.5
    color_jitter: float = 0.4
    mask_ratio: float = 0.5
    min_mask_patches: int = 16
    tube_range: tuple[float, float] = (0.5, 1.0)
    video_batch_size: int = 8
    image_batch_size: int = 64
    shuffle_buffer: int = 1000
    num_workers: int = 8

    @classmethod
    def from_values(cls, source: Any) -> PretrainingDataConfig:
        """The config of an object with one attribute per field (e.g. the parsed `PretrainingArguments`)."""
        values = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls)}
        values["scale_range"], values["tube_range"] = (
            tuple(values["scale_range"]),
            tuple(values["tube_range"]),
        )
        return cls(**values)

    @property
    def tokenizer_input_size(self) -> int:
        return self.tokenizer_size if self.tokenizer_size is not None else self.image_size // 2

    def video_transform(self) -> PretrainingVideoTransform:
        return PretrainingVideoTransform(
            self.image_size, self.scale_range, self.tokenizer_input_size, flip_prob=self.flip_prob
        )

    def image_transform(self) -> PretrainingImageTransform:
        return PretrainingImageTransform(
            self.image_size,
            self.scale_range,
            self.tokenizer_input_size,
            flip_prob=self.flip_prob,
            color_jitter=self.color_jitter,
        )

    def mask_generators(self) -> tuple[TubeMaskGenerator, BlockMaskGenerator]:
        return build_mask_generators(
            self.image_size, self.num_frames, self.mask_ratio, self.min_mask_patches, self.tube_range
        )


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
    a resumed run sees exactly the batches an uninterrupted one would. Iterating gives `next_batch()` forever.

    Args:
        config: the data settings (`PretrainingDataConfig`).
        image_shards / video_shards: shard globs, folders, files or URLs (`hf://datasets/...`, `https://`,
            `s3://`...; see `bevt.data.shards.list_shards`).
        seed, rank, world_size: see `build_stream`.
        key_log: a file path; the keys of every delivered sample are appended to it (audits rank splits).
        stream_options: further `build_stream` keywords for both streams, e.g. for shards given as URLs
            `{"cache_dir": ..., "storage_options": {...}, "max_retries": ..., "timeout": ...}`.
    """

    def __init__(
        self,
        config: PretrainingDataConfig,
        image_shards: str | Sequence[str],
        video_shards: str | Sequence[str] | None = None,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        key_log: str | os.PathLike | None = None,
        stream_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        tube, block = config.mask_generators()
        collate = _KeyRecordingCollate(BEVTPretrainingCollator(tube, block, seed=seed))
        specs: dict[str, tuple[Any, Any, int]] = {
            "image": (image_shards, config.image_transform(), config.image_batch_size)
        }
        if video_shards is not None:
            specs["video"] = (video_shards, config.video_transform(), config.video_batch_size)
        self.streams: dict[str, StreamDataLoader] = {}
        for kind, (files, transform, batch_size) in specs.items():
            stream = build_stream(
                files,
                kind=kind,
                transform=transform,
                clip_len=config.num_frames,
                frame_interval=config.frame_interval,
                shuffle_buffer=config.shuffle_buffer,
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
                num_workers=config.num_workers,
                drop_last=True,
                pin_memory=torch.cuda.is_available(),  # page-locked batches: asynchronous host-to-GPU copies
            )
        self._iterators: dict[str, Any] = {}
        self._key_log = open(key_log, "a") if key_log is not None else None  # noqa: SIM115 - closed in close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.next_batch()

    def samples_per_epoch(self, count: bool = True) -> int | None:
        """Samples (all ranks) of the stream that defines an epoch: videos when present, else images; from the
        shards' `dataset_info.json`, else (`count`) counted from their tar headers (logged), else None."""
        stream = self.streams["video" if "video" in self.streams else "image"].stream
        return counted_examples(stream) if count else stream.total_examples

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
    batch: dict[str, torch.Tensor], targets: BEVTVisualTokenizer | PatchTargets, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """A collated batch (video and/or image keys) -> `BEVTForMaskedVideoModeling` inputs on `device`, with labels
    computed there without gradients: the token ids of a frozen tokenizer (anything with
    `get_codebook_indices`, run on the half-size `tokenizer_pixel_values`; under autocast on GPU), or the HOG /
    normalised-pixel targets of `PatchTargets` on the model input itself ((B, T, h, w, D) / (B, h, w, D))."""
    inputs: dict[str, torch.Tensor] = {}
    tokenizer = hasattr(targets, "get_codebook_indices")
    for prefix in ("", "image_"):
        if f"{prefix}pixel_values" not in batch:
            continue
        pixels = batch[f"{prefix}pixel_values"].to(device, non_blocking=True)
        inputs[f"{prefix}pixel_values"] = pixels
        inputs[f"{prefix}bool_masked_pos"] = batch[f"{prefix}bool_masked_pos"].to(device, non_blocking=True)
        if tokenizer:
            if f"{prefix}tokenizer_pixel_values" not in batch:
                raise ValueError(
                    f"the batch has no {prefix}tokenizer_pixel_values for the tokenizer targets: its data was built "
                    "with tokenizer_size=0 (no tokenizer copy)"
                )
            tokenizer_pixels = batch[f"{prefix}tokenizer_pixel_values"].to(device, non_blocking=True)
            inputs[f"{prefix}labels"] = targets.get_codebook_indices(tokenizer_pixels)
        else:
            inputs[f"{prefix}labels"] = targets(pixels)
    return inputs


_PATCH_EMBEDDINGS = "bevt.embeddings.patch_embeddings."


def inflate_video_patch_embedding(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `BEVTForMaskedVideoModeling` state dict trained on images only (`--stage image`, or a video loss weight of
    0) -> the same with the video patch embedding (Conv3d + LayerNorm, never trained: no video loss reached it) made
    from the trained image one as the official code initialises stage 2 from stage 1: the Conv2d weight repeated
    over the temporal kernel and divided by its size (a clip of identical frames embeds like the frame), bias and
    norm copied. Without it a video model (stage 2, or fine-tuning) would feed random patch embeddings to blocks
    trained on the image ones."""
    from .conversion_swin import inflate_patch_embedding

    out = dict(state_dict)
    video_weight = out[_PATCH_EMBEDDINGS + "projection.weight"]
    image_weight = out[_PATCH_EMBEDDINGS + "image_projection.weight"]
    inflated = inflate_patch_embedding(image_weight, video_weight.shape[2])
    out[_PATCH_EMBEDDINGS + "projection.weight"] = inflated.to(video_weight.dtype)
    for video_key, image_key in (
        ("projection.bias", "image_projection.bias"),
        ("norm.weight", "image_norm.weight"),
        ("norm.bias", "image_norm.bias"),
    ):
        if _PATCH_EMBEDDINGS + image_key in out:
            out[_PATCH_EMBEDDINGS + video_key] = out[_PATCH_EMBEDDINGS + image_key].clone()
    return out


def calibration_images(size: int, count: int = 64, seed: int = 0) -> torch.Tensor:
    """Synthetic scenes (`bevt.data.demo_pretraining`) resized to `size`: float (count, 3, size, size) in [0, 1]."""
    from .data.demo_pretraining import make_scene_clip

    rng = np.random.default_rng([seed, 3])
    scenes = np.stack([make_scene_clip(rng, size=80, num_frames=1)[0] for _ in range(count)])
    images = torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def random_tokenizer(vocab_size: int, image_size: int, seed: int = 0) -> BEVTVisualTokenizer:
    """A small DALL-E-style tokenizer with random (seeded) weights, for tests only (`--random_tokenizer`).

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
