"""Fault injection for the data layer: shards full of broken files must never cost the run or a good sample.

The shards below mix good samples (including awkward but valid ones: grayscale, 1-frame and 1080p videos, CMYK /
16-bit / 1x1 images) with every kind of damage a crawl of web videos produces: truncated mp4s (moov at the end and
at the start), zero-byte members, non-video bytes named .mp4, a tar cut mid-member, a corrupt tar header, invalid /
wrong / missing labels, duplicate members, media of the wrong kind, images that are not images, a decompression
bomb. Every pass must complete, yield each good sample exactly once, count every bad one under the right reason
(and log its key and shard), and stop with a `DataQualityError` only when the bad fraction passes the threshold.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from bevt.data.collator import BEVTPretrainingCollator
from bevt.data.shards import ShardInfo, iter_tar_samples, write_dataset_info, write_shards
from bevt.data.streaming import IGNORE_LABEL, DataQualityError, StreamDataLoader, build_stream
from bevt.data.transforms import PretrainingImageTransform, PretrainingVideoTransform
from bevt.masking import BlockMaskGenerator, TubeMaskGenerator

NUM_LABELS = 5

# ------------------------------------------------------------------------------------------------- media


def encode_video(
    num_frames: int,
    width: int = 64,
    height: int = 64,
    seed: int = 0,
    gray: bool = False,
    faststart_path: Path | None = None,
) -> bytes:
    """H.264 mp4 whose frame i gets brighter with i. `faststart_path`: write there with the moov atom first."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    target: io.BytesIO | str = io.BytesIO() if faststart_path is None else str(faststart_path)
    options = {"movflags": "+faststart"} if faststart_path is not None else {}
    with av.open(target, mode="w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height = width, height
        stream.pix_fmt = "gray" if gray else "yuv420p"
        for i in range(num_frames):
            pixels = base + np.uint8(min(6 * i, 190))
            frame = (
                av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[..., 0]), format="gray")
                if gray
                else av.VideoFrame.from_ndarray(pixels, format="rgb24")
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return target.getvalue() if isinstance(target, io.BytesIO) else faststart_path.read_bytes()


