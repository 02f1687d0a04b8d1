"""Data layer: shards/streaming, train transforms, the pretraining collator (decoding and frame sampling live in
the top-level ``bevt.video_decoding`` and ``bevt.frame_sampling``, which saved model folders carry for the video
processor).

Import submodules directly (``from bevt.data.streaming import build_stream``); the names below are also
reachable here, loaded lazily so that ``import bevt.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ShardWriter": "bevt.data.shards",
    "write_shards": "bevt.data.shards",
    "build_stream": "bevt.data.streaming",
    "StreamDataLoader": "bevt.data.streaming",
    "DataQualityError": "bevt.data.streaming",
    "BEVTPretrainingCollator": "bevt.data.collator",
    "PretrainingVideoTransform": "bevt.data.transforms",
    "PretrainingImageTransform": "bevt.data.transforms",
    "VideoClassificationTrainTransform": "bevt.data.transforms",
    "mixup_cutmix": "bevt.data.transforms",
    "TokenizerTrainingTransform": "bevt.data.transforms",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
