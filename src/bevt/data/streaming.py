"""Stream decoded, transformed training samples from WebDataset shards, robustly and resumably.

Pipeline per rank and DataLoader worker::

    shards (this epoch's seeded order) --datasets.load_dataset("webdataset", streaming=True)-->
    split_dataset_by_node(rank, world_size) --(datasets splits shards over DataLoader workers)-->
    block shuffle --> decode (only the sampled frames) --> transform --> sample dict

* **Reading**: a ``datasets`` streaming ``IterableDataset`` built with ``IterableDataset.from_generator`` over
  the shard list (so ``datasets`` shards it over ranks and DataLoader workers and records exact positions),
  whose generator reads each tar with :func:`bevt.data.shards.iter_tar_samples`: media and ``KEY.json`` stay
  raw bytes (``Value("binary")``; never the ``Video`` feature, whose torchcodec decoding breaks on machines
  without a working torchcodec). ``datasets``' own webdataset reader is not used: it decodes ``KEY.json``
  inside its iterator, so one invalid JSON file (or a duplicate member, or a corrupt tar header) ended the
  whole shard and lost every good sample after it. Damage in a tar becomes a sample-level error instead
  (``shard_error``), and reading goes on after a corrupt region. We parse and decode ourselves, per sample,
  inside a ``try``: a bad sample is skipped, counted by reason in :class:`StreamStats` and logged with its
  key and shard (once per sample: a sample that fails again in a later epoch or pass is counted, not logged
  again); it never ends the stream and never costs another sample. If more than
  ``max_failure_fraction`` of the samples fail (after ``min_samples_for_check`` attempts), or a whole epoch
  yields nothing, the stream stops with :class:`DataQualityError`.
* **Remote shards**: shard arguments may be URLs (``hf://datasets/...``, ``https://``, ``s3://``, ``gs://``,
  ``az://``, any fsspec protocol; see :mod:`bevt.data.storage`). Each rank / worker opens only its own shards
  and streams them (a few MiB of memory per open shard, no download first; ``cache_dir`` optionally keeps local
  copies). A dropped connection, a 5xx or a timeout is retried with backoff and the read resumes at the byte
  where it stopped, so the tar reader sees the same bytes and yields the same samples, none lost or repeated;
  a shard still failing after ``max_retries`` retries costs the rest of that shard, counted once as
  ``shard_unavailable``, and the run goes on (or stops past ``max_failure_fraction``).
* **Ranks**: pass ``rank`` / ``world_size``; the stream applies ``split_dataset_by_node`` itself, so each
  rank reads a disjoint part (whole shards when ``num_shards % world_size == 0``, else every
  ``world_size``-th sample of every shard, which costs each rank the I/O of all shards). Do **not** also let
  Accelerate shard the data: build the loader with :class:`StreamDataLoader` (a plain DataLoader per rank)
  and move batches to ``accelerator.device`` yourself; ``accelerator.prepare(loader)`` would wrap this torch
  ``IterableDataset`` in ``IterableDatasetShard`` (each rank would decode everything and keep 1/world).
  Use ``repeat=True`` for multi-rank training with a fixed number of steps per epoch
  (``total_examples // (world_size * batch_size)``), so no rank runs out before the others (a DDP hang).
* **Shuffling**: the shard order is reshuffled each epoch (the same order on every rank, so the split stays
  disjoint), then samples are shuffled in blocks of ``shuffle_buffer`` consecutive samples (a seeded
  permutation per block). Unlike a rolling shuffle buffer (whose content ``datasets`` cannot restore), a
  block is re-read exactly on resume. ``make_shards`` shuffles the samples when writing, so block
  shuffling is enough.
* **Randomness** of clip sampling and transforms comes from a generator seeded by
  ``(seed, epoch, sample key)``; each sample carries that ``seed`` (the pretraining collator seeds its masks
  from it). A resumed run reproduces the same clips, crops and masks, with any worker layout.
* **Exact resume**: each sample carries ``__state__`` (its worker's position after it). :class:`StreamDataLoader`
  strips it from the batches, tracks the latest state per worker, and restores the round-robin order of
  the workers on resume, so ``loader.state_dict()`` / ``loader.load_state_dict()`` continue at the exact
  next batch. Resume with the same ``world_size``, ``num_workers``, ``batch_size`` and stream settings
  (checked). Save one state per rank. Iterating the stream without a loader, ``stream.state_dict()`` does the
  same in-process.

Sample dict (what the stream yields): the transform's output (e.g. ``pixel_values``,
``tokenizer_pixel_values``; without a transform ``pixel_values`` is the decoded ``uint8 (T, H, W, 3)`` clip or
``(H, W, 3)`` image, ``(num_clips, T, H, W, 3)`` with ``num_clips > 1``), ``labels`` (``int``, ``-100`` when the
sample has none), ``seed`` (``int``), ``__key__`` / ``__url__`` (``str``), ``__state__``.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import random
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from bevt.data.shards import (
    IMAGE_EXTENSIONS,
    MEDIA_EXTENSIONS,
    VIDEO_EXTENSIONS,
    iter_tar_samples,
    list_shards,
    load_dataset_info,
)
from bevt.data.storage import ShardAccess, basename, join, parent
from bevt.data.transforms import derive_seed

__all__ = [
    "FAILURE_REASONS",
    "IGNORE_LABEL",
    "DataQualityError",
    "ShardStream",
    "StreamDataLoader",
    "StreamStats",
    "build_stream",
    "counted_examples",
    "shard_features",
]

logger = logging.getLogger(__name__)

IGNORE_LABEL = -100
"""``labels`` value of a sample without a label (PyTorch's cross-entropy ``ignore_index``)."""

FAILURE_REASONS: tuple[str, ...] = (
    "missing_media",  # no media member of the stream's kind
    "empty",  # zero-byte media
    "bad_metadata",  # KEY.json is not valid JSON / not an object, or its label is not an int in [0, num_labels)
    "missing_label",  # require_label=True and the label is null / absent
    "decode_error",  # the decoder failed: corrupt, truncated, not a video / image, no frames
    "transform_error",  # the transform raised
    "shard_error",  # the tar is damaged here: truncated (rest of shard lost), corrupt header (skipped), duplicate
    "shard_unavailable",  # a remote shard stopped answering (after every retry): the rest of that shard is lost
)

_SHARD_REASONS = ("shard_error", "shard_unavailable")  # always logged, as errors
_STATE_FORMAT = "bevt-stream-state/1"
_STATS_ONLY = "__stats_only__"


class DataQualityError(RuntimeError):
    """Too many samples fail to load: the data (or the decoder) is broken, not just a few files."""


def shard_features() -> Any:
    """The ``datasets.Features`` of the raw samples: media and ``KEY.json`` as raw bytes, ``__error__`` (the tar
    damage a sample stands for, else ``None``)."""
    from datasets import Features, Value

    cols: dict[str, Any] = {"__key__": Value("string"), "__url__": Value("string")}
    cols.update({ext: Value("binary") for ext in MEDIA_EXTENSIONS})
    cols["json"] = Value("binary")
    cols["__error__"] = Value("string")
    cols["__reason__"] = Value("string")
    return Features(cols)


def _raw_samples(shards: list[str], access: ShardAccess | None = None) -> Iterator[dict[str, Any]]:
    """The generator behind :meth:`ShardStream.source`: raw samples of ``shards`` (``datasets`` passes each
    DataLoader worker / rank its own sub-list; only those shards are opened). Never raises on damaged data or
    unreachable shards (see ``iter_tar_samples``)."""
    for shard in shards:
        for sample in iter_tar_samples(shard, access):
            row: dict[str, Any] = {
                "__key__": sample.key,
                "__url__": shard,
                "__error__": sample.error,
                "__reason__": sample.reason,
            }
            row.update({ext: sample.members.get(ext) for ext in (*MEDIA_EXTENSIONS, "json")})
            yield row


@dataclass
class StreamStats:
    """Counts of samples delivered (``ok``) and skipped by reason (see :data:`FAILURE_REASONS`).

    ``recent`` holds the last few failures as ``(key, shard, reason, message)`` (not part of the state).
    """

    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    recent: deque = field(default_factory=lambda: deque(maxlen=5), repr=False)

    @property
    def num_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def attempts(self) -> int:
        return self.ok + self.num_failed

    def as_dict(self) -> dict[str, int]:
        """``{"ok": n, <reason>: n, ...}`` (reasons with a count only)."""
        return {"ok": self.ok, **{k: v for k, v in sorted(self.failed.items()) if v}}

    @classmethod
    def from_dict(cls, counts: Mapping[str, int]) -> StreamStats:
        counts = dict(counts)
        return cls(ok=int(counts.pop("ok", 0)), failed=Counter({k: int(v) for k, v in counts.items()}))

    def __add__(self, other: StreamStats) -> StreamStats:
        return StreamStats(self.ok + other.ok, self.failed + other.failed)

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items()) if v) or "none"
        return f"{self.ok} ok, {self.num_failed} skipped ({parts})"


