"""Multi-view video classification evaluation: every validation video scored on clips x crops, softmax scores
averaged over its views, predictions gathered once across ranks, metrics from the bundled `evaluate` metric.

- `MultiViewEvaluator`: the validation shards of this rank -> `(metrics, predictions)` on every rank, and the JSON
  report (`report`); what `run_finetuning.py` evaluates with during training and in `--do_eval_only`.
- Pieces: `MultiViewEvalTransform` (clips x crops per video through `BEVTVideoProcessor`), `predict_multiview`,
  `gather_predictions` (one `gather_object`, so ranks may hold different numbers of videos), `compute_metrics`,
  `confusion_matrix`, `save_confusion_matrix_png` (PIL), `evaluation_report`, `write_eval_outputs`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.logging import get_logger
from torch import nn

from ..data.streaming import StreamDataLoader, build_stream
from .arguments import UsageError

__all__ = [
    "MultiViewEvalTransform",
    "MultiViewEvaluator",
    "Predictions",
    "compute_metrics",
    "confusion_matrix",
    "evaluation_report",
    "gather_predictions",
    "is_better",
    "predict_multiview",
    "save_confusion_matrix_png",
    "write_eval_outputs",
    "write_json",
]

logger = get_logger(__name__)


class MultiViewEvalTransform:
    """Stream transform for evaluation: clips `uint8 (T, H, W, 3)` or `(num_clips, T, H, W, 3)` -> every view
    `pixel_values` `(num_clips * num_crops, T, 3, S, S)` (clip-major, as `BEVTVideoProcessor` orders them).

    `processor` (a `BEVTVideoProcessor`) does the geometry: short side to `size["shortest_edge"]`, then the centre
    crop (`num_crops=1`) or three crops along the long side (`num_crops=3`), rescale and normalisation.
    """

    def __init__(self, processor: Any, num_crops: int = 1) -> None:
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops!r}")
        self.processor = processor
        self.num_crops = num_crops

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_crops={self.num_crops}, processor={type(self.processor).__name__})"

    def __call__(
        self, clips: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        clips = torch.as_tensor(clips)
        if clips.ndim == 4:
            clips = clips[None]
        if clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(
                f"expected clips (T, H, W, 3) or (num_clips, T, H, W, 3), got {tuple(clips.shape)}"
            )
        out = self.processor(
            list(clips), do_sample_frames=False, num_clips=1, num_crops=self.num_crops, return_tensors="pt"
        )
        return {"pixel_values": out["pixel_values"]}


@dataclass
class Predictions:
    """Per-video results: sample keys, view-averaged class probabilities `(N, C)` and true labels `(N,)`."""

    keys: list[str]
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def concatenate(cls, parts: Iterable[Predictions], num_labels: int) -> Predictions:
        """Merge parts, dropping repeated keys (first wins), sorted by key (same order on every rank)."""
        seen: dict[str, tuple[np.ndarray, int]] = {}
        for part in parts:
            for key, score, label in zip(part.keys, part.scores, part.labels):
                seen.setdefault(key, (score, int(label)))
        keys = sorted(seen)
        scores = np.stack([seen[k][0] for k in keys]) if keys else np.zeros((0, num_labels), np.float32)
        labels = np.asarray([seen[k][1] for k in keys], dtype=np.int64)
        return cls(keys, scores.astype(np.float32), labels)


@torch.no_grad()
def predict_multiview(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    device: torch.device | str,
    max_views_per_forward: int | None = None,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> Predictions:
    """Run `model` on every view of every video and average the softmax scores over each video's views.

    Args:
        model: a video classifier (called as `model(pixel_values=...)`, returning `.logits`); put in eval mode here.
        batches: dicts with `pixel_values` `(B, V, T, 3, S, S)`, `labels` `(B,)`, `__key__` (list of B keys).
        device: where to run.
        max_views_per_forward: split the `B * V` views into forward passes of at most this many (memory bound).
        autocast: a context-manager factory (e.g. `accelerator.autocast`) for mixed precision.
    """
    was_training = model.training
    model.eval()
    keys: list[str] = []
    scores: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    context = autocast or nullcontext
    try:
        for batch in batches:
            pixel_values = batch["pixel_values"]
            if pixel_values.ndim != 6:
                raise ValueError(
                    f"evaluation batches need pixel_values (batch, views, frames, 3, H, W), got {tuple(pixel_values.shape)}"
                )
            num_videos, num_views = pixel_values.shape[:2]
            views = pixel_values.flatten(0, 1)
            chunk = max_views_per_forward or views.shape[0]
            logits = []
            for part in views.split(chunk):
                with context():
                    logits.append(model(pixel_values=part.to(device, non_blocking=True)).logits.float())
            probs = torch.cat(logits).softmax(-1).view(num_videos, num_views, -1).mean(1)
            scores.append(probs.cpu())
            labels.append(torch.as_tensor(batch["labels"]).cpu().long())
            keys.extend(batch["__key__"])
    finally:
        model.train(was_training)
    if not keys:
        return Predictions([], np.zeros((0, 0), np.float32), np.zeros((0,), np.int64))
    return Predictions(keys, torch.cat(scores).numpy(), torch.cat(labels).numpy())


def gather_predictions(accelerator: Any, local: Predictions, num_labels: int) -> Predictions:
    """Every rank's predictions on every rank (one `gather_object`; ranks may hold different counts)."""
    parts = [local]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([local])
    parts = [p for p in parts if len(p)]
    return Predictions.concatenate(parts, num_labels)


