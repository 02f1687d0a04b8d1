"""Decoding (every available backend, paths and bytes, real clips) and frame sampling."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bevt.frame_sampling import sample_frame_indices
from bevt.video_decoding import (
    VideoDecodingError,
    VideoReader,
    available_backends,
    decode_image,
    decode_video,
    get_num_frames,
    resolve_backend,
)

# name -> (frames, height, width), from ../shared/data/README.md
VIDEOS = {
    "kinetics400_arm_wrestling.mp4": (280, 256, 340),
    "kinetics_clip_300f.mp4": (300, 256, 340),
    "clip_164f_320x240.avi": (164, 240, 320),
    "clip_300f_426x240.mp4": (300, 240, 426),
    "short_32f.mp4": (32, 256, 340),
}
BACKENDS = available_backends()


def _video(shared_data: Path, name: str) -> Path:
    return shared_data / "videos" / name


# --------------------------------------------------------------------------------------------- backends


def test_backends_available_and_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "pyav" in BACKENDS  # PyAV is a hard requirement of the video-classification pipeline
    assert BACKENDS == [b for b in ("decord", "torchcodec", "pyav") if b in BACKENDS]
    monkeypatch.delenv("BEVT_VIDEO_BACKEND", raising=False)
    assert resolve_backend() == BACKENDS[0]
    assert resolve_backend("av") == "pyav"
    monkeypatch.setenv("BEVT_VIDEO_BACKEND", "pyav")
    assert resolve_backend() == "pyav"
    assert resolve_backend("PyAV") == "pyav"
    with pytest.raises(ValueError, match="unknown video backend 'opencv'"):
        resolve_backend("opencv")


@pytest.mark.skipif("torchcodec" in BACKENDS, reason="torchcodec is usable here")
def test_missing_backend_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'torchcodec' is not installed"):
        VideoReader(b"whatever", backend="torchcodec")


# --------------------------------------------------------------------------------------------- real clips


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_real_clips_same_frames_on_every_backend_path_and_bytes(shared_data: Path, name: str) -> None:
    num_frames, height, width = VIDEOS[name]
    path = _video(shared_data, name)
    data = path.read_bytes()
    # unsorted, repeated, first and last frames, a 16x8 clip (looping on the short clip)
    clip = sample_frame_indices(num_frames, clip_len=16, frame_interval=8, test_mode=True)[0]
    indices = [num_frames - 1, 0, *clip, 3, 3, num_frames // 2]
    reference = None
    for backend in BACKENDS:
        for source in (path, str(path), data):
            with VideoReader(source, backend=backend) as reader:
                assert reader.num_frames == num_frames
                assert reader.backend == backend
                assert reader.fps is not None and 24 <= reader.fps <= 31
                frames = reader.get_batch(indices)
            assert frames.dtype == torch.uint8
            assert frames.shape == (len(indices), height, width, 3)
            if reference is None:
                reference = frames
            else:
                assert torch.equal(frames, reference), f"{backend} / {type(source).__name__} differs"
    # repeated indices give the same frame, different frames differ
    assert torch.equal(reference[-3], reference[-2])
    assert not torch.equal(reference[0], reference[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_all_frames_matches_sparse_decoding(shared_data: Path, backend: str) -> None:
    path = _video(shared_data, "short_32f.mp4")
    everything = decode_video(path, backend=backend)
    assert everything.shape == (32, 256, 340, 3)
    some = decode_video(path.read_bytes(), [31, 7, 19], backend=backend)
    assert torch.equal(some, everything[[31, 7, 19]])
    assert get_num_frames(path, backend=backend) == 32
    # consecutive frames of a real clip are all distinct
    assert all(not torch.equal(everything[i], everything[i + 1]) for i in range(31))


def test_avi_last_frame_is_exact_on_every_backend(shared_data: Path) -> None:
    """The AVI has no frame timestamps: decord's timestamp seek returns the previous frame for the last one
    when it is requested alone; our reader decodes such streams sequentially."""
    path = _video(shared_data, "clip_164f_320x240.avi")
    full = decode_video(path, backend="pyav")
    for backend in BACKENDS:
        for indices in ([163], [0, 82, 163], [163, 163]):
            frames = decode_video(path, indices, backend=backend)
            assert torch.equal(frames, full[indices]), f"{backend}: {indices}"


def _decode_in_forked_child(path: str, queue) -> None:
    queue.put(decode_video(path, [0, 5, 9], backend="pyav").numpy())


def test_pyav_decodes_in_a_process_forked_after_the_parent_decoded(shared_data: Path) -> None:
    """PyAV 18.1.1 keeps a multithreaded swscale context per thread; a DataLoader worker forked after its parent
    converted a frame inherited it without its threads and hung forever converting (or freeing) through it. Frames
    go through `reformat_frame` (a context of the running process): the child decodes the parent's frames."""
    import multiprocessing

    path = str(_video(shared_data, "clip_164f_320x240.avi"))
    expected = decode_video(path, [0, 5, 9], backend="pyav").numpy()  # the parent converts frames first
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_decode_in_forked_child, args=(path, queue))
    child.start()
    try:
        got = queue.get(timeout=120)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, expected)


