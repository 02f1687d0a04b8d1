"""Visual tokenizer: DALL-E parity, safe checkpoint loading, VQGAN quantizer, shapes and input checks."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel

from bevt import BEVTVisualTokenizer, BEVTVisualTokenizerConfig
from bevt.convert_tokenizer import convert_dalle_encoder, convert_vqgan_encoder, dalle_to_bevt_key, main
from bevt.modeling_tokenizer import BEVTVectorQuantizer
from bevt.safe_loading import (
    DALL_E_DECODER_CLASSES,
    DALL_E_ENCODER_CLASSES,
    UnsafeCheckpointError,
    load_checkpoint,
    load_state_dict_file,
    scan_pickle_globals,
)


@pytest.fixture(scope="module")
def dall_e():
    """The reference DALL-E package (PyPI `dall-e`, a test-only dependency)."""
    return pytest.importorskip("dall_e")


# Installed as sitecustomize in the conversion subprocess: any import of dall_e fails there.
BLOCK_DALL_E = '''
import sys

class _BlockDallE:
    def find_spec(self, name, path=None, target=None):
        if name == "dall_e" or name.startswith("dall_e."):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, _BlockDallE())
'''


def small_dalle_config(**kwargs) -> BEVTVisualTokenizerConfig:
    return BEVTVisualTokenizerConfig(dalle_hidden_size=16, dalle_num_blocks_per_group=1, vocab_size=64, **kwargs)


def small_vqgan_config(**kwargs) -> BEVTVisualTokenizerConfig:
    values = dict(
        tokenizer_type="vqgan", vqgan_channels=16, vqgan_channel_multipliers=(1, 2), vqgan_num_res_blocks=2,
        vqgan_attention_levels=(1,), vqgan_z_channels=8, vqgan_embed_dim=6, vqgan_norm_groups=4, vocab_size=40,
    )
    values.update(kwargs)
    return BEVTVisualTokenizerConfig(**values)


def real_images(shared_data: Path, height: int = 112, width: int | None = None) -> torch.Tensor:
    """The test images, Lanczos-resized, as float (N, 3, height, width) in [0, 1]."""
    frames = []
    for path in sorted((shared_data / "images").glob("*.jpg")):
        image = Image.open(path).convert("RGB").resize((width or height, height), Image.Resampling.LANCZOS)
        frames.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
    assert frames, "no test images"
    return torch.stack(frames)


def run_without_dall_e(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    site = tmp_path / "block_dall_e"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK_DALL_E)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------------------------
# DALL-E parity


def test_dall_e_really_blocked_in_subprocess(tmp_path):
    result = run_without_dall_e(tmp_path, "-c", "import dall_e")
    assert result.returncode != 0 and "dall_e is blocked" in result.stderr


def test_full_size_dalle_parity_converted_without_dall_e(tmp_path, shared_data, dall_e):
    torch.manual_seed(0)
    reference = dall_e.Encoder()  # n_hid 256, 2 blocks per group, vocab 8192: BEVT's tokenizer, random weights
    checkpoint = tmp_path / "encoder.pkl"
    torch.save(reference, checkpoint)  # a pickled module, like OpenAI's encoder.pkl
    # a pickled dall_e.Decoder, like OpenAI's decoder.pkl (narrower than OpenAI's n_hid 256 to keep the test fast)
    decoder = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=8192)
    torch.save(decoder, tmp_path / "decoder.pkl")
    output = tmp_path / "converted"

    result = run_without_dall_e(
        tmp_path, "-m", "bevt.convert_tokenizer", "--format", "dalle-encoder",
        "--checkpoint", str(checkpoint), "--decoder", str(tmp_path / "decoder.pkl"), "--output-dir", str(output),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with decoder" in result.stdout

    model = BEVTVisualTokenizer.from_pretrained(output)
    assert model.config.tokenizer_type == "dall-e"
    assert (model.config.dalle_hidden_size, model.config.dalle_num_blocks_per_group, model.config.vocab_size) == (
        256, 2, 8192
    )
    images = torch.cat([torch.rand(1, 3, 112, 112), real_images(shared_data)])
    with torch.no_grad():
        expected = reference(dall_e.utils.map_pixels(images))
    logits = model(images).logits
    assert logits.shape == (len(images), 8192, 14, 14)
    assert (logits - expected).abs().max().item() <= 1e-5
    # get_codebook_indices == argmax of the logits is checked on small models below (a second full pass is slow)
    ids = expected.argmax(dim=1)
    assert torch.equal(logits.argmax(dim=1), ids)
    with torch.no_grad():
        stats = decoder(F.one_hot(ids[:2], 8192).permute(0, 3, 1, 2).float())
    assert (model.decode(ids[:2]) - dall_e.unmap_pixels(torch.sigmoid(stats[:, :3]))).abs().max().item() <= 1e-6


@pytest.mark.parametrize("file_format", ["state_dict_pt", "safetensors", "module_pickle"])
def test_small_dalle_parity_all_checkpoint_formats(tmp_path, shared_data, dall_e, file_format):
    torch.manual_seed(1)
    reference = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    path = tmp_path / {"state_dict_pt": "enc.pt", "safetensors": "enc.safetensors", "module_pickle": "enc.pkl"}[
        file_format
    ]
    if file_format == "state_dict_pt":
        torch.save(reference.state_dict(), path)
    elif file_format == "safetensors":
        from safetensors.torch import save_file

        save_file(reference.state_dict(), str(path))
    else:
        torch.save(reference, path)

    model = convert_dalle_encoder(path)
    assert (model.config.dalle_hidden_size, model.config.dalle_num_blocks_per_group) == (64, 1)
    images = torch.cat([torch.rand(2, 3, 64, 96), real_images(shared_data, 64, 96)])
    with torch.no_grad():
        expected = reference(dall_e.utils.map_pixels(images))
    assert (model(images).logits - expected).abs().max().item() <= 1e-5
    assert torch.equal(model.get_codebook_indices(images), expected.argmax(dim=1))


def test_module_pickle_flattens_to_the_modules_state_dict(tmp_path, dall_e):
    reference = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    torch.save(reference, tmp_path / "enc.pkl")
    state = load_checkpoint(tmp_path / "enc.pkl", allow_module_pickle=True)
    expected = reference.state_dict()
    assert sorted(state) == sorted(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert {g for g in scan_pickle_globals(tmp_path / "enc.pkl") if g.startswith("dall_e.")} <= DALL_E_ENCODER_CLASSES


def test_module_pickle_needs_explicit_permission(tmp_path, dall_e):
    torch.save(dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512), tmp_path / "enc.pkl")
    with pytest.raises(UnsafeCheckpointError, match=r"dall_e\.encoder\.Encoder"):
        load_checkpoint(tmp_path / "enc.pkl")


def test_dalle_key_mapping():
    assert dalle_to_bevt_key("blocks.input.w") == "encoder.input_conv.weight"
    assert dalle_to_bevt_key("blocks.group_2.block_1.id_path.b") == "encoder.groups.1.blocks.0.shortcut.bias"
    assert dalle_to_bevt_key("blocks.group_4.block_2.res_path.conv_3.w") == "encoder.groups.3.blocks.1.conv_3.weight"
    assert dalle_to_bevt_key("blocks.output.conv.b") == "encoder.output_conv.bias"
    with pytest.raises(ValueError, match="not a DALL-E encoder"):
        dalle_to_bevt_key("decoder.blocks.input.w")


# ---------------------------------------------------------------------------------------------------------------
# Security: hostile pickles are refused and their payload never runs


from helpers import HostilePayload as _Payload  # noqa: E402


def _expected_global(kind: str) -> str:
    return f"{os.system.__module__}.system" if kind == "os.system" else "builtins.eval"


def _write_hostile(path: Path, kind: str, marker: Path, layout: str) -> None:
    """A checkpoint whose unpickling would run the payload."""
    if layout == "zip":
        torch.save({"weight": torch.zeros(2), "payload": _Payload(kind, marker)}, path)
    elif layout == "legacy":
        torch.save({"weight": torch.zeros(2), "payload": _Payload(kind, marker)}, path,
                   _use_new_zipfile_serialization=False)
    elif layout == "raw_pickle":  # protocol 5: STACK_GLOBAL opcodes
        path.write_bytes(pickle.dumps({"payload": _Payload(kind, marker)}, protocol=5))
    else:  # a real DALL-E encoder module with the payload hidden in its module tree
        dall_e = pytest.importorskip("dall_e")
        encoder = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
        encoder.blocks.group_1.block_1.extra = _Payload(kind, marker)
        torch.save(encoder, path)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_payload_is_live_when_unpickled_unsafely(tmp_path, kind):
    """Control: the payload used below really creates its marker file when unpickled the unsafe way."""
    marker = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_Payload(kind, marker)))
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the protocol-5 raw pickle
@pytest.mark.parametrize("layout", ["zip", "legacy", "raw_pickle", "module_tree"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_hostile_pickles_are_refused_and_never_run(tmp_path, kind, layout):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pkl"
    _write_hostile(path, kind, marker, layout)
    assert not marker.exists()

    for allow_module_pickle in (False, True):
        with pytest.raises(UnsafeCheckpointError, match=_expected_global(kind).replace(".", r"\.")):
            load_checkpoint(path, allow_module_pickle=allow_module_pickle)
    with pytest.raises(UnsafeCheckpointError, match=_expected_global(kind).replace(".", r"\.")):
        convert_dalle_encoder(path, tmp_path / "out")
    with pytest.raises(UnsafeCheckpointError):
        convert_vqgan_encoder(path, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    assert isinstance(UnsafeCheckpointError("x"), ValueError)


def test_state_dict_helpers(tmp_path):
    torch.save({"state_dict": {"a": torch.ones(2)}, "epoch": 3}, tmp_path / "nested.pth")
    assert load_checkpoint(tmp_path / "nested.pth")["epoch"] == 3  # nothing unwrapped
    with pytest.raises(ValueError, match="'epoch'|'state_dict'"):
        load_state_dict_file(tmp_path / "nested.pth")
    torch.save({"a": torch.ones(2)}, tmp_path / "flat.bin")
    assert torch.equal(load_state_dict_file(tmp_path / "flat.bin")["a"], torch.ones(2))
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="mapping"):
        load_checkpoint(tmp_path / "tensor.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------------------------
# Model behaviour


def test_round_trip_and_auto_model(tmp_path):
    model = BEVTVisualTokenizer(small_dalle_config())
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is BEVTVisualTokenizer
    saved, reloaded = model.config.to_dict(), loaded.config.to_dict()
    for key in ("_name_or_path", "architectures", "transformers_version", "dtype"):
        saved.pop(key, None), reloaded.pop(key, None)
    assert reloaded == saved
    assert loaded.config.vqgan_channel_multipliers == (1, 1, 2, 2, 4)  # tuples survive JSON
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(images).logits, loaded(images).logits)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_frozen_and_eval_always():
    model = BEVTVisualTokenizer(small_dalle_config())
    assert model.train() is model
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    assert not model(images).logits.requires_grad


def test_image_and_video_shapes_and_batching():
    model = BEVTVisualTokenizer(small_dalle_config())
    images = torch.rand(2, 3, 112, 112)
    ids = model.get_codebook_indices(images)
    assert ids.shape == (2, 14, 14) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 64
    assert model(images).logits.shape == (2, 64, 14, 14)
    assert model(images, return_dict=False)[0].shape == (2, 64, 14, 14)

    videos = torch.rand(2, 2, 3, 112, 112)
    video_ids = model.get_codebook_indices(videos)
    assert video_ids.shape == (2, 2, 14, 14)
    assert model(videos).logits.shape == (2, 2, 64, 14, 14)
    per_frame = model.get_codebook_indices(videos.flatten(0, 1)).unflatten(0, (2, 2))
    assert torch.equal(video_ids, per_frame)
    assert model.get_codebook_indices(torch.rand(1, 3, 64, 96)).shape == (1, 8, 12)


def test_caller_autocast_does_not_change_ids():
    model = BEVTVisualTokenizer(small_dalle_config())
    images = torch.rand(2, 3, 32, 32)
    expected = model(images).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images).logits
    assert logits.dtype == torch.float32 and torch.equal(logits, expected)


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((2, 4, 32, 32), torch.float32, "3 channels"),
        ((2, 3, 4, 32, 32), torch.float32, r"3 channels in layout \(B, T, C, H, W\)"),
        ((3, 32, 32), torch.float32, "rank-3"),
        ((1, 1, 1, 3, 32, 32), torch.float32, "rank-6"),
        ((1, 3, 36, 32), torch.float32, "multiple of 8"),
        ((1, 3, 32, 20), torch.float32, "multiple of 8"),
        ((1, 3, 32, 32), torch.uint8, "floating-point"),
        ((1, 3, 32, 32), torch.int64, "floating-point"),
    ],
)
def test_bad_input_raises_clear_value_error(shape, dtype, message):
    model = BEVTVisualTokenizer(small_dalle_config())
    pixel_values = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        model.get_codebook_indices(pixel_values)
    with pytest.raises(ValueError, match=message):
        model(pixel_values)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tokenizer_type": "vq-vae"}, "tokenizer_type"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"dalle_hidden_size": 18}, "dalle_hidden_size"),
        ({"logit_laplace_eps": 0.5}, "logit_laplace_eps"),
        ({"image_size": 100}, "image_size"),
        ({"autocast_dtype": "int8"}, "autocast_dtype"),
        ({"vqgan_channel_multipliers": ()}, "vqgan_channel_multipliers"),
        ({"vqgan_attention_levels": (5,)}, "vqgan_attention_levels"),
        ({"vqgan_norm_groups": 48}, "vqgan_norm_groups"),
        ({"vqgan_pixel_range": (1.0, -1.0)}, "vqgan_pixel_range"),
        ({"has_decoder": "yes"}, "has_decoder"),
        ({"vqgan_l2_normalize_codes": 1}, "vqgan_l2_normalize_codes"),
        ({"dalle_decoder_hidden_size": 18}, "dalle_decoder_hidden_size"),
        ({"dalle_decoder_init_size": 0}, "dalle_decoder_init_size"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BEVTVisualTokenizerConfig(**kwargs)


def test_config_defaults_match_bevt():
    config = BEVTVisualTokenizerConfig()
    assert (config.tokenizer_type, config.dalle_hidden_size, config.dalle_num_blocks_per_group) == ("dall-e", 256, 2)
    assert (config.vocab_size, config.logit_laplace_eps, config.downsample_factor, config.image_size) == (
        8192, 0.1, 8, 112
    )


# ---------------------------------------------------------------------------------------------------------------
# VQGAN


def test_quantizer_picks_the_hand_computed_nearest_entry():
    quantizer = BEVTVectorQuantizer(vocab_size=3, embed_dim=2)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
    # latents (1, 2, 1, 4): points (0.1, 0.1) -> 0, (0.9, -0.2) -> 1, (0.2, 1.4) -> 2, (0.6, 0.9) -> 1
    # squared distances for (0.6, 0.9): e0 0.36+0.81=1.17, e1 0.16+0.81=0.97, e2 0.36+1.21=1.57
    points = torch.tensor([[0.1, 0.1], [0.9, -0.2], [0.2, 1.4], [0.6, 0.9]])
    logits = quantizer(points.t().reshape(1, 2, 1, 4))
    assert logits.shape == (1, 3, 1, 4)
    assert logits.argmax(dim=1).flatten().tolist() == [0, 1, 2, 1]
    assert torch.allclose(-logits[0, :, 0, 3], torch.tensor([1.17, 0.97, 1.57]), atol=1e-6)


def _reference_vqgan_ids(state: dict, pixels01: torch.Tensor, levels: int, blocks: int, attention: tuple,
                         groups: int) -> torch.Tensor:
    """Independent functional VQGAN encoder + brute-force nearest codebook, read straight off taming keys."""

    def conv(h, name, **kwargs):
        return F.conv2d(h, state[f"{name}.weight"], state[f"{name}.bias"], **kwargs)

    def norm(h, name):
        return F.group_norm(h, groups, state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    def swish(h):
        return h * torch.sigmoid(h)

    def resnet(h, name):
        r = conv(swish(norm(h, f"{name}.norm1")), f"{name}.conv1", padding=1)
        r = conv(swish(norm(r, f"{name}.norm2")), f"{name}.conv2", padding=1)
        if f"{name}.nin_shortcut.weight" in state:
            h = conv(h, f"{name}.nin_shortcut")
        return h + r

    def attn(h, name):
        n = norm(h, f"{name}.norm")
        q, k, v = (conv(n, f"{name}.{p}").flatten(2) for p in "qkv")
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * q.shape[1] ** -0.5, dim=-1)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(h.shape)
        return h + conv(out, f"{name}.proj_out")

    h = conv(pixels01 * 2 - 1, "encoder.conv_in", padding=1)
    for i in range(levels):
        for j in range(blocks):
            h = resnet(h, f"encoder.down.{i}.block.{j}")
            if i in attention:
                h = attn(h, f"encoder.down.{i}.attn.{j}")
        if i < levels - 1:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", stride=2)
    h = resnet(attn(resnet(h, "encoder.mid.block_1"), "encoder.mid.attn_1"), "encoder.mid.block_2")
    h = conv(swish(norm(h, "encoder.norm_out")), "encoder.conv_out", padding=1)
    z = conv(h, "quant_conv")
    codebook = state["quantize.embedding.weight"]
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    ids = ((flat[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(-1)
    return ids.reshape(z.shape[0], z.shape[2], z.shape[3])


def _taming_state_dict(config: BEVTVisualTokenizerConfig) -> dict[str, torch.Tensor]:
    """Random weights under taming-transformers keys (plus decoder/loss keys a real checkpoint also has; with a
    `has_decoder` config, real decoder weights)."""
    generator = torch.Generator().manual_seed(3)
    state = {}
    for key, value in BEVTVisualTokenizer(config).state_dict().items():
        if value.ndim == 4:
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=generator) / fan_in**0.5
        elif ".norm" in key and key.endswith(".weight"):
            state[key] = 1 + 0.1 * torch.randn(value.shape, generator=generator)
        else:
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
    state["quantize.embedding.weight"] = torch.randn(state["quantize.embedding.weight"].shape, generator=generator)
    if not config.has_decoder:
        state["decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
        state["post_quant_conv.weight"] = torch.zeros(4, 4, 1, 1)
    state["loss.discriminator.main.0.weight"] = torch.zeros(2)
    return state


def test_vqgan_from_taming_checkpoint_matches_reference(tmp_path, shared_data):
    config = small_vqgan_config()
    state = _taming_state_dict(config)
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "vqgan.ckpt")

    assert main(["--format", "vqgan-encoder", "--checkpoint", str(tmp_path / "vqgan.ckpt"),
                 "--output-dir", str(tmp_path / "out"), "--vqgan-norm-groups", "4"]) == 0
    model = BEVTVisualTokenizer.from_pretrained(tmp_path / "out")
    inferred = model.config
    assert inferred.tokenizer_type == "vqgan"
    assert (inferred.vqgan_channels, inferred.vqgan_channel_multipliers, inferred.vqgan_num_res_blocks) == (16, (1, 2), 2)
    assert (inferred.vqgan_attention_levels, inferred.vqgan_z_channels, inferred.vqgan_embed_dim) == ((1,), 8, 6)
    assert inferred.vocab_size == 40 and inferred.downsample_factor == 2

    images = torch.cat([torch.rand(2, 3, 16, 16), real_images(shared_data, 16)])
    expected = _reference_vqgan_ids(state, images, levels=2, blocks=2, attention=(1,), groups=4)
    ids = model.get_codebook_indices(images)
    assert ids.shape == (len(images), 8, 8)
    assert torch.equal(ids, expected)
    videos = images[:6].reshape(2, 3, 3, 16, 16)
    assert torch.equal(model.get_codebook_indices(videos), expected[:6].reshape(2, 3, 8, 8))


def test_vqgan_round_trip_and_bad_checkpoint(tmp_path):
    model = BEVTVisualTokenizer(small_vqgan_config())
    model.save_pretrained(tmp_path / "vq")
    loaded = BEVTVisualTokenizer.from_pretrained(tmp_path / "vq")
    images = torch.rand(2, 3, 8, 8)
    assert torch.equal(model(images).logits, loaded(images).logits)
    with pytest.raises(ValueError, match="multiple of 2"):
        model(torch.rand(1, 3, 9, 8))
    torch.save({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="not a taming-transformers VQGAN checkpoint"):
        convert_vqgan_encoder(tmp_path / "partial.pt")


# ---------------------------------------------------------------------------------------------------------------
# Decoders


def small_dalle_dvae_config(**kwargs) -> BEVTVisualTokenizerConfig:
    """The smallest dVAE the reference `dall_e.Decoder` accepts (vocab >= 512, n_hid >= 64)."""
    values = dict(dalle_hidden_size=64, dalle_num_blocks_per_group=1, vocab_size=512, has_decoder=True,
                  dalle_decoder_init_size=32, dalle_decoder_hidden_size=64, dalle_decoder_num_blocks_per_group=1)
    values.update(kwargs)
    return BEVTVisualTokenizerConfig(**values)


def test_dalle_decoder_matches_reference_with_the_same_weights(tmp_path, dall_e):
    torch.manual_seed(2)
    encoder = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    decoder = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=2, vocab_size=512)
    torch.save(encoder.state_dict(), tmp_path / "enc.pt")
    torch.save(decoder.state_dict(), tmp_path / "dec.pt")
    model = convert_dalle_encoder(tmp_path / "enc.pt", decoder_path=tmp_path / "dec.pt")
    config = model.config
    assert config.has_decoder and (config.dalle_decoder_init_size, config.dalle_decoder_hidden_size) == (32, 64)
    assert config.dalle_decoder_num_blocks_per_group == 2 and config.dalle_num_blocks_per_group == 1

    ids = torch.randint(0, 512, (3, 4, 5))
    one_hot = F.one_hot(ids, 512).permute(0, 3, 1, 2).float()
    probabilities = torch.softmax(3 * torch.randn(2, 512, 4, 4), dim=1)  # relaxed ids, as in dVAE training
    with torch.no_grad():
        stats = decoder(one_hot).float()
        expected_pixels = dall_e.unmap_pixels(torch.sigmoid(stats[:, :3]))
        assert (model.decoder(one_hot) - stats).abs().max().item() <= 1e-6
        assert (model.decoder(probabilities) - decoder(probabilities)).abs().max().item() <= 1e-6
    pixels = model.decode(ids)
    assert pixels.shape == (3, 3, 32, 40) and pixels.dtype == torch.float32
    assert (pixels - expected_pixels).abs().max().item() <= 1e-6
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    videos = ids[:2].unsqueeze(1).expand(2, 3, 4, 5)  # (B, T, h, w)
    assert torch.equal(model.decode(videos), pixels[:2].unsqueeze(1).expand(2, 3, 3, 32, 40))


def test_openai_decoder_pickle_converts(tmp_path, dall_e):
    """OpenAI's encoder.pkl + decoder.pkl are pickled modules (converted without `dall_e` in the full-size test)."""
    torch.manual_seed(3)
    encoder = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    decoder = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(decoder, tmp_path / "decoder.pkl")
    state = load_checkpoint(tmp_path / "decoder.pkl", allow_module_pickle=True, module_classes=DALL_E_DECODER_CLASSES)
    assert sorted(state) == sorted(decoder.state_dict())
    with pytest.raises(UnsafeCheckpointError, match=r"dall_e\.decoder\.Decoder"):
        load_checkpoint(tmp_path / "decoder.pkl")  # a module pickle needs explicit permission

    from bevt.convert import main as convert_main

    assert convert_main(["--format", "dalle-encoder", "--checkpoint", str(tmp_path / "encoder.pkl"),
                         "--decoder", str(tmp_path / "decoder.pkl"), "--output-dir", str(tmp_path / "out")]) == 0
    model = BEVTVisualTokenizer.from_pretrained(tmp_path / "out")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ids = encoder(dall_e.map_pixels(images)).argmax(dim=1)
        expected = dall_e.unmap_pixels(torch.sigmoid(decoder(F.one_hot(ids, 512).permute(0, 3, 1, 2).float())[:, :3]))
    assert torch.equal(model.get_codebook_indices(images), ids)
    assert (model.decode(ids) - expected).abs().max().item() <= 1e-6