def compute_metrics(metric: Any, predictions: Predictions, top_k: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k and mean-class accuracy through the bundled `evaluate` metric (`bevt.metrics.load_video_accuracy()`)."""
    if len(predictions) == 0:
        raise ValueError("no evaluation samples: the validation shards gave no decodable, labelled video")
    return metric.compute(predictions=predictions.scores, references=predictions.labels, top_k=list(top_k))


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts `(num_labels, num_labels)`: rows true class, columns predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ in shape")
    for name, values in (("labels", labels), ("predictions", predicted)):
        if values.size and (values.min() < 0 or values.max() >= num_labels):
            raise ValueError(
                f"{name} must be class ids in [0, {num_labels}), got [{values.min()}, {values.max()}]"
            )
    return np.bincount(labels * num_labels + predicted, minlength=num_labels * num_labels).reshape(
        num_labels, num_labels
    )


def _cell_colour(fraction: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1)."""
    low, high = np.array([255, 255, 255]), np.array([8, 48, 107])
    return tuple(int(v) for v in np.round(low + (high - low) * min(max(fraction, 0.0), 1.0)))


def draw_length(font: Any, text: str) -> float:
    """Width in pixels of `text` drawn with a PIL font."""
    return font.getlength(text) if hasattr(font, "getlength") else 6 * len(text)


def save_confusion_matrix_png(
    matrix: np.ndarray, label_names: Sequence[str], path: str | Path, title: str = "Confusion matrix"
) -> Path:
    """Draw a row-normalised confusion matrix (rows: true class, columns: predicted) as a PNG with PIL.

    Cells are shaded by the fraction of the row; with up to 40 classes the rows carry the class names and the cells
    their percentage (when large enough). Any number of classes works (cells shrink down to 1 pixel).
    """
    from PIL import Image, ImageDraw, ImageFont

    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    if matrix.shape != (n, n) or n != len(label_names):
        raise ValueError(
            f"matrix {matrix.shape} must be square with one row per class name ({len(label_names)})"
        )
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    cell = int(min(48, max(1, 800 // max(n, 1))))
    font = ImageFont.load_default()
    names = [name if len(name) <= 48 else name[:47] + "~" for name in label_names] if n <= 40 else []
    name_width = int(max((draw_length(font, name) for name in names), default=0))
    top, left = 40, name_width + 16
    width, height = left + n * cell + 10, top + n * cell + 10
    image = Image.new("RGB", (max(width, 360), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black", font=font)
    draw.text(
        (10, 22), "rows: true class, columns: predicted class (row-normalised)", fill="dimgray", font=font
    )
    for i in range(n):
        for j in range(n):
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_cell_colour(rows[i, j]))
            if cell >= 28 and matrix[i, j] > 0:
                colour = "white" if rows[i, j] > 0.5 else "black"
                draw.text((x0 + 3, y0 + cell // 2 - 5), f"{100 * rows[i, j]:.0f}", fill=colour, font=font)
        if names:
            draw.text((8, top + i * cell + max(cell // 2 - 5, 0)), names[i], fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def evaluation_report(
    predictions: Predictions,
    metrics: Mapping[str, float],
    label_names: Sequence[str],
    **details: Any,
) -> dict[str, Any]:
    """A JSON-ready report: metrics, per-class accuracy (None for classes absent from the data), the confusion
    matrix (counts) and any `details` (model, shards, views...)."""
    num_labels = len(label_names)
    predicted = predictions.scores.argmax(axis=1) if len(predictions) else np.zeros((0,), np.int64)
    matrix = confusion_matrix(predictions.labels, predicted, num_labels)
    totals = matrix.sum(axis=1)
    per_class = {
        name: (float(matrix[i, i] / totals[i]) if totals[i] else None) for i, name in enumerate(label_names)
    }
    return {
        **details,
        "num_videos": len(predictions),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "per_class_accuracy": per_class,
        "label_names": list(label_names),
        "confusion_matrix": matrix.tolist(),
    }


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON (NaN-free floats expected)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    return path


def is_better(value: float, best: float | None) -> bool:
    """Higher is better; NaN never is."""
    return not math.isnan(value) and (best is None or value > best)


def write_eval_outputs(
    folder: str | Path, report: dict[str, Any], label_names: Sequence[str], title: str
) -> None:
    """`eval_results.json` + `confusion_matrix.png` in `folder` (call on the main process)."""
    folder = Path(folder)
    write_json(folder / "eval_results.json", report)
    top1 = report["metrics"].get("top1_accuracy")
    caption = f"{title} - top-1 {100 * top1:.2f}%" if top1 is not None else title
    save_confusion_matrix_png(
        report["confusion_matrix"], label_names, folder / "confusion_matrix.png", caption
    )


class MultiViewEvaluator:
    """Scores every video of the validation shards on `num_clips` clips x `num_crops` crops.

    Each rank reads its part of the shards (in order, no shuffling) and scores it; the predictions are gathered once,
    so every rank gets all videos' metrics. Evaluating never changes the training's random stream.

    Args:
        accelerator: the run's `Accelerator` (device, rank, autocast).
        shards: validation shard globs, folders or files.
        label_names: class names in index order.
        processor: the `BEVTVideoProcessor` that makes the views (short side, crops, normalisation).
        num_clips, num_crops: views per video (`num_crops` 1: centre crop; 3: along the long side).
        clip_len, frame_interval, sampling: frame sampling of each clip (`bevt.frame_sampling`).
        batch_size: videos per forward pass (each with all its views); `max_views_per_forward` splits them.
        num_workers, seed: data loading.
        details: extra fields of the JSON report (e.g. the input size).
        stream_options: further `build_stream` keywords (remote shards: cache, retries, storage options).
    """

    def __init__(
        self,
        accelerator: Any,
        shards: str | Sequence[str],
        label_names: Sequence[str],
        processor: Any,
        *,
        num_clips: int,
        num_crops: int,
        clip_len: int,
        frame_interval: int,
        sampling: str,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        max_views_per_forward: int | None = None,
        details: Mapping[str, Any] | None = None,
        stream_options: Mapping[str, Any] | None = None,
    ) -> None:
        from ..metrics import load_video_accuracy

        self.accelerator = accelerator
        self.shards = [str(s) for s in ([shards] if isinstance(shards, str) else shards)]
        self.label_names = list(label_names)
        self.num_views = (num_clips, num_crops)
        self.max_views_per_forward = max_views_per_forward
        self.details = {
            "num_frames": clip_len,
            "frame_interval": frame_interval,
            "sampling": sampling,
            **(details or {}),
        }
        self.metric = load_video_accuracy()
        try:
            stream = build_stream(
                self.shards,
                kind="video",
                transform=MultiViewEvalTransform(processor, num_crops),
                clip_len=clip_len,
                frame_interval=frame_interval,
                sampling=sampling,
                num_clips=num_clips,
                test_mode=True,
                shuffle_buffer=0,
                shuffle_shards=False,
                seed=seed,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
                repeat=False,
                require_label=True,
                **dict(stream_options or {}),
            )
        except (OSError, ValueError, ImportError) as err:  # missing files, unreachable URLs, a missing backend
            raise UsageError(f"--validation_shards: {err}") from None
        self.loader = StreamDataLoader(stream, batch_size, num_workers=num_workers, drop_last=False)

    def run(self, model: nn.Module) -> tuple[dict[str, float], Predictions]:
        """Metrics and predictions of `model` (unwrapped) on all validation videos. Call on every rank."""
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # evaluating never changes the training's random stream
            local = predict_multiview(
                model,
                self.loader,
                self.accelerator.device,
                max_views_per_forward=self.max_views_per_forward,
                autocast=self.accelerator.autocast,
            )
        predictions = gather_predictions(self.accelerator, local, len(self.label_names))
        if len(predictions) and predictions.labels.max() >= len(self.label_names):
            raise UsageError(
                f"--validation_shards hold label {predictions.labels.max()} but there are only "
                f"{len(self.label_names)} class names (--label_names)"
            )
        metrics = compute_metrics(self.metric, predictions, top_k=(1, 5))
        logger.info(
            f"evaluated {len(predictions)} videos x {self.num_views[0] * self.num_views[1]} views in "
            f"{time.perf_counter() - started:.1f}s: "
            + ", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items())
            + f" (skipped samples: {self.loader.stats.num_failed})"
        )
        return metrics, predictions

    def report(self, predictions: Predictions, metrics: dict[str, float], **details: Any) -> dict[str, Any]:
        """The JSON report of one evaluation (`evaluation_report` + the shards, views and clip settings)."""
        return evaluation_report(
            predictions,
            metrics,
            self.label_names,
            validation_shards=self.shards,
            num_clips=self.num_views[0],
            num_crops=self.num_views[1],
            **self.details,
            skipped_samples=self.loader.stats.num_failed,
            **details,
        )
