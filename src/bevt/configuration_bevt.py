"""BEVT configuration: the Video Swin Transformer backbone shared by the image and video streams."""

from typing import Any

from transformers import PreTrainedConfig

# Video Swin T/S/B/L (Liu et al., "Video Swin Transformer"), as used by BEVT, plus a tiny preset for tests/demos.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
    "small": {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)},
    "base": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
    "large": {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)},
    # Small enough for CPU unit tests: 64x64 inputs, 8 frames, window 4x2x2 (stage 4 of a 64px input is 2x2).
    "test": {
        "embed_dim": 16,
        "depths": (1, 1, 2, 1),
        "num_heads": (1, 2, 2, 4),
        "window_size": (4, 2, 2),
        "image_size": 64,
        "num_frames": 8,
        "vocab_size": 64,
        "drop_path_rate": 0.0,
    },
}

# What `BEVTForMaskedVideoModeling` predicts at masked positions: the ids of a frozen visual tokenizer (BEVT), or
# tokenizer-free regression targets of each 16-px patch: histograms of oriented gradients (MaskFeat) or normalised
# pixels (MAE / VideoMAE). `bevt.targets` computes the regression targets with these constants.
TARGET_TYPES = ("tokenizer", "hog", "pixel")
HOG_CELL_SIZE = 8  # pixels per HOG cell side: a 16-px patch holds 2x2 cells (MaskFeat)
HOG_NUM_BINS = 9  # unsigned orientations over [0, 180) degrees, 20 degrees per bin


def regression_target_dim(target_type: str, patch_pixels: int, num_channels: int) -> int:
    """Values per patch of a regression target: HOG (patch/8)^2 cells x 9 bins x channels (108 for 16-px RGB
    patches), pixels patch^2 x channels (768)."""
    if target_type == "hog":
        return (patch_pixels // HOG_CELL_SIZE) ** 2 * HOG_NUM_BINS * num_channels
    if target_type == "pixel":
        return patch_pixels**2 * num_channels
    raise ValueError(f"`target_type` {target_type!r} has no regression dimension (one of 'hog', 'pixel')")


def _as_int_tuple(value: Any, name: str, length: int | None = None) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,) * (length or 1)
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a sequence of integers, got {value!r}") from None
    if any(isinstance(v, bool) or int(v) != v for v in value):
        raise ValueError(f"`{name}` must contain integers, got {value!r}")
    if length is not None and len(out) != length:
        raise ValueError(f"`{name}` must have {length} values (time, height, width), got {value!r}")
    if any(v <= 0 for v in out):
        raise ValueError(f"`{name}` must contain positive integers, got {value!r}")
    return out