def test_dalle_conversion_names_swapped_or_mismatched_files(tmp_path, dall_e):
    torch.save(dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512), tmp_path / "encoder.pkl")
    torch.save(dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512), tmp_path / "decoder.pkl")
    torch.save(dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=1024), tmp_path / "dec1024.pkl")
    with pytest.raises(ValueError, match="decoder.pkl is a DALL-E decoder checkpoint, not the encoder"):
        convert_dalle_encoder(tmp_path / "decoder.pkl")
    with pytest.raises(ValueError, match="encoder.pkl is a DALL-E encoder checkpoint, not the decoder"):
        convert_dalle_encoder(tmp_path / "encoder.pkl", decoder_path=tmp_path / "encoder.pkl")
    with pytest.raises(ValueError, match="1024 token ids but the encoder .* has vocab_size 512"):
        convert_dalle_encoder(tmp_path / "encoder.pkl", tmp_path / "out", decoder_path=tmp_path / "dec1024.pkl")
    assert not (tmp_path / "out").exists()
    from bevt.convert import main as convert_main

    with pytest.raises(SystemExit) as exit_info:  # --decoder belongs to the tokenizer formats
        convert_main(["--format", "video-swin", "--checkpoint", str(tmp_path / "encoder.pkl"), "--output-dir",
                      str(tmp_path / "o"), "--decoder", str(tmp_path / "decoder.pkl")])
    assert exit_info.value.code == 2 and not (tmp_path / "o").exists()


