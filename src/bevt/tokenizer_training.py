"""Train your own visual tokenizer (BEVT's pretraining targets): model, losses, metrics and one training step.

The method follows the tokenizer config's `tokenizer_type`:

- `"vqgan"`: encoder -> `quant_conv` -> nearest codebook entry -> `post_quant_conv` -> decoder, trained with L1 or L2
  reconstruction (+ an optional VGG16 perceptual loss when local weights exist; nothing is downloaded) and a
  commitment loss. The codebook is updated by exponential moving averages of the assigned encoder outputs
  (`codebook_update="ema"`, VQ-VAE-2) or by gradients through the straight-through estimator with the codebook loss
  (`"straight-through"`). It starts from encoder outputs of the first batch (`codebook_init="data"`), and codes
  that fall out of use are re-seeded from encoder outputs of the current batch (dead-code restarts). With
  `vqgan_l2_normalize_codes`, latents and codes are compared on the unit sphere.
- `"dall-e"`: the DALL-E dVAE: the encoder's logits are relaxed with Gumbel-softmax (temperature annealed from
  `temperature_start` to `temperature_end`, cosine), the decoder predicts the logit-Laplace parameters of every
  pixel, and the loss is the negative evidence lower bound per pixel value: logit-Laplace NLL + beta x KL to the
  uniform prior over the codebook (beta ramped from 0 to `kl_weight`, cosine), as in Ramesh et al. 2021.

Either way the trained modules *are* a `BEVTVisualTokenizer` (`model.tokenizer`): `model.save_pretrained(folder)`
writes a folder that `BEVTVisualTokenizer.from_pretrained` loads as a frozen tokenizer with the same ids (and
`decode`), a drop-in `--tokenizer_name_or_path` for pretraining.

    config = tokenizer_config_for_training("vqgan", vocab_size=512, image_size=112)
    model = TokenizerTrainingModel(config, TokenizerTrainingArguments())
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=2e-4)
    for step, batch in enumerate(loader):                 # TokenizerTrainingTransform crops in [0, 1]
        metrics = training_step(model, batch["pixel_values"], optimizer, step)
    results = evaluate_reconstruction(model, held_out)     # PSNR (+ mean-colour baseline), perplexity, usage
    save_reconstruction_grid(held_out[:8], model.reconstruct(held_out[:8]), "reconstructions.png")
    model.save_pretrained("my-tokenizer")

Distributed training (Accelerate / DDP): the EMA statistics are all-reduced over the ranks and the codebook
initialisation and restarts are broadcast from rank 0, so every rank keeps the same codebook.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .configuration_tokenizer import BEVTVisualTokenizerConfig
from .modeling_tokenizer import BEVTVisualTokenizer

__all__ = [
    "PerceptualLoss",
    "TokenizerTrainingArguments",
    "TokenizerTrainingModel",
    "TokenizerTrainingOutput",
    "codebook_usage",
    "default_perceptual_weights",
    "evaluate_reconstruction",
    "logit_laplace_nll",
    "psnr",
    "save_reconstruction_grid",
    "tokenizer_config_for_training",
    "training_step",
]

logger = logging.getLogger(__name__)

RECONSTRUCTION_LOSSES = ("l1", "l2")
CODEBOOK_UPDATES = ("ema", "straight-through")
CODEBOOK_INITS = ("data", "random")


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def tokenizer_config_for_training(
    tokenizer_type: str = "vqgan",
    vocab_size: int = 512,
    image_size: int = 112,
    width: int = 64,
    **overrides: Any,
) -> BEVTVisualTokenizerConfig:
    """A compact tokenizer with a decoder and 8x downsampling (BEVT's target grid: a 112 px tokenizer input gives the
    14x14 ids of a 224 px model input), sized by one `width`.

    - `"vqgan"`: widths `width * (1, 1, 2, 2)`, one residual block per level, attention only in the middle block,
      GroupNorm groups of 4 channels at the first level (as taming's 128 / 32), 8-d l2-normalised codes (low-dimensional cosine codebooks are used well: ViT-VQGAN, Yu et al. 2022).
    - `"dall-e"`: encoder and decoder `n_hid = width`, one block per group, decoder `n_init = width`.

    `overrides` are any other `BEVTVisualTokenizerConfig` fields.
    """
    if tokenizer_type == "vqgan":
        values: dict[str, Any] = dict(
            vqgan_channels=width,
            vqgan_channel_multipliers=(1, 1, 2, 2),
            vqgan_num_res_blocks=1,
            vqgan_attention_levels=(),
            vqgan_z_channels=2 * width,
            vqgan_embed_dim=8,
            vqgan_norm_groups=math.gcd(32, max(width // 4, 1)),  # 4 channels per group at width <= 128 (taming)
            vqgan_l2_normalize_codes=True,
        )
    elif tokenizer_type == "dall-e":
        values = dict(
            dalle_hidden_size=width,
            dalle_num_blocks_per_group=1,
            dalle_decoder_init_size=width,
            dalle_decoder_hidden_size=width,
            dalle_decoder_num_blocks_per_group=1,
        )
    else:
        raise ValueError(f"`tokenizer_type` must be 'vqgan' or 'dall-e', got {tokenizer_type!r}")
    values.update(overrides)
    return BEVTVisualTokenizerConfig(
        tokenizer_type=tokenizer_type, vocab_size=vocab_size, image_size=image_size, has_decoder=True, **values
    )


@dataclass
class TokenizerTrainingArguments:
    """Hyperparameters of the training objective (the architecture lives in `BEVTVisualTokenizerConfig`).

    VQGAN:
        reconstruction_loss: `"l1"` (default) or `"l2"`, on pixels in [0, 1].
        codebook_update: `"ema"` (default: moving averages, no codebook gradients) or `"straight-through"`
            (codebook trained by the optimizer with the codebook loss `|sg(z) - e|^2`).
        ema_decay: decay of the EMA codebook statistics (counts and sums of assigned latents).
        ema_epsilon: Laplace smoothing of the EMA counts.
        commitment_weight: beta of the commitment loss `|z - sg(e)|^2`.
        codebook_init: `"data"` (first batch's encoder outputs, default) or `"random"` (the config's init).
        dead_code_threshold: a code is dead when its EMA assignment count is below this fraction of the average
            code's count; dead codes are re-seeded from encoder outputs of the current batch.
        dead_code_restart_steps: check for dead codes every this many steps (0: never).
        perceptual_weight: weight of the VGG16 perceptual loss (0: off). Needs local weights: `perceptual_weights`
            or torchvision's cached `vgg16-397923af.pth`; without them the loss is skipped with a warning.
        perceptual_weights: path of a torchvision `vgg16` (or `vgg16().features`) state dict.
    DALL-E:
        temperature_start, temperature_end, temperature_anneal_steps: Gumbel-softmax temperature, cosine-annealed
            (DALL-E: 1 -> 1/16 over 150,000 updates).
        kl_weight, kl_warmup_steps: final beta of the KL term and its cosine ramp from 0 (DALL-E: 6.6 over 5,000).
    """

    reconstruction_loss: str = "l1"
    codebook_update: str = "ema"
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    commitment_weight: float = 0.25
    codebook_init: str = "data"
    dead_code_threshold: float = 0.1
    dead_code_restart_steps: int = 100
    perceptual_weight: float = 0.0
    perceptual_weights: str | None = None
    temperature_start: float = 1.0
    temperature_end: float = 1.0 / 16
    temperature_anneal_steps: int = 150_000
    kl_weight: float = 6.6
    kl_warmup_steps: int = 5000

    def __post_init__(self) -> None:
        choices = {
            "reconstruction_loss": RECONSTRUCTION_LOSSES,
            "codebook_update": CODEBOOK_UPDATES,
            "codebook_init": CODEBOOK_INITS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay}")
        for name in ("ema_epsilon", "temperature_start", "temperature_end"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}")
        for name in ("commitment_weight", "dead_code_threshold", "perceptual_weight", "kl_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
        for name in ("dead_code_restart_steps", "temperature_anneal_steps", "kl_warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def temperature(self, step: int) -> float:
        """Gumbel-softmax temperature at `step` (cosine from `temperature_start` to `temperature_end`)."""
        return _cosine(self.temperature_start, self.temperature_end, step, self.temperature_anneal_steps)

    def kl_weight_at(self, step: int) -> float:
        """KL weight beta at `step` (cosine from 0 to `kl_weight`)."""
        return _cosine(0.0, self.kl_weight, step, self.kl_warmup_steps)


def _cosine(start: float, end: float, step: int, steps: int) -> float:
    if steps <= 0:
        return end
    progress = min(max(step, 0) / steps, 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Losses and metrics


def logit_laplace_nll(
    mapped_pixels: torch.Tensor, location: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """Per-value negative log-likelihood of the logit-Laplace distribution (DALL-E, eq. 2).

    `f(x | mu, b) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x))` for `x` in (0, 1): the mapped pixels
    `x * (1 - 2 eps) + eps`. All tensors `(N, C, H, W)`; returns the same shape (float32).
    """
    x = mapped_pixels.float()
    scale = log_scale.float()
    return (
        (torch.logit(x) - location.float()).abs() * torch.exp(-scale)
        + scale
        + math.log(2.0)
        + torch.log(x)
        + torch.log1p(-x)
    )


def psnr(reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image, for pixels in [0, 1]: `(N, C, H, W)` twice -> `(N,)`."""
    if reconstructions.shape != targets.shape:
        raise ValueError(f"shapes differ: {tuple(reconstructions.shape)} vs {tuple(targets.shape)}")
    mse = (reconstructions.float() - targets.float()).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def codebook_usage(ids: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Codebook use of a set of token ids: `perplexity` (exp of the entropy of the id histogram: the effective
    number of codes, `vocab_size` at best), `codebook_usage` (fraction of the codes used at least once) and
    `codes_used`."""
    counts = torch.bincount(ids.flatten().long(), minlength=vocab_size).double()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
    used = int((counts > 0).sum())
    return {"perplexity": float(entropy.exp()), "codebook_usage": used / vocab_size, "codes_used": used}


@torch.no_grad()
def evaluate_reconstruction(
    tokenizer: BEVTVisualTokenizer | TokenizerTrainingModel, images: torch.Tensor, batch_size: int = 64
) -> dict[str, float]:
    """Reconstruction quality and codebook use of a tokenizer with a decoder on held-out images.

    Args:
        tokenizer: a `BEVTVisualTokenizer` with a decoder, or a `TokenizerTrainingModel`.
        images: float `(N, C, H, W)` (or `(N, T, C, H, W)`) in [0, 1].
        batch_size: images per tokenizer call.

    Returns:
        `psnr` (mean over images of `decode(get_codebook_indices(x))` vs `x`, dB), `mean_colour_psnr` (the baseline
        that replaces each image by its mean colour), `l1`, `perplexity`, `codebook_usage`, `codes_used`,
        `num_images`.
    """
    if images.ndim == 5:
        images = images.flatten(0, 1)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    scores, baselines, l1, all_ids = [], [], [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        ids = tokenizer.get_codebook_indices(batch)
        reconstruction = tokenizer.decode(ids).to(batch.device)
        mean_colour = batch.float().mean(dim=(-2, -1), keepdim=True).expand_as(batch)
        scores.append(psnr(reconstruction, batch))
        baselines.append(psnr(mean_colour, batch))
        l1.append((reconstruction - batch.float()).abs().flatten(1).mean(1))
        all_ids.append(ids.cpu())
    vocab_size = tokenizer.config.vocab_size
    return {
        "psnr": float(torch.cat(scores).mean()),
        "mean_colour_psnr": float(torch.cat(baselines).mean()),
        "l1": float(torch.cat(l1).mean()),
        **codebook_usage(torch.cat([i.flatten() for i in all_ids]), vocab_size),
        "num_images": len(images),
    }


def save_reconstruction_grid(
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    path: str | os.PathLike,
    *,
    columns: int = 8,
    scale: int | None = None,
    gap: int = 2,
) -> str:
    """Write a PNG of originals (odd rows) above their reconstructions (even rows).

    Args:
        originals, reconstructions: float `(N, 3, H, W)` in [0, 1] (same shape).
        path: output `.png` (parent folders are created).
        columns: images per row.
        scale: nearest-neighbour magnification (default: up to at least 64 px per image).
        gap: white pixels between images.

    Returns:
        The written path as `str`.
    """
    from PIL import Image

    if originals.shape != reconstructions.shape or originals.ndim != 4 or originals.shape[1] != 3:
        raise ValueError(
            "originals and reconstructions must both be (N, 3, H, W) of the same shape, got "
            f"{tuple(originals.shape)} and {tuple(reconstructions.shape)}"
        )
    n, _, h, w = originals.shape
    scale = scale or max(1, math.ceil(64 / max(h, w)))

    def to_uint8(x: torch.Tensor) -> np.ndarray:
        x = x.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
        x = x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        return x.permute(0, 2, 3, 1).numpy()

    top, bottom = to_uint8(originals), to_uint8(reconstructions)
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    cell_h, cell_w = h * scale, w * scale
    canvas = np.full((2 * rows * (cell_h + gap) - gap, cols * (cell_w + gap) - gap, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = 2 * r * (cell_h + gap), c * (cell_w + gap)
        canvas[y : y + cell_h, x : x + cell_w] = top[i]
        canvas[y + cell_h + gap : y + 2 * cell_h + gap, x : x + cell_w] = bottom[i]
    out = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    Image.fromarray(canvas).save(out, format="PNG")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Perceptual loss (VGG16 features, LPIPS-style, from local weights only)

_VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 weights, as cached by torch.hub
_VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def default_perceptual_weights() -> Path | None:
    """torchvision's cached VGG16 weights (`$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`) if present."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / _VGG16_FILE
    return path if path.is_file() else None


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on frozen VGG16 features (uniform layer weights, no learned linear heads):
    at relu1_2 ... relu5_3, unit-normalise each position's feature vector, then average the squared differences.

    `forward(x, y)`: float `(N, 3, H, W)` in [0, 1] twice -> scalar. Weights are read safely from a local torchvision
    `vgg16` or `vgg16().features` state dict (`.pth`, `.safetensors`); nothing is downloaded.
    """

    def __init__(self, weights_path: str | os.PathLike) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        from .safe_loading import load_state_dict_file

        self.features = make_layers(cfgs["D"])[: _VGG16_TAPS[-1] + 1]  # vgg16().features without the classifier
        state = load_state_dict_file(weights_path)
        if any(k.startswith("features.") for k in state):
            state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        expected = set(self.features.state_dict())
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"{weights_path}: not a torchvision VGG16 state dict (missing {missing[:4]})")
        self.features.load_state_dict({k: state[k] for k in expected})
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # frozen feature extractor

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        batch = torch.cat([inputs, targets]).float()
        hidden = (batch - self.mean) / self.std
        total = hidden.new_zeros(())
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index in _VGG16_TAPS:
                a, b = F.normalize(hidden, dim=1).chunk(2)
                total = total + (a - b).pow(2).sum(1).mean()
        return total / len(_VGG16_TAPS)


# ----------------------------------------------------------------------------------------------------------------
# The training model


@dataclass
class TokenizerTrainingOutput(ModelOutput):
    """Output of `TokenizerTrainingModel.forward`.

    Args:
        loss (`torch.FloatTensor`): the scalar training loss.
        reconstruction (`torch.FloatTensor`): `(N, C, H, W)` pixels in [0, 1] of the training path (VQGAN: the
            quantized reconstruction; DALL-E: from the relaxed ids), detached. `N` counts frames.
        ids (`torch.LongTensor`): `(N, h, w)` token ids (the argmax / nearest codes).
        metrics (`dict[str, torch.Tensor]`): detached scalars: `loss`, `reconstruction_loss` (L1 on [0, 1]
            pixels, both methods), `mse`, `psnr`, `perplexity` / `codebook_usage` of this batch's ids, and the
            method's terms (VQGAN `commitment_loss`, `codebook_loss`, `perceptual_loss`, `codes_restarted`;
            DALL-E `nll`, `kl`, `temperature`, `kl_weight`).
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    ids: torch.LongTensor | None = None
    metrics: dict[str, torch.Tensor] | None = None


class TokenizerTrainingModel(nn.Module):
    """A trainable `BEVTVisualTokenizer` (encoder + decoder + codebook) with its training losses.

    Args:
        config: the tokenizer's architecture; must have `has_decoder=True` (see `tokenizer_config_for_training`).
        args: the objective (`TokenizerTrainingArguments()` by default).
        tokenizer: start from these weights (e.g. a converted or trained tokenizer with a decoder) instead of a new
            random tokenizer; its config is used and `config` may be `None`.

    `forward(pixel_values, step)` takes frames in [0, 1], `(B, C, H, W)` or `(B, T, C, H, W)`, and returns a
    `TokenizerTrainingOutput`. `model.tokenizer` is the `BEVTVisualTokenizer` being trained; `save_pretrained` writes
    it. `get_codebook_indices`, `decode` and `reconstruct` run the frozen tokenizer's own inference path, so they give
    exactly what the saved folder gives.

    Extra state for exact resume (in `state_dict()`, not in the saved tokenizer): the EMA code counts
    `cluster_size` `(vocab,)` and sums `embed_sum` `(vocab, embed_dim)` (VQGAN), `codebook_initialized`.
    """

    def __init__(
        self,
        config: BEVTVisualTokenizerConfig | None,
        args: TokenizerTrainingArguments | None = None,
        tokenizer: BEVTVisualTokenizer | None = None,
    ) -> None:
        super().__init__()
        if tokenizer is not None:
            if config is not None and config.to_diff_dict() != tokenizer.config.to_diff_dict():
                raise ValueError("give either `config` or `tokenizer` (whose config is used), not two different ones")
            config = tokenizer.config
        if config is None:
            raise ValueError("TokenizerTrainingModel needs a `config` or a `tokenizer`")
        if not config.has_decoder:
            raise ValueError(
                "training a tokenizer needs a decoder: set `has_decoder=True` in the BEVTVisualTokenizerConfig (e.g. "
                "`tokenizer_config_for_training(...)`); an encoder-only tokenizer cannot be trained by reconstruction"
            )
        self.config = config
        self.args = args if args is not None else TokenizerTrainingArguments()
        self.tokenizer = tokenizer if tokenizer is not None else BEVTVisualTokenizer(config)
        self.tokenizer.requires_grad_(True)  # BEVTVisualTokenizer freezes itself; training unfreezes its modules
        self.is_vqgan = config.tokenizer_type == "vqgan"
        if self.is_vqgan:
            ema = self.args.codebook_update == "ema"
            self.tokenizer.quantize.embedding.weight.requires_grad_(not ema)
            vocab, dim = config.vocab_size, config.vqgan_embed_dim
            self.register_buffer("cluster_size", torch.zeros(vocab))
            self.register_buffer("embed_sum", torch.zeros(vocab, dim))
            initialized = self.args.codebook_init == "random" or tokenizer is not None
            self.register_buffer("codebook_initialized", torch.tensor(initialized))
            if initialized:
                self._reset_statistics(torch.ones(vocab))
        self._perceptual: list[PerceptualLoss] = []  # not a submodule: kept out of state_dict / checkpoints
        self.perceptual_enabled = False
        if self.is_vqgan and self.args.perceptual_weight > 0:
            self._setup_perceptual()
        self.train()

    # -------------------------------------------------------------------------------------- setup and helpers

    def _setup_perceptual(self) -> None:
        path = self.args.perceptual_weights
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"`perceptual_weights`: no such file {path}")
        path = path or default_perceptual_weights()
        if path is None:
            message = (
                f"perceptual loss skipped: no local VGG16 weights (pass `perceptual_weights=PATH` to a torchvision "
                f"vgg16 state dict, or place {_VGG16_FILE} in {Path(torch.hub.get_dir()) / 'checkpoints'}); nothing is "
                "downloaded, training uses the reconstruction loss only"
            )
            logger.warning(message)
            warnings.warn(message, stacklevel=3)
            return
        self._perceptual.append(PerceptualLoss(path))
        self.perceptual_enabled = True

    def train(self, mode: bool = True) -> TokenizerTrainingModel:
        """Sets the training flag only: the tokenizer's networks have no mode-dependent layers (no dropout or batch
        norm), and `BEVTVisualTokenizer.train()` would freeze them again."""
        self.training = mode
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (the EMA codebook is not one of them)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return self.tokenizer.device

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the trained tokenizer as a `BEVTVisualTokenizer` folder (config.json + model.safetensors)."""
        self.tokenizer.save_pretrained(save_directory, **kwargs)

    def to_tokenizer(self) -> BEVTVisualTokenizer:
        """A frozen copy of the trained tokenizer (what `from_pretrained` of the saved folder gives)."""
        return copy.deepcopy(self.tokenizer).train(False)

    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Token ids of the tokenizer's inference path (see `BEVTVisualTokenizer.get_codebook_indices`)."""
        return self.tokenizer.get_codebook_indices(pixel_values)

    def decode(self, ids: torch.Tensor) -> torch.FloatTensor:
        """Pixels of token ids (see `BEVTVisualTokenizer.decode`)."""
        return self.tokenizer.decode(ids)

    def reconstruct(self, pixel_values: torch.Tensor) -> torch.FloatTensor:
        """`decode(get_codebook_indices(x))`: the tokenizer's reconstruction, same shape as `x`."""
        return self.decode(self.get_codebook_indices(pixel_values))

    # -------------------------------------------------------------------------------------- forward

    def forward(self, pixel_values: torch.Tensor, step: int = 0) -> TokenizerTrainingOutput:
        """Loss and metrics on frames in [0, 1]: `(B, C, H, W)` or `(B, T, C, H, W)`. `step` (the optimizer step)
        drives the schedules (DALL-E temperature and KL weight) and the dead-code restarts (VQGAN)."""
        frames, _ = self.tokenizer._frames(pixel_values)
        frames = frames.float()
        if self.is_vqgan:
            output = self._vqgan_forward(frames, step)
        else:
            output = self._dalle_forward(frames, step)
        reconstruction = output.reconstruction
        with torch.no_grad():
            mse = (reconstruction - frames).pow(2).flatten(1).mean(1)
            output.metrics.update(
                loss=output.loss.detach(),
                mse=mse.mean(),
                psnr=(-10 * torch.log10(mse.clamp_min(1e-10))).mean(),
                **{k: torch.tensor(float(v)) for k, v in codebook_usage(output.ids, self.config.vocab_size).items()
                   if k != "codes_used"},
            )
        return output

    def _vqgan_forward(self, frames: torch.Tensor, step: int) -> TokenizerTrainingOutput:
        tokenizer, args = self.tokenizer, self.args
        quantizer = tokenizer.quantize
        latents = tokenizer.quant_conv(tokenizer.encoder(tokenizer._map_pixels(frames)))  # (N, D, h, w)
        z = quantizer.normalize_latents(latents)
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        restarted = 0
        if self.training:
            if not bool(self.codebook_initialized):
                self._init_codebook_from(flat)
            if args.dead_code_restart_steps and step > 0 and step % args.dead_code_restart_steps == 0:
                restarted = self._restart_dead_codes(flat)
        with torch.no_grad():
            ids = quantizer(latents).argmax(dim=1)  # (N, h, w): exactly the tokenizer's nearest-code rule
        quantized = F.embedding(ids, quantizer.codes()).permute(0, 3, 1, 2)  # (N, D, h, w)
        if self.training:
            self._update_statistics(flat, ids.flatten())
        commitment = F.mse_loss(z, quantized.detach())
        loss = args.commitment_weight * commitment
        codebook_loss = torch.zeros((), device=z.device)
        if args.codebook_update == "straight-through":
            codebook_loss = F.mse_loss(quantized, z.detach())
            loss = loss + codebook_loss
        straight_through = z + (quantized - z).detach()
        decoded = tokenizer.decoder(tokenizer.post_quant_conv(straight_through))
        low, high = self.config.vqgan_pixel_range
        reconstruction = (decoded.float() - low) / (high - low)  # [0, 1] units, unclamped for the loss
        l1 = (reconstruction - frames).abs().mean()
        reconstruction_loss = l1 if args.reconstruction_loss == "l1" else F.mse_loss(reconstruction, frames)
        loss = loss + reconstruction_loss
        perceptual = torch.zeros((), device=z.device)
        if self.perceptual_enabled:
            network = self._perceptual[0].to(frames.device)
            perceptual = network(reconstruction, frames)
            loss = loss + args.perceptual_weight * perceptual
        metrics = {
            "reconstruction_loss": l1.detach(),
            "commitment_loss": commitment.detach(),
            "codebook_loss": codebook_loss.detach(),
            "perceptual_loss": perceptual.detach(),
            "codes_restarted": torch.tensor(float(restarted)),
        }
        return TokenizerTrainingOutput(
            loss=loss, reconstruction=reconstruction.detach().clamp(0, 1), ids=ids, metrics=metrics
        )

    def _dalle_forward(self, frames: torch.Tensor, step: int) -> TokenizerTrainingOutput:
        tokenizer, args = self.tokenizer, self.args
        mapped = tokenizer._map_pixels(frames)  # (eps, 1 - eps)
        logits = tokenizer.encoder.head(tokenizer.encoder.features(mapped))  # (N, V, h, w) float32
        temperature = args.temperature(step)
        relaxed = F.gumbel_softmax(logits, tau=temperature, hard=False, dim=1) if self.training else logits.softmax(1)
        stats = tokenizer.decoder(relaxed)  # (N, 2C, H, W)
        channels = self.config.num_channels
        nll = logit_laplace_nll(mapped, stats[:, :channels], stats[:, channels:]).mean()
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.config.vocab_size))).sum(dim=1)  # (N, h, w): KL(q || uniform)
        kl_per_value = kl.sum() / mapped.numel()  # the ELB per pixel value, like the NLL
        kl_weight = args.kl_weight_at(step)
        loss = nll + kl_weight * kl_per_value
        reconstruction = tokenizer.decoder_output_to_pixels(stats.detach())
        metrics = {
            "reconstruction_loss": (reconstruction - frames).abs().mean(),
            "nll": nll.detach(),
            "kl": kl.detach().mean(),
            "temperature": torch.tensor(temperature),
            "kl_weight": torch.tensor(kl_weight),
        }
        return TokenizerTrainingOutput(loss=loss, reconstruction=reconstruction, ids=logits.detach().argmax(1),
                                       metrics=metrics)

    # -------------------------------------------------------------------------------------- codebook updates

    @torch.no_grad()
    def _reset_statistics(self, counts: torch.Tensor, codes: Sequence[int] | torch.Tensor | None = None) -> None:
        """Set the EMA counts of `codes` (all by default) and their sums to `count * current code vector`."""
        weight = self.tokenizer.quantize.embedding.weight
        index = slice(None) if codes is None else codes
        self.cluster_size[index] = counts.to(self.cluster_size)
        self.embed_sum[index] = weight[index].float() * self.cluster_size[index, None]

    def _sample_latents(self, flat: torch.Tensor, count: int) -> torch.Tensor:
        """`count` random rows of this batch's latents (with replacement if there are fewer; a little noise then
        keeps repeated rows apart), identical on every rank (rank 0's, broadcast)."""
        if count > len(flat):
            sample = flat[torch.randint(len(flat), (count,), device=flat.device)]
            sample = sample + 1e-3 * sample.std() * torch.randn_like(sample)
        else:
            sample = flat[torch.randperm(len(flat), device=flat.device)[:count]]
        return _broadcast(sample.contiguous())

    @torch.no_grad()
    def _init_codebook_from(self, flat: torch.Tensor) -> None:
        """Codebook = random encoder outputs of the first training batch (data-dependent initialisation)."""
        vocab = self.config.vocab_size
        weight = self.tokenizer.quantize.embedding.weight
        weight.copy_(self._sample_latents(flat, vocab).to(weight))
        per_code = _all_reduce_sum(torch.tensor(float(len(flat)), device=flat.device)) / vocab
        self._reset_statistics(per_code.expand(vocab))
        self.codebook_initialized.fill_(True)

    @torch.no_grad()
    def _update_statistics(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        """EMA of the assignment counts (both updates: drives the restarts) and, for `"ema"`, of the assigned
        latents' sums, all-reduced over ranks; the EMA codebook is then `sums / Laplace-smoothed counts`."""
        decay, vocab = self.args.ema_decay, self.config.vocab_size
        counts = torch.bincount(ids, minlength=vocab).to(flat.dtype)
        ema = self.args.codebook_update == "ema"
        sums = torch.zeros_like(self.embed_sum).index_add_(0, ids, flat) if ema else None
        counts = _all_reduce_sum(counts)
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        if not ema:
            return
        self.embed_sum.mul_(decay).add_(_all_reduce_sum(sums), alpha=1 - decay)
        eps, total = self.args.ema_epsilon, self.cluster_size.sum()
        smoothed = (self.cluster_size + eps) / (total + vocab * eps) * total
        weight = self.tokenizer.quantize.embedding.weight
        weight.copy_((self.embed_sum / smoothed[:, None]).to(weight))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Re-seed codes whose EMA count is below `dead_code_threshold` x the mean count with encoder outputs of
        this batch; returns how many were restarted."""
        mean = self.cluster_size.mean()
        dead = (self.cluster_size < self.args.dead_code_threshold * mean).nonzero().flatten()
        if len(dead) == 0:
            return 0
        weight = self.tokenizer.quantize.embedding.weight
        weight[dead] = self._sample_latents(flat, len(dead)).to(weight)
        self._reset_statistics(mean.expand(len(dead)), dead)
        return len(dead)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


# ----------------------------------------------------------------------------------------------------------------
# One training step


def training_step(
    model: nn.Module,
    pixel_values: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    step: int,
    *,
    lr_scheduler: Any | None = None,
    max_grad_norm: float | None = None,
    accelerator: Any | None = None,
) -> dict[str, float]:
    """One optimizer step of tokenizer training; returns the step's metrics as floats.

    Args:
        model: a `TokenizerTrainingModel` (or one wrapped by `accelerator.prepare` / DDP).
        pixel_values: frames in [0, 1], `(B, C, H, W)` or `(B, T, C, H, W)`, on the model's device.
        optimizer: over `model.trainable_parameters()`.
        step: the optimizer step about to be taken (0-based; drives schedules and restarts).
        lr_scheduler: stepped after the optimizer.
        max_grad_norm: clip the gradient norm (None: no clipping); reported as `grad_norm`.
        accelerator: an `accelerate.Accelerator` (its `backward` / `clip_grad_norm_`), else plain autograd.
    """
    model.train()
    output = model(pixel_values, step=step)
    if accelerator is not None:
        accelerator.backward(output.loss)
    else:
        output.loss.backward()
    metrics = {k: float(v) for k, v in output.metrics.items()}
    if max_grad_norm is not None:
        parameters = [p for p in model.parameters() if p.requires_grad]
        clip = accelerator.clip_grad_norm_ if accelerator is not None else torch.nn.utils.clip_grad_norm_
        metrics["grad_norm"] = float(clip(parameters, max_grad_norm))
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics
