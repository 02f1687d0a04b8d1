"""Data of tokenizer training (`run_tokenizer_training.py`): held-out images and the per-rank training stream.

- `load_held_out(shards, kind, count, size)`: the first `count` samples of one pass over the shards in their listed
  order (no shard or sample shuffling), each its centre square resized to `size` (a video: its middle frame). The
  same on every rank and in every run over the same shards; their keys are kept out of training.
- `TokenizerTrainingData`: this rank's infinite, exactly resumable batches of tokenizer training crops in [0, 1] from
  image shards and/or frames of video shards (`TokenizerTrainingTransform`), held-out keys excluded.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .streaming import StreamDataLoader, build_stream, counted_examples
from .transforms import TokenizerTrainingTransform

__all__ = ["HeldOut", "TokenizerTrainingData", "load_held_out"]


@dataclass
class HeldOut:
    """Held-out samples of one stream: `images` float `(N, 3, S, S)` in [0, 1] and their sample `keys`.
    `exhausted`: the shards hold no sample beyond these (nothing would be left to train on)."""

    images: torch.Tensor
    keys: list[str]
    exhausted: bool


def load_held_out(
    shards: str | Sequence[str],
    kind: str,
    count: int,
    size: int,
    stream_options: Mapping[str, Any] | None = None,
) -> HeldOut:
    """The first `count` samples of `shards` in their listed order, as `size` px centre squares (videos: the middle
    frame), with their keys. Reads one sample more to tell whether any is left for training."""
    stream = build_stream(
        shards,
        kind=kind,
        transform=TokenizerTrainingTransform(size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0),
        clip_len=1,
        frame_interval=1,
        sampling="uniform",
        test_mode=True,
        shuffle_buffer=0,
        shuffle_shards=False,
        repeat=False,
        **dict(stream_options or {}),
    )
    images: list[torch.Tensor] = []
    keys: list[str] = []
    exhausted = True
    for sample in stream:
        if len(images) == count:
            exhausted = False
            break
        images.append(sample["pixel_values"].reshape(3, size, size))
        keys.append(sample["__key__"])
    empty = torch.empty(0, 3, size, size)
    return HeldOut(torch.stack(images) if images else empty, keys, exhausted)


class TokenizerTrainingData:
    """This rank's training batches: `{"pixel_values": float (N, 3, S, S)}` in [0, 1], the image batch's crops
    followed by every sampled frame of the video batch's clips (`N = image_batch_size + video_batch_size *
    num_frames`).

    Each stream reads a disjoint part of its shards per rank, repeats epoch after epoch (stop on a step count),
    shuffles, and seeds each crop from `(seed, epoch, key)`; `state_dict()` is the exact position after the last
    batch, so a resumed run sees the batches an uninterrupted one would. Keys in `exclude_keys` are never read.

    Args:
        shards: `{"image": shards, "video": shards}` (one or both): globs, folders, files or URLs.
        transform: the crop (`TokenizerTrainingTransform`).
        batch_sizes: samples per batch of each stream (images; clips).
        num_frames, frame_interval: frames sampled from each clip (dense sampling).
        exclude_keys: per stream, the held-out keys.
        seed, rank, world_size, shuffle_buffer, num_workers: see `build_stream` / `StreamDataLoader`.
        stream_options: further `build_stream` keywords (remote shards: cache, retries, storage options).
    """

    def __init__(
        self,
        shards: Mapping[str, str | Sequence[str]],
        transform: TokenizerTrainingTransform,
        batch_sizes: Mapping[str, int],
        *,
        num_frames: int = 4,
        frame_interval: int = 8,
        exclude_keys: Mapping[str, Collection[str]] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        stream_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.loaders: dict[str, StreamDataLoader] = {}
        for kind, files in shards.items():
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
                exclude_keys=(exclude_keys or {}).get(kind, ()),
                **dict(stream_options or {}),
            )
            self.loaders[kind] = StreamDataLoader(
                stream,
                batch_sizes[kind],
                num_workers=num_workers,
                drop_last=True,
                pin_memory=torch.cuda.is_available(),
            )
        self._iterators: dict[str, Iterator[Any]] = {}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            frames = []
            for kind, loader in self.loaders.items():
                if kind not in self._iterators:
                    self._iterators[kind] = iter(loader)  # created lazily: after any load_state_dict
                pixels = next(self._iterators[kind])["pixel_values"]
                frames.append(pixels.flatten(0, 1) if pixels.ndim == 5 else pixels)  # clips -> frames
            yield {"pixel_values": torch.cat(frames)}

    def samples_per_epoch(self, count: bool = True) -> int | None:
        """Samples (all ranks) of the stream that defines an epoch (videos when present, else images), from the
        shards' `dataset_info.json`, else (`count`) counted from their tar headers, else None."""
        stream = self.loaders["video" if "video" in self.loaders else "image"].stream
        total = counted_examples(stream) if count else stream.total_examples
        return None if total is None else total - len(stream.exclude_keys)

    def state_dict(self) -> dict[str, Any]:
        return {kind: loader.state_dict() for kind, loader in self.loaders.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self.loaders) - set(state)
        if missing:
            raise ValueError(f"the saved data position has no {sorted(missing)} stream (were the shard flags changed?)")
        for kind, loader in self.loaders.items():
            loader.load_state_dict(state[kind])

    def skipped_counts(self) -> dict[str, int]:
        return {kind: loader.stats.num_failed for kind, loader in self.loaders.items()}

    def close(self) -> None:
        self._iterators.clear()