def encode_image(
    fmt: str = "JPEG", mode: str = "RGB", size: tuple[int, int] = (48, 40), seed: int = 0
) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(side: int = 100_000) -> bytes:
    """A 200-byte PNG whose header claims side x side pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * (side // 8 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------- shards


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _meta(label: object = None, **extra: object) -> bytes:
    return json.dumps({"label": label, **extra}).encode()


@dataclass
class Faulty:
    """A shard folder: which keys are good (with their labels) and the skip counts a pass must report."""

    folder: Path
    good: dict[str, int] = field(default_factory=dict)
    expected: Counter = field(default_factory=Counter)
    samples: int = 0

    def member(self, tar: tarfile.TarFile, key: str, ext: str, data: bytes, meta: bytes | None) -> None:
        _add(tar, f"{key}.{ext}", data)
        if meta is not None:
            _add(tar, f"{key}.json", meta)

    def add_good(self, tar: tarfile.TarFile, key: str, ext: str, data: bytes) -> None:
        label = len(self.good) % NUM_LABELS
        self.member(tar, key, ext, data, _meta(label, path=f"{key}.{ext}"))
        self.good[key] = label
        self.samples += 1

    def add_bad(
        self, tar: tarfile.TarFile, reason: str, key: str, ext: str, data: bytes, meta: bytes | None
    ) -> None:
        self.member(tar, key, ext, data, meta)
        self.expected[reason] += 1
        self.samples += 1

    def finish(self, kind: str, shard_counts: list[int]) -> None:
        shards = sorted(self.folder.glob("*.tar"))
        infos = [ShardInfo(p.name, n, p.stat().st_size) for p, n in zip(shards, shard_counts)]
        write_dataset_info(self.folder, infos, kind=kind, labels=[f"class{i}" for i in range(NUM_LABELS)])


@pytest.fixture(scope="module")
def faulty_videos(tmp_path_factory: pytest.TempPathFactory) -> Faulty:
    root = tmp_path_factory.mktemp("faulty_videos")
    out = Faulty(root / "shards")
    out.folder.mkdir()
    good = [encode_video(16 + (i % 4) * 8, seed=i) for i in range(21)]
    moov_last = encode_video(24, seed=100)
    moov_first = encode_video(24, seed=101, faststart_path=root / "faststart.mp4")
    jpeg = encode_image()
    counts = []

    with tarfile.open(out.folder / "shard-00000.tar", "w") as tar:
        out.add_good(tar, "g00", "mp4", good[0])
        out.add_bad(tar, "decode_error", "truncated", "mp4", moov_last[: len(moov_last) // 2], _meta(1))
        out.add_good(tar, "g01", "mp4", good[1])
        out.add_bad(
            tar, "decode_error", "truncated_faststart", "mp4", moov_first[: len(moov_first) // 2], _meta(1)
        )
        out.add_good(tar, "gray", "mp4", encode_video(12, seed=3, gray=True))
        out.add_bad(tar, "empty", "zero_bytes", "mp4", b"", _meta(2))
        out.add_good(tar, "one_frame", "mp4", encode_video(1, seed=4))
        out.add_bad(
            tar, "decode_error", "random_bytes", "mp4", np.random.default_rng(5).bytes(3000), _meta(0)
        )
        out.add_good(tar, "full_hd", "mp4", encode_video(2, 1920, 1080, seed=6))
        out.add_bad(
            tar, "decode_error", "html_page", "mp4", b"<html><body>404 Not Found</body></html>", _meta(0)
        )
        out.add_good(tar, "g02", "mp4", good[2])
        out.add_bad(tar, "decode_error", "jpeg_named_mp4", "mp4", jpeg, _meta(0))
        out.add_good(tar, "odd_size", "mp4", encode_video(10, 34, 18, seed=7))
        out.add_good(tar, "narrow", "mp4", encode_video(6, 48, 48, seed=8))  # decord 0.6 fails: PyAV fallback
    counts.append(out.samples)

    with tarfile.open(out.folder / "shard-00001.tar", "w") as tar:
        out.add_good(tar, "g03", "mp4", good[3])
        out.add_bad(tar, "bad_metadata", "invalid_json", "mp4", good[4], b'{"label": 1,')
        out.add_good(tar, "g04", "mp4", good[5])
        out.add_bad(tar, "missing_label", "no_label", "mp4", good[6], json.dumps({"path": "x.mp4"}).encode())
        out.add_good(tar, "g05", "mp4", good[7])
        out.add_bad(tar, "bad_metadata", "label_out_of_range", "mp4", good[8], _meta(NUM_LABELS + 2))
        out.add_good(tar, "g06", "mp4", good[9])
        out.add_bad(tar, "bad_metadata", "negative_label", "mp4", good[10], _meta(-1))
        out.add_good(tar, "g07", "mp4", good[11])
        out.add_bad(tar, "bad_metadata", "string_label", "mp4", good[12], _meta("three"))
        out.add_good(tar, "g08", "mp4", good[13])
        out.add_bad(tar, "bad_metadata", "json_not_object", "mp4", good[14], b"[1, 2]")
        out.add_bad(tar, "bad_metadata", "json_not_utf8", "mp4", good[14], b"\xff\xfe\x00")
        out.add_good(tar, "g09", "mp4", good[15])
        # a sample with two mp4 members: ambiguous, reported as one shard error
        _add(tar, "duplicate.mp4", good[16])
        out.add_bad(tar, "shard_error", "duplicate", "mp4", good[16], _meta(0))
        out.add_good(tar, "g10", "mp4", good[17])
        out.add_bad(tar, "missing_media", "json_only", "txt", b"a caption", _meta(0))  # no media member
        out.add_good(tar, "g11", "mp4", good[18])
        out.add_bad(tar, "missing_media", "image_in_video_shard", "jpg", jpeg, _meta(0))
        out.add_good(tar, "g12.with.dots", "mp4", good[19])  # keys with dots still group (last extension)
    counts.append(out.samples - sum(counts))

    # a tar cut in the middle of a member: the samples before the cut are good, the cut one is reported
    complete = out.folder / "complete.tmp"
    with tarfile.open(complete, "w") as tar:
        out.add_good(tar, "g13", "mp4", good[20])
        out.add_good(tar, "g14", "mp4", good[0])
        out.add_bad(tar, "shard_error", "cut_here", "mp4", good[1], _meta(0))
    with tarfile.open(complete) as tar:
        cut = tar.getmember("cut_here.mp4").offset_data + len(good[1]) // 2  # inside cut_here.mp4's data
    (out.folder / "shard-00002.tar").write_bytes(complete.read_bytes()[:cut])
    complete.unlink()
    counts.append(3)

    # a corrupt member header: the damage is reported, reading goes on after it
    damaged = out.folder / "shard-00003.tar"
    with tarfile.open(damaged, "w") as tar:
        out.add_good(tar, "g15", "mp4", good[2])
        header_at = tar.offset
        # its mp4 header is destroyed: the json that follows is found alone (missing media)
        out.add_bad(tar, "missing_media", "bad_header", "mp4", good[3], _meta(0))
        out.add_good(tar, "g16", "mp4", good[4])
        out.add_good(tar, "g17", "mp4", good[5])
    raw = bytearray(damaged.read_bytes())
    raw[header_at : header_at + 160] = b"\x07" * 160
    damaged.write_bytes(bytes(raw))
    out.expected["shard_error"] += 1  # the unreadable region
    counts.append(4)

    out.finish("video", counts)
    return out


@pytest.fixture(scope="module")
def faulty_images(tmp_path_factory: pytest.TempPathFactory) -> Faulty:
    out = Faulty(tmp_path_factory.mktemp("faulty_images") / "shards")
    out.folder.mkdir()
    jpeg = encode_image(seed=1)
    with tarfile.open(out.folder / "shard-00000.tar", "w") as tar:
        out.add_good(tar, "i00", "jpg", jpeg)
        out.add_bad(tar, "decode_error", "truncated_jpeg", "jpg", jpeg[: len(jpeg) // 2], _meta(0))
        out.add_good(tar, "gray_png", "png", encode_image("PNG", "L", seed=2))
        out.add_bad(
            tar, "decode_error", "random_bytes", "jpg", np.random.default_rng(3).bytes(2000), _meta(0)
        )
        out.add_good(tar, "cmyk", "jpg", encode_image("JPEG", "CMYK", seed=4))
        out.add_bad(tar, "decode_error", "mp4_named_jpg", "jpg", encode_video(4, seed=5), _meta(0))
        out.add_good(tar, "rgba", "png", encode_image("PNG", "RGBA", seed=6))
        out.add_bad(tar, "decode_error", "html_page", "jpg", b"<html>403 Forbidden</html>", _meta(0))
        out.add_good(tar, "one_pixel", "png", encode_image("PNG", size=(1, 1), seed=7))
        out.add_bad(tar, "decode_error", "decompression_bomb", "png", png_bomb(), _meta(0))
        out.add_good(tar, "sixteen_bit", "png", encode_image("PNG", "I;16", seed=8))
    n0 = out.samples
    with tarfile.open(out.folder / "shard-00001.tar", "w") as tar:
        out.add_bad(tar, "empty", "zero_bytes", "jpg", b"", _meta(0))
        out.add_good(tar, "i01", "jpg", encode_image(seed=9))
        out.add_bad(tar, "missing_media", "video_in_image_shard", "mp4", encode_video(4, seed=10), _meta(0))
        out.add_good(tar, "webp_named_jpg", "jpg", encode_image("WEBP", seed=11))
        out.add_bad(tar, "missing_media", "gif", "gif", encode_image("GIF", "P", seed=12), _meta(0))
        out.add_good(tar, "i02", "jpeg", encode_image(seed=13))
        out.add_bad(tar, "bad_metadata", "invalid_json", "jpg", encode_image(seed=14), b"label=3")
    out.finish("image", [n0, out.samples - n0])
    return out


# ------------------------------------------------------------------------------------------------- helpers


def _keys_and_labels(samples) -> tuple[list[str], dict[str, int]]:
    keys = [s["__key__"] for s in samples]
    return keys, {s["__key__"]: int(s["labels"]) for s in samples}


def _keys_labels_shapes(samples: list[dict]) -> dict[str, list]:
    """Collate raw clips of different sizes (1080p next to 64x64): keep what the test checks."""
    return {
        "keys": [s["__key__"] for s in samples],
        "labels": [int(s["labels"]) for s in samples],
        "shapes": [tuple(s["pixel_values"].shape) for s in samples],
    }


def _skips(stats) -> Counter:
    return Counter({k: v for k, v in stats.as_dict().items() if k != "ok"})


# ------------------------------------------------------------------------------------------------- tests


def test_video_pass_yields_every_good_sample_once_and_counts_every_bad_one(
    faulty_videos: Faulty, caplog: pytest.LogCaptureFixture
):
    stream = build_stream(
        faulty_videos.folder, clip_len=4, frame_interval=2, shuffle_buffer=5, seed=1, require_label=True
    )
    assert stream.kind == "video" and stream.num_labels == NUM_LABELS  # from dataset_info.json
    with caplog.at_level(logging.WARNING, logger="bevt.data.streaming"):
        keys, labels = _keys_and_labels(stream)
    assert sorted(keys) == sorted(faulty_videos.good)  # every good sample, exactly once
    assert labels == faulty_videos.good
    assert stream.stats.ok == len(faulty_videos.good)
    assert _skips(stream.stats) == faulty_videos.expected
    assert stream.stats.attempts == faulty_videos.samples + 1  # + the unreadable region of shard 3
    # every skip is logged with its key, its shard and why
    for key in ("truncated", "zero_bytes", "invalid_json", "label_out_of_range", "duplicate", "cut_here"):
        assert f"skipping sample '{key}' of shard" in caplog.text, key
    assert "'label' 7 is out of range: expected [0, 5)" in caplog.text
    assert "invalid_json.json is not valid JSON" in caplog.text
    assert "shard-00002.tar" in caplog.text and "skipping the rest of that shard" in caplog.text
    assert "corrupt member header" in caplog.text and "reading on from the next member" in caplog.text
    # awkward but valid videos decode to RGB clips of the requested length
    stream = build_stream(faulty_videos.folder, clip_len=4, shuffle_buffer=0, min_samples_for_check=1000)
    clips = {s["__key__"]: s["pixel_values"] for s in stream}
    assert clips["gray"].shape == (4, 64, 64, 3) and clips["one_frame"].shape == (4, 64, 64, 3)
    assert clips["full_hd"].shape == (4, 1080, 1920, 3) and clips["odd_size"].shape == (4, 18, 34, 3)
    assert clips["narrow"].shape == (4, 48, 48, 3)
    assert clips["no_label"].shape[0] == 4  # kept without require_label...
    assert stream.stats.failed["missing_label"] == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_with_workers_delivers_the_same_samples_and_counts(faulty_videos: Faulty, num_workers: int):
    stream = build_stream(faulty_videos.folder, clip_len=2, frame_interval=2, shuffle_buffer=4, seed=2)
    loader = StreamDataLoader(stream, batch_size=3, num_workers=num_workers, collate_fn=_keys_labels_shapes)
    keys, labels = [], {}
    for batch in loader:
        assert all(len(shape) == 4 and shape[0] == 2 and shape[-1] == 3 for shape in batch["shapes"])
        keys += batch["keys"]
        labels.update(zip(batch["keys"], batch["labels"]))
    good = {**faulty_videos.good, "no_label": IGNORE_LABEL}  # without require_label, kept with labels -100
    assert sorted(keys) == sorted(good) and labels == good
    expected = faulty_videos.expected - Counter({"missing_label": 1})
    assert _skips(loader.stats) == expected and loader.stats.ok == len(good)
    assert "skipped" in loader.stats.summary() and "shard_error 3" in loader.stats.summary()
    assert loader.skipped_counts() == {"video": sum(expected.values())}  # what the training log reports


def test_image_pass_with_transform_and_collator(faulty_images: Faulty, caplog: pytest.LogCaptureFixture):
    transform = PretrainingImageTransform(image_size=32, scale_range=(32, 40))
    stream = build_stream(faulty_images.folder, transform=transform, shuffle_buffer=3, seed=4)
    assert stream.kind == "image"
    collator = BEVTPretrainingCollator(image_mask_generator=BlockMaskGenerator(2, 2, 2, min_num_patches=1))
    loader = StreamDataLoader(
        stream, batch_size=4, collate_fn=lambda s: (collator(s), [x["__key__"] for x in s])
    )
    keys = []
    with caplog.at_level(logging.WARNING, logger="bevt.data.streaming"):
        for batch, batch_keys in loader:
            assert batch["image_pixel_values"].shape[1:] == (3, 32, 32)
            assert torch.isfinite(batch["image_pixel_values"]).all()
            keys += batch_keys
    assert sorted(keys) == sorted(faulty_images.good)
    assert _skips(loader.stats) == faulty_images.expected
    assert "DecompressionBombError" in caplog.text and "'decompression_bomb'" in caplog.text


def test_video_transform_and_collator_take_every_good_shape(faulty_videos: Faulty):
    """1080p, grayscale, 1-frame and odd-sized clips all come out as model-ready batches."""
    transform = PretrainingVideoTransform(image_size=32, scale_range=(32, 40))
    stream = build_stream(
        faulty_videos.folder, transform=transform, clip_len=4, frame_interval=2, shuffle_buffer=0, seed=3
    )
    collator = BEVTPretrainingCollator(mask_generator=TubeMaskGenerator(2, 2, 2, 2, min_num_patches=1))
    loader = StreamDataLoader(stream, batch_size=5, num_workers=2, collate_fn=collator)
    total = 0
    for batch in loader:
        assert batch["pixel_values"].shape[1:] == (4, 3, 32, 32)
        assert batch["tokenizer_pixel_values"].shape[1:] == (4, 3, 16, 16)
        assert torch.isfinite(batch["pixel_values"]).all()
        total += batch["pixel_values"].shape[0]
    assert total == len(faulty_videos.good) + 1  # + no_label (kept: pretraining needs no labels)


def test_bad_fraction_threshold_stops_with_a_clear_error(faulty_videos: Faulty, tmp_path: Path):
    bad = faulty_videos.expected.total() / (faulty_videos.samples + 1)
    assert 0.3 < bad < 0.6
    # above the threshold: a clear error naming the counts, the reasons and the last failures
    stream = build_stream(
        faulty_videos.folder, clip_len=2, max_failure_fraction=0.2, min_samples_for_check=10
    )
    with pytest.raises(DataQualityError, match=r"samples failed to load \(> 20%\)") as err:
        list(stream)
    message = str(err.value)
    assert " skipped (" in message and "last failures (key, shard, reason, message)" in message
    assert "shard-0000" in message  # names the shards of the failures
    # the same from DataLoader workers: the error type survives the worker boundary
    stream = build_stream(
        faulty_videos.folder, clip_len=2, max_failure_fraction=0.2, min_samples_for_check=10
    )
    with pytest.raises(DataQualityError, match=r"failed to load \(> 20%\)"):
        list(StreamDataLoader(stream, batch_size=2, num_workers=2, collate_fn=_keys_labels_shapes))
    # a threshold above the bad fraction: the pass completes
    stream = build_stream(
        faulty_videos.folder, clip_len=2, max_failure_fraction=0.95, min_samples_for_check=10
    )
    assert len(list(stream)) == len(faulty_videos.good) + 1

    # the default threshold (10% once 100 samples were seen) on a large stream: 5% bad completes, 15% stops
    clip = encode_video(4, 32, 32)
    for bad_every, completes in ((20, True), (7, False)):
        folder = tmp_path / f"every{bad_every}"
        samples = [
            (f"s{i:03d}", "mp4", b"\x00\x01junk" if i % bad_every == 3 else clip, {"label": 0})
            for i in range(160)
        ]
        write_shards(samples, folder, num_shards=2)
        stream = build_stream(folder, clip_len=2, shuffle_buffer=0)
        if completes:
            assert len(list(stream)) == 160 - len(range(3, 160, bad_every))
            assert stream.stats.failed == Counter({"decode_error": len(range(3, 160, bad_every))})
        else:
            with pytest.raises(DataQualityError, match=r"failed to load \(> 10%\)"):
                list(stream)


def test_label_range_can_be_given_and_is_validated(faulty_videos: Faulty):
    stream = build_stream(
        faulty_videos.folder, clip_len=2, shuffle_buffer=0, num_labels=3, min_samples_for_check=999
    )
    keys, labels = _keys_and_labels(stream)
    assert all(0 <= v < 3 or v == IGNORE_LABEL for v in labels.values())
    dropped = {k for k, v in faulty_videos.good.items() if v >= 3}
    assert dropped and set(keys) == set(faulty_videos.good) - dropped | {"no_label"}
    for value in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="num_labels must be a positive int"):
            build_stream(faulty_videos.folder, num_labels=value)
    with pytest.raises(ValueError, match="min_samples_for_check must be >= 1"):
        build_stream(faulty_videos.folder, min_samples_for_check=0)


def test_resume_after_damage_is_exact(faulty_videos: Faulty):
    """Error samples take part in the exact-resume bookkeeping like any other sample."""
    kwargs = dict(
        clip_len=2, frame_interval=2, shuffle_buffer=3, seed=9, repeat=True, min_samples_for_check=999
    )
    reference = iter(build_stream(faulty_videos.folder, **kwargs))
    expected = [next(reference)["__key__"] for _ in range(40)]  # crosses into the second epoch
    for stop in (7, 19, 26):
        stream = build_stream(faulty_videos.folder, **kwargs)
        it = iter(stream)
        head = [next(it)["__key__"] for _ in range(stop)]
        state = json.loads(json.dumps(stream.state_dict()))
        resumed = build_stream(faulty_videos.folder, **kwargs)
        resumed.load_state_dict(state)
        it = iter(resumed)
        assert head + [next(it)["__key__"] for _ in range(40 - stop)] == expected, stop
        assert resumed.stats.num_failed >= stream.stats.num_failed  # counts carried over, never re-counted


# ------------------------------------------------------------------------------------------------- tar reader


def _tar(samples: int = 4, size: int = 2000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(samples):
            _add(tar, f"k{i}.mp4", bytes([65 + i]) * size)
            _add(tar, f"k{i}.json", _meta(i))
    return buf.getvalue()


def _read(tmp_path: Path, data: bytes) -> list[tuple[str, list[str], bool]]:
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    return [(s.key, sorted(s.members), s.error is not None) for s in iter_tar_samples(path)]


SAMPLE_BYTES = 512 + 2048 + 512 + 512  # header + mp4 data (padded), header + json data (padded)


def test_tar_reader_survives_every_kind_of_damage(tmp_path: Path):
    data = _tar()
    complete = [(f"k{i}", ["json", "mp4"], False) for i in range(4)]
    assert _read(tmp_path, data) == complete
    # cut inside k1's mp4 data / inside its json / inside k1's first header / exactly between samples
    assert _read(tmp_path, data[: SAMPLE_BYTES + 1500]) == [complete[0], ("k1", [], True)]
    assert _read(tmp_path, data[: 2 * SAMPLE_BYTES - 512 + 4]) == [complete[0], ("k1", [], True)]
    padding_cut = _read(tmp_path, data[: 2 * SAMPLE_BYTES - 100])  # only k1.json's zero padding is cut
    assert padding_cut[:2] == complete[:2] and padding_cut[2][2] and len(padding_cut) == 3
    cut_header = _read(tmp_path, data[: SAMPLE_BYTES + 100])
    assert cut_header[0] == complete[0] and cut_header[1][2] and len(cut_header) == 2
    assert _read(tmp_path, data[: 2 * SAMPLE_BYTES]) == complete[:2]
    # garbage in place of k1's mp4 header, or inserted between samples: reported, then reading goes on
    corrupt = bytearray(data)
    corrupt[SAMPLE_BYTES : SAMPLE_BYTES + 100] = b"\x07" * 100
    after = _read(tmp_path, bytes(corrupt))
    assert after[0] == complete[0] and after[1][2] and after[2] == ("k1", ["json"], False)
    assert after[3:] == complete[2:]
    noise = np.random.default_rng(0).bytes(5000)
    inserted = data[:SAMPLE_BYTES] + noise[:1024] + data[SAMPLE_BYTES:]
    got = _read(tmp_path, inserted)
    assert got[0] == complete[0] and got[1][2] and got[2:] == complete[1:]
    # trailing garbage after the last sample; not a tar at all; an empty file
    tail = _read(tmp_path, data[: 2 * SAMPLE_BYTES] + b"\x01" * 700)
    assert tail[:2] == complete[:2] and tail[2][2] and len(tail) == 3
    assert [s[2] for s in _read(tmp_path, noise)] == [True]
    assert [s[2] for s in _read(tmp_path, b"")] == [True]
    missing = list(iter_tar_samples(tmp_path / "missing.tar"))
    assert len(missing) == 1 and "cannot open the shard" in missing[0].error
