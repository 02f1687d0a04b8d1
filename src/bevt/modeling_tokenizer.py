"""BEVTVisualTokenizer: a frozen image tokenizer whose token ids are BEVT's masked-prediction targets.

Two architectures (see `BEVTVisualTokenizerConfig`):

- DALL-E dVAE encoder: 7x7 conv -> 4 groups of residual blocks (2x max-pool after groups 1-3) -> ReLU -> 1x1 conv
  to `vocab_size` logits. 112x112 frames give 14x14 ids.
- VQGAN encoder (taming-transformers layout, PeCo family): conv_in -> levels of ResNet (+ attention) blocks with
  stride-2 downsampling -> mid blocks -> GroupNorm/swish -> conv_out -> 1x1 quant_conv -> nearest codebook entry.

Optional decoders (`config.has_decoder`), used by `decode(ids) -> pixels`:

- DALL-E dVAE decoder: 1x1 conv from the one-hot ids -> 4 groups of residual blocks (2x nearest upsampling after
  groups 1-3) -> ReLU -> 1x1 conv to the 2C logit-Laplace parameters; pixels = unmapped sigmoid of the first C.
- VQGAN decoder (taming-transformers layout): codebook entries -> 1x1 post_quant_conv -> conv_in -> mid blocks ->
  levels of ResNet (+ attention) blocks with nearest 2x upsampling + conv -> GroupNorm/swish -> conv_out.

Inputs are RGB frames in [0, 1]; the pixel mapping (DALL-E logit-Laplace `x * (1 - 2 eps) + eps`, VQGAN linear to
[-1, 1]) happens inside the model, and `decode` maps back to [0, 1]. The model is always frozen and in eval mode
(`bevt.tokenizer_training` trains the same modules).
"""

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_tokenizer import BEVTVisualTokenizerConfig

__all__ = ["BEVTVisualTokenizer", "BEVTVisualTokenizerOutput"]

_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BEVTVisualTokenizerOutput(ModelOutput):
    """Output of `BEVTVisualTokenizer.forward`.

    Args:
        logits (`torch.FloatTensor`): float32 token scores, `(batch, vocab_size, h, w)` for images or
            `(batch, frames, vocab_size, h, w)` for videos, with `h, w = H / f, W / f` (`f` =
            `config.downsample_factor`). DALL-E: the encoder's logits; VQGAN: negative squared distances to the
            codebook entries. `argmax` over the vocabulary axis gives the token ids.
    """

    logits: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# DALL-E dVAE encoder


ENCODER_KERNELS = (3, 3, 3, 1)
DECODER_KERNELS = (1, 3, 3, 3)


