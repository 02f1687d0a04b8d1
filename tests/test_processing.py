"""BEVTVideoProcessor: real clips, every input kind, sampling modes, multi-view, save/load, the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as tvF
from PIL import Image
from transformers import AutoVideoProcessor, pipeline

from bevt import BEVTConfig, BEVTForVideoClassification, BEVTVideoProcessor
from bevt.frame_sampling import sample_frame_indices
from bevt.video_decoding import VideoDecodingError, available_backends, decode_video

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _video(shared_data: Path, name: str) -> Path:
    return shared_data / "videos" / name


def _reference(frames: torch.Tensor, short: int = 224, crop: int = 224) -> torch.Tensor:
    """Resize short side (bilinear, antialiased), centre crop, ImageNet-normalize: (T, H, W, 3) -> (T, 3, c, c)."""
    x = frames.permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    x = tvF.center_crop(tvF.resize(x, list(size), antialias=True), [crop, crop])
    return (x.float() / 255 - MEAN) / STD


# --------------------------------------------------------------------------------------------- config


def test_defaults_save_and_auto_load(tmp_path: Path) -> None:
    processor = BEVTVideoProcessor()
    assert processor.size.shortest_edge == 224
    assert (processor.crop_size.height, processor.crop_size.width) == (224, 224)
    assert tuple(processor.image_mean) == (0.485, 0.456, 0.406)
    assert tuple(processor.image_std) == (0.229, 0.224, 0.225)
    assert (processor.num_frames, processor.frame_interval, processor.sampling_mode) == (16, 8, "dense")
    assert (processor.num_clips, processor.num_crops, processor.num_views) == (1, 1, 1)
    assert processor.test_mode is True
    assert processor.model_input_names == ["pixel_values"]

    custom = BEVTVideoProcessor(
        num_frames=32, frame_interval=2, num_clips=4, num_crops=3, video_backend="pyav", seed=3
    )
    custom.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert saved["video_processor_type"] == "BEVTVideoProcessor"
    assert (saved["num_frames"], saved["frame_interval"], saved["num_crops"]) == (32, 2, 3)
    assert saved["video_backend"] == "pyav"
    loaded = AutoVideoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is BEVTVideoProcessor
    assert loaded.to_dict() == custom.to_dict()
    assert BEVTVideoProcessor.from_pretrained(tmp_path, num_clips=2).num_views == 6


def test_bad_options_are_value_errors(shared_data: Path) -> None:
    with pytest.raises(ValueError, match="num_crops must be 1"):
        BEVTVideoProcessor(num_crops=2)
    with pytest.raises(ValueError, match="sampling_mode"):
        BEVTVideoProcessor(sampling_mode="random")
    with pytest.raises(ValueError, match="frame_interval must be a positive integer"):
        BEVTVideoProcessor(frame_interval=0)
    processor = BEVTVideoProcessor()
    with pytest.raises(ValueError, match="not fps"):
        processor(torch.zeros(4, 8, 8, 3, dtype=torch.uint8), fps=2)
    with pytest.raises(ValueError, match="video 1 of the batch has an unsupported type int"):
        processor([torch.zeros(4, 8, 8, 3, dtype=torch.uint8), 3])
    with pytest.raises(ValueError, match="empty"):
        processor([])
    good = _video(shared_data, "short_32f.mp4")
    with pytest.raises(VideoDecodingError, match="video 1 of the batch"):
        processor([good, b"definitely not a video" * 10])


# --------------------------------------------------------------------------------------------- real files


def test_real_clip_matches_a_reference_transform_on_every_backend(shared_data: Path) -> None:
    path = _video(shared_data, "clip_300f_426x240.mp4")
    processor = BEVTVideoProcessor()
    indices = sample_frame_indices(300, clip_len=16, frame_interval=8, test_mode=True)[0]
    expected = _reference(decode_video(path, indices))
    for backend in available_backends():
        for source in (path, str(path), path.read_bytes(), {"bytes": path.read_bytes(), "path": None}):
            out = processor(source, video_backend=backend, return_tensors="pt", return_metadata=True)
            pixel_values = out["pixel_values"]
            assert pixel_values.shape == (1, 16, 3, 224, 224) and pixel_values.dtype == torch.float32
            torch.testing.assert_close(pixel_values[0], expected, atol=1e-5, rtol=0)
            meta = out["video_metadata"][0]
            assert meta.frames_indices == indices and meta.total_num_frames == 300
            assert (meta.height, meta.width, meta.video_backend) == (240, 426, backend)


@pytest.mark.parametrize("name", ["clip_164f_320x240.avi", "short_32f.mp4", "kinetics400_arm_wrestling.mp4"])
def test_sampling_modes_on_real_clips(shared_data: Path, name: str) -> None:
    path = _video(shared_data, name)
    processor = BEVTVideoProcessor(num_frames=8)
    total = {"clip_164f_320x240.avi": 164, "short_32f.mp4": 32, "kinetics400_arm_wrestling.mp4": 280}[name]

    def indices(**kwargs: object) -> list[int]:
        out = processor(path, return_tensors="pt", return_metadata=True, **kwargs)
        assert out["pixel_values"].shape[1:] == (8, 3, 224, 224)
        return out["video_metadata"][0].frames_indices

    # dense 8x8 and 8x4, test mode: as the sampler says
    assert indices() == sample_frame_indices(total, clip_len=8, frame_interval=8, test_mode=True)[0]
    assert (
        indices(frame_interval=4)
        == sample_frame_indices(total, clip_len=8, frame_interval=4, test_mode=True)[0]
    )
    # uniform (SSv2 style): one frame per segment, increasing
    uniform = indices(sampling_mode="uniform")
    assert uniform == sample_frame_indices(total, mode="uniform", clip_len=8, test_mode=True)[0]
    assert uniform == sorted(uniform) and uniform[-1] >= total * 3 // 4
    # random offsets: reproducible with a seed
    seeded = [indices(test_mode=False, seed=s, sampling_mode="uniform") for s in (1, 1, 2, 3, 4)]
    assert seeded[0] == seeded[1] and any(s != seeded[0] for s in seeded[2:])


def test_short_clip_loops_its_frames(shared_data: Path) -> None:
    path = _video(shared_data, "short_32f.mp4")
    out = BEVTVideoProcessor()(path, return_tensors="pt", return_metadata=True)  # 16 x 8 needs 128 frames
    assert out["video_metadata"][0].frames_indices == [0, 8, 16, 24] * 4
    pixel_values = out["pixel_values"][0]
    assert torch.equal(pixel_values[0], pixel_values[4]) and not torch.equal(pixel_values[0], pixel_values[1])


def test_multi_view_clips_and_three_crops(shared_data: Path) -> None:
    paths = [_video(shared_data, "kinetics_clip_300f.mp4"), _video(shared_data, "short_32f.mp4")]
    processor = BEVTVideoProcessor(num_frames=8, frame_interval=4)
    out = processor(
        paths, num_clips=2, num_crops=3, return_tensors="pt", return_num_views=True, return_metadata=True
    )
    pixel_values = out["pixel_values"]
    assert pixel_values.shape == (2 * 2 * 3, 8, 3, 224, 224)
    assert out["num_views"].tolist() == [6, 6]
    clips = sample_frame_indices(300, clip_len=8, frame_interval=4, num_clips=2, test_mode=True)
    assert out["video_metadata"][0].frames_indices == clips[0] + clips[1]

    # order: video, clip, crop (left, centre, right for these landscape videos)
    frames = decode_video(paths[0], clips[1]).permute(0, 3, 1, 2)
    resized = tvF.resize(frames, [224, int(224 * 340 / 256)], antialias=True)  # (8, 3, 224, 297)
    width = resized.shape[-1]
    for crop, left in enumerate((0, (width - 224) // 2, width - 224)):
        expected = (resized[..., left : left + 224].float() / 255 - MEAN) / STD
        torch.testing.assert_close(pixel_values[3 + crop], expected, atol=1e-5, rtol=0)
    single = processor(paths, num_clips=2, return_tensors="pt")["pixel_values"]
    assert single.shape == (4, 8, 3, 224, 224)
    torch.testing.assert_close(single[1], pixel_values[4])  # the centre crop of clip 1 of video 0

    scores = BEVTVideoProcessor.aggregate_views(torch.randn(12, 5), 6)
    assert scores.shape == (2, 5) and torch.allclose(scores.sum(-1), torch.ones(2))
    logits = torch.arange(12.0).view(12, 1).repeat(1, 3)
    assert BEVTVideoProcessor.aggregate_views(logits, 6, average="logits")[:, 0].tolist() == [2.5, 8.5]
    with pytest.raises(ValueError, match="groups of 5 views"):
        BEVTVideoProcessor.aggregate_views(torch.randn(12, 5), 5)


def test_three_crops_of_a_portrait_video_run_top_to_bottom() -> None:
    frames = torch.randint(0, 256, (4, 300, 224, 3), dtype=torch.uint8)  # already 224 wide: no resize
    out = BEVTVideoProcessor(num_frames=4, frame_interval=1)(frames, num_crops=3, return_tensors="pt")
    pixel_values = out["pixel_values"]
    assert pixel_values.shape == (3, 4, 3, 224, 224)
    x = (frames.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    for crop, top in enumerate((0, 38, 76)):
        torch.testing.assert_close(pixel_values[crop], x[..., top : top + 224, :], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- in-memory input


def test_array_tensor_and_pil_inputs_agree(shared_data: Path) -> None:
    path = _video(shared_data, "clip_164f_320x240.avi")
    frames = decode_video(path, list(range(0, 64, 4)))  # (16, 240, 320, 3)
    processor = BEVTVideoProcessor(num_frames=16, frame_interval=1)
    expected = processor(frames, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(expected[0], _reference(frames), atol=1e-5, rtol=0)
    variants = {
        "numpy": frames.numpy(),
        "channels first": frames.permute(0, 3, 1, 2),
        "PIL frames": [Image.fromarray(f) for f in frames.numpy()],
        "array frames": list(frames.numpy()),
    }
    for what, video in variants.items():
        torch.testing.assert_close(processor(video, return_tensors="pt")["pixel_values"], expected, msg=what)
    batch = processor(torch.stack([frames, frames.flip(0)]), return_tensors="pt")["pixel_values"]  # 5D input
    assert batch.shape == (2, 16, 3, 224, 224)
    torch.testing.assert_close(batch[1], expected[0].flip(0))
    mixed = processor([frames, [Image.fromarray(f) for f in frames.numpy()]], return_tensors="pt")[
        "pixel_values"
    ]
    torch.testing.assert_close(mixed, torch.cat([expected, expected]))
    listed = processor([frames[:5], frames], do_sample_frames=False, return_tensors=None)["pixel_values"]
    assert [tuple(v.shape) for v in listed] == [(5, 3, 224, 224), (16, 3, 224, 224)]


def test_grayscale_float_and_single_image_inputs() -> None:
    processor = BEVTVideoProcessor(num_frames=4, frame_interval=2)
    gray = torch.full((6, 240, 320, 1), 128, dtype=torch.uint8)
    out = processor(gray, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 4, 3, 224, 224)
    expected = (128 / 255 - MEAN.view(3)) / STD.view(3)
    torch.testing.assert_close(out[0, :, :, 100, 100], expected.expand(4, 3), atol=1e-5, rtol=0)
    as_float = processor(gray.float().expand(-1, -1, -1, 3), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(as_float, out, atol=1e-4, rtol=0)
    image = np.full((240, 320, 3), 128, dtype=np.uint8)  # one image: a 1-frame video, looped
    assert processor(image, return_tensors="pt")["pixel_values"].shape == (1, 4, 3, 224, 224)
    no_norm = processor(gray, do_normalize=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(no_norm.mean(), torch.tensor(128 / 255))


def test_fetch_videos_uses_bevt_decoding(shared_data: Path) -> None:
    path = _video(shared_data, "short_32f.mp4")
    processor = BEVTVideoProcessor(num_frames=4, frame_interval=2)
    frames, meta = processor.fetch_videos(str(path), sample_indices_fn=processor.sample_frames)
    indices = sample_frame_indices(32, clip_len=4, frame_interval=2, test_mode=True)[0]
    assert meta.frames_indices == indices and meta.total_num_frames == 32
    assert np.array_equal(frames, decode_video(path, indices).numpy())


# --------------------------------------------------------------------------------------------- pipeline


def test_video_classification_pipeline_on_a_real_file(shared_data: Path, tmp_path: Path) -> None:
    labels = ["arm wrestling", "bowling", "cooking"]
    config = BEVTConfig.from_preset(
        "test", num_labels=3, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    model = BEVTForVideoClassification(config).eval()
    model.save_pretrained(tmp_path)
    size = config.image_size
    processor = BEVTVideoProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, frame_interval=4
    )
    processor.save_pretrained(tmp_path)

    classifier = pipeline("video-classification", model=str(tmp_path))
    assert type(classifier.video_processor) is BEVTVideoProcessor
    path = _video(shared_data, "kinetics400_arm_wrestling.mp4")
    result = classifier(str(path), top_k=3)
    assert sorted(r["label"] for r in result) == sorted(labels)

    inputs = processor(str(path), num_frames=config.num_frames, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, config.num_frames, 3, size, size)
    with torch.no_grad():
        probs = model(**inputs).logits[0].softmax(-1)
    for r in result:
        assert r["score"] == pytest.approx(float(probs[labels.index(r["label"])]), abs=1e-5)

    batch = classifier(
        [str(_video(shared_data, "clip_164f_320x240.avi")), str(_video(shared_data, "short_32f.mp4"))]
    )
    assert len(batch) == 2 and all(len(r) == 3 for r in batch)
