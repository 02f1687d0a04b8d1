"""Tokenizer-free pretraining targets: what `BEVTForMaskedVideoModeling` regresses at masked positions when
`config.target_type` is "hog" or "pixel" (for "tokenizer" the targets are the ids of a frozen `BEVTVisualTokenizer`).

Both are computed per 16-px patch of the **model input** (`pixel_values`, ImageNet-normalised, undone here to
[0, 1]), so a patch of the input is exactly the region of its target; one target vector per frame and patch:
`(B, T, H/16, W/16, D)` for videos, `(B, H/16, W/16, D)` for images: the grid the loss reads.

- `hog` (MaskFeat, Wei et al., CVPR 2022): histograms of oriented gradients. Per RGB channel, central-difference
  gradients (`x[i+1] - x[i-1]`, zero on the image's outer rows/columns), unsigned orientation in [0, 180) degrees,
  each pixel's gradient magnitude voted into one of 9 orientation bins (20 degrees each, no interpolation), averaged
  over 8x8-pixel cells; a 16-px patch holds 2x2 cells, so D = 2 * 2 * 9 * 3 = 108, ordered (cell row, cell column,
  channel, bin). The 108 values of a patch are L2-normalised together (`v / sqrt(|v|^2 + 1e-5^2)`): a target is
  invariant to the patch's brightness offset and contrast (the gradient field's shape is what is predicted), and
  the relative gradient energy of the cells and channels is kept. Per channel rather than grayscale, as MaskFeat:
  edges between colours of equal luminance exist in video (a red shirt on green grass) and grayscale erases them.
  With one channel this is scikit-image's `hog(orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2),
  block_norm="L2")` at the blocks that start on even cells.
- `pixel` (MAE, He et al. 2022; VideoMAE): the patch's pixels in [0, 1], ordered (row, column, channel)
  (D = 16 * 16 * 3 = 768), minus their mean, divided by their standard deviation (population, `sqrt(var + 1e-6)`).

Why the model input and not the tokenizer's half-size copy: at the half size a 16-px patch is 8x8 pixels (4x4 at
the demo's 64-px input), leaving HOG 4x4 (2x2) pixel cells, and the Lanczos downsampling removes the fine edges
HOG measures; MaskFeat and MAE compute their targets at the input resolution, with these cell and patch sizes.

`PatchTargets(config)` (or `PatchTargets("hog")`) maps a batch of model inputs to targets without gradients, on
their device; `bevt.pretraining.model_inputs` calls it. The model does not import this module (it is only needed
to train), so saved folders load with `trust_remote_code` without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .configuration_bevt import HOG_CELL_SIZE, HOG_NUM_BINS, TARGET_TYPES, BEVTConfig, regression_target_dim

__all__ = [
    "HOG_EPS",
    "PIXEL_EPS",
    "PatchTargets",
    "hog_cell_histograms",
    "hog_targets",
    "image_gradients",
    "pixel_targets",
    "unnormalize",
]

HOG_EPS = 1e-5  # L2 normalisation of a patch's histograms: v / sqrt(|v|^2 + eps^2) (scikit-image's value)
PIXEL_EPS = 1e-6  # per-patch pixel normalisation: (x - mean) / sqrt(var + eps) (MAE's value)
IMAGENET_MEAN: tuple[float, float, float] = (
    0.485,
    0.456,
    0.406,
)  # = bevt.data.transforms' (no data import here)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def unnormalize(
    pixel_values: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Model input `(..., C, H, W)` normalised with `mean`/`std` -> float32 pixels in [0, 1] (`x * std + mean`)."""
    shape = (len(mean), 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixel_values.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixel_values.device).view(shape)
    return pixel_values.float() * std_t + mean_t


def _check_images(images: torch.Tensor, patch_size: int, what: str) -> None:
    if images.ndim < 3 or not images.is_floating_point():
        raise ValueError(
            f"{what} needs float images (..., C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"{what} needs height and width that are multiples of the {patch_size}-px patch, got {height}x{width}"
        )


