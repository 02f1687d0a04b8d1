"""Representation evaluation as SSL users expect it (issue 13, section 2): linear probing (frozen backbone,
BatchNorm + linear, folded for export), head-only training, fixed seeded low-label subsets, and epochs over shards
that have no dataset_info.json (samples counted from the tar headers)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_script
from safetensors.torch import load_file

from bevt import BEVTConfig, BEVTForVideoClassification
from bevt.data.shards import iter_shard, load_dataset_info
from bevt.data.streaming import build_stream, counted_examples
from bevt.data.subsets import (
    SampleRef,
    choose_balanced_subset,
    count_samples,
    index_labelled_samples,
    write_training_subset,
)
from bevt.finetuning import folded_classifier, freeze_backbone

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_script("run_finetuning.py")


# ----------------------------------------------------------------------------------------------- counting, subsets


def test_counting_from_tar_headers_matches_dataset_info(finetuning_demo_data, tmp_path):
    train = finetuning_demo_data / "train"
    info = load_dataset_info(train)
    for shard in info["shards"]:
        assert count_samples(train / shard["file"], "video") == shard["num_samples"]
        assert count_samples(train / shard["file"], "image") == 0
    bare = tmp_path / "bare"
    bare.mkdir()
    for shard in info["shards"]:  # shards made by another tool: no dataset_info.json next to them
        shutil.copy(train / shard["file"], bare / shard["file"])
    stream = build_stream(bare, kind="video")
    assert stream.total_examples is None
    assert counted_examples(stream) == info["num_samples"] == 48 and stream.total_examples == 48
    assert stream.num_examples == 48


def test_balanced_subset_is_seeded_even_over_classes_and_order_independent():
    refs = [SampleRef(f"/d/s{i % 3}.tar", f"k{i:03d}", label) for i, label in enumerate([0] * 10 + [1] * 10 + [2] * 2)]
    chosen = choose_balanced_subset(refs, 9, seed=0)
    counts = {label: sum(r.label == label for r in chosen) for label in (0, 1, 2)}
    assert counts == {0: 4, 1: 3, 2: 2} or counts == {0: 3, 1: 4, 2: 2}  # the small class gives all it has
    assert choose_balanced_subset(list(reversed(refs)), 9, seed=0) == chosen  # listing order does not matter
    assert choose_balanced_subset(refs, 9, seed=1) != chosen
    assert len(set(choose_balanced_subset(refs, 22, seed=0))) == 22
    with pytest.raises(ValueError, match="cannot choose 23 of 22"):
        choose_balanced_subset(refs, 23, seed=0)


def test_training_subset_is_written_once_reused_and_rewritten_when_settings_change(finetuning_demo_data, tmp_path):
    train = finetuning_demo_data / "train"
    folder = tmp_path / "subset"
    subset = write_training_subset(train, folder, size=12, seed=3, num_shards=2)
    assert not subset.reused and subset.num_samples == 12 and subset.num_available == 48
    assert subset.label_counts == dict.fromkeys(range(6), 2)
    info = load_dataset_info(folder)
    assert [s["num_samples"] for s in info["shards"]] == [6, 6]
    assert info["labels"] == load_dataset_info(train)["labels"]
    # the subset's samples are byte-identical copies of the chosen source samples
    source = {key: (ext, data, meta) for shard in sorted(train.glob("*.tar")) for key, ext, data, meta in iter_shard(shard)}
    recorded = json.loads((folder / "subset.json").read_text())["samples"]
    copied = [sample for shard in subset.shards for sample in iter_shard(shard)]
    assert sorted(s[0] for s in copied) == sorted(r["key"] for r in recorded)
    for key, ext, data, meta in copied:
        assert (ext, data, meta) == source[key]
    again = write_training_subset(train, folder, size=12, seed=3, num_shards=2)
    assert again.reused and again.shards == subset.shards
    other = write_training_subset(train, folder, fraction=0.25, seed=4, num_shards=2)
    assert not other.reused and other.num_samples == 12
    assert json.loads((folder / "subset.json").read_text())["samples"] != recorded
    with pytest.raises(ValueError, match="49 samples asked, but the training shards hold 48"):
        write_training_subset(train, tmp_path / "x", size=49)
    with pytest.raises(ValueError, match="exactly one of size and fraction"):
        write_training_subset(train, tmp_path / "x", size=4, fraction=0.5)
    assert len(index_labelled_samples(sorted(str(p) for p in train.glob("*.tar")))) == 48


# ----------------------------------------------------------------------------------------------- frozen backbone


def _classifier(num_labels: int = 3) -> BEVTForVideoClassification:
    config = BEVTConfig.from_preset("test", num_labels=num_labels, classifier_dropout=0.0)
    return BEVTForVideoClassification(config)


def test_linear_probe_trains_only_batchnorm_linear_and_folds_exactly():
    model = _classifier()
    backbone = {k: v.clone() for k, v in model.bevt.state_dict().items()}
    frozen = freeze_backbone(model, batchnorm=True)
    assert frozen == sum(1 for _ in model.bevt.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.1.weight", "classifier.1.bias"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    video = torch.randn(4, 8, 3, 64, 64)
    model.train()
    for _ in range(3):
        model.bevt.eval()
        loss = model(video, labels=torch.tensor([0, 1, 2, 0])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, value in model.bevt.state_dict().items():
        torch.testing.assert_close(value, backbone[key], rtol=0, atol=0)
    norm = model.classifier[0]
    assert norm.num_batches_tracked == 3 and not torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))

    model.eval()
    with torch.no_grad():
        expected = model(video).logits
        with folded_classifier(model) as plain:
            assert isinstance(plain.classifier, torch.nn.Linear)
            folded = plain(video).logits
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(model.classifier, torch.nn.Sequential)  # restored after the block


def test_freeze_backbone_keeps_the_plain_head():
    model = _classifier()
    freeze_backbone(model)
    assert isinstance(model.classifier, torch.nn.Linear)
    with folded_classifier(model) as same:
        assert same.classifier is model.classifier


def test_probe_flags(script):
    args = script.parse_args(["--train_shards", "x.tar", "--linear_probe"])
    assert args.frozen_backbone and args.linear_probe
    assert (args.classifier_dropout, args.weight_decay, args.label_smoothing, args.ema_decay) == (0.0, 0.0, 0.0, 0.0)
    ssv2 = script.parse_args(["--recipe", "ssv2", "--train_shards", "x.tar", "--linear_probe", "--weight_decay", "0.01"])
    assert ssv2.randaug is None and ssv2.random_erasing == 0.0 and ssv2.weight_decay == 0.01  # a given flag wins
    plain = script.parse_args(["--train_shards", "x.tar", "--freeze_backbone"])
    assert plain.frozen_backbone and not plain.linear_probe and plain.classifier_dropout == 0.5
    for argv, message in [
        (["--max_train_samples", "4", "--train_fraction", "0.5"], "--train_fraction must be omitted with"),
        (["--train_fraction", "1.5"], r"--train_fraction must be in \(0, 1\]"),
        (["--max_train_samples", "0"], "--max_train_samples must be a positive integer"),
        (["--linear_probe", "--per_device_train_batch_size", "1"], "--per_device_train_batch_size must be >= 2"),
    ]:
        with pytest.raises(SystemExit, match=message):
            script.parse_args(["--train_shards", "x.tar", *argv])


# ----------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_linear_probe_on_a_seeded_subset_end_to_end(tmp_path, finetuning_demo_data, tiny_pretrained_folder):
    out = tmp_path / "probe"
    data = finetuning_demo_data
    command = [
        sys.executable, str(REPO / "run_finetuning.py"), "--model_name_or_path", str(tiny_pretrained_folder),
        "--train_shards", str(data / "train"), "--validation_shards", str(data / "validation"),
        "--linear_probe", "--max_train_samples", "12", "--image_size", "32", "--short_side", "36",
        "--sampling", "uniform", "--flip_prob", "0", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "1", "--num_train_epochs", "2",
        "--warmup_epochs", "0", "--learning_rate", "1e-2", "--eval_num_clips", "1", "--eval_num_crops", "1",
        "--num_workers", "0", "--logging_steps", "1", "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    log = result.stderr
    assert "Training subset: 12 of 48 labelled training clips (6 classes, 2 per class)" in log
    assert "Protocol: linear probe" in log
    assert "12 training clips, 4 per optimizer step; 3 steps per epoch" in log  # an epoch is the subset

    # the export is a plain classifier whose backbone is the pretrained one, untouched
    weights = load_file(out / "model.safetensors")
    assert {"classifier.weight", "classifier.bias"} <= set(weights) and not any(".0." in k for k in weights if k.startswith("classifier"))
    pretrained = load_file(tiny_pretrained_folder / "model.safetensors")
    for key, value in weights.items():
        if key.startswith("bevt."):
            torch.testing.assert_close(value, pretrained[key], rtol=0, atol=0)
    model = BEVTForVideoClassification.from_pretrained(out)
    assert isinstance(model.classifier, torch.nn.Linear)
    card = (out / "README.md").read_text()
    assert "linear probe (frozen backbone, BatchNorm + linear classifier)" in card
    # the exported (folded) model scores the validation set as the evaluation during training did
    again = subprocess.run(
        [sys.executable, str(REPO / "run_finetuning.py"), "--do_eval_only", "--model_name_or_path", str(out),
         "--validation_shards", str(data / "validation"), "--eval_num_clips", "1", "--eval_num_crops", "1",
         "--num_workers", "0", "--output_dir", str(tmp_path / "eval")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    during = json.loads((out / "eval_results.json").read_text())["metrics"]
    after = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["metrics"]
    assert after == pytest.approx(during, abs=1e-6)
    results = json.loads((out / "training_results.json").read_text())
    assert (results["mode"], results["max_train_samples"], results["steps"]) == ("linear_probe", 12, 6)
    assert results["samples"] == {"video": 6 * 4} and 0.0 <= results["final_window"]["accuracy"] <= 1.0
