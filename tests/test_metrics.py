"""The bundled `evaluate` metric (top-1, top-5, mean-class accuracy): loaded offline by path, checked against values
computed by hand."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from bevt.metrics import VIDEO_ACCURACY_PATH, load_video_accuracy


@pytest.fixture(scope="module")
def metric():
    return load_video_accuracy()


# 6 videos, 6 classes. Rows are scores; the label of each video and where it ranks are noted.
SCORES = np.array(
    [
        [0.50, 0.20, 0.10, 0.10, 0.05, 0.05],  # label 0: rank 1
        [0.30, 0.40, 0.10, 0.10, 0.05, 0.05],  # label 0: rank 2
        [0.05, 0.60, 0.10, 0.10, 0.10, 0.05],  # label 1: rank 1
        [0.01, 0.02, 0.03, 0.04, 0.05, 0.85],  # label 1: rank 5 (0.02 beats only 0.01)
        [0.10, 0.10, 0.10, 0.10, 0.10, 0.50],  # label 2: ties at 0.10 -> lower ids first: ids 0,1,2 -> rank 4
        [0.00, 0.00, 0.00, 0.00, 0.00, 1.00],  # label 3: ties at 0 -> ranks 2,3,4,5 for ids 0..3 -> rank 5
    ]
)
LABELS = [0, 0, 1, 1, 2, 3]


def test_hand_computed_top_k_and_mean_class_accuracy(metric):
    result = metric.compute(predictions=SCORES, references=LABELS, top_k=[1, 2, 4, 5])
    # top-1 hits: videos 0, 2 -> 2/6; top-2 adds video 1 -> 3/6; top-4 adds video 4 -> 4/6; top-5 all -> 6/6.
    assert result["top1_accuracy"] == pytest.approx(2 / 6)
    assert result["top2_accuracy"] == pytest.approx(3 / 6)
    assert result["top4_accuracy"] == pytest.approx(4 / 6)
    assert result["top5_accuracy"] == pytest.approx(6 / 6)
    # per-class top-1 recall over the classes present (0, 1, 2, 3): 1/2, 1/2, 0, 0 -> mean 0.25.
    assert result["mean_class_accuracy"] == pytest.approx(0.25)


def test_default_top_k_is_1_and_5_and_batches_accumulate(metric):
    for start in range(0, 6, 2):
        metric.add_batch(predictions=SCORES[start : start + 2].tolist(), references=LABELS[start : start + 2])
    result = metric.compute()
    assert set(result) == {"top1_accuracy", "top5_accuracy", "mean_class_accuracy"}
    assert result["top1_accuracy"] == pytest.approx(2 / 6) and result["top5_accuracy"] == pytest.approx(1.0)


def test_top_k_beyond_the_number_of_classes_is_one_and_logits_work(metric):
    logits = np.log(np.array([[0.7, 0.3], [0.6, 0.4]]))  # any monotonic scores rank the same way
    result = metric.compute(predictions=logits, references=[1, 0], top_k=[1, 5])
    assert result == {"top1_accuracy": 0.5, "top5_accuracy": 1.0, "mean_class_accuracy": 0.5}


def test_mean_class_accuracy_weights_classes_not_videos(metric):
    # class 0: 3 videos all right; class 1: 1 video wrong -> video accuracy 3/4, class mean (1 + 0) / 2.
    scores = [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]
    result = metric.compute(predictions=scores, references=[0, 0, 0, 1], top_k=[1])
    assert result["top1_accuracy"] == pytest.approx(0.75)
    assert result["mean_class_accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("predictions", "references", "top_k", "message"),
    [
        ([[0.5, 0.5]], [2], [1], r"class ids in \[0, 2\)"),
        ([[0.5, 0.5]], [-1], [1], r"class ids in \[0, 2\)"),
        ([[0.5, float("nan")]], [0], [1], "NaN or infinite"),
        ([[0.5, 0.5]], [0], [0], "positive integers"),
    ],
)
def test_bad_inputs_raise_clear_errors(metric, predictions, references, top_k, message):
    with pytest.raises(ValueError, match=message):
        metric.compute(predictions=predictions, references=references, top_k=top_k)


def test_the_metric_ships_with_the_package_and_loads_offline_in_a_fresh_process(tmp_path):
    assert VIDEO_ACCURACY_PATH.is_file() and VIDEO_ACCURACY_PATH.parent.name == "metrics"
    code = (
        "import evaluate, sys; m = evaluate.load(sys.argv[1]); "
        "print(m.compute(predictions=[[0.2, 0.8], [0.9, 0.1]], references=[1, 1], top_k=[1])['top1_accuracy'])"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # empty cache: nothing can come from an earlier download
    }
    result = subprocess.run(
        [sys.executable, "-c", code, str(VIDEO_ACCURACY_PATH)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "0.5"