def _reference_vqgan_decode(state: dict, ids: torch.Tensor, levels: int, blocks: int, attention: tuple,
                            groups: int) -> torch.Tensor:
    """Independent functional taming VQGAN decoder (read straight off taming keys): ids -> pixels in [0, 1]."""

    def conv(h, name, **kwargs):
        return F.conv2d(h, state[f"{name}.weight"], state[f"{name}.bias"], **kwargs)

    def norm(h, name):
        return F.group_norm(h, groups, state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    def swish(h):
        return h * torch.sigmoid(h)

    def resnet(h, name):
        r = conv(swish(norm(h, f"{name}.norm1")), f"{name}.conv1", padding=1)
        r = conv(swish(norm(r, f"{name}.norm2")), f"{name}.conv2", padding=1)
        if f"{name}.nin_shortcut.weight" in state:
            h = conv(h, f"{name}.nin_shortcut")
        return h + r

    def attn(h, name):
        n = norm(h, f"{name}.norm")
        q, k, v = (conv(n, f"{name}.{p}").flatten(2) for p in "qkv")
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * q.shape[1] ** -0.5, dim=-1)
        return h + conv(torch.einsum("bij,bcj->bci", weights, v).reshape(h.shape), f"{name}.proj_out")

    z = state["quantize.embedding.weight"][ids].permute(0, 3, 1, 2)
    h = conv(conv(z, "post_quant_conv"), "decoder.conv_in", padding=1)
    h = resnet(attn(resnet(h, "decoder.mid.block_1"), "decoder.mid.attn_1"), "decoder.mid.block_2")
    for i in reversed(range(levels)):
        for j in range(blocks + 1):
            h = resnet(h, f"decoder.up.{i}.block.{j}")
            if i in attention:
                h = attn(h, f"decoder.up.{i}.attn.{j}")
        if i > 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv", padding=1)
    h = conv(swish(norm(h, "decoder.norm_out")), "decoder.conv_out", padding=1)
    return ((h + 1) / 2).clamp(0, 1)


