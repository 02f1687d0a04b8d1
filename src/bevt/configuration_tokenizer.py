"""Configuration of the frozen visual tokenizer that produces BEVT's pretraining targets."""

from transformers import PreTrainedConfig

TOKENIZER_TYPES = ("dall-e", "vqgan")
AUTOCAST_DTYPES = ("bfloat16", "float16", "float32")


class BEVTVisualTokenizerConfig(PreTrainedConfig):
    r"""Configuration of [`BEVTVisualTokenizer`], a frozen image tokenizer mapping pixels to discrete token ids.

    Two families are supported, selected by `tokenizer_type`:

    - `"dall-e"`: the encoder of OpenAI's DALL-E dVAE (what BEVT uses). A 7x7 input convolution, 4 groups of
      `dalle_num_blocks_per_group` residual blocks with 2x max-pooling between groups (8x downsampling), widths
      `dalle_hidden_size * (1, 2, 4, 8)`, and a 1x1 output convolution to `vocab_size` logits. Input pixels in
      [0, 1] are mapped inside the model with the logit-Laplace epsilon: `x * (1 - 2 * eps) + eps`.
    - `"vqgan"`: a VQGAN (taming-transformers) convolutional encoder followed by a 1x1 `quant_conv` and a
      nearest-neighbour codebook of `vocab_size` entries (the PeCo family). Input pixels in [0, 1] are mapped
      linearly to `vqgan_pixel_range` (default [-1, 1]) inside the model.

    With `has_decoder=True` the tokenizer also has a decoder (`BEVTVisualTokenizer.decode(ids) -> pixels`):

    - DALL-E: the dVAE decoder (a 1x1 conv from the `vocab_size` one-hot / probabilities to
      `dalle_decoder_init_size` channels, 4 groups of `dalle_decoder_num_blocks_per_group` residual blocks of widths
      `dalle_decoder_hidden_size * (8, 4, 2, 1)` with 2x nearest upsampling after groups 1-3, ReLU, a 1x1 conv to the
      `2 * num_channels` logit-Laplace parameters; pixels = unmapped sigmoid of the first `num_channels`).
    - VQGAN: `post_quant_conv` and the taming-transformers decoder, the mirror of the encoder (same widths, levels,
      residual blocks + 1 per level, attention levels), with nearest 2x upsampling + conv between levels.

    Folders saved before decoders existed have no `has_decoder` field and load as encoder-only tokenizers.

    Args:
        tokenizer_type (`str`, defaults to `"dall-e"`): `"dall-e"` or `"vqgan"`.
        num_channels (`int`, defaults to 3): input channels.
        vocab_size (`int`, defaults to 8192): number of token ids (DALL-E logits / VQGAN codebook entries).
        image_size (`int`, defaults to 112): the input size the data pipeline should produce (BEVT feeds 112x112
            frames, giving 14x14 tokens). Any size that is a multiple of the downsampling factor is accepted.
        dalle_hidden_size (`int`, defaults to 256): DALL-E `n_hid`, width of the first group
            (a multiple of 4).
        dalle_num_blocks_per_group (`int`, defaults to 2): DALL-E `n_blk_per_group`.
        logit_laplace_eps (`float`, defaults to 0.1): DALL-E pixel-mapping epsilon, in [0, 0.5).
        vqgan_channels (`int`, defaults to 128): VQGAN base width `ch`.
        vqgan_channel_multipliers (`tuple[int, ...]`, defaults to `(1, 1, 2, 2, 4)`): VQGAN `ch_mult`; one entry
            per resolution level, 2x downsampling between levels.
        vqgan_num_res_blocks (`int`, defaults to 2): residual blocks per level.
        vqgan_attention_levels (`tuple[int, ...]`, defaults to `(4,)`): indices of the levels whose residual blocks
            are each followed by a self-attention block (taming's `attn_resolutions=[16]` at resolution 256 with 5
            levels is level 4).
        vqgan_z_channels (`int`, defaults to 256): output channels of the encoder's `conv_out`.
        vqgan_embed_dim (`int`, defaults to 256): codebook vector size (output of `quant_conv`).
        vqgan_norm_groups (`int`, defaults to 32): GroupNorm groups (taming uses 32).
        vqgan_pixel_range (`tuple[float, float]`, defaults to `(-1.0, 1.0)`): range [0, 1] pixels are mapped to.
        vqgan_l2_normalize_codes (`bool`, defaults to `False`): l2-normalise the latents and the codebook entries
            before the nearest-neighbour search (cosine-similarity codes, as in ViT-VQGAN / improved VQGAN).
        has_decoder (`bool`, defaults to `False`): build the decoder (see above) next to the encoder.
        dalle_decoder_init_size (`int`, defaults to 128): DALL-E decoder `n_init`, output width of its input conv.
        dalle_decoder_hidden_size (`int`, *optional*): DALL-E decoder `n_hid` (a multiple of 4); default: the
            encoder's `dalle_hidden_size`.
        dalle_decoder_num_blocks_per_group (`int`, *optional*): DALL-E decoder `n_blk_per_group`; default: the
            encoder's `dalle_num_blocks_per_group`.
        autocast_dtype (`str` or `None`, defaults to `"bfloat16"`): autocast dtype of the convolutional trunk on
            CUDA (`"bfloat16"`, `"float16"`, or `"float32"`/`None` to disable). The last layer (DALL-E output conv,
            VQGAN quantizer) always runs in float32. Ignored on CPU, where everything runs in float32.
    """

    model_type = "bevt_visual_tokenizer"

    tokenizer_type: str = "dall-e"
    num_channels: int = 3
    vocab_size: int = 8192
    image_size: int = 112
    dalle_hidden_size: int = 256
    dalle_num_blocks_per_group: int = 2
    logit_laplace_eps: float = 0.1
    vqgan_channels: int = 128
    vqgan_channel_multipliers: tuple[int, ...] | list[int] = (1, 1, 2, 2, 4)
    vqgan_num_res_blocks: int = 2
    vqgan_attention_levels: tuple[int, ...] | list[int] = (4,)
    vqgan_z_channels: int = 256
    vqgan_embed_dim: int = 256
    vqgan_norm_groups: int = 32
    vqgan_pixel_range: tuple[float, float] | list[float] = (-1.0, 1.0)
    vqgan_l2_normalize_codes: bool = False
    has_decoder: bool = False
    dalle_decoder_init_size: int = 128
    dalle_decoder_hidden_size: int | None = None
    dalle_decoder_num_blocks_per_group: int | None = None
    autocast_dtype: str | None = "bfloat16"

    def __post_init__(self, **kwargs):
        # JSON round trips turn tuples into lists: normalise back.
        self.vqgan_channel_multipliers = tuple(self.vqgan_channel_multipliers)
        self.vqgan_attention_levels = tuple(self.vqgan_attention_levels)
        self.vqgan_pixel_range = tuple(float(v) for v in self.vqgan_pixel_range)
        if self.dalle_decoder_hidden_size is None:
            self.dalle_decoder_hidden_size = self.dalle_hidden_size
        if self.dalle_decoder_num_blocks_per_group is None:
            self.dalle_decoder_num_blocks_per_group = self.dalle_num_blocks_per_group
        self._check_values()
        super().__post_init__(**kwargs)

    @property
    def downsample_factor(self) -> int:
        """Input pixels per token along each spatial axis (8 for DALL-E, `2 ** (levels - 1)` for VQGAN)."""
        if self.tokenizer_type == "dall-e":
            return 8
        return 2 ** (len(self.vqgan_channel_multipliers) - 1)

    def _check_values(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")

        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(f"`tokenizer_type` must be one of {TOKENIZER_TYPES}, got {self.tokenizer_type!r}")
        for name in ("num_channels", "vocab_size", "image_size", "dalle_hidden_size", "dalle_num_blocks_per_group",
                     "vqgan_channels", "vqgan_num_res_blocks", "vqgan_z_channels", "vqgan_embed_dim",
                     "vqgan_norm_groups", "dalle_decoder_init_size", "dalle_decoder_hidden_size",
                     "dalle_decoder_num_blocks_per_group"):
            positive(name)
        for name in ("dalle_hidden_size", "dalle_decoder_hidden_size"):
            if getattr(self, name) % 4:
                raise ValueError(f"`{name}` must be a multiple of 4, got {getattr(self, name)}")
        for name in ("has_decoder", "vqgan_l2_normalize_codes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        if self.vocab_size < 2:
            raise ValueError(f"`vocab_size` must be at least 2, got {self.vocab_size}")
        if not 0.0 <= self.logit_laplace_eps < 0.5:
            raise ValueError(f"`logit_laplace_eps` must be in [0, 0.5), got {self.logit_laplace_eps}")
        mults = self.vqgan_channel_multipliers
        if not mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mults):
            raise ValueError(f"`vqgan_channel_multipliers` must be a non-empty tuple of positive ints, got {mults}")
        levels = self.vqgan_attention_levels
        if any(not isinstance(i, int) or not 0 <= i < len(mults) for i in levels):
            raise ValueError(
                f"`vqgan_attention_levels` must hold level indices in [0, {len(mults)}), got {levels}"
            )
        widths = {self.vqgan_channels * m for m in mults} | {self.vqgan_channels}
        if any(w % self.vqgan_norm_groups for w in widths):
            raise ValueError(
                f"`vqgan_norm_groups` ({self.vqgan_norm_groups}) must divide every VQGAN width {sorted(widths)}"
            )
        pixel_range = self.vqgan_pixel_range
        if len(pixel_range) != 2 or not pixel_range[0] < pixel_range[1]:
            raise ValueError(f"`vqgan_pixel_range` must be (low, high) with low < high, got {pixel_range}")
        if self.autocast_dtype not in (*AUTOCAST_DTYPES, None):
            raise ValueError(f"`autocast_dtype` must be one of {AUTOCAST_DTYPES} or None, got {self.autocast_dtype!r}")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a multiple of the downsampling factor "
                f"{self.downsample_factor}"
            )


__all__ = ["BEVTVisualTokenizerConfig"]
