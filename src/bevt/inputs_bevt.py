"""Input checks of the BEVT models: bad inputs raise a ValueError that names the argument and the expected shape,
before anything reaches torch. Copied next to `modeling_bevt.py` into saved folders (remote code)."""

import torch

from .configuration_bevt import BEVTConfig


def check_pixel_values(pixel_values: torch.Tensor, config: BEVTConfig, name: str = "pixel_values") -> None:
    """A non-empty float video (B, T, C, H, W) or image batch (B, C, H, W) with `config.num_channels` channels."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim not in (4, 5):
        raise ValueError(
            f"`{name}` must be a video (B, T, C, H, W) or an image batch (B, C, H, W), got shape "
            f"{tuple(pixel_values.shape)}"
        )
    channels = pixel_values.shape[-3]
    if channels != config.num_channels:
        raise ValueError(
            f"`{name}` has {channels} channels (dim -3 of shape {tuple(pixel_values.shape)}), the model expects "
            f"{config.num_channels}; videos are (B, T, C, H, W)"
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"`{name}` must be a floating point tensor (normalized pixels), got {pixel_values.dtype}"
        )
    if pixel_values.shape[0] == 0 or any(s == 0 for s in pixel_values.shape):
        raise ValueError(f"`{name}` is empty: shape {tuple(pixel_values.shape)}")


def mask_grid_shape(pixel_values_shape: tuple[int, ...], config: BEVTConfig) -> tuple[int, ...]:
    """Expected `bool_masked_pos` grid for inputs of this shape: video (ceil(T/pt), ceil(H/16), ceil(W/16)),
    image (ceil(H/16), ceil(W/16)) for the default 2x4x4 patches (16 = 4 x patch size)."""
    pt, ph, pw = config.patch_size
    spatial = (-(-pixel_values_shape[-2] // (4 * ph)), -(-pixel_values_shape[-1] // (4 * pw)))
    if len(pixel_values_shape) == 5:
        return (-(-pixel_values_shape[1] // pt), *spatial)
    return spatial


def check_mask(
    bool_masked_pos: torch.Tensor, pixel_values: torch.Tensor, config: BEVTConfig, name: str
) -> None:
    """`bool_masked_pos` is a bool (or 0/1 integer) grid of `mask_grid_shape` for the batch of `pixel_values`."""
    expected = (pixel_values.shape[0], *mask_grid_shape(tuple(pixel_values.shape), config))
    if tuple(bool_masked_pos.shape) != expected:
        raise ValueError(
            f"mask for `{name}` of shape {tuple(pixel_values.shape)} must have shape {expected} "
            f"(batch, {'time/2, ' if pixel_values.ndim == 5 else ''}height/16, width/16), "
            f"got {tuple(bool_masked_pos.shape)}"
        )
    if bool_masked_pos.is_floating_point() or bool_masked_pos.is_complex():
        raise ValueError(
            f"mask for `{name}` must be a bool (or integer 0/1) tensor, got {bool_masked_pos.dtype}"
        )


def check_masked_modeling_stream(
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor | None,
    labels: torch.Tensor | None,
    is_video: bool,
    config: BEVTConfig,
) -> None:
    """What the masked-modeling heads need of one stream: its rank, sizes the stage-4 upsampling meets, and a mask
    whenever labels are given."""
    name = "pixel_values" if is_video else "image_pixel_values"
    expected_rank = 5 if is_video else 4
    if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim != expected_rank:
        raise ValueError(
            f"`{name}` must be {'a video batch (B, T, C, H, W)' if is_video else 'an image batch (B, C, H, W)'}, "
            f"got shape {tuple(pixel_values.shape)}"
        )
    check_pixel_values(pixel_values, config, name)
    height, width = pixel_values.shape[-2:]
    stride = 8 * config.patch_size[1], 8 * config.patch_size[2]
    if height % stride[0] or width % stride[1]:
        raise ValueError(
            f"the masked-modeling heads need `{name}` height and width to be multiples of "
            f"{stride[0]}x{stride[1]} (stage 4 upsampled x2 meets stage 3), got {height}x{width}"
        )
    if is_video and pixel_values.shape[1] % config.patch_size[0]:
        raise ValueError(
            f"the masked-modeling head needs the number of frames of `{name}` to be a multiple of "
            f"{config.patch_size[0]}, got {pixel_values.shape[1]}"
        )
    if labels is not None and bool_masked_pos is None:
        raise ValueError(f"labels for `{name}` need its mask (`bool_masked_pos` / `image_bool_masked_pos`)")


def check_token_labels(
    labels: torch.Tensor, expected: tuple[int, ...], is_video: bool, config: BEVTConfig
) -> None:
    """Visual-token ids of shape `expected` = (B, [T,] h, w)."""
    name = "pixel_values" if is_video else "image_pixel_values"
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"labels for `{name}` must be visual-token ids of shape {expected} (one {expected[-2]}x"
            f"{expected[-1]} grid per {'frame' if is_video else 'image'}), got {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        raise ValueError(f"labels for `{name}` must be integer token ids, got {labels.dtype}")


def check_regression_labels(
    labels: torch.Tensor, expected: tuple[int, ...], is_video: bool, config: BEVTConfig
) -> None:
    """Regression targets (`config.target_type` "hog"/"pixel") of shape `expected` = (B, [T,] h, w, target_dim)."""
    name = "pixel_values" if is_video else "image_pixel_values"
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels for `{name}` must be a torch.Tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != expected:
        grid = "(batch, frames, height/16, width/16" if is_video else "(batch, height/16, width/16"
        raise ValueError(
            f"labels for `{name}` must be {config.target_type!r} targets of shape {expected} {grid}, "
            f"target_dim={config.target_dim}), got {tuple(labels.shape)}"
            + (
                "; integer token ids need a model with target_type 'tokenizer'"
                if not labels.is_floating_point()
                else ""
            )
        )
    if not labels.is_floating_point():
        raise ValueError(
            f"labels for `{name}` must be float {config.target_type!r} targets (target_type={config.target_type!r}), "
            f"got {labels.dtype}"
        )


def check_token_range(target: torch.Tensor, is_video: bool, config: BEVTConfig) -> None:
    """The selected (masked) token ids lie in [0, vocab_size)."""
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= config.vocab_size):
        name = "pixel_values" if is_video else "image_pixel_values"
        raise ValueError(
            f"labels for `{name}` must be in [0, {config.vocab_size}) (vocab_size), got values in "
            f"[{int(target.min())}, {int(target.max())}]"
        )


def check_class_labels(labels: torch.Tensor, logits: torch.Tensor, config: BEVTConfig) -> None:
    """Class ids (B,) in [0, num_labels), or float class distributions of the logits' shape (B, num_labels)."""
    num_labels = config.num_labels
    if not labels.is_floating_point() and labels.ndim == 1 and num_labels > 1:
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(f"`labels` has {labels.shape[0]} entries for a batch of {logits.shape[0]}")
        if int(labels.min()) < 0 or int(labels.max()) >= num_labels:
            raise ValueError(
                f"`labels` must be class ids in [0, {num_labels}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
    if (
        labels.is_floating_point()
        and labels.ndim > 1
        and labels.shape != logits.shape
        and config.problem_type != "regression"
    ):
        raise ValueError(
            f"float `labels` (class distributions) must have the logits' shape {tuple(logits.shape)} "
            f"(batch, num_labels), got {tuple(labels.shape)}"
        )
