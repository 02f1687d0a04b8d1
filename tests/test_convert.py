"""Checkpoint conversion: official BEVT / Video Swin / 2D Swin / torchvision layouts -> bevt models.

The source state dicts are built here by hand in the key layout of the original code (xyzforever/BEVT
`SwinTransformerBEVT` + `BEVTMultiSourceHead`, Video Swin `SwinTransformer3D` + `I3DHead` in mmaction2 checkpoints,
Microsoft Swin / SimMIM image checkpoints, torchvision `swin3d_t`), with small shapes so everything runs on CPU.
"""

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForVideoClassification

from bevt import BEVTConfig, BEVTForMaskedVideoModeling, BEVTForVideoClassification, BEVTModel
from bevt.conversion_swin import (
    ConversionError,
    infer_window,
    inflate_relative_position_bias,
    resize_relative_position_bias,
    window_candidates,
)
from bevt.convert import convert_checkpoint, convert_state_dict, load_swin2d_into, main, read_label_file

EMBED, DEPTHS, HEADS, WINDOW, VOCAB, CLASSES = 16, (1, 1, 2, 1), (1, 2, 2, 4), (4, 2, 2), 64, 5
FINAL = EMBED * 8


def table_rows(window) -> int:
    return math.prod(2 * w - 1 for w in window)


