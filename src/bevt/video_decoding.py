"""Frame-accurate video decoding (decord, torchcodec or PyAV) and image decoding.

Every backend returns the same frames for the same indices: frame ``i`` is the ``i``-th frame the
decoder outputs in presentation order, counted from 0. Only the requested frames are converted to RGB.

* ``decord`` (preferred): ``VideoReader.get_batch``. decord seeks by timestamp, which goes wrong when a
  container carries no frame timestamps (e.g. AVI with packed B-frames: it can return the previous frame
  for the last one); for such streams we read frames sequentially from the start instead. Encoded bytes
  reach decord through a temporary file: decord's in-memory reader segfaults on some corrupt inputs.
* ``torchcodec`` (used when importable): ``VideoDecoder(seek_mode="exact").get_frames_at``.
* ``pyav`` (always available: the Transformers video pipeline requires it): decodes sequentially from the
  start and stops after the largest requested index. Seeking by timestamp is not frame-accurate on
  variable-frame-rate or timestamp-less streams, and our clips are short.

Typical use (open once, learn the length, sample, decode only those frames)::

    with VideoReader(path_or_bytes) as reader:
        clips = sample_frame_indices(reader.num_frames, clip_len=16, frame_interval=8)
        frames = reader.get_batch(clips[0])  # uint8 (16, H, W, 3)

The backend is chosen automatically (first available of :data:`BACKEND_PRIORITY`), or by the
``BEVT_VIDEO_BACKEND`` environment variable, or per call with ``backend=``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = [
    "BACKEND_PRIORITY",
    "MAX_FRAME_PIXELS",
    "VideoDecodingError",
    "VideoReader",
    "VideoSource",
    "available_backends",
    "decode_image",
    "decode_video",
    "get_num_frames",
    "resolve_backend",
]

BACKEND_PRIORITY: tuple[str, ...] = ("decord", "torchcodec", "pyav")
"""Backends in the order the automatic choice tries them."""

VideoSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO
"""A video file path, its encoded bytes, or a binary file object (read fully into memory)."""

MAX_FRAME_PIXELS: int | None = 7680 * 4320
"""Largest frame (width x height, from the container header) a :class:`VideoReader` accepts: 8K UHD. A corrupt or
hostile file whose header claims a huge resolution is rejected with :class:`VideoDecodingError` before anything is
decoded, instead of exhausting memory (a 16-frame clip at 16384x16384 would need 12 GiB as RGB). Set it to ``None``
to disable the check, or pass ``max_frame_pixels=`` per reader (like ``PIL.Image.MAX_IMAGE_PIXELS``)."""

# Demuxers that read still images; PyAV would happily decode a JPEG as a 1-frame "video".
_IMAGE_DEMUXERS = ("image2", "_pipe")


class VideoDecodingError(ValueError):
    """The input is not a decodable video (corrupt, empty, truncated, not a video, missing file)."""


# --------------------------------------------------------------------------------------------- backends


_REFORMATTERS = threading.local()
_INHERITED_REFORMATTERS: list[Any] = []  # a parent's reformatters, never freed in a forked child (see below)


def reformat_frame(frame: Any, **kwargs: Any) -> Any:
    """`frame.reformat(**kwargs)` (PyAV) through a swscale context of this process and thread.

    PyAV >= 18.1.1 keeps one multithreaded swscale context per thread in a module-level `threading.local`; a process
    forked after its parent converted a frame (DataLoader workers, process pools) inherits the parent's context but
    not its slice threads, and the next conversion through it waits for them forever (a hung data-loader worker;
    freeing it hangs the same way, joining the missing threads). A reformatter made in the current process, kept per
    thread, never crosses a fork; one inherited from the parent is kept alive and never used."""
    kept = getattr(_REFORMATTERS, "value", None)
    if kept is None or kept[0] != os.getpid():
        if kept is not None:
            _INHERITED_REFORMATTERS.append(kept[1])
        kept = (os.getpid(), _optional_import("av").video.reformatter.VideoReformatter())
        _REFORMATTERS.value = kept
    return kept[1].reformat(frame, **kwargs)


def _optional_import(name: str) -> Any:
    """Import an optional decoding backend by name. (Not an `import` statement: Transformers' remote-code loader
    would otherwise require every backend to be installed when this file travels with a saved model.)"""
    return importlib.import_module(name)


@functools.cache
def _backend_importable(name: str) -> bool:
    try:
        if name == "decord":
            import decord  # noqa: F401
        elif name == "torchcodec":
            # CUDA builds of torchcodec fail at import on CPU-only machines (missing libnvrtc): any
            # exception here means "not usable".
            from torchcodec.decoders import VideoDecoder  # noqa: F401
        elif name == "pyav":
            import av  # noqa: F401
        else:
            return False
    except Exception:  # noqa: BLE001 - a broken install is as good as a missing one
        return False
    return True


def available_backends() -> list[str]:
    """Importable video backends, in order of preference (a subset of :data:`BACKEND_PRIORITY`)."""
    return [name for name in BACKEND_PRIORITY if _backend_importable(name)]


def resolve_backend(backend: str | None = None) -> str:
    """The backend to use: ``backend`` if given, else ``$BEVT_VIDEO_BACKEND``, else the first available.

    Raises:
        ValueError: unknown backend name, or the named backend is not installed / not importable.
        ImportError: no backend at all is available.
    """
    if backend is None:
        backend = os.environ.get("BEVT_VIDEO_BACKEND") or None
    if backend is None:
        found = available_backends()
        if not found:
            raise ImportError("no video decoding backend found: install decord (`pip install decord`) or av")
        return found[0]
    name = backend.lower()
    if name == "av":
        name = "pyav"
    if name not in BACKEND_PRIORITY:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {list(BACKEND_PRIORITY)}")
    if not _backend_importable(name):
        raise ValueError(
            f"video backend {name!r} is not installed or fails to import here; available: {available_backends()}"
        )
    return name


# --------------------------------------------------------------------------------------------- sources


def _describe(source: str | Path | bytes) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes of video>"
    return str(source)


def _normalize_source(source: VideoSource) -> str | bytes:
    """A path as ``str`` (checked to exist) or the encoded bytes."""
    if isinstance(source, bytes):
        return source
    if isinstance(source, bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise VideoDecodingError(f"video file not found: {path}")
        return path
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, bytes):
            raise TypeError(
                f"video file object must be opened in binary mode, got {type(data).__name__} data"
            )
        return data
    raise TypeError(
        f"video source must be a path, bytes or a binary file object, got {type(source).__name__}"
    )


def _check_indices(indices: Sequence[int], num_frames: int, what: str) -> list[int]:
    out = [int(i) for i in indices]
    bad = [i for i in out if not 0 <= i < num_frames]
    if bad:
        raise ValueError(
            f"frame indices {bad[:5]} out of range for {what} with {num_frames} frames "
            "(sample with bevt.frame_sampling.sample_frame_indices, which loops short videos)"
        )
    return out


# --------------------------------------------------------------------------------------------- readers


@functools.cache
def _spill_dir() -> str:
    """Where encoded bytes go for decord: RAM-backed /dev/shm when usable, else the temp folder."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return tempfile.gettempdir()