class _SampleError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _accepts_generator(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class ShardStream(IterableDataset):
    """A torch ``IterableDataset`` of decoded + transformed samples from bevt shards (see the module doc).

    Build it with :func:`build_stream`. Attributes: ``files``, ``kind``, ``epoch``, ``rank``, ``world_size``,
    ``num_shards``, ``total_examples`` / ``num_examples`` (from ``dataset_info.json``; ``None`` if absent),
    ``stats`` (in-process counts when iterated without workers).
    """

    def __init__(
        self,
        files: Sequence[str],
        *,
        kind: Literal["video", "image"],
        transform: Callable | None,
        clip_len: int,
        frame_interval: int,
        sampling: str,
        num_clips: int,
        test_mode: bool,
        shuffle_buffer: int,
        shuffle_shards: bool,
        seed: int,
        rank: int,
        world_size: int,
        repeat: bool,
        epoch: int,
        require_label: bool,
        num_labels: int | None,
        max_failure_fraction: float,
        min_samples_for_check: int,
        backend: str | None,
        log_limit: int,
        access: ShardAccess | None = None,
        dataset_infos: Mapping[str, dict[str, Any] | None] | None = None,
        exclude_keys: Collection[str] = (),
    ) -> None:
        super().__init__()
        self.files = list(files)
        self.exclude_keys = frozenset(exclude_keys)
        self.access = access or ShardAccess()
        self.kind = kind
        self.transform = transform
        self._transform_takes_generator = transform is not None and _accepts_generator(transform)
        self.clip_len = clip_len
        self.frame_interval = frame_interval
        self.sampling = sampling
        self.num_clips = num_clips
        self.test_mode = test_mode
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.repeat = repeat
        self.epoch = epoch
        self.require_label = require_label
        self.num_labels = num_labels
        self.max_failure_fraction = max_failure_fraction
        self.min_samples_for_check = min_samples_for_check
        self.backend = backend
        self.log_limit = log_limit
        self.media_columns = VIDEO_EXTENSIONS if kind == "video" else IMAGE_EXTENSIONS
        self.stats = StreamStats()
        self._resume: dict[str, Any] | None = None
        self._logged: set[tuple[str, str]] = set()  # (key, shard) of failures already logged
        self._live: dict[str, Any] | None = None
        self._shard_counts = self._read_shard_counts(dataset_infos or {})

    # ------------------------------------------------------------------------------ description

    def _read_shard_counts(self, known: Mapping[str, dict[str, Any] | None]) -> dict[str, int] | None:
        counts: dict[str, int] = {}
        for folder in sorted({f for f in map(parent, self.files) if f is not None}):
            info = known[folder] if folder in known else load_dataset_info(folder, storage_options=self.access)
            if info:
                counts.update({join(folder, s["file"]): int(s["num_samples"]) for s in info["shards"]})
        if not all(f in counts for f in self.files):
            return None
        return {f: counts[f] for f in self.files}

    def count_examples(self) -> int:
        """`total_examples`, counted from the shards' tar headers when they have no `dataset_info.json` (cheap: media
        bytes are seeked over; see `bevt.data.subsets.count_samples`). Fills `total_examples` / `num_examples`."""
        if self._shard_counts is None:
            from .subsets import count_samples

            self._shard_counts = {f: count_samples(f, self.kind) for f in self.files}
        return self.total_examples

    @property
    def num_shards(self) -> int:
        return len(self.files)

    @property
    def splits_by_shard(self) -> bool:
        """Whether ranks get whole shards (``num_shards % world_size == 0``) rather than every n-th sample."""
        return self.num_shards % self.world_size == 0

    @property
    def shards_per_rank(self) -> int:
        """Shards this rank reads: the useful maximum of DataLoader workers."""
        return self.num_shards // self.world_size if self.splits_by_shard else self.num_shards

    @property
    def total_examples(self) -> int | None:
        """Samples in all shards (before any skipping), or ``None`` without ``dataset_info.json``."""
        return sum(self._shard_counts.values()) if self._shard_counts is not None else None

    @property
    def num_examples(self) -> int | None:
        """Samples this rank reads in the current epoch (before skipping), or ``None`` if unknown."""
        if self._shard_counts is None:
            return None
        if self.world_size == 1:
            return self.total_examples
        if self.splits_by_shard:
            files = self.epoch_files(self.epoch)
            return sum(self._shard_counts[f] for f in files[self.rank :: self.world_size])
        total = self.total_examples
        return len(range(self.rank, total, self.world_size))

    def __repr__(self) -> str:
        return (
            f"ShardStream(kind={self.kind!r}, shards={self.num_shards}, rank={self.rank}/{self.world_size}, "
            f"examples={self.total_examples}, shuffle_buffer={self.shuffle_buffer}, seed={self.seed}, "
            f"repeat={self.repeat}, epoch={self.epoch}, transform={self.transform!r})"
        )

    # ------------------------------------------------------------------------------ sources

    def epoch_files(self, epoch: int) -> list[str]:
        """The shard order of an epoch (seeded; identical on every rank)."""
        files = list(self.files)
        if self.shuffle_shards:
            random.Random(derive_seed(self.seed, "shards", epoch)).shuffle(files)
        return files

    def source(self, epoch: int | None = None) -> Any:
        """The raw ``datasets.IterableDataset`` of this rank for an epoch (bytes + metadata, not decoded)."""
        from datasets import IterableDataset as HFIterableDataset
        from datasets.distributed import split_dataset_by_node

        files = self.epoch_files(self.epoch if epoch is None else epoch)
        ds = HFIterableDataset.from_generator(
            _raw_samples, features=shard_features(), gen_kwargs={"shards": files, "access": self.access}
        )
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        return ds

    # ------------------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at ``epoch`` (new shard order, block permutations and sample seeds)."""
        self.epoch = int(epoch)

    def fingerprint(self) -> dict[str, Any]:
        """Settings that must match for a saved state to apply."""
        return {
            "files": derive_seed(*[basename(f) for f in self.files]),
            "kind": self.kind,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle_shards": self.shuffle_shards,
            **({"exclude_keys": derive_seed(*sorted(self.exclude_keys))} if self.exclude_keys else {}),
        }

    def _make_state(self, workers: Mapping[str, Any], num_workers: int, next_worker: int) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "fingerprint": self.fingerprint(),
            "epoch": self.epoch,
            "num_workers": num_workers,
            "next_worker": next_worker,
            "workers": copy.deepcopy(dict(workers)),
        }

    def state_dict(self) -> dict[str, Any]:
        """Position after the last sample yielded **in this process** (iteration without DataLoader workers).

        With workers use :meth:`StreamDataLoader.state_dict`.
        """
        return self._make_state({"0": self._live} if self._live else {}, 1, 0)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` at the next iteration (checked against this stream's settings).

        Raises:
            ValueError: not a stream state, or saved with different settings (files, seed, rank...).
        """
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a bevt stream state (expected format {_STATE_FORMAT!r})")
        saved, now = state["fingerprint"], self.fingerprint()
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"stream state does not match this stream; (saved, now) differ for {diff}")
        self.epoch = int(state["epoch"])
        self._resume = copy.deepcopy(dict(state))
        self._live = None

    def _take_resume(self, worker: int, num_workers: int) -> dict[str, Any] | None:
        resume = self._resume
        if get_worker_info() is None:
            self._resume = None
        if resume is None:
            return None
        if int(resume["num_workers"]) != num_workers:
            raise ValueError(
                f"the stream state was saved with {resume['num_workers']} DataLoader worker(s) per rank; "
                f"resume with the same number (now {num_workers})"
            )
        return resume["workers"].get(str(worker))

    # ------------------------------------------------------------------------------ samples

    def _fail(self, stats: StreamStats, key: str, url: str, reason: str, message: str) -> bool:
        """Count a failed sample; log it if it was not logged before (up to ``log_limit`` samples, then every 100th
        failure; damaged shards always). Returns whether it was logged now."""
        stats.failed[reason] += 1
        stats.recent.append((key, url, reason, message))
        n = stats.num_failed
        logged = (key, url) not in self._logged and (
            len(self._logged) < self.log_limit or n % 100 == 0 or reason in _SHARD_REASONS
        )
        if logged:
            self._logged.add((key, url))
            logger.log(
                logging.ERROR if reason in _SHARD_REASONS else logging.WARNING,
                "skipping sample %r of shard %s: %s: %s (%s)",
                key,
                url,
                reason,
                message,
                stats.summary(),
            )
        if stats.attempts >= self.min_samples_for_check and n > self.max_failure_fraction * stats.attempts:
            raise DataQualityError(
                f"{n} of {stats.attempts} samples failed to load (> {self.max_failure_fraction:.0%}): "
                f"{stats.summary()}; last failures (key, shard, reason, message): {list(stats.recent)}"
            )
        return logged

    def _decode(self, data: bytes, generator: torch.Generator) -> torch.Tensor:
        from bevt.video_decoding import VideoDecodingError, available_backends, decode_image, resolve_backend

        if self.kind == "image":
            return decode_image(data)
        backend = resolve_backend(self.backend)
        start = generator.get_state()
        try:
            return self._decode_clips(data, generator, backend)
        except VideoDecodingError as err:
            # A backend's own bug must not cost a good video (decord 0.6 fails on some narrow frame sizes, e.g.
            # 48 px wide): with automatic backend choice, try PyAV (the reference decoder) before giving up,
            # drawing the same clip positions.
            explicit = self.backend is not None or bool(os.environ.get("BEVT_VIDEO_BACKEND"))
            if explicit or backend == "pyav" or "pyav" not in available_backends():
                raise
            generator.set_state(start)
            try:
                return self._decode_clips(data, generator, "pyav")
            except VideoDecodingError as fallback:
                raise VideoDecodingError(f"{err} (PyAV fallback: {fallback})") from err

    def _decode_clips(self, data: bytes, generator: torch.Generator, backend: str) -> torch.Tensor:
        from bevt.frame_sampling import sample_frame_indices
        from bevt.video_decoding import VideoReader

        with VideoReader(data, backend=backend, num_threads=1) as reader:
            clips = sample_frame_indices(
                reader.num_frames,
                mode=self.sampling,
                clip_len=self.clip_len,
                frame_interval=self.frame_interval,
                num_clips=self.num_clips,
                test_mode=self.test_mode,
                generator=generator,
            )
            frames = reader.get_batch([i for clip in clips for i in clip])
        if self.num_clips > 1:
            frames = frames.reshape(self.num_clips, self.clip_len, *frames.shape[1:])
        return frames

    def _process(self, raw: Mapping[str, Any], epoch: int) -> dict[str, Any]:
        key, url = raw.get("__key__") or "?", raw.get("__url__") or "?"
        if raw.get("__error__"):
            raise _SampleError(raw.get("__reason__") or "shard_error", raw["__error__"])
        data = next((raw[c] for c in self.media_columns if raw.get(c) is not None), None)
        if data is None:
            found = [c for c in MEDIA_EXTENSIONS if raw.get(c) is not None]
            raise _SampleError(
                "missing_media", f"no {self.kind} member ({'/'.join(self.media_columns)}); has {found}"
            )
        if len(data) == 0:
            raise _SampleError("empty", "the media member is empty (0 bytes)")
        meta: Any = {}
        if raw.get("json") is not None:
            try:
                meta = json.loads(raw["json"])
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                raise _SampleError("bad_metadata", f"{key}.json is not valid JSON: {err}") from None
        if not isinstance(meta, dict):
            raise _SampleError(
                "bad_metadata", f"{key}.json must hold a JSON object, got {type(meta).__name__}"
            )
        label = meta.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise _SampleError("bad_metadata", f"'label' must be an int class index or null, got {label!r}")
        if label is not None and not 0 <= label < (self.num_labels or label + 1):
            expected = f"[0, {self.num_labels})" if self.num_labels else ">= 0"
            raise _SampleError(
                "bad_metadata", f"'label' {label} is out of range: expected {expected} or null"
            )
        if label is None and self.require_label:
            raise _SampleError("missing_label", "the sample has no label")
        seed = derive_seed(self.seed, epoch, key)
        generator = torch.Generator().manual_seed(seed)
        try:
            media = self._decode(data, generator)
        except Exception as err:  # noqa: BLE001 - any decoder failure skips the sample
            raise _SampleError("decode_error", f"{type(err).__name__}: {err}") from err
        if self.transform is None:
            out: Any = {"pixel_values": media}
        else:
            try:
                if self._transform_takes_generator:
                    out = self.transform(media, generator=generator)
                else:
                    out = self.transform(media)
            except Exception as err:  # noqa: BLE001
                raise _SampleError("transform_error", f"{type(err).__name__}: {err}") from err
            if not isinstance(out, dict):
                out = {"pixel_values": out}
        out["labels"] = IGNORE_LABEL if label is None else label
        out["seed"] = seed
        out["__key__"] = key
        out["__url__"] = url
        return out

    # ------------------------------------------------------------------------------ iteration

    @staticmethod
    def _read_block(reader: dict[str, Any], size: int) -> list:
        """Up to ``size`` raw samples (tar damage arrives as samples with ``__error__``, never as an exception)."""
        items: list = []
        for raw in reader["it"]:
            items.append(raw)
            if len(items) >= size:
                break
        return items

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        state = self._take_resume(worker, num_workers)
        return self._generate(worker, num_workers, state)

    def _generate(
        self, worker: int, num_workers: int, state: dict[str, Any] | None
    ) -> Iterator[dict[str, Any]]:
        in_process = get_worker_info() is None
        if state is not None:
            epoch, start, block, offset = state["epoch"], state["source"], state["block"], state["offset"]
            stats = StreamStats.from_dict(state["stats"])
        else:
            epoch, start, block, offset = self.epoch, None, 0, 0
            stats = StreamStats()
        if in_process:
            self.stats = stats
        last: dict[str, Any] | None = None
        newly_logged: list[tuple[str, str]] = []  # sent to the loader, which keeps them for the next pass's workers
        while True:
            fresh_epoch = start is None and block == 0
            ds = self.source(epoch)
            if start is not None:
                ds.load_state_dict(start)
            reader = {"ds": ds, "it": iter(ds), "epoch": epoch}
            epoch_raw = epoch_attempts = epoch_ok = 0
            while True:
                if start is None and block > 0:
                    start = reader["ds"].state_dict()
                items = self._read_block(reader, max(self.shuffle_buffer, 1))
                if not items:
                    break
                epoch_raw += sum(raw.get("__key__") not in self.exclude_keys for raw in items)
                order = list(range(len(items)))
                if self.shuffle_buffer > 1:
                    block_seed = derive_seed(self.seed, "block", epoch, self.rank, worker, num_workers, block)
                    order = torch.randperm(
                        len(items), generator=torch.Generator().manual_seed(block_seed)
                    ).tolist()
                for j in range(offset, len(items)):
                    raw = items[order[j]]
                    if raw.get("__key__") in self.exclude_keys:
                        continue  # held out elsewhere (e.g. an evaluation set): not read, not counted
                    epoch_attempts += 1
                    try:
                        sample = self._process(raw, epoch)
                    except _SampleError as err:
                        key, url = raw.get("__key__") or "?", raw.get("__url__") or "?"
                        if self._fail(stats, key, url, err.reason, str(err)) and not in_process:
                            newly_logged.append((key, url))
                        continue
                    stats.ok += 1
                    epoch_ok += 1
                    position = {
                        "epoch": epoch,
                        "source": start,
                        "block": block,
                        "offset": j + 1,
                        "stats": stats.as_dict(),
                    }
                    sample["__state__"] = {"worker": worker, "num_workers": num_workers, "state": position}
                    if newly_logged:
                        sample["__state__"]["logged"], newly_logged = newly_logged, []
                    if in_process:
                        self._live = position
                    last = position
                    yield sample
                offset = 0
                block += 1
                start = None
            if epoch_attempts and not epoch_ok:
                raise DataQualityError(
                    f"no sample of epoch {epoch} could be loaded (rank {self.rank}, worker {worker}): "
                    f"{stats.summary()}; last failures (key, shard, reason, message): {list(stats.recent)}"
                )
            if not self.repeat:
                if not in_process and last is not None and last["stats"] != stats.as_dict():
                    # Failures after this worker's last sample would never reach the loader: send the final
                    # counts in a data-less marker (the loader's collate drops it).
                    final = {**last, "stats": stats.as_dict()}
                    state = {"worker": worker, "num_workers": num_workers, "state": final, "logged": newly_logged}
                    yield {_STATS_ONLY: True, "__state__": state}
                return
            if fresh_epoch and epoch_raw == 0:
                return  # this worker has no shards: repeating would spin forever
            epoch, start, block, offset = epoch + 1, None, 0, 0
            if in_process:
                self._live = {
                    "epoch": epoch,
                    "source": None,
                    "block": 0,
                    "offset": 0,
                    "stats": stats.as_dict(),
                }


def counted_examples(stream: ShardStream) -> int:
    """`stream.total_examples`; for shards without `dataset_info.json`, counted from their tar headers and logged
    (what an epoch means then)."""
    if stream.total_examples is not None:
        return stream.total_examples
    started = time.perf_counter()
    total = stream.count_examples()
    logger.warning(
        "the %s shards have no dataset_info.json: counted %d samples in %d shards from their tar headers (%.1fs); "
        "an epoch is that many samples (write shards with python -m bevt.data.make_shards to record the counts)",
        stream.kind, total, stream.num_shards, time.perf_counter() - started,
    )
    return total


def build_stream(
    data_files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    kind: Literal["video", "image"] | None = None,
    transform: Callable | None = None,
    clip_len: int = 16,
    frame_interval: int = 8,
    sampling: str = "dense",
    num_clips: int = 1,
    test_mode: bool = False,
    shuffle_buffer: int = 256,
    shuffle_shards: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    repeat: bool = False,
    epoch: int = 0,
    require_label: bool = False,
    num_labels: int | None = None,
    max_failure_fraction: float = 0.1,
    min_samples_for_check: int = 100,
    backend: str | None = None,
    log_limit: int = 50,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_retries: int = 5,
    retry_wait: float = 1.0,
    timeout: float = 60.0,
    exclude_keys: Collection[str] = (),
) -> ShardStream:
    """A resumable stream of decoded, transformed samples from bevt shards (see the module docstring).

    Args:
        data_files: shard folder, glob, ``.tar`` path, a URL of any of these (``hf://datasets/...``,
            ``https://``, ``s3://``, ``gs://``, ``az://``...), or a list of them (see
            :func:`bevt.data.shards.list_shards` and :mod:`bevt.data.storage`). Each rank / DataLoader worker opens
            only its own shards, streamed (no download first).
        kind: ``"video"`` or ``"image"``; default from ``dataset_info.json`` (else ``"video"``).
        transform: ``transform(media, generator=...)`` (the ``generator`` keyword is optional) returning a
            dict of tensors (or one tensor, stored as ``pixel_values``); media is ``uint8 (T, H, W, 3)``
            (``(num_clips, T, H, W, 3)`` with ``num_clips > 1``) or ``uint8 (H, W, 3)`` for images.
        clip_len, frame_interval, sampling, num_clips, test_mode: clip sampling (see
            :func:`bevt.frame_sampling.sample_frame_indices`); BEVT pretraining: 16 x 8 dense.
        shuffle_buffer: block size of the sample shuffle (0 or 1: no sample shuffle). Holds that many
            encoded samples in memory per worker.
        shuffle_shards: reshuffle the shard order each epoch.
        seed: base seed of all randomness.
        rank, world_size: this process's rank and the number of ranks.
        repeat: stream forever (epoch after epoch); otherwise one pass per iteration.
        epoch: first epoch (see :meth:`ShardStream.set_epoch`).
        require_label: skip (and count) samples without a label.
        num_labels: labels must lie in ``[0, num_labels)`` (others are skipped as ``bad_metadata``); default:
            the ``num_labels`` of the shards' ``dataset_info.json`` (when every folder records the same), else
            only ``>= 0`` is checked.
        max_failure_fraction, min_samples_for_check: stop with :class:`DataQualityError` when more than this
            fraction of the samples seen (once there are at least ``min_samples_for_check``) failed.
        backend: video decoding backend (``None``: automatic, see :mod:`bevt.video_decoding`; a video the
            automatic choice cannot decode is retried with PyAV before it counts as a ``decode_error``).
        log_limit: log each failing sample (once: not again when it fails in a later epoch or pass) up to this
            many samples per worker, then every 100th failure.
        storage_options: options of the URLs' filesystem (``{"token": ...}`` for ``hf://``, ``{"endpoint_url":
            ...}`` for ``s3://``, ``{"headers": {...}}`` for ``https://``).
        cache_dir: keep a local copy of each remote shard read completely, and read it from there in later
            epochs (optional; keyed by URL).
        max_retries, retry_wait, timeout: a remote read that fails (dropped connection, 5xx, ``timeout`` seconds
            without data over HTTP) is retried up to ``max_retries`` times at the same byte, waiting
            ``retry_wait`` seconds, doubling; after that the rest of the shard counts as one
            ``shard_unavailable`` failure. Retries never lose or repeat a sample.
        exclude_keys: sample keys this stream never yields (e.g. held-out evaluation samples read by another
            stream); they are skipped before decoding and not counted as failures.
    """
    access = ShardAccess(
        storage_options=storage_options,
        cache_dir=cache_dir,
        max_retries=max_retries,
        retry_wait=retry_wait,
        timeout=timeout,
    )
    files = list_shards(data_files, storage_options=access)
    infos = {  # each folder's dataset_info.json, read once
        folder: load_dataset_info(folder, storage_options=access)
        for folder in dict.fromkeys(f for f in map(parent, files) if f is not None)
    }
    if kind is None:
        info = infos.get(parent(files[0]) or "")
        kind = (info or {}).get("kind") or "video"
    if kind not in ("video", "image"):
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    if not 0.0 <= max_failure_fraction <= 1.0:
        raise ValueError(f"max_failure_fraction must be in [0, 1], got {max_failure_fraction}")
    if min_samples_for_check < 1:
        raise ValueError(f"min_samples_for_check must be >= 1, got {min_samples_for_check}")
    if num_labels is not None and (
        isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1
    ):
        raise ValueError(f"num_labels must be a positive int or None, got {num_labels!r}")
    if num_labels is None:
        recorded = {(info or {}).get("num_labels") for info in infos.values()}
        if len(recorded) == 1 and isinstance(next(iter(recorded)), int):
            num_labels = recorded.pop()
    if world_size > 1 and len(files) % world_size:
        logger.warning(
            "%d shards do not split evenly over %d ranks: every rank reads all shards and keeps every %d-th "
            "sample (I/O x %d); write a multiple of world_size shards (make_shards --num-shards)",
            len(files),
            world_size,
            world_size,
            world_size,
        )
    return ShardStream(
        files,
        kind=kind,
        transform=transform,
        clip_len=clip_len,
        frame_interval=frame_interval,
        sampling=sampling,
        num_clips=num_clips,
        test_mode=test_mode,
        shuffle_buffer=shuffle_buffer,
        shuffle_shards=shuffle_shards,
        seed=seed,
        rank=rank,
        world_size=world_size,
        repeat=repeat,
        epoch=epoch,
        require_label=require_label,
        num_labels=num_labels,
        max_failure_fraction=max_failure_fraction,
        min_samples_for_check=min_samples_for_check,
        backend=backend,
        log_limit=log_limit,
        access=access,
        dataset_infos=infos,
        exclude_keys=exclude_keys,
    )


# ------------------------------------------------------------------------------------------ loader


class _StateCollate:
    """Runs in the DataLoader workers: collate the samples, hand the last one's ``__state__`` alongside (with the
    failures every sample of the batch says were logged)."""

    def __init__(self, collate_fn: Callable[[list[dict[str, Any]]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
        state = dict(samples[-1]["__state__"])
        state["logged"] = [item for s in samples for item in s["__state__"].get("logged", ())]
        clean = [{k: v for k, v in s.items() if k != "__state__"} for s in samples if _STATS_ONLY not in s]
        return (self.collate_fn(clean) if clean else None), state


class StreamDataLoader:
    """A per-rank DataLoader over a :class:`ShardStream` with exact ``state_dict()`` / ``load_state_dict()``.

    Batches are whatever ``collate_fn`` returns for a list of sample dicts (default: torch's
    ``default_collate``). Each batch comes from one worker; the loader records that worker's position, and
    on resume re-orders the first batches so the workers' round-robin continues where it stopped.
    ``num_workers`` is capped at the shards this rank reads (extra workers would idle).

    Attributes: ``stream``, ``num_workers``, ``batch_size``; :attr:`stats` sums the skip counts of all
    workers up to the last delivered batch.
    """

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        *,
        collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        prefetch_factor: int | None = None,
        timeout: float = 0,
        multiprocessing_context: Any = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers > stream.shards_per_rank:
            logger.warning(
                "num_workers=%d > %d shards per rank: using %d workers (a worker reads whole shards)",
                num_workers,
                stream.shards_per_rank,
                stream.shards_per_rank,
            )
            num_workers = stream.shards_per_rank
        self.stream = stream
        self.batch_size = batch_size
        self.num_workers = num_workers
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs.update(prefetch_factor=prefetch_factor, multiprocessing_context=multiprocessing_context)
        self.loader = DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_StateCollate(collate_fn or default_collate),
            pin_memory=pin_memory,
            drop_last=drop_last,
            timeout=timeout,
            **kwargs,
        )
        self._workers: dict[str, Any] = {}
        self._next_worker = 0
        self._finished = StreamStats()  # counts of completed passes

    @property
    def _slots(self) -> int:
        return max(self.num_workers, 1)

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at ``epoch`` (forgets any mid-epoch position)."""
        self.stream.set_epoch(epoch)
        self._workers, self._next_worker = {}, 0

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch this loader delivered (save one per rank)."""
        state = self.stream._make_state(self._workers, self._slots, self._next_worker)
        state["batch_size"] = self.batch_size
        state["finished_stats"] = self._finished.as_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the batch at which ``state`` was taken, at the next iteration.

        Raises:
            ValueError: saved with another stream setup, batch size or number of workers.
        """
        if state.get("batch_size") not in (None, self.batch_size):
            raise ValueError(
                f"state saved with batch_size={state['batch_size']}, loader has {self.batch_size}"
            )
        if int(state.get("num_workers", -1)) != self._slots:
            raise ValueError(
                f"state saved with {state.get('num_workers')} worker slot(s) per rank; this loader has "
                f"{self._slots} (num_workers={self.num_workers})"
            )
        self.stream.load_state_dict(state)
        self._workers = copy.deepcopy(dict(state["workers"]))
        self._next_worker = int(state["next_worker"])
        self._finished = StreamStats.from_dict(state.get("finished_stats", {}))

    @property
    def stats(self) -> StreamStats:
        """Delivered / skipped counts of this run: completed passes + the workers' current pass (as of the
        last delivered batch)."""
        total = StreamStats(self._finished.ok, Counter(self._finished.failed))
        for position in self._workers.values():
            total = total + StreamStats.from_dict(position["stats"])
        return total

    def skipped_counts(self) -> dict[str, int]:
        """Samples skipped so far (undecodable, bad metadata, ...), by stream kind (what the training log shows)."""
        return {self.stream.kind: self.stats.num_failed}

    def __iter__(self) -> Iterator[Any]:
        slots = self._slots
        expected = self._next_worker
        iterator = iter(self.loader)  # workers start here, with the stream's resume state
        self.stream._resume = None
        pending: dict[int, deque] = defaultdict(deque)
        dead: set[int] = set()

        def deliver(worker: int) -> Any:
            batch, state = pending[worker].popleft()
            # failures a worker logged: the workers of later passes (copies of this stream) do not log them again
            self.stream._logged.update((str(key), str(url)) for key, url in state.get("logged", ()))
            self._workers[str(worker)] = state["state"]  # batch None: a worker's final counts, no data
            self._next_worker = (worker + 1) % slots
            return batch

        for batch, state in iterator:
            pending[int(state["worker"])].append((batch, state))
            while True:
                if len(dead) >= slots:
                    break
                if expected in dead:
                    expected = (expected + 1) % slots
                    continue
                if pending[expected]:
                    batch = deliver(expected)
                    if batch is not None:
                        yield batch
                    expected = (expected + 1) % slots
                    continue
                # DataLoader serves live workers strictly in turn: a second batch from another worker
                # before one from `expected` means `expected` has finished.
                if any(len(q) >= 2 for w, q in pending.items() if w != expected):
                    dead.add(expected)
                    continue
                break
        while any(pending.values()):
            if pending[expected]:
                batch = deliver(expected)
                if batch is not None:
                    yield batch
            expected = (expected + 1) % slots
        # a complete pass: the next iteration starts the next epoch
        if self.num_workers == 0 and "0" in self._workers:  # in-process: the stream has the final counts
            self._workers["0"]["stats"] = self.stream.stats.as_dict()
        self._finished = self.stats
        self.stream.set_epoch(self.stream.epoch + 1)
        self._workers, self._next_worker = {}, 0
