"""Video classification accuracy as an `evaluate` metric: top-1, top-5 and mean-class accuracy.

Self-contained (no `bevt` import) because `evaluate.load` copies the file into its module cache and imports it
on its own. It ships inside the package and loads by path, so no Hub access is needed:

    >>> from bevt.metrics import load_video_accuracy
    >>> metric = load_video_accuracy()
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], references=[1, 2], top_k=[1, 2])
    {'top1_accuracy': 0.5, 'top2_accuracy': 0.5, 'mean_class_accuracy': 0.5}

Definitions (as in the evaluation of the official BEVT / mmaction2 code):

* `predictions` are per-class scores, one row per video (softmax probabilities averaged over views, or logits:
  only their order matters). A video counts as a top-k hit when its label is among the k highest scores; ties
  are broken by the lower class id. With fewer than k classes top-k accuracy is 1.
* `mean_class_accuracy` is the mean over the classes present in `references` of each class's recall (the
  fraction of its videos whose top-1 prediction is right). mmaction2 also averages zeros for classes that are
  predicted but absent from the references; on a full validation set every class is present and both agree.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Top-k accuracy and mean-class accuracy for (multi-view) video classification scores."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): per-class scores of each video, shape (num_videos, num_classes).
    references (`list[int]`): the true class id of each video.
    top_k (`list[int]`, defaults to [1, 5]): the k of each reported top-k accuracy.
Returns:
    `top{k}_accuracy` for every k, and `mean_class_accuracy`; floats in [0, 1].
"""

_CITATION = """@inproceedings{wang2022bevt,
  title={BEVT: BERT Pretraining of Video Transformers},
  author={Wang, Rui and Chen, Dongdong and Wu, Zuxuan and Chen, Yinpeng and Dai, Xiyang and Liu, Mengchen
          and Jiang, Yu-Gang and Zhou, Luowei and Yuan, Lu},
  booktitle={CVPR},
  year={2022}
}"""


def _check_inputs(scores: np.ndarray, labels: np.ndarray, top_k: list[int]) -> None:
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(
            f"predictions must be a non-empty (num_videos, num_classes) array of scores, got {scores.shape}"
        )
    if labels.shape != (scores.shape[0],):
        raise ValueError(
            f"references must hold one class id per prediction row ({scores.shape[0]}), got {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(
            f"references must be class ids in [0, {scores.shape[1]}) (the score columns), "
            f"got values in [{labels.min()}, {labels.max()}]"
        )
    if not np.isfinite(scores).all():
        raise ValueError("predictions contain NaN or infinite scores")
    if not top_k or any(isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 for k in top_k):
        raise ValueError(f"top_k must be a non-empty list of positive integers, got {top_k!r}")


def top_k_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(num_videos,) bool: label among the k highest scores (ties: lower class id first)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (order == labels[:, None]).any(axis=1)


def mean_class_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in `labels` of the per-class top-1 recall."""
    correct = top_k_hits(scores, labels, 1)
    classes = np.unique(labels)
    return float(np.mean([correct[labels == c].mean() for c in classes]))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VideoAccuracy(evaluate.Metric):
    """Top-k and mean-class accuracy of video classification scores."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://github.com/xyzforever/BEVT"],
        )

    def _compute(
        self, predictions, references, top_k: list[int] | tuple[int, ...] = (1, 5)
    ) -> dict[str, float]:
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        top_k = list(top_k)
        _check_inputs(scores, labels, top_k)
        result = {f"top{k}_accuracy": float(top_k_hits(scores, labels, k).mean()) for k in top_k}
        result["mean_class_accuracy"] = mean_class_accuracy(scores, labels)
        return result