def _probe_frame_size(source: str | bytes) -> tuple[int, int] | None:
    """(width, height) of the first video stream from the container header (PyAV, nothing decoded); None when
    PyAV cannot tell (the backend then reports its own errors)."""
    try:
        av = _optional_import("av")
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else source, mode="r") as container:
            if not container.streams.video:
                return None
            context = container.streams.video[0].codec_context
            return int(context.width), int(context.height)
    except Exception:  # noqa: BLE001 - a probe only
        return None


class _DecordReader:
    """decord ``VideoReader``. Bytes are decoded from a temporary file, never through decord's BytesIO
    reader: on corrupt or truncated input (e.g. a cut AVI) the BytesIO path crashes the process with a
    segmentation fault, where the file path raises a catchable error. On POSIX the file is unlinked as
    soon as decord holds it open, so nothing is left behind even if the process dies."""

    def __init__(self, source: str | bytes, num_threads: int) -> None:
        decord = _optional_import("decord")

        self._tmp_path: str | None = None
        if isinstance(source, bytes):
            fd, self._tmp_path = tempfile.mkstemp(prefix="bevt-", suffix=".video", dir=_spill_dir())
            with os.fdopen(fd, "wb") as f:
                f.write(source)
            source = self._tmp_path
        try:
            self._reader = decord.VideoReader(source, ctx=decord.cpu(0), num_threads=num_threads)
        finally:
            if os.name == "posix":
                self._remove_tmp()
        self.num_frames = len(self._reader)
        fps = self._reader.get_avg_fps()
        self.fps = float(fps) if fps and fps > 0 else None
        self._sequential = self.num_frames > 0 and not self._has_valid_timestamps()

    def _has_valid_timestamps(self) -> bool:
        starts = np.asarray(self._reader.get_frame_timestamp(list(range(self.num_frames))))[:, 0]
        return bool((starts >= 0).all() and (np.diff(starts) > 0).all())

    def get_batch(self, indices: list[int]) -> np.ndarray:
        if not self._sequential:
            return self._reader.get_batch(indices).asnumpy()
        wanted = set(indices)
        frames: dict[int, np.ndarray] = {}
        self._reader.seek(0)
        for i in range(max(indices) + 1):
            frame = self._reader.next()
            if i in wanted:
                frames[i] = frame.asnumpy()
        return np.stack([frames[i] for i in indices])

    def _remove_tmp(self) -> None:
        if self._tmp_path is not None:
            with contextlib.suppress(OSError):
                os.remove(self._tmp_path)
            self._tmp_path = None

    def close(self) -> None:
        self._reader = None
        self._remove_tmp()

    def __del__(self) -> None:
        self._remove_tmp()