class BEVTConfig(PreTrainedConfig):
    r"""Configuration of a BEVT model (a Video Swin Transformer encoder that also runs on images).

    Args:
        num_channels: input channels (3 for RGB).
        image_size: spatial input size the model is pretrained/fine-tuned at (square), e.g. 224.
        num_frames: frames per clip (16 for pretraining, 32 for fine-tuning). Read by the video-classification pipeline.
        patch_size: 3D patch (time, height, width), e.g. (2, 4, 4). The image stream uses (height, width).
        embed_dim: channels of the patch embeddings (stage 1); stage i has `embed_dim * 2**i`.
        depths: number of Swin blocks per stage.
        num_heads: attention heads per stage (must divide the stage's channels).
        window_size: 3D attention window (time, height, width), e.g. (8, 7, 7). The image stream uses (height, width).
        mlp_ratio: MLP hidden size / channels.
        qkv_bias: bias in the fused query/key/value projection.
        hidden_dropout_prob: dropout after the patch embedding, in the MLPs and attention output projections.
        attention_probs_dropout_prob: dropout on the attention probabilities.
        drop_path_rate: stochastic depth rate, increasing linearly over all blocks up to this value.
        hidden_act: activation of the MLPs.
        patch_norm: LayerNorm after the patch embedding.
        layer_norm_eps: epsilon of every LayerNorm.
        initializer_range: std of the truncated normal used to initialise weights.
        vocab_size: size of the visual-token codebook predicted in pretraining (8192 for the DALL-E dVAE).
        target_type: what pretraining predicts at masked positions: "tokenizer" (visual-token ids, cross-entropy;
            the paper's), "hog" (per-patch histograms of oriented gradients, MaskFeat) or "pixel" (per-patch
            normalised pixels, MAE); "hog"/"pixel" regress `target_dim` values per patch with an L2 loss.
        target_dim: values per patch of a regression target (the head's output size); None derives it from the
            patch geometry (`regression_target_dim`: 108 for HOG, 768 for pixels of 16-px RGB patches). Unused
            (None) for "tokenizer", whose head outputs `vocab_size` logits.
        video_loss_weight / image_loss_weight: weights of the two pretraining losses.
        classifier_dropout: dropout before the classification layer.
    """

    model_type = "bevt"
    attribute_map = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}

    num_channels: int = 3
    image_size: int = 224
    num_frames: int = 16
    patch_size: tuple[int, ...] | list[int] = (2, 4, 4)
    embed_dim: int = 96
    depths: tuple[int, ...] | list[int] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] | list[int] = (3, 6, 12, 24)
    window_size: tuple[int, ...] | list[int] = (8, 7, 7)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.1
    hidden_act: str = "gelu"
    patch_norm: bool = True
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    vocab_size: int = 8192
    target_type: str = "tokenizer"
    target_dim: int | None = None
    video_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    classifier_dropout: float = 0.5

    def __post_init__(self, **kwargs):
        self.patch_size = _as_int_tuple(self.patch_size, "patch_size", 3)
        self.window_size = _as_int_tuple(self.window_size, "window_size", 3)
        self.depths = _as_int_tuple(self.depths, "depths")
        self.num_heads = _as_int_tuple(self.num_heads, "num_heads")
        if self.target_type in ("hog", "pixel") and self.target_dim is None:
            self.target_dim = regression_target_dim(
                self.target_type, self.target_patch_size, self.num_channels
            )
        self._validate()
        self.num_layers = len(self.depths)
        # Channels of the last stage (what the heads and `last_hidden_state` carry).
        self.hidden_size = int(self.embed_dim * 2 ** (len(self.depths) - 1))
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        for name in ("num_channels", "image_size", "num_frames", "embed_dim", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"`depths` ({len(self.depths)} stages) and `num_heads` ({len(self.num_heads)} stages) "
                "must have the same length"
            )
        for i, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**i
            if dim % heads != 0:
                raise ValueError(
                    f"`num_heads[{i}]`={heads} does not divide the stage-{i + 1} channels {dim} "
                    f"(embed_dim={self.embed_dim} * 2**{i})"
                )
        for name in (
            "mlp_ratio",
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "drop_path_rate",
            "classifier_dropout",
            "video_loss_weight",
            "image_loss_weight",
            "layer_norm_eps",
            "initializer_range",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"`{name}` must be a number, got {value!r}")
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"`mlp_ratio` must be positive, got {self.mlp_ratio!r}")
        for name in (
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "drop_path_rate",
            "classifier_dropout",
        ):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
        for name in ("video_loss_weight", "image_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"`layer_norm_eps` must be positive, got {self.layer_norm_eps!r}")
        if self.target_type not in TARGET_TYPES:
            raise ValueError(f"`target_type` must be one of {list(TARGET_TYPES)}, got {self.target_type!r}")
        if self.target_type == "tokenizer":
            if self.target_dim is not None:
                raise ValueError(
                    f"`target_dim` is for regression targets (target_type 'hog'/'pixel'); with target_type "
                    f"'tokenizer' the head predicts `vocab_size` ids: leave it None, got {self.target_dim!r}"
                )
        else:
            if self.patch_size[1] != self.patch_size[2]:
                raise ValueError(
                    f"`target_type` {self.target_type!r} needs square patches, got patch_size {self.patch_size}"
                )
            value = self.target_dim
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`target_dim` must be a positive integer, got {value!r}")
            if self.target_type == "hog" and self.target_patch_size % HOG_CELL_SIZE:
                raise ValueError(
                    f"`target_type` 'hog' needs {HOG_CELL_SIZE}-px cells to tile the {self.target_patch_size}-px "
                    f"patches (4 x patch_size {self.patch_size[1]}), got patch_size {self.patch_size}"
                )

    @property
    def target_patch_size(self) -> int:
        """Side in pixels of the patch one prediction covers: 4 x the patch size (16 px for 2x4x4 patches)."""
        return 4 * self.patch_size[1]

    @property
    def is_regression_target(self) -> bool:
        """True for "hog" / "pixel" targets (MSE on `target_dim` values), False for token ids."""
        return self.target_type != "tokenizer"

    @property
    def head_output_size(self) -> int:
        """Outputs of the pretraining head per position: `vocab_size` logits or `target_dim` regressed values."""
        return self.target_dim if self.is_regression_target else self.vocab_size

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of each stage: `embed_dim * 2**i`."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> "BEVTConfig":
        """A configuration from a named preset: "tiny", "small", "base", "large" (Video Swin T/S/B/L) or "test".

        Keyword arguments override preset values, e.g. `BEVTConfig.from_preset("base", num_labels=400)`.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **kwargs})


__all__ = ["BEVTConfig", "HOG_CELL_SIZE", "HOG_NUM_BINS", "PRESETS", "TARGET_TYPES", "regression_target_dim"]
