"""Data layer: decoding, frame sampling, shards/streaming, train transforms, the pretraining collator.

Import submodules directly (``from bevt.data.decoding import VideoReader``); the names below are also
reachable here, loaded lazily so that ``import bevt.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "VideoDecodingError": "decoding",
    "VideoReader": "decoding",
    "available_backends": "decoding",
    "decode_image": "decoding",
    "decode_video": "decoding",
    "get_num_frames": "decoding",
    "sample_frame_indices": "sampling",
    "ShardWriter": "shards",
    "write_shards": "shards",
    "build_stream": "streaming",
    "StreamDataLoader": "streaming",
    "DataQualityError": "streaming",
    "BEVTPretrainingCollator": "collator",
    "PretrainingVideoTransform": "transforms",
    "PretrainingImageTransform": "transforms",
    "TokenizerTrainingTransform": "transforms",
    "VideoClassificationTrainTransform": "transforms",
    "mixup_cutmix": "transforms",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
