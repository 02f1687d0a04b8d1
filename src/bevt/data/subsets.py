"""Sample counts from tar headers, and fixed, seeded training subsets for low-label fine-tuning.

- `count_samples(shard, kind)`: the samples of a shard that have a media member of `kind`, read from the tar
  member headers only (media bytes are seeked over): what `dataset_info.json` would say, for shards made without
  it (e.g. by another tool).
- `choose_balanced_subset(refs, size, seed)`: `size` samples, spread as evenly as possible over the classes, drawn
  with a seeded generator from a canonical order (the same subset whatever the shard listing order).
- `write_training_subset(shards, folder, size=... | fraction=..., seed=...)`: writes the chosen samples as new
  shards (+ `dataset_info.json`, `labels.txt` and `subset.json` with the chosen keys) once; a later call with the
  same settings reuses them (a resumed run trains on exactly the same clips), other settings rewrite them.
  `run_finetuning.py --max_train_samples N / --train_fraction F` uses it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tarfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .shards import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    find_label_names,
    iter_sample_metadata,
    iter_tar_samples,
    list_shards,
    load_dataset_info,
    write_shards,
)
from .storage import basename, is_url, open_shard

__all__ = [
    "SUBSET_FILE",
    "SampleRef",
    "Subset",
    "choose_balanced_subset",
    "count_samples",
    "index_labelled_samples",
    "write_training_subset",
]

logger = logging.getLogger(__name__)

SUBSET_FILE = "subset.json"
_SUBSET_FORMAT = "bevt-subset/1"


def count_samples(path: str | os.PathLike, kind: str | None = None) -> int:
    """Samples of one shard (a path or URL) that have a media member (of `kind`, "video" / "image", when given),
    from the tar member headers only (a remote shard is streamed through). A damaged tar is counted up to the
    damage, with a warning."""
    extensions = {"video": VIDEO_EXTENSIONS, "image": IMAGE_EXTENSIONS}.get(
        kind or "", VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
    )
    keys: set[str] = set()
    try:
        f, _ = open_shard(path)
        with f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and "." in base:
                    key, ext = base.split(".", 1)
                    if ext.lower() in extensions:
                        keys.add(key)
    except (tarfile.TarError, OSError, EOFError) as err:
        logger.warning(
            "stopped counting the samples of %s at a damaged part: %s: %s", path, type(err).__name__, err
        )
    return len(keys)


@dataclass(frozen=True, order=True)
class SampleRef:
    """Where one labelled sample is: its shard, key and class id."""

    shard: str
    key: str
    label: int


def index_labelled_samples(shards: Sequence[str]) -> list[SampleRef]:
    """Every sample of `shards` with an integer `label` in its `KEY.json` (metadata members only are read)."""
    refs = []
    for shard in shards:
        for key, meta in iter_sample_metadata(shard):
            label = meta.get("label") if isinstance(meta, dict) else None
            if isinstance(label, int) and not isinstance(label, bool) and label >= 0:
                refs.append(SampleRef(shard, key, label))
    return refs


def choose_balanced_subset(refs: Sequence[SampleRef], size: int, seed: int) -> list[SampleRef]:
    """`size` of `refs`, as evenly spread over the classes as their counts allow, chosen by `seed`.

    Each class's samples are shuffled (seeded) from a canonical order (by shard file name, then key); then classes
    give one sample each in turn, the classes in a seeded order, until `size` are taken (a class that runs out
    drops out). The result is sorted canonically.
    """
    if not 1 <= size <= len(refs):
        raise ValueError(f"cannot choose {size} of {len(refs)} labelled samples")
    rng = random.Random(f"bevt-subset:{seed}")
    by_class: dict[int, list[SampleRef]] = defaultdict(list)
    for ref in sorted(refs, key=lambda r: (os.path.basename(r.shard), r.key)):
        by_class[ref.label].append(ref)
    for label in sorted(by_class):
        rng.shuffle(by_class[label])
    order = sorted(by_class)
    rng.shuffle(order)
    chosen: list[SampleRef] = []
    depth = 0
    while len(chosen) < size:
        for label in order:
            if depth < len(by_class[label]) and len(chosen) < size:
                chosen.append(by_class[label][depth])
        depth += 1
    return sorted(chosen, key=lambda r: (os.path.basename(r.shard), r.key))


@dataclass
class Subset:
    """A written training subset: its shards and what was chosen."""

    folder: str
    shards: list[str]
    num_samples: int
    num_available: int
    label_counts: dict[int, int]
    reused: bool

    def describe(self) -> str:
        counts = sorted(self.label_counts.values())
        spread = f"{counts[0]}" if counts[0] == counts[-1] else f"{counts[0]}-{counts[-1]}"
        return (
            f"{self.num_samples} of {self.num_available} labelled training clips ({len(self.label_counts)} classes, "
            f"{spread} per class) in {self.folder}" + (" (reused)" if self.reused else "")
        )


def write_training_subset(
    shards: str | Sequence[str],
    folder: str | os.PathLike,
    *,
    size: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    num_shards: int = 1,
) -> Subset:
    """Write (or reuse) a fixed, seeded, class-balanced subset of the labelled samples of `shards` into `folder`.

    Args:
        shards: the training shards (globs, folders, files).
        folder: where the subset's shards go (its own folder: anything there is replaced when the settings differ).
        size / fraction: how many samples (exactly one of them): a count, or a fraction of the labelled samples
            (rounded, at least 1).
        seed: chooses the subset (independent of the training seed's other uses).
        num_shards: shards to split the subset into (equal counts; one per rank keeps ranks in step).

    Raises:
        ValueError: neither or both of size/fraction, a size larger than the labelled samples, no labelled sample.
    """
    if (size is None) == (fraction is None):
        raise ValueError("give exactly one of size and fraction")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    files = list_shards(shards)
    folder = Path(folder)
    settings = {
        "format": _SUBSET_FORMAT,
        "size": size,
        "fraction": fraction,
        "seed": seed,
        "num_shards": num_shards,
        "sources": [{"file": basename(f), "bytes": None if is_url(f) else os.path.getsize(f)} for f in files],
    }
    saved = _read_subset_file(folder)
    if saved is not None and saved.get("settings") == settings:  # the same subset: reuse it (resumed runs)
        written = [str(folder / s["file"]) for s in (load_dataset_info(folder) or {}).get("shards", [])]
        if written and all(os.path.isfile(f) for f in written):
            counts = {int(k): v for k, v in saved["label_counts"].items()}
            return Subset(str(folder), written, sum(counts.values()), saved["num_available"], counts, reused=True)

    refs = index_labelled_samples(files)
    if not refs:
        raise ValueError(f"no labelled sample in {len(files)} training shards")
    if fraction is not None:
        size = max(1, round(fraction * len(refs)))
    if size > len(refs):
        raise ValueError(f"{size} samples asked, but the training shards hold {len(refs)} labelled samples")
    num_shards = max(1, min(num_shards, size))
    chosen = choose_balanced_subset(refs, size, seed)
    wanted: dict[str, set[str]] = defaultdict(set)
    for ref in chosen:
        wanted[ref.shard].add(ref.key)
    samples = [sample for shard in files if shard in wanted for sample in _read_samples(shard, wanted[shard])]
    missing = len(chosen) - len(samples)
    if missing:
        raise ValueError(
            f"{missing} chosen samples could not be read back from the training shards (damaged tars?)"
        )
    if folder.exists():
        shutil.rmtree(folder)
    written = write_shards(
        samples, folder, prefix="subset", num_shards=num_shards, labels=_source_labels(files), write_info=True
    )
    counts: dict[int, int] = defaultdict(int)
    for ref in chosen:
        counts[ref.label] += 1
    record = {
        "settings": settings,
        "num_available": len(refs),
        "label_counts": {str(k): v for k, v in sorted(counts.items())},
        "samples": [asdict(ref) | {"shard": os.path.basename(ref.shard)} for ref in chosen],
    }
    (folder / SUBSET_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return Subset(str(folder), written, size, len(refs), dict(counts), reused=False)


def _read_samples(shard: str, keys: set[str]) -> list[tuple[str, str, bytes, dict[str, Any] | None]]:
    """`(key, ext, data, meta)` of the samples `keys` of one shard (the tolerant reader: damage costs only itself)."""
    out = []
    for sample in iter_tar_samples(shard):
        if sample.error is not None or sample.key not in keys:
            continue
        media = [ext for ext in sample.members if ext in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS]
        if not media:
            continue
        try:
            meta = json.loads(sample.members["json"]) if "json" in sample.members else None
        except ValueError:
            meta = None
        out.append((sample.key, media[0], sample.members[media[0]], meta))
    return out


def _read_subset_file(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / SUBSET_FILE).read_text())
    except (OSError, ValueError):
        return None


def _source_labels(files: Sequence[str]) -> list[str] | None:
    """The class names next to the source shards (labels.txt, else dataset_info.json), carried into the subset."""
    names, _ = find_label_names(files)
    return names or None