def test_vqgan_decoder_from_taming_checkpoint_matches_reference(tmp_path, shared_data):
    config = small_vqgan_config(vqgan_channel_multipliers=(1, 2, 2), vqgan_attention_levels=(2,), has_decoder=True)
    state = _taming_state_dict(config)
    assert {"post_quant_conv.weight", "decoder.up.2.attn.2.q.weight", "decoder.up.1.upsample.conv.weight"} <= set(state)
    torch.save({"state_dict": state}, tmp_path / "vqgan.ckpt")
    ckpt = str(tmp_path / "vqgan.ckpt")
    assert main(["--format", "vqgan-encoder", "--checkpoint", ckpt, "--decoder", ckpt,
                 "--output-dir", str(tmp_path / "out"), "--vqgan-norm-groups", "4"]) == 0
    model = BEVTVisualTokenizer.from_pretrained(tmp_path / "out")
    assert model.config.has_decoder

    images = torch.cat([torch.rand(2, 3, 16, 16), real_images(shared_data, 16)])
    ids = model.get_codebook_indices(images)
    assert torch.equal(ids, _reference_vqgan_ids(state, images, levels=3, blocks=2, attention=(2,), groups=4))
    expected = _reference_vqgan_decode(state, ids, levels=3, blocks=2, attention=(2,), groups=4)
    pixels = model.decode(ids)
    assert pixels.shape == images.shape
    assert (pixels - expected).abs().max().item() <= 1e-5
    # the encoder-only conversion of the same file ignores the decoder
    assert not convert_vqgan_encoder(tmp_path / "vqgan.ckpt", vqgan_norm_groups=4).config.has_decoder
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("decoder.")}}, tmp_path / "enc.ckpt")
    with pytest.raises(ValueError, match="not a taming-transformers VQGAN decoder"):
        convert_vqgan_encoder(tmp_path / "enc.ckpt", decoder_path=tmp_path / "enc.ckpt", vqgan_norm_groups=4)


