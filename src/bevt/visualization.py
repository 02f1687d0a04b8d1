"""Pictures of what masked modeling learned: one PNG per stream, for `run_pretraining.py --visualize_steps`.

For the first sample of a batch (a clip: up to `max_frames` of its frames, evenly spaced; an image: one column) the
picture has four rows:

1. the input (the model's `pixel_values`, un-normalised),
2. the masked input (masked 16-px patches greyed out: what the model sees),
3. the targets of every patch, drawn as pictures: normalised pixels un-normalised with the patch's own mean and std
   (MAE's convention); HOG as orientation glyphs per 8-px cell (a line along the edge direction of each bin, as
   bright as the bin's share, summed over channels); token ids decoded to pixels with `tokenizer.decode` where the
   tokenizer has a decoder (`config.has_decoder`), else one colour per id,
4. the prediction: the targets where the patch was visible, the model's prediction (drawn the same way; for token
   ids the argmax) where it was masked, so the two bottom rows differ only at masked patches.

`render_panels(...)` returns the rows as arrays; `pretraining_picture(...)` lays them out as a PIL image with row
labels. The model does not import this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .configuration_bevt import HOG_CELL_SIZE, HOG_NUM_BINS
from .targets import IMAGENET_MEAN, IMAGENET_STD, unnormalize

__all__ = ["StreamPanels", "pretraining_picture", "render_panels", "token_colours"]

ROW_NAMES = ("input", "masked input", "targets", "prediction")
MASK_GREY = 0.5
LABEL_WIDTH = 96  # pixels left of the panels for the row names
GAP = 2  # pixels between panels


@dataclass
class StreamPanels:
    """The four rows of one stream's picture: each `(columns, H, W, 3)` float arrays in [0, 1], and the pixel mask
    `(columns, H, W)` (True inside masked patches)."""

    input: np.ndarray
    masked_input: np.ndarray
    targets: np.ndarray
    prediction: np.ndarray
    pixel_mask: np.ndarray

    def rows(self) -> list[np.ndarray]:
        return [self.input, self.masked_input, self.targets, self.prediction]


def token_colours(ids: torch.Tensor) -> torch.Tensor:
    """A fixed colour per token id: `(...,)` int -> `(..., 3)` float in [0.15, 0.95] (golden-ratio hues)."""
    hue = (ids.double() * 0.6180339887498949) % 1.0
    channels = [
        0.55 + 0.4 * torch.cos(2 * math.pi * (hue + shift)) for shift in (0.0, 1 / 3, 2 / 3)
    ]  # a smooth hue wheel
    return torch.stack(channels, dim=-1).float()


def _glyph_masks(cell: int, num_bins: int) -> torch.Tensor:
    """(num_bins, cell, cell) anti-aliased lines through the cell centre, along the edge of each orientation bin
    (perpendicular to its gradient direction)."""
    centre = (cell - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(cell) - centre, torch.arange(cell) - centre, indexing="ij")
    masks = []
    for k in range(num_bins):
        gradient = (k + 0.5) * math.pi / num_bins  # bin centre, measured as atan2(d/drow, d/dcolumn)
        # the edge runs perpendicular to the gradient; distance of each pixel from that line
        distance = (xs * math.cos(gradient) + ys * math.sin(gradient)).abs()
        masks.append((1.0 - distance).clamp(0, 1))
    return torch.stack(masks)


def _draw_hog(vectors: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """HOG targets `(N, h, w, D)` -> glyph pictures `(N, h*patch, w*patch, 3)` in [0, 1] (white on black)."""
    n, h, w, _ = vectors.shape
    per = patch // HOG_CELL_SIZE
    cells = vectors.float().reshape(n, h, w, per, per, channels, HOG_NUM_BINS).sum(dim=5).clamp_min(0)
    cells = cells / cells.amax(dim=(1, 2, 3, 4, 5), keepdim=True).clamp_min(
        1e-8
    )  # brightest bin of the picture
    glyphs = _glyph_masks(HOG_CELL_SIZE, HOG_NUM_BINS)  # (bins, cell, cell)
    picture = torch.einsum("nhwyxb,bij->nhyiwxj", cells, glyphs).clamp(0, 1)
    picture = picture.reshape(n, h * per * HOG_CELL_SIZE, w * per * HOG_CELL_SIZE)
    return picture[..., None].expand(-1, -1, -1, 3)


def _draw_pixels(vectors: torch.Tensor, reference: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Normalised-pixel targets `(N, h, w, D)` -> pictures `(N, h*patch, w*patch, C)`, un-normalised with the mean
    and std of the corresponding patch of `reference` `(N, C, H, W)` in [0, 1]."""
    n, h, w, _ = vectors.shape
    patches = reference.float().reshape(n, channels, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)
    patches = patches.reshape(n, h, w, -1)
    mean = patches.mean(-1, keepdim=True)
    std = patches.std(-1, unbiased=False, keepdim=True)
    values = vectors.float() * std + mean
    values = values.reshape(n, h, w, patch, patch, channels).permute(0, 1, 3, 2, 4, 5)
    return values.reshape(n, h * patch, w * patch, channels).clamp(0, 1)