class BEVTDalleResidualBlock(nn.Module):
    """`shortcut(x) + post_gain * (ReLU -> conv_1 -> ReLU -> conv_2 -> ReLU -> conv_3 -> ReLU -> conv_4)(x)`.

    Kernel sizes: `(3, 3, 3, 1)` in the encoder, `(1, 3, 3, 3)` in the decoder. The bottleneck width is
    `out_channels / 4`; `post_gain = 1 / num_layers**2` with `num_layers` the number of residual blocks in the whole
    encoder (decoder). Shapes: `(N, in_channels, H, W) -> (N, out_channels, H, W)`.
    """

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, kernel_sizes: tuple[int, ...] = ENCODER_KERNELS
    ) -> None:
        super().__init__()
        hidden = out_channels // 4
        k1, k2, k3, k4 = kernel_sizes
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.conv_1 = nn.Conv2d(in_channels, hidden, k1, padding=k1 // 2)
        self.conv_2 = nn.Conv2d(hidden, hidden, k2, padding=k2 // 2)
        self.conv_3 = nn.Conv2d(hidden, hidden, k3, padding=k3 // 2)
        self.conv_4 = nn.Conv2d(hidden, out_channels, k4, padding=k4 // 2)
        self.post_gain = 1.0 / num_layers**2

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.conv_1(F.relu(hidden_states))
        residual = self.conv_2(F.relu(residual))
        residual = self.conv_3(F.relu(residual))
        residual = self.conv_4(F.relu(residual))
        return self.shortcut(hidden_states) + self.post_gain * residual


class BEVTDalleGroup(nn.Module):
    """Residual blocks at one resolution, then an optional 2x max-pool (encoder) or 2x nearest upsampling
    (decoder)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        num_layers: int,
        pool: bool = False,
        upsample: bool = False,
        kernel_sizes: tuple[int, ...] = ENCODER_KERNELS,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            BEVTDalleResidualBlock(in_channels if i == 0 else out_channels, out_channels, num_layers, kernel_sizes)
            for i in range(num_blocks)
        )
        if pool:
            self.pool = nn.MaxPool2d(kernel_size=2)
        elif upsample:
            self.pool = nn.Upsample(scale_factor=2, mode="nearest")
        else:
            self.pool = nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.pool(hidden_states)


class BEVTDalleEncoder(nn.Module):
    """DALL-E dVAE encoder: `(N, C, H, W)` mapped pixels -> `(N, vocab_size, H/8, W/8)` logits.

    `features` runs everything up to the output layer (autocast-friendly); `head` is ReLU + 1x1 conv.
    """

    num_groups = 4

    def __init__(self, config: BEVTVisualTokenizerConfig) -> None:
        super().__init__()
        width = config.dalle_hidden_size
        num_blocks = config.dalle_num_blocks_per_group
        num_layers = self.num_groups * num_blocks
        self.input_conv = nn.Conv2d(config.num_channels, width, 7, padding=3)
        widths = [width * 2**i for i in range(self.num_groups)]  # 1, 2, 4, 8 x n_hid
        self.groups = nn.ModuleList(
            BEVTDalleGroup(
                widths[max(i - 1, 0)], widths[i], num_blocks, num_layers, pool=i < self.num_groups - 1
            )
            for i in range(self.num_groups)
        )
        self.output_conv = nn.Conv2d(widths[-1], config.vocab_size, 1)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.input_conv(pixel_values)
        for group in self.groups:
            hidden_states = group(hidden_states)
        return hidden_states

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """float32 ReLU + 1x1 conv, whatever the weights' dtype: `(N, 8 * n_hid, h, w) -> (N, vocab, h, w)`."""
        conv = self.output_conv
        return F.conv2d(F.relu(features.float()), conv.weight.float(), conv.bias.float())


class BEVTDalleDecoder(nn.Module):
    """DALL-E dVAE decoder: `(N, vocab_size, h, w)` one-hot ids or token probabilities -> `(N, 2 * C, 8h, 8w)`
    logit-Laplace parameters (the first C channels: location of the logit of the mapped pixels; the last C: log
    scale).

    `embed(ids)` is `input_conv` applied to the one-hot of `ids` `(N, h, w)`, computed as a column lookup;
    `trunk` runs the residual groups (autocast-friendly); `head` is ReLU + 1x1 conv in float32.
    """

    num_groups = 4

    def __init__(self, config: BEVTVisualTokenizerConfig) -> None:
        super().__init__()
        width = config.dalle_decoder_hidden_size
        num_blocks = config.dalle_decoder_num_blocks_per_group
        num_layers = self.num_groups * num_blocks
        self.input_conv = nn.Conv2d(config.vocab_size, config.dalle_decoder_init_size, 1)
        widths = [width * 2 ** (self.num_groups - 1 - i) for i in range(self.num_groups)]  # 8, 4, 2, 1 x n_hid
        in_widths = [config.dalle_decoder_init_size, *widths[:-1]]
        self.groups = nn.ModuleList(
            BEVTDalleGroup(
                in_widths[i], widths[i], num_blocks, num_layers, upsample=i < self.num_groups - 1,
                kernel_sizes=DECODER_KERNELS,
            )
            for i in range(self.num_groups)
        )
        self.output_conv = nn.Conv2d(widths[-1], 2 * config.num_channels, 1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """`input_conv(one_hot(ids))` without the one-hot: `(N, h, w)` int64 -> float32 `(N, n_init, h, w)`."""
        weight = self.input_conv.weight.float()[:, :, 0, 0]  # (n_init, vocab)
        return (F.embedding(ids, weight.t()) + self.input_conv.bias.float()).permute(0, 3, 1, 2)

    def trunk(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for group in self.groups:
            hidden_states = group(hidden_states)
        return hidden_states

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """float32 ReLU + 1x1 conv: `(N, n_hid, H, W) -> (N, 2 * C, H, W)`."""
        conv = self.output_conv
        return F.conv2d(F.relu(features.float()), conv.weight.float(), conv.bias.float())

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        """`(N, vocab_size, h, w)` -> `(N, 2 * C, 8h, 8w)` (differentiable: used for training with relaxed ids)."""
        return self.head(self.trunk(self.input_conv(probabilities)))


# ----------------------------------------------------------------------------------------------------------------
# VQGAN encoder and decoder (taming-transformers layout) + nearest-codebook quantizer


def _swish(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states * torch.sigmoid(hidden_states)


class BEVTVQGANResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> conv3x3, plus a (1x1 `nin_shortcut`) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(_swish(self.norm1(hidden_states)))
        residual = self.conv2(_swish(self.norm2(residual)))
        if self.nin_shortcut is not None:
            hidden_states = self.nin_shortcut(hidden_states)
        return hidden_states + residual


class BEVTVQGANAttention(nn.Module):
    """Single-head self-attention over all `h * w` positions, with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = hidden_states.shape
        normed = self.norm(hidden_states)

        def tokens(proj: nn.Conv2d) -> torch.Tensor:  # (N, C, h, w) -> (N, 1, h*w, C)
            return proj(normed).flatten(2).transpose(1, 2).unsqueeze(1)

        attended = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        attended = attended.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return hidden_states + self.proj_out(attended)


class BEVTVQGANDownsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one: `(N, C, H, W) -> (N, C, H/2, W/2)`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(hidden_states, (0, 1, 0, 1)))


class BEVTVQGANLevel(nn.Module):
    """One resolution level: `block[i]` (each followed by `attn[i]` when the level has attention), `downsample`."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, downsample: bool, groups: int
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            BEVTVQGANResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(
            BEVTVQGANAttention(out_channels, groups) for _ in range(num_blocks if attention else 0)
        )
        self.downsample = BEVTVQGANDownsample(out_channels) if downsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            hidden_states = block(hidden_states)
            if len(self.attn):
                hidden_states = self.attn[i](hidden_states)
        if self.downsample is not None:
            hidden_states = self.downsample(hidden_states)
        return hidden_states


class BEVTVQGANMiddle(nn.Module):
    """ResNet block -> attention -> ResNet block at the lowest resolution."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = BEVTVQGANResnetBlock(channels, channels, groups)
        self.attn_1 = BEVTVQGANAttention(channels, groups)
        self.block_2 = BEVTVQGANResnetBlock(channels, channels, groups)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(hidden_states)))


class BEVTVQGANEncoder(nn.Module):
    """VQGAN encoder: `(N, C, H, W)` pixels in `vqgan_pixel_range` -> `(N, z_channels, H/f, W/f)`."""

    def __init__(self, config: BEVTVisualTokenizerConfig) -> None:
        super().__init__()
        base, groups = config.vqgan_channels, config.vqgan_norm_groups
        mults = config.vqgan_channel_multipliers
        self.conv_in = nn.Conv2d(config.num_channels, base, 3, padding=1)
        in_mults = (1, *mults[:-1])
        self.down = nn.ModuleList(
            BEVTVQGANLevel(
                base * in_mults[i],
                base * mults[i],
                config.vqgan_num_res_blocks,
                attention=i in config.vqgan_attention_levels,
                downsample=i < len(mults) - 1,
                groups=groups,
            )
            for i in range(len(mults))
        )
        width = base * mults[-1]
        self.mid = BEVTVQGANMiddle(width, groups)
        self.norm_out = nn.GroupNorm(groups, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, config.vqgan_z_channels, 3, padding=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(pixel_values)
        for level in self.down:
            hidden_states = level(hidden_states)
        hidden_states = self.mid(hidden_states)
        return self.conv_out(_swish(self.norm_out(hidden_states)))


class BEVTVQGANUpsample(nn.Module):
    """2x nearest upsampling then a 3x3 conv: `(N, C, H, W) -> (N, C, 2H, 2W)`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class BEVTVQGANUpLevel(nn.Module):
    """One decoder level: `block[i]` (each followed by `attn[i]` when the level has attention), `upsample`."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, upsample: bool, groups: int
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            BEVTVQGANResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(
            BEVTVQGANAttention(out_channels, groups) for _ in range(num_blocks if attention else 0)
        )
        self.upsample = BEVTVQGANUpsample(out_channels) if upsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            hidden_states = block(hidden_states)
            if len(self.attn):
                hidden_states = self.attn[i](hidden_states)
        if self.upsample is not None:
            hidden_states = self.upsample(hidden_states)
        return hidden_states


class BEVTVQGANDecoder(nn.Module):
    """VQGAN decoder, the encoder's mirror: `(N, z_channels, h, w) -> (N, C, H, W)` pixels in `vqgan_pixel_range`
    (not clamped).

    `up[i]` is level `i` (taming's order; run from the last level to the first) with `num_res_blocks + 1` blocks of
    width `channels * channel_multipliers[i]`; every level but the first ends with a 2x upsampling.
    """

    def __init__(self, config: BEVTVisualTokenizerConfig) -> None:
        super().__init__()
        base, groups = config.vqgan_channels, config.vqgan_norm_groups
        mults = config.vqgan_channel_multipliers
        width = base * mults[-1]
        self.conv_in = nn.Conv2d(config.vqgan_z_channels, width, 3, padding=1)
        self.mid = BEVTVQGANMiddle(width, groups)
        in_mults = (*mults[1:], mults[-1])  # level i takes the output of level i + 1 (the top one: conv_in's)
        self.up = nn.ModuleList(
            BEVTVQGANUpLevel(
                base * in_mults[i],
                base * mults[i],
                config.vqgan_num_res_blocks + 1,
                attention=i in config.vqgan_attention_levels,
                upsample=i > 0,
                groups=groups,
            )
            for i in range(len(mults))
        )
        self.norm_out = nn.GroupNorm(groups, base * mults[0], eps=1e-6)
        self.conv_out = nn.Conv2d(base * mults[0], config.num_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        hidden_states = self.mid(self.conv_in(latents))
        for level in reversed(self.up):
            hidden_states = level(hidden_states)
        return self.conv_out(_swish(self.norm_out(hidden_states)))


class BEVTVectorQuantizer(nn.Module):
    """Nearest-neighbour codebook (`embedding.weight`: `(vocab_size, embed_dim)`).

    `forward` returns float32 negative squared Euclidean distances `-(|z|^2 - 2 z.e + |e|^2)`:
    `(N, embed_dim, h, w) -> (N, vocab_size, h, w)`; their argmax is the nearest entry (ties: lowest index).
    With `l2_normalize`, latents and entries are l2-normalised first (`codes()` returns the normalised entries).
    """

    def __init__(self, vocab_size: int, embed_dim: int, l2_normalize: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.l2_normalize = l2_normalize

    def codes(self) -> torch.Tensor:
        """The float32 code vectors the ids stand for: `(vocab_size, embed_dim)`."""
        codebook = self.embedding.weight.float()
        return F.normalize(codebook, dim=-1) if self.l2_normalize else codebook

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """float32 latents `(N, embed_dim, h, w)`, l2-normalised over `embed_dim` when the codes are."""
        latents = latents.float()
        return F.normalize(latents, dim=1) if self.l2_normalize else latents

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        codebook = self.codes()
        flat = self.normalize_latents(latents).permute(0, 2, 3, 1)  # (N, h, w, D)
        distances = (
            flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(-1)
        )  # (N, h, w, V)
        return distances.neg().permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------------------------
# The model


class BEVTVisualTokenizer(PreTrainedModel):
    """Frozen visual tokenizer: RGB frames in [0, 1] -> discrete token ids (BEVT's pretraining targets).

    Input `pixel_values`: float images `(B, C, H, W)` or videos `(B, T, C, H, W)` with values in [0, 1] (the
    pixel mapping - DALL-E logit-Laplace `x * (1 - 2 * eps) + eps`, eps = `config.logit_laplace_eps` = 0.1, or VQGAN
    `[0, 1] -> vqgan_pixel_range` - is applied inside). `H` and `W` must be multiples of
    `config.downsample_factor` (8 for DALL-E: 112x112 -> 14x14 tokens). All frames of all clips go through the
    network in one batched call.

    With a decoder (`config.has_decoder`), `decode(ids)` turns token ids back into pixels in [0, 1]:
    `(B, h, w) -> (B, C, f*h, f*w)`, `(B, T, h, w) -> (B, T, C, f*h, f*w)`; `decode(get_codebook_indices(x))` is
    the tokenizer's reconstruction of `x`.

    The model is frozen: every parameter has `requires_grad=False`, `train()` keeps it in eval mode, and inference
    runs under `torch.no_grad()`. On CUDA the convolutional trunks run under autocast (`config.autocast_dtype`,
    bfloat16 by default) in channels_last memory format; the last encoder layer (DALL-E output conv, VQGAN
    quantizer) and the first and last decoder layers always run in float32. On other devices everything runs in
    float32.
    """

    config_class = BEVTVisualTokenizerConfig
    config: BEVTVisualTokenizerConfig
    base_model_prefix = "tokenizer"
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")
    supports_gradient_checkpointing = False
    _no_split_modules = ["BEVTDalleEncoder", "BEVTVQGANEncoder", "BEVTDalleDecoder", "BEVTVQGANDecoder"]

    def __init__(self, config: BEVTVisualTokenizerConfig) -> None:
        super().__init__(config)
        if config.tokenizer_type == "dall-e":
            self.encoder = BEVTDalleEncoder(config)
            if config.has_decoder:
                self.decoder = BEVTDalleDecoder(config)
        else:
            self.encoder = BEVTVQGANEncoder(config)
            self.quant_conv = nn.Conv2d(config.vqgan_z_channels, config.vqgan_embed_dim, 1)
            self.quantize = BEVTVectorQuantizer(
                config.vocab_size, config.vqgan_embed_dim, l2_normalize=config.vqgan_l2_normalize_codes
            )
            if config.has_decoder:
                self.post_quant_conv = nn.Conv2d(config.vqgan_embed_dim, config.vqgan_z_channels, 1)
                self.decoder = BEVTVQGANDecoder(config)
        self.post_init()
        self.train(False)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            if self.config.tokenizer_type == "dall-e":  # DALL-E: N(0, 1 / fan_in), zero bias
                init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(fan_in))
                init.zeros_(module.bias)
            else:  # torch's default Conv2d initialisation
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                init.uniform_(module.bias, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):  # VQGAN codebook: U(-1/V, 1/V)
            init.uniform_(module.weight, -1.0 / module.num_embeddings, 1.0 / module.num_embeddings)

    def train(self, mode: bool = True) -> "BEVTVisualTokenizer":
        """The tokenizer is frozen: always stays in eval mode with `requires_grad=False` (`mode` is ignored)."""
        super().train(False)
        self.requires_grad_(False)
        return self

    @torch.no_grad()
    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool | None = None
    ) -> BEVTVisualTokenizerOutput | tuple[torch.Tensor]:
        """Token logits: `(B, C, H, W) -> (B, vocab, h, w)` or `(B, T, C, H, W) -> (B, T, vocab, h, w)` (float32)."""
        frames, leading = self._frames(pixel_values)
        logits = self._logits(frames).unflatten(0, leading)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return (logits,)
        return BEVTVisualTokenizerOutput(logits=logits)

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Token ids (int64): images `(B, C, H, W) -> (B, h, w)`, videos `(B, T, C, H, W) -> (B, T, h, w)`.

        `pixel_values` are RGB in [0, 1] (the model maps them itself): anything outside, such as ImageNet-normalised
        or 0-255 pixels, is refused (one min / max per call) instead of giving wrong targets.
        """
        frames, leading = self._frames(pixel_values)
        if frames.numel():
            low, high = (float(v) for v in torch.aminmax(frames.detach()))
            if not (0.0 <= low and high <= 1.0):  # also catches NaN
                hint = ""
                if low < 0.0:
                    hint = " (normalised pixels? pass the un-normalised [0, 1] frames)"
                elif high > 1.0:
                    hint = " (0-255 pixels? divide by 255)"
                raise ValueError(
                    f"get_codebook_indices expects pixels in [0, 1], got values in [{low:.4g}, {high:.4g}]{hint}"
                )
        return self._logits(frames).argmax(dim=1).unflatten(0, leading)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.FloatTensor:
        """Pixels in [0, 1] (float32) of token ids: `(B, h, w) -> (B, C, f*h, f*w)` or
        `(B, T, h, w) -> (B, T, C, f*h, f*w)`, with `f = config.downsample_factor`.

        Raises:
            ValueError: the tokenizer has no decoder, or `ids` is not an integer tensor of rank 3 or 4 with values
                in `[0, vocab_size)`.
        """
        if not self.config.has_decoder:
            raise ValueError(
                f"this {self.config.tokenizer_type} tokenizer has no decoder (config.has_decoder=False: an encoder-only "
                "conversion or a folder saved before decoders existed), so it cannot decode token ids. Convert the "
                "decoder too (`python -m bevt.convert --format dalle-encoder --checkpoint encoder.pkl --decoder "
                "decoder.pkl ...`) or train a tokenizer with `bevt.tokenizer_training`."
            )
        flat, leading = self._ids(ids)
        return self._decode_ids(flat).unflatten(0, leading)

    def decoder_output_to_pixels(self, output: torch.Tensor) -> torch.Tensor:
        """Decoder output -> float32 pixels in [0, 1]: DALL-E `(N, 2C, H, W)` logit-Laplace parameters ->
        `clamp((sigmoid(mu) - eps) / (1 - 2 eps), 0, 1)`; VQGAN `(N, C, H, W)` in `vqgan_pixel_range` -> [0, 1]."""
        output = output.float()
        if self.config.tokenizer_type == "dall-e":
            eps = self.config.logit_laplace_eps
            mapped = torch.sigmoid(output[:, : self.config.num_channels])
            return ((mapped - eps) / (1 - 2 * eps)).clamp(0, 1)
        low, high = self.config.vqgan_pixel_range
        return ((output - low) / (high - low)).clamp(0, 1)

    def _ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Validate token ids and flatten videos: `(N, h, w)` int64, leading dims."""
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"ids must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor of token ids, got dtype {ids.dtype}")
        if ids.ndim not in (3, 4) or 0 in ids.shape[-2:]:
            raise ValueError(
                "ids must be (B, h, w) for images or (B, T, h, w) for videos with h, w > 0; "
                f"got shape {tuple(ids.shape)}"
            )
        vocab = self.config.vocab_size
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab:
                raise ValueError(
                    f"token ids must lie in [0, {vocab}) (vocab_size of this tokenizer); got values from {low} to "
                    f"{high}"
                )
        leading = tuple(ids.shape[:-2])
        return ids.reshape(-1, *ids.shape[-2:]).long(), leading

    def _trunk_dtype(self, device_type: str) -> torch.dtype | None:
        """The autocast dtype of the convolutional trunks on this device (`None`: float32)."""
        if device_type != "cuda":
            return None
        self._ensure_channels_last()
        return _AUTOCAST_DTYPES.get(self.config.autocast_dtype or "")

    def _decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """`(N, h, w)` int64 ids -> float32 `(N, C, f*h, f*w)` pixels in [0, 1]."""
        device_type = ids.device.type
        trunk_dtype = self._trunk_dtype(device_type)
        with self._autocast(device_type, None):
            if self.config.tokenizer_type == "dall-e":
                hidden_states = self.decoder.embed(ids)
            else:
                codes = F.embedding(ids, self.quantize.codes()).permute(0, 3, 1, 2)  # (N, D, h, w)
                conv = self.post_quant_conv
                hidden_states = F.conv2d(codes, conv.weight.float(), conv.bias.float())
        if trunk_dtype is None:
            hidden_states = hidden_states.to(self.dtype)
        with self._autocast(device_type, trunk_dtype):
            if self.config.tokenizer_type == "dall-e":
                features = self.decoder.trunk(hidden_states)
            else:
                output = self.decoder(hidden_states)
        with self._autocast(device_type, None):
            if self.config.tokenizer_type == "dall-e":
                output = self.decoder.head(features)
            return self.decoder_output_to_pixels(output)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):  # noqa: D102 - Transformers' doc
        _check_saved_model_type(pretrained_model_name_or_path)
        _check_saved_vocab_size(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _frames(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Validate the input and flatten videos to one batch of frames: `(N, C, H, W)`, leading dims."""
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.ndim not in (4, 5):
            raise ValueError(
                "pixel_values must be images (B, C, H, W) or videos (B, T, C, H, W); "
                f"got a rank-{pixel_values.ndim} tensor of shape {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating-point tensor with values in [0, 1], got dtype {pixel_values.dtype}"
                " (for uint8 frames use `frames.float() / 255`)"
            )
        channels, height, width = pixel_values.shape[-3:]
        if channels != self.config.num_channels:
            layout = "(B, T, C, H, W)" if pixel_values.ndim == 5 else "(B, C, H, W)"
            raise ValueError(
                f"pixel_values must have {self.config.num_channels} channels in layout {layout}, "
                f"got shape {tuple(pixel_values.shape)}"
            )
        factor = self.config.downsample_factor
        if height % factor or width % factor or height == 0 or width == 0:
            raise ValueError(
                f"pixel_values spatial size must be a positive multiple of {factor}, got {height}x{width}"
            )
        leading = tuple(pixel_values.shape[:-3])
        return pixel_values.reshape(-1, channels, height, width), leading

    def _map_pixels(self, frames: torch.Tensor) -> torch.Tensor:
        frames = frames.float()
        if self.config.tokenizer_type == "dall-e":
            eps = self.config.logit_laplace_eps
            return (1 - 2 * eps) * frames + eps
        low, high = self.config.vqgan_pixel_range
        return frames * (high - low) + low

    def _autocast(self, device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
        """Autocast to `dtype`, or disable any autocast the caller runs under (`dtype=None`)."""
        if device_type not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        if dtype is None:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=dtype)

    def _logits(self, frames: torch.Tensor) -> torch.Tensor:
        """`(N, C, H, W)` pixels in [0, 1] -> float32 `(N, vocab, h, w)` logits."""
        pixels = self._map_pixels(frames)
        device_type = pixels.device.type
        trunk_dtype = None
        if device_type == "cuda":
            trunk_dtype = _AUTOCAST_DTYPES.get(self.config.autocast_dtype or "")
            self._ensure_channels_last()
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if trunk_dtype is None:
            pixels = pixels.to(self.dtype)  # weights may be stored in reduced precision
        with self._autocast(device_type, trunk_dtype):
            if self.config.tokenizer_type == "dall-e":
                features = self.encoder.features(pixels)
            else:
                features = self.encoder(pixels)
        with self._autocast(device_type, None):
            if self.config.tokenizer_type == "dall-e":
                return self.encoder.head(features)
            conv = self.quant_conv
            latents = F.conv2d(features.float(), conv.weight.float(), conv.bias.float())
            return self.quantize(latents)

    def _ensure_channels_last(self) -> None:
        if not getattr(self, "_is_channels_last", False):
            self.to(memory_format=torch.channels_last)
            self._is_channels_last = True


# Tensors whose size along one axis is the number of token ids, with that axis.
_VOCAB_TENSORS = {"quantize.embedding.weight": 0, "encoder.output_conv.weight": 0, "decoder.input_conv.weight": 1}


def _check_saved_model_type(path: str | os.PathLike) -> None:
    """A local folder of another model type (e.g. a BEVT classifier) is refused by name: Transformers would only
    warn, and build a tokenizer whose weights are all newly initialised (random targets). A path that cannot be a
    Hub repo id (absolute, `./`, more than one `/`) must exist."""
    if not Path(path).exists():
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(str(path))
        except HFValidationError:
            raise ValueError(f"{path}: no such folder (and not a Hub repo id)") from None
        return
    try:
        found = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # not a local folder, or Transformers reports the broken config itself
    if found != BEVTVisualTokenizerConfig.model_type:
        raise ValueError(
            f"{path} holds a model of type {found!r}, not a BEVT visual tokenizer (model_type "
            f"{BEVTVisualTokenizerConfig.model_type!r}): loading it would give a tokenizer with every weight newly "
            "initialised. Pass a tokenizer folder (`python -m bevt.convert --format dalle-encoder ...`)"
        )


def _check_saved_vocab_size(path: str | os.PathLike, kwargs: dict) -> None:
    """A local folder whose codebook size differs from the `vocab_size` it is loaded with is refused by name.

    (Transformers would raise a size-mismatch report, or with `ignore_mismatched_sizes=True` silently replace the
    codebook by random entries: a tokenizer whose ids mean nothing.)
    """
    folder = Path(path)
    weights = folder / "model.safetensors"
    if not folder.is_dir() or not weights.is_file():
        return
    config = kwargs.get("config")
    if isinstance(config, BEVTVisualTokenizerConfig):
        vocab_size = config.vocab_size
    else:
        try:
            vocab_size = json.loads((folder / "config.json").read_text()).get("vocab_size")
        except (OSError, ValueError):
            return  # Transformers reports a missing / broken config itself
        vocab_size = kwargs.get("vocab_size", vocab_size)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as stored:
            shapes = {k: stored.get_slice(k).get_shape() for k in _VOCAB_TENSORS if k in stored.keys()}
    except (SafetensorError, OSError):
        return
    for key, shape in shapes.items():
        size = shape[_VOCAB_TENSORS[key]] if len(shape) > _VOCAB_TENSORS[key] else None
        if size != vocab_size:
            raise ValueError(
                f"{folder}: the saved tokenizer has {size} token ids ({key} in model.safetensors has shape "
                f"{tuple(shape)}), but it is being loaded with vocab_size={vocab_size}; a tokenizer's vocab_size must "
                "equal its codebook size"
            )
