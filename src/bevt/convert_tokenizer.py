"""Convert DALL-E / VQGAN encoder checkpoints into `BEVTVisualTokenizer` folders.

    python -m bevt.convert_tokenizer --format dalle-encoder --checkpoint encoder.pkl --output-dir DIR
    python -m bevt.convert_tokenizer --format vqgan-encoder --checkpoint vqgan.ckpt --output-dir DIR

DALL-E: OpenAI's `encoder.pkl` (a pickled `dall_e.encoder.Encoder` module) is read by `bevt.safe_loading` without
the `dall_e` package and without running pickled code; a plain state dict of the same keys (`.pt`/`.pth`/`.bin`)
or a `.safetensors` file works too. The architecture (width, blocks per group, vocabulary, input channels) is read
from the weight shapes.

VQGAN: a taming-transformers-layout state dict (`encoder.*`, `quant_conv.*`, `quantize.embedding.weight`; decoder
and loss weights are ignored), optionally nested under `"state_dict"` (Lightning `.ckpt`). The architecture is read
from the weight shapes, except the GroupNorm group count (32 in taming; `vqgan_norm_groups`).
"""

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .configuration_tokenizer import BEVTVisualTokenizerConfig
from .modeling_tokenizer import BEVTVisualTokenizer
from .safe_loading import PathLike, load_checkpoint

__all__ = ["convert_dalle_encoder", "convert_vqgan_encoder", "dalle_to_bevt_key", "main"]

_DALLE_KEY_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^blocks\.input\.(w|b)$"), "encoder.input_conv.{param}"),
    (
        re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.id_path\.(w|b)$"),
        "encoder.groups.{group}.blocks.{block}.shortcut.{param}",
    ),
    (
        re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.res_path\.conv_([1-4])\.(w|b)$"),
        "encoder.groups.{group}.blocks.{block}.conv_{conv}.{param}",
    ),
    (re.compile(r"^blocks\.output\.conv\.(w|b)$"), "encoder.output_conv.{param}"),
)
_PARAM_NAMES = {"w": "weight", "b": "bias"}
_VQGAN_PREFIXES = ("encoder.", "quant_conv.", "quantize.embedding.")


def dalle_to_bevt_key(key: str) -> str:
    """Map a `dall_e.Encoder` state-dict key to ours, e.g. `blocks.group_2.block_1.res_path.conv_3.w` ->
    `encoder.groups.1.blocks.0.conv_3.weight`. Raises `ValueError` for keys that are not DALL-E encoder keys."""
    for pattern, template in _DALLE_KEY_PATTERNS:
        match = pattern.match(key)
        if match is None:
            continue
        groups = match.groups()
        fields: dict[str, Any] = {"param": _PARAM_NAMES[groups[-1]]}
        if len(groups) >= 3:
            fields.update(group=int(groups[0]) - 1, block=int(groups[1]) - 1)
        if len(groups) == 4:
            fields["conv"] = groups[2]
        return template.format(**fields)
    raise ValueError(f"{key!r} is not a DALL-E encoder state-dict key")


def convert_dalle_encoder(
    checkpoint_path: PathLike, output_dir: PathLike | None = None, **config_kwargs: Any
) -> BEVTVisualTokenizer:
    """Build a `BEVTVisualTokenizer` (`tokenizer_type="dall-e"`) from a DALL-E encoder checkpoint.

    Args:
        checkpoint_path: OpenAI's `encoder.pkl` (pickled module, read safely), or a state dict with the
            `dall_e.Encoder` keys (`blocks.input.w`, ...) as `.pt`/`.pth`/`.bin`/`.safetensors`.
        output_dir: if given, the model is written there with `save_pretrained` (config.json + safetensors).
        **config_kwargs: non-architectural config fields, e.g. `autocast_dtype="float16"`, `image_size=224`.

    Returns:
        The converted model (frozen, eval mode, on CPU).
    """
    state_dict = _strip_module_prefix(_tensors(load_checkpoint(checkpoint_path, allow_module_pickle=True)))
    for required in ("blocks.input.w", "blocks.output.conv.w"):
        if required not in state_dict:
            raise ValueError(
                f"{checkpoint_path}: not a DALL-E encoder checkpoint (no {required!r}; keys: {sorted(state_dict)[:8]})"
            )
    input_weight = state_dict["blocks.input.w"]
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.group_1\.block_(\d+)\.", k))}
    config = BEVTVisualTokenizerConfig(
        tokenizer_type="dall-e",
        num_channels=input_weight.shape[1],
        dalle_hidden_size=input_weight.shape[0],
        dalle_num_blocks_per_group=len(blocks),
        vocab_size=state_dict["blocks.output.conv.w"].shape[0],
        **config_kwargs,
    )
    converted = {dalle_to_bevt_key(key): value for key, value in state_dict.items()}
    return _finish(config, converted, checkpoint_path, output_dir)


