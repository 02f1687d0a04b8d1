"""Evaluation metrics shipped with bevt as `evaluate` modules, loaded by path (no Hub access)."""

from pathlib import Path

import evaluate

VIDEO_ACCURACY_PATH = Path(__file__).with_name("video_accuracy.py")
"""Path of the video accuracy metric script (top-1, top-5, mean-class accuracy)."""

__all__ = ["VIDEO_ACCURACY_PATH", "load_video_accuracy"]


def load_video_accuracy(**kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of the bundled video accuracy metric (works offline); kwargs go to `evaluate.load`."""
    return evaluate.load(str(VIDEO_ACCURACY_PATH), **kwargs)
