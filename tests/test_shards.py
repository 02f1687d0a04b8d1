"""Shard writing (bevt.data.shards) and the make_shards CLI (bevt.data.make_shards).

Also holds the small media helpers (`encode_video`, `encode_jpeg`) that the streaming / collator tests import.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from bevt.data.make_shards import main, parse_annotations, reencode_video, scan_folder
from bevt.data.shards import (
    ShardWriter,
    check_key,
    iter_shard,
    list_shards,
    load_dataset_info,
    make_key,
    read_labels,
    write_shards,
)

# ------------------------------------------------------------------------------------------ media helpers


def encode_video(
    num_frames: int = 16,
    width: int = 64,
    height: int = 48,
    seed: int = 0,
    codec: str = "libx264",
    fmt: str = "mp4",
) -> bytes:
    """A small synthetic clip whose frame ``i`` is recognisable (its mean brightness grows with ``i``)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = base + np.uint8(min(8 * i, 190))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def encode_jpeg(width: int = 80, height: int = 60, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _keyframes(data: bytes) -> tuple[list[int], int, int]:
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        flags = [p.is_keyframe for p in c.demux(s) if p.size > 0]
        return [i for i, k in enumerate(flags) if k], s.width, s.height


# ------------------------------------------------------------------------------------------ writer


def test_key_rules():
    assert make_key(12, "abseiling/x.y.mp4") == "00000012_abseiling_x_y"
    assert make_key(3) == "00000003"
    assert check_key("a-B_9") == "a-B_9"
    for bad in ("a.b", "a/b", "", "x" * 129, "é"):
        with pytest.raises(ValueError, match="invalid sample key"):
            check_key(bad)


def test_write_shards_round_trip(tmp_path: Path):
    videos = [encode_video(8, seed=i) for i in range(5)]
    samples = [
        (
            f"clip_{i}",
            "mp4",
            videos[i],
            {"label": i % 2, "label_name": ["a", "b"][i % 2], "path": f"d/{i}.mp4", "fps": 25},
        )
        for i in range(5)
    ]
    samples.append(("img_0", "JPG", encode_jpeg(), {"label": None, "path": "i/0.jpg"}))
    paths = write_shards(samples, tmp_path, max_samples_per_shard=2, prefix="train", labels=["a", "b"])
    assert [Path(p).name for p in paths] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    read = [item for p in paths for item in iter_shard(p)]
    assert [r[0] for r in read] == [s[0] for s in samples]
    assert [r[1] for r in read] == ["mp4"] * 5 + ["jpg"]
    assert all(r[2] == s[2] for r, s in zip(read, samples))
    assert read[1][3] == {"label": 1, "label_name": "b", "path": "d/1.mp4", "fps": 25}
    assert read[5][3] == {"label": None, "label_name": None, "path": "i/0.jpg"}
    info = load_dataset_info(tmp_path)
    assert info["num_samples"] == 6 and info["num_shards"] == 3 and info["kind"] is None  # mixed kinds
    assert [s["num_samples"] for s in info["shards"]] == [2, 2, 2]
    assert info["label_counts"] == {"0": 3, "1": 2}
    assert read_labels(tmp_path) == ["a", "b"]
    # tar members: KEY.ext then KEY.json, nothing else
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames() == ["clip_0.mp4", "clip_0.json", "clip_1.mp4", "clip_1.json"]


def test_shard_size_cap_and_equal_split(tmp_path: Path):
    blob = bytes(300_000)
    samples = [(f"k{i}", "mp4", blob, {"label": i}) for i in range(7)]
    paths = write_shards(samples, tmp_path / "cap", shard_size_mb=1.0)  # 3 x 0.3 MB fit in 1 MiB
    counts = [s["num_samples"] for s in load_dataset_info(tmp_path / "cap")["shards"]]
    assert counts == [3, 3, 1] and len(paths) == 3
    write_shards(samples, tmp_path / "eq", num_shards=3)
    counts = [s["num_samples"] for s in load_dataset_info(tmp_path / "eq")["shards"]]
    assert counts == [3, 2, 2]
    with pytest.raises(ValueError, match="num_shards"):
        write_shards(samples, tmp_path / "bad", num_shards=8)


def test_shards_are_deterministic(tmp_path: Path):
    samples = [(f"k{i}", "mp4", bytes([i]) * 100, {"label": i}) for i in range(3)]
    a = write_shards(samples, tmp_path / "a")
    b = write_shards(samples, tmp_path / "b")
    assert Path(a[0]).read_bytes() == Path(b[0]).read_bytes()


def test_writer_rejects_bad_input(tmp_path: Path):
    with ShardWriter(tmp_path) as writer:
        writer.write("ok", "mp4", b"x", {"label": 1})
        with pytest.raises(ValueError, match="duplicate sample key"):
            writer.write("ok", "mp4", b"x")
        with pytest.raises(ValueError, match="no dots"):
            writer.write("a.b", "mp4", b"x")
        with pytest.raises(ValueError, match="unsupported media extension"):
            writer.write("k2", "gif", b"x")
        with pytest.raises(ValueError, match="'label' must be an int"):
            writer.write("k3", "mp4", b"x", {"label": "3"})
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            writer.write("k4", "mp4", b"x", {"label": 1, "when": object()})
    assert writer.num_samples == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_leaves_no_partial_shard_on_error(tmp_path: Path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path) as writer:
        writer.write("a", "mp4", b"x")
        raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())


