"""Build WebDataset shards from an annotation list or a class-folder tree (``python -m bevt.data.make_shards``).

Inputs (``--input``; paths are relative to ``--root``):

* mmaction-style text list: one ``relative/path label`` per line (``label`` an int index or a class name),
  or just ``relative/path`` for unlabeled data; blank lines and ``#`` comments are ignored.
* CSV with a header: a path column (``path``, ``video``, ``filename``, ``file`` or ``image``, or
  ``--path-column``) and optionally a label column (``label``, ``label_id``, ``class`` or ``label_name``, or
  ``--label-column``; ints are indices, other values class names). Other columns are copied into each sample's
  metadata. A CSV without a label column gives unlabeled samples, with a warning naming its columns (and is an
  error with ``--labels``).
* no ``--input`` (or a folder): the ImageNet layout ``ROOT/<class>/<file>``; classes are the sorted folder
  names (files directly under ``ROOT`` are unlabeled).

Class names come from ``--labels FILE`` (one per line, index order) or, when the list names classes, their
sorted set; that numbering depends on which classes the list holds (a validation list without ``beta`` numbers
``gamma`` 1, not 2), so it is logged as a warning and recorded (``labels_origin`` in ``dataset_info.json``, the
names in ``labels.txt``): pass the same ``--labels`` for every split, and check splits with
:func:`bevt.data.shards.check_label_consistency`. A file listed twice is written once (the repeats are skipped
as ``duplicate``); listed twice with different labels, it is an error. Unreadable inputs (missing, empty, wrong
kind, undecodable with ``--verify``, failed re-encode) are skipped, counted by reason in ``dataset_info.json``
and listed (the first 100).

The kind (``--kind auto``) comes from the extensions; a list or tree that mixes images and videos is refused
with the counts of each (pass ``--kind image`` or ``--kind video`` to keep one kind and skip the others as
``wrong_kind``). The output folder must be empty or new: ``--overwrite`` replaces the shards of the same
``--prefix``, ``dataset_info.json`` and ``labels.txt`` (it says what it removes, keeps other files, and refuses a
folder holding other ``.tar`` files, which training would read together with the new shards). ``--num-shards N``
writes N shards whose sample counts differ by at most one, also when inputs are skipped.

``--reencode`` rescales each video to ``--short-side`` (only ever down) and re-encodes it as H.264 with a
keyframe every ``--gop`` frames, no B-frames and ``tune=fastdecode``. Decoding the sampled window is the
dominant data cost in training, and a short GOP bounds how many frames have to be decoded to reach each
sampled one: see ``BENCHMARKS.md`` for the measured speed-up.

Example::

    python -m bevt.data.make_shards --input k400/train.txt --root k400/videos --output-dir shards/k400 \\
        --labels k400/labels.txt --shard-size-mb 256 --reencode --short-side 256 --num-workers 16
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import multiprocessing
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from bevt.cli import CLIArgumentParser
from bevt.data.shards import (
    DATASET_INFO_FILE,
    LABELS_FILE,
    MEDIA_EXTENSIONS,
    ShardInfo,
    ShardWriter,
    iter_shard,
    load_dataset_info,
    make_key,
    media_kind,
    read_labels,
    write_dataset_info,
)
from bevt.data.storage import RemoteFolder, ShardAccess, is_url, join, normalize
from bevt.video_decoding import reformat_frame

__all__ = ["Entry", "main", "make_shards", "parse_annotations", "reencode_video", "scan_folder"]

_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-\d{5,}\.tar(\.tmp)?$")  # ShardWriter names: {prefix}-{index:05d}.tar

logger = logging.getLogger(__name__)

_PATH_COLUMNS = ("path", "video", "filename", "file", "image")
_LABEL_COLUMNS = ("label", "label_id", "class", "label_name")
_MAX_SKIPPED_EXAMPLES = 100


@dataclass
class Entry:
    """One input file: its path relative to the root, label index / name, extra metadata, and where it was listed
    (``"list.txt:12"``, for messages)."""

    path: str
    label: int | None = None
    label_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    where: str | None = None


def _int_or_none(token: str) -> int | None:
    try:
        return int(token)
    except ValueError:
        return None


def _resolve_labels(entries: list[Entry], labels: Sequence[str] | None, where: str) -> list[str] | None:
    """Fill in label indices from names (and names from indices); returns the class names."""
    names = list(labels) if labels is not None else None
    if names is None:
        named = sorted({e.label_name for e in entries if e.label_name is not None and e.label is None})
        if named:
            if any(e.label is not None for e in entries):
                raise ValueError(f"{where}: mixes integer labels and class names; pass --labels to map them")
            names = named
    if names is not None:
        index = {name: i for i, name in enumerate(names)}
        if len(index) != len(names):
            raise ValueError(f"duplicate class names in the label list ({len(names) - len(index)} repeats)")
        for e in entries:
            if e.label is None and e.label_name is not None:
                if e.label_name not in index:
                    raise ValueError(f"{where}: class {e.label_name!r} of {e.path} is not in the label list")
                e.label = index[e.label_name]
            elif e.label is not None:
                if not 0 <= e.label < len(names):
                    raise ValueError(
                        f"{where}: label {e.label} of {e.path} is outside [0, {len(names)}) of the label list"
                    )
                e.label_name = names[e.label]
    return names


def parse_annotations(
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    *,
    path_column: str | None = None,
    label_column: str | None = None,
) -> tuple[list[Entry], list[str] | None]:
    """Read an annotation list (text or ``.csv``, see the module docstring).

    Args:
        path: the list.
        labels: class names in index order (``--labels``), or ``None``.
        path_column, label_column: CSV column names (default: the first of the usual names found).

    Returns:
        The entries (labels resolved to indices and names where known) and the class names (or ``None``).

    Raises:
        ValueError: a malformed line / missing column / unknown class, naming the file and line; a CSV without a
            label column when ``labels`` is given.
    """
    p = Path(path)
    entries: list[Entry] = []
    if p.suffix.lower() == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            for flag, given in (("--path-column", path_column), ("--label-column", label_column)):
                if given is not None and given not in columns:
                    raise ValueError(f"{p}: {flag} {given!r} is not one of its columns {columns}")
            path_col = path_column or next((c for c in _PATH_COLUMNS if c in columns), None)
            if path_col is None:
                raise ValueError(
                    f"{p}: CSV needs a path column, one of {list(_PATH_COLUMNS)} (or --path-column); has {columns}"
                )
            label_col = label_column or next((c for c in _LABEL_COLUMNS if c in columns), None)
            if label_col is None:
                message = (
                    f"{p}: no label column (one of {', '.join(_LABEL_COLUMNS)}) among its columns {columns}"
                )
                if labels is not None:
                    raise ValueError(f"{message}, but --labels was given; name the column with --label-column")
                logger.warning(
                    "%s: every sample is unlabeled (fine for pretraining); name the label column with --label-column",
                    message,
                )
            for lineno, row in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                rel = row.pop(path_col)
                if not rel:
                    raise ValueError(f"{p}:{lineno}: empty path")
                entry = Entry(rel, where=f"{p}:{lineno}")
                if label_col is not None:
                    value = row.pop(label_col)
                    if value:
                        idx = _int_or_none(value)
                        if idx is None:
                            entry.label_name = value
                        else:
                            entry.label = idx
                entry.extra = {k: v for k, v in row.items() if v != ""}
                entries.append(entry)
    else:
        with p.open(encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                where = f"{p}:{lineno}"
                if len(parts) == 1:
                    entries.append(Entry(parts[0], where=where))
                elif len(parts) == 2:
                    idx = _int_or_none(parts[1])
                    entries.append(Entry(parts[0], idx, None if idx is not None else parts[1], where=where))
                else:
                    raise ValueError(
                        f"{p}:{lineno}: expected 'relative/path label' (2 fields), got {len(parts)} fields "
                        f"in {line!r}; paths with spaces need a CSV list"
                    )
    if not entries:
        raise ValueError(f"{p}: the annotation list is empty")
    names = _resolve_labels(entries, labels, str(p))
    return entries, names


def scan_folder(
    root: str | os.PathLike, labels: Sequence[str] | None = None, extensions: Sequence[str] = MEDIA_EXTENSIONS
) -> tuple[list[Entry], list[str] | None]:
    """Entries of an ImageNet-style tree ``root/<class>/<file>`` (classes: sorted folder names).

    Files directly under ``root`` are unlabeled; deeper files belong to their top-level folder's class.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"root folder not found: {base}")
    exts = {e.lower() for e in extensions}
    entries: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(base)
        for name in sorted(filenames):
            if name.rsplit(".", 1)[-1].lower() not in exts or "." not in name:
                continue
            rel = (rel_dir / name).as_posix()
            cls = rel_dir.parts[0] if rel_dir.parts else None
            entries.append(Entry(rel, None, cls))
    if not entries:
        raise ValueError(f"no media files ({sorted(exts)}) under {base}")
    if labels is None:
        classes = sorted({e.label_name for e in entries if e.label_name is not None})
        labels = classes or None
    names = _resolve_labels(entries, labels, str(base))
    return entries, names


