"""Frame sampling: which frame indices make up each clip (no decoding here).

Two modes, matching the official BEVT / mmaction2 pipelines:

* ``"dense"`` (Kinetics style, e.g. 16x8 for pretraining, 32x2 for fine-tuning): a clip is ``clip_len``
  frames ``frame_interval`` apart, spanning ``clip_len * frame_interval`` frames. Training: the video is
  cut into ``num_clips`` equal stretches and each clip starts at a random offset in its stretch. Test:
  the clip starts are evenly spaced, each in the middle of its stretch.
* ``"uniform"`` (Something-Something style, TSN segments): the video is cut into ``clip_len`` equal
  segments and one frame is taken from each: a random one for training, the centre for test.
  ``frame_interval`` is ignored. With ``num_clips > 1`` at test time the clips take evenly spaced
  positions inside the segments instead of the centre.

Videos shorter than a clip never fail: indices past the end loop back to the start
(index ``mod num_frames``; a 32-frame video sampled 16x8 gives ``0, 8, 16, 24, 0, 8, ...``), and
uniform sampling of a video with fewer frames than ``clip_len`` repeats frames.

Randomness comes from ``generator`` (a ``torch.Generator``) or, when ``None``, torch's global RNG, so
``torch.manual_seed`` or a seeded generator makes sampling reproducible.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["SAMPLING_MODES", "sample_frame_indices"]

SAMPLING_MODES: tuple[str, ...] = ("dense", "uniform")


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """A uniform integer in ``[low, high]`` (both inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _dense_offsets(
    num_frames: int, span: int, num_clips: int, test_mode: bool, generator: torch.Generator | None
) -> list[int]:
    """Start frame of each dense clip; ``span = clip_len * frame_interval``."""
    room = num_frames - span + 1  # number of possible start frames keeping the clip inside the video
    if test_mode:
        if room <= 0:
            return [0] * num_clips
        stride = room / num_clips
        return [int(stride * k + stride / 2) for k in range(num_clips)]
    stretch = room // num_clips
    if stretch > 0:
        return [stretch * k + _randint(0, stretch - 1, generator) for k in range(num_clips)]
    if room > 0:  # more clips than start positions: spread them evenly (some overlap)
        ratio = room / num_clips
        return [round(k * ratio) for k in range(num_clips)]
    return [0] * num_clips


def _uniform_clip(
    num_frames: int,
    clip_len: int,
    clip: int,
    num_clips: int,
    test_mode: bool,
    generator: torch.Generator | None,
) -> list[int]:
    """One frame from each of ``clip_len`` equal segments of ``[0, num_frames - 1]``."""
    segment = (num_frames - 1) / clip_len
    out = []
    for i in range(clip_len):
        start, end = int(round(segment * i)), int(round(segment * (i + 1)))
        if test_mode:
            out.append(int(start + (end - start) * (clip + 0.5) / num_clips))
        else:
            out.append(_randint(start, end, generator))
    return out


def sample_frame_indices(
    num_frames: int,
    *,
    mode: Literal["dense", "uniform"] = "dense",
    clip_len: int,
    frame_interval: int = 1,
    num_clips: int = 1,
    test_mode: bool = False,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Frame indices of ``num_clips`` clips of ``clip_len`` frames from a video of ``num_frames`` frames.

    Args:
        num_frames: frames in the video (>= 1).
        mode: ``"dense"`` or ``"uniform"`` (see the module docstring).
        clip_len: frames per clip (the model's ``T``).
        frame_interval: step between sampled frames in ``"dense"`` mode (ignored by ``"uniform"``).
        num_clips: clips to sample (several at test time for multi-view evaluation).
        test_mode: deterministic, evenly spaced clips / segment centres instead of random ones.
        generator: random source for training mode; ``None`` uses torch's global RNG.

    Returns:
        ``num_clips`` lists of ``clip_len`` indices, each in ``[0, num_frames)``.

    Raises:
        ValueError: a non-positive count or interval, or an unknown mode.
    """
    for name, value in (
        ("num_frames", num_frames),
        ("clip_len", clip_len),
        ("frame_interval", frame_interval),
        ("num_clips", num_clips),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if mode == "dense":
        offsets = _dense_offsets(num_frames, clip_len * frame_interval, num_clips, test_mode, generator)
        return [[(start + k * frame_interval) % num_frames for k in range(clip_len)] for start in offsets]
    if mode == "uniform":
        return [
            _uniform_clip(num_frames, clip_len, clip, num_clips, test_mode, generator)
            for clip in range(num_clips)
        ]
    raise ValueError(f"unknown sampling mode {mode!r}; choose one of {list(SAMPLING_MODES)}")
