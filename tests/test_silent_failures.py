"""No silent wrong results (issue 17, library and data / convert CLIs): each test is one way the package used to give
a wrong result, or a confusing crash, without a clear error. The training scripts' items live in their own tests.
"""

from __future__ import annotations

import io
import logging
import socket
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_shards import encode_jpeg, encode_video

import bevt
from bevt import BEVTConfig, BEVTForVideoClassification, BEVTVideoProcessor, BEVTVisualTokenizer
from bevt.configuration_tokenizer import BEVTVisualTokenizerConfig
from bevt.data.make_shards import main as make_shards_main
from bevt.data.shards import (
    LabelMismatchError,
    check_label_consistency,
    iter_shard,
    list_shards,
    load_dataset_info,
    write_shards,
)
from bevt.data.streaming import StreamDataLoader, build_stream
from bevt.video_decoding import VideoDecodingError

BEVT_SOURCE = str(Path(bevt.__file__).parent)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def raised_by_bevt(error: type[Exception], match: str, call) -> Exception:
    """`call()` raises `error` matching `match` from bevt's own code (not deep inside torch / PIL / httpx)."""
    with pytest.raises(error, match=match) as info:
        call()
    last = traceback.extract_tb(info.tb)[-1]
    assert last.filename.startswith(BEVT_SOURCE), f"raised from {last.filename}:{last.lineno}, not by bevt"
    return info.value


def small_processor(**kwargs) -> BEVTVideoProcessor:
    return BEVTVideoProcessor(
        num_frames=4,
        frame_interval=1,
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        **kwargs,
    )


@pytest.fixture()
def fresh_warnings():
    """Transformers' `logger.warning_once` caches by message: forget earlier warnings so this test sees its own."""
    logging.Logger.warning_once.cache_clear()
    yield
    logging.Logger.warning_once.cache_clear()


# ------------------------------------------------------------------------------------------------ item 6: rescale