def convert_vqgan_encoder(
    checkpoint_path: PathLike,
    output_dir: PathLike | None = None,
    *,
    vqgan_norm_groups: int = 32,
    **config_kwargs: Any,
) -> BEVTVisualTokenizer:
    """Build a `BEVTVisualTokenizer` (`tokenizer_type="vqgan"`) from a taming-transformers-layout checkpoint.

    Args:
        checkpoint_path: `.ckpt`/`.pt`/`.pth`/`.bin`/`.safetensors` with `encoder.*`, `quant_conv.*` and
            `quantize.embedding.weight` (optionally under `"state_dict"`; other keys are ignored).
        output_dir: if given, the model is written there with `save_pretrained`.
        vqgan_norm_groups: GroupNorm groups of the encoder (not recoverable from the weights; taming uses 32).
        **config_kwargs: other non-architectural config fields (`vqgan_pixel_range`, `autocast_dtype`, ...).

    Returns:
        The converted model (frozen, eval mode, on CPU).
    """
    checkpoint = load_checkpoint(checkpoint_path)
    if isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = dict(checkpoint["state_dict"])
    state_dict = _strip_module_prefix(
        {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    )
    state_dict = {k: v for k, v in state_dict.items() if k.startswith(_VQGAN_PREFIXES)}
    for required in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight",
                     "quantize.embedding.weight"):
        if required not in state_dict:
            raise ValueError(f"{checkpoint_path}: not a taming-transformers VQGAN checkpoint (no {required!r})")

    conv_in = state_dict["encoder.conv_in.weight"]
    channels = conv_in.shape[0]
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"^encoder\.down\.(\d+)\.", k))})
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"{checkpoint_path}: encoder.down levels are not 0..n-1: {levels}")
    multipliers = []
    for level in levels:
        width = state_dict[f"encoder.down.{level}.block.0.conv1.weight"].shape[0]
        if width % channels:
            raise ValueError(f"{checkpoint_path}: level {level} width {width} is not a multiple of {channels}")
        multipliers.append(width // channels)
    num_blocks = len({int(m.group(1)) for k in state_dict if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))})
    attention = tuple(level for level in levels if f"encoder.down.{level}.attn.0.q.weight" in state_dict)
    z_channels = state_dict["encoder.conv_out.weight"].shape[0]
    quant_conv = state_dict["quant_conv.weight"]
    if quant_conv.shape[1] != z_channels:
        raise ValueError(
            f"{checkpoint_path}: quant_conv takes {quant_conv.shape[1]} channels but conv_out gives {z_channels}"
        )
    config = BEVTVisualTokenizerConfig(
        tokenizer_type="vqgan",
        num_channels=conv_in.shape[1],
        vocab_size=state_dict["quantize.embedding.weight"].shape[0],
        vqgan_channels=channels,
        vqgan_channel_multipliers=tuple(multipliers),
        vqgan_num_res_blocks=num_blocks,
        vqgan_attention_levels=attention,
        vqgan_z_channels=z_channels,
        vqgan_embed_dim=quant_conv.shape[0],
        vqgan_norm_groups=vqgan_norm_groups,
        **config_kwargs,
    )
    return _finish(config, state_dict, checkpoint_path, output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 on success)."""
    parser = argparse.ArgumentParser(
        prog="python -m bevt.convert_tokenizer",
        description="Convert a DALL-E or VQGAN encoder checkpoint into a BEVTVisualTokenizer folder.",
    )
    parser.add_argument("--format", required=True, choices=("dalle-encoder", "vqgan-encoder"))
    parser.add_argument("--checkpoint", required=True, type=Path, help="encoder.pkl / state dict / safetensors")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--vqgan-norm-groups", type=int, default=32, help="GroupNorm groups (vqgan-encoder only)")
    args = parser.parse_args(argv)
    if args.format == "dalle-encoder":
        model = convert_dalle_encoder(args.checkpoint, args.output_dir)
    else:
        model = convert_vqgan_encoder(args.checkpoint, args.output_dir, vqgan_norm_groups=args.vqgan_norm_groups)
    config = model.config
    print(
        f"wrote {config.tokenizer_type} tokenizer ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"vocab {config.vocab_size}, {config.downsample_factor}x downsampling) to {args.output_dir}"
    )
    return 0


def _tensors(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    bad = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"expected a state dict of tensors; non-tensor entries: {bad[:5]}")
    return dict(checkpoint)


def _strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def _finish(
    config: BEVTVisualTokenizerConfig,
    state_dict: dict[str, torch.Tensor],
    source: PathLike,
    output_dir: PathLike | None,
) -> BEVTVisualTokenizer:
    with torch.device("meta"):  # no random init: every weight is replaced below
        model = BEVTVisualTokenizer(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit the inferred architecture; missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in state_dict.items()}, assign=True)
    model.train(False)  # re-freeze the assigned parameters
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model


if __name__ == "__main__":
    sys.exit(main())