def test_list_shards(tmp_path: Path):
    paths = write_shards([(f"k{i}", "mp4", b"x", None) for i in range(4)], tmp_path, max_samples_per_shard=1)
    assert list_shards(tmp_path) == paths
    assert list_shards(str(tmp_path / "shard-0000[12].tar")) == paths[1:3]
    assert list_shards([paths[3], paths[0]]) == [paths[3], paths[0]]
    with pytest.raises(FileNotFoundError, match="no shard files match"):
        list_shards(str(tmp_path / "nope-*.tar"))
    with pytest.raises(FileNotFoundError, match="shard file not found"):
        list_shards(tmp_path / "missing.tar")
    with pytest.raises(ValueError, match="not a .tar"):
        list_shards(tmp_path / "dataset_info.json")


# ------------------------------------------------------------------------------------------ make_shards


@pytest.fixture()
def video_root(tmp_path: Path) -> Path:
    root = tmp_path / "videos"
    for cls in ("jump", "run"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"v.{i}.mp4").write_bytes(encode_video(10, seed=i + 10 * (cls == "run")))
    (root / "run" / "empty.mp4").write_bytes(b"")
    (root / "run" / "broken.mp4").write_bytes(encode_video(10)[:400])
    return root


def test_make_shards_from_list(video_root: Path, tmp_path: Path):
    listing = tmp_path / "train.txt"
    lines = [f"jump/v.{i}.mp4 0" for i in range(3)] + [f"run/v.{i}.mp4 1" for i in range(3)]
    lines += ["run/empty.mp4 1", "run/missing.mp4 1", "run/broken.mp4 1", "# comment", ""]
    listing.write_text("\n".join(lines))
    labels = tmp_path / "labels.txt"
    labels.write_text("jump\nrun\n")
    out = tmp_path / "shards"
    rc = main(
        [
            "--input",
            str(listing),
            "--root",
            str(video_root),
            "--output-dir",
            str(out),
            "--labels",
            str(labels),
            "--verify",
            "--num-workers",
            "1",
            "--max-samples-per-shard",
            "4",
        ]
    )
    assert rc == 0
    info = load_dataset_info(out)
    assert info["kind"] == "video" and info["num_samples"] == 6 and info["num_shards"] == 2
    assert info["skipped"] == {"empty": 1, "missing": 1, "undecodable": 1}
    assert {e["path"] for e in info["skipped_examples"]} == {
        "run/empty.mp4",
        "run/missing.mp4",
        "run/broken.mp4",
    }
    assert info["labels"] == ["jump", "run"] and info["label_counts"] == {"0": 3, "1": 3}
    read = [item for p in list_shards(out) for item in iter_shard(p)]
    by_path = {meta["path"]: (key, meta) for key, _, _, meta in read}
    assert set(by_path) == {f"{c}/v.{i}.mp4" for c in ("jump", "run") for i in range(3)}
    key, meta = by_path["run/v.2.mp4"]
    assert "." not in key and meta["label"] == 1 and meta["label_name"] == "run" and meta["num_frames"] == 10
    for _key, _, data, meta in read:  # bytes stored unchanged
        assert data == (video_root / meta["path"]).read_bytes()
    # shuffled (seeded): not in list order, and the same order again with the same seed
    assert [m["path"] for *_, m in read] != sorted(m["path"] for *_, m in read)
    out2 = tmp_path / "shards2"
    main(
        [
            "--input",
            str(listing),
            "--root",
            str(video_root),
            "--output-dir",
            str(out2),
            "--labels",
            str(labels),
            "--verify",
            "--num-workers",
            "1",
            "--max-samples-per-shard",
            "4",
        ]
    )
    assert [Path(p).read_bytes() for p in list_shards(out)] == [
        Path(p).read_bytes() for p in list_shards(out2)
    ]