def test_float_frames_already_in_0_1_warn_and_do_rescale_false_gives_the_right_result(caplog, fresh_warnings):
    frames = torch.randint(0, 256, (4, 40, 48, 3), dtype=torch.uint8)
    processor = small_processor()
    from_uint8 = processor(frames, return_tensors="pt")["pixel_values"]
    with caplog.at_level(logging.WARNING):  # float frames in 0..255 are rescaled, no warning
        expected = processor(frames.float(), return_tensors="pt")["pixel_values"]
    assert "rescale" not in caplog.text
    torch.testing.assert_close(
        expected, from_uint8, atol=0.02, rtol=0
    )  # uint8 resizing rounds: 1 level / std
    assert float(expected.min()) < -1.5 and float(expected.max()) > 1.5

    with caplog.at_level(logging.WARNING):
        twice = processor(frames.float() / 255, return_tensors="pt")["pixel_values"]
    assert "already rescaled" in caplog.text and "do_rescale=False" in caplog.text, caplog.text
    # Transformers' rule: do_rescale=True rescales whatever it is given (divided by 255 again), after the warning
    assert float(twice.max()) < -1.7

    once = processor(frames.float() / 255, do_rescale=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(once, expected, atol=1e-5, rtol=0)


def test_uint8_frames_with_do_rescale_false_warn(caplog, fresh_warnings):
    frames = torch.randint(0, 256, (4, 40, 48, 3), dtype=torch.uint8)
    with caplog.at_level(logging.WARNING):
        small_processor(do_rescale=False)(frames, return_tensors="pt")
    assert "uint8" in caplog.text and "do_rescale=False" in caplog.text, caplog.text


# ------------------------------------------------------------------------------------------------ item 7: views


def _tiny_classifier(num_labels: int = 5) -> BEVTForVideoClassification:
    torch.manual_seed(0)
    return BEVTForVideoClassification(BEVTConfig.from_preset("test", num_labels=num_labels)).eval()


def test_model_averages_the_views_it_is_told_about():
    model = _tiny_classifier()
    pixel_values = torch.randn(6, 4, 3, 32, 32)  # 2 videos x 3 views
    with torch.no_grad():
        per_view = model(pixel_values).logits
        out = model(pixel_values, labels=torch.tensor([1, 4]), num_views=torch.tensor([3, 3]))
        one_view = model(pixel_values[:2], num_views=1).logits  # one view per video: the raw logits
    torch.testing.assert_close(one_view, per_view[:2], atol=1e-5, rtol=1e-5)
    expected = per_view.softmax(-1).view(2, 3, -1).mean(1)
    assert out.logits.shape == (2, 5)
    torch.testing.assert_close(
        out.logits.softmax(-1), expected
    )  # softmax of the output = the averaged scores
    torch.testing.assert_close(out.logits.softmax(-1), BEVTVideoProcessor.aggregate_views(per_view, 3))
    torch.testing.assert_close(out.loss, -expected[[0, 1], [1, 4]].log().mean())
    # checked before the forward pass
    raised_by_bevt(
        ValueError, "6 views cannot be split into videos of 4 views", lambda: model(pixel_values, num_views=4)
    )
    raised_by_bevt(ValueError, "`num_views` must be .*positive", lambda: model(pixel_values, num_views=0))
    raised_by_bevt(
        ValueError, "one `num_views` per video", lambda: model(pixel_values, num_views=torch.tensor([2, 4]))
    )
    raised_by_bevt(
        ValueError,
        "6 views cannot be split .* for 3 videos",
        lambda: model(pixel_values, num_views=torch.tensor([3] * 3)),
    )


def test_multi_view_processor_output_tells_the_model_its_views(shared_data: Path):
    video = str(shared_data / "videos" / "short_32f.mp4")
    single = small_processor()(video, return_tensors="pt")
    assert set(single) == {"pixel_values"}  # one view: what every video model takes
    multi = small_processor(num_clips=2, num_crops=3)([video, video], return_tensors="pt")
    assert multi["pixel_values"].shape[0] == 12 and multi["num_views"].tolist() == [6, 6]
    model = _tiny_classifier()
    with torch.no_grad():
        scores = model(**multi).logits.softmax(-1)
        per_view = model(pixel_values=multi["pixel_values"]).logits
    assert scores.shape == (2, 5)
    torch.testing.assert_close(scores, BEVTVideoProcessor.aggregate_views(per_view, 6))


def test_aggregate_views_rejects_a_bad_view_count():
    raised_by_bevt(
        ValueError,
        "num_views must be a positive integer, got 0",
        lambda: BEVTVideoProcessor.aggregate_views(torch.randn(4, 3), 0),
    )


# ------------------------------------------------------------------------------------------------ item 9: tokenizer range


def test_codebook_indices_refuse_pixels_outside_0_1():
    tokenizer = BEVTVisualTokenizer(
        BEVTVisualTokenizerConfig(dalle_hidden_size=16, dalle_num_blocks_per_group=1, vocab_size=64)
    )
    images = torch.rand(2, 3, 16, 16)
    assert tokenizer.get_codebook_indices(images).shape == (2, 2, 2)
    normalised = (images - MEAN) / STD
    raised_by_bevt(
        ValueError,
        r"pixels in \[0, 1\].*got values in \[-2\.",
        lambda: tokenizer.get_codebook_indices(normalised),
    )
    raised_by_bevt(
        ValueError, r"pixels in \[0, 1\].*divide by 255", lambda: tokenizer.get_codebook_indices(images * 255)
    )
    videos = torch.rand(1, 2, 3, 16, 16)
    videos[0, 1, 0, 0, 0] = 1.5
    raised_by_bevt(ValueError, r"pixels in \[0, 1\].*1\.5", lambda: tokenizer.get_codebook_indices(videos))


# ------------------------------------------------------------------------------------------------ make_shards helpers


def _image_tree(root: Path, classes: dict[str, int]) -> Path:
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / cls / f"{i}.jpg").write_bytes(encode_jpeg(32, 24, seed=i + 10 * len(cls)))
    return root


