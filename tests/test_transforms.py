"""Training transforms (bevt.data.transforms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bevt.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainingImageTransform,
    PretrainingVideoTransform,
    VideoClassificationTrainTransform,
    derive_seed,
    lanczos_resize,
    mixup_cutmix,
    normalize,
    seeded_generator,
)


def _clip(t: int = 4, h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (t, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean) * 255


def _reference_lanczos4(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """OpenCV INTER_LANCZOS4 written out directly (float64, clamped borders), for one (H, W) plane."""

    def axis_matrix(n_in: int, n_out: int) -> np.ndarray:
        m = np.zeros((n_out, n_in))
        scale = n_in / n_out
        for i in range(n_out):
            src = (i + 0.5) * scale - 0.5
            base = math.floor(src)
            taps = []
            for k in range(8):
                d = src - (base - 3 + k)
                taps.append(
                    1.0
                    if abs(d) < 1e-12
                    else 4 * math.sin(math.pi * d) * math.sin(math.pi * d / 4) / (math.pi**2 * d * d)
                )
            taps = np.array(taps) / sum(taps)
            for k in range(8):
                m[i, min(max(base - 3 + k, 0), n_in - 1)] += taps[k]
        return m

    return axis_matrix(img.shape[0], out_h) @ img @ axis_matrix(img.shape[1], out_w).T


def test_derive_seed_is_stable():
    assert derive_seed(1, "a", 2) == derive_seed(1, "a", 2)
    assert derive_seed(1, "a", 2) != derive_seed(1, "a", 3)
    assert 0 <= derive_seed("x") < 2**63
    assert torch.equal(
        torch.rand(3, generator=seeded_generator(5, "k")), torch.rand(3, generator=seeded_generator(5, "k"))
    )


@pytest.mark.parametrize(("size_in", "size_out"), [((32, 40), (16, 20)), ((30, 45), (17, 13))])
def test_lanczos_matches_opencv_formula(size_in, size_out):
    img = np.random.default_rng(0).uniform(0, 255, size_in)
    ours = lanczos_resize(torch.tensor(img, dtype=torch.float32)[None, None], size_out)[0, 0].numpy()
    np.testing.assert_allclose(ours, _reference_lanczos4(img, *size_out), atol=2e-3)
    flat = lanczos_resize(torch.full((1, 3, *size_in), 77, dtype=torch.uint8), size_out)
    torch.testing.assert_close(flat, torch.full_like(flat, 77.0))


def test_normalize():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    out = normalize(x)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(_denormalize(out), x.float(), atol=1e-3, rtol=0)


def test_pretraining_video_transform_shapes_and_ranges():
    transform = PretrainingVideoTransform(image_size=32, scale_range=(40, 48))
    out = transform(_clip(), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"pixel_values", "tokenizer_pixel_values"}
    assert out["pixel_values"].shape == (4, 3, 32, 32) and out["pixel_values"].dtype == torch.float32
    tok = out["tokenizer_pixel_values"]
    assert tok.shape == (4, 3, 16, 16) and tok.dtype == torch.float32
    assert float(tok.min()) >= 0 and float(tok.max()) <= 1
    assert torch.equal(tok * 255, (tok * 255).round())  # uint8 levels, like the official uint8 resize
    default = PretrainingVideoTransform()
    out = default(_clip(2, 256, 340))
    assert out["pixel_values"].shape == (2, 3, 224, 224) and out["tokenizer_pixel_values"].shape == (
        2,
        3,
        112,
        112,
    )


def test_pretraining_video_transform_is_a_crop_of_the_rescaled_clip():
    # scale_range (48, 48) on a 48-pixel-high clip: no resize, so the output is an exact crop
    clip = _clip(3, 48, 70)
    transform = PretrainingVideoTransform(image_size=32, scale_range=(48, 48), flip_prob=0.0)
    pixels = _denormalize(transform(clip, generator=torch.Generator().manual_seed(3))["pixel_values"]).round()
    source = clip.permute(0, 3, 1, 2).float()
    matches = [
        (top, left)
        for top in range(48 - 32 + 1)
        for left in range(70 - 32 + 1)
        if torch.equal(source[..., top : top + 32, left : left + 32], pixels)
    ]
    assert len(matches) == 1


def test_pretraining_video_transform_flip_and_determinism():
    clip = _clip()
    kwargs = dict(image_size=32, scale_range=(40, 48))
    a = PretrainingVideoTransform(flip_prob=0.0, **kwargs)(clip, generator=torch.Generator().manual_seed(9))
    b = PretrainingVideoTransform(flip_prob=1.0, **kwargs)(clip, generator=torch.Generator().manual_seed(9))
    again = PretrainingVideoTransform(flip_prob=0.0, **kwargs)(clip, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(b["pixel_values"], a["pixel_values"].flip(-1))
    torch.testing.assert_close(
        b["tokenizer_pixel_values"], a["tokenizer_pixel_values"].flip(-1), atol=1e-6, rtol=0
    )
    assert torch.equal(a["pixel_values"], again["pixel_values"])
    other = PretrainingVideoTransform(flip_prob=0.0, **kwargs)(clip, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(a["pixel_values"], other["pixel_values"])


def test_no_tokenizer_copy_leaves_the_model_input_unchanged():
    clip, image = _clip(), _clip(1)[0]
    kwargs = dict(image_size=32, scale_range=(40, 48))
    for cls, x in ((PretrainingVideoTransform, clip), (PretrainingImageTransform, image)):
        full = cls(**kwargs)(x, generator=torch.Generator().manual_seed(3))
        bare = cls(tokenizer_size=0, **kwargs)(x, generator=torch.Generator().manual_seed(3))
        assert set(full) == {"pixel_values", "tokenizer_pixel_values"} and set(bare) == {"pixel_values"}
        assert torch.equal(full["pixel_values"], bare["pixel_values"])  # same draws, same crop
    with pytest.raises(ValueError, match=r"tokenizer_size must be in \[0, image_size\]"):
        PretrainingVideoTransform(image_size=32, scale_range=(40, 48), tokenizer_size=-1)


def test_tokenizer_view_is_lanczos_of_the_crop():
    clip = _clip(2, 48, 48)
    transform = PretrainingVideoTransform(image_size=48, scale_range=(48, 48), flip_prob=0.0)  # crop == input
    out = transform(clip)
    expected = np.stack(
        [_reference_lanczos4(clip[t, :, :, c].double().numpy(), 24, 24) for t in range(2) for c in range(3)]
    ).reshape(2, 3, 24, 24)
    expected = np.clip(np.round(expected), 0, 255) / 255
    assert np.abs(out["tokenizer_pixel_values"].numpy() - expected).max() <= 1 / 255 + 1e-6


def test_transform_input_errors():
    transform = PretrainingVideoTransform(image_size=32, scale_range=(40, 48))
    with pytest.raises(TypeError, match="expected uint8"):
        transform(_clip().float())
    with pytest.raises(ValueError, match=r"expected shape \(T, H, W, 3\)"):
        transform(_clip().permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="the random crop has to fit"):
        PretrainingVideoTransform(image_size=224, scale_range=(200, 320))
    with pytest.raises(ValueError, match=r"expected shape \(H, W, 3\)"):
        PretrainingImageTransform(image_size=32, scale_range=(40, 48))(_clip())


def test_pretraining_image_transform():
    image = _clip(1, 60, 80)[0]
    kwargs = dict(image_size=32, scale_range=(40, 48))
    out = PretrainingImageTransform(**kwargs)(image, generator=torch.Generator().manual_seed(1))
    assert out["pixel_values"].shape == (3, 32, 32) and out["tokenizer_pixel_values"].shape == (3, 16, 16)
    # without colour jitter the image path is the video path on a one-frame clip
    plain = PretrainingImageTransform(color_jitter=0.0, **kwargs)(
        image, generator=torch.Generator().manual_seed(1)
    )
    video = PretrainingVideoTransform(**kwargs)(image[None], generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain["pixel_values"], video["pixel_values"][0])
    assert torch.equal(plain["tokenizer_pixel_values"], video["tokenizer_pixel_values"][0])
    assert not torch.equal(out["pixel_values"], plain["pixel_values"])  # jitter changed the colours
    pixels = _denormalize(out["pixel_values"])
    assert float(pixels.min()) > -0.01 and float(pixels.max()) < 255.01


def test_color_jitter_brightness_only():
    image = torch.full((40, 40, 3), 100, dtype=torch.uint8)
    transform = PretrainingImageTransform(image_size=32, scale_range=(40, 40), color_jitter=(0.4, 0.0, 0.0))
    values = {int(round(float(_denormalize(transform(image)["pixel_values"]).mean()))) for _ in range(20)}
    assert len(values) > 5 and min(values) >= 60 and max(values) <= 140


def test_video_classification_transform():
    clip = _clip(4, 60, 80)
    out = VideoClassificationTrainTransform(image_size=32, short_side=40)(
        clip, generator=torch.Generator().manual_seed(0)
    )
    assert set(out) == {"pixel_values"} and out["pixel_values"].shape == (4, 3, 32, 32)
    # RandAugment and random erasing act on the whole clip alike: identical frames stay identical
    same = _clip(1, 60, 80).expand(4, -1, -1, -1)
    transform = VideoClassificationTrainTransform(
        image_size=32, short_side=40, flip_prob=0.0, randaug=(2, 9), random_erasing=1.0
    )
    out = transform(same, generator=torch.Generator().manual_seed(4))["pixel_values"]
    assert all(torch.equal(out[0], out[t]) for t in range(1, 4))
    assert bool((out == 0).all(dim=0).any())  # the erased box (0 = mean colour after normalisation)
    again = transform(same, generator=torch.Generator().manual_seed(4))["pixel_values"]
    assert torch.equal(out, again)
    state = torch.random.get_rng_state()
    transform(same, generator=torch.Generator().manual_seed(5))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_mixup_cutmix():
    a = torch.zeros(1, 2, 3, 8, 8)
    b = torch.ones(1, 2, 3, 8, 8)
    pixels = torch.cat([a, b])
    labels = torch.tensor([0, 2])
    gen = torch.Generator().manual_seed(0)
    mixed, targets = mixup_cutmix(
        pixels, labels, 3, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, generator=gen
    )
    lam = 1 - float(mixed[0].mean())  # sample 0 (zeros) mixed with sample 1 (ones)
    torch.testing.assert_close(targets[0], torch.tensor([lam, 0.0, 1 - lam]), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.sum(1), torch.ones(2))
    mixed, targets = mixup_cutmix(
        pixels, labels, 3, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, generator=gen
    )
    pasted = float(mixed[0].mean())  # fraction of sample 0 covered by sample 1's box
    torch.testing.assert_close(targets[0], torch.tensor([1 - pasted, 0.0, pasted]), atol=1e-5, rtol=0)
    assert torch.equal(mixed[0][0], mixed[0][1])  # the same box on every frame
    _, smooth = mixup_cutmix(pixels, labels, 3, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.3)
    torch.testing.assert_close(smooth[0], torch.tensor([0.8, 0.1, 0.1]))
    assert torch.equal(pixels[0], a[0])  # inputs untouched
    with pytest.raises(ValueError, match="class indices"):
        mixup_cutmix(pixels, torch.tensor([0, 3]), 3)


def test_full_size_tokenizer_copy_is_the_crop():
    transform = PretrainingVideoTransform(image_size=32, scale_range=(40, 48), tokenizer_size=32)
    out = transform(_clip())
    torch.testing.assert_close(
        out["tokenizer_pixel_values"] * 255, _denormalize(out["pixel_values"]), atol=1e-3, rtol=0
    )


def test_training_accuracy_of_mixed_clips_follows_their_dominant_class():
    """Mixup draws lambda ~ Beta(alpha, alpha); a clip mixed mostly with its partner is the partner's class: the
    training accuracy run_finetuning logs (and writes to training_results.json) scores it against that class."""
    from bevt.finetuning import training_accuracy

    labels = torch.arange(8) % 4
    pixels = torch.rand(8, 2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    _, targets = mixup_cutmix(pixels, labels, 4, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
    dominant = targets.argmax(-1)
    assert not torch.equal(dominant, labels)  # this draw has clips dominated by their partner
    perfect = torch.nn.functional.one_hot(dominant, 4).float() * 5  # a model that names each clip's dominant class
    assert training_accuracy(perfect, targets).item() == 1.0
    assert training_accuracy(perfect, labels).item() == (dominant == labels).float().mean().item() < 1.0
    assert training_accuracy(perfect, torch.nn.functional.one_hot(labels, 4).float() * 0.9 + 0.025).item() == (
        (dominant == labels).float().mean().item()
    )  # label smoothing alone: the argmax is the label