def _draw_tokens(ids: torch.Tensor, size: tuple[int, int], tokenizer) -> torch.Tensor:
    """Token ids `(N, h, w)` -> `(N, H, W, 3)`: decoded pixels where the tokenizer has a decoder, else id colours."""
    config = getattr(tokenizer, "config", None)
    if tokenizer is not None and getattr(config, "has_decoder", False):
        with torch.no_grad():
            pixels = tokenizer.decode(ids.to(next(tokenizer.parameters()).device)).float().cpu()
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        return pixels.permute(0, 2, 3, 1).clamp(0, 1)
    colours = token_colours(ids.cpu())  # (N, h, w, 3)
    scale = size[0] // ids.shape[-2], size[1] // ids.shape[-1]
    return colours.repeat_interleave(scale[0], 1).repeat_interleave(scale[1], 2)


def render_panels(
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    target_type: str,
    *,
    patch_size: int = 16,
    tokenizer=None,
    max_frames: int = 8,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> StreamPanels:
    """The rows of one stream's picture, for its first sample.

    Args:
        pixel_values: the model input, video `(B, T, C, H, W)` or images `(B, C, H, W)`, normalised with mean/std.
        bool_masked_pos: its mask, `(B, T/2, h, w)` or `(B, h, w)` (h = H / patch_size).
        labels: the targets the loss used: token ids `(B, [T,] h, w)` or regression targets `(B, [T,] h, w, D)`.
        logits: the model's `logits` / `image_logits` (`return_logits=True`): `(B, [T*]h*w, vocab or D)`.
        target_type: "tokenizer", "hog" or "pixel".
        tokenizer: the frozen tokenizer, to decode token ids (optional).
        max_frames: video frames shown, evenly spaced.
    """
    is_video = pixel_values.ndim == 5
    frames = pixel_values[0].detach().cpu() if is_video else pixel_values[:1].detach().cpu()
    mask = bool_masked_pos[0].detach().cpu().bool()
    if is_video:
        mask = mask.repeat_interleave(frames.shape[0] // mask.shape[0], dim=0)
    else:
        mask = mask[None]
    grid = tuple(labels.shape[1 + is_video : 3 + is_video])
    target = labels[0].detach().cpu() if is_video else labels[:1].detach().cpu()
    predicted = logits[0].detach().cpu().float().reshape(*target.shape[:3], -1)
    if not is_video:
        predicted = logits[:1].detach().cpu().float().reshape(1, *grid, -1)
    if is_video and frames.shape[0] > max_frames:
        keep = torch.linspace(0, frames.shape[0] - 1, max_frames).round().long()
        frames, mask, target, predicted = frames[keep], mask[keep], target[keep], predicted[keep]
    images = unnormalize(frames, mean, std).clamp(0, 1)  # (N, C, H, W)
    n, channels, height, width = images.shape
    pixel_mask = mask.repeat_interleave(height // grid[0], 1).repeat_interleave(width // grid[1], 2)

    if target_type == "tokenizer":
        target_picture = _draw_tokens(target.long(), (height, width), tokenizer)
        predicted_picture = _draw_tokens(predicted.argmax(-1), (height, width), tokenizer)
    elif target_type == "hog":
        target_picture = _draw_hog(target, patch_size, channels)
        predicted_picture = _draw_hog(predicted, patch_size, channels)
    elif target_type == "pixel":
        target_picture = _draw_pixels(target, images, patch_size, channels)
        predicted_picture = _draw_pixels(predicted, images, patch_size, channels)
    else:
        raise ValueError(f"target_type must be 'tokenizer', 'hog' or 'pixel', got {target_type!r}")
    as_rgb = images.permute(0, 2, 3, 1)
    if channels == 1:
        as_rgb = as_rgb.expand(-1, -1, -1, 3)
    masked = torch.where(pixel_mask[..., None], torch.full_like(as_rgb, MASK_GREY), as_rgb)
    prediction = torch.where(pixel_mask[..., None], predicted_picture, target_picture)
    return StreamPanels(
        input=as_rgb.numpy(),
        masked_input=masked.numpy(),
        targets=target_picture.numpy(),
        prediction=prediction.numpy(),
        pixel_mask=pixel_mask.numpy(),
    )


def picture_size(columns: int, height: int, width: int, scale: int) -> tuple[int, int]:
    """(width, height) in pixels of `pretraining_picture` for `columns` panels of `height` x `width`."""
    return (
        LABEL_WIDTH + columns * (width * scale + GAP) - GAP,
        len(ROW_NAMES) * (height * scale + GAP) - GAP,
    )


def pretraining_picture(panels: StreamPanels, scale: int | None = None) -> Image.Image:
    """Lay the rows out in one RGB image (each panel magnified `scale` times: by default to >= 128 px), with the row
    names on the left."""
    columns, height, width, _ = panels.input.shape
    scale = scale or max(1, math.ceil(128 / height))
    size = picture_size(columns, height, width, scale)
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, (name, panel) in enumerate(zip(ROW_NAMES, panels.rows(), strict=True)):
        top = row * (height * scale + GAP)
        draw.text((4, top + height * scale // 2 - 6), name, fill=(0, 0, 0))
        for column in range(columns):
            tile = Image.fromarray((panel[column] * 255).round().astype(np.uint8))
            if scale > 1:
                tile = tile.resize((width * scale, height * scale), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + column * (width * scale + GAP), top))
    return canvas