def _run_make_shards(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = make_shards_main(argv)
    except SystemExit as exit_info:  # argparse usage errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def _sample_meta(folder: Path) -> list[dict]:
    return [meta for path in list_shards(folder) for *_, meta in iter_shard(path)]


# ------------------------------------------------------------------------------------------------ item 3: label ids


def test_inferred_class_numbering_warns_and_the_check_catches_train_val_disagreement(
    tmp_path, caplog, capsys
):
    root = _image_tree(tmp_path / "media", {"alpha": 1, "beta": 1, "gamma": 1})
    (tmp_path / "train.txt").write_text("alpha/0.jpg alpha\nbeta/0.jpg beta\ngamma/0.jpg gamma\n")
    (tmp_path / "val.txt").write_text("alpha/0.jpg alpha\ngamma/0.jpg gamma\n")
    for split in ("train", "val"):
        with caplog.at_level(logging.WARNING, logger="bevt.data.make_shards"):
            code, _ = _run_make_shards(
                [
                    "--input",
                    str(tmp_path / f"{split}.txt"),
                    "--root",
                    str(root),
                    "--output-dir",
                    str(tmp_path / split),
                ],
                capsys,
            )
        assert code == 0
        assert "no --labels" in caplog.text and "numbered" in caplog.text, caplog.text
        caplog.clear()
    train, val = load_dataset_info(tmp_path / "train"), load_dataset_info(tmp_path / "val")
    assert train["labels"] == ["alpha", "beta", "gamma"] and val["labels"] == ["alpha", "gamma"]
    assert train["labels_origin"].startswith("inferred") and val["labels_origin"].startswith("inferred")
    assert (tmp_path / "val" / "labels.txt").read_text() == "alpha\ngamma\n"  # the names it used

    error = raised_by_bevt(
        LabelMismatchError,
        "class 'gamma'",
        lambda: check_label_consistency(tmp_path / "train", tmp_path / "val"),
    )
    assert "2" in str(error) and "1" in str(error) and "--labels" in str(error)
    names = tmp_path / "names.txt"
    names.write_text("alpha\nbeta\ngamma\n")
    raised_by_bevt(
        LabelMismatchError,
        r"class 'gamma' is label 1 in .*val.* but label 2 in .*names\.txt",
        lambda: check_label_consistency(tmp_path / "val", label_names=names),
    )

    # one label file for every split: the ids agree, and the check says so
    for split in ("train", "val"):
        code, _ = _run_make_shards(
            [
                "--input",
                str(tmp_path / f"{split}.txt"),
                "--root",
                str(root),
                "--output-dir",
                str(tmp_path / f"{split}2"),
                "--labels",
                str(names),
            ],
            capsys,
        )
        assert code == 0
    assert load_dataset_info(tmp_path / "val2")["labels_origin"] == f"--labels {names}"
    assert check_label_consistency(tmp_path / "train2", tmp_path / "val2", label_names=names) == {
        0: "alpha",
        1: "beta",
        2: "gamma",
    }
    assert check_label_consistency(tmp_path / "val2") == {0: "alpha", 1: "beta", 2: "gamma"}


def test_label_check_reads_the_samples_too(tmp_path):
    """A shard whose samples disagree with its folder's names (e.g. a stale shard left in the folder) is found."""
    write_shards(
        [("a", "jpg", encode_jpeg(), {"label": 0, "label_name": "cat"})],
        tmp_path / "s",
        labels=["cat", "dog"],
    )
    write_shards(
        [("b", "jpg", encode_jpeg(), {"label": 0, "label_name": "dog"})],
        tmp_path / "s",
        prefix="old",
        write_info=False,
    )
    raised_by_bevt(
        LabelMismatchError,
        r"class 'dog' is label 0 in sample 'b' of .*old-00000\.tar but label 1 in .*dataset_info\.json",
        lambda: check_label_consistency(tmp_path / "s"),
    )
    assert check_label_consistency(tmp_path / "s", scan_samples=False) == {0: "cat", 1: "dog"}
    raised_by_bevt(
        LabelMismatchError,
        r"class 'cat' of .*dataset_info\.json is not among the 2 label names \(the label names\)",
        lambda: check_label_consistency(tmp_path / "s", label_names=["dog", "bird"], scan_samples=False),
    )


# ------------------------------------------------------------------------------------------------ item 4: stale shards


def test_make_shards_refuses_a_folder_with_shards_unless_overwrite(tmp_path, capsys, caplog):
    root = _image_tree(tmp_path / "media", {"cat": 3})
    out = tmp_path / "out"
    base = ["--root", str(root), "--output-dir", str(out), "--prefix", "train"]
    assert _run_make_shards([*base, "--max-samples-per-shard", "1"], capsys)[0] == 0
    assert len(list_shards(out)) == 3
    (out / "notes.md").write_text("mine")

    code, err = _run_make_shards([*base, "--num-shards", "1"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "is not empty" in err and "3 shards" in err and "--overwrite" in err
    assert len(list_shards(out)) == 3  # untouched

    with caplog.at_level(logging.WARNING, logger="bevt.data.make_shards"):
        assert _run_make_shards([*base, "--num-shards", "1", "--overwrite"], capsys)[0] == 0
    assert (
        "--overwrite: removing 3 shards (train-00000.tar .. train-00002.tar), dataset_info.json"
        in caplog.text
    )
    assert [Path(p).name for p in list_shards(out)] == ["train-00000.tar"] and len(_sample_meta(out)) == 3
    assert (out / "notes.md").read_text() == "mine"  # not ours: kept

    (out / "val-00000.tar").write_bytes(
        (out / "train-00000.tar").read_bytes()
    )  # another set in the same folder
    code, err = _run_make_shards([*base, "--overwrite"], capsys)
    assert code == 2 and "val-00000.tar" in err and "would be mixed" in err, err


# ------------------------------------------------------------------------------------------------ item 5: mixed trees


def test_kind_auto_refuses_a_mixed_tree_with_counts(tmp_path, capsys):
    root = _image_tree(tmp_path / "media", {"cat": 4})
    (root / "cat" / "stray.mp4").write_bytes(encode_video(4))
    out = tmp_path / "out"
    code, err = _run_make_shards(["--root", str(root), "--output-dir", str(out)], capsys)
    assert code == 2 and err.startswith("error: ") and "4 images (jpg) and 1 video (mp4)" in err, err
    assert "--kind image" in err and not out.exists()
    assert (
        _run_make_shards(["--root", str(root), "--output-dir", str(out), "--kind", "image"], capsys)[0] == 0
    )
    info = load_dataset_info(out)
    assert info["kind"] == "image" and info["num_samples"] == 4 and info["skipped"] == {"wrong_kind": 1}


# ------------------------------------------------------------------------------------------------ item 10


def test_num_shards_gives_equal_counts_after_skipped_files(tmp_path, capsys):
    root = _image_tree(tmp_path / "media", {"cat": 6})
    (root / "cat" / "5.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # found only when decoded (--verify)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"cat/{i}.jpg\n" for i in range(6)) + "cat/missing.jpg\n")  # 7 inputs, 2 bad
    out = tmp_path / "out"
    code, _ = _run_make_shards(
        [
            "--input",
            str(listing),
            "--root",
            str(root),
            "--output-dir",
            str(out),
            "--num-shards",
            "2",
            "--verify",
            "--num-workers",
            "1",
            "--no-shuffle",
        ],
        capsys,
    )
    assert code == 0
    info = load_dataset_info(out)
    assert [s["num_samples"] for s in info["shards"]] == [3, 2] and info["num_samples"] == 5
    assert info["skipped"] == {"missing": 1, "undecodable": 1}
    assert [m["path"] for m in _sample_meta(out)] == [f"cat/{i}.jpg" for i in range(5)]  # order kept
    assert [len(list(iter_shard(p))) for p in list_shards(out)] == [3, 2]


def test_csv_label_column_with_another_name(tmp_path, capsys, caplog):
    root = _image_tree(tmp_path / "media", {"cat": 1, "dog": 1})
    listing = tmp_path / "list.csv"
    listing.write_text("path,category\ncat/0.jpg,cat\ndog/0.jpg,dog\n")
    base = ["--input", str(listing), "--root", str(root)]
    with caplog.at_level(logging.WARNING, logger="bevt.data.make_shards"):
        assert _run_make_shards([*base, "--output-dir", str(tmp_path / "a")], capsys)[0] == 0
    assert (
        "no label column" in caplog.text and "'category'" in caplog.text and "--label-column" in caplog.text
    )
    assert all(m["label"] is None for m in _sample_meta(tmp_path / "a"))

    assert (
        _run_make_shards([*base, "--output-dir", str(tmp_path / "b"), "--label-column", "category"], capsys)[
            0
        ]
        == 0
    )
    assert sorted((m["label"], m["label_name"]) for m in _sample_meta(tmp_path / "b")) == [
        (0, "cat"),
        (1, "dog"),
    ]

    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    code, err = _run_make_shards([*base, "--output-dir", str(tmp_path / "c"), "--labels", str(names)], capsys)
    assert code == 2 and "no label column" in err and "'category'" in err, err
    code, err = _run_make_shards(
        [*base, "--output-dir", str(tmp_path / "d"), "--label-column", "kind"], capsys
    )
    assert code == 2 and "--label-column 'kind'" in err and "'category'" in err, err


def test_duplicate_list_entries_are_written_once(tmp_path, capsys, caplog):
    root = _image_tree(tmp_path / "media", {"cat": 2})
    listing = tmp_path / "list.txt"
    listing.write_text("cat/0.jpg 0\ncat/1.jpg 0\ncat/0.jpg 0\n./cat/0.jpg 0\n")
    with caplog.at_level(logging.WARNING, logger="bevt.data.make_shards"):
        code, _ = _run_make_shards(
            ["--input", str(listing), "--root", str(root), "--output-dir", str(tmp_path / "o")], capsys
        )
    assert code == 0 and "cat/0.jpg" in caplog.text and "duplicate" in caplog.text
    info = load_dataset_info(tmp_path / "o")
    assert info["num_samples"] == 2 and info["skipped"] == {"duplicate": 2}
    assert sorted(m["path"] for m in _sample_meta(tmp_path / "o")) == ["cat/0.jpg", "cat/1.jpg"]

    listing.write_text("cat/0.jpg 0\ncat/1.jpg 0\ncat/0.jpg 1\n")
    code, err = _run_make_shards(
        ["--input", str(listing), "--root", str(root), "--output-dir", str(tmp_path / "p")], capsys
    )
    assert code == 2 and "cat/0.jpg" in err and "lines 1 and 3" in err and "label" in err, err


# ------------------------------------------------------------------------------------------------ CLI errors


def test_make_shards_unwritable_output_dir_is_one_error_line(tmp_path, capsys):
    root = _image_tree(tmp_path / "media", {"cat": 1})
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = _run_make_shards(["--root", str(root), "--output-dir", str(blocker / "out")], capsys)
    assert code == 2 and "--output-dir" in err and str(blocker) in err, err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(("error:", "usage:", "python -m bevt.data.make_shards: error:"))
    )


def test_make_shards_kind_image_on_videos_is_one_error_line(tmp_path, capsys):
    root = tmp_path / "media" / "run"
    root.mkdir(parents=True)
    for i in range(2):
        (root / f"{i}.mp4").write_bytes(encode_video(4, seed=i))
    code, err = _run_make_shards(
        ["--root", str(tmp_path / "media"), "--output-dir", str(tmp_path / "o"), "--kind", "image"], capsys
    )
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "--kind image" in err and "none of the 2 inputs is an image" in err and "2 videos (mp4)" in err


def test_float_hard_labels_of_shape_b_are_a_clear_error():
    model = _tiny_classifier(num_labels=4)
    pixel_values = torch.randn(4, 4, 3, 32, 32)  # batch == num_labels: the old code broadcast silently
    raised_by_bevt(
        ValueError,
        r"float `labels` of shape \(4,\).*class ids.*\.long\(\).*class distributions \(4, 4\)",
        lambda: model(pixel_values, labels=torch.tensor([0.0, 1.0, 2.0, 3.0])),
    )
    raised_by_bevt(
        ValueError,
        r"float `labels` of shape \(2,\)",
        lambda: model(pixel_values[:2], labels=torch.tensor([0.0, 1.0])),
    )


def test_half_precision_input_is_cast_to_the_model_dtype():
    model = _tiny_classifier()
    pixel_values = torch.randn(2, 4, 3, 32, 32).half()
    with torch.no_grad():
        out = model(pixel_values).logits
        expected = model(pixel_values.float()).logits
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_processor_takes_a_single_pil_image_and_a_file_object(shared_data: Path):
    processor = small_processor()
    image = Image.open(shared_data / "images" / "hand.jpg")
    as_list = processor([image], return_tensors="pt")["pixel_values"]
    assert torch.equal(processor(image, return_tensors="pt")["pixel_values"], as_list)
    assert as_list.shape == (1, 4, 3, 32, 32)
    path = shared_data / "videos" / "short_32f.mp4"
    expected = processor(str(path), return_tensors="pt")["pixel_values"]
    with open(path, "rb") as f:
        assert torch.equal(processor(f, return_tensors="pt")["pixel_values"], expected)
    assert torch.equal(
        processor(io.BytesIO(path.read_bytes()), return_tensors="pt")["pixel_values"], expected
    )


def test_processor_grayscale_video_without_channel_axis_is_a_clear_error():
    processor = small_processor()
    gray = np.zeros((5, 40, 30), np.uint8)
    raised_by_bevt(
        ValueError,
        r"video 0: a 3-D array of shape \(5, 40, 30\) is one frame.*grayscale video \(T, H, W\).*\[\.\.\., None\]",
        lambda: processor(gray, return_tensors="pt"),
    )
    out = processor(gray[..., None], return_tensors="pt")["pixel_values"]  # (T, H, W, 1): supported
    assert out.shape == (1, 4, 3, 32, 32)


def test_processor_offline_url_is_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/clip.mp4"
    raised_by_bevt(
        VideoDecodingError, f"video 0 of the batch: cannot download {url}", lambda: small_processor()(url)
    )


# ------------------------------------------------------------------------------------------------ streaming: log once


def _shards_with_one_bad_sample(folder: Path) -> Path:
    samples = [(f"ok{i}", "jpg", encode_jpeg(32, 24, seed=i), {"label": 0}) for i in range(3)]
    samples.append(("broken", "jpg", b"\xff\xd8 not a jpeg", {"label": 0}))
    write_shards(samples, folder, kind="image")
    return folder


def test_a_bad_sample_is_logged_once_and_counted_every_epoch(tmp_path, caplog):
    stream = build_stream(
        _shards_with_one_bad_sample(tmp_path / "s"), kind="image", repeat=True, shuffle_buffer=0
    )
    with caplog.at_level(logging.WARNING, logger="bevt.data.streaming"):
        iterator = iter(stream)
        samples = [next(iterator) for _ in range(9)]  # three epochs
        next(iterator)
    assert len(samples) == 9 and stream.stats.failed["decode_error"] == 3
    assert caplog.text.count("skipping sample 'broken'") == 1, caplog.text


def test_a_bad_sample_is_logged_once_across_passes_with_workers(tmp_path):
    stream = build_stream(_shards_with_one_bad_sample(tmp_path / "s"), kind="image", shuffle_buffer=0)
    loader = StreamDataLoader(
        stream, batch_size=1, num_workers=1, collate_fn=lambda s: [x["__key__"] for x in s]
    )
    log = tmp_path / "log.txt"
    handler = logging.FileHandler(log)  # worker processes write here too
    streaming_logger = logging.getLogger("bevt.data.streaming")
    streaming_logger.addHandler(handler)
    previous = streaming_logger.level
    streaming_logger.setLevel(logging.WARNING)
    try:
        for _ in range(2):
            assert sorted(k for batch in loader for k in batch) == ["ok0", "ok1", "ok2"]
    finally:
        streaming_logger.removeHandler(handler)
        streaming_logger.setLevel(previous)
        handler.close()
    assert loader.stats.failed["decode_error"] == 2
    assert log.read_text().count("skipping sample 'broken'") == 1, log.read_text()