def image_gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of `(N, H, W)` images: (d/drow, d/dcolumn), `x[i+1] - x[i-1]`, zero on the outer
    rows (d/drow) and outer columns (d/dcolumn)."""
    grad_row = torch.zeros_like(images)
    grad_col = torch.zeros_like(images)
    grad_row[:, 1:-1, :] = images[:, 2:, :] - images[:, :-2, :]
    grad_col[:, :, 1:-1] = images[:, :, 2:] - images[:, :, :-2]
    return grad_row, grad_col


def hog_cell_histograms(
    images: torch.Tensor, cell_size: int = HOG_CELL_SIZE, num_bins: int = HOG_NUM_BINS
) -> torch.Tensor:
    """Unnormalised HOG of each channel: `(N, C, H, W)` -> `(N, C, H/cell, W/cell, num_bins)`, the mean over each
    cell of the gradient magnitude of the pixels whose unsigned orientation falls in the bin
    (`[k * 180 / num_bins, (k + 1) * 180 / num_bins)` degrees)."""
    n, c, height, width = images.shape
    flat = images.reshape(n * c, height, width)
    grad_row, grad_col = image_gradients(flat)
    magnitude = torch.sqrt(grad_row.square() + grad_col.square())
    angle = torch.atan2(grad_row, grad_col)  # (-pi, pi]
    angle = torch.where(angle < 0, angle + math.pi, angle)
    angle = torch.where(angle >= math.pi, torch.zeros_like(angle), angle)  # unsigned: [0, pi)
    bins = (angle * (num_bins / math.pi)).floor().clamp_(0, num_bins - 1)
    histograms = []
    for k in range(num_bins):  # one pooled map per bin: deterministic, N*C*H*W memory at a time
        votes = torch.where(bins == k, magnitude, torch.zeros_like(magnitude))
        histograms.append(F.avg_pool2d(votes.unsqueeze(1), cell_size).squeeze(1))
    return torch.stack(histograms, dim=-1).reshape(n, c, height // cell_size, width // cell_size, num_bins)


def hog_targets(
    images: torch.Tensor,
    patch_size: int = 16,
    cell_size: int = HOG_CELL_SIZE,
    num_bins: int = HOG_NUM_BINS,
    eps: float = HOG_EPS,
) -> torch.Tensor:
    """HOG target of every patch: `(..., C, H, W)` images (any range; [0, 1] in pretraining) ->
    `(..., H/patch, W/patch, (patch/cell)^2 * num_bins * C)`, per patch ordered (cell row, cell column, channel,
    bin) and L2-normalised over all its values (see the module docstring)."""
    _check_images(images, patch_size, "hog_targets")
    if patch_size % cell_size:
        raise ValueError(f"hog_targets: the cell size {cell_size} must divide the patch size {patch_size}")
    lead, (c, height, width) = images.shape[:-3], images.shape[-3:]
    cells = hog_cell_histograms(images.reshape(-1, c, height, width), cell_size, num_bins)
    per = patch_size // cell_size
    h, w = height // patch_size, width // patch_size
    # (N, C, h*per, w*per, bins) -> (N, h, w, per, per, C, bins)
    cells = cells.reshape(-1, c, h, per, w, per, num_bins).permute(0, 2, 4, 3, 5, 1, 6)
    vectors = cells.reshape(-1, h, w, per * per * c * num_bins)
    norm = torch.sqrt(vectors.square().sum(dim=-1, keepdim=True) + eps**2)
    return (vectors / norm).reshape(*lead, h, w, -1)


def pixel_targets(images: torch.Tensor, patch_size: int = 16, eps: float = PIXEL_EPS) -> torch.Tensor:
    """Normalised pixels of every patch: `(..., C, H, W)` -> `(..., H/patch, W/patch, patch * patch * C)`, per
    patch ordered (row, column, channel), minus the patch mean, over `sqrt(patch variance + eps)`."""
    _check_images(images, patch_size, "pixel_targets")
    lead, (c, height, width) = images.shape[:-3], images.shape[-3:]
    h, w = height // patch_size, width // patch_size
    patches = images.reshape(-1, c, h, patch_size, w, patch_size).permute(0, 2, 4, 3, 5, 1)
    patches = patches.reshape(-1, h, w, patch_size * patch_size * c).float()
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, unbiased=False, keepdim=True)
    return ((patches - mean) / torch.sqrt(var + eps)).reshape(*lead, h, w, -1)


class PatchTargets:
    """The regression targets of a model: normalised model inputs -> float32 targets on the token grid, no grad.

    Args:
        target_type: "hog" or "pixel" (a `BEVTConfig` gives its own with `PatchTargets.from_config`).
        patch_size: pixels per target patch side (16: `4 * config.patch_size[1]`).
        num_channels: input channels.
        mean, std: the normalisation of the model input (ImageNet's in pretraining), undone before the targets.

    `targets(pixel_values)`: video `(B, T, C, H, W)` -> `(B, T, H/16, W/16, D)`; images `(B, C, H, W)` ->
    `(B, H/16, W/16, D)`; D = `targets.dim` (= `config.target_dim`).
    """

    def __init__(
        self,
        target_type: str,
        patch_size: int = 16,
        num_channels: int = 3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if target_type not in ("hog", "pixel"):
            raise ValueError(
                f"PatchTargets computes 'hog' or 'pixel' targets, got {target_type!r} (of {list(TARGET_TYPES)}: "
                "token ids come from a BEVTVisualTokenizer)"
            )
        if len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(f"mean/std need {num_channels} values (one per channel), got {mean} / {std}")
        self.target_type = target_type
        self.patch_size = int(patch_size)
        self.num_channels = int(num_channels)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.dim = regression_target_dim(target_type, self.patch_size, self.num_channels)

    @classmethod
    def from_config(cls, config: BEVTConfig, **kwargs) -> PatchTargets:
        """The targets `config.target_type` asks for, at the model's patch geometry (checks `config.target_dim`)."""
        targets = cls(config.target_type, config.target_patch_size, config.num_channels, **kwargs)
        if config.target_dim != targets.dim:
            raise ValueError(
                f"the model's `target_dim` {config.target_dim} is not the size of its {config.target_type!r} targets "
                f"({targets.dim} values per {targets.patch_size}-px patch)"
            )
        return targets

    def __repr__(self) -> str:
        return f"PatchTargets({self.target_type!r}, patch_size={self.patch_size}, dim={self.dim})"

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        images = unnormalize(pixel_values, self.mean, self.std)
        if self.target_type == "hog":
            return hog_targets(images, self.patch_size)
        return pixel_targets(images, self.patch_size)