def test_l2_normalized_codes_pick_the_nearest_direction():
    quantizer = BEVTVectorQuantizer(vocab_size=3, embed_dim=2, l2_normalize=True)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 0.1], [-1.0, -1.0]]))
    # by direction (cosine): (3, 0.5) -> e0, (0.2, 1.0) -> e1, (-0.1, -0.3) -> e2. By Euclidean distance all three
    # are nearest to the short e1 = (0, 0.1): squared distances 9.16, 0.85, 0.17 (vs 49.25 / 18.25, 96.04 / 2.81,
    # 102.1 / 1.3 for e0 / e2).
    points = torch.tensor([[3.0, 0.5], [0.2, 1.0], [-0.1, -0.3]])
    logits = quantizer(points.t().reshape(1, 2, 1, 3))
    assert logits.argmax(dim=1).flatten().tolist() == [0, 1, 2]
    assert torch.allclose(quantizer.codes().norm(dim=-1), torch.ones(3))
    unnormalized = BEVTVectorQuantizer(vocab_size=3, embed_dim=2)
    unnormalized.load_state_dict(quantizer.state_dict())
    assert unnormalized(points.t().reshape(1, 2, 1, 3)).argmax(dim=1).flatten().tolist() == [1, 1, 1]


@pytest.mark.parametrize("config_fn", [small_dalle_dvae_config, lambda: small_vqgan_config(has_decoder=True)])
def test_decoder_round_trip(tmp_path, config_fn):
    model = BEVTVisualTokenizer(config_fn())
    model.save_pretrained(tmp_path)
    loaded = BEVTVisualTokenizer.from_pretrained(tmp_path)
    assert loaded.config.has_decoder and not any(p.requires_grad for p in loaded.parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 2, 3, 3))
    assert torch.equal(model.decode(ids), loaded.decode(ids))
    factor = model.config.downsample_factor
    assert loaded.decode(ids).shape == (2, 2, 3, 3 * factor, 3 * factor)