def test_make_shards_csv_names_and_folder(tmp_path: Path):
    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            (root / cls / f"{i}.JPEG").write_bytes(encode_jpeg(seed=i))
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label,split\ndog/0.JPEG,dog,a\ncat/1.JPEG,cat,b\n")
    entries, names = parse_annotations(csv_path)
    assert names == ["cat", "dog"]
    assert [(e.path, e.label, e.label_name, e.extra) for e in entries] == [
        ("dog/0.JPEG", 1, "dog", {"split": "a"}),
        ("cat/1.JPEG", 0, "cat", {"split": "b"}),
    ]
    entries, names = scan_folder(root)
    assert names == ["cat", "dog"] and len(entries) == 4
    out = tmp_path / "out"
    assert main(["--root", str(root), "--output-dir", str(out), "--no-shuffle"]) == 0
    info = load_dataset_info(out)
    assert info["kind"] == "image" and info["num_samples"] == 4 and info["label_counts"] == {"0": 2, "1": 2}
    read = list(iter_shard(list_shards(out)[0]))
    assert [(ext, m["path"], m["label"]) for _, ext, _, m in read] == [
        ("jpeg", "cat/0.JPEG", 0),
        ("jpeg", "cat/1.JPEG", 0),
        ("jpeg", "dog/0.JPEG", 1),
        ("jpeg", "dog/1.JPEG", 1),
    ]


def test_parse_annotations_errors(tmp_path: Path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a.mp4 1\nb c.mp4 2\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected 'relative/path label'"):
        parse_annotations(bad)
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a.mp4 1\nb.mp4 run\n")
    with pytest.raises(ValueError, match="mixes integer labels and class names"):
        parse_annotations(mixed)
    ranged = tmp_path / "range.txt"
    ranged.write_text("a.mp4 5\n")
    with pytest.raises(ValueError, match="outside"):
        parse_annotations(ranged, labels=["x", "y"])
    nocol = tmp_path / "x.csv"
    nocol.write_text("name_of_file,label\na.mp4,1\n")
    with pytest.raises(ValueError, match="path column"):
        parse_annotations(nocol)


def test_make_shards_all_inputs_bad(tmp_path: Path, capsys):
    """Every input skipped: one `error:` line naming the reasons, exit status 2 (it was a RuntimeError traceback)."""
    listing = tmp_path / "l.txt"
    listing.write_text("nope.mp4 0\n")
    assert main(["--input", str(listing), "--root", str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no sample could be written") and "'missing': 1" in err and "Traceback" not in err


def test_reencode_video_gop_and_size():
    data = encode_video(40, width=96, height=64)
    out, count = reencode_video(data, short_side=40, gop=8, threads=1)
    assert count == 40
    keyframes, width, height = _keyframes(out)
    assert (width, height) == (60, 40)
    assert keyframes == [0, 8, 16, 24, 32]
    from bevt.video_decoding import VideoReader

    with VideoReader(out) as reader:
        assert reader.num_frames == 40
        frames = reader.get_batch([0, 39])
    assert frames.shape == (2, 40, 60, 3)
    assert frames[1].float().mean() > frames[0].float().mean() + 100  # frame order kept (brightness ramp)
    same, _ = reencode_video(data, short_side=256, gop=8, threads=1)  # never upscales
    assert _keyframes(same)[1:] == (96, 64)
    with pytest.raises(Exception):  # noqa: B017 - PyAV raises its own error types for garbage input
        reencode_video(b"not a video at all")


def test_make_shards_reencode_real_video(shared_data: Path, tmp_path: Path):
    root = shared_data / "videos"
    listing = tmp_path / "l.txt"
    listing.write_text("short_32f.mp4 0\nclip_164f_320x240.avi 1\n")
    out = tmp_path / "re"
    rc = main(
        [
            "--input",
            str(listing),
            "--root",
            str(root),
            "--output-dir",
            str(out),
            "--reencode",
            "--short-side",
            "128",
            "--gop",
            "8",
            "--num-workers",
            "1",
        ]
    )
    assert rc == 0
    info = load_dataset_info(out)
    assert info["reencode"]["gop"] == 8 and info["num_samples"] == 2
    read = {m["path"]: (ext, data, m) for _, ext, data, m in iter_shard(list_shards(out)[0])}
    ext, data, meta = read["clip_164f_320x240.avi"]
    assert ext == "mp4" and meta["num_frames"] == 164
    keyframes, width, height = _keyframes(data)
    assert (width, height) == (170, 128) and keyframes[:3] == [0, 8, 16]
    assert read["short_32f.mp4"][2]["num_frames"] == 32
    assert json.loads((out / "dataset_info.json").read_text())["skipped"] == {}
