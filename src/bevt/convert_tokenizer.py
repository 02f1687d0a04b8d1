"""Convert DALL-E / VQGAN checkpoints (encoder, optionally decoder) into `BEVTVisualTokenizer` folders.

    python -m bevt.convert_tokenizer --format dalle-encoder --checkpoint encoder.pkl [--decoder decoder.pkl] \
        --output-dir DIR
    python -m bevt.convert_tokenizer --format vqgan-encoder --checkpoint vqgan.ckpt [--decoder vqgan.ckpt] \
        --output-dir DIR

(`python -m bevt.convert` takes the same flags.) Without `--decoder` the folder holds the encoder only (the token
ids BEVT predicts); with it, also the decoder (`BEVTVisualTokenizer.decode(ids) -> pixels`).

DALL-E: OpenAI's `encoder.pkl` / `decoder.pkl` (pickled `dall_e.encoder.Encoder` / `dall_e.decoder.Decoder`
modules) are read by `bevt.safe_loading` without the `dall_e` package and without running pickled code; plain
state dicts of the same keys (`.pt`/`.pth`/`.bin`) or `.safetensors` files work too. The architecture (widths,
blocks per group, vocabulary, channels) is read from the weight shapes; encoder and decoder must agree on the
vocabulary and the channels.

VQGAN: a taming-transformers-layout state dict (`encoder.*`, `quant_conv.*`, `quantize.embedding.weight`; with
`--decoder`, also `post_quant_conv.*` and `decoder.*`, usually from the same file; loss / discriminator weights are
ignored), optionally nested under `"state_dict"` (Lightning `.ckpt`). The architecture is read from the weight
shapes, except the GroupNorm group count (32 in taming; `vqgan_norm_groups`); the decoder is taming's mirror of the
encoder (same `ddconfig`).
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
from .safe_loading import DALL_E_DECODER_CLASSES, DALL_E_ENCODER_CLASSES, PathLike, load_checkpoint

__all__ = ["convert_dalle_encoder", "convert_tokenizer_files", "convert_vqgan_encoder", "dalle_to_bevt_key", "main"]

# Either DALL-E module pickle may be given for the other: read both kinds (inert records), then tell them apart by
# their weights, so a swapped file gets a clear message.
_DALL_E_CLASSES = DALL_E_ENCODER_CLASSES | DALL_E_DECODER_CLASSES

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
_VQGAN_DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def dalle_to_bevt_key(key: str, module: str = "encoder") -> str:
    """Map a `dall_e.Encoder` (or, with `module="decoder"`, `dall_e.Decoder`) state-dict key to ours, e.g.
    `blocks.group_2.block_1.res_path.conv_3.w` -> `encoder.groups.1.blocks.0.conv_3.weight`. Both modules use the
    same key layout. Raises `ValueError` for keys that are not DALL-E keys."""
    if module not in ("encoder", "decoder"):
        raise ValueError(f"module must be 'encoder' or 'decoder', got {module!r}")
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
        return f"{module}." + template.format(**fields).removeprefix("encoder.")
    raise ValueError(f"{key!r} is not a DALL-E {module} state-dict key")


def _read_dalle(path: PathLike, expected: str) -> dict[str, torch.Tensor]:
    """A DALL-E encoder or decoder state dict (`dall_e` keys), checked to be the `expected` one."""
    state_dict = _strip_module_prefix(
        _tensors(load_checkpoint(path, allow_module_pickle=True, module_classes=_DALL_E_CLASSES))
    )
    for required in ("blocks.input.w", "blocks.output.conv.w"):
        if required not in state_dict:
            raise ValueError(
                f"{path}: not a DALL-E {expected} checkpoint (no {required!r}; keys: {sorted(state_dict)[:8]})"
            )
    # The encoder starts with a 7x7 conv on the pixels, the decoder with a 1x1 conv on the one-hot ids.
    kind = "encoder" if state_dict["blocks.input.w"].shape[-1] != 1 else "decoder"
    if kind != expected:
        option = "--checkpoint" if kind == "encoder" else "--decoder"
        raise ValueError(f"{path} is a DALL-E {kind} checkpoint, not the {expected}: pass it with {option}")
    return state_dict


def _dalle_blocks_per_group(state_dict: dict[str, torch.Tensor]) -> int:
    return len({int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.group_1\.block_(\d+)\.", k))})


def convert_dalle_encoder(
    checkpoint_path: PathLike,
    output_dir: PathLike | None = None,
    *,
    decoder_path: PathLike | None = None,
    **config_kwargs: Any,
) -> BEVTVisualTokenizer:
    """Build a `BEVTVisualTokenizer` (`tokenizer_type="dall-e"`) from a DALL-E encoder (and decoder) checkpoint.

    Args:
        checkpoint_path: OpenAI's `encoder.pkl` (pickled module, read safely), or a state dict with the
            `dall_e.Encoder` keys (`blocks.input.w`, ...) as `.pt`/`.pth`/`.bin`/`.safetensors`.
        output_dir: if given, the model is written there with `save_pretrained` (config.json + safetensors).
        decoder_path: OpenAI's `decoder.pkl` (or a `dall_e.Decoder` state dict): the folder then also has the
            decoder (`has_decoder=True`, `decode(ids)`). Nothing is written unless both files convert.
        **config_kwargs: non-architectural config fields, e.g. `autocast_dtype="float16"`, `image_size=224`.

    Returns:
        The converted model (frozen, eval mode, on CPU).

    Raises:
        ValueError: a file is not a DALL-E encoder / decoder (or the two are swapped), or encoder and decoder
            disagree on the vocabulary size or the channels (`UnsafeCheckpointError`, a `ValueError`, for a file
            that needs code outside the allowlist; nothing was executed).
    """
    state_dict = _read_dalle(checkpoint_path, "encoder")
    input_weight = state_dict["blocks.input.w"]
    vocab_size = state_dict["blocks.output.conv.w"].shape[0]
    decoder_fields: dict[str, Any] = {}
    converted = {dalle_to_bevt_key(key): value for key, value in state_dict.items()}
    if decoder_path is not None:
        decoder_state = _read_dalle(decoder_path, "decoder")
        decoder_input, decoder_output = decoder_state["blocks.input.w"], decoder_state["blocks.output.conv.w"]
        if decoder_input.shape[1] != vocab_size:
            raise ValueError(
                f"{decoder_path}: the decoder's codebook has {decoder_input.shape[1]} token ids but the encoder "
                f"{checkpoint_path} has vocab_size {vocab_size}: they are not one dVAE"
            )
        if decoder_output.shape[0] != 2 * input_weight.shape[1]:
            raise ValueError(
                f"{decoder_path}: the decoder outputs {decoder_output.shape[0]} channels, expected 2 x the encoder's "
                f"{input_weight.shape[1]} input channels (logit-Laplace location and scale)"
            )
        decoder_fields = dict(
            has_decoder=True,
            dalle_decoder_init_size=decoder_input.shape[0],
            dalle_decoder_hidden_size=decoder_output.shape[1],
            dalle_decoder_num_blocks_per_group=_dalle_blocks_per_group(decoder_state),
        )
        converted.update({dalle_to_bevt_key(key, "decoder"): value for key, value in decoder_state.items()})
    config = BEVTVisualTokenizerConfig(
        tokenizer_type="dall-e",
        num_channels=input_weight.shape[1],
        dalle_hidden_size=input_weight.shape[0],
        dalle_num_blocks_per_group=_dalle_blocks_per_group(state_dict),
        vocab_size=vocab_size,
        **decoder_fields,
        **config_kwargs,
    )
    sources = checkpoint_path if decoder_path is None else f"{checkpoint_path} + {decoder_path}"
    return _finish(config, converted, sources, output_dir)


def _read_taming(path: PathLike, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    checkpoint = load_checkpoint(path)
    if isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = dict(checkpoint["state_dict"])
    state_dict = _strip_module_prefix({k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)})
    return {k: v for k, v in state_dict.items() if k.startswith(prefixes)}


def convert_vqgan_encoder(
    checkpoint_path: PathLike,
    output_dir: PathLike | None = None,
    *,
    decoder_path: PathLike | None = None,
    vqgan_norm_groups: int = 32,
    **config_kwargs: Any,
) -> BEVTVisualTokenizer:
    """Build a `BEVTVisualTokenizer` (`tokenizer_type="vqgan"`) from a taming-transformers-layout checkpoint.

    Args:
        checkpoint_path: `.ckpt`/`.pt`/`.pth`/`.bin`/`.safetensors` with `encoder.*`, `quant_conv.*` and
            `quantize.embedding.weight` (optionally under `"state_dict"`; other keys are ignored).
        output_dir: if given, the model is written there with `save_pretrained`.
        decoder_path: a checkpoint with taming's `post_quant_conv.*` and `decoder.*` (usually `checkpoint_path`
            itself): the folder then also has the decoder (`has_decoder=True`, `decode(ids)`).
        vqgan_norm_groups: GroupNorm groups of the encoder (not recoverable from the weights; taming uses 32).
        **config_kwargs: other non-architectural config fields (`vqgan_pixel_range`, `autocast_dtype`, ...).

    Returns:
        The converted model (frozen, eval mode, on CPU).
    """
    state_dict = _read_taming(checkpoint_path, _VQGAN_PREFIXES)
    if decoder_path is not None:
        decoder_state = _read_taming(decoder_path, _VQGAN_DECODER_PREFIXES)
        for required in ("post_quant_conv.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"):
            if required not in decoder_state:
                raise ValueError(f"{decoder_path}: not a taming-transformers VQGAN decoder (no {required!r})")
        state_dict.update(decoder_state)
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
        has_decoder=decoder_path is not None,
        **config_kwargs,
    )
    sources = checkpoint_path if decoder_path is None else f"{checkpoint_path} + {decoder_path}"
    return _finish(config, state_dict, sources, output_dir)


DECODER_HELP = (
    "also convert the decoder (decode(ids) -> pixels): OpenAI's decoder.pkl for dalle-encoder; for vqgan-encoder a "
    "taming checkpoint with post_quant_conv.* and decoder.* (usually the --checkpoint file itself)"
)


def convert_tokenizer_files(
    fmt: str,
    checkpoint: PathLike,
    output_dir: PathLike | None,
    decoder: PathLike | None = None,
    vqgan_norm_groups: int = 32,
) -> BEVTVisualTokenizer:
    """The command line's conversion: `fmt` is `"dalle-encoder"` or `"vqgan-encoder"`."""
    decoder_kwargs = {} if decoder is None else {"decoder_path": decoder}
    if fmt == "dalle-encoder":
        return convert_dalle_encoder(checkpoint, output_dir, **decoder_kwargs)
    if fmt == "vqgan-encoder":
        return convert_vqgan_encoder(checkpoint, output_dir, vqgan_norm_groups=vqgan_norm_groups, **decoder_kwargs)
    raise ValueError(f"unknown tokenizer format {fmt!r}; choose dalle-encoder or vqgan-encoder")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 on success)."""
    parser = argparse.ArgumentParser(
        prog="python -m bevt.convert_tokenizer",
        description="Convert a DALL-E or VQGAN checkpoint (encoder, optionally decoder) into a BEVTVisualTokenizer "
        "folder.",
    )
    parser.add_argument("--format", required=True, choices=("dalle-encoder", "vqgan-encoder"))
    parser.add_argument("--checkpoint", required=True, type=Path, help="encoder.pkl / state dict / safetensors")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--decoder", type=Path, help=DECODER_HELP)
    parser.add_argument("--vqgan-norm-groups", type=int, default=32, help="GroupNorm groups (vqgan-encoder only)")
    args = parser.parse_args(argv)
    model = convert_tokenizer_files(args.format, args.checkpoint, args.output_dir, args.decoder,
                                    args.vqgan_norm_groups)
    config = model.config
    print(
        f"wrote {config.tokenizer_type} tokenizer{' with decoder' if getattr(config, 'has_decoder', False) else ''} "
        f"({sum(p.numel() for p in model.parameters()):,} parameters, vocab {config.vocab_size}, "
        f"{config.downsample_factor}x downsampling) to {args.output_dir}"
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