def test_old_folder_without_decoder_field_loads_and_refuses_to_decode(tmp_path):
    import json

    BEVTVisualTokenizer(small_dalle_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in [k for k in config if "decoder" in k]:
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = BEVTVisualTokenizer.from_pretrained(tmp_path)
    assert not model.config.has_decoder and not hasattr(model, "decoder")
    assert model.get_codebook_indices(torch.rand(1, 3, 16, 16)).shape == (1, 2, 2)
    with pytest.raises(ValueError, match=r"has no decoder \(config.has_decoder=False"):
        model.decode(torch.zeros(1, 2, 2, dtype=torch.long))


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.full((1, 2, 2), 512), r"token ids must lie in \[0, 512\) .* from 512 to 512"),
        (torch.tensor([[[0, -1]]]), r"from -1 to 0"),
        (torch.zeros(1, 2, 2), "integer tensor of token ids, got dtype torch.float32"),
        (torch.zeros(2, 2, dtype=torch.long), r"\(B, h, w\) .* shape \(2, 2\)"),
        (torch.zeros(1, 1, 1, 2, 2, dtype=torch.long), r"shape \(1, 1, 1, 2, 2\)"),
        ([[0, 1]], "must be a torch.Tensor"),
    ],
)
def test_decode_bad_ids_raise_clear_errors(ids, message):
    model = BEVTVisualTokenizer(small_dalle_dvae_config())
    with pytest.raises(ValueError, match=message):
        model.decode(ids)


def test_codebook_size_that_does_not_match_vocab_size_is_refused(tmp_path):
    import json

    BEVTVisualTokenizer(small_vqgan_config(vocab_size=40)).save_pretrained(tmp_path / "vq")
    with pytest.raises(ValueError, match=r"has 40 token ids \(quantize.embedding.weight .* vocab_size=64"):
        BEVTVisualTokenizer.from_pretrained(tmp_path / "vq", vocab_size=64, ignore_mismatched_sizes=True)
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    (tmp_path / "vq" / "config.json").write_text(json.dumps({**config, "vocab_size": 64}))
    with pytest.raises(ValueError, match="has 40 token ids"):
        AutoModel.from_pretrained(tmp_path / "vq")
    BEVTVisualTokenizer(small_dalle_dvae_config()).save_pretrained(tmp_path / "dvae")
    with pytest.raises(ValueError, match=r"512 token ids \(encoder.output_conv.weight"):
        BEVTVisualTokenizer.from_pretrained(tmp_path / "dvae", vocab_size=1024)