def test_file_object_bytearray_and_memoryview_sources(shared_data: Path) -> None:
    path = _video(shared_data, "short_32f.mp4")
    data = path.read_bytes()
    expected = decode_video(data, [5])
    with path.open("rb") as f:
        assert torch.equal(decode_video(f, [5]), expected)
    assert torch.equal(decode_video(bytearray(data), [5]), expected)
    assert torch.equal(decode_video(memoryview(data), [5]), expected)


# --------------------------------------------------------------------------------------------- bad input


def _corrupt_inputs(shared_data: Path) -> dict[str, bytes]:
    mp4 = _video(shared_data, "short_32f.mp4").read_bytes()
    rng = np.random.default_rng(0)
    return {
        "random bytes": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "text": b"this is not a video\n" * 50,
        "truncated mp4 (index lost)": mp4[: len(mp4) // 2],
        "mp4 header only": mp4[:2000],
        "jpeg": (shared_data / "images" / "test.jpg").read_bytes(),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_video_decoding_error(shared_data: Path, backend: str, tmp_path: Path) -> None:
    for what, data in _corrupt_inputs(shared_data).items():
        with pytest.raises(VideoDecodingError, match=f"with {backend}") as info:
            decode_video(data, [0], backend=backend)
        assert isinstance(info.value, ValueError), what
    with pytest.raises(VideoDecodingError, match="empty"):
        decode_video(b"", [0], backend=backend)
    with pytest.raises(VideoDecodingError, match="not found"):
        decode_video(tmp_path / "missing.mp4", backend=backend)
    image_path = shared_data / "images" / "test.jpg"
    with pytest.raises(VideoDecodingError, match=str(image_path)):
        decode_video(image_path, [0], backend=backend)


def _faststart_copy(src: Path, dst: Path) -> bytes:
    """Remux (no re-encode) with the index at the front, so a cut file still opens and claims all frames."""
    import av

    with (
        av.open(str(src)) as inp,
        av.open(str(dst), "w", format="mp4", options={"movflags": "faststart"}) as out,
    ):
        stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.dts is None:
                continue
            packet.stream = out_stream
            out.mux(packet)
    return dst.read_bytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_stream_raises_on_missing_frames(shared_data: Path, backend: str, tmp_path: Path) -> None:
    data = _faststart_copy(_video(shared_data, "short_32f.mp4"), tmp_path / "fast.mp4")
    assert torch.equal(
        decode_video(data, [31], backend=backend), decode_video(_video(shared_data, "short_32f.mp4"), [31])
    )
    cut = data[: int(len(data) * 0.6)]
    with VideoReader(cut, backend=backend) as reader:
        # PyAV trusts the header (32 frames) and fails on the lost ones; decord indexes what is there
        assert 1 <= reader.num_frames <= 32
        if reader.num_frames == 32:
            with pytest.raises(VideoDecodingError, match="truncated|cannot decode"):
                reader.get_batch([31])
        else:
            first = reader.get_batch([0])
            assert torch.equal(first, decode_video(data, [0], backend=backend))


def test_truncated_avi_bytes_do_not_crash_decord(shared_data: Path) -> None:
    """decord's in-memory reader segfaults on a cut AVI; bytes must go through a file."""
    data = _video(shared_data, "clip_164f_320x240.avi").read_bytes()[:147_000]
    for backend in BACKENDS:
        try:
            with VideoReader(data, backend=backend) as reader:
                reader.get_batch([0, reader.num_frames - 1])
        except VideoDecodingError:
            pass  # a clean error is fine; a crash would kill the test process


def test_bad_indices_are_value_errors(shared_data: Path) -> None:
    path = _video(shared_data, "short_32f.mp4")
    with VideoReader(path) as reader:
        with pytest.raises(ValueError, match=r"out of range .* 32 frames"):
            reader.get_batch([0, 32])
        with pytest.raises(ValueError, match="out of range"):
            reader.get_batch([-1])
        with pytest.raises(ValueError, match="empty"):
            reader.get_batch([])
    with pytest.raises(TypeError, match="path, bytes or a binary file object"):
        decode_video(12345)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- images


def test_decode_image_real_files_and_modes(shared_data: Path) -> None:
    for path in sorted((shared_data / "images").glob("*.jpg")):
        from_path = decode_image(path)
        from_bytes = decode_image(path.read_bytes())
        assert from_path.dtype == torch.uint8 and from_path.ndim == 3 and from_path.shape[-1] == 3
        assert torch.equal(from_path, from_bytes)
        with Image.open(path) as img:
            assert from_path.shape[:2] == (img.height, img.width)

    def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    gray = decode_image(encode(Image.new("L", (7, 5), 100)))
    assert gray.shape == (5, 7, 3) and bool((gray == 100).all())
    rgba = decode_image(encode(Image.new("RGBA", (4, 3), (200, 0, 0, 0))))  # fully transparent -> white
    assert rgba.shape == (3, 4, 3) and bool((rgba == 255).all())
    opaque = decode_image(encode(Image.new("RGBA", (4, 3), (10, 20, 30, 255))))
    assert opaque[0, 0].tolist() == [10, 20, 30]
    palette_img = Image.new("RGB", (6, 6), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette = decode_image(encode(palette_img))
    assert palette.shape == (6, 6, 3) and palette[0, 0].tolist() == [0, 128, 255]
    cmyk = decode_image(encode(Image.new("CMYK", (3, 3), (0, 0, 0, 0)), "JPEG"))
    assert cmyk.shape == (3, 3, 3)

    with pytest.raises(VideoDecodingError, match="cannot decode image"):
        decode_image(b"not an image at all")
    with pytest.raises(VideoDecodingError, match="empty"):
        decode_image(b"")
    with pytest.raises(VideoDecodingError, match="not found"):
        decode_image(shared_data / "images" / "missing.jpg")


# --------------------------------------------------------------------------------------------- sampling


def test_dense_test_mode_matches_the_official_formula() -> None:
    # K400 fine-tuning test: 32 frames x interval 2, 4 clips on a 300-frame video
    clips = sample_frame_indices(300, clip_len=32, frame_interval=2, num_clips=4, test_mode=True)
    room = 300 - 64 + 1
    starts = [int(room / 4 * k + room / 8) for k in range(4)]
    assert [c[0] for c in clips] == starts == [29, 88, 148, 207]
    assert all(c == list(range(s, s + 64, 2)) for c, s in zip(clips, starts))
    assert sample_frame_indices(300, clip_len=32, frame_interval=2, num_clips=4, test_mode=True) == clips


def test_dense_train_mode_random_offsets_inside_the_video() -> None:
    seen_starts = set()
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        (clip,) = sample_frame_indices(280, clip_len=16, frame_interval=8, generator=gen)
        assert clip == list(range(clip[0], clip[0] + 128, 8))
        assert 0 <= clip[0] <= 280 - 128
        seen_starts.add(clip[0])
    assert len(seen_starts) > 80  # 153 possible starts, spread over them
    # several clips: one per stretch of the video, in order
    for seed in range(50):
        clips = sample_frame_indices(
            300, clip_len=8, frame_interval=4, num_clips=3, generator=torch.Generator().manual_seed(seed)
        )
        stretch = (300 - 32 + 1) // 3
        assert [c[0] // stretch for c in clips] == [0, 1, 2]


def test_sampling_is_seedable() -> None:
    def draw(seed: int, mode: str) -> list[list[int]]:
        return sample_frame_indices(
            300,
            mode=mode,
            clip_len=16,
            frame_interval=4,
            num_clips=2,
            generator=torch.Generator().manual_seed(seed),
        )

    for mode in ("dense", "uniform"):
        assert draw(1, mode) == draw(1, mode)
        assert any(draw(1, mode) != draw(s, mode) for s in range(2, 6))
    torch.manual_seed(7)
    a = sample_frame_indices(300, mode="uniform", clip_len=8)
    torch.manual_seed(7)
    assert sample_frame_indices(300, mode="uniform", clip_len=8) == a


def test_short_videos_loop_and_never_fail() -> None:
    # the real short clip: 32 frames for a 16x8 window (128 frames)
    for test_mode in (True, False):
        (clip,) = sample_frame_indices(32, clip_len=16, frame_interval=8, test_mode=test_mode)
        assert clip == [0, 8, 16, 24] * 4
    assert sample_frame_indices(1, clip_len=4, frame_interval=3, num_clips=2) == [[0, 0, 0, 0]] * 2
    assert sample_frame_indices(5, mode="uniform", clip_len=8, test_mode=True)[0] == sorted(
        sample_frame_indices(5, mode="uniform", clip_len=8, test_mode=True)[0]
    )
    # more clips than start positions: spread, still inside
    clips = sample_frame_indices(20, clip_len=4, frame_interval=4, num_clips=8)
    assert all(0 <= i < 20 for c in clips for i in c)
    for num_frames in range(1, 40):
        for mode in ("dense", "uniform"):
            for test_mode in (True, False):
                clips = sample_frame_indices(
                    num_frames, mode=mode, clip_len=16, frame_interval=8, num_clips=3, test_mode=test_mode
                )
                assert len(clips) == 3 and all(len(c) == 16 for c in clips)
                assert all(0 <= i < num_frames for c in clips for i in c)


def test_uniform_sampling_segments() -> None:
    # 10 frames, 3 segments over [0, 9]: (0, 3), (3, 6), (6, 9) -> centres 1, 4, 7
    assert sample_frame_indices(10, mode="uniform", clip_len=3, test_mode=True) == [[1, 4, 7]]
    segment = 299 / 16
    for seed in range(100):
        (clip,) = sample_frame_indices(
            300, mode="uniform", clip_len=16, frame_interval=99, generator=torch.Generator().manual_seed(seed)
        )
        for i, idx in enumerate(clip):
            assert round(segment * i) <= idx <= round(segment * (i + 1))
    # several test clips take different, evenly spaced positions inside the segments
    clips = sample_frame_indices(300, mode="uniform", clip_len=8, num_clips=3, test_mode=True)
    assert clips[0] < clips[1] < clips[2]
    assert sample_frame_indices(300, mode="uniform", clip_len=8, num_clips=1, test_mode=True)[0] == [
        (round(299 / 8 * i) + round(299 / 8 * (i + 1))) // 2 for i in range(8)
    ]


def test_sampling_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_frames must be a positive integer, got 0"):
        sample_frame_indices(0, clip_len=8)
    with pytest.raises(ValueError, match="clip_len"):
        sample_frame_indices(10, clip_len=0)
    with pytest.raises(ValueError, match="frame_interval"):
        sample_frame_indices(10, clip_len=2, frame_interval=-1)
    with pytest.raises(ValueError, match="unknown sampling mode 'segment'"):
        sample_frame_indices(10, clip_len=2, mode="segment")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_larger_than_the_limit_are_refused_before_decoding(
    shared_data: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bevt import video_decoding

    path = _video(shared_data, "short_32f.mp4")  # 340x256 = 87,040 pixels
    decoded = []
    monkeypatch.setattr(VideoReader, "get_batch", lambda self, idx: decoded.append(idx))
    with pytest.raises(VideoDecodingError, match=r"340x256 \(0\.1 megapixels\), more than the 0\.1 accepted"):
        VideoReader(path, backend=backend, max_frame_pixels=80_000)
    monkeypatch.setattr(video_decoding, "MAX_FRAME_PIXELS", 50_000)  # the module-wide default
    with pytest.raises(VideoDecodingError, match="MAX_FRAME_PIXELS"):
        VideoReader(path.read_bytes(), backend=backend)
    assert decoded == []  # refused from the header, nothing decoded
    monkeypatch.undo()
    assert VideoReader(path, backend=backend, max_frame_pixels=340 * 256).num_frames == 32  # at the limit: fine
    monkeypatch.setattr(video_decoding, "MAX_FRAME_PIXELS", 50_000)
    assert decode_video(path, [0], backend=backend, max_frame_pixels=0).shape == (1, 256, 340, 3)  # 0: no check