# ------------------------------------------------------------------------------------------ re-encoding


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def reencode_video(
    source: bytes | str | os.PathLike,
    *,
    short_side: int | None = 256,
    gop: int = 16,
    crf: int = 23,
    preset: str = "veryfast",
    fast_decode: bool = True,
    threads: int = 0,
) -> tuple[bytes, int]:
    """Re-encode a video as H.264 MP4 for fast training reads (PyAV / libx264; audio is dropped).

    Args:
        source: the encoded video (bytes) or its path.
        short_side: scale so the shorter side is this many pixels, keeping the aspect ratio (never
            upscales; sizes are rounded to even numbers as yuv420p requires). ``None`` keeps the size.
        gop: frames between keyframes (fixed: no scene-cut keyframes); the cost of reaching a sampled
            frame is at most ``gop`` decoded frames.
        crf, preset: x264 quality / speed.
        fast_decode: x264 ``tune=fastdecode`` (no CABAC, no deblocking: faster to decode, a bit larger).
        threads: encoder threads (0 = library default; use 1 when running one encode per core).

    Returns:
        ``(mp4_bytes, num_frames)``; every decoded input frame is kept, at the input's average rate.

    Raises:
        ValueError: no video stream or no decodable frame in the input.
    """
    import av

    if gop < 1:
        raise ValueError(f"gop must be >= 1, got {gop}")
    src = io.BytesIO(source) if isinstance(source, bytes | bytearray) else os.fspath(source)
    out_buf = io.BytesIO()
    count = 0
    with av.open(src, mode="r") as inp:
        if not inp.streams.video:
            raise ValueError("no video stream in the input")
        ist = inp.streams.video[0]
        ist.thread_type = "AUTO"
        rate = ist.average_rate or ist.guessed_rate or Fraction(30)
        rate = Fraction(rate).limit_denominator(1001 * 1000)
        with av.open(out_buf, mode="w", format="mp4") as out:
            ost = None
            size = (0, 0)
            for frame in inp.decode(ist):
                if ost is None:
                    w, h = frame.width, frame.height
                    if short_side is not None and min(w, h) > short_side:
                        scale = short_side / min(w, h)
                        size = (_even(w * scale), _even(h * scale))
                    else:
                        size = (_even(w), _even(h)) if (w % 2 or h % 2) else (w, h)
                    ost = out.add_stream("libx264", rate=rate)
                    ost.width, ost.height = size
                    ost.pix_fmt = "yuv420p"
                    ost.codec_context.gop_size = gop
                    if threads:
                        ost.codec_context.thread_count = threads
                    params = f"keyint={gop}:scenecut=0:bframes=0"
                    ost.options = {"crf": str(crf), "preset": preset, "x264-params": params}
                    if fast_decode:
                        ost.options = {**ost.options, "tune": "fastdecode"}
                scaled = reformat_frame(frame, width=size[0], height=size[1], format="yuv420p", interpolation="AREA")
                scaled.pts = count
                scaled.time_base = 1 / rate
                for packet in ost.encode(scaled):
                    out.mux(packet)
                count += 1
            if ost is None:
                raise ValueError("the input has no decodable video frame")
            for packet in ost.encode(None):
                out.mux(packet)
    return out_buf.getvalue(), count