class _TorchcodecReader:
    def __init__(self, source: str | bytes, num_threads: int) -> None:
        VideoDecoder = _optional_import("torchcodec.decoders").VideoDecoder  # noqa: N806

        self._decoder = VideoDecoder(
            source, seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=num_threads
        )
        metadata = self._decoder.metadata
        self.num_frames = int(metadata.num_frames or 0)  # exact seek mode scans the file: a true count
        if metadata.width and metadata.height:
            self.frame_size = (int(metadata.width), int(metadata.height))
        fps = getattr(metadata, "average_fps", None)
        self.fps = float(fps) if fps else None

    def get_batch(self, indices: list[int]) -> np.ndarray:
        return self._decoder.get_frames_at(indices).data.numpy()

    def close(self) -> None:
        self._decoder = None


class _PyAVReader:
    def __init__(self, source: str | bytes, num_threads: int) -> None:
        self._source = source
        self._num_threads = num_threads
        with self._open() as container:
            stream = container.streams.video[0]
            num_frames = stream.frames
            if num_frames <= 0:  # no count in the header: count packets (demux only, no decoding)
                num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            self.num_frames = int(num_frames)
            self.frame_size = (int(stream.codec_context.width), int(stream.codec_context.height))
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else None

    def _open(self) -> Any:
        av = _optional_import("av")

        src = io.BytesIO(self._source) if isinstance(self._source, bytes) else self._source
        container = av.open(src, mode="r")
        if not container.streams.video:
            container.close()
            raise VideoDecodingError("no video stream in the container")
        if any(tag in container.format.name for tag in _IMAGE_DEMUXERS):
            container.close()
            raise VideoDecodingError(f"this is a still image ({container.format.name}), not a video")
        return container

    def get_batch(self, indices: list[int]) -> np.ndarray:
        wanted = set(indices)
        last = max(indices)
        frames: dict[int, np.ndarray] = {}
        with self._open() as container:
            stream = container.streams.video[0]
            if self._num_threads == 1:
                stream.thread_count = 1
            else:  # frame threading: faster, same frames in the same order
                stream.thread_type = "AUTO"
                stream.thread_count = max(self._num_threads, 0)
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = reformat_frame(frame, format="rgb24").to_ndarray()
                if i >= last:
                    break
        missing = sorted(wanted - frames.keys())
        if missing:
            raise VideoDecodingError(
                f"video is truncated: only {len(frames) and max(frames) + 1} of {self.num_frames} frames "
                f"decode, frame {missing[0]} is missing"
            )
        return np.stack([frames[i] for i in indices])

    def close(self) -> None:
        self._source = b""


