"""Streaming shards (bevt.data.streaming): round trip, rank split, exact resume, bad samples."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from test_shards import encode_jpeg, encode_video

from bevt.data.shards import write_shards
from bevt.data.streaming import (
    IGNORE_LABEL,
    DataQualityError,
    StreamDataLoader,
    build_stream,
    shard_features,
)
from bevt.data.transforms import PretrainingImageTransform, PretrainingVideoTransform

NUM_VIDEOS = 16


@pytest.fixture(scope="module")
def video_bytes() -> list[bytes]:
    return [encode_video(12 + (i % 3) * 6, seed=i) for i in range(NUM_VIDEOS)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, video_bytes: list[bytes]) -> Path:
    """16 labelled videos in 4 shards of 4."""
    out = tmp_path_factory.mktemp("shards")
    samples = [
        (f"v{i:02d}", "mp4", video_bytes[i], {"label": i % 5, "path": f"c/{i}.mp4"})
        for i in range(NUM_VIDEOS)
    ]
    write_shards(samples, out, num_shards=4, kind="video")
    return out


def _tiny_transform() -> PretrainingVideoTransform:
    return PretrainingVideoTransform(image_size=32, scale_range=(40, 48))


def _keys(samples) -> list[str]:
    return [s["__key__"] for s in samples]


def test_round_trip_keys_labels_and_frames(shards: Path):
    stream = build_stream(shards, clip_len=4, frame_interval=2, shuffle_buffer=0, shuffle_shards=False)
    assert stream.kind == "video" and stream.num_shards == 4 and stream.total_examples == NUM_VIDEOS
    samples = list(stream)
    assert _keys(samples) == [f"v{i:02d}" for i in range(NUM_VIDEOS)]  # no shuffling: write order
    assert [s["labels"] for s in samples] == [i % 5 for i in range(NUM_VIDEOS)]
    video = samples[0]["pixel_values"]
    assert video.dtype == torch.uint8 and video.shape == (4, 48, 64, 3)
    # frames are in order: the synthetic clips get brighter frame by frame
    means = video.float().mean(dim=(1, 2, 3))
    assert bool((means[1:] > means[:-1]).all())
    assert stream.stats.as_dict() == {"ok": NUM_VIDEOS}
    assert all(s["__url__"].endswith(".tar") for s in samples)


def test_multi_clip_test_mode(shards: Path):
    kwargs = dict(
        clip_len=4, frame_interval=1, num_clips=3, test_mode=True, shuffle_buffer=0, shuffle_shards=False
    )
    stream = build_stream(shards, **kwargs)
    first = next(iter(stream))["pixel_values"]
    assert first.shape == (3, 4, 48, 64, 3)  # (num_clips, T, H, W, 3)
    stream.set_epoch(5)  # test-mode windows do not depend on the epoch
    assert torch.equal(next(iter(stream))["pixel_values"], first)


def test_shuffled_stream_covers_every_sample_once(shards: Path):
    stream = build_stream(shards, clip_len=2, shuffle_buffer=5, seed=3)
    epoch0 = _keys(stream)
    assert sorted(epoch0) == [f"v{i:02d}" for i in range(NUM_VIDEOS)]
    assert epoch0 != sorted(epoch0)
    assert _keys(stream) == epoch0  # same epoch, same order
    stream.set_epoch(1)
    epoch1 = _keys(stream)
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_split_covers_every_sample_once(shards: Path, world_size: int):
    per_rank = []
    for rank in range(world_size):
        stream = build_stream(shards, clip_len=2, shuffle_buffer=4, seed=1, rank=rank, world_size=world_size)
        keys = _keys(stream)
        assert len(keys) == stream.num_examples
        per_rank.append(keys)
    flat = [k for keys in per_rank for k in keys]
    assert sorted(flat) == [f"v{i:02d}" for i in range(NUM_VIDEOS)]  # disjoint and complete
    assert build_stream(shards, world_size=world_size).splits_by_shard == (world_size == 2)


def _same_samples(a: dict, b: dict) -> bool:
    return (
        a["__key__"] == b["__key__"]
        and a["seed"] == b["seed"]
        and torch.equal(a["pixel_values"], b["pixel_values"])
    )


def test_resume_in_process_is_exact(shards: Path):
    kwargs = dict(
        transform=_tiny_transform(), clip_len=4, frame_interval=2, shuffle_buffer=3, seed=7, repeat=True
    )
    reference = build_stream(shards, **kwargs)
    it = iter(reference)
    expected = [next(it) for _ in range(NUM_VIDEOS + 9)]  # crosses an epoch boundary
    for stop in (0, 5, 15, NUM_VIDEOS + 2):
        stream = build_stream(shards, **kwargs)
        it = iter(stream)
        head = [next(it) for _ in range(stop)]
        state = stream.state_dict()
        resumed = build_stream(shards, **kwargs)
        resumed.load_state_dict(state)
        rest = iter(resumed)
        tail = [next(rest) for _ in range(len(expected) - stop)]
        assert all(_same_samples(x, y) for x, y in zip(head + tail, expected)), f"resume after {stop}"
    # the epoch changed the order, and augmentations differ between epochs for the same video
    assert _keys(expected[:NUM_VIDEOS]) != _keys(expected[NUM_VIDEOS:] + expected[:9])[:NUM_VIDEOS]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_dataloader_is_exact(shards: Path, num_workers: int):
    def loader():
        stream = build_stream(shards, clip_len=2, frame_interval=3, shuffle_buffer=3, seed=5, repeat=True)
        return StreamDataLoader(stream, batch_size=3, num_workers=num_workers)

    reference = loader()
    it = iter(reference)
    expected = [next(it)["__key__"] for _ in range(9)]
    del it
    partial = loader()
    it = iter(partial)
    head = [next(it)["__key__"] for _ in range(3)]  # with 2 workers: w0, w1, w0 -> resume mid-rotation
    state = json.loads(json.dumps(partial.state_dict()))  # checkpoints may store it as JSON
    del it
    assert state["next_worker"] == (1 if num_workers else 0)
    assert set(state["workers"]) == ({"0", "1"} if num_workers else {"0"})
    resumed = loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [next(it)["__key__"] for _ in range(6)]
    assert head + tail == expected
    assert resumed.stats.ok == 27
    other = StreamDataLoader(partial.stream, batch_size=3, num_workers=1 if num_workers else 2)
    with pytest.raises(ValueError, match="worker slot"):
        other.load_state_dict(state)


def test_state_is_checked_against_the_stream(shards: Path):
    stream = build_stream(shards, seed=1, clip_len=2)
    next(iter(stream))
    state = stream.state_dict()
    with pytest.raises(ValueError, match="seed"):
        build_stream(shards, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="not a bevt stream state"):
        build_stream(shards).load_state_dict({"epoch": 0})


def test_workers_capped_at_shards_per_rank(shards: Path, caplog: pytest.LogCaptureFixture):
    stream = build_stream(shards, clip_len=2, rank=1, world_size=2)
    with caplog.at_level(logging.WARNING):
        loader = StreamDataLoader(stream, batch_size=4, num_workers=4)
    assert loader.num_workers == 2 and "shards per rank" in caplog.text


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory: pytest.TempPathFactory, video_bytes: list[bytes]) -> Path:
    """A shard mixing good videos with a truncated mp4, a zero-byte sample, garbage bytes, a sample without a
    label, a JPEG in the video stream, and bad metadata; the good ones are v0..v5."""
    out = tmp_path_factory.mktemp("bad")
    good = [(f"v{i}", "mp4", video_bytes[i], {"label": i}) for i in range(6)]
    bad = [
        ("truncated", "mp4", video_bytes[6][: len(video_bytes[6]) // 2], {"label": 1}),
        ("zero", "mp4", b"", {"label": 1}),
        ("garbage", "mp4", bytes(range(256)) * 8, {"label": 1}),
        ("image", "jpg", encode_jpeg(), {"label": 1}),
        ("nolabel", "mp4", video_bytes[7], {"label": None}),
        ("badlabel", "avi", video_bytes[8], {"label": 1, "path": None}),
    ]
    samples = [
        good[0],
        bad[0],
        good[1],
        bad[1],
        good[2],
        bad[2],
        good[3],
        bad[3],
        good[4],
        bad[4],
        good[5],
        bad[5],
    ]
    write_shards(samples, out, num_shards=2)
    # "badlabel": rewrite its json with a string label (the writer refuses to write one)
    path = out / "shard-00001.tar"
    members = []
    with tarfile.open(path) as tar:
        for m in tar:
            data = tar.extractfile(m).read()
            if m.name == "badlabel.json":
                data = b'{"label": "one"}'
            members.append((m.name, data))
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def test_bad_samples_are_skipped_counted_and_logged(bad_shards: Path, caplog: pytest.LogCaptureFixture):
    stream = build_stream(
        bad_shards, clip_len=4, shuffle_buffer=0, require_label=True, min_samples_for_check=1000
    )
    with caplog.at_level(logging.WARNING, logger="bevt.data.streaming"):
        keys = _keys(stream)
    assert sorted(keys) == [f"v{i}" for i in range(6)]
    assert stream.stats.as_dict() == {
        "ok": 6,
        "decode_error": 2,
        "empty": 1,
        "missing_media": 1,
        "missing_label": 1,
        "bad_metadata": 1,
    }
    assert "'truncated' of shard" in caplog.text and "shard-00000.tar" in caplog.text
    assert "'zero'" in caplog.text and "empty" in caplog.text


def test_bad_sample_counts_reach_the_loader(bad_shards: Path):
    stream = build_stream(bad_shards, clip_len=4, shuffle_buffer=0, min_samples_for_check=1000)
    loader = StreamDataLoader(stream, batch_size=4, num_workers=2)
    labels = [int(x) for batch in loader for x in batch["labels"]]
    assert sorted(labels) == [IGNORE_LABEL, 0, 1, 2, 3, 4, 5]  # "nolabel" kept without require_label
    assert loader.stats.as_dict() == {
        "ok": 7,
        "decode_error": 2,
        "empty": 1,
        "missing_media": 1,
        "bad_metadata": 1,
    }
    assert stream.epoch == 1  # a finished pass moves to the next epoch


def test_too_many_failures_stop_the_run(bad_shards: Path, tmp_path: Path):
    stream = build_stream(bad_shards, clip_len=4, max_failure_fraction=0.2, min_samples_for_check=5)
    with pytest.raises(DataQualityError, match=r"samples failed to load \(> 20%\)"):
        list(stream)
    write_shards([(f"z{i}", "mp4", b"\x00" * 50, {"label": 0}) for i in range(3)], tmp_path)
    with pytest.raises(DataQualityError, match="no sample of epoch 0 could be loaded"):
        list(build_stream(tmp_path, clip_len=2))


def test_truncated_tar_skips_rest_of_shard(shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    files = sorted(shards.glob("*.tar"))
    broken = tmp_path / "broken.tar"
    data = files[0].read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    stream = build_stream([broken, files[1]], clip_len=2, shuffle_shards=False, shuffle_buffer=0)
    with caplog.at_level(logging.ERROR):
        keys = _keys(stream)
    assert keys[-4:] == ["v04", "v05", "v06", "v07"] and 1 <= len(keys) - 4 <= 2
    assert stream.stats.failed["shard_error"] == 1 and "skipping the rest of that shard" in caplog.text


def test_image_stream(tmp_path: Path, shared_data: Path):
    images = sorted((shared_data / "images").glob("*.jpg"))
    write_shards([(f"i{i}", "jpg", p.read_bytes(), {"label": i}) for i, p in enumerate(images)], tmp_path)
    transform = PretrainingImageTransform(image_size=64, scale_range=(72, 80))
    stream = build_stream(tmp_path, transform=transform, shuffle_buffer=4)
    assert stream.kind == "image"
    samples = list(stream)
    assert len(samples) == len(images)
    assert samples[0]["pixel_values"].shape == (3, 64, 64)
    assert samples[0]["tokenizer_pixel_values"].shape == (3, 32, 32)


def test_real_videos_stream(tmp_path: Path, shared_data: Path):
    videos = sorted((shared_data / "videos").glob("*"))
    videos = [p for p in videos if p.suffix in (".mp4", ".avi")]
    write_shards(
        [(f"r{i}", p.suffix[1:], p.read_bytes(), {"label": i}) for i, p in enumerate(videos)], tmp_path
    )
    stream = build_stream(tmp_path, transform=PretrainingVideoTransform(), clip_len=16, frame_interval=8)
    samples = list(stream)
    assert len(samples) == len(videos) == 5  # the 32-frame clip loops, the AVI decodes
    assert {tuple(s["pixel_values"].shape) for s in samples} == {(16, 3, 224, 224)}
    assert {tuple(s["tokenizer_pixel_values"].shape) for s in samples} == {(16, 3, 112, 112)}


def test_features_declare_media_as_bytes():
    features = shard_features()
    assert all(features[ext].dtype == "binary" for ext in ("mp4", "avi", "webm", "mkv", "jpg", "jpeg", "png"))