# ------------------------------------------------------------------------------------------ building


@dataclass
class _Options:
    root: str
    kind: str
    verify: bool
    reencode: dict[str, Any] | None


def _extension(rel: str) -> str:
    return rel.rsplit(".", 1)[-1].lower() if "." in os.path.basename(rel) else ""


def _quick_check(rel: str, opt: _Options) -> tuple[str, str] | None:
    """The skip reasons found without reading the file (extension, kind, missing, empty), or ``None``."""
    ext = _extension(rel)
    if ext not in MEDIA_EXTENSIONS:
        return "unsupported_extension", f"extension {ext!r} not in {list(MEDIA_EXTENSIONS)}"
    if media_kind(ext) != opt.kind:
        return "wrong_kind", f"a {media_kind(ext)} file in a {opt.kind} dataset"
    path = os.path.join(opt.root, rel)
    if not os.path.isfile(path):
        return "missing", f"file not found: {path}"
    if os.path.getsize(path) == 0:
        return "empty", "the file is empty (0 bytes)"
    return None


def _prepare(task: tuple[int, str, _Options]) -> tuple[int, str | None, str, bytes, dict[str, Any]]:
    """Load (and verify / re-encode) one file: ``(index, None, ext, data, extra)`` or a skip reason."""
    index, rel, opt = task
    problem = _quick_check(rel, opt)
    if problem is not None:
        return index, problem[0], problem[1], b"", {}
    ext = _extension(rel)
    try:
        with open(os.path.join(opt.root, rel), "rb") as f:
            data = f.read()
    except OSError as err:
        return index, "unreadable", f"{type(err).__name__}: {err}", b"", {}
    if not data:
        return index, "empty", "the file is empty (0 bytes)", b"", {}
    extra: dict[str, Any] = {}
    if opt.kind == "video" and opt.reencode is not None:
        try:
            data, count = reencode_video(data, **opt.reencode)
        except Exception as err:  # noqa: BLE001 - any failure just skips this file
            return index, "reencode_failed", f"{type(err).__name__}: {err}", b"", {}
        ext = "mp4"
        extra["num_frames"] = count
    if opt.verify:
        from bevt.video_decoding import VideoReader, decode_image

        try:
            if opt.kind == "video":
                with VideoReader(data) as reader:
                    reader.get_batch([0, reader.num_frames - 1])
                    extra["num_frames"] = reader.num_frames
            else:
                decode_image(data)
        except Exception as err:  # noqa: BLE001
            return index, "undecodable", f"{type(err).__name__}: {err}", b"", {}
    return index, None, ext, data, extra


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _kind_counts(entries: Sequence[Entry]) -> dict[str, Counter[str]]:
    """Extensions of the media inputs per kind: ``{"image": Counter({"jpg": 10}), "video": ...}``."""
    counts: dict[str, Counter[str]] = {"image": Counter(), "video": Counter()}
    for e in entries:
        ext = _extension(e.path)
        if ext in MEDIA_EXTENSIONS:
            counts[media_kind(ext)][ext] += 1
    return counts


