"""Mask generators for masked image/video modeling, and a helper to look at masks.

* :class:`BlockMaskGenerator`: BEiT block-wise masking of an ``h x w`` patch grid (image stream; BEVT uses
  14x14 with 98 masked patches and blocks of at least 16 patches).
* :class:`TubeMaskGenerator`: BEVT's tube masking for the video stream: one 2D block mask repeated over a
  contiguous run of the ``T/2`` temporal positions, of random length and random start, wrapping around
  the end of the clip.
* :func:`save_mask_grid`: draws the masked patches over the clip's frames and writes a PNG grid.

Masks are ``torch.bool`` with ``True`` = masked. Randomness: pass a ``torch.Generator`` per call, or a
``seed`` to the constructor (the generator then owns a seeded ``torch.Generator``); with neither, torch's
global RNG is used, so ``torch.manual_seed`` makes runs reproducible.
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import torch

__all__ = ["BlockMaskGenerator", "TubeMaskGenerator", "mask_to_pixels", "save_mask_grid"]


def _python_rng(generator: torch.Generator | None) -> random.Random:
    """A ``random.Random`` seeded from one draw of ``generator`` (or of torch's global RNG)."""
    return random.Random(int(torch.randint(0, 2**62, (), generator=generator)))


class BlockMaskGenerator:
    """BEiT block-wise masking on an ``height x width`` grid.

    Rectangular blocks of random area (``min_num_patches`` up to what is still missing, capped by
    ``max_num_patches``) and random aspect ratio (log-uniform in ``[min_aspect, max_aspect]``) are added
    until ``num_masking_patches`` patches are masked. BEiT's algorithm can stop a few patches short when no
    block fits; we then top up with random unmasked patches next to the masked ones, so the result has
    **exactly** ``num_masking_patches`` masked patches (any value up to ``height * width`` is possible).

    Args:
        height, width: grid size in patches (14x14 for 224 pixels with 16-pixel patches).
        num_masking_patches: patches to mask.
        min_num_patches: smallest block area.
        max_num_patches: largest block area (default ``num_masking_patches``).
        min_aspect: smallest block aspect ratio (height / width); the largest defaults to ``1 / min_aspect``.
        max_aspect: largest block aspect ratio.
        seed: seed of a generator owned by this object, used when ``__call__`` gets no generator.

    Call: ``generator(generator=None) -> torch.BoolTensor (height, width)``.
    """

    def __init__(
        self,
        height: int = 14,
        width: int = 14,
        num_masking_patches: int = 98,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        seed: int | None = None,
    ) -> None:
        if height < 1 or width < 1:
            raise ValueError(f"mask grid must be at least 1x1, got {height}x{width}")
        if not 0 <= num_masking_patches <= height * width:
            raise ValueError(
                f"num_masking_patches={num_masking_patches} must be in [0, {height * width}] for a "
                f"{height}x{width} grid"
            )
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if min_aspect <= 0 or (max_aspect is not None and max_aspect < min_aspect):
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.height = height
        self.width = width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        self.min_aspect = min_aspect
        self.max_aspect = max_aspect if max_aspect is not None else 1 / min_aspect
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(height={self.height}, width={self.width}, "
            f"num_masking_patches={self.num_masking_patches}, min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, aspect=({self.min_aspect:.3f}, {self.max_aspect:.3f}))"
        )

    def _add_block(self, mask: np.ndarray, max_patches: int, rng: random.Random) -> int:
        """Try (10 times) to add one block of at most ``max_patches`` new patches; returns patches added."""
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_patches)
            aspect = math.exp(rng.uniform(*self._log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= max_patches:
                block[...] = True
                return new
        return 0

    def _top_up(self, mask: np.ndarray, missing: int, rng: random.Random) -> None:
        """Mask ``missing`` more patches, preferring unmasked neighbours of masked ones."""
        for _ in range(missing):
            grown = mask.copy()
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(grown & ~mask)
            if candidates.size == 0:
                candidates = np.flatnonzero(~mask)
            mask.flat[candidates[rng.randrange(candidates.size)]] = True

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One mask: ``torch.bool (height, width)`` with exactly ``num_masking_patches`` True entries."""
        rng = _python_rng(generator if generator is not None else self._generator)
        mask = np.zeros(self.shape, dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            max_patches = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, max_patches, rng)
            if added == 0:
                break
            count += added
        if count < self.num_masking_patches:
            self._top_up(mask, self.num_masking_patches - count, rng)
        return torch.from_numpy(mask)


class TubeMaskGenerator:
    """BEVT tube masking: a 2D block mask repeated over a contiguous, wrapping temporal span.

    For ``T2 = num_frames`` temporal positions (the clip's ``T / 2`` after the 2-frame patch embedding),
    the tube length is a uniform integer in ``[max(int(tube_range[0] * T2), 1), min(int(tube_range[1] * T2),
    T2)]`` and its start a uniform integer in ``[0, T2 - 1]``; a tube running past the last position
    continues at position 0 (as the official pipeline does). Positions outside the tube are unmasked.

    Args:
        num_frames: temporal positions ``T2`` (8 for 16-frame clips).
        height, width, num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect:
            the 2D block mask, see :class:`BlockMaskGenerator` (BEVT: 14, 14, 98, 16).
        tube_range: fraction of ``T2`` the tube spans, ``(low, high)`` with ``0 <= low <= high <= 1``.
        seed: seed of a generator owned by this object, used when ``__call__`` gets no generator.

    Call: ``generator(generator=None) -> torch.BoolTensor (num_frames, height, width)``.
    """

    def __init__(
        self,
        num_frames: int = 8,
        height: int = 14,
        width: int = 14,
        num_masking_patches: int = 98,
        tube_range: tuple[float, float] = (0.5, 1.0),
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        seed: int | None = None,
    ) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames (temporal positions) must be >= 1, got {num_frames}")
        low, high = tube_range
        if not 0 <= low <= high <= 1:
            raise ValueError(f"tube_range must satisfy 0 <= low <= high <= 1, got {tube_range}")
        self.num_frames = num_frames
        self.tube_range = (float(low), float(high))
        self.min_tube_len = max(int(low * num_frames), 1)
        self.max_tube_len = min(int(high * num_frames), num_frames)
        if self.max_tube_len < self.min_tube_len:  # e.g. high * T2 < 1: the tube still covers one position
            self.max_tube_len = self.min_tube_len
        self.block = BlockMaskGenerator(
            height, width, num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect
        )
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.num_frames, self.block.height, self.block.width

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_frames={self.num_frames}, tube_len=[{self.min_tube_len}, "
            f"{self.max_tube_len}], block={self.block!r})"
        )

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One mask: ``torch.bool (num_frames, height, width)``."""
        gen = generator if generator is not None else self._generator
        rng = _python_rng(gen)
        plane = self.block(generator=gen)
        start = rng.randint(0, self.num_frames - 1)
        length = rng.randint(self.min_tube_len, self.max_tube_len)
        mask = torch.zeros(self.shape, dtype=torch.bool)
        positions = [(start + k) % self.num_frames for k in range(length)]
        mask[positions] = plane
        return mask


# --------------------------------------------------------------------------------------------- viewing


def mask_to_pixels(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-upsample a patch mask ``(..., h, w)`` to pixels ``(..., height, width)`` (bool)."""
    m = mask.to(torch.bool)
    lead = m.shape[:-2]
    flat = m.reshape(-1, 1, *m.shape[-2:]).float()
    up = torch.nn.functional.interpolate(flat, size=(height, width), mode="nearest")
    return up.reshape(*lead, height, width).bool()


def _as_uint8_frames(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) or (H, W, 3), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if x.is_floating_point() and float(x.max()) <= 1.0:
            x = x * 255
        x = x.clamp(0, 255).round().to(torch.uint8)
    return x


def save_mask_grid(
    frames: torch.Tensor | np.ndarray,
    mask: torch.Tensor,
    path: str | os.PathLike,
    *,
    color: tuple[int, int, int] = (255, 0, 0),
    alpha: float = 0.6,
    columns: int | None = None,
    gap: int = 2,
) -> str:
    """Write a PNG grid of the frames with their masked patches tinted.

    Args:
        frames: ``uint8 (T, H, W, 3)`` (or one image ``(H, W, 3)``); floats in ``[0, 1]`` are accepted.
        mask: ``(T2, h, w)`` video mask (each temporal position covers ``T / T2`` consecutive frames,
            e.g. 2 with tubelets of 2 frames) or ``(h, w)`` image/2D mask shown on every frame.
        path: output ``.png`` path (parent folders are created).
        color, alpha: tint of masked patches.
        columns: frames per row (default: all in one row up to 8).
        gap: white pixels between frames.

    Returns:
        The written path as ``str``.
    """
    from PIL import Image

    x = _as_uint8_frames(frames)
    t, h, w, _ = x.shape
    m = torch.as_tensor(mask).to(torch.bool)
    if m.ndim == 2:
        m = m.unsqueeze(0).expand(t, -1, -1)
    elif m.ndim == 3:
        if t % m.shape[0] != 0:
            raise ValueError(f"{t} frames cannot be split evenly over {m.shape[0]} mask positions")
        m = m.repeat_interleave(t // m.shape[0], dim=0)
    else:
        raise ValueError(f"mask must be (h, w) or (T2, h, w), got shape {tuple(m.shape)}")
    pixels = mask_to_pixels(m, h, w).unsqueeze(-1)  # (T, H, W, 1)
    tint = torch.tensor(color, dtype=torch.float32)
    shaded = torch.where(pixels, x.float() * (1 - alpha) + tint * alpha, x.float()).round().to(torch.uint8)
    cols = columns or min(t, 8)
    rows = math.ceil(t / cols)
    canvas = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for i in range(t):
        r, c = divmod(i, cols)
        canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = shaded[i].numpy()
    out = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    Image.fromarray(canvas).save(out, format="PNG")
    return out