class Weights:
    """Random tensors in official-layout shapes; weights scaled by fan-in so activations stay O(1)."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape, kind="weight") -> torch.Tensor:
        if kind == "norm":
            return 1 + 0.2 * torch.randn(shape, generator=self.g)
        if kind == "bias":
            return 0.1 * torch.randn(shape, generator=self.g)
        if kind == "table":
            return 0.5 * torch.randn(shape, generator=self.g)
        fan_in = math.prod(shape[1:]) or 1
        return torch.randn(shape, generator=self.g) / math.sqrt(fan_in)


def official_backbone(
    w: Weights, window=WINDOW, image=False, bevt=True, heads=True, patch_norm=True
) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the official `SwinTransformerBEVT` (or Video Swin `SwinTransformer3D` with
    bevt=False; or a 2D image Swin with image=True), keys without the `backbone.` prefix."""
    sd: dict[str, torch.Tensor] = {}

    def linear(name, out_dim, in_dim, bias=True):
        sd[f"{name}.weight"] = w(out_dim, in_dim)
        if bias:
            sd[f"{name}.bias"] = w(out_dim, kind="bias")

    def norm(name, dim):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = w(dim, kind="norm"), w(dim, kind="bias")

    sd["patch_embed.proj.weight"] = w(EMBED, 3, 4, 4) if image else w(EMBED, 3, 2, 4, 4)
    sd["patch_embed.proj.bias"] = w(EMBED, kind="bias")
    if patch_norm:
        norm("patch_embed.norm", EMBED)
    if bevt and not image:
        sd["patch_embed_2d.proj.weight"], sd["patch_embed_2d.proj.bias"] = w(EMBED, 3, 4, 4), w(EMBED, kind="bias")
        if patch_norm:
            norm("patch_embed_2d.norm", EMBED)
    if bevt:
        sd["mask_token"] = w(1, 1, EMBED, kind="bias")
    tokens = math.prod(window)
    for i, (depth, num_heads) in enumerate(zip(DEPTHS, HEADS)):
        dim = EMBED * 2**i
        for j in range(depth):
            block = f"layers.{i}.blocks.{j}"
            norm(f"{block}.norm1", dim)
            sd[f"{block}.attn.relative_position_bias_table"] = w(table_rows(window), num_heads, kind="table")
            sd[f"{block}.attn.relative_position_index"] = torch.randint(0, table_rows(window), (tokens, tokens))
            linear(f"{block}.attn.qkv", 3 * dim, dim)
            linear(f"{block}.attn.proj", dim, dim)
            norm(f"{block}.norm2", dim)
            linear(f"{block}.mlp.fc1", 4 * dim, dim)
            linear(f"{block}.mlp.fc2", dim, 4 * dim)
        if i < len(DEPTHS) - 1:
            norm(f"layers.{i}.downsample.norm", 4 * dim)
            linear(f"layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
    norm("norm", FINAL)
    if bevt and heads:
        if not image:
            sd["fpn_s.0.weight"], sd["fpn_s.0.bias"] = w(FINAL, FINAL, 1, 2, 2), w(FINAL, kind="bias")
            linear("lm_down_st.0", FINAL, FINAL + FINAL // 2)
            sd["fpn_t.0.weight"], sd["fpn_t.0.bias"] = w(FINAL, FINAL, 2, 1, 1), w(FINAL, kind="bias")
        sd["fpn.0.weight"], sd["fpn.0.bias"] = w(FINAL, FINAL, 2, 2), w(FINAL, kind="bias")
        linear("lm_down", FINAL, FINAL + FINAL // 2)
    return sd


def pretrain_checkpoint(seed=0) -> dict:
    """mmaction2 checkpoint of the official BEVT joint pretraining (backbone + BEVTMultiSourceHead)."""
    w = Weights(seed)
    state = {f"backbone.{k}": v for k, v in official_backbone(w).items()}
    state["cls_head.lm_head.weight"], state["cls_head.lm_head.bias"] = w(VOCAB, FINAL), w(VOCAB, kind="bias")
    state["cls_head.vae_encoder.blocks.input.w"] = w(8, 3, 7, 7)  # the frozen DALL-E encoder is saved too
    state["cls_head.vae_encoder.blocks.input.b"] = w(8, kind="bias")
    return {"meta": {"epoch": 150}, "state_dict": state}


def recognizer_checkpoint(seed=0, window=WINDOW) -> dict:
    """mmaction2 checkpoint of a Video Swin recognizer (SwinTransformer3D + I3DHead)."""
    w = Weights(seed)
    state = {f"backbone.{k}": v for k, v in official_backbone(w, window=window, bevt=False).items()}
    state["cls_head.fc_cls.weight"], state["cls_head.fc_cls.bias"] = w(CLASSES, FINAL), w(CLASSES, kind="bias")
    return {"meta": {}, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


# Official module paths -> bevt module paths (written from the two codebases, independently of bevt.convert).
RENAMES = [
    ("backbone.patch_embed.proj.", "bevt.embeddings.patch_embeddings.projection."),
    ("backbone.patch_embed.norm.", "bevt.embeddings.patch_embeddings.norm."),
    ("backbone.patch_embed_2d.proj.", "bevt.embeddings.patch_embeddings.image_projection."),
    ("backbone.patch_embed_2d.norm.", "bevt.embeddings.patch_embeddings.image_norm."),
    ("backbone.mask_token", "bevt.embeddings.mask_token"),
    ("backbone.norm.", "bevt.layernorm."),
    ("backbone.fpn_s.0.", "head.video_spatial_upsample."),
    ("backbone.lm_down_st.0.", "head.video_fuse."),
    ("backbone.fpn_t.0.", "head.video_temporal_upsample."),
    ("backbone.fpn.0.", "head.image_upsample."),
    ("backbone.lm_down.", "head.image_fuse."),
    ("cls_head.lm_head.", "head.lm_head."),
    ("cls_head.fc_cls.", "classifier."),
    ("backbone.layers.", "bevt.encoder.layers."),
]
BLOCK_RENAMES = [
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
    (".attn.", ".attention."),
]


def expected_target(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    for old, new in BLOCK_RENAMES:
        key = key.replace(old, new)
    return key


def video(batch=1, frames=8, size=64, seed=0) -> torch.Tensor:
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- bevt-pretrain


def test_bevt_pretrain_maps_every_tensor_and_saves_a_loadable_folder(tmp_path):
    checkpoint = pretrain_checkpoint()
    torch.save(checkpoint, tmp_path / "bevt.pth")
    model, report = convert_checkpoint("bevt-pretrain", tmp_path / "bevt.pth", tmp_path / "out")

    assert isinstance(model, BEVTForMaskedVideoModeling)
    config = model.config
    assert (config.embed_dim, config.depths, config.num_heads) == (EMBED, DEPTHS, HEADS)
    assert config.window_size == WINDOW and config.vocab_size == VOCAB and config.patch_size == (2, 4, 4)
    assert config.num_frames == 16 and config.patch_norm

    params = model.state_dict()
    source = checkpoint["state_dict"]
    dropped = {k for k in source if k.endswith("relative_position_index") or ".vae_encoder." in k}
    for key, value in source.items():
        if key in dropped:
            continue
        target = expected_target(key)
        assert torch.equal(params[target], value), f"{key} -> {target}"
        assert report.mapped[target] == key
    assert set(report.dropped) == dropped
    assert "tokenizer" in report.dropped["cls_head.vae_encoder.blocks.input.w"]
    assert report.new_init == {} and report.transformed == {}
    assert set(report.mapped) == set(params)
    assert report.ignored_entries == ["meta"]

    loaded = AutoModelForPreTraining.from_pretrained(tmp_path / "out").eval()
    assert isinstance(loaded, BEVTForMaskedVideoModeling)
    pixel_values = video()
    mask = torch.rand(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model(pixel_values=pixel_values, bool_masked_pos=mask, image_pixel_values=images)
        b = loaded(pixel_values=pixel_values, bool_masked_pos=mask, image_pixel_values=images)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.image_logits, b.image_logits)
    saved_report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert saved_report["format"] == "bevt-pretrain" and len(saved_report["mapped"]) == len(params)
    assert (tmp_path / "out" / "video_preprocessor_config.json").is_file()


def test_bevt_pretrain_to_base_model_drops_the_heads():
    model, report = convert_state_dict("bevt-pretrain", pretrain_checkpoint()["state_dict"], task="base")
    assert type(model) is BEVTModel
    assert report.dropped["backbone.fpn_s.0.weight"] == "not part of BEVTModel"
    assert report.dropped["cls_head.lm_head.weight"] == "not part of BEVTModel"
    assert report.mapped["encoder.layers.2.blocks.1.attention.qkv.weight"] == "backbone.layers.2.blocks.1.attn.qkv.weight"
    assert not report.new_init


# ------------------------------------------------------------------------------------------------ video-swin


def test_video_swin_recognizer_with_class_names_via_cli(tmp_path, capsys):
    checkpoint = recognizer_checkpoint()
    torch.save(checkpoint, tmp_path / "k400.pth")
    names = [f"action {i}" for i in range(CLASSES)]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n\n")
    argv = ["--format", "video-swin", "--checkpoint", str(tmp_path / "k400.pth"), "--output-dir", str(tmp_path / "out"),
            "--id2label", str(tmp_path / "labels.txt"), "--num-frames", "12"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "NEWLY INITIALISED: 5" in printed and "image-stream patch embedding" in printed

    model = AutoModelForVideoClassification.from_pretrained(tmp_path / "out").eval()
    assert isinstance(model, BEVTForVideoClassification)
    assert model.config.id2label == dict(enumerate(names)) and model.config.label2id["action 3"] == 3
    assert model.config.num_frames == 12 and model.config.window_size == WINDOW
    source = checkpoint["state_dict"]
    assert torch.equal(model.classifier.weight, source["cls_head.fc_cls.weight"])
    assert torch.equal(model.bevt.layernorm.bias, source["backbone.norm.bias"])
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert set(report["new_init"]) == {
        "bevt.embeddings.mask_token",
        *(f"bevt.embeddings.patch_embeddings.image_{m}.{p}" for m in ("projection", "norm") for p in ("weight", "bias")),
    }
    assert report["ignored_entries"] == ["meta", "optimizer"]
    processor = json.loads((tmp_path / "out" / "video_preprocessor_config.json").read_text())
    assert processor["num_frames"] == 12 and processor["frame_interval"] == 2
    with torch.no_grad():
        assert model(video(frames=12)).logits.shape == (1, CLASSES)


def test_window_interpolation_is_trilinear_over_the_offset_volume():
    source = recognizer_checkpoint()["state_dict"]
    model, report = convert_state_dict("video-swin", source, window_size=(8, 2, 2))
    assert model.config.window_size == (8, 2, 2)
    table = source["backbone.layers.2.blocks.1.attn.relative_position_bias_table"]  # (7*3*3, 2)
    expected = F.interpolate(table.t().reshape(1, 2, 7, 3, 3), size=(15, 3, 3), mode="trilinear")
    expected = expected.reshape(2, -1).t()
    ours = model.bevt.encoder.layers[2].blocks[1].attention.relative_position_bias_table
    assert ours.shape == (15 * 3 * 3, 2) and torch.allclose(ours, expected, atol=1e-6)
    assert "trilinear" in report.transformed["bevt.encoder.layers.2.blocks.1.attention.relative_position_bias_table"]
    with torch.no_grad():
        assert model(video(frames=16)).logits.shape == (1, CLASSES)
    # the same window leaves the table untouched; a constant table stays constant when resized
    assert resize_relative_position_bias(table, WINDOW, WINDOW) is table
    constant = torch.full((table_rows(WINDOW), 3), 0.7)
    assert torch.allclose(resize_relative_position_bias(constant, WINDOW, (16, 3, 3)), torch.full((31 * 25, 3), 0.7))


# ---------------------------------------------------------------------------------------------- swin2d-image


def swin2d_checkpoint(window=2, seed=3) -> dict[str, torch.Tensor]:
    """Microsoft Swin image classifier layout: `model` entry, classification `head`, `attn_mask` buffers."""
    w = Weights(seed)
    state = official_backbone(w, window=(window, window), image=True, bevt=False)
    state["head.weight"], state["head.bias"] = w(1000, FINAL), w(1000, kind="bias")
    state["layers.0.blocks.0.attn_mask"] = torch.zeros(4, window * window, window * window)
    return {"model": state}


def test_swin2d_inflation_matches_the_official_rules(tmp_path):
    checkpoint = swin2d_checkpoint(window=2)
    torch.save(checkpoint, tmp_path / "swin.pth")
    model, report = convert_checkpoint("swin2d-image", tmp_path / "swin.pth", tmp_path / "out", window_size=WINDOW)
    source = checkpoint["model"]
    patch = model.bevt.embeddings.patch_embeddings

    weight_2d = source["patch_embed.proj.weight"]
    assert torch.equal(patch.image_projection.weight, weight_2d)
    assert torch.equal(patch.image_norm.weight, source["patch_embed.norm.weight"])
    assert torch.allclose(patch.projection.weight, weight_2d[:, :, None].repeat(1, 1, 2, 1, 1) / 2)
    frame = torch.randn(1, 3, 16, 16)  # a static clip embeds like its frame
    static = frame[:, :, None].repeat(1, 1, 2, 1, 1)
    assert torch.allclose(patch.projection(static)[:, :, 0], patch.image_projection(frame), atol=1e-6)

    table_2d = source["layers.2.blocks.1.attn.relative_position_bias_table"]  # (3*3, 2)
    table_3d = model.bevt.encoder.layers[2].blocks[1].attention.relative_position_bias_table
    assert table_3d.shape == (7 * 9, 2)
    assert all(torch.equal(chunk, table_2d) for chunk in table_3d.split(9))  # same bias at every temporal offset
    assert torch.equal(model.bevt.layernorm.weight, source["norm.weight"])

    assert set(report.dropped) == {
        "head.weight", "head.bias", "layers.0.blocks.0.attn_mask",
        *(k for k in source if k.endswith("relative_position_index")),
    }
    new = set(report.new_init)
    assert "bevt.embeddings.mask_token" in new and "head.lm_head.weight" in new and "head.video_fuse.weight" in new
    assert not any(k.startswith("bevt.encoder") for k in new)
    assert AutoConfig.from_pretrained(tmp_path / "out").window_size == WINDOW
    with torch.no_grad():
        out = model(pixel_values=video(), image_pixel_values=torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 8 * 16, 8192) and out.image_logits.shape == (1, 16, 8192)


def test_swin2d_bicubic_resize_when_the_2d_window_differs():
    table = Weights(4)(25, 3, kind="table")  # 2D window 3x3
    inflated = inflate_relative_position_bias(table, (3, 3), (4, 2, 2))
    spatial = F.interpolate(table.t().reshape(1, 3, 5, 5), size=(3, 3), mode="bicubic").reshape(3, 9).t()
    assert inflated.shape == (7 * 9, 3)
    assert torch.allclose(inflated, spatial.repeat(7, 1), atol=1e-6)

    checkpoint = swin2d_checkpoint(window=3)
    model, report = convert_state_dict("swin2d-image", checkpoint["model"], window_size=WINDOW, task="base")
    assert type(model) is BEVTModel
    assert report.source_window_size == (3, 3)
    assert "bicubic" in report.transformed["encoder.layers.0.blocks.0.attention.relative_position_bias_table"]


def test_simmim_style_checkpoint_with_heads_and_mask_token():
    """Prefixed `encoder.` keys, a mask token, a pixel decoder, and (as a BEVT image-stream stage-1 model may have)
    the image prediction head and lm_head."""
    w = Weights(5)
    backbone = official_backbone(w, window=(2, 2), image=True, bevt=True, heads=True)
    state = {f"encoder.{k}": v for k, v in backbone.items()}
    state["decoder.0.weight"], state["decoder.0.bias"] = w(48, FINAL, 1, 1), w(48, kind="bias")
    state["lm_head.weight"], state["lm_head.bias"] = w(VOCAB, FINAL), w(VOCAB, kind="bias")
    model, report = convert_state_dict("swin2d-image", state)
    assert model.config.window_size == (8, 7, 7)  # default target window: bicubic 3x3 -> 13x13, 15 offsets
    assert model.config.vocab_size == VOCAB
    assert torch.equal(model.bevt.embeddings.mask_token, backbone["mask_token"])
    assert torch.equal(model.head.image_fuse.weight, backbone["lm_down.weight"])
    assert torch.equal(model.head.lm_head.weight, state["lm_head.weight"])
    assert set(report.new_init) == {f"head.video_{m}.{p}" for m in ("spatial_upsample", "fuse", "temporal_upsample")
                                    for p in ("weight", "bias")}
    assert report.dropped["decoder.0.weight"].startswith("pixel decoder")


def test_load_swin2d_into_an_existing_model():
    config = BEVTConfig(embed_dim=EMBED, depths=DEPTHS, num_heads=HEADS, window_size=WINDOW, vocab_size=VOCAB)
    model = BEVTForMaskedVideoModeling(config)
    untouched = model.head.lm_head.weight.clone()
    checkpoint = swin2d_checkpoint(window=2)
    report = load_swin2d_into(model, checkpoint)
    source = checkpoint["model"]
    assert torch.equal(model.bevt.encoder.layers[1].blocks[0].mlp.fc2.weight, source["layers.1.blocks.0.mlp.fc2.weight"])
    assert torch.equal(model.head.lm_head.weight, untouched) and "head.lm_head.weight" in report.new_init
    assert report.model_class == "BEVTForMaskedVideoModeling"

    classifier = BEVTForVideoClassification(BEVTConfig(**{**config.to_dict(), "num_labels": 3}))
    report = load_swin2d_into(classifier, checkpoint)
    assert "classifier.weight" in report.new_init

    wrong = BEVTModel(BEVTConfig(embed_dim=32, depths=DEPTHS, num_heads=HEADS, window_size=WINDOW))
    with pytest.raises(ConversionError, match="embed_dim: checkpoint 16, model 32"):
        load_swin2d_into(wrong, checkpoint)


# ------------------------------------------------------------------------------------------ torchvision-swin3d


def test_torchvision_swin3d_t_logits_match(tmp_path):
    from torchvision.models.video import swin3d_t

    torch.manual_seed(0)
    reference = swin3d_t(num_classes=7).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(std=0.5)
            elif "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    save_file(reference.state_dict(), tmp_path / "swin3d_t.safetensors")
    _, report = convert_checkpoint("torchvision-swin3d", tmp_path / "swin3d_t.safetensors", tmp_path / "out")
    assert report.window_size == (8, 7, 7) and len(report.dropped) == 12  # the relative_position_index buffers
    model = AutoModelForVideoClassification.from_pretrained(tmp_path / "out").eval()
    assert model.config.embed_dim == 96 and model.config.depths == (2, 2, 6, 2) and model.config.num_frames == 32

    g = torch.Generator().manual_seed(0)
    for shape in [(1, 3, 16, 224, 224), (1, 3, 5, 72, 88)]:  # (B, C, T, H, W) as torchvision takes it
        clip = torch.randn(shape, generator=g)
        with torch.inference_mode():
            expected = reference(clip)
            logits = model(clip.transpose(1, 2)).logits
        assert torch.allclose(logits, expected, atol=1e-4, rtol=0), (shape, (logits - expected).abs().max())


# ------------------------------------------------------------------------------------------------------ errors


def test_unmapped_source_key_is_an_error_unless_dropped_on_purpose():
    state = dict(recognizer_checkpoint()["state_dict"])
    state["backbone.extra_adapter.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match=r"no counterpart.*backbone\.extra_adapter\.weight"):
        convert_state_dict("video-swin", state)
    _, report = convert_state_dict("video-swin", state, drop_keys=[r"extra_adapter"])
    assert "--drop-keys" in report.dropped["backbone.extra_adapter.weight"]


def test_missing_target_parameters_are_listed():
    state = dict(recognizer_checkpoint()["state_dict"])
    del state["backbone.layers.2.blocks.1.attn.proj.weight"]
    del state["backbone.layers.0.downsample.reduction.weight"]
    with pytest.raises(ConversionError, match="2 parameters") as error:
        convert_state_dict("video-swin", state)
    assert "bevt.encoder.layers.2.blocks.1.attention.proj.weight" in str(error.value)
    assert "bevt.encoder.layers.0.downsample.reduction.weight" in str(error.value)

    pretrain = dict(pretrain_checkpoint()["state_dict"])
    del pretrain["backbone.mask_token"]
    with pytest.raises(ConversionError, match="bevt.embeddings.mask_token"):
        convert_state_dict("bevt-pretrain", pretrain)  # a pretraining checkpoint must provide everything


def test_inconsistent_tensors_are_errors():
    state = dict(recognizer_checkpoint()["state_dict"])
    state["backbone.layers.1.blocks.0.attn.relative_position_bias_table"] = torch.zeros(15 * 9, 2)
    with pytest.raises(ConversionError, match="disagree"):
        convert_state_dict("video-swin", state)

    state = dict(recognizer_checkpoint()["state_dict"])
    state["backbone.layers.2.blocks.1.attn.relative_position_bias_table"] = torch.zeros(table_rows(WINDOW), 4)
    with pytest.raises(ConversionError, match="stage 2 disagree on the number of heads"):
        convert_state_dict("video-swin", state)

    state = dict(recognizer_checkpoint()["state_dict"])
    state["cls_head.fc_cls.bias"] = torch.zeros(CLASSES + 1)
    with pytest.raises(ConversionError, match=r"shape mismatches: cls_head\.fc_cls\.bias"):
        convert_state_dict("video-swin", state)


def test_window_inference():
    assert window_candidates(15 * 13 * 13, 3) == [(8, 7, 7)]
    assert window_candidates(31 * 13 * 13, 3) == [(16, 7, 7)]
    assert window_candidates(13 * 13, 2) == [(7, 7)]
    # 729 = 81*3*3 = 9*9*9 = 1*27*27: ambiguous unless a preferred or given window fits
    lengths = {"a": 729, "b": 729}
    with pytest.raises(ConversionError, match="fit several windows"):
        infer_window(lengths, 3, preferred=[(8, 7, 7)])
    assert infer_window(lengths, 3, preferred=[(5, 5, 5)]) == (5, 5, 5)
    assert infer_window(lengths, 3, given=(5, 5, 5)) == (5, 5, 5)
    with pytest.raises(ConversionError, match="needs bias tables of 2535 rows"):
        infer_window(lengths, 3, given=(8, 7, 7))


def test_wrong_format_task_and_labels_are_errors(tmp_path):
    video_state = recognizer_checkpoint()["state_dict"]
    with pytest.raises(ConversionError, match="use --format video-swin"):
        convert_state_dict("swin2d-image", video_state)
    with pytest.raises(ConversionError, match="use --format swin2d-image"):
        convert_state_dict("video-swin", swin2d_checkpoint()["model"])
    with pytest.raises(ConversionError, match="use --format video-swin"):
        convert_state_dict("bevt-pretrain", video_state)
    with pytest.raises(ConversionError, match="use --format bevt-pretrain"):
        convert_state_dict("video-swin", pretrain_checkpoint()["state_dict"])
    with pytest.raises(ConversionError, match="not 'pretraining'"):
        convert_state_dict("video-swin", video_state, task="pretraining")
    with pytest.raises(ConversionError, match="3 class names, the checkpoint's classifier has 5"):
        convert_state_dict("video-swin", video_state, id2label=["a", "b", "c"])
    with pytest.raises(ConversionError, match="unknown format"):
        convert_state_dict("swin-v2", video_state)
    (tmp_path / "dup.txt").write_text("run\njump\nrun\n")
    with pytest.raises(ConversionError, match="duplicate class names"):
        read_label_file(tmp_path / "dup.txt")


class NotAWeight:
    pass


def test_cli_reports_errors_and_refuses_unsafe_pickles(tmp_path, capsys):
    state = dict(recognizer_checkpoint()["state_dict"])
    state["backbone.unknown.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    out = tmp_path / "out"
    assert main(["--format", "video-swin", "--checkpoint", str(tmp_path / "bad.pth"), "--output-dir", str(out)]) == 1
    assert "backbone.unknown.weight" in capsys.readouterr().err
    assert not out.exists()

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": NotAWeight()}, f, protocol=2)
    assert main(["--format", "video-swin", "--checkpoint", str(tmp_path / "evil.pth"), "--output-dir", str(out)]) == 1
    assert "refusing to unpickle" in capsys.readouterr().err


def test_cli_dispatches_tokenizer_formats(tmp_path, monkeypatch):
    import bevt.convert_tokenizer as convert_tokenizer

    calls = []

    class FakeTokenizer:
        config = BEVTConfig.from_preset("test")

    def fake(checkpoint, output_dir, **kwargs):
        calls.append((checkpoint, output_dir, kwargs))
        return FakeTokenizer()

    monkeypatch.setattr(convert_tokenizer, "convert_dalle_encoder", fake)
    monkeypatch.setattr(convert_tokenizer, "convert_vqgan_encoder", fake)
    args = ["--checkpoint", str(tmp_path / "encoder.pkl"), "--output-dir", str(tmp_path / "tok")]
    assert main(["--format", "dalle-encoder", *args]) == 0
    assert main(["--format", "vqgan-encoder", *args, "--vqgan-norm-groups", "16"]) == 0
    assert calls[0][:2] == (tmp_path / "encoder.pkl", tmp_path / "tok") and calls[1][2] == {"vqgan_norm_groups": 16}


def test_base_model_from_a_recognizer_loads_with_automodel(tmp_path):
    torch.save(recognizer_checkpoint(), tmp_path / "k400.pth")
    model, report = convert_checkpoint("video-swin", tmp_path / "k400.pth", tmp_path / "out", task="base")
    assert report.dropped["cls_head.fc_cls.weight"] == "not part of BEVTModel"
    loaded = AutoModel.from_pretrained(tmp_path / "out")
    assert type(loaded) is BEVTModel
    assert torch.equal(loaded.layernorm.weight, model.layernorm.weight)


def test_converted_recognizer_works_with_the_video_classification_pipeline(tmp_path, shared_data):
    pytest.importorskip("av")
    from transformers import pipeline

    torch.save(recognizer_checkpoint(), tmp_path / "k400.pth")
    names = ["archery", "bowling", "cooking", "dancing", "eating"]
    convert_checkpoint("video-swin", tmp_path / "k400.pth", tmp_path / "out", id2label=names, num_frames=8)
    classifier = pipeline("video-classification", model=str(tmp_path / "out"))
    predictions = classifier(str(shared_data / "videos" / "kinetics400_arm_wrestling.mp4"), top_k=CLASSES)
    assert sorted(p["label"] for p in predictions) == names
    assert abs(sum(p["score"] for p in predictions) - 1) < 1e-4