def _describe(counts: Counter[str], kind: str) -> str:
    return f"{_plural(sum(counts.values()), kind)} ({', '.join(sorted(counts))})"


def _choose_kind(entries: Sequence[Entry], kind: str | None) -> str:
    """The dataset kind: ``kind`` if given (refused when no input has it), else the one kind of the inputs' media
    extensions; a mix of images and videos is refused with the counts."""
    counts = _kind_counts(entries)
    if kind is not None:
        if kind in counts and not counts[kind]:
            found = [_describe(c, k) for k, c in counts.items() if c]
            raise ValueError(
                f"--kind {kind}: none of the {len(entries)} inputs is {'an' if kind == 'image' else 'a'} {kind}"
                + (f": {' and '.join(found)}" if found else "")
            )
        return kind
    if counts["image"] and counts["video"]:
        raise ValueError(
            f"--kind auto: the inputs mix {_describe(counts['image'], 'image')} and "
            f"{_describe(counts['video'], 'video')}; pass --kind image or --kind video to write one kind (the "
            "others are skipped as wrong_kind), or split the inputs"
        )
    return "image" if counts["image"] else "video"


def _drop_duplicates(entries: Sequence[Entry]) -> tuple[list[int], list[tuple[int, str]]]:
    """Indices of the entries to write (the first of each file) and ``(index, message)`` of the repeats.

    Raises:
        ValueError: a file listed twice with different labels.
    """
    first: dict[str, int] = {}
    keep: list[int] = []
    repeats: list[tuple[int, str]] = []
    for i, e in enumerate(entries):
        path = os.path.normpath(e.path)
        if path not in first:
            first[path] = i
            keep.append(i)
            continue
        other = entries[first[path]]
        where = _where_pair(other.where, e.where)
        if (other.label, other.label_name) != (e.label, e.label_name):
            raise ValueError(
                f"{e.path} is listed twice with different labels ({where}: "
                f"{_label_text(other)} vs {_label_text(e)})"
            )
        repeats.append((i, f"same file as {other.where or 'an earlier entry'}"))
    return keep, repeats


def _where_pair(a: str | None, b: str | None) -> str:
    """``"lines 1 and 3 of list.txt"`` for ``list.txt:1`` and ``list.txt:3``."""
    if a and b and a.rpartition(":")[0] == b.rpartition(":")[0]:
        return f"lines {a.rpartition(':')[2]} and {b.rpartition(':')[2]} of {a.rpartition(':')[0]}"
    return f"{a or '?'} and {b or '?'}"


def _label_text(e: Entry) -> str:
    if e.label_name is not None:
        return f"label {e.label_name!r}" + (f" ({e.label})" if e.label is not None else "")
    return f"label {e.label}"


