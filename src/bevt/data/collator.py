"""Batch builder for ``BEVTForMaskedVideoModeling``: video and image sub-batches with masks and tokenizer inputs.

Batch contract (``S`` = crop size, ``S_tok`` = tokenizer input size, ``(T2, h, w)`` = the mask grid, in BEVT
``T2 = T / 2`` and ``h = w = S / 16``)::

    pixel_values                  float32 (B, T, 3, S, S)        video stream (normalised)
    bool_masked_pos               bool    (B, T2, h, w)          tube masks, True = masked
    tokenizer_pixel_values        float32 (B, T, 3, S_tok, S_tok) in [0, 1]
    image_pixel_values            float32 (Bi, 3, S, S)          image stream
    image_bool_masked_pos         bool    (Bi, h, w)             block masks
    image_tokenizer_pixel_values  float32 (Bi, 3, S_tok, S_tok)  in [0, 1]

A stream's keys are present only when the batch holds samples of it; the tokenizer keys only when the samples
carry a tokenizer copy (transforms built with ``tokenizer_size=0`` make none: HOG / pixel targets). Samples come from
:class:`bevt.data.transforms.PretrainingVideoTransform` (``pixel_values`` 4-D) and
:class:`bevt.data.transforms.PretrainingImageTransform` (3-D); a list may mix both, or the training loop calls
the collator once per stream and merges the dicts.

Reproducible masks: a sample from :mod:`bevt.data.streaming` carries ``seed`` (derived from the run seed, the
epoch and the sample key); its mask is drawn from a generator seeded with ``(seed, "mask")``, so it does not
depend on the DataLoader worker that collates it, and a resumed run reproduces it. Samples without ``seed``
draw from one generator owned by the collator (seeded with ``seed``): deterministic in a single process, but
every DataLoader worker would start that generator from the same state, so give samples a ``seed`` when
collating in workers. A sample may also bring its own ``bool_masked_pos``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from bevt.data.transforms import derive_seed
from bevt.masking import BlockMaskGenerator, TubeMaskGenerator

__all__ = ["BEVTPretrainingCollator"]


class BEVTPretrainingCollator:
    """Collate pretraining samples into the model's batch dict (see the module docstring for the keys).

    Args:
        mask_generator: tube masks for videos; default ``TubeMaskGenerator()`` (8 x 14 x 14, 98 patches).
        image_mask_generator: block masks for images; default ``BlockMaskGenerator()`` (14 x 14, 98 patches).
        seed: seed of the fallback generator for samples without a ``seed``.

    Raises (on call):
        ValueError: empty list, inconsistent shapes inside a stream, or masks whose grid does not divide the
            pixel grid (e.g. a 14 x 14 mask for 64-pixel crops: use ``BlockMaskGenerator(4, 4, ...)``).
    """

    def __init__(
        self,
        mask_generator: TubeMaskGenerator | None = None,
        image_mask_generator: BlockMaskGenerator | None = None,
        seed: int = 0,
    ) -> None:
        self.mask_generator = mask_generator if mask_generator is not None else TubeMaskGenerator()
        self.image_mask_generator = (
            image_mask_generator if image_mask_generator is not None else BlockMaskGenerator()
        )
        self.seed = seed
        self._fallback = torch.Generator().manual_seed(seed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mask_generator={self.mask_generator!r}, "
            f"image_mask_generator={self.image_mask_generator!r}, seed={self.seed})"
        )

    def _mask(self, sample: Mapping[str, Any], generator: Any, stream: str) -> torch.Tensor:
        if sample.get("bool_masked_pos") is not None:
            return torch.as_tensor(sample["bool_masked_pos"]).to(torch.bool)
        if sample.get("seed") is not None:
            g = torch.Generator().manual_seed(derive_seed(int(sample["seed"]), "mask", stream))
        else:
            g = self._fallback
        return generator(generator=g)

    @staticmethod
    def _stack(samples: Sequence[Mapping[str, Any]], key: str, stream: str) -> torch.Tensor:
        try:
            values = [torch.as_tensor(s[key]) for s in samples]
        except KeyError as err:
            raise ValueError(f"a {stream} sample lacks {key!r} (has {sorted(samples[0])})") from err
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(f"{stream} samples have different {key!r} shapes: {sorted(shapes)}")
        return torch.stack(values)

    def _collate_stream(
        self, samples: Sequence[Mapping[str, Any]], generator: Any, stream: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        pixels = self._stack(samples, "pixel_values", stream)
        with_tokenizer = ["tokenizer_pixel_values" in s for s in samples]
        if any(with_tokenizer) and not all(with_tokenizer):
            missing = next(s.get("__key__", i) for i, s in enumerate(samples) if "tokenizer_pixel_values" not in s)
            raise ValueError(f"{stream} sample {missing} lacks 'tokenizer_pixel_values' while others in its batch have it")
        tokenizer = self._stack(samples, "tokenizer_pixel_values", stream) if all(with_tokenizer) else None
        masks = torch.stack([self._mask(s, generator, stream) for s in samples])
        # The mask grid must tile the pixels: (T2, h, w) over (T, S, S) for videos, (h, w) over (S, S) for images.
        pixel_grid = (pixels.shape[1], *pixels.shape[-2:]) if stream == "video" else tuple(pixels.shape[-2:])
        mask_grid = tuple(masks.shape[1:])
        if len(mask_grid) != len(pixel_grid) or any(p % m for p, m in zip(pixel_grid, mask_grid)):
            raise ValueError(
                f"{stream} mask grid {mask_grid} does not tile the pixel grid {pixel_grid} "
                f"(pixel_values {tuple(pixels.shape[1:])}); configure the mask generator for this input size"
            )
        return pixels, masks, tokenizer

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """``samples`` -> batch dict; videos have 4-D ``pixel_values`` ``(T, 3, S, S)``, images 3-D ``(3, S, S)``."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        videos, images = [], []
        for i, s in enumerate(samples):
            if "pixel_values" not in s:
                raise ValueError(f"sample {i} ({s.get('__key__', 'no key')}) has no 'pixel_values'")
            ndim = torch.as_tensor(s["pixel_values"]).ndim
            if ndim == 4:
                videos.append(s)
            elif ndim == 3:
                images.append(s)
            else:
                raise ValueError(
                    f"sample {i} ({s.get('__key__', 'no key')}): pixel_values must be (T, 3, S, S) or (3, S, S), "
                    f"got {ndim} dims"
                )
        batch: dict[str, torch.Tensor] = {}
        if videos:
            pixels, masks, tokenizer = self._collate_stream(videos, self.mask_generator, "video")
            batch.update(pixel_values=pixels, bool_masked_pos=masks)
            if tokenizer is not None:
                batch["tokenizer_pixel_values"] = tokenizer
        if images:
            pixels, masks, tokenizer = self._collate_stream(images, self.image_mask_generator, "image")
            batch.update(image_pixel_values=pixels, image_bool_masked_pos=masks)
            if tokenizer is not None:
                batch["image_tokenizer_pixel_values"] = tokenizer
        return batch
