"""WebDataset shards: the sample format, a writer, and helpers to find, describe and read shards.

Sample format (``bevt/1``), the contract between :mod:`bevt.data.make_shards`, the demo-data generators of
the training scripts and :mod:`bevt.data.streaming`:

* A shard is an uncompressed POSIX ``.tar``. Each sample is two consecutive members with the same key:
  ``KEY.<ext>`` (the encoded media, ``ext`` in :data:`VIDEO_EXTENSIONS` or :data:`IMAGE_EXTENSIONS`) and
  ``KEY.json`` (its metadata).
* ``KEY`` matches ``[A-Za-z0-9_-]{1,128}``: WebDataset readers split member names at the first dot, so keys
  cannot contain dots (nor slashes). Keys are unique within a dataset.
* ``KEY.json`` is a JSON object with at least ``label`` (``int`` class index or ``null`` for unlabeled
  data), ``label_name`` (``str`` or ``null``) and ``path`` (the original relative path, or ``null``); any
  further JSON-serialisable fields are kept as they are.
* Next to the shards, ``dataset_info.json`` records the counts (per shard and in total, per label, skipped
  inputs by reason) and ``labels.txt`` the class names in index order, one per line (when known).

Reading: training reads shards with :func:`iter_tar_samples` (through :mod:`bevt.data.streaming`), which survives
damage (a truncated shard, a corrupt member header, duplicate members) and tolerates keys with dots;
:func:`iter_shard` is a simple reader for inspection, :func:`iter_sample_metadata` reads only the ``KEY.json``
members.

Label ids: a class must have the same id in every split and in the model. :func:`check_label_consistency` checks
shard sets (their ``dataset_info.json`` / ``labels.txt`` and each sample's ``label`` / ``label_name``) and a list of
label names against each other and raises :class:`LabelMismatchError` naming the class and both ids::

    id2label = check_label_consistency("shards/train", "shards/val", label_names="labels.txt")

Writing from Python (bytes already in memory)::

    paths = write_shards(
        [("clip_0", "mp4", mp4_bytes, {"label": 3, "label_name": "dancing", "path": "a/clip_0.mp4"})],
        "out/", shard_size_mb=256, prefix="train", kind="video", labels=names,
    )
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bevt.data.storage import (
    RemoteFolder,
    ShardAccess,
    ShardUnavailableError,
    basename,
    expand_braces,
    is_url,
    join,
    list_remote,
    normalize,
    open_shard,
    parent,
    read_bytes,
)

__all__ = [
    "DATASET_INFO_FILE",
    "IMAGE_EXTENSIONS",
    "LABELS_FILE",
    "MEDIA_EXTENSIONS",
    "SAMPLE_FORMAT",
    "VIDEO_EXTENSIONS",
    "LabelMismatchError",
    "ShardInfo",
    "ShardWriter",
    "TarSample",
    "check_key",
    "check_label_consistency",
    "find_label_names",
    "iter_sample_metadata",
    "iter_shard",
    "iter_tar_samples",
    "list_shards",
    "load_dataset_info",
    "make_key",
    "media_kind",
    "read_labels",
    "write_dataset_info",
    "write_shards",
]

logger = logging.getLogger(__name__)

SAMPLE_FORMAT = "bevt/1"
"""Version tag of the sample format written into ``dataset_info.json``."""

VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "avi", "webm", "mkv")
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png")
MEDIA_EXTENSIONS: tuple[str, ...] = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS

DATASET_INFO_FILE = "dataset_info.json"
LABELS_FILE = "labels.txt"

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_SLUG_RE = re.compile(r"[^A-Za-z0-9_-]+")


def media_kind(ext: str) -> str:
    """``"video"`` or ``"image"`` for a media extension (case-insensitive, with or without the dot).

    Raises:
        ValueError: the extension is not one of :data:`MEDIA_EXTENSIONS`.
    """
    e = ext.lower().lstrip(".")
    if e in VIDEO_EXTENSIONS:
        return "video"
    if e in IMAGE_EXTENSIONS:
        return "image"
    raise ValueError(f"unsupported media extension {ext!r}; expected one of {list(MEDIA_EXTENSIONS)}")


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key (``[A-Za-z0-9_-]{1,128}``), else raise ``ValueError``."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(
            f"invalid sample key {key!r}: keys must be 1-128 characters from [A-Za-z0-9_-] "
            "(no dots: WebDataset splits member names at the first dot; no slashes)"
        )
    return key


def make_key(index: int, path: str | os.PathLike | None = None, max_len: int = 96) -> str:
    """A valid, unique key from a running index and (for readability) the file's path.

    ``make_key(12, "abseiling/x.y.mp4") == "00000012_abseiling_x_y"``.
    """
    key = f"{index:08d}"
    if path is not None:
        stem = os.fspath(path)
        root, ext = os.path.splitext(stem)
        if ext.lower().lstrip(".") in MEDIA_EXTENSIONS:
            stem = root
        slug = _SLUG_RE.sub("_", stem).strip("_")
        if slug:
            key = f"{key}_{slug}"[:max_len].rstrip("_")
    return check_key(key)


def _check_meta(key: str, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(meta or {})
    out.setdefault("label", None)
    out.setdefault("label_name", None)
    out.setdefault("path", None)
    label = out["label"]
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
        raise ValueError(f"sample {key!r}: 'label' must be an int class index >= 0 or None, got {label!r}")
    if out["label_name"] is not None and not isinstance(out["label_name"], str):
        raise ValueError(f"sample {key!r}: 'label_name' must be a str or None, got {out['label_name']!r}")
    if out["path"] is not None:
        out["path"] = os.fspath(out["path"])
    return out


@dataclass
class ShardInfo:
    """One written shard: file name (relative to the output folder), samples and bytes."""

    file: str
    num_samples: int
    num_bytes: int


class ShardWriter:
    """Write samples into size-capped WebDataset ``.tar`` shards named ``{prefix}-{index:05d}.tar``.

    A new shard starts when adding a sample would push the current one past ``shard_size_mb`` (a sample
    larger than the cap gets a shard of its own), after ``max_samples_per_shard`` samples, or when
    :meth:`start_new_shard` is called. Each shard is written to ``*.tar.tmp`` and renamed when complete, so
    a crash never leaves a truncated ``.tar`` behind. Member headers carry fixed times and owners: the same
    samples give byte-identical shards.

    Args:
        output_dir: folder for the shards (created).
        prefix: shard file name prefix.
        shard_size_mb: size cap per shard in MiB (``math.inf``: no cap).
        max_samples_per_shard: optional cap on samples per shard.

    ``output_dir`` may be a URL (``hf://datasets/...``, ``s3://``, ``gs://``, ``az://``, ``memory://``; see
    :mod:`bevt.data.storage`): shards are then written to a local staging folder (``staging_dir``, default a new
    temporary folder) and each finished shard is uploaded whole, then deleted locally, so local disk holds one shard.

    Use as a context manager, or call :meth:`close`; :attr:`shards` lists what was written.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        prefix: str = "shard",
        shard_size_mb: float = 256.0,
        max_samples_per_shard: int | None = None,
        storage_options: Mapping[str, Any] | ShardAccess | None = None,
        staging_dir: str | os.PathLike | None = None,
    ) -> None:
        if shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb must be > 0, got {shard_size_mb}")
        if max_samples_per_shard is not None and max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        if not prefix or "/" in prefix or "." in prefix:
            raise ValueError(f"invalid shard prefix {prefix!r} (non-empty, no '/' or '.')")
        self._remote: RemoteFolder | None = None
        self._staging: Path | None = None
        if is_url(output_dir):
            self._remote = RemoteFolder(normalize(output_dir), _access(storage_options))
            self.output_dir: Path | str = self._remote.url
            if staging_dir is None:
                self._staging = Path(tempfile.mkdtemp(prefix=f"bevt-{prefix}-staging-"))
                self._local_dir = self._staging
            else:
                self._local_dir = Path(staging_dir)
                self._local_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.output_dir = self._local_dir = Path(output_dir)
            self._local_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_bytes = int(shard_size_mb * 2**20) if math.isfinite(shard_size_mb) else None
        self.max_samples = max_samples_per_shard
        self.shards: list[ShardInfo] = []
        self.label_counts: Counter[int] = Counter()
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._count = 0
        self._bytes = 0
        self._closed = False

    # -------------------------------------------------------------------------------- shard handling

    def _shard_path(self, index: int) -> Path:
        return self._local_dir / f"{self.prefix}-{index:05d}.tar"

    def _location(self, name: str) -> str:
        return join(str(self.output_dir), name) if self._remote is not None else str(self._local_dir / name)

    def _open_shard(self) -> None:
        path = self._shard_path(len(self.shards))
        self._tmp_path = path.with_name(path.name + ".tmp")
        self._tar = tarfile.open(self._tmp_path, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0
        self._bytes = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self._shard_path(len(self.shards))
        os.replace(self._tmp_path, path)
        self._tar = None
        self._tmp_path = None
        info = ShardInfo(path.name, self._count, path.stat().st_size)
        if self._remote is not None:
            try:
                self._remote.put(path, path.name)
            finally:
                path.unlink()
        self.shards.append(info)

    def start_new_shard(self) -> None:
        """Close the current shard (if it holds samples); the next sample opens a new one."""
        if self._tar is not None and self._count > 0:
            self._finish_shard()

    @staticmethod
    def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))

    # -------------------------------------------------------------------------------- writing

    def write(self, key: str, ext: str, data: bytes, meta: Mapping[str, Any] | None = None) -> str:
        """Add one sample; returns the path of the shard it went to.

        Args:
            key: unique sample key (see :func:`check_key`).
            ext: media extension, one of :data:`MEDIA_EXTENSIONS` (case-insensitive).
            data: the encoded media bytes, stored as they are (validity is checked when reading).
            meta: metadata; ``label`` / ``label_name`` / ``path`` default to ``None``.

        Raises:
            ValueError: invalid or duplicate key, unsupported extension, bad metadata.
            RuntimeError: the writer is closed.
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        e = ext.lower().lstrip(".")
        media_kind(e)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"sample {key!r}: data must be bytes, got {type(data).__name__}")
        record = _check_meta(key, meta)
        try:
            meta_bytes = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
        except (TypeError, ValueError) as err:
            raise ValueError(f"sample {key!r}: metadata is not JSON-serialisable: {err}") from err
        size = len(data) + len(meta_bytes) + 2048  # two 512-byte headers (+ PAX) and padding, roughly
        if self._tar is not None and self._count > 0:
            full = self.max_samples is not None and self._count >= self.max_samples
            if full or (self.max_bytes is not None and self._bytes + size > self.max_bytes):
                self._finish_shard()
        if self._tar is None:
            self._open_shard()
        self._add_member(self._tar, f"{key}.{e}", bytes(data))
        self._add_member(self._tar, f"{key}.json", meta_bytes)
        self._keys.add(key)
        self._count += 1
        self._bytes += size
        if record["label"] is not None:
            self.label_counts[record["label"]] += 1
        return self._location(self._shard_path(len(self.shards)).name)

    def close(self) -> list[str]:
        """Finish the last shard; returns all shard paths (or URLs) in order."""
        if not self._closed:
            try:
                if self._tar is not None:
                    if self._count > 0:
                        self._finish_shard()
                    else:
                        self._tar.close()
                        os.unlink(self._tmp_path)
                        self._tar = None
            finally:
                self._closed = True
                self._remove_staging()
        return [self._location(s.file) for s in self.shards]

    def abort(self) -> None:
        """Drop the shard being written (its ``.tmp`` file); completed shards stay."""
        if self._tar is not None:
            self._tar.close()
            if self._tmp_path is not None and self._tmp_path.exists():
                os.unlink(self._tmp_path)
            self._tar = None
        self._closed = True
        self._remove_staging()

    def _remove_staging(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    @property
    def num_samples(self) -> int:
        """Samples written so far."""
        return len(self._keys)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_dataset_info(
    output_dir: str | os.PathLike,
    shards: Sequence[ShardInfo],
    *,
    kind: str | None = None,
    labels: Sequence[str] | None = None,
    label_counts: Mapping[int, int] | None = None,
    skipped: Mapping[str, int] | None = None,
    skipped_examples: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | ShardAccess | None = None,
) -> Path | str:
    """Write ``dataset_info.json`` (and ``labels.txt`` when ``labels`` is given); returns the info path.

    ``output_dir`` may be a URL (see :class:`ShardWriter`): both files are uploaded, ``labels.txt`` first, so that
    a ``dataset_info.json`` present means the set is complete. The return value is then the info file's URL.
    """
    from bevt import __version__

    if labels is not None:
        bad = [name for name in labels if "\n" in name]
        if bad:
            raise ValueError(f"label names cannot contain newlines: {bad[:3]}")
    if is_url(output_dir):
        folder = RemoteFolder(normalize(output_dir), _access(storage_options))
        with tempfile.TemporaryDirectory(prefix="bevt-info-") as tmp:
            local = write_dataset_info(
                tmp,
                shards,
                kind=kind,
                labels=labels,
                label_counts=label_counts,
                skipped=skipped,
                skipped_examples=skipped_examples,
                extra=extra,
            )
            if labels is not None:
                folder.put(Path(tmp) / LABELS_FILE, LABELS_FILE)
            return folder.put(local, DATASET_INFO_FILE)
    out = Path(output_dir)
    info: dict[str, Any] = {
        "sample_format": SAMPLE_FORMAT,
        "kind": kind,
        "num_samples": sum(s.num_samples for s in shards),
        "num_bytes": sum(s.num_bytes for s in shards),
        "num_shards": len(shards),
        "shards": [asdict(s) for s in shards],
        "num_labels": len(labels) if labels is not None else None,
        "labels": list(labels) if labels is not None else None,
        "label_counts": {str(k): int(v) for k, v in sorted((label_counts or {}).items())},
        "skipped": dict(skipped or {}),
        "skipped_examples": list(skipped_examples),
        "created_with": f"bevt {__version__}",
    }
    if extra:
        info.update(extra)
    path = out / DATASET_INFO_FILE
    path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if labels is not None:
        (out / LABELS_FILE).write_text("".join(f"{name}\n" for name in labels), encoding="utf-8")
    return path


def write_shards(
    samples: Iterable[tuple[str, str, bytes, Mapping[str, Any] | None]],
    output_dir: str | os.PathLike,
    *,
    shard_size_mb: float = 256.0,
    prefix: str = "shard",
    max_samples_per_shard: int | None = None,
    num_shards: int | None = None,
    kind: str | None = None,
    labels: Sequence[str] | None = None,
    write_info: bool = True,
    storage_options: Mapping[str, Any] | ShardAccess | None = None,
) -> list[str]:
    """Write ``(key, ext, bytes, meta)`` samples into shards (+ ``dataset_info.json`` / ``labels.txt``).

    Args:
        samples: iterable of ``(key, ext, data, meta)``; see :meth:`ShardWriter.write`.
        output_dir: output folder (created).
        shard_size_mb, prefix, max_samples_per_shard: see :class:`ShardWriter`.
        num_shards: split into exactly this many shards of (nearly) equal sample counts instead (needs a
            sized ``samples``; at most one shard per sample). Equal counts keep ranks in step when a
            multi-process run gives each rank whole shards.
        kind: ``"video"`` / ``"image"`` recorded in the info (default: inferred from the extensions).
        labels: class names in index order, written to ``labels.txt``.
        write_info: write ``dataset_info.json``.
        storage_options: for an ``output_dir`` URL, the filesystem options (see :mod:`bevt.data.storage`).

    Returns:
        The shard paths (or URLs), in order.
    """
    sizes: list[int] | None = None
    if num_shards is not None:
        if not isinstance(samples, Sequence):
            samples = list(samples)
        n = len(samples)
        if not 1 <= num_shards <= max(n, 1):
            raise ValueError(f"num_shards={num_shards} must be in [1, {max(n, 1)}] for {n} samples")
        sizes = [n // num_shards + (1 if i < n % num_shards else 0) for i in range(num_shards)]
        shard_size_mb = math.inf
    kinds: set[str] = set()
    writer = ShardWriter(
        output_dir,
        prefix=prefix,
        shard_size_mb=shard_size_mb,
        max_samples_per_shard=max_samples_per_shard,
        storage_options=storage_options,
    )
    with writer:
        boundaries = set()
        if sizes is not None:
            total = 0
            for s in sizes[:-1]:
                total += s
                boundaries.add(total)
        for i, (key, ext, data, meta) in enumerate(samples):
            if i in boundaries:
                writer.start_new_shard()
            kinds.add(media_kind(ext))
            writer.write(key, ext, data, meta)
    paths = writer.close()
    if write_info:
        if kind is None and len(kinds) == 1:
            kind = kinds.pop()
        write_dataset_info(
            output_dir,
            writer.shards,
            kind=kind,
            labels=labels,
            label_counts=writer.label_counts,
            storage_options=storage_options,
        )
    return paths


# ------------------------------------------------------------------------------------------ reading


def _access(storage_options: Mapping[str, Any] | ShardAccess | None) -> ShardAccess:
    """A :class:`~bevt.data.storage.ShardAccess` from filesystem options (or one given as is)."""
    if isinstance(storage_options, ShardAccess):
        return storage_options
    return ShardAccess(storage_options=storage_options)


def list_shards(
    data_files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    storage_options: Mapping[str, Any] | ShardAccess | None = None,
) -> list[str]:
    """Resolve shards: a folder (its ``*.tar``), a glob pattern, a file, a URL of any of these, or a list of these.

    URLs (``hf://datasets/...``, ``https://``, ``s3://``, ``gs://``, ``az://``, any installed fsspec protocol; see
    :mod:`bevt.data.storage`) stay URLs; ``storage_options`` go to their filesystem (e.g. ``{"token": ...}``). An
    HTTP folder or glob is resolved from its ``dataset_info.json``; a remote ``.tar`` URL is not checked here (a
    missing one is reported when it is read). ``{000..099}`` ranges expand to one entry each.

    Returns:
        Absolute paths (URLs as given); a folder or glob expands in sorted order, a list keeps its order.

    Raises:
        FileNotFoundError: nothing matches, or a listed file does not exist.
        ValueError: a resolved file is not a ``.tar``.
        ImportError: a URL protocol whose package is not installed (the message names it).
    """
    items = [data_files] if isinstance(data_files, str | os.PathLike) else list(data_files)
    if not items:
        raise FileNotFoundError("no shard files given (empty list)")
    access = _access(storage_options)
    out: list[str] = []
    for item in items:
        for s in expand_braces(normalize(item)):
            if is_url(s):
                found = list_remote(s, access)
            elif os.path.isdir(s):
                found = sorted(glob.glob(os.path.join(s, "*.tar")))
                if not found:
                    raise FileNotFoundError(f"no .tar shards in folder {s}")
            elif any(c in s for c in "*?["):
                found = sorted(glob.glob(s))
                if not found:
                    raise FileNotFoundError(f"no shard files match {s!r}")
            elif os.path.isfile(s):
                found = [s]
            else:
                raise FileNotFoundError(f"shard file not found: {s}")
            for f in found:
                if not basename(f).endswith(".tar"):
                    raise ValueError(f"not a .tar shard: {f}")
                out.append(f if is_url(f) else os.path.abspath(f))
    return out


def _folder_of(location: str) -> str | None:
    """The folder a location names: itself for a folder, the parent of a file (``.tar``/``.json``/``.txt``) or a
    glob (``None`` when there is none, e.g. a presigned URL)."""
    if is_url(location):
        name = basename(location)
        if name.endswith((".tar", ".json", ".txt")) or any(c in name for c in "*?[") or "?" in location:
            return parent(location)
        return location.rstrip("/")
    return location if os.path.isdir(location) else os.path.dirname(location)


def load_dataset_info(
    path: str | os.PathLike, *, storage_options: Mapping[str, Any] | ShardAccess | None = None
) -> dict[str, Any] | None:
    """``dataset_info.json`` from a shard folder (or next to a shard file), local or a URL, or ``None`` if there is
    none.

    Raises:
        bevt.data.storage.ShardUnavailableError: a remote one could not be read after the retries.
    """
    folder = _folder_of(normalize(path))
    if folder is None:
        return None
    location = join(folder, DATASET_INFO_FILE)
    if not is_url(location) and not os.path.isfile(location):
        return None
    try:
        raw = read_bytes(location, _access(storage_options))
    except (FileNotFoundError, IsADirectoryError):
        return None
    return json.loads(raw.decode("utf-8"))


def read_labels(
    path: str | os.PathLike, *, storage_options: Mapping[str, Any] | ShardAccess | None = None
) -> list[str]:
    """Class names from a ``labels.txt`` (one per line, index order) or a folder holding one; local or a URL (a URL
    not ending in ``.txt`` is a folder)."""
    location = normalize(path)
    if is_url(location):
        if not basename(location).endswith(".txt"):
            location = join(location, LABELS_FILE)
    elif os.path.isdir(location):
        location = os.path.join(location, LABELS_FILE)
    text = read_bytes(location, _access(storage_options)).decode("utf-8")
    names = [line.rstrip("\r\n") for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    return names


def find_label_names(
    data_files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    storage_options: Mapping[str, Any] | ShardAccess | None = None,
) -> tuple[list[str], str | None]:
    """The class names recorded next to shards: ``labels.txt`` in the folder of the first entry of ``data_files``
    (a folder, glob, file, or a URL of one), else the ``labels`` of its ``dataset_info.json``.

    Returns:
        ``(names, where they were read)``, or ``([], None)`` when neither file names any class.
    """
    items = [data_files] if isinstance(data_files, str | os.PathLike) else list(data_files)
    if not items:
        return [], None
    folder = _folder_of(expand_braces(normalize(items[0]))[0])
    if folder is None:
        return [], None
    access = _access(storage_options)
    labels_file = join(folder, LABELS_FILE)
    try:
        names = read_labels(labels_file, storage_options=access)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        names = []
    if names:
        return names, labels_file
    names = list((load_dataset_info(folder, storage_options=access) or {}).get("labels") or [])
    return (names, join(folder, DATASET_INFO_FILE)) if names else ([], None)


def iter_shard(
    path: str | os.PathLike, *, storage_options: Mapping[str, Any] | ShardAccess | None = None
) -> Iterator[tuple[str, str, bytes, dict[str, Any] | None]]:
    """Read a shard (a path or URL) directly (no ``datasets``): yields ``(key, ext, data, meta)`` in file order.

    ``meta`` is ``None`` when a sample has no (or an unreadable) ``.json`` member; a sample without a
    media member yields ``ext=""`` and ``data=b""``. For inspection and tests; training reads shards
    through :func:`bevt.data.streaming.build_stream`.
    """
    current: dict[str, Any] = {}

    def emit() -> tuple[str, str, bytes, dict[str, Any] | None]:
        meta = current.get("json")
        return current["key"], current.get("ext", ""), current.get("data", b""), meta

    f, _ = open_shard(path, _access(storage_options))
    with f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if "." not in base:
                continue
            key, ext = base.split(".", 1)
            if current and current["key"] != key:
                yield emit()
                current = {}
            current["key"] = key
            raw = tar.extractfile(member).read()
            if ext.lower() == "json":
                try:
                    current["json"] = json.loads(raw)
                except ValueError:
                    current["json"] = None
            else:
                current["ext"] = ext.lower()
                current["data"] = raw
        if current:
            yield emit()


# ------------------------------------------------------------------------------------------ tolerant reading

_BLOCK = tarfile.BLOCKSIZE
_SCAN_CHUNK = 1 << 20


@dataclass
class TarSample:
    """One sample read by :func:`iter_tar_samples`.

    ``members`` maps a lower-case extension (a media extension or ``"json"``) to the member's bytes. ``error``
    is set (and ``members`` may be incomplete) when the tar is damaged at this sample; ``key`` is then the
    damaged sample's key when known, else a description of where the damage is.
    """

    key: str
    members: dict[str, bytes]
    error: str | None = None
    reason: str | None = None  # with ``error``: "shard_unavailable" when the storage failed, else None (tar damage)


def _next_header(f: Any, start: int, size: int) -> tuple[int | None, bool]:
    """Scan the file from byte ``start`` for the next valid ustar member header (at a 512-byte boundary).

    Returns ``(its offset or None, whether a non-zero byte lies between start and there)``.
    """
    offset, nonzero = start, False
    while offset < size:
        f.seek(offset)
        chunk = f.read(min(_SCAN_CHUNK, size - offset))
        if not chunk:
            break
        found = chunk.find(b"ustar")
        while found >= 0:
            header = offset + found - 257
            if header >= start and header % _BLOCK == 0:
                f.seek(header)
                try:
                    tarfile.TarInfo.frombuf(f.read(_BLOCK), "utf-8", "surrogateescape")
                except tarfile.HeaderError:
                    pass
                else:
                    before = chunk[: max(header - offset, 0)]
                    return header, nonzero or before.count(0) != len(before)
            found = chunk.find(b"ustar", found + 1)
        nonzero = nonzero or chunk.count(0) != len(chunk)
        if offset + len(chunk) >= size:
            break
        offset += len(chunk) - _BLOCK  # overlap: a magic across the chunk boundary is found next time
    return None, nonzero


def _split_member_name(name: str) -> tuple[str, str] | None:
    base = os.path.basename(name)
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem:
        return None
    return name[: len(name) - len(ext) - 1], ext.lower()


def _storage_reason(err: BaseException) -> str | None:
    return "shard_unavailable" if isinstance(err, ShardUnavailableError) else None


def iter_tar_samples(path: str | os.PathLike, access: ShardAccess | None = None) -> Iterator[TarSample]:
    """Read a shard's samples, surviving damage: yields :class:`TarSample` in file order, never raises on bad data.

    A sample is a run of consecutive members with the same key (the member name without its last extension, so
    a key with dots still groups). Only media members (:data:`MEDIA_EXTENSIONS`) and ``KEY.json`` are kept, as
    raw bytes (parsing them is up to the reader); other members, folders and links are ignored. Damage becomes a
    sample with ``error`` set, and reading goes on where it can:

    * a member cut short (a truncated shard): that sample is reported, nothing follows it;
    * unreadable bytes where a member header should be (a corrupt header, garbage): reported, then reading
      resumes at the next valid member header, so the samples after the damage are not lost; trailing
      unreadable bytes are reported;
    * a sample with two members of the same extension: reported instead of the sample;
    * a file that is not a tar (or cannot be opened): reported as one error.

    ``path`` may be a URL (read through :func:`bevt.data.storage.open_shard` with ``access``: streamed, retried,
    resumed at the byte). A remote shard that stops answering for good becomes one error with
    ``reason="shard_unavailable"`` where it stopped (the samples before it are yielded complete, none twice).

    Samples before the damage are yielded complete.
    """
    location = normalize(path)
    name = basename(location)
    try:
        f, size = open_shard(location, access)
    except OSError as err:
        yield TarSample(f"<shard {name}>", {}, f"cannot open the shard: {err}", _storage_reason(err))
        return
    try:
        if size == 0:
            yield TarSample(f"<shard {name}>", {}, "the shard is an empty file (0 bytes), not a tar")
            return
        position = 0
        while True:
            current: TarSample | None = None
            reading: str | None = None  # key of the member being read
            opened = False
            try:
                f.seek(position)
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    opened = True
                    for member in tar:
                        split = _split_member_name(member.name) if member.isfile() else None
                        if split is None or (split[1] != "json" and split[1] not in MEDIA_EXTENSIONS):
                            continue
                        key, ext = split
                        if current is not None and current.key != key:
                            yield current
                            current = None
                        reading = key
                        data = tar.extractfile(member).read()
                        reading = None
                        if current is None:
                            current = TarSample(key, {})
                        if current.error is not None:
                            continue
                        if ext in current.members:
                            current = TarSample(
                                key, {}, f"the sample has two {ext!r} members ({member.name})"
                            )
                        else:
                            current.members[ext] = data
                    end = tar.offset
                if current is not None:
                    yield current
                    current = None
                if end >= size:
                    return
                f.seek(end)
                garbage = f.read(_BLOCK).count(0) != min(_BLOCK, size - end)
                resume, more = _next_header(f, end + _BLOCK, size)
            except (tarfile.TarError, OSError, EOFError) as err:
                if reading is not None and current is not None and current.key == reading:
                    current = None  # the damaged sample: reported below
                if current is not None:
                    yield current
                if isinstance(err, ShardUnavailableError):
                    where = reading or f"<byte {min(f.tell(), size)} of {name}>"
                    what = "the storage stopped answering here; skipping the rest of that shard"
                elif not opened:
                    where, what = f"<shard {name}>", "not a readable tar file; skipping that shard"
                else:
                    where = reading or f"<byte {min(f.tell(), size)} of {name}>"
                    what = "the shard is truncated or corrupt here; skipping the rest of that shard"
                yield TarSample(where, {}, f"{what} ({type(err).__name__}: {err})", _storage_reason(err))
                return
            where = f"<byte {end} of {name}>"
            if resume is None:
                if garbage or more:
                    yield TarSample(
                        where,
                        {},
                        f"unreadable data from byte {end} to the end ({size} bytes): a truncated or corrupt tar; "
                        "skipping the rest of that shard",
                    )
                return
            if garbage or more:
                yield TarSample(
                    where,
                    {},
                    f"unreadable tar data from byte {end} to {resume} (a corrupt member header?): skipped, "
                    "reading on from the next member",
                )
            position = resume
    finally:
        try:
            f.close()
        except OSError as err:  # e.g. the cache copy could not be renamed into place
            logger.warning("closing shard %s: %s: %s", location, type(err).__name__, err)


# ------------------------------------------------------------------------------------------ label consistency


class LabelMismatchError(ValueError):
    """Two sources (shard sets, their samples, a list of label names) give a class different label ids."""


def iter_sample_metadata(path: str | os.PathLike, access: ShardAccess | None = None) -> Iterator[tuple[str, Any]]:
    """``(key, metadata)`` of each sample of a shard, in file order, reading only the ``KEY.json`` members.

    Media members are skipped by seeking past them (the cost is one tar header per member), so this is cheap even
    on large local shards; a remote shard (a URL, read with ``access``) is streamed through, media included.
    ``metadata`` is the parsed JSON (``None`` if it is not valid JSON). A damaged (or unavailable) tar stops the
    iteration at the damage, with a warning (the training stream reports the damage itself).
    """
    try:
        f, _ = open_shard(path, access)
        with f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                split = _split_member_name(member.name) if member.isfile() else None
                if split is None or split[1] != "json":
                    continue
                raw = tar.extractfile(member).read()
                try:
                    meta = json.loads(raw)
                except ValueError:
                    meta = None
                yield os.path.basename(split[0]), meta
    except (tarfile.TarError, OSError, EOFError) as err:
        logger.warning("stopped reading the sample metadata of %s: %s: %s", path, type(err).__name__, err)


class _LabelMap:
    """Label ids seen so far: name <-> id, each with where it was seen first; a contradiction raises."""

    def __init__(self, hint: str) -> None:
        self.hint = hint
        self.names: dict[int, tuple[str, str]] = {}  # id -> (name, where)
        self.ids: dict[str, tuple[int, str]] = {}  # name -> (id, where)

    def add(self, label: int, name: str, where: str) -> None:
        if name in self.ids and self.ids[name][0] != label:
            other, seen = self.ids[name]
            raise LabelMismatchError(
                f"class {name!r} is label {label} in {where} but label {other} in {seen}; {self.hint}"
            )
        if label in self.names and self.names[label][0] != name:
            other, seen = self.names[label]
            raise LabelMismatchError(
                f"label {label} is {name!r} in {where} but {other!r} in {seen}; {self.hint}"
            )
        self.names.setdefault(label, (name, where))
        self.ids.setdefault(name, (label, where))


def check_label_consistency(
    *shard_sets: str | os.PathLike | Sequence[str | os.PathLike],
    label_names: Sequence[str] | str | os.PathLike | None = None,
    scan_samples: bool = True,
    storage_options: Mapping[str, Any] | ShardAccess | None = None,
) -> dict[int, str]:
    """Check that shard sets (e.g. train and validation) and a list of label names agree on every label id.

    Each shard set (a folder, glob, ``.tar`` or a list of them, as :func:`list_shards` takes) contributes the class
    names of its folders' ``dataset_info.json`` (or ``labels.txt``) and, with ``scan_samples``, the
    ``label`` / ``label_name`` of each of its samples (read with :func:`iter_sample_metadata`: one pass over the tar
    headers, no media). ``label_names`` (the model's classes in id order, or a file with one per line) is the
    reference: every class named by the shards must be one of them, with the same id. Samples without a
    ``label_name`` are only checked to have a label id in range of ``label_names``; samples without a label are
    not compared. Shard sets and ``label_names`` may be URLs
    (``storage_options`` go to their filesystem); scanning the samples of remote shards reads them whole (pass
    ``scan_samples=False`` to compare only the ``dataset_info.json`` / ``labels.txt`` next to them).

    Returns:
        ``{label id: class name}``: ``label_names`` when given, else everything the shard sets name (empty for
        shards with integer labels only).

    Raises:
        LabelMismatchError: a class with two ids or an id with two names (between the sources, or inside one shard
            set, e.g. stale shards of another build left in its folder), or a class that ``label_names`` lacks; the
            message names the class, both ids and where each was seen.
        FileNotFoundError / ValueError: a shard set that does not resolve (see :func:`list_shards`).
    """
    hint = "write every split with the same class list (make_shards --labels FILE)"
    access = _access(storage_options)
    seen = _LabelMap(hint)
    num_names: int | None = None
    if label_names is not None:
        if isinstance(label_names, str | os.PathLike):
            names_where = f"the label names {normalize(label_names)}"
            names = read_labels(label_names, storage_options=access)
        else:
            names_where, names = "the label names", list(label_names)
        for i, name in enumerate(names):
            seen.add(i, name, f"{names_where} (line {i + 1})")
        num_names = len(names)

    def add(label: int, name: str, where: str) -> None:
        if num_names is not None:
            if name not in seen.ids:
                raise LabelMismatchError(
                    f"class {name!r} of {where} is not among the {num_names} label names ({names_where}); {hint}"
                )
            if not 0 <= label < num_names:
                raise LabelMismatchError(
                    f"label {label} of {where} is outside the {num_names} label names ({names_where}); {hint}"
                )
        seen.add(label, name, where)

    for shard_set in shard_sets:
        files = list_shards(shard_set, storage_options=access)
        for folder in sorted({f for f in map(parent, files) if f is not None}):
            info = load_dataset_info(folder, storage_options=access) or {}
            names, source = info.get("labels"), join(folder, DATASET_INFO_FILE)
            if names is None:
                try:
                    names = read_labels(join(folder, LABELS_FILE), storage_options=access)
                    source = join(folder, LABELS_FILE)
                except (FileNotFoundError, IsADirectoryError):
                    names = None
            for i, name in enumerate(names or ()):
                add(i, name, source)
        if scan_samples:
            for path in files:
                pairs: set[tuple[int, str]] = set()
                for key, meta in iter_sample_metadata(path, access):
                    if not isinstance(meta, dict):
                        continue
                    label, name = meta.get("label"), meta.get("label_name")
                    if isinstance(label, bool) or not isinstance(label, int):
                        continue
                    if not isinstance(name, str):  # an id without a name: only its range can be checked
                        if num_names is not None and not 0 <= label < num_names:
                            raise LabelMismatchError(
                                f"label {label} of sample {key!r} of {path} is outside the {num_names} label names "
                                f"({names_where}); {hint}"
                            )
                        continue
                    if (label, name) not in pairs:
                        pairs.add((label, name))
                        add(label, name, f"sample {key!r} of {path}")
    return {i: name for i, (name, _) in sorted(seen.names.items())}