def _prepare_output_dir(
    output_dir: str | os.PathLike, prefix: str, overwrite: bool, access: ShardAccess | None = None
) -> None:
    """Refuse an output folder that cannot be written or already holds files (unless ``overwrite``: then remove
    the shards of ``prefix``, ``dataset_info.json`` and ``labels.txt``, saying so; other ``.tar`` files are refused,
    anything else is kept). ``output_dir`` may be a URL (the same rules, on the remote folder's listing)."""
    if is_url(output_dir):
        folder = RemoteFolder(normalize(output_dir), access)
        out: str | Path = folder.url
        present = folder.names()
        remove: Any = folder.remove
    else:
        out = Path(output_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output-dir {out} exists and is not a folder")
        if not out.exists():
            try:
                out.mkdir(parents=True)
            except OSError as err:
                raise ValueError(
                    f"--output-dir {out}: cannot create the folder ({type(err).__name__}: {err})"
                ) from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"--output-dir {out} is not writable")
        present = sorted(p.name for p in out.iterdir())

        def remove(names: list[str]) -> None:
            for name in names:
                (out / name).unlink()

    if not present:
        return
    ours = [
        name
        for name in present
        if name in (DATASET_INFO_FILE, LABELS_FILE)
        or ((m := _SHARD_NAME.match(name)) is not None and m["prefix"] == prefix)
    ]
    shards = [name for name in ours if name.endswith(".tar")]
    foreign_tars = [name for name in present if name not in ours and name.endswith((".tar", ".tar.tmp"))]
    others = [name for name in present if name not in ours and name not in foreign_tars]
    summary = ", ".join(
        [_plural(len(shards), "shard")] * bool(shards)
        + [name for name in ours if not name.endswith((".tar", ".tar.tmp"))]
        + [_plural(len(foreign_tars), "other .tar file")] * bool(foreign_tars)
        + [_plural(len(others), "other file")] * bool(others)
    )
    if not overwrite:
        raise ValueError(
            f"--output-dir {out} is not empty ({summary}): old shards would be mixed with the new ones in training; "
            "pass --overwrite to replace them, or choose another folder"
        )
    if foreign_tars:
        raise ValueError(
            f"--output-dir {out} holds .tar files that --overwrite does not replace ({', '.join(foreign_tars[:5])}"
            f"{', ...' if len(foreign_tars) > 5 else ''}; they are not {prefix}-NNNNN.tar): they would be mixed with "
            "the new shards in training; move them or choose another folder"
        )
    removed = []
    if shards:
        removed.append(f"{_plural(len(shards), 'shard')} ({shards[0]}{' .. ' + shards[-1] if len(shards) > 1 else ''})")
    removed += [name for name in ours if not name.endswith(".tar")]
    logger.warning(
        "--overwrite: removing %s from %s%s",
        ", ".join(removed),
        out,
        f" (keeping {_plural(len(others), 'other file')}: {', '.join(others[:5])})" if others else "",
    )
    remove(ours)