_READERS = {"decord": _DecordReader, "torchcodec": _TorchcodecReader, "pyav": _PyAVReader}


class VideoReader:
    """An opened video: its length, and frame-accurate decoding of chosen frames.

    Args:
        source: a file path, the encoded bytes, or a binary file object.
        backend: ``"decord"``, ``"torchcodec"`` or ``"pyav"`` (``"av"`` also accepted); ``None`` picks
            automatically (see :func:`resolve_backend`).
        num_threads: decoder threads (1 suits data-loader workers; 0 lets the library decide).
        max_frame_pixels: largest accepted width x height (read from the header before decoding); ``None`` uses
            :data:`MAX_FRAME_PIXELS`, ``0`` disables the check.

    Attributes:
        num_frames: number of frames (from the container index/header).
        fps: average frame rate, or ``None`` when unknown.
        backend: the backend in use.

    Raises:
        VideoDecodingError: the source is missing, empty, corrupt, or not a video.
    """

    def __init__(
        self,
        source: VideoSource,
        backend: str | None = None,
        num_threads: int = 1,
        max_frame_pixels: int | None = None,
    ) -> None:
        self.backend = resolve_backend(backend)
        src = _normalize_source(source)
        self._what = _describe(src)
        if isinstance(src, bytes) and not src:
            raise VideoDecodingError("cannot decode video: the input is empty (0 bytes)")
        limit = MAX_FRAME_PIXELS if max_frame_pixels is None else max_frame_pixels
        if limit and self.backend == "decord":  # decord cannot tell the size without decoding: read the header
            self._check_frame_size(_probe_frame_size(src), limit)
        try:
            self._impl = _READERS[self.backend](src, num_threads)
        except VideoDecodingError as err:
            raise VideoDecodingError(f"cannot decode video {self._what} with {self.backend}: {err}") from err
        except Exception as err:  # noqa: BLE001 - backends raise RuntimeError, FFmpegError, DECORDError...
            raise VideoDecodingError(
                f"cannot open video {self._what} with {self.backend}: {type(err).__name__}: {_short(err)}"
            ) from err
        if limit:
            self._check_frame_size(getattr(self._impl, "frame_size", None), limit)
        self.num_frames: int = self._impl.num_frames
        self.fps: float | None = self._impl.fps
        if self.num_frames <= 0:
            raise VideoDecodingError(f"video {self._what} has no frames ({self.backend})")

    def _check_frame_size(self, size: tuple[int, int] | None, limit: int) -> None:
        if size is not None and size[0] * size[1] > limit:
            width, height = size
            raise VideoDecodingError(
                f"video {self._what}: its header gives frames of {width}x{height} ({width * height / 1e6:.1f} "
                f"megapixels), more than the {limit / 1e6:.1f} accepted (bevt.video_decoding.MAX_FRAME_PIXELS or "
                "max_frame_pixels=); refusing to decode it (corrupt file, or re-encode it smaller)"
            )

    def __len__(self) -> int:
        return self.num_frames

    def get_batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Decode the frames at ``indices`` (any order, repeats allowed).

        Returns:
            ``torch.uint8`` tensor ``(len(indices), H, W, 3)``, RGB.

        Raises:
            ValueError: empty ``indices`` or an index outside ``[0, num_frames)``.
            VideoDecodingError: the stream is corrupt or truncated.
        """
        if len(indices) == 0:
            raise ValueError("indices is empty: ask for at least one frame")
        idx = _check_indices(indices, self.num_frames, f"video {self._what}")
        try:
            frames = self._impl.get_batch(idx)
        except VideoDecodingError as err:
            raise VideoDecodingError(f"cannot decode video {self._what} with {self.backend}: {err}") from err
        except Exception as err:  # noqa: BLE001
            raise VideoDecodingError(
                f"cannot decode frames of video {self._what} with {self.backend}: "
                f"{type(err).__name__}: {_short(err)}"
            ) from err
        if frames.ndim != 4 or frames.shape[0] != len(idx) or frames.shape[-1] != 3:
            raise VideoDecodingError(
                f"{self.backend} returned frames of shape {tuple(frames.shape)} for {len(idx)} indices "
                f"of video {self._what}"
            )
        return torch.from_numpy(np.ascontiguousarray(frames))

    def close(self) -> None:
        """Release the decoder."""
        self._impl.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VideoReader({self._what}, backend={self.backend!r}, num_frames={self.num_frames}, fps={self.fps})"


def _short(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    msg = text[-1] if text else ""
    return msg if len(msg) <= limit else msg[:limit] + "..."


# --------------------------------------------------------------------------------------------- functions


def decode_video(
    source: VideoSource,
    indices: Sequence[int] | None = None,
    backend: str | None = None,
    num_threads: int = 1,
    max_frame_pixels: int | None = None,
) -> torch.Tensor:
    """Decode frames of a video.

    Args:
        source: a file path, the encoded bytes, or a binary file object.
        indices: frames to decode (any order, repeats allowed); ``None`` decodes every frame.
        backend: see :func:`resolve_backend`.
        num_threads: decoder threads.
        max_frame_pixels: see :class:`VideoReader`.

    Returns:
        ``torch.uint8`` tensor ``(T, H, W, 3)``, RGB, ``T = len(indices)`` (or the frame count).

    Raises:
        VideoDecodingError: corrupt, empty, truncated or non-video input, or a missing file.
        ValueError: an index out of range.
    """
    with VideoReader(source, backend, num_threads, max_frame_pixels) as reader:
        return reader.get_batch(range(reader.num_frames) if indices is None else indices)


def get_num_frames(source: VideoSource, backend: str | None = None) -> int:
    """The number of frames of a video (from its container; nothing is decoded)."""
    with VideoReader(source, backend=backend) as reader:
        return reader.num_frames


def decode_image(source: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO) -> torch.Tensor:
    """Decode an image file or its bytes with PIL; grayscale, palette, CMYK... become RGB.

    Transparent images (RGBA, LA, palette with transparency) are composited over white.

    Returns:
        ``torch.uint8`` tensor ``(H, W, 3)``.

    Raises:
        VideoDecodingError: missing file, empty, corrupt or unsupported image data.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise VideoDecodingError("cannot decode image: the input is empty (0 bytes)")
        what, fp = f"<{len(source)} bytes of image>", io.BytesIO(bytes(source))
    elif isinstance(source, str | os.PathLike):
        what, fp = os.fspath(source), os.fspath(source)
        if not os.path.isfile(fp):
            raise VideoDecodingError(f"image file not found: {what}")
    elif hasattr(source, "read"):
        what, fp = "<image file object>", source
    else:
        raise TypeError(
            f"image source must be a path, bytes or a binary file object, got {type(source).__name__}"
        )
    try:
        with Image.open(fp) as img:
            img.load()
            if img.mode != "RGB":
                if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                    img = img.convert("RGBA")
                    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(background, img)
                img = img.convert("RGB")
            array = np.asarray(img, dtype=np.uint8).copy()
    except UnidentifiedImageError as err:
        raise VideoDecodingError(f"cannot decode image {what}: not an image format PIL can read") from err
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError) as err:
        # DecompressionBombError: a header claiming more than PIL.Image.MAX_IMAGE_PIXELS pixels (refused before
        # any memory is allocated for them)
        raise VideoDecodingError(f"cannot decode image {what}: {type(err).__name__}: {_short(err)}") from err
    return torch.from_numpy(array)
