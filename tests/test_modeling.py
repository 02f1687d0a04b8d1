"""Model core: config, encoder (video + image), heads, Auto classes, save/load, remote code."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForVideoClassification,
)

from bevt import BEVTConfig, BEVTForMaskedVideoModeling, BEVTForVideoClassification, BEVTModel
from bevt.modeling_bevt import (
    SHIFT_MASK_VALUE,
    make_shift_mask,
    relative_position_index,
    window_partition,
    window_reverse,
)

VOCAB = 64


def tiny_config(**kwargs) -> BEVTConfig:
    return BEVTConfig.from_preset("test", **kwargs)


def video_batch(batch=2, frames=8, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, frames, 3, size, size, generator=g)
    mask = torch.rand(batch, frames // 2, size // 16, size // 16, generator=g) < 0.5
    labels = torch.randint(0, VOCAB, (batch, frames, size // 16, size // 16), generator=g)
    return pixel_values, mask, labels


def image_batch(batch=3, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    mask = torch.rand(batch, size // 16, size // 16, generator=g) < 0.5
    labels = torch.randint(0, VOCAB, (batch, size // 16, size // 16), generator=g)
    return pixel_values, mask, labels


# ---------------------------------------------------------------------------------------------- config


def test_presets_match_video_swin():
    base = BEVTConfig.from_preset("base")
    assert base.embed_dim == 128 and base.depths == (2, 2, 18, 2) and base.num_heads == (4, 8, 16, 32)
    assert base.window_size == (8, 7, 7) and base.patch_size == (2, 4, 4) and base.vocab_size == 8192
    tiny = BEVTConfig.from_preset("tiny")
    assert tiny.embed_dim == 96 and tiny.depths == (2, 2, 6, 2) and tiny.num_heads == (3, 6, 12, 24)
    assert BEVTConfig.from_preset("small").depths == (2, 2, 18, 2)
    assert BEVTConfig.from_preset("large").embed_dim == 192
    assert BEVTConfig.from_preset("base", num_frames=32).num_frames == 32
    with pytest.raises(ValueError, match="unknown preset"):
        BEVTConfig.from_preset("huge")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_heads": (5, 6, 12, 24)}, "num_heads"),
        ({"depths": (2, 2, 6)}, "depths"),
        ({"window_size": (7, 7)}, "window_size"),
        ({"patch_size": (4, 4)}, "patch_size"),
        ({"window_size": (8, 0, 7)}, "window_size"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BEVTConfig(**kwargs)


def test_config_round_trip(tmp_path):
    config = tiny_config(num_labels=3, window_size=(2, 2, 2))
    config.save_pretrained(tmp_path)
    loaded = BEVTConfig.from_pretrained(tmp_path)
    assert loaded.window_size == (2, 2, 2) and loaded.depths == config.depths and loaded.num_labels == 3
    assert isinstance(AutoConfig.from_pretrained(tmp_path), BEVTConfig)


def test_base_classifier_has_88_to_89m_parameters():
    with torch.device("meta"):
        model = BEVTForVideoClassification(BEVTConfig.from_preset("base", num_labels=400))
    count = sum(p.numel() for p in model.parameters())
    # The image patch embedding (shared-encoder image stream) adds 6k parameters to Video Swin-B's 88.1M.
    assert 88e6 <= count <= 89e6, count


# ---------------------------------------------------------------------------------------------- helpers


def test_window_partition_round_trip():
    x = torch.randn(2, 4, 6, 6, 5)
    windows = window_partition(x, (2, 3, 3))
    assert windows.shape == (2, 8, 18, 5)
    # first window = the (0:2, 0:3, 0:3) block in (t, h, w) order
    assert torch.equal(windows[0, 0], x[0, :2, :3, :3].reshape(18, 5))
    assert torch.equal(window_reverse(windows, (2, 3, 3), (4, 6, 6)), x)


def test_shift_mask_separates_regions():
    mask = make_shift_mask((4, 4), (2, 2), (1, 1), torch.device("cpu"))
    assert mask.shape == (4, 4, 4)
    assert torch.all(mask[0] == 0)  # top-left window holds one region only
    last = mask[3]  # bottom-right window mixes 4 regions: only the diagonal is unmasked
    assert torch.equal(last == 0, torch.eye(4, dtype=torch.bool))
    assert set(mask.unique().tolist()) == {0.0, SHIFT_MASK_VALUE}


def test_shifted_attention_gives_masked_pairs_exact_zeros_not_denormals():
    """The shift mask's value makes a masked pair's softmax weight exactly 0: with the original -100 it is
    exp(-100) ~ 4e-44, a float32 denormal, and CPU arithmetic on denormals is many times slower (BENCHMARKS.md).
    Checked on the attention maps of every block."""
    torch.manual_seed(0)
    model = BEVTModel(tiny_config()).eval()
    model.set_attn_implementation("eager")
    pixel_values, mask, _ = video_batch(batch=1)
    with torch.no_grad():
        maps = model(pixel_values, mask, output_attentions=True).attentions
    tiny = torch.finfo(torch.float32).tiny
    shifted = 0
    for probs in maps:
        assert not ((probs != 0) & (probs.abs() < tiny)).any()  # no denormal weights
        shifted += int((probs == 0).any())
    assert shifted > 0  # some blocks are shifted and mask pairs out
    assert torch.exp(torch.tensor(SHIFT_MASK_VALUE + 100.0)) == 0  # masked weights underflow to exactly 0


def test_relative_position_index_is_symmetric_offset():
    index = relative_position_index((2, 2, 2))
    assert index.shape == (8, 8)
    assert index.max() == 3 * 3 * 3 - 1 and index.min() == 0
    assert torch.all(index.diagonal() == 13)  # zero offset is the centre of the 3x3x3 table


# ---------------------------------------------------------------------------------------------- encoder


def test_encoder_outputs_video_and_image():
    config = tiny_config()
    model = BEVTModel(config).eval()
    pixel_values, mask, _ = video_batch()
    out = model(pixel_values, bool_masked_pos=mask, output_hidden_states=True)
    # 8x64x64 -> (4, 16, 16) patches -> stages at 16, 8, 4, 2
    assert out.last_hidden_state.shape == (2, 4 * 2 * 2, 128)
    assert out.pooler_output.shape == (2, 128)
    assert [h.shape for h in out.hidden_states] == [
        (2, 4 * 16 * 16, 16),
        (2, 4 * 16 * 16, 16),
        (2, 4 * 8 * 8, 32),
        (2, 4 * 4 * 4, 64),
        (2, 4 * 2 * 2, 128),
    ]
    assert out.reshaped_hidden_states[2].shape == (2, 32, 4, 8, 8)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(1))

    images, image_mask, _ = image_batch()
    out = model(images, bool_masked_pos=image_mask, output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 4, 128)
    assert out.reshaped_hidden_states[1].shape == (3, 16, 16, 16)


def test_mask_token_replaces_masked_patches():
    config = tiny_config()
    model = BEVTModel(config).eval()
    pixel_values, _, _ = video_batch(batch=1)
    full = torch.ones(1, 4, 4, 4, dtype=torch.bool)
    a = model(pixel_values, bool_masked_pos=full, output_hidden_states=True)
    b = model(torch.randn_like(pixel_values), bool_masked_pos=full, output_hidden_states=True)
    # every patch is the mask token: the input pixels no longer matter
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state)
    token = model.embeddings.mask_token.reshape(-1)
    torch.testing.assert_close(a.hidden_states[0][0, 0], token)
    # partial mask: masked positions (nearest-upsampled x4 spatially) equal the token, others don't
    mask = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    mask[0, 1, 2, 3] = True
    emb = model(pixel_values, bool_masked_pos=mask, output_hidden_states=True).reshaped_hidden_states[0]
    assert torch.allclose(emb[0, :, 1, 8:12, 12:16], token[:, None, None].expand(-1, 4, 4))
    assert not torch.allclose(emb[0, :, 0, 8, 12], token)


def test_odd_sizes_run_and_pad():
    model = BEVTForVideoClassification(tiny_config(num_labels=4)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 10, 3, 200, 176)).logits.shape == (1, 4)
        assert model(torch.randn(1, 5, 3, 70, 50)).logits.shape == (1, 4)
        assert model(torch.randn(2, 3, 72, 100)).logits.shape == (2, 4)  # images, padded
    tiny = BEVTModel(BEVTConfig.from_preset("tiny", depths=(1, 1, 1, 1))).eval()
    with torch.no_grad():
        out = tiny(torch.randn(1, 10, 3, 200, 176))
    assert out.last_hidden_state.shape == (1, 5 * 7 * 6, 768)


def test_batch_equivalence():
    model = BEVTForMaskedVideoModeling(tiny_config()).eval()
    pixel_values, mask, _ = video_batch(batch=3)
    images, image_mask, _ = image_batch(batch=3)
    with torch.no_grad():
        batched = model(pixel_values, mask, image_pixel_values=images, image_bool_masked_pos=image_mask)
        for i in range(3):
            single = model(
                pixel_values[i : i + 1],
                mask[i : i + 1],
                image_pixel_values=images[i : i + 1],
                image_bool_masked_pos=image_mask[i : i + 1],
            )
            torch.testing.assert_close(single.logits[0], batched.logits[i], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(single.image_logits[0], batched.image_logits[i], atol=1e-5, rtol=1e-4)


def test_eager_equals_sdpa():
    torch.manual_seed(0)
    model = BEVTForMaskedVideoModeling(tiny_config())
    for name, p in model.named_parameters():  # non-trivial bias tables
        if "relative_position_bias_table" in name:
            p.data.normal_(std=1.0)
    model.eval()
    pixel_values, mask, labels = video_batch()
    images, image_mask, image_labels = image_batch()
    inputs = dict(
        pixel_values=pixel_values,
        bool_masked_pos=mask,
        labels=labels,
        image_pixel_values=images,
        image_bool_masked_pos=image_mask,
        image_labels=image_labels,
        return_logits=True,
    )
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(**inputs)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        eager = model(**inputs)
    torch.testing.assert_close(sdpa.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa.image_logits, eager.image_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa.loss, eager.loss, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- heads


def test_masked_modeling_shapes_and_loss_definition():
    model = BEVTForMaskedVideoModeling(tiny_config()).eval()
    pixel_values, mask, labels = video_batch()
    images, image_mask, image_labels = image_batch()
    with torch.no_grad():
        out = model(pixel_values, mask, labels, images, image_mask, image_labels, return_logits=True)
    assert out.logits.shape == (2, 8 * 4 * 4, VOCAB)
    assert out.image_logits.shape == (3, 16, VOCAB)
    # the video loss is the cross-entropy over masked positions, mask upsampled x2 in time, (t, h, w) order
    loss_mask = mask.repeat_interleave(2, dim=1).flatten(1)
    expected = torch.nn.functional.cross_entropy(out.logits[loss_mask], labels.flatten(1)[loss_mask])
    torch.testing.assert_close(out.video_loss, expected, atol=1e-5, rtol=1e-5)
    image_expected = torch.nn.functional.cross_entropy(
        out.image_logits[image_mask.flatten(1)], image_labels.flatten(1)[image_mask.flatten(1)]
    )
    torch.testing.assert_close(out.image_loss, image_expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.video_loss + out.image_loss)
    accuracy = (out.logits[loss_mask].argmax(-1) == labels.flatten(1)[loss_mask]).float().mean()
    torch.testing.assert_close(out.video_mask_accuracy, accuracy)
    # the masked-only projection equals the full projection at masked positions
    torch.testing.assert_close(out.masked_logits, out.logits[loss_mask], atol=1e-5, rtol=1e-5)

    weighted = BEVTForMaskedVideoModeling(tiny_config(video_loss_weight=0.5, image_loss_weight=2.0)).eval()
    weighted.load_state_dict(model.state_dict())
    with torch.no_grad():
        out2 = weighted(pixel_values, mask, labels, images, image_mask, image_labels)
    torch.testing.assert_close(out2.loss, 0.5 * out.video_loss + 2.0 * out.image_loss)
    assert out2.logits is None  # with labels, full logits only on request


def test_single_streams():
    model = BEVTForMaskedVideoModeling(tiny_config()).eval()
    pixel_values, mask, labels = video_batch()
    images, image_mask, image_labels = image_batch()
    with torch.no_grad():
        video_only = model(pixel_values=pixel_values, bool_masked_pos=mask, labels=labels)
        image_only = model(
            image_pixel_values=images, image_bool_masked_pos=image_mask, image_labels=image_labels
        )
        inference = model(pixel_values=pixel_values, bool_masked_pos=mask)
    assert video_only.image_loss is None and torch.equal(video_only.loss, video_only.video_loss)
    assert image_only.video_loss is None and torch.equal(image_only.loss, image_only.image_loss)
    assert inference.loss is None and inference.logits.shape == (2, 128, VOCAB)


def test_loss_decreases_over_20_steps():
    torch.manual_seed(0)
    model = BEVTForMaskedVideoModeling(tiny_config())
    pixel_values, mask, labels = video_batch()
    images, image_mask, image_labels = image_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        out = model(pixel_values, mask, labels, images, image_mask, image_labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = BEVTForMaskedVideoModeling(tiny_config())
    model.train()
    pixel_values, mask, labels = video_batch()
    loss = model(pixel_values, mask, labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for stage in model.bevt.encoder.layers for block in stage.blocks)
    loss2 = model(pixel_values, mask, labels).loss
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)


def test_classification_loss_and_soft_labels():
    model = BEVTForVideoClassification(tiny_config(num_labels=5)).eval()
    pixel_values, _, _ = video_batch()
    labels = torch.tensor([1, 4])
    out = model(pixel_values, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    soft = torch.nn.functional.one_hot(labels, 5).float()
    torch.testing.assert_close(model(pixel_values, labels=soft).loss, out.loss)
    assert model.config.num_frames == 8


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    model = BEVTForMaskedVideoModeling(tiny_config()).eval()
    pixel_values, mask, labels = video_batch()
    with pytest.raises(ValueError, match="B, T, C, H, W"):
        model.bevt(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="channels"):
        model.bevt(torch.randn(1, 8, 4, 64, 64))
    with pytest.raises(ValueError, match="floating point"):
        model.bevt(torch.zeros(1, 8, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"must have shape \(2, 4, 4, 4\)"):
        model(pixel_values, mask[:, :2], labels)
    with pytest.raises(ValueError, match=r"vocab_size"):
        model(pixel_values, mask, labels + VOCAB)
    with pytest.raises(ValueError, match=r"shape \(2, 8, 4, 4\)"):
        model(pixel_values, mask, labels[:, :4])
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 8, 3, 48, 48))
    with pytest.raises(ValueError, match="need its mask"):
        model(pixel_values, labels=labels)
    with pytest.raises(ValueError, match="image batch"):
        model(image_pixel_values=pixel_values)
    with pytest.raises(ValueError, match="pixel_values"):
        model()
    classifier = BEVTForVideoClassification(tiny_config(num_labels=3)).eval()
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        classifier(pixel_values, labels=torch.tensor([0, 3]))


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize(
    "cls, auto",
    [
        (BEVTModel, AutoModel),
        (BEVTForVideoClassification, AutoModelForVideoClassification),
        (BEVTForMaskedVideoModeling, AutoModelForPreTraining),
    ],
)
def test_save_load_round_trip_with_auto_classes(tmp_path, cls, auto):
    model = cls(tiny_config(num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bevt"
    assert set(config["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForVideoClassification",
        "AutoModelForPreTraining",
    }
    assert (tmp_path / "modeling_bevt.py").exists() and (tmp_path / "configuration_bevt.py").exists()
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    pixel_values, _, _ = video_batch(batch=1)
    with torch.no_grad():
        a, b = model(pixel_values), loaded(pixel_values)
    key = "last_hidden_state" if cls is BEVTModel else "logits"
    assert torch.equal(a[key], b[key])
    # the non-persistent relative position index is rebuilt on load
    assert torch.equal(
        loaded.base_model.encoder.layers[0].blocks[0].attention.relative_position_index,
        relative_position_index((4, 2, 2)),
    )


def test_pretraining_weights_load_into_classifier(tmp_path):
    pretrain = BEVTForMaskedVideoModeling(tiny_config())
    pretrain.save_pretrained(tmp_path)
    classifier = BEVTForVideoClassification.from_pretrained(tmp_path, num_labels=4)
    torch.testing.assert_close(classifier.bevt.layernorm.weight, pretrain.bevt.layernorm.weight)
    torch.testing.assert_close(
        classifier.bevt.encoder.layers[2].blocks[1].attention.qkv.weight,
        pretrain.bevt.encoder.layers[2].blocks[1].attention.qkv.weight,
    )


def test_trust_remote_code_without_bevt(tmp_path):
    model = BEVTForVideoClassification(tiny_config(num_labels=3)).eval()
    folder = tmp_path / "remote"
    model.save_pretrained(folder)
    # the relatively imported siblings travel with the model file (Transformers' custom_object_save)
    siblings = {"configuration_bevt.py", "kernels_bevt.py", "inputs_bevt.py", "outputs_bevt.py"}
    assert {"modeling_bevt.py", *siblings} <= {p.name for p in folder.iterdir()}
    pixel_values, _, _ = video_batch(batch=1)
    torch.save(pixel_values, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(pixel_values).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "bevt" or name.startswith("bevt."):
                    raise ImportError("bevt is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForVideoClassification, AutoModel
        model = AutoModelForVideoClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "bevt" not in sys.modules and type(model).__module__.startswith("transformers_modules"), type(model)
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            logits = model(x).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}))
        # the fast paths came along: training runs the folder's kernels_bevt functions
        kernels = sys.modules[type(model).__module__.replace("modeling_bevt", "kernels_bevt")]
        out = model.train()(x, labels=torch.tensor([1]))
        assert type(out.logits.grad_fn).__name__ == "OneDNNLinearFunctionBackward" or not kernels.linear_kernels().forward
        out.loss.backward()
        assert len(model.eval()(x, output_attentions=True).attentions) == sum(model.config.depths)
        base = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        print("OK", type(base).__name__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK BEVTModel" in result.stdout
    shutil.rmtree(folder)


@pytest.fixture(params=["0", "1"], ids=["torch-softmax", "native-softmax"])
def native_softmax(request, monkeypatch):
    """The chunked attention's softmax through PyTorch's ops (BEVT_NATIVE_ATTENTION=0) or the native kernels (=1);
    returns the native module (None for "0")."""
    from bevt.kernels_bevt import native_attention

    monkeypatch.setenv("BEVT_NATIVE_ATTENTION", request.param)
    module = native_attention(torch.float32)
    if request.param == "1" and module is None:
        pytest.skip("the native attention kernels cannot be built here (no C++ compiler or ninja)")
    assert (module is None) == (request.param == "0")
    return module


@pytest.mark.parametrize("store_mb", ["256", "0"])
def test_sdpa_training_gradients_equal_eager(store_mb, monkeypatch, native_softmax):
    """On CPU the "sdpa" path trains with WindowAttentionFunction (no autograd graph over the scores): same gradients,
    including those of the relative position bias tables, with the probabilities kept (the default budget) or
    recomputed in backward (BEVT_ATTENTION_STORE_MB=0)."""
    monkeypatch.setenv("BEVT_ATTENTION_STORE_MB", store_mb)
    torch.manual_seed(0)
    model = BEVTForMaskedVideoModeling(tiny_config())
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name:
            p.data.normal_(std=1.0)
    pixel_values, mask, labels = video_batch()
    images, image_mask, image_labels = image_batch()

    def grads(implementation):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        out = model(pixel_values, mask, labels, images, image_mask, image_labels)
        out.loss.backward()
        return out.loss.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    sdpa_loss, sdpa_grads = grads("sdpa")
    eager_loss, eager_grads = grads("eager")
    torch.testing.assert_close(sdpa_loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert sdpa_grads.keys() == eager_grads.keys()
    assert any("relative_position_bias_table" in n for n in sdpa_grads)
    for name in sdpa_grads:
        torch.testing.assert_close(sdpa_grads[name], eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("store", [True, False, None])
def test_window_attention_function_chunks_match_reference(store, native_softmax, monkeypatch):
    from bevt.kernels_bevt import WindowAttentionFunction

    calls = []
    if native_softmax is not None:  # count the native passes: they really run
        for name in ("softmax_forward", "softmax_backward"):
            function = getattr(native_softmax, name)
            monkeypatch.setattr(native_softmax, name, lambda *a, f=function, n=name: calls.append(n) or f(*a))
    g = torch.Generator().manual_seed(0)
    heads, windows, n, d = 2, 3, 20, 8
    q, k, v = (torch.randn(2, windows * heads, n, d, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(heads, n, n, generator=g, requires_grad=True)
    shift = torch.where(torch.rand(windows, n, n, generator=g) < 0.3, -100.0, 0.0)  # the original code's value
    old = WindowAttentionFunction.CHUNK_BYTES
    WindowAttentionFunction.CHUNK_BYTES = n * n * 4 * heads  # one window per chunk: exercise the chunk loop
    try:
        out = WindowAttentionFunction.apply(q, k, v, bias, shift, d**-0.5, store)
        kept = out.grad_fn.saved_tensors[-1]  # the probabilities, when kept for backward
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, bias))
    finally:
        WindowAttentionFunction.CHUNK_BYTES = old
    assert (kept is not None) == (store is not False)  # None: the default budget holds this tiny call
    mask = (bias[None] + shift[:, None]).reshape(1, windows * heads, n, n)
    expected = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5 + mask, -1) @ v
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v, bias))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    chunks = 2 * windows  # one window per chunk, both batch entries
    forwards = chunks if store is not False else 2 * chunks  # recomputed in backward
    assert calls.count("softmax_forward") == (forwards if native_softmax else 0)
    assert calls.count("softmax_backward") == (chunks if native_softmax else 0)


def test_attention_store_budget_reads_the_environment(monkeypatch):
    from bevt.kernels_bevt import WindowAttentionFunction, attention_store_budget

    monkeypatch.setenv("BEVT_ATTENTION_STORE_MB", "0.5")
    assert attention_store_budget() == 2**19
    q, k, v = (torch.randn(1, 2, 16, 4, requires_grad=True) for _ in range(3))
    bias = torch.zeros(2, 16, 16, requires_grad=True)
    monkeypatch.setenv("BEVT_ATTENTION_STORE_MB", "0")  # nothing kept: recomputed in backward
    assert WindowAttentionFunction.apply(q, k, v, bias, None, 0.5).grad_fn.saved_tensors[-1] is None
    monkeypatch.delenv("BEVT_ATTENTION_STORE_MB")
    assert attention_store_budget() == 256 * 2**20
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("BEVT_ATTENTION_STORE_MB", bad)
        with pytest.raises(ValueError, match="BEVT_ATTENTION_STORE_MB"):
            attention_store_budget()


def _mask_caches(model, dtype=torch.float32) -> dict[str, tuple]:
    """{layer name: (key, mask)} of the masks kept for `dtype` on the CPU (outside inference mode)."""
    slot = ("mask", dtype, torch.device("cpu"), False)
    return {
        name: m.__dict__["_bevt_inference_cache"][slot]
        for name, m in model.named_modules()
        if slot in m.__dict__.get("_bevt_inference_cache", {})
    }


def test_inference_keeps_each_layers_attention_mask_until_its_bias_changes(monkeypatch):
    """Without gradients, each attention layer keeps its (windows x heads, N, N) mask between calls (the same tensor,
    the same logits as building it every call), per dtype; an in-place change of a bias table (an optimizer step),
    `load_state_dict` or a cast rebuilds it; calls that record gradients and BEVT_MASK_CACHE_MB=0 keep none."""
    from bevt.kernels_bevt import mask_cache_budget

    model = BEVTForVideoClassification(tiny_config(num_labels=5)).eval()
    for module in model.modules():
        if hasattr(module, "relative_position_bias_table"):
            torch.nn.init.normal_(module.relative_position_bias_table, std=1.0)
    x = video_batch()[0]

    def logits(m=model, dtype=None):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype is not None):
            return m(x).logits

    monkeypatch.setenv("BEVT_MASK_CACHE_MB", "0")
    reference, reference_bf16 = logits(), logits(dtype=torch.bfloat16)
    assert _mask_caches(model) == {}
    monkeypatch.delenv("BEVT_MASK_CACHE_MB")
    assert mask_cache_budget() == 128 * 2**20
    first = logits()
    kept = _mask_caches(model)
    assert len(kept) == sum(len(layer.blocks) for layer in model.bevt.encoder.layers)
    assert torch.equal(logits(), first) and torch.equal(first, reference)
    assert all(_mask_caches(model)[name][1] is mask for name, (_, mask) in kept.items())  # reused, not rebuilt
    attention = model.bevt.encoder.layers[0].blocks[0].attention  # its (heads, N, N) bias is kept too
    biases = [v for slot, (_, v) in attention.__dict__["_bevt_inference_cache"].items() if slot[0] == "bias"]
    assert len(biases) == 1 and biases[0].shape == (attention.num_heads, 16, 16)
    assert torch.equal(logits(dtype=torch.bfloat16), reference_bf16)
    kept_bf16 = _mask_caches(model, torch.bfloat16)
    assert len(kept_bf16) == len(kept) and {mask.dtype for _, mask in kept_bf16.values()} == {torch.bfloat16}
    assert torch.equal(logits(), first)  # alternating dtypes: both kept
    assert all(_mask_caches(model)[name][1] is mask for name, (_, mask) in kept.items())

    table = model.bevt.encoder.layers[2].blocks[1].attention.relative_position_bias_table  # a shifted block
    with torch.no_grad():
        table.mul_(-1.0)
    changed = logits()
    fresh = BEVTForVideoClassification(tiny_config(num_labels=5)).eval()
    fresh.load_state_dict(model.state_dict())
    monkeypatch.setenv("BEVT_MASK_CACHE_MB", "0")
    assert not torch.equal(changed, first) and torch.equal(changed, logits(fresh))
    monkeypatch.delenv("BEVT_MASK_CACHE_MB")
    other = BEVTForVideoClassification(tiny_config(num_labels=5)).eval()
    model.load_state_dict(other.state_dict())
    assert torch.equal(logits(), logits(other))
    model.double()
    with torch.no_grad():
        assert logits().dtype == torch.float64
    assert {mask.dtype for _, mask in _mask_caches(model, torch.float64).values()} == {torch.float64}
    assert _mask_caches(model) == {} and _mask_caches(model, torch.bfloat16) == {}  # made of the float32 tables

    from bevt.kernels_bevt import inference_cache

    def no_storage() -> tuple:
        raise RuntimeError("Cannot access data pointer of Tensor that doesn't have storage")

    with torch.no_grad():  # a parameter without storage (a DTensor shard): built, never kept
        assert torch.equal(inference_cache(other, ("x",), no_storage, lambda: torch.ones(2)), torch.ones(2))
    assert ("x", False) not in other.__dict__.get("_bevt_inference_cache", {})
    trained = BEVTForVideoClassification(tiny_config(num_labels=5))
    trained(x).logits.sum().backward()  # records gradients: no mask kept
    assert _mask_caches(trained) == {}
    monkeypatch.setenv("BEVT_MASK_CACHE_MB", "0.0001")  # smaller than any mask here
    logits(trained.eval())
    assert _mask_caches(trained) == {}
    for bad in ("lots", "-1"):
        monkeypatch.setenv("BEVT_MASK_CACHE_MB", bad)
        with pytest.raises(ValueError, match="BEVT_MASK_CACHE_MB"):
            mask_cache_budget()


def test_saved_and_copied_models_leave_the_inference_cache_out():
    """`torch.save(model)` and `copy.deepcopy` (the fine-tuning EMA copy) do not carry the kept masks and biases:
    the copy holds none, rebuilds them at its first call and gives the same logits."""
    import copy
    import io

    model = BEVTForVideoClassification(tiny_config(num_labels=5)).eval()
    x = video_batch()[0]
    with torch.no_grad():
        reference = model(x).logits
    assert _mask_caches(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    for duplicate in (copy.deepcopy(model), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        assert all("_bevt_inference_cache" not in m.__dict__ for m in duplicate.modules())
        with torch.no_grad():
            assert torch.equal(duplicate(x).logits, reference)
        assert len(_mask_caches(duplicate)) == len(_mask_caches(model))
    assert _mask_caches(model)  # the original keeps its own


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_lean_mlp_matches_plain(dtype):
    from bevt.kernels_bevt import GeluLinearFunction

    g = torch.Generator().manual_seed(0)
    fc2 = torch.nn.Linear(32, 8)
    hidden = torch.randn(2, 5, 32, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        lean = GeluLinearFunction.apply(hidden.to(dtype), fc2.weight, fc2.bias)
        plain = fc2(torch.nn.functional.gelu(hidden.to(dtype)))
    assert lean.dtype == plain.dtype
    grads = torch.autograd.grad(lean.float().square().sum(), (hidden, fc2.weight, fc2.bias))
    want = torch.autograd.grad(plain.float().square().sum(), (hidden, fc2.weight, fc2.bias))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(lean.float(), plain.float(), atol=tol, rtol=tol)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


def test_torch_compile_matches_eager():
    model = BEVTModel(tiny_config()).eval()
    pixel_values, mask, _ = video_batch(batch=1)
    with torch.no_grad():
        expected = model(pixel_values, mask).last_hidden_state
        got = torch.compile(model, fullgraph=True)(pixel_values, mask).last_hidden_state  # no graph break
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_classification_loss_does_not_rewrite_problem_type():
    model = BEVTForVideoClassification(tiny_config(num_labels=3)).eval()
    pixel_values, _, _ = video_batch()
    hard = model(pixel_values, labels=torch.tensor([0, 2]))
    assert model.config.problem_type is None  # a batch of class ids does not pin the loss type
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    expected = -(soft * torch.log_softmax(hard.logits, -1)).sum(-1).mean()
    torch.testing.assert_close(model(pixel_values, labels=soft).loss, expected)
    model.config.problem_type = "multi_label_classification"
    multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(
        model(pixel_values, labels=multi).loss,
        torch.nn.functional.binary_cross_entropy_with_logits(hard.logits, multi),
    )
    regression = BEVTForVideoClassification(tiny_config(num_labels=1)).eval()
    out = regression(pixel_values, labels=torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(
        out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, -1.0]))
    )


@pytest.mark.parametrize(
    "shape, out_features, bias, transposed",
    [
        ((3, 7, 24), 40, True, False),  # shallow: weight gradient through torch.mm
        ((300, 256), 256, True, False),  # deep (N*K/(N+K) = 128): weight gradient through oneDNN
        ((5, 256, 9), 512, False, True),  # non-contiguous input, no bias, deep
        ((5, 24, 9), 16, True, True),  # non-contiguous input, shallow
    ],
)
def test_onednn_linear_matches_f_linear(monkeypatch, shape, out_features, bias, transposed):
    from bevt import kernels_bevt
    from bevt.kernels_bevt import BEVTLinear

    if kernels_bevt.onednn_linear_op() is None:
        pytest.skip("oneDNN is not available in this torch build")
    monkeypatch.setenv("BEVT_ONEDNN_LINEAR", "1")  # always oneDNN, whatever this machine's calibration chose
    calls = []
    real = torch.mkldnn_linear_backward_weights
    monkeypatch.setattr(torch, "mkldnn_linear_backward_weights", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    layer = BEVTLinear(shape[-1] if not transposed else shape[-2], out_features, bias=bias)
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == (
        {"weight", "bias"} if bias else {"weight"}
    )
    hidden = torch.randn(*shape, generator=g)
    if transposed:
        hidden = hidden.transpose(-1, -2)
    hidden.requires_grad_(True)
    out = layer(hidden)
    assert type(out.grad_fn).__name__ == "OneDNNLinearFunctionBackward"
    params = [hidden, *layer.parameters()]
    grads = torch.autograd.grad(out.square().sum(), params)
    expected = torch.nn.functional.linear(
        hidden.double(), layer.weight.double(), None if not bias else layer.bias.double()
    )
    want = torch.autograd.grad(expected.square().sum(), params)
    torch.testing.assert_close(out, expected.float(), atol=1e-4, rtol=1e-5)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref.float(), atol=1e-3, rtol=1e-5)
    deep = out_features * layer.in_features >= 128 * (out_features + layer.in_features)
    assert bool(calls) == deep
    with torch.no_grad():  # inference path: no autograd function
        torch.testing.assert_close(layer(hidden), expected.float(), atol=1e-4, rtol=1e-5)


def test_onednn_linear_falls_back_and_can_be_disabled(monkeypatch):
    from bevt import kernels_bevt
    from bevt.kernels_bevt import BEVTLinear

    layer = BEVTLinear(16, 8)
    hidden = torch.randn(4, 16, requires_grad=True)
    # bf16, autocast: plain F.linear (autograd of aten ops)
    assert "OneDNN" not in type(layer.to(torch.bfloat16)(hidden.bfloat16()).grad_fn).__name__
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(hidden)
    assert out.dtype == torch.bfloat16 and "OneDNN" not in type(out.grad_fn).__name__
    # under a dispatch mode (here the FLOP counter) the standard aten op runs, so tools see and count it
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        layer(hidden)
    assert counter.get_total_flops() == 2 * 4 * 16 * 8
    with warnings.catch_warnings():  # a TorchScript trace records the standard op (exportable)
        warnings.simplefilter("ignore")
        graph = str(torch.jit.trace(layer, hidden.detach()).graph)
    assert "aten::linear" in graph and "mkldnn" not in graph
    monkeypatch.setenv("BEVT_ONEDNN_LINEAR", "0")
    kernels_bevt.onednn_linear_op.cache_clear()
    try:
        assert kernels_bevt.onednn_linear_op() is None
        out = layer(hidden)
        assert "OneDNN" not in type(out.grad_fn).__name__
        torch.testing.assert_close(out, torch.nn.functional.linear(hidden, layer.weight, layer.bias))
    finally:
        monkeypatch.delenv("BEVT_ONEDNN_LINEAR")
        kernels_bevt.onednn_linear_op.cache_clear()


def _block_grads(block, hidden, window, shift, mask, plain: bool):
    """Output and gradients of one BEVTLayer; `plain` forces the module-by-module path (a no-op hook on the
    LayerNorms makes the fused norm+linear functions step aside)."""
    handles = []
    if plain:
        handles = [block.layernorm_before.register_forward_hook(lambda *a: None)]
        handles.append(block.layernorm_after.register_forward_hook(lambda *a: None))
    saved = []
    try:
        block.zero_grad()
        x = hidden.detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out, _ = block(x, window, shift, mask)
        names = [n for n, _ in block.named_parameters()]
        grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    finally:
        for h in handles:
            h.remove()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved_bytes = sum(n for ptr, n in storages.items() if ptr not in params)
    return out, dict(zip(["input", *names], grads)), saved_bytes


@pytest.mark.parametrize("grid, shifted", [((4, 6, 6), True), ((4, 5, 7), True), ((4, 4, 4), False)])
def test_fused_norm_linear_block_matches_plain_and_stores_less(grid, shifted):
    from bevt.modeling_bevt import BEVTLayer, make_shift_mask

    torch.manual_seed(0)
    config = tiny_config()
    dim, heads = config.embed_dim, config.num_heads[0]
    block = BEVTLayer(config, dim, heads, drop_path_rate=0.0)
    for p in block.parameters():  # non-trivial LayerNorm affine parameters
        p.data.normal_(std=0.5)
    window = (2, 2, 2)
    shift = (1, 1, 1) if shifted else (0, 0, 0)
    padded = tuple(-(-g // w) * w for g, w in zip(grid, window))
    mask = make_shift_mask(padded, window, shift, torch.device("cpu")) if shifted else None
    hidden = torch.randn(2, *grid, dim)
    out, grads, lean_bytes = _block_grads(block, hidden, window, shift, mask, plain=False)
    want, want_grads, plain_bytes = _block_grads(block, hidden, window, shift, mask, plain=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-4, rtol=1e-4, msg=name)
    tokens = 2 * int(torch.tensor(padded).prod())
    # the normalized (and windowed) copies feeding qkv and fc1 are not stored: >= 2 x C values per token fewer
    assert plain_bytes - lean_bytes >= 2 * tokens * dim * 4 * 0.9, (plain_bytes, lean_bytes)


def test_fused_norm_linear_under_autocast_and_with_replaced_modules():
    from bevt.modeling_bevt import BEVTLayer

    torch.manual_seed(0)
    config = tiny_config()
    block = BEVTLayer(config, config.embed_dim, config.num_heads[0], drop_path_rate=0.0)
    hidden = torch.randn(1, 2, 4, 4, config.embed_dim, requires_grad=True)
    args = ((2, 2, 2), (0, 0, 0), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean, _ = block(hidden, *args)
    lean_grads = torch.autograd.grad(lean.float().sum(), [hidden, *block.parameters()])
    block.layernorm_before.register_forward_hook(lambda *a: None)
    block.layernorm_after.register_forward_hook(lambda *a: None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = block(hidden, *args)
    plain_grads = torch.autograd.grad(plain.float().sum(), [hidden, *block.parameters()])
    assert lean.dtype == plain.dtype
    torch.testing.assert_close(lean.float(), plain.float(), atol=3e-2, rtol=3e-2)
    for got, want in zip(lean_grads, plain_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)

    # A module swapped in by an adapter library (here: a counting wrapper) keeps its own forward.
    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    block = BEVTLayer(config, config.embed_dim, config.num_heads[0], drop_path_rate=0.0)
    block.attention.qkv = Counting(block.attention.qkv)
    block.mlp.fc1, block.mlp.fc2 = Counting(block.mlp.fc1), Counting(block.mlp.fc2)
    block(hidden, *args)[0].sum().backward()
    assert block.attention.qkv.calls == block.mlp.fc1.calls == block.mlp.fc2.calls == 1


def test_torch_func_grad_matches_autograd():
    """torch.func transforms (used e.g. for per-sample gradients) step around the custom autograd functions."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    model = BEVTForVideoClassification(tiny_config(num_labels=3)).eval()  # eval: no random drop path
    pixel_values, _, _ = video_batch(batch=1)
    labels = torch.tensor([2])
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p):
        return functional_call(model, p, (pixel_values,), {"labels": labels}).loss

    got = grad(loss)(params)
    model(pixel_values, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)  # unused (mask token, image embedding)
        torch.testing.assert_close(got[name], expected, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------- attentions


def _expected_attention_shapes(config, grid, batch):
    """(B*nW, heads, N, N) per block, from the Swin window rules: a stage's window shrinks to axes shorter than it
    (video: axes no longer than it), windows tile the grid padded to whole windows."""
    window = config.window_size if len(grid) == 3 else config.window_size[1:]
    shapes = []
    for stage, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
        g = [grid[0], *(-(-s // 2**stage) for s in grid[1:])] if len(grid) == 3 else [-(-s // 2**stage) for s in grid]
        w = [min(a, b) for a, b in zip(g, window)]
        windows = batch * int(torch.tensor([-(-a // b) for a, b in zip(g, w)]).prod())
        tokens = int(torch.tensor(w).prod())
        shapes += [(windows, heads, tokens, tokens)] * depth
    return shapes


def test_output_attentions_one_map_per_block():
    """As Transformers' ModelTesterMixin.test_attention_outputs: one map per block, per-stage head counts, window
    token counts, rows summing to one; outputs unchanged by the flag; tuple outputs carry them last."""
    torch.manual_seed(0)
    config = tiny_config()
    model = BEVTModel(config).eval()
    model.set_attn_implementation("eager")
    pixel_values, mask, _ = video_batch(batch=2)
    with torch.no_grad():
        plain = model(pixel_values, mask)
        out = model(pixel_values, mask, output_attentions=True)
    assert plain.attentions is None
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state)
    expected = _expected_attention_shapes(config, (4, 16, 16), batch=2)
    assert len(out.attentions) == sum(config.depths) == len(expected)
    assert [tuple(a.shape) for a in out.attentions] == expected
    assert [a.shape[1] for a in out.attentions] == [h for d, h in zip(config.depths, config.num_heads) for _ in range(d)]
    for a in out.attentions:
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5, rtol=1e-5)
        assert (a >= 0).all()
    # the shifted block of stage 3 (grid 4x4x4, window 4x2x2, shift 0x1x1): no attention across shifted regions
    shift_mask = make_shift_mask((4, 4, 4), (4, 2, 2), (0, 1, 1), torch.device("cpu"))  # (nW, N, N)
    shifted = out.attentions[3].view(2, shift_mask.shape[0], *out.attentions[3].shape[1:])
    assert (shift_mask != 0).any()
    assert shifted.masked_select((shift_mask != 0)[None, :, None]).max() < 1e-30
    assert shifted.masked_select((shift_mask == 0)[None, :, None]).min() > 0
    # tuple output: attentions come last
    with torch.no_grad():
        as_tuple = model(pixel_values, mask, output_attentions=True, return_dict=False)
    assert len(as_tuple) == 3 and len(as_tuple[-1]) == sum(config.depths)

    images, _, _ = image_batch(batch=3)
    with torch.no_grad():
        image_out = model(images, output_attentions=True)
    assert [tuple(a.shape) for a in image_out.attentions] == _expected_attention_shapes(config, (16, 16), batch=3)


def test_output_attentions_with_sdpa_warns_and_uses_eager(caplog):
    """With SDPA (the default) Transformers 5 models log that SDPA returns no attention maps; BEVT logs it and
    computes that call with eager attention, so the maps are there and equal eager's."""
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)
    model = BEVTForVideoClassification(tiny_config(num_labels=3)).eval()
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name:
            p.data.normal_(std=1.0)
    assert model.config._attn_implementation == "sdpa"
    pixel_values, _, _ = video_batch(batch=1)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"), torch.no_grad():
            sdpa = model(pixel_values, output_attentions=True)
    finally:
        hf_logging.disable_propagation()
    assert "output_attentions=True` needs the eager attention" in caplog.text
    assert model.config._attn_implementation == "sdpa"  # only that call
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(pixel_values, output_attentions=True)
    assert len(sdpa.attentions) == len(eager.attentions) == sum(model.config.depths)
    for got, want in zip(sdpa.attentions, eager.attentions):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(sdpa.logits, eager.logits, atol=1e-5, rtol=1e-5)

    # pretraining model: one tuple per stream; attentions do not change the losses and survive backward
    mim = BEVTForMaskedVideoModeling(tiny_config())
    videos, mask, labels = video_batch(batch=1)
    images, image_mask, image_labels = image_batch(batch=2)
    out = mim(videos, mask, labels, images, image_mask, image_labels, output_attentions=True)
    assert len(out.attentions) == len(out.image_attentions) == sum(mim.config.depths)
    assert out.image_attentions[0].shape == (2 * 64, 1, 4, 4)  # 16x16 grid, 2x2 windows, 1 head
    out.loss.backward()
    assert mim.bevt.encoder.layers[0].blocks[0].attention.qkv.weight.grad is not None