def _rebalance(
    output_dir: str | os.PathLike,
    prefix: str,
    shards: list[ShardInfo],
    sizes: list[int],
    access: ShardAccess | None = None,
) -> list[ShardInfo]:
    """Rewrite ``shards`` so that they hold ``sizes`` samples (same order, same names); returns their new infos.

    The new shards are written to a temporary folder; new shard ``k`` replaces the old one of its name (a rename,
    or an upload to a URL ``output_dir``) as soon as the old shards ``0..k`` have been read, so no old shard is
    overwritten before it is read and at most a few shards wait locally. Old shards beyond the new count are
    removed at the end.
    """
    remote = RemoteFolder(normalize(output_dir), access) if is_url(output_dir) else None
    local_out = None if remote is not None else Path(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-rebalance-", dir=local_out))
    try:
        boundaries, total = set(), 0
        for size in sizes[:-1]:
            total += size
            boundaries.add(total)
        writer = ShardWriter(tmp, prefix=prefix, shard_size_mb=float("inf"))
        published = 0

        def publish(upto: int) -> None:
            nonlocal published
            while published < min(upto, len(writer.shards)):
                name = writer.shards[published].file
                if remote is not None:
                    remote.put(tmp / name, name)
                    (tmp / name).unlink()
                else:
                    os.replace(tmp / name, local_out / name)
                published += 1

        with writer:
            position = 0
            for index, info in enumerate(shards):
                for key, ext, data, meta in iter_shard(join(str(output_dir), info.file), storage_options=access):
                    if position in boundaries:
                        writer.start_new_shard()
                    writer.write(key, ext, data, meta)
                    position += 1
                publish(index + 1)  # old shards 0..index are read: the new ones of those names may replace them
        publish(len(writer.shards))
        new_names = {info.file for info in writer.shards}
        stale = [info.file for info in shards if info.file not in new_names]
        if remote is not None:
            remote.remove(stale)
        else:
            for name in stale:
                (local_out / name).unlink()
        return writer.shards
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_shards(
    entries: Sequence[Entry],
    root: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    labels_origin: str | None = None,
    kind: str | None = None,
    shard_size_mb: float = 256.0,
    max_samples_per_shard: int | None = None,
    num_shards: int | None = None,
    prefix: str = "shard",
    shuffle: bool = True,
    seed: int = 0,
    verify: bool = False,
    reencode: dict[str, Any] | None = None,
    num_workers: int = 1,
    log_every: int = 1000,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
) -> dict[str, Any]:
    """Write the entries' files into shards under ``output_dir``; returns the ``dataset_info.json`` content.

    Args:
        entries: from :func:`parse_annotations` / :func:`scan_folder`.
        root: folder the entry paths are relative to.
        labels: class names (index order), written to ``labels.txt``.
        labels_origin: where ``labels`` come from (``"--labels FILE"``, ``"inferred: ..."``), recorded in
            ``dataset_info.json``.
        kind: ``"video"`` or ``"image"`` (default: from the extensions; a mix of both is refused).
        shard_size_mb, max_samples_per_shard, prefix: see :class:`bevt.data.shards.ShardWriter`.
        num_shards: exactly this many shards whose sample counts differ by at most one (skipped inputs
            included: files that fail late, when verified or re-encoded, make the shards be rewritten once at the
            end) instead of a size cap.
        shuffle, seed: write the samples in a seeded random order (keys keep the list position, so they
            do not depend on the order). Shuffled shards matter: streaming only shuffles within a buffer.
        verify: decode each file (first and last frame of videos) and skip those that fail.
        reencode: keyword arguments of :func:`reencode_video` to re-encode every video, or ``None``.
        num_workers: processes that read / verify / re-encode in parallel.
        log_every: progress log interval in samples.
        overwrite: replace the shards of ``prefix`` (and ``dataset_info.json`` / ``labels.txt``) already in
            ``output_dir``; without it, a non-empty ``output_dir`` is refused.
        storage_options: filesystem options of a URL ``output_dir`` (``hf://datasets/...``, ``s3://``, ``gs://``,
            ``az://``, ...; see :mod:`bevt.data.storage`): each finished shard is uploaded whole (written locally
            first), then ``labels.txt`` and ``dataset_info.json``.
        dataset_name: the dataset these shards hold (a Hub dataset id such as ``kinetics400``), recorded as
            ``dataset_name`` in ``dataset_info.json``: a fine-tuning run without ``--dataset_name`` names it in its
            model card. ``None``: nothing is recorded and no card claims a dataset.

    Raises:
        ValueError: bad arguments, a mixed or wrong kind, a file listed twice with different labels, an output
            folder that is not empty (without ``overwrite``) or cannot be written.
        RuntimeError: every input was skipped.
    """
    if not entries:
        raise ValueError("no entries to write")
    if kind not in (None, "video", "image"):
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    kind = _choose_kind(entries, kind)
    if reencode is not None and kind != "video":
        raise ValueError("--reencode applies to videos only")
    keep, repeats = _drop_duplicates(entries)
    opt = _Options(os.fspath(root), kind, verify, reencode)
    skipped: Counter[str] = Counter()
    skipped_examples: list[dict[str, Any]] = []

    def skip(entry: Entry, reason: str, message: str) -> None:
        skipped[reason] += 1
        logger.warning("skipping %s: %s (%s)", entry.path, reason, message)
        if len(skipped_examples) < _MAX_SKIPPED_EXAMPLES:
            skipped_examples.append({"path": entry.path, "reason": reason, "message": message})

    for index, message in repeats:
        skip(entries[index], "duplicate", message)
    if num_shards is not None:  # plan equal shards on the inputs that can be written (checked without reading)
        candidates = []
        for i in keep:
            problem = _quick_check(entries[i].path, opt)
            if problem is None:
                candidates.append(i)
            else:
                skip(entries[i], *problem)
        keep = candidates
        n = len(keep)
        if not 1 <= num_shards <= max(n, 1):
            raise ValueError(
                f"num_shards={num_shards} must be in [1, {n}]: {n} of the {len(entries)} inputs can be written"
            )
        shard_size_mb = float("inf")
    access = ShardAccess(storage_options=storage_options)
    _prepare_output_dir(output_dir, prefix, overwrite, access)
    order = list(keep)
    if shuffle:
        random.Random(seed).shuffle(order)
    sizes: list[int] = []
    boundaries: set[int] = set()
    if num_shards is not None:
        sizes = [len(order) // num_shards + (1 if i < len(order) % num_shards else 0) for i in range(num_shards)]
        boundaries = {sum(sizes[: i + 1]) for i in range(num_shards - 1)}
    tasks = [(i, entries[i].path, opt) for i in order]
    writer = ShardWriter(
        output_dir,
        prefix=prefix,
        shard_size_mb=shard_size_mb,
        max_samples_per_shard=max_samples_per_shard,
        storage_options=access,
    )
    start = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(num_workers) if num_workers > 1 else None
    try:
        results = pool.imap(_prepare, tasks, chunksize=1) if pool is not None else map(_prepare, tasks)
        with writer:
            for position, (index, reason, ext_or_msg, data, extra) in enumerate(results):
                if writer.num_samples in boundaries:
                    writer.start_new_shard()
                entry = entries[index]
                if reason is not None:
                    skip(entry, reason, ext_or_msg)
                    continue
                meta = {**entry.extra, **extra, "label": entry.label, "label_name": entry.label_name}
                meta["path"] = entry.path
                writer.write(make_key(index, entry.path), ext_or_msg, data, meta)
                if log_every and (position + 1) % log_every == 0:
                    rate = (position + 1) / (time.perf_counter() - start)
                    logger.info("%d / %d inputs (%.1f/s)", position + 1, len(tasks), rate)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if writer.num_samples == 0:
        raise RuntimeError(
            f"no sample could be written: all {len(entries)} inputs were skipped ({dict(skipped)}); "
            f"first problems: {skipped_examples[:3]}"
        )
    shards = writer.shards
    if num_shards is not None:
        n = writer.num_samples
        wanted = [n // num_shards + (1 if i < n % num_shards else 0) for i in range(min(num_shards, n))]
        if [s.num_samples for s in shards] != wanted:
            logger.warning(
                "%d inputs failed after the shards were planned: rewriting the %d shards to equal counts %s",
                len(order) - n,
                len(shards),
                wanted if len(wanted) <= 8 else f"{wanted[:4]} ...",
            )
            shards = _rebalance(output_dir, prefix, shards, wanted, access)
    extra_info = {
        **({"dataset_name": dataset_name} if dataset_name else {}),
        "labels_origin": labels_origin,
        "reencode": reencode,
        "shuffle_seed": seed if shuffle else None,
        "num_inputs": len(entries),
        "num_skipped": sum(skipped.values()),
    }
    write_dataset_info(
        output_dir,
        shards,
        kind=kind,
        labels=labels,
        label_counts=writer.label_counts,
        skipped=dict(skipped),
        skipped_examples=skipped_examples,
        extra=extra_info,
        storage_options=access,
    )
    info = load_dataset_info(output_dir, storage_options=access)
    if info is None:  # pragma: no cover - it was just written
        raise OSError(f"{DATASET_INFO_FILE} of {output_dir} cannot be read back")
    return info


# ------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = CLIArgumentParser(
        prog="python -m bevt.data.make_shards",
        description="Write WebDataset .tar shards (media + json per sample) for bevt training.",
    )
    p.add_argument(
        "--input", help="annotation list (text 'path label' lines, or .csv); omit for ROOT/<class>/<file>"
    )
    p.add_argument("--root", required=True, help="folder the listed paths are relative to")
    p.add_argument(
        "--output-dir",
        required=True,
        help="where to write the shards and dataset_info.json: a folder, or a URL (hf://datasets/ORG/NAME/train, "
        "s3://bucket/k400/train, gs://..., az://...; each finished shard is uploaded whole)",
    )
    p.add_argument(
        "--label-names",
        "--labels",
        dest="labels",
        metavar="FILE",
        help="class names, one per line in index order (e.g. kinetics400_labels.txt); give the same file for every "
        "split (without it, the classes found are numbered in sorted order, which differs between lists)",
    )
    p.add_argument("--path-column", help="CSV --input: the column holding the paths (default: path, video, ...)")
    p.add_argument("--label-column", help="CSV --input: the column holding the labels (default: label, class, ...)")
    p.add_argument(
        "--kind",
        choices=("auto", "video", "image"),
        default="auto",
        help="auto: from the extensions (a mix of images and videos is refused); video / image: keep that kind, "
        "skip the others",
    )
    p.add_argument(
        "--overwrite",
        "--overwrite-output-dir",
        action="store_true",
        help="replace the shards of --prefix, dataset_info.json and labels.txt already in --output-dir (without it, "
        "a non-empty --output-dir is refused)",
    )
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="size cap per shard (MiB)")
    p.add_argument("--max-samples-per-shard", type=int, default=None)
    p.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="exactly N shards of equal sample counts (overrides the size cap); use a multiple of "
        "world_size x dataloader workers",
    )
    p.add_argument("--prefix", default="shard", help="shard file name prefix (e.g. train / val)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the list order (default: seeded shuffle)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--verify", action="store_true", help="decode every file and skip those that fail")
    p.add_argument("--reencode", action="store_true", help="rescale + re-encode videos for fast decoding")
    p.add_argument("--short-side", type=int, default=256, help="--reencode: short side in pixels (0: keep)")
    p.add_argument("--gop", type=int, default=16, help="--reencode: frames between keyframes")
    p.add_argument("--crf", type=int, default=23, help="--reencode: x264 CRF quality")
    p.add_argument("--preset", default="veryfast", help="--reencode: x264 preset")
    p.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="parallel processes (0: all cores with --reencode/--verify, else 1)",
    )
    p.add_argument(
        "--dataset-name",
        help="the dataset the shards hold, as a Hub dataset id (e.g. kinetics400), recorded in dataset_info.json: "
        "run_finetuning.py names it in the model card when --dataset_name is not given (default: none recorded, "
        "no dataset claimed)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad flag values before any work (argparse's usage error: exit status 2, no traceback)."""
    if not args.shard_size_mb > 0:
        parser.error(f"--shard-size-mb must be > 0, got {args.shard_size_mb}")
    for flag, value in (
        ("--max-samples-per-shard", args.max_samples_per_shard),
        ("--num-shards", args.num_shards),
        ("--gop", args.gop),
    ):
        if value is not None and value < 1:
            parser.error(f"{flag} must be a positive integer, got {value}")
    for flag, value in (("--short-side", args.short_side), ("--num-workers", args.num_workers)):
        if value < 0:
            parser.error(f"{flag} must be >= 0, got {value}")
    if not 0 <= args.crf <= 51:
        parser.error(f"--crf must be an x264 quality in [0, 51], got {args.crf}")
    if args.preset not in X264_PRESETS:
        parser.error(
            f"--preset must be an x264 preset, one of {', '.join(X264_PRESETS)}; got {args.preset!r}"
        )
    if not args.prefix or "/" in args.prefix or "." in args.prefix:
        parser.error(f"--prefix must be a non-empty file name prefix without '/' or '.', got {args.prefix!r}")
    if args.log_level.upper() not in LOG_LEVELS:
        parser.error(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    for flag, path in (("--labels", args.labels), ("--input", args.input)):
        if path is not None and not os.path.exists(path):
            parser.error(f"{flag}: file not found: {path}")
    if not os.path.isdir(args.root):
        parser.error(f"--root must be an existing folder, got {args.root}")
    is_csv = args.input is not None and args.input.lower().endswith(".csv")
    for flag, value in (("--path-column", args.path_column), ("--label-column", args.label_column)):
        if value is not None and not is_csv:
            parser.error(f"{flag} applies to a CSV --input (list.csv), got --input {args.input}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        names = read_labels(args.labels) if args.labels else None
        if args.input and not os.path.isdir(args.input):
            entries, names = parse_annotations(
                args.input, names, path_column=args.path_column, label_column=args.label_column
            )
        else:
            entries, names = scan_folder(args.input or args.root, names)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    source = args.input or args.root
    labels_origin = f"--labels {args.labels}" if args.labels else None
    if names is not None and not args.labels:
        labels_origin = f"inferred: the sorted class names of {source}"
        shown = ", ".join(f"{name}={i}" for i, name in enumerate(names[:5])) + (", ..." if len(names) > 5 else "")
        logger.warning(
            "no --labels: numbered the %d classes found in %s in sorted name order (%s); a list with other classes "
            "(e.g. a validation split) would get other ids. Pass the same --labels FILE for every split (the names "
            "used here are written to %s)",
            len(names),
            source,
            shown,
            os.path.join(args.output_dir, "labels.txt"),
        )
    kind = None if args.kind == "auto" else args.kind
    reencode = None
    if args.reencode:
        workers = args.num_workers or os.cpu_count() or 1
        reencode = {
            "short_side": args.short_side or None,
            "gop": args.gop,
            "crf": args.crf,
            "preset": args.preset,
            "threads": 1 if workers > 1 else 0,
        }
    workers = args.num_workers or ((os.cpu_count() or 1) if (args.reencode or args.verify) else 1)
    try:
        info = make_shards(
            entries,
            args.root,
            args.output_dir,
            labels=names,
            labels_origin=labels_origin,
            kind=kind,
            shard_size_mb=args.shard_size_mb,
            max_samples_per_shard=args.max_samples_per_shard,
            num_shards=args.num_shards,
            prefix=args.prefix,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            verify=args.verify,
            reencode=reencode,
            num_workers=workers,
            overwrite=args.overwrite,
            dataset_name=args.dataset_name,
        )
    except (ValueError, RuntimeError, ImportError) as err:  # e.g. a non-empty --output-dir, s3fs not installed
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # writing failed midway (disk full, ...)
        print(f"error: writing the shards to {args.output_dir} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {info['num_samples']} {info['kind']} samples in {info['num_shards']} shards "
        f"({info['num_bytes'] / 2**20:.1f} MiB) to {args.output_dir}; skipped {info['num_skipped']}"
        + (f" {info['skipped']}" if info["skipped"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
