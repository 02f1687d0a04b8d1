"""Training-time transforms on uint8 tensors, batched over frames (no per-frame Python loops).

Pretraining (the official BEVT pipelines):

* :class:`PretrainingVideoTransform`: random rescale of the short side to ``[256, 320]`` (bicubic), random
  ``224`` crop, horizontal flip with probability 0.5; returns the ImageNet-normalised clip for the model and a
  ``112`` Lanczos copy in ``[0, 1]`` for the visual tokenizer.
* :class:`PretrainingImageTransform`: the same geometry for one image, plus colour jitter (0.4 / 0.4 / 0.4).

Fine-tuning:

* :class:`VideoClassificationTrainTransform`: short side 256, random resized crop, optional flip,
  optional RandAugment ``(n, m)`` (one draw per clip), normalisation, optional random erasing (one box for
  all frames).
* :func:`mixup_cutmix`: batch-level mixup / cutmix with label smoothing -> soft targets.

Tokenizer training (:mod:`bevt.tokenizer_training`):

* :class:`TokenizerTrainingTransform`: random resized crops at the tokenizer's input size in ``[0, 1]``, from an
  image or from every frame of a clip.

Randomness: every transform takes ``generator=`` (a ``torch.Generator``); ``None`` uses torch's global RNG.
:func:`derive_seed` / :func:`seeded_generator` make per-sample generators from stable ids (the streaming
layer seeds each sample from ``(seed, epoch, key)``, so a resumed run reproduces the same augmentations and
masks whatever the worker layout).

Shapes: video input ``uint8 (T, H, W, 3)`` (what :mod:`bevt.video_decoding` returns), image input
``uint8 (H, W, 3)``; outputs are channels-first float32. Sizes are all configurable (tests use 64 px crops with
a 32 px tokenizer copy).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PretrainingImageTransform",
    "PretrainingVideoTransform",
    "TokenizerTrainingTransform",
    "VideoClassificationTrainTransform",
    "derive_seed",
    "lanczos_resize",
    "mixup_cutmix",
    "normalize",
    "seeded_generator",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------ randomness


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (ints, strings...): the same parts give the same seed in every
    process and Python session (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seeded_generator(*parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ helpers


def _check_frames(frames: torch.Tensor, ndim: int, what: str) -> torch.Tensor:
    if not isinstance(frames, torch.Tensor):
        frames = torch.as_tensor(np.asarray(frames))
    if frames.dtype != torch.uint8:
        raise TypeError(f"{what}: expected uint8 pixels, got {frames.dtype}")
    shape = "(T, H, W, 3)" if ndim == 4 else "(H, W, 3)"
    if frames.ndim != ndim or frames.shape[-1] != 3:
        raise ValueError(f"{what}: expected shape {shape}, got {tuple(frames.shape)}")
    if frames.shape[-2] < 1 or frames.shape[-3] < 1 or (ndim == 4 and frames.shape[0] < 1):
        raise ValueError(f"{what}: empty input of shape {tuple(frames.shape)}")
    return frames


def _rescaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Keep-ratio size with the short side at ``short_side`` (mmcv rounding: ``int(x * s + 0.5)``)."""
    scale = short_side / min(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _normalize_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """In place on float ``x`` in ``[0, 255]`` ``(..., 3, H, W)``: ``(x / 255 - mean) / std``."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(3, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(3, 1, 1)
    return x.mul_(scale).add_(bias)


def normalize(
    pixels: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """``uint8`` (or float in ``[0, 255]``) ``(..., 3, H, W)`` -> new float32 ``(x / 255 - mean) / std``."""
    x = pixels.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return _normalize_(x, mean, std)


@functools.lru_cache(maxsize=64)
def _lanczos_weights(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV ``INTER_LANCZOS4`` taps for one axis: indices ``(out, 8)`` (clamped) and weights ``(out, 8)``.

    Cached: callers must not modify the returned tensors.
    """
    scale = in_size / out_size
    src = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5
    base = torch.floor(src)
    frac = src - base
    k = torch.arange(8, dtype=torch.float64)
    d = frac[:, None] + 3 - k[None, :]
    w = torch.sinc(d) * torch.sinc(d / 4)  # torch.sinc(0) == 1
    w = w / w.sum(dim=1, keepdim=True)
    idx = (base[:, None].long() - 3 + k.long()[None, :]).clamp_(0, in_size - 1)
    return idx, w.to(torch.float32)


def _lanczos_halve(x: torch.Tensor, dim: int, taps: list[float]) -> torch.Tensor:
    """Exact 2x Lanczos-4 downsampling along ``dim`` (even size ``2n`` -> ``n``).

    Output ``i`` is ``sum_k taps[k] * x[clamp(2i - 3 + k)]``: 8 multiply-adds of shifted stride-2 slices.
    Along an outer axis the slices are views (whole rows; only the 2 + 2 border outputs, whose taps are
    clamped, are gathered). Along the last axis stride-2 reads are slow, so ``x`` is first split into its
    even and odd samples (contiguous copies, replicate-padded), which turns each tap into a contiguous slice.
    """
    n = x.shape[dim] // 2
    lead = (slice(None),) * dim
    if dim != x.ndim - 1 and n >= 5:
        out = torch.empty(x.shape[:dim] + (n,) + x.shape[dim + 1 :], dtype=torch.float32)
        inner = out.narrow(dim, 2, n - 4)  # outputs 2 .. n-3 read x[1 .. 2n-2]: no clamping
        strided = (*lead, slice(None, None, 2))
        torch.mul(x.narrow(dim, 1, 2 * n - 9)[strided], taps[0], out=inner)
        for k in range(1, 8):
            inner.add_(x.narrow(dim, 1 + k, 2 * n - 9)[strided], alpha=taps[k])
        border = torch.tensor([0, 1, n - 2, n - 1])
        index = (2 * border[:, None] - 3 + torch.arange(8)[None, :]).clamp_(0, 2 * n - 1)
        picked = x.index_select(dim, index.flatten()).unflatten(dim, (4, 8))
        edge = (picked * torch.tensor(taps).view((8,) + (1,) * (x.ndim - dim - 1))).sum(dim + 1)
        out.narrow(dim, 0, 2).copy_(edge.narrow(dim, 0, 2))
        out.narrow(dim, n - 2, 2).copy_(edge.narrow(dim, 2, 2))
        return out
    even, odd = x[(*lead, slice(0, None, 2))], x[(*lead, slice(1, None, 2))]
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, 2 * n - 1, 1)
    even = torch.cat([first, even, last, last], dim=dim)  # even[j] = x[2 (j - 1)], clamped
    odd = torch.cat([first, first, odd, last], dim=dim)  # odd[j] = x[2 (j - 2) + 1], clamped
    # tap k reads x[2i - 3 + k]: odd k -> even[i + (k - 1) // 2], even k -> odd[i + k // 2]
    out = odd.narrow(dim, 0, n) * taps[0]
    for k in range(1, 8):
        src = even.narrow(dim, (k - 1) // 2, n) if k % 2 else odd.narrow(dim, k // 2, n)
        out.add_(src, alpha=taps[k])
    return out


def _lanczos_axis(x: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    dim = dim % x.ndim
    in_size = x.shape[dim]
    if in_size == out_size:
        return x
    idx, w = _lanczos_weights(in_size, out_size)
    if in_size == 2 * out_size:  # the usual case (tokenizer input = half the crop): same 8 taps everywhere
        return _lanczos_halve(x, dim, w[0].tolist())
    # General ratio: a dense (out, in) interpolation matrix (each row holds its 8 taps).
    matrix = torch.zeros(out_size, in_size, dtype=torch.float32)
    matrix.scatter_add_(1, idx, w)
    return (x.movedim(dim, -1) @ matrix.T).movedim(-1, dim)


def lanczos_resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(..., H, W)`` to ``size`` with OpenCV ``INTER_LANCZOS4`` semantics (8x8 taps, no antialias).

    This is what the official pipeline's ``CopyResize(interpolation="lanczos")`` (``mmcv.imresize``) does
    to build the tokenizer input. Returns a new float32 tensor (not rounded / clamped).
    """
    x = pixels.to(torch.float32, memory_format=torch.contiguous_format)
    out = _lanczos_axis(_lanczos_axis(x, size[0], -2), size[1], -1)
    return out.clone() if out.data_ptr() == pixels.data_ptr() else out


def _tokenizer_view(crop: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., 3, S, S)`` pixels in ``[0, 255]`` -> float ``[0, 1]`` ``(..., 3, size, size)`` (Lanczos, rounded to
    uint8 levels as ``mmcv.imresize`` on uint8 images does)."""
    small = lanczos_resize(crop, (size, size))
    return small.clamp_(0, 255).round_().div_(255.0).contiguous()


_CACHE_BLOCK_FRAMES = 4
"""Frames per block in :func:`_model_and_tokenizer_views`: 4 float 224 px frames (2.4 MB) stay in cache."""


def _model_and_tokenizer_views(
    crop: torch.Tensor, tokenizer_size: int, mean: Sequence[float], std: Sequence[float]
) -> dict[str, torch.Tensor]:
    """uint8 crop ``(N, 3, S, S)`` -> the normalised model input and the tokenizer copy (none when
    ``tokenizer_size`` is 0: HOG / pixel targets are computed from the model input).

    Both come from one float conversion of the crop, written straight into the output. The work runs in blocks
    of a few frames: each block's float pixels are read by ~20 elementwise passes (Lanczos taps, normalisation),
    which then hit the CPU cache instead of memory (measured ~10-20% faster per clip than whole-clip passes,
    more when other processes compete for memory bandwidth).
    """
    pixels = torch.empty(crop.shape, dtype=torch.float32)
    tokens = None
    if tokenizer_size:
        tokens = torch.empty((*crop.shape[:-2], tokenizer_size, tokenizer_size), dtype=torch.float32)
    for start in range(0, crop.shape[0], _CACHE_BLOCK_FRAMES):
        block = slice(start, start + _CACHE_BLOCK_FRAMES)
        x = pixels[block]
        x.copy_(crop[block])  # uint8 -> float32, contiguous
        if tokens is not None:
            tokens[block] = _tokenizer_view(x, tokenizer_size)  # reads x
        _normalize_(x, mean, std)  # in place: x is the model input now
    if tokens is None:
        return {"pixel_values": pixels}
    return {"pixel_values": pixels, "tokenizer_pixel_values": tokens}


def _resize_uint8(x: torch.Tensor, size: tuple[int, int], mode: str, antialias: bool = False) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` resize (channels-last memory runs torch's fast uint8 kernels)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    x = x.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)


# ------------------------------------------------------------------------------------------ pretraining


class PretrainingVideoTransform:
    """BEVT pretraining geometry for a clip: rescale, crop, flip, + the tokenizer copy.

    Steps (official ``video_train_pipeline``): short side to a uniform integer in ``scale_range``
    (keep ratio, bicubic without antialias, like ``cv2.INTER_CUBIC``), random ``image_size`` crop, horizontal
    flip with probability ``flip_prob``; the tokenizer copy is the (flipped) crop resized to ``tokenizer_size`` with
    Lanczos (OpenCV ``INTER_LANCZOS4``) and scaled to ``[0, 1]`` (the tokenizer applies its own pixel mapping).

    Args:
        image_size: crop size ``S`` (model input); the mask grid is ``S // 16``.
        scale_range: inclusive short-side range; its low end must be >= ``image_size``.
        tokenizer_size: tokenizer input size (``S // 2`` by default; 0: no tokenizer copy, for HOG / pixel
            targets).
        flip_prob: horizontal flip probability.
        mean, std: normalisation of ``pixel_values`` (ImageNet by default).

    Call: ``transform(frames uint8 (T, H, W, 3), generator=None) -> dict`` with ``pixel_values`` float32
    ``(T, 3, S, S)`` and (unless ``tokenizer_size`` is 0) ``tokenizer_pixel_values`` float32 in ``[0, 1]``
    ``(T, 3, S_tok, S_tok)``.
    """

    def __init__(
        self,
        image_size: int = 224,
        scale_range: tuple[int, int] = (256, 320),
        tokenizer_size: int | None = None,
        flip_prob: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        low, high = (int(v) for v in scale_range)
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not image_size <= low <= high:
            raise ValueError(
                f"scale_range {tuple(scale_range)} must satisfy image_size ({image_size}) <= low <= high: "
                "the random crop has to fit in the rescaled frame"
            )
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.image_size = int(image_size)
        self.scale_range = (low, high)
        self.tokenizer_size = int(tokenizer_size) if tokenizer_size is not None else self.image_size // 2
        if not 0 <= self.tokenizer_size <= self.image_size:
            raise ValueError(
                f"tokenizer_size must be in [0, image_size] (0: no tokenizer copy), got {self.tokenizer_size}"
            )
        self.flip_prob = float(flip_prob)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, scale_range={self.scale_range}, "
            f"tokenizer_size={self.tokenizer_size}, flip_prob={self.flip_prob})"
        )

    def _crop(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` -> uint8 ``(N, 3, S, S)``: rescale, crop, flip (draws in this order)."""
        short = _randint(*self.scale_range, generator)
        h, w = _rescaled_size(x.shape[-2], x.shape[-1], short)
        s = self.image_size
        top = _randint(0, h - s, generator)
        left = _randint(0, w - s, generator)
        do_flip = bool(torch.rand((), generator=generator) < self.flip_prob)
        x = _resize_uint8(x, (h, w), "bicubic")[..., top : top + s, left : left + s]
        if do_flip:
            x = x.flip(-1)
        return x  # a channels-last view; the float conversion that follows makes it contiguous

    def __call__(
        self, frames: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        frames = _check_frames(frames, 4, type(self).__name__)
        crop = self._crop(frames.permute(0, 3, 1, 2), generator)
        return _model_and_tokenizer_views(crop, self.tokenizer_size, self.mean, self.std)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """float ``(..., 3, H, W)`` -> ``(..., 1, H, W)`` with the official (ITU-R 601) weights."""
    return 0.2989 * x[..., 0:1, :, :] + 0.587 * x[..., 1:2, :, :] + 0.114 * x[..., 2:3, :, :]


def _jitter_range(
    value: float | tuple[float, float], name: str, center: float, bound: float
) -> tuple[float, float]:
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{name} jitter must be >= 0, got {value}")
        low, high = center - value, center + value
    else:
        low, high = (float(v) for v in value)
    if not center - bound <= low <= high <= center + bound:
        raise ValueError(f"{name} jitter range {(low, high)} is outside [{center - bound}, {center + bound}]")
    return max(low, 0.0) if name != "hue" else low, high


class PretrainingImageTransform(PretrainingVideoTransform):
    """BEVT pretraining geometry for one image, plus colour jitter (official ``image_train_pipeline``).

    Same rescale / crop / flip / tokenizer copy as :class:`PretrainingVideoTransform`, and colour jitter
    (brightness, contrast, saturation factors uniform in ``[1 - j, 1 + j]``; hue shift in ``[-hue, hue]``)
    applied in a random order to the crop in float, clipped and truncated to uint8 levels as the official
    code does. (The official code jitters the full rescaled image before cropping; per-pixel ops are the
    same, only the contrast mean is taken over the crop here.)

    Args:
        color_jitter: one float for brightness / contrast / saturation, or a ``(b, c, s)`` triple; 0 disables.
        hue: hue jitter in ``[0, 0.5]`` (BEVT: 0).
        image_size, scale_range, tokenizer_size, flip_prob, mean, std: see :class:`PretrainingVideoTransform`.

    Call: ``transform(image uint8 (H, W, 3), generator=None) -> dict`` with ``pixel_values`` ``(3, S, S)`` and
    ``tokenizer_pixel_values`` ``(3, S_tok, S_tok)`` in ``[0, 1]``.
    """

    def __init__(
        self,
        image_size: int = 224,
        scale_range: tuple[int, int] = (256, 320),
        tokenizer_size: int | None = None,
        flip_prob: float = 0.5,
        color_jitter: float | tuple[float, float, float] = 0.4,
        hue: float = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(image_size, scale_range, tokenizer_size, flip_prob, mean, std)
        cj = (color_jitter,) * 3 if isinstance(color_jitter, int | float) else tuple(color_jitter)
        if len(cj) != 3:
            raise ValueError(
                f"color_jitter must be a float or (brightness, contrast, saturation), got {color_jitter}"
            )
        self.brightness = _jitter_range(cj[0], "brightness", 1.0, 1.0)
        self.contrast = _jitter_range(cj[1], "contrast", 1.0, 1.0)
        self.saturation = _jitter_range(cj[2], "saturation", 1.0, 1.0)
        self.hue = _jitter_range(hue, "hue", 0.0, 0.5)

    def _color_jitter(self, crop: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 ``(1, 3, S, S)`` -> uint8, the four adjustments in a random order."""
        order = torch.randperm(4, generator=generator).tolist()
        factors = [
            _uniform(*self.brightness, generator),
            _uniform(*self.contrast, generator),
            _uniform(*self.saturation, generator),
            _uniform(*self.hue, generator),
        ]
        if factors[:3] == [1.0, 1.0, 1.0] and factors[3] == 0.0:
            return crop
        x = crop.to(torch.float32)
        for op in order:
            f = factors[op]
            if op == 0 and f != 1.0:
                x = x * f
            elif op == 1 and f != 1.0:
                x = f * x + (1 - f) * _grayscale(x).mean()
            elif op == 2 and f != 1.0:
                x = f * x + (1 - f) * _grayscale(x)
            elif op == 3 and f != 0.0:
                from torchvision.transforms.v2 import functional as TF

                x = TF.adjust_hue(x.clamp(0, 255).div(255), f).mul(255)
        return x.clamp_(0, 255).to(torch.uint8)  # truncation, like numpy's astype(uint8)

    def __call__(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        image = _check_frames(image, 3, type(self).__name__)
        crop = self._crop(image.permute(2, 0, 1).unsqueeze(0), generator)
        crop = self._color_jitter(crop, generator)
        views = _model_and_tokenizer_views(crop, self.tokenizer_size, self.mean, self.std)
        return {k: v[0] for k, v in views.items()}


# ------------------------------------------------------------------------------------------ fine-tuning


def _random_resized_box(
    height: int,
    width: int,
    area_range: tuple[float, float],
    ratio_range: tuple[float, float],
    generator: torch.Generator | None,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """mmaction ``RandomResizedCrop`` box ``(top, left, h, w)``; falls back to the centre square."""
    area = height * width
    log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
    for _ in range(attempts):
        ratio = math.exp(_uniform(log_lo, log_hi, generator))
        target = _uniform(*area_range, generator) * area
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < h <= height and 0 < w <= width:
            return _randint(0, height - h, generator), _randint(0, width - w, generator), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


class VideoClassificationTrainTransform:
    """Fine-tuning augmentation for a clip (official K400 / SSv2 ``train_pipeline``).

    Steps: conceptually rescale the short side to ``short_side``, take a random resized crop (area in
    ``area_range`` of the frame, aspect ratio log-uniform in ``ratio_range``) and resize it to
    ``image_size``; implemented as one bilinear (antialiased) resize of the matching source box. Then
    horizontal flip with probability ``flip_prob`` (0 for SSv2-like data where left/right matters), RandAugment
    (torchvision's, ``num_ops=n``, ``magnitude=m``; one draw for the whole clip), normalisation and random
    erasing with probability ``random_erasing`` (one box of 2%-33% of the area, aspect 0.3-3.3, filled with 0
    in normalised space, i.e. the mean colour, on every frame).

    Args:
        image_size: output size ``S``.
        short_side: short side before cropping (256 as in the official configs).
        area_range, ratio_range: random resized crop parameters.
        flip_prob: flip probability.
        randaug: ``(n, m)`` for RandAugment (SSv2: ``(4, 7)``), or ``None``.
        random_erasing: probability (SSv2: 0.25).
        mean, std: normalisation.

    Call: ``transform(frames uint8 (T, H, W, 3), generator=None) -> {"pixel_values": float32 (T, 3, S, S)}``.
    """

    def __init__(
        self,
        image_size: int = 224,
        short_side: int = 256,
        area_range: tuple[float, float] = (0.08, 1.0),
        ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        randaug: tuple[int, int] | None = None,
        random_erasing: float = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if not 0 < area_range[0] <= area_range[1] <= 1:
            raise ValueError(f"area_range must satisfy 0 < low <= high <= 1, got {area_range}")
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {ratio_range}")
        for name, p in (("flip_prob", flip_prob), ("random_erasing", random_erasing)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} probability must be in [0, 1], got {p}")
        self.image_size = int(image_size)
        self.short_side = int(short_side)
        self.area_range = (float(area_range[0]), float(area_range[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.flip_prob = float(flip_prob)
        self.random_erasing = float(random_erasing)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.randaug = None
        if randaug is not None:
            from torchvision.transforms import v2

            n, m = randaug
            self.randaug = v2.RandAugment(num_ops=int(n), magnitude=int(m))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, short_side={self.short_side}, "
            f"area_range={self.area_range}, flip_prob={self.flip_prob}, randaug={self.randaug}, "
            f"random_erasing={self.random_erasing})"
        )

    def _erase(self, x: torch.Tensor, generator: torch.Generator | None) -> None:
        s = self.image_size
        for _ in range(10):
            area = _uniform(0.02, 1 / 3, generator) * s * s
            ratio = math.exp(_uniform(math.log(0.3), math.log(1 / 0.3), generator))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if 0 < h < s and 0 < w < s:
                top, left = _randint(0, s - h, generator), _randint(0, s - w, generator)
                x[..., top : top + h, left : left + w] = 0.0
                return

    def __call__(
        self, frames: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        frames = _check_frames(frames, 4, type(self).__name__)
        height, width = frames.shape[1], frames.shape[2]
        rh, rw = _rescaled_size(height, width, self.short_side)
        top, left, h, w = _random_resized_box(rh, rw, self.area_range, self.ratio_range, generator)
        sy, sx = height / rh, width / rw  # resized -> source coordinates
        y0, x0 = min(int(round(top * sy)), height - 1), min(int(round(left * sx)), width - 1)
        y1, x1 = (
            min(max(int(round((top + h) * sy)), y0 + 1), height),
            min(max(int(round((left + w) * sx)), x0 + 1), width),
        )
        x = frames.permute(0, 3, 1, 2)[..., y0:y1, x0:x1]
        x = _resize_uint8(x, (self.image_size, self.image_size), "bilinear", antialias=True)
        if self.flip_prob > 0 and bool(torch.rand((), generator=generator) < self.flip_prob):
            x = x.flip(-1)
        if self.randaug is not None:
            seed = int(torch.randint(0, 2**62, (), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.randaug(x.contiguous())
        out = normalize(x, self.mean, self.std)
        if self.random_erasing > 0 and bool(torch.rand((), generator=generator) < self.random_erasing):
            self._erase(out, generator)
        return {"pixel_values": out}


def _smooth_one_hot(labels: torch.Tensor, num_labels: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_labels
    out = torch.full((labels.shape[0], num_labels), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def mixup_cutmix(
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    num_labels: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    label_smoothing: float = 0.1,
    generator: torch.Generator | None = None,
    switch_prob: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mixup or cutmix (timm-style, pairing each sample with the batch reversed) + label smoothing.

    With both alphas > 0, cutmix is chosen with probability ``switch_prob``; with both 0 only label
    smoothing applies. ``lam ~ Beta(alpha, alpha)``; cutmix pastes one box (same for all frames) of area
    ``1 - lam`` and recomputes ``lam`` from the clipped box.

    Args:
        pixel_values: ``(B, ..., H, W)`` float (videos ``(B, T, 3, H, W)`` or images ``(B, 3, H, W)``).
        labels: ``(B,)`` int64 class indices.
        num_labels: number of classes.
        mixup_alpha, cutmix_alpha: Beta parameters (0 disables that mode).
        label_smoothing: smoothing of the one-hot targets.
        generator: random source.

    Returns:
        ``(mixed pixel_values (same shape, new tensor), targets float32 (B, num_labels))``.
    """
    if labels.ndim != 1 or labels.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"labels must be (B,) matching pixel_values' batch {pixel_values.shape[0]}, got {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(f"labels must be class indices in [0, {num_labels}), got {labels.tolist()}")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError("mixup_alpha and cutmix_alpha must be >= 0")
    targets = _smooth_one_hot(labels.long(), num_labels, label_smoothing)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return pixel_values.clone(), targets
    use_cutmix = cutmix_alpha > 0 and (
        mixup_alpha == 0 or float(torch.rand((), generator=generator)) < switch_prob
    )
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator)))
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    flipped = pixel_values.flip(0)
    if use_cutmix:
        height, width = pixel_values.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        mixed = pixel_values.clone()
        mixed[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        mixed = pixel_values * lam + flipped * (1.0 - lam)
    return mixed, targets * lam + targets.flip(0) * (1.0 - lam)


# ------------------------------------------------------------------------------------------ tokenizer training


class TokenizerTrainingTransform:
    """Tokenizer-sized training crops in ``[0, 1]`` from images or from the frames of a clip.

    Per image (or per frame, each with its own draw): a random resized crop box (area fraction uniform in
    ``scale``, log-uniform aspect ratio in ``ratio``, mmaction/torchvision style), resized to ``size`` x ``size``
    (antialiased bicubic, rounded to uint8 levels like the pretraining tokenizer copy), horizontal flip with
    probability ``flip``. BEVT's tokenizer sees 112 px Lanczos copies of 224 crops of frames rescaled to a short side
    of 256-320, i.e. boxes of ~50-75% of the short side: the default ``scale`` covers that and more.

    Args:
        size: output side ``S`` (the tokenizer's ``image_size``; a multiple of its downsampling factor).
        scale: inclusive range of the crop area as a fraction of the frame area, within ``(0, 1]``.
        ratio: range of the crop aspect ratio (width / height).
        flip: horizontal flip probability.

    Call: ``transform(image uint8 (H, W, 3), generator=None)`` -> ``{"pixel_values": float32 (3, S, S)}``;
    ``transform(clip uint8 (T, H, W, 3), generator=None)`` -> ``{"pixel_values": float32 (T, 3, S, S)}`` (the stream's
    ``clip_len`` / ``frame_interval`` choose the frames; batches of clips are ``(B, T, 3, S, S)``, which the tokenizer
    training model flattens to frames).
    """

    def __init__(
        self,
        size: int = 112,
        scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: float = 0.5,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        low, high = (float(v) for v in scale)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1 (area fractions), got {tuple(scale)}")
        r_low, r_high = (float(v) for v in ratio)
        if not 0.0 < r_low <= r_high:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {tuple(ratio)}")
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {flip}")
        self.size, self.scale, self.ratio, self.flip = size, (low, high), (r_low, r_high), float(flip)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"

    def _crop(self, frame: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 ``(3, H, W)`` -> float32 ``(3, S, S)`` in ``[0, 1]``."""
        top, left, h, w = _random_resized_box(frame.shape[-2], frame.shape[-1], self.scale, self.ratio, generator)
        do_flip = bool(torch.rand((), generator=generator) < self.flip)
        box = frame[:, top : top + h, left : left + w].unsqueeze(0).to(torch.float32)
        out = F.interpolate(box, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        out = out[0].clamp_(0, 255).round_().div_(255.0)
        return out.flip(-1) if do_flip else out

    def __call__(
        self, frames: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        ndim = 4 if isinstance(frames, torch.Tensor | np.ndarray) and np.ndim(frames) == 4 else 3
        frames = _check_frames(frames, ndim, type(self).__name__).movedim(-1, -3)  # (..., 3, H, W)
        if ndim == 3:
            return {"pixel_values": self._crop(frames, generator)}
        return {"pixel_values": torch.stack([self._crop(frame, generator) for frame in frames])}
