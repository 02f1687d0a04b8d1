"""Training your own visual tokenizer: VQGAN (EMA / straight-through codebook, restarts) and DALL-E dVAE, on the real
test images; losses, metrics, the saved folder, the transform, and bad input."""

import contextlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel

from bevt import BEVTVisualTokenizer, BEVTVisualTokenizerConfig
from bevt.data.shards import write_shards
from bevt.data.streaming import build_stream
from bevt.data.transforms import TokenizerTrainingTransform, seeded_generator
from bevt.tokenizer_training import (
    PerceptualLoss,
    TokenizerTrainingArguments,
    TokenizerTrainingModel,
    codebook_usage,
    evaluate_reconstruction,
    logit_laplace_nll,
    psnr,
    save_reconstruction_grid,
    tokenizer_config_for_training,
    training_step,
)

HELD_OUT = ("hand.jpg", "test.jpg")  # hand.jpg is another scene; the five frame_*.jpg train the tokenizer


@contextlib.contextmanager
def one_thread():
    """These tiny convolutions run faster on one thread than on two busy shared cores (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def read_image(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())  # uint8 (H, W, 3)


@pytest.fixture(scope="module")
def crops(shared_data) -> dict[str, torch.Tensor]:
    """32 px training crops of the five video frames and held-out crops of the two other images, in [0, 1]."""
    paths = sorted((shared_data / "images").glob("*.jpg"))
    train = [read_image(p) for p in paths if p.name not in HELD_OUT]
    held_out = [read_image(p) for p in paths if p.name in HELD_OUT]
    assert len(train) == 5 and len(held_out) == 2
    transform = TokenizerTrainingTransform(32, scale=(0.05, 0.5))
    generator = seeded_generator("tokenizer-training-test")
    with one_thread():  # module-scoped: set up before the autouse fixture
        return {
            "train": torch.stack([transform(train[i % 5], generator=generator)["pixel_values"] for i in range(512)]),
            "held_out": torch.stack(
                [transform(held_out[i % 2], generator=generator)["pixel_values"] for i in range(64)]
            ),
        }


def train(model: TokenizerTrainingModel, pool: torch.Tensor, steps: int, batch_size: int, lr: float):
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=lr, foreach=True)
    with one_thread():  # also for the module-scoped training fixture, set up before the autouse fixture
        return [
            training_step(model, pool[torch.randint(len(pool), (batch_size,), generator=generator)], optimizer, step)
            for step in range(steps)
        ]


def small_vqgan(**kwargs) -> BEVTVisualTokenizerConfig:
    """Width 8, 64 codes, 4x downsampling: 8x8 ids per 32 px crop. (With BEVT's 8x, a 32 px crop has 4x4 ids: even
    unquantised 8x8 patch means are only ~3.5 dB above the mean-colour baseline on these crops, too close to the
    baseline for a fast test.)"""
    values = dict(vocab_size=64, image_size=32, width=8, vqgan_channel_multipliers=(1, 2, 2))
    values.update(kwargs)
    return tokenizer_config_for_training("vqgan", **values)


def small_dvae(**kwargs) -> BEVTVisualTokenizerConfig:
    return tokenizer_config_for_training("dall-e", vocab_size=64, image_size=32, width=8, **kwargs)


@pytest.fixture(scope="module")
def trained_vqgan(crops):
    """200 steps of 8 crops with the default method (VQGAN, EMA codebook, l2-normalised 8-d codes, dead-code
    restarts)."""
    torch.manual_seed(0)
    args = TokenizerTrainingArguments(ema_decay=0.9, dead_code_restart_steps=10)
    model = TokenizerTrainingModel(small_vqgan(), args)
    history = train(model, crops["train"], steps=200, batch_size=8, lr=2e-3)
    return model.train(False), history


# ---------------------------------------------------------------------------------------------------------------
# VQGAN training on the real images


def test_vqgan_training_lowers_the_loss_and_uses_the_codebook(trained_vqgan, crops):
    model, history = trained_vqgan
    first = np.mean([m["reconstruction_loss"] for m in history[:10]])
    last = np.mean([m["reconstruction_loss"] for m in history[-10:]])
    assert last < 0.5 * first, (first, last)
    assert all(math.isfinite(m["loss"]) for m in history)
    assert not model.tokenizer.quantize.embedding.weight.requires_grad  # EMA: no codebook gradients

    ids = model.get_codebook_indices(torch.cat([crops["train"][:256], crops["held_out"]]))
    assert ids.shape == (320, 8, 8)
    counts = torch.bincount(ids.flatten(), minlength=64)
    assert int((counts > 0).sum()) > 32  # more than half of the 64 codes
    usage = codebook_usage(ids, 64)
    assert usage["codes_used"] == int((counts > 0).sum()) and usage["perplexity"] > 16


def test_reconstructions_beat_the_mean_colour_baseline_on_held_out_images(trained_vqgan, crops):
    model, _ = trained_vqgan
    images = crops["held_out"]
    reconstruction = model.decode(model.get_codebook_indices(images)).numpy().astype(np.float64)
    pixels = images.numpy().astype(np.float64)
    mean_colour = pixels.mean(axis=(2, 3), keepdims=True)  # each image replaced by its mean colour
    ours = np.mean([10 * np.log10(1 / np.mean((r - p) ** 2)) for r, p in zip(reconstruction, pixels)])
    baseline = np.mean([10 * np.log10(1 / np.mean((mean_colour[i] - p) ** 2)) for i, p in enumerate(pixels)])
    assert ours > baseline + 3.0, (ours, baseline)

    results = evaluate_reconstruction(model, images, batch_size=24)  # the library's metric: same numbers
    assert results["psnr"] == pytest.approx(ours, abs=1e-3)
    assert results["mean_colour_psnr"] == pytest.approx(baseline, abs=1e-3)
    assert results["num_images"] == 64 and 0 < results["codebook_usage"] <= 1


def test_saved_folder_is_a_frozen_tokenizer_with_the_trained_ids(trained_vqgan, crops, tmp_path):
    model, _ = trained_vqgan
    model.save_pretrained(tmp_path / "tokenizer")
    loaded = BEVTVisualTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert type(AutoModel.from_pretrained(tmp_path / "tokenizer")) is BEVTVisualTokenizer
    assert loaded.config.has_decoder and loaded.config.vqgan_l2_normalize_codes
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    saved = json.loads((tmp_path / "tokenizer" / "config.json").read_text())
    assert saved["vocab_size"] == 64 and saved["tokenizer_type"] == "vqgan"

    images = torch.cat([crops["held_out"], crops["train"][:64]])
    expected = model.get_codebook_indices(images)
    assert torch.equal(loaded.get_codebook_indices(images), expected)
    assert torch.equal(model(images).ids, expected)  # the training path picks the same codes
    videos = images[:12].reshape(3, 4, 3, 32, 32)
    assert torch.equal(loaded.get_codebook_indices(videos), expected[:12].reshape(3, 4, 8, 8))
    assert torch.equal(loaded.decode(expected), model.decode(expected))
    frozen = model.to_tokenizer()
    assert not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(frozen.get_codebook_indices(images), expected)


def test_reconstruction_grid_png(trained_vqgan, crops, tmp_path):
    model, _ = trained_vqgan
    originals = crops["held_out"][:10]
    reconstructions = model.reconstruct(originals)
    path = save_reconstruction_grid(originals, reconstructions, tmp_path / "grid" / "reconstructions.png", columns=4)
    grid = np.asarray(Image.open(path))
    # 10 images in rows of 4 -> 3 row pairs; 32 px magnified x2 to 64 px; 2 px gaps
    assert grid.shape == (6 * 64 + 5 * 2, 4 * 64 + 3 * 2, 3)
    first = (originals[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(grid[0:64:2, 0:64:2], first)
    second_row = (reconstructions[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(grid[66:130:2, 0:64:2], second_row)
    assert (grid[64:66] == 255).all()  # the gap between an original and its reconstruction
    with pytest.raises(ValueError, match="same shape"):
        save_reconstruction_grid(originals, reconstructions[:3], tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------------------------
# DALL-E dVAE


def test_dvae_trains_and_its_folder_loads(crops, tmp_path):
    torch.manual_seed(0)
    args = TokenizerTrainingArguments(temperature_anneal_steps=40, kl_weight=1.0, kl_warmup_steps=20)
    model = TokenizerTrainingModel(small_dvae(), args)
    history = train(model, crops["train"], steps=40, batch_size=8, lr=2e-3)
    first = np.mean([m["loss"] for m in history[:5]])
    last = np.mean([m["loss"] for m in history[-5:]])
    assert last < first - 0.2, (first, last)  # logit-Laplace NLL + KL per pixel value
    assert history[0]["temperature"] == pytest.approx(1.0) and history[-1]["temperature"] < 0.1
    assert history[0]["kl_weight"] == 0.0 and history[-1]["kl_weight"] == pytest.approx(1.0)
    assert all(0 <= m["kl"] <= math.log(64) + 1e-4 for m in history)

    model.save_pretrained(tmp_path / "dvae")
    loaded = BEVTVisualTokenizer.from_pretrained(tmp_path / "dvae")
    assert loaded.config.tokenizer_type == "dall-e" and loaded.config.has_decoder
    images = crops["held_out"][:16]
    ids = loaded.get_codebook_indices(images)
    assert torch.equal(ids, model.get_codebook_indices(images))
    assert torch.equal(model.train(False)(images).ids, ids)
    pixels = loaded.decode(ids)
    assert pixels.shape == images.shape and float(pixels.min()) >= 0 and float(pixels.max()) <= 1


def test_logit_laplace_nll_is_the_density_of_the_dalle_paper():
    x = torch.tensor([0.1, 0.3, 0.5, 0.88]).view(1, 1, 2, 2)
    mu, log_b = torch.tensor([0.2, -1.0, 0.0, 2.0]).view(1, 1, 2, 2), torch.tensor([-1.0, 0.0, 0.5, -0.3]).view(1, 1, 2, 2)
    laplace = torch.distributions.Laplace(mu, log_b.exp())
    expected = -(laplace.log_prob(torch.log(x / (1 - x))) - torch.log(x * (1 - x)))  # change of variables
    torch.testing.assert_close(logit_laplace_nll(x, mu, log_b), expected)


# ---------------------------------------------------------------------------------------------------------------
# Codebook mechanics


def test_ema_update_is_the_smoothed_mean_of_the_assigned_latents():
    args = TokenizerTrainingArguments(ema_decay=0.5, ema_epsilon=1e-5, codebook_init="random")
    model = TokenizerTrainingModel(small_vqgan(vocab_size=3, vqgan_embed_dim=2, vqgan_l2_normalize_codes=False), args)
    weight = model.tokenizer.quantize.embedding.weight
    with torch.no_grad():
        weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    model._reset_statistics(torch.tensor([2.0, 2.0, 2.0]))
    flat = torch.tensor([[0.2, 0.0], [1.2, 1.0], [0.8, 1.4], [0.0, 0.4]])
    model._update_statistics(flat, torch.tensor([0, 1, 1, 0]))
    # counts: 0.5 * 2 + 0.5 * (2, 2, 0) = (2, 2, 1); sums: 0.5 * 2 * e + 0.5 * (sum of assigned latents)
    counts = torch.tensor([2.0, 2.0, 1.0])
    sums = torch.tensor([[0.0 + 0.1, 0.0 + 0.2], [1.0 + 1.0, 1.0 + 1.2], [5.0, 5.0]])
    total, eps = counts.sum(), 1e-5
    smoothed = (counts + eps) / (total + 3 * eps) * total
    torch.testing.assert_close(model.cluster_size, counts)
    torch.testing.assert_close(weight.detach(), sums / smoothed[:, None])


def test_dead_codes_are_restarted_from_encoder_outputs():
    torch.manual_seed(0)
    # straight-through: the forward pass changes the codebook only by restarts (the usage counts still use the EMA)
    args = TokenizerTrainingArguments(codebook_update="straight-through", codebook_init="random",
                                      dead_code_restart_steps=1, dead_code_threshold=0.5, ema_decay=0.0)
    model = TokenizerTrainingModel(small_vqgan(vqgan_l2_normalize_codes=False), args)
    weight = model.tokenizer.quantize.embedding.weight
    with torch.no_grad():
        weight[8:] = 1000.0  # far from every latent: codes 8..63 can never be chosen
    images = torch.rand(4, 3, 32, 32)
    first = model(images, step=0)  # no restart at step 0; the EMA (decay 0) now holds this batch's counts
    assert int(first.ids.max()) < 8 and model.cluster_size[8:].eq(0).all()
    second = model(images, step=1)
    assert second.metrics["codes_restarted"] >= 56
    assert (weight[8:].abs() < 1000).all()
    with torch.no_grad():
        latents = model.tokenizer.quant_conv(model.tokenizer.encoder(images * 2 - 1)).permute(0, 2, 3, 1).flatten(0, 2)
    # every restarted code is one of this batch's encoder outputs
    distances = torch.cdist(weight[8:].detach(), latents, compute_mode="donot_use_mm_for_euclid_dist")
    assert distances.min(dim=1).values.max() < 1e-5


def test_straight_through_codebook_gets_gradients(crops):
    torch.manual_seed(0)
    args = TokenizerTrainingArguments(codebook_update="straight-through", reconstruction_loss="l2")
    model = TokenizerTrainingModel(small_vqgan(), args)
    weight = model.tokenizer.quantize.embedding.weight
    assert weight.requires_grad and any(p is weight for p in model.trainable_parameters())
    output = model(crops["train"][:8], step=0)
    output.loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert output.metrics["codebook_loss"] > 0 and output.metrics["commitment_loss"] > 0


def test_codebook_usage_and_psnr_by_hand():
    usage = codebook_usage(torch.tensor([[0, 0], [1, 1]]), vocab_size=4)
    assert usage == {"perplexity": pytest.approx(2.0), "codebook_usage": 0.5, "codes_used": 2}
    assert codebook_usage(torch.arange(8), 8)["perplexity"] == pytest.approx(8.0)
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.1  # mse 0.01 -> 20 dB
    b[1, :, :2] += 0.2  # mse 0.02 -> 16.99 dB
    torch.testing.assert_close(psnr(b, a), torch.tensor([20.0, 10 * math.log10(50)]))


# ---------------------------------------------------------------------------------------------------------------
# Perceptual loss from local weights only


def test_perceptual_loss_is_skipped_with_a_clear_message_without_local_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.warns(UserWarning, match="perceptual loss skipped: no local VGG16 weights .* nothing is downloaded"):
        model = TokenizerTrainingModel(small_vqgan(), TokenizerTrainingArguments(perceptual_weight=1.0))
    assert not model.perceptual_enabled
    assert model(torch.rand(2, 3, 32, 32)).metrics["perceptual_loss"] == 0
    with pytest.raises(FileNotFoundError, match="perceptual_weights"):
        TokenizerTrainingModel(small_vqgan(), TokenizerTrainingArguments(perceptual_weight=1.0,
                                                                          perceptual_weights=str(tmp_path / "no.pth")))


def test_perceptual_loss_with_local_vgg_weights(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])  # = torchvision.models.vgg16().features, random weights
    save_file(features.state_dict(), str(tmp_path / "vgg16_features.safetensors"))
    loss = PerceptualLoss(tmp_path / "vgg16_features.safetensors")
    x = torch.rand(2, 3, 32, 32)
    assert float(loss(x, x)) == 0.0 and float(loss(x, torch.rand(2, 3, 32, 32))) > 0
    args = TokenizerTrainingArguments(perceptual_weight=0.5, perceptual_weights=str(tmp_path / "vgg16_features.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = TokenizerTrainingModel(small_vqgan(), args)
    assert model.perceptual_enabled
    assert not any(k.startswith("features") or "perceptual" in k for k in model.state_dict())  # not checkpointed
    output = model(x)
    assert output.metrics["perceptual_loss"] > 0
    expected = output.metrics["reconstruction_loss"] + 0.25 * output.metrics["commitment_loss"]
    assert float(output.loss.detach()) == pytest.approx(float(expected + 0.5 * output.metrics["perceptual_loss"]), rel=1e-5)
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16 state dict"):
        PerceptualLoss(tmp_path / "other.pth")


# ---------------------------------------------------------------------------------------------------------------
# Schedules, data and bad input


def test_dalle_schedules_are_cosine():
    args = TokenizerTrainingArguments(temperature_start=1.0, temperature_end=1 / 16, temperature_anneal_steps=100,
                                      kl_weight=6.6, kl_warmup_steps=10)
    assert args.temperature(0) == 1.0 and args.temperature(100) == args.temperature(500) == 1 / 16
    assert args.temperature(50) == pytest.approx((1 + 1 / 16) / 2)
    assert args.kl_weight_at(0) == 0.0 and args.kl_weight_at(5) == pytest.approx(3.3)
    assert args.kl_weight_at(10) == args.kl_weight_at(10_000) == pytest.approx(6.6)
    assert TokenizerTrainingArguments(kl_warmup_steps=0).kl_weight_at(0) == pytest.approx(6.6)


def test_transform_makes_tokenizer_crops_from_images_and_clips(shared_data):
    image = read_image(shared_data / "images" / "hand.jpg")
    transform = TokenizerTrainingTransform(32)
    out = transform(image, generator=seeded_generator(1))["pixel_values"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(out * 255, (out * 255).round())  # uint8 levels
    assert torch.equal(out, transform(image, generator=seeded_generator(1))["pixel_values"])
    assert not torch.equal(out, transform(image, generator=seeded_generator(2))["pixel_values"])
    # a square frame at scale 1 and ratio 1: a plain antialiased resize (+ flip with probability 1)
    square = image[:240, 40:280]
    full = TokenizerTrainingTransform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0)(square)["pixel_values"]
    reference = torch.nn.functional.interpolate(square.permute(2, 0, 1)[None].float(), size=(32, 32), mode="bicubic",
                                                antialias=True)[0].clamp(0, 255).round() / 255
    torch.testing.assert_close(full, reference.flip(-1))
    clip = torch.stack([image, image.flip(1), image])
    frames = transform(clip, generator=seeded_generator(3))["pixel_values"]
    assert frames.shape == (3, 3, 32, 32)
    assert not torch.equal(frames[0], frames[2])  # each frame gets its own crop
    for kwargs, message in [({"size": 0}, "size"), ({"scale": (0.0, 1.0)}, "scale"), ({"scale": (0.5, 1.5)}, "scale"),
                            ({"ratio": (2.0, 1.0)}, "ratio"), ({"flip": 2.0}, "flip")]:
        with pytest.raises(ValueError, match=message):
            TokenizerTrainingTransform(**kwargs)
    with pytest.raises(TypeError, match="uint8"):
        transform(image.float())
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        transform(image[..., :2])


def test_image_and_video_shards_stream_into_a_training_step(shared_data, tmp_path):
    """The data layer feeds tokenizer training: image shards and frames sampled from video shards."""
    images = [p for p in sorted((shared_data / "images").glob("*.jpg"))][:4]
    write_shards([(f"img{i}", "jpg", p.read_bytes(), None) for i, p in enumerate(images)], tmp_path / "img")
    video = shared_data / "videos" / "short_32f.mp4"
    write_shards([(f"vid{i}", "mp4", video.read_bytes(), None) for i in range(2)], tmp_path / "vid")
    transform = TokenizerTrainingTransform(32)
    image_stream = build_stream(tmp_path / "img", transform=transform, shuffle_buffer=0)
    video_stream = build_stream(tmp_path / "vid", transform=transform, clip_len=3, frame_interval=8, shuffle_buffer=0)
    image_batch = torch.stack([s["pixel_values"] for s in image_stream])
    video_batch = torch.stack([s["pixel_values"] for s in video_stream])
    assert image_batch.shape == (4, 3, 32, 32) and video_batch.shape == (2, 3, 3, 32, 32)
    model = TokenizerTrainingModel(small_vqgan())
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    for step, batch in enumerate((image_batch, video_batch)):  # (B, C, H, W) and (B, T, C, H, W)
        metrics = training_step(model, batch, optimizer, step, max_grad_norm=1.0)
        assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert model(video_batch).ids.shape == (6, 8, 8)


def test_bad_input_gives_clear_errors():
    encoder_only = BEVTVisualTokenizerConfig(tokenizer_type="vqgan", vqgan_channels=8, vqgan_norm_groups=4,
                                             vocab_size=64)
    with pytest.raises(ValueError, match="needs a decoder: set `has_decoder=True`"):
        TokenizerTrainingModel(encoder_only)
    with pytest.raises(ValueError, match="not two different ones"):
        TokenizerTrainingModel(small_vqgan(vocab_size=32), tokenizer=BEVTVisualTokenizer(small_vqgan()))
    for kwargs, field in [({"codebook_update": "k-means"}, "codebook_update"), ({"ema_decay": 1.0}, "ema_decay"),
                          ({"reconstruction_loss": "l3"}, "reconstruction_loss"), ({"kl_weight": -1}, "kl_weight"),
                          ({"dead_code_restart_steps": 1.5}, "dead_code_restart_steps"),
                          ({"temperature_end": 0}, "temperature_end"), ({"codebook_init": "zeros"}, "codebook_init")]:
        with pytest.raises(ValueError, match=field):
            TokenizerTrainingArguments(**kwargs)
    with pytest.raises(ValueError, match="'vqgan' or 'dall-e'"):
        tokenizer_config_for_training("vq-vae")
    model = TokenizerTrainingModel(small_vqgan())
    with pytest.raises(ValueError, match="rank-3"):
        model(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="non-empty"):
        evaluate_reconstruction(model, torch.rand(0, 3, 32, 32))
