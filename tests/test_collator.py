"""The pretraining collator (bevt.data.collator) and the full data path into BEVTForMaskedVideoModeling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_shards import encode_jpeg, encode_video

from bevt.data.collator import BEVTPretrainingCollator
from bevt.data.shards import write_shards
from bevt.data.streaming import StreamDataLoader, build_stream
from bevt.data.transforms import PretrainingImageTransform, PretrainingVideoTransform
from bevt.masking import BlockMaskGenerator, TubeMaskGenerator

# 64-pixel crops, 8 frames: mask grid (4, 4, 4) for videos, (4, 4) for images; tokenizer input 32 px.
S, T = 64, 8


def _collator(seed: int = 0) -> BEVTPretrainingCollator:
    return BEVTPretrainingCollator(
        TubeMaskGenerator(
            num_frames=T // 2, height=S // 16, width=S // 16, num_masking_patches=8, min_num_patches=2
        ),
        BlockMaskGenerator(S // 16, S // 16, num_masking_patches=8, min_num_patches=2),
        seed=seed,
    )


def _video(seed: int | None = 0) -> dict:
    sample = {
        "pixel_values": torch.randn(T, 3, S, S),
        "tokenizer_pixel_values": torch.rand(T, 3, S // 2, S // 2),
    }
    if seed is not None:
        sample["seed"] = seed
    return sample


def _image(seed: int | None = 0) -> dict:
    sample = {"pixel_values": torch.randn(3, S, S), "tokenizer_pixel_values": torch.rand(3, S // 2, S // 2)}
    if seed is not None:
        sample["seed"] = seed
    return sample


def test_batch_contract_for_both_streams():
    batch = _collator()([_video(1), _image(2), _video(3), _image(4), _image(5)])
    expected = {
        "pixel_values": ((2, T, 3, S, S), torch.float32),
        "bool_masked_pos": ((2, T // 2, S // 16, S // 16), torch.bool),
        "tokenizer_pixel_values": ((2, T, 3, S // 2, S // 2), torch.float32),
        "image_pixel_values": ((3, 3, S, S), torch.float32),
        "image_bool_masked_pos": ((3, S // 16, S // 16), torch.bool),
        "image_tokenizer_pixel_values": ((3, 3, S // 2, S // 2), torch.float32),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == expected
    assert batch["image_bool_masked_pos"].flatten(1).sum(1).tolist() == [8, 8, 8]
    tube = batch["bool_masked_pos"]
    assert all(plane.sum() in (0, 8) for clip in tube for plane in clip)  # one 2D mask repeated along a tube


def test_single_stream_batches():
    assert set(_collator()([_video(), _video(1)])) == {
        "pixel_values",
        "bool_masked_pos",
        "tokenizer_pixel_values",
    }
    assert set(_collator()([_image()])) == {
        "image_pixel_values",
        "image_bool_masked_pos",
        "image_tokenizer_pixel_values",
    }


def test_batches_without_tokenizer_copies():
    """Transforms built with tokenizer_size=0 (HOG / pixel targets) give batches without the tokenizer keys; a
    tokenizer target then names what is missing instead of failing on a KeyError."""
    from bevt.pretraining import model_inputs
    from bevt.targets import PatchTargets

    def bare(sample: dict) -> dict:
        return {k: v for k, v in sample.items() if k != "tokenizer_pixel_values"}

    batch = _collator()([bare(_video(1)), bare(_image(2))])
    assert set(batch) == {"pixel_values", "bool_masked_pos", "image_pixel_values", "image_bool_masked_pos"}
    inputs = model_inputs(batch, PatchTargets("pixel", patch_size=16), "cpu")
    assert inputs["labels"].shape == (1, T, S // 16, S // 16, 768)
    assert inputs["image_labels"].shape == (1, S // 16, S // 16, 768)

    class Tokenizer:
        def get_codebook_indices(self, pixels):  # pragma: no cover - never reached
            raise AssertionError

    with pytest.raises(ValueError, match="no tokenizer_pixel_values for the tokenizer targets"):
        model_inputs(batch, Tokenizer(), "cpu")


def test_masks_follow_the_sample_seed():
    a = _collator(seed=0)([_video(11), _video(12), _image(13)])
    b = _collator(seed=99)([_video(12), _video(11), _image(13)])  # another collator, order swapped
    assert torch.equal(a["bool_masked_pos"][0], b["bool_masked_pos"][1])
    assert torch.equal(a["bool_masked_pos"][1], b["bool_masked_pos"][0])
    assert torch.equal(a["image_bool_masked_pos"], b["image_bool_masked_pos"])
    assert not torch.equal(a["bool_masked_pos"][0], a["bool_masked_pos"][1])


def test_fallback_generator_and_given_masks():
    first = _collator(seed=5)([_video(None), _video(None)])["bool_masked_pos"]
    again = _collator(seed=5)([_video(None), _video(None)])["bool_masked_pos"]
    assert torch.equal(first, again)
    given = torch.zeros(T // 2, S // 16, S // 16, dtype=torch.bool)
    given[0, 0, 0] = True
    sample = {**_video(), "bool_masked_pos": given}
    assert torch.equal(_collator()([sample])["bool_masked_pos"][0], given)


def test_collator_errors():
    with pytest.raises(ValueError, match="empty list"):
        _collator()([])
    with pytest.raises(ValueError, match=r"mask grid \(14, 14\) does not tile"):
        BEVTPretrainingCollator()([_image()])  # default 14x14 masks vs 64-pixel images
    with pytest.raises(ValueError, match="different 'pixel_values' shapes"):
        _collator()([_video(), {**_video(), "pixel_values": torch.randn(T, 3, 32, 32)}])
    with pytest.raises(ValueError, match="image sample 1 lacks 'tokenizer_pixel_values' while others"):
        _collator()([_image(), {"pixel_values": torch.randn(3, S, S)}])
    with pytest.raises(ValueError, match="must be"):
        _collator()([{"pixel_values": torch.randn(S, S)}])


def test_stream_to_model(tmp_path: Path):
    """Shards -> streams -> loaders -> collator -> BEVTForMaskedVideoModeling (tiny test preset)."""
    from bevt import BEVTConfig, BEVTForMaskedVideoModeling

    write_shards([(f"v{i}", "mp4", encode_video(16, seed=i), {"label": i}) for i in range(4)], tmp_path / "v")
    write_shards([(f"i{i}", "jpg", encode_jpeg(seed=i), {"label": i}) for i in range(4)], tmp_path / "i")
    videos = build_stream(
        tmp_path / "v",
        transform=PretrainingVideoTransform(S, (72, 80)),
        clip_len=T,
        frame_interval=2,
        seed=1,
        repeat=True,
    )
    images = build_stream(
        tmp_path / "i", transform=PretrainingImageTransform(S, (72, 80)), seed=1, repeat=True
    )
    collator = _collator()
    video_loader = StreamDataLoader(videos, batch_size=2, collate_fn=collator)
    image_loader = StreamDataLoader(images, batch_size=3, collate_fn=collator)
    batch = {**next(iter(video_loader)), **next(iter(image_loader))}
    config = BEVTConfig.from_preset("test")
    model = BEVTForMaskedVideoModeling(config).eval()
    tokens = batch["tokenizer_pixel_values"]
    image_tokens = batch["image_tokenizer_pixel_values"]
    labels = torch.randint(0, config.vocab_size, (tokens.shape[0], T, S // 16, S // 16))
    image_labels = torch.randint(0, config.vocab_size, (image_tokens.shape[0], S // 16, S // 16))
    inputs = {k: v for k, v in batch.items() if "tokenizer" not in k}
    with torch.no_grad():
        out = model(**inputs, labels=labels, image_labels=image_labels)
    assert torch.isfinite(out.loss) and torch.isfinite(out.video_loss) and torch.isfinite(out.image_loss)
