"""Tokenizer-free pretraining targets (`bevt.targets`) and the regression head of `BEVTForMaskedVideoModeling`.

HOG is checked against scikit-image's `hog` (cases computed with scikit-image 0.26 and written here, so the suite
does not need it; where it is installed, random images are compared too), by hand, and for the invariances it
promises; pixel targets for their per-patch normalisation and layout; the model for its loss (MSE on the masked
positions only), its R^2, its label checks and a saved folder that keeps the target (also as remote code).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bevt import BEVTConfig, BEVTForMaskedVideoModeling
from bevt.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from bevt.pretraining import model_inputs
from bevt.targets import (
    PatchTargets,
    hog_cell_histograms,
    hog_targets,
    pixel_targets,
    unnormalize,
)

# scikit-image 0.26: hog(IMAGE, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2), block_norm="L2",
# feature_vector=False)[::2, ::2] (the blocks of the two 16-px patches), rounded to 6 decimals.
SKIMAGE_HOG = np.array(
    [
        [0.094374, 0.009698, 0.005227, 0.213523, 0.378656, 0.101069, 0.076318, 0.040285, 0.018602, 0.154108,
         0.084321, 0.214779, 0.282635, 0.119565, 0.108449, 0.030341, 0.023941, 0.070153, 0.154123, 0.0,
         0.176157, 0.164275, 0.290171, 0.089275, 0.015899, 0.057311, 0.111942, 0.315884, 0.211657, 0.30571,
         0.387403, 0.087652, 0.056447, 0.034372, 0.0, 0.066822],
        [0.143968, 0.094565, 0.198058, 0.386319, 0.138388, 0.099583, 0.073384, 0.025977, 0.073342, 0.20774,
         0.029666, 0.17385, 0.309928, 0.150607, 0.092327, 0.020885, 0.076489, 0.081544, 0.257807, 0.191021,
         0.339451, 0.330775, 0.030683, 0.064107, 0.062652, 0.0, 0.107401, 0.145387, 0.186099, 0.146147,
         0.095101, 0.195551, 0.069406, 0.104515, 0.131326, 0.146261],
    ]
)  # fmt: skip


def _wavy_image() -> torch.Tensor:
    """The (1, 16, 32) float64 image of SKIMAGE_HOG: smooth waves in every direction."""
    r, c = np.meshgrid(np.arange(16.0), np.arange(32.0), indexing="ij")
    image = (
        0.5 + 0.25 * np.sin(0.7 * r + 0.3 * c) * np.cos(0.45 * c - 0.2 * r) + 0.1 * np.sin(1.9 * r * c / 16)
    )
    return torch.from_numpy(image)[None]


# ------------------------------------------------------------------------------------------------------------ HOG


def test_hog_equals_scikit_image_on_a_recorded_case():
    got = hog_targets(_wavy_image(), patch_size=16)
    assert got.shape == (1, 2, 36) and got.dtype == torch.float64
    np.testing.assert_allclose(got[0].numpy(), SKIMAGE_HOG, atol=1e-6)


def test_hog_of_a_diagonal_ramp_by_hand():
    """x[r, c] = (r + c) / 32 on one 16-px patch: inside, both central differences are 2/32, orientation 45 degrees
    (bin 2 of [40, 60)), magnitude sqrt(2)/16; on the top/bottom rows only the column difference is kept (0 degrees,
    bin 0) and on the left/right columns only the row difference (90 degrees, bin 4), magnitude 1/16; corners 0.
    Every 8x8 cell: 49 interior pixels, 7 border-row and 7 border-column pixels -> bins (0, 2, 4) in ratio
    7 : 49*sqrt(2) : 7, the same in the 4 cells (scikit-image gives the same numbers)."""
    r, c = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    image = ((r + c) / 32).double()[None]
    cells = hog_cell_histograms(image[None])  # (1, 1, 2, 2, 9), means over the cell
    expected_cell = torch.zeros(9, dtype=torch.float64)
    expected_cell[0] = expected_cell[4] = 7 / 16 / 64
    expected_cell[2] = 49 * math.sqrt(2) / 16 / 64
    torch.testing.assert_close(cells[0, 0], expected_cell.expand(2, 2, 9))
    vector = expected_cell.repeat(4)
    torch.testing.assert_close(hog_targets(image)[0, 0], vector / vector.norm(), atol=1e-8, rtol=0)


def test_hog_equals_scikit_image_on_random_images():
    """The full comparison, where scikit-image happens to be installed (it is not a dependency)."""
    skimage_feature = pytest.importorskip("skimage.feature")
    rng = np.random.default_rng(0)
    for height, width in ((16, 16), (32, 48), (64, 64)):
        image = rng.uniform(size=(height, width))
        reference = skimage_feature.hog(
            image, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2), block_norm="L2",
            feature_vector=False,
        )[::2, ::2].reshape(height // 16, width // 16, 36)  # fmt: skip
        got = hog_targets(torch.from_numpy(image)[None], 16).numpy()
        np.testing.assert_allclose(got, reference, atol=1e-6)


def test_hog_is_per_channel_and_normalised_per_patch():
    rgb = torch.rand(2, 3, 32, 48, dtype=torch.float64)
    cells = hog_cell_histograms(rgb)
    for channel in range(3):
        torch.testing.assert_close(
            cells[:, channel], hog_cell_histograms(rgb[:, channel : channel + 1])[:, 0]
        )
    targets = hog_targets(rgb)
    assert targets.shape == (2, 2, 3, 2 * 2 * 9 * 3)
    # (cell row, cell column, channel, bin) inside a patch, then L2-normalised over the 108 values
    raw = cells.reshape(2, 3, 2, 2, 3, 2, 9).permute(0, 2, 4, 3, 5, 1, 6).reshape(2, 2, 3, 108)
    torch.testing.assert_close(targets, raw / raw.norm(dim=-1, keepdim=True), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(
        targets.norm(dim=-1), torch.ones(2, 2, 3, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_hog_is_invariant_to_brightness_offset_and_contrast():
    image = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    reference = hog_targets(image)
    torch.testing.assert_close(hog_targets(image + 0.3), reference)
    torch.testing.assert_close(hog_targets(image * 0.25 + 0.1), reference)
    # Per patch: each 16-px patch framed by a 1-px border of zeros (no central difference reaches across patches),
    # then scaled by its own factor: the same targets.
    framed = image.clone()
    for i in range(0, 32, 16):
        framed[..., i, :] = framed[..., i + 15, :] = framed[..., :, i] = framed[..., :, i + 15] = 0
    scales = torch.tensor([[0.2, 3.0], [1.7, 0.05]], dtype=torch.float64)
    scaled = framed * scales.repeat_interleave(16, 0).repeat_interleave(16, 1)
    torch.testing.assert_close(hog_targets(scaled), hog_targets(framed))
    # but not to the orientation of the content: the transposed image swaps the row/column gradients
    assert not torch.allclose(hog_targets(image.transpose(-1, -2)), reference.transpose(1, 2), atol=1e-3)
    # a flat patch has no gradient: its target is 0 (eps), not a random unit vector
    assert hog_targets(torch.full((1, 3, 16, 16), 0.7)).abs().max() == 0


# ---------------------------------------------------------------------------------------------------------- pixels


def test_pixel_targets_are_the_patch_pixels_normalised_per_patch():
    images = torch.rand(2, 3, 32, 48) * (torch.rand(2, 1, 1, 1) + 0.5) + torch.rand(2, 1, 1, 1)
    targets = pixel_targets(images)
    assert targets.shape == (2, 2, 3, 16 * 16 * 3)
    torch.testing.assert_close(targets.mean(-1), torch.zeros(2, 2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.std(-1, unbiased=False), torch.ones(2, 2, 3), atol=1e-4, rtol=0)
    # layout (row, column, channel): patch (1, 2) of image 1, un-normalised with its own statistics
    patch = images[1, :, 16:32, 32:48].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(
        targets[1, 1, 2] * patch.std(unbiased=False) + patch.mean(), patch, atol=1e-4, rtol=0
    )
    # invariant to each patch's own brightness and contrast (up to the eps under the variance)
    gain = torch.rand(2, 1, 2, 3) * 2 + 0.5
    offset = torch.rand(2, 1, 2, 3)
    up = lambda t: t.repeat_interleave(16, 2).repeat_interleave(16, 3)  # noqa: E731
    torch.testing.assert_close(pixel_targets(images * up(gain) + up(offset)), targets, atol=2e-3, rtol=0)
    assert pixel_targets(torch.full((1, 3, 16, 16), 0.3)).abs().max() == 0  # a flat patch: zeros
    with pytest.raises(ValueError, match="multiples of the 16-px patch"):
        pixel_targets(torch.rand(1, 3, 20, 32))


def test_patch_targets_undo_the_input_normalisation_on_the_token_grid():
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    frames = torch.rand(2, 4, 3, 32, 64)
    pixel_values = ((frames - mean) / std).requires_grad_()
    torch.testing.assert_close(unnormalize(pixel_values), frames)
    for kind, dim, compute in (("hog", 108, hog_targets), ("pixel", 768, pixel_targets)):
        config = BEVTConfig.from_preset("test", target_type=kind)
        targets = PatchTargets.from_config(config)
        assert targets.dim == config.target_dim == dim
        video = targets(pixel_values)
        assert video.shape == (2, 4, 2, 4, dim) and video.dtype == torch.float32 and not video.requires_grad
        torch.testing.assert_close(video, compute(frames), atol=1e-4, rtol=0)
        assert targets(pixel_values[:, 0]).shape == (2, 2, 4, dim)  # images
    with pytest.raises(ValueError, match="target_dim"):
        PatchTargets.from_config(BEVTConfig.from_preset("test", target_type="hog", target_dim=100))
    with pytest.raises(ValueError, match="token ids come from a BEVTVisualTokenizer"):
        PatchTargets("tokenizer")


# ----------------------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_type": "hogs"}, "target_type"),
        ({"target_type": "tokenizer", "target_dim": 108}, "target_dim"),
        ({"target_type": "pixel", "target_dim": 0}, "target_dim"),
        ({"target_type": "hog", "patch_size": (2, 3, 3)}, "target_type"),
    ],
)
def test_config_rejects_bad_targets(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BEVTConfig.from_preset("test", **kwargs)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs made of [0, 1] frames normalised as the data transforms do, with random masks."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return {
        "pixel_values": (torch.rand(2, 8, 3, 64, 64, generator=generator) - mean) / std,
        "bool_masked_pos": torch.rand(2, 4, 4, 4, generator=generator) < 0.5,
        "image_pixel_values": (torch.rand(3, 3, 64, 64, generator=generator) - mean) / std,
        "image_bool_masked_pos": torch.rand(3, 4, 4, generator=generator) < 0.5,
    }


@pytest.mark.parametrize("kind", ["hog", "pixel"])
def test_regression_loss_is_mse_on_masked_positions_only_and_r2_is_reported(kind):
    model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test", target_type=kind)).eval()
    targets = PatchTargets.from_config(model.config)
    batch = _batch()
    inputs = model_inputs(batch, targets, "cpu")
    assert inputs["labels"].shape == (2, 8, 4, 4, model.config.target_dim)
    out = model(**inputs, return_logits=True)
    assert out.video_mask_accuracy is None and out.image_mask_accuracy is None
    assert out.logits.shape == (2, 8 * 16, model.config.target_dim)
    for prefix, logits, loss, r2, mask in (
        ("", out.logits, out.video_loss, out.video_mask_r2, batch["bool_masked_pos"].repeat_interleave(2, 1)),
        ("image_", out.image_logits, out.image_loss, out.image_mask_r2, batch["image_bool_masked_pos"]),
    ):
        labels = inputs[f"{prefix}labels"]
        prediction = logits.reshape(labels.shape)[mask]
        target = labels[mask]
        torch.testing.assert_close(loss, F.mse_loss(prediction, target))
        expected_r2 = 1 - (prediction - target).square().sum() / (target - target.mean(0)).square().sum()
        torch.testing.assert_close(r2, expected_r2)
        # targets at unmasked positions do not change the loss
        changed = {**inputs, f"{prefix}labels": torch.where(mask[..., None], labels, labels + 5.0)}
        torch.testing.assert_close(getattr(model(**changed), f"{'image' if prefix else 'video'}_loss"), loss)
    torch.testing.assert_close(out.loss, out.video_loss + out.image_loss)
    out = model(**inputs)
    out.loss.backward()
    assert model.head.lm_head.weight.grad.abs().sum() > 0


def test_regression_labels_of_the_wrong_shape_or_kind_are_clear_errors():
    model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test", target_type="hog"))
    batch = _batch()
    video = {k: batch[k] for k in ("pixel_values", "bool_masked_pos")}
    with pytest.raises(
        ValueError, match=r"'hog' targets of shape \(2, 8, 4, 4, 108\).*got \(2, 8, 4, 4, 768\)"
    ):
        model(**video, labels=torch.zeros(2, 8, 4, 4, 768))
    with pytest.raises(ValueError, match=r"integer token ids need a model with target_type 'tokenizer'"):
        model(**video, labels=torch.zeros(2, 8, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="must be float 'hog' targets"):
        model(**video, labels=torch.zeros(2, 8, 4, 4, 108, dtype=torch.long))
    with pytest.raises(ValueError, match=r"image_pixel_values.*\(3, 4, 4, 108\)"):
        model(
            image_pixel_values=batch["image_pixel_values"],
            image_bool_masked_pos=batch["image_bool_masked_pos"],
            image_labels=torch.zeros(3, 8, 4, 108),
        )
    tokens = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test"))
    with pytest.raises(ValueError, match="visual-token ids of shape"):
        tokens(**video, labels=torch.zeros(2, 8, 4, 4, 108))


def test_saved_folder_keeps_the_target_and_loads_as_remote_code(tmp_path):
    model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test", target_type="pixel")).eval()
    folder = tmp_path / "pixel-model"
    model.save_pretrained(folder)
    assert not (folder / "targets.py").exists()  # training-only: the model does not import it
    reloaded = BEVTForMaskedVideoModeling.from_pretrained(folder).eval()
    assert (reloaded.config.target_type, reloaded.config.target_dim) == ("pixel", 768)
    inputs = model_inputs(_batch(), PatchTargets.from_config(reloaded.config), "cpu")
    with torch.no_grad():
        expected = model(**inputs)
        torch.testing.assert_close(reloaded(**inputs).loss, expected.loss)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "bevt" or name.startswith("bevt."):
                    raise ImportError("bevt is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForPreTraining
        model = AutoModelForPreTraining.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules") and model.config.target_type == "pixel"
        with torch.no_grad():
            out = model(**torch.load({str(tmp_path / "inputs.pt")!r}))
        print("LOSS", out.loss.item(), out.video_mask_r2.item())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loss, r2 = (float(v) for v in result.stdout.split("LOSS")[-1].split())
    assert loss == pytest.approx(expected.loss.item(), rel=1e-5)
    assert r2 == pytest.approx(expected.video_mask_r2.item(), rel=1e-4)


# --------------------------------------------------------------------------------------------------- pictures


@pytest.mark.parametrize("kind", ["hog", "pixel", "tokenizer", "tokenizer-decoder"])
def test_pictures_show_the_prediction_only_at_masked_patches(kind, tmp_path):
    from bevt import BEVTVisualTokenizer, BEVTVisualTokenizerConfig
    from bevt.visualization import picture_size, pretraining_picture, render_panels

    target_type = kind.split("-")[0]
    model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test", target_type=target_type)).eval()
    tokenizer = None
    if kind == "tokenizer-decoder":  # ids decoded to pixels through the tokenizer's decoder
        config = BEVTVisualTokenizerConfig(
            vocab_size=64, image_size=32, dalle_hidden_size=8, dalle_num_blocks_per_group=1, has_decoder=True
        )
        tokenizer = BEVTVisualTokenizer(config).eval()
    batch = _batch()
    if target_type == "tokenizer":
        inputs = {
            **batch,
            "labels": torch.randint(0, 64, (2, 8, 4, 4)),
            "image_labels": torch.randint(0, 64, (3, 4, 4)),
        }
    else:
        inputs = model_inputs(batch, PatchTargets.from_config(model.config), "cpu")
    with torch.no_grad():
        out = model(**inputs, return_logits=True)
    for prefix, logits, columns in (("", out.logits, 8), ("image_", out.image_logits, 1)):
        mask = inputs[f"{prefix}bool_masked_pos"][0]
        panels = render_panels(
            inputs[f"{prefix}pixel_values"], inputs[f"{prefix}bool_masked_pos"], inputs[f"{prefix}labels"], logits,
            target_type, tokenizer=tokenizer,
        )  # fmt: skip
        for row in panels.rows():
            assert row.shape == (columns, 64, 64, 3) and row.min() >= 0 and row.max() <= 1
        expected_mask = (mask.repeat_interleave(2, 0) if prefix == "" else mask[None]).numpy()
        np.testing.assert_array_equal(panels.pixel_mask, expected_mask.repeat(16, -2).repeat(16, -1))
        outside = ~panels.pixel_mask
        np.testing.assert_array_equal(panels.prediction[outside], panels.targets[outside])
        np.testing.assert_array_equal(panels.masked_input[outside], panels.input[outside])
        assert (panels.masked_input[panels.pixel_mask] == 0.5).all()
        assert (
            np.abs(panels.prediction - panels.targets)[panels.pixel_mask].max() > 0.01
        )  # an untrained guess
        picture = pretraining_picture(panels)
        path = tmp_path / f"{kind}{prefix}.png"
        picture.save(path)
        from PIL import Image

        with Image.open(path) as saved:
            assert (
                saved.size == picture_size(columns, 64, 64, scale=2) == (96 + columns * 130 - 2, 4 * 130 - 2)
            )
    if target_type == "pixel":  # targets are the input again: un-normalised with each patch's own statistics
        np.testing.assert_allclose(panels.targets, panels.input, atol=2e-3)
