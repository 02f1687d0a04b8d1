"""benchmarks/transfer.py: runs end to end at a tiny budget and writes its table with every row; plans, names and
reuses its runs; draws the clips of its tasks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _transfer():
    """benchmarks/transfer.py as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import transfer
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return transfer


def _run_keys(tmp_path: Path, target: str, *argv: str) -> dict[str, str]:
    """name -> reuse key of every run that transfer.py plans for seed 0, joint `target` pretraining, no ablation."""
    transfer = _transfer()
    data = {split: str(tmp_path / split) for split in ("videos", "images", "train", "eval")}
    args = transfer.parse_args(["--seeds", "0", "--targets", target, "--frozen_embedding_targets",
                                "--ablation_target", "", *argv])  # fmt: skip
    phases, _ = transfer.plan(args, data, tmp_path / "runs")
    transfer.assign_versions(phases, "data")
    return {run.name: run.key for phase in phases for run in phase}


def test_transfer_benchmark_smoke_writes_every_row(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "transfer.py"), "--smoke", "--jobs", "1",
               "--output_dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "transfer_eval.json").read_text())
    table = (tmp_path / "transfer_eval.md").read_text()
    starts = [row["start"] for row in report["rows"]]
    expected = ["scratch", "joint-tokenizer", "joint-hog", "joint-pixel", "joint-random", "joint-tokenizer-frozen",
                "joint-pixel-frozen", "joint-random-frozen", "video-only-hog", "image-only-hog"]  # fmt: skip
    assert starts == expected
    for row in report["rows"]:
        assert row["pretraining"] in table
        for protocol in ("finetune", "probe"):  # every run of every row finished and was scored on the eval split
            (value,) = row[protocol]["values"]
            assert 0.0 <= value <= 1.0
            (fitted,) = row[protocol]["train_accuracy"]["values"]  # from the run's training_results.json
            assert 0.0 <= fitted <= 1.0
        if row["start"] != "scratch":
            assert row["pretraining_final"]["0"] is not None  # JSON keys are strings
    assert "training-clip accuracy" in table and "Per seed (0), %:" in table
    assert {"psnr", "codebook_usage"} <= set(report["tokenizers"]["0"])
    assert all(run["status"] == "done" for run in report["runs"].values())
    assert report["runs_now"] == len(report["runs"]) and report["runs_reused"] == 0
    assert report["run_machines"] == [report["machine"]] and "Runs finished" in table

    # --report_only keeps the runs' own dates, machine and run time (it ran nothing itself)
    again = subprocess.run([*command, "--report_only"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rewritten = json.loads((tmp_path / "transfer_eval.json").read_text())
    for key in ("runs_finished", "run_machines", "run_seconds"):
        assert rewritten[key] == report[key], key
    assert (rewritten["runs_now"], rewritten["runs_reused"]) == (0, len(report["runs"]))
    assert f"0 runs now and {len(report['runs'])} reused" in (tmp_path / "transfer_eval.md").read_text()
    assert [row["finetune"]["values"] for row in rewritten["rows"]] == [row["finetune"]["values"] for row in report["rows"]]


def test_a_changed_pretraining_is_not_reused_by_its_finetunings(tmp_path):
    """A fine-tuning's key follows its pretraining's (and a pretraining's its tokenizer's): changing the pretraining
    flags reruns the fine-tunings from it instead of reusing their stale results; scratch runs stay reused."""
    before = _run_keys(tmp_path, "tokenizer")
    after = _run_keys(tmp_path, "tokenizer", "--pretrain_extra=--mask_ratio 0.75")
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"pretrain-joint-tokenizer-s0", "finetune-joint-tokenizer-s0", "probe-joint-tokenizer-s0"}
    retrained = _run_keys(tmp_path, "tokenizer", "--tokenizer_steps", "3")  # the tokenizer's own argv changes: everything downstream reruns
    assert {n for n in before if before[n] != retrained[n]} == changed | {"tokenizer-s0"}


def test_shape_motion_task_labels_are_shape_and_direction(monkeypatch):
    """--task shape-motion (and shape-motion-plain, on a plain background; shape-motion-flat, a flat shape on a plain
    background): class 2 * shape + direction draws that shape (disc, square, triangle) moving right (even labels) or
    left (odd), where --task shapes draws a random shape doing the class's motion."""
    transfer = _transfer()
    import numpy as np

    import bevt.data.demo_pretraining as demo_pretraining

    drawn: list[tuple[str, int]] = []
    real_alpha, real_trajectory, real_texture = demo_pretraining._shape_alpha, transfer.trajectory, transfer._bright_texture
    monkeypatch.setattr(
        demo_pretraining, "_shape_alpha", lambda shape, *a: drawn.append(("shape", shape)) or real_alpha(shape, *a)
    )
    monkeypatch.setattr(
        transfer, "trajectory", lambda motion, *a: drawn.append(("motion", motion)) or real_trajectory(motion, *a)
    )
    monkeypatch.setattr(
        transfer, "_bright_texture", lambda kind, *a: drawn.append(("texture", kind)) or real_texture(kind, *a)
    )
    rng = np.random.default_rng(0)
    textures_drawn = {}
    for task in ("shape-motion", "shape-motion-plain", "shape-motion-flat"):
        monkeypatch.setattr(transfer, "TASK", task)
        for label, name in enumerate(transfer.SHAPE_MOTION_CLASS_NAMES):
            drawn.clear()
            clip = transfer.make_task_clip(label, rng, size=24, num_frames=4)
            assert clip.shape == (4, 24, 24, 3) and clip.dtype == np.uint8
            shapes = {value for kind, value in drawn if kind == "shape"}
            motions = [value for kind, value in drawn if kind == "motion"]
            assert shapes == {name.split()[0]} and motions == [label % 2]
            assert name.endswith("right" if label % 2 == 0 else "left")
            # shape-motion-plain: one background colour (the corner pixels of every frame agree)
            corners = clip[:, [0, 0, -1, -1], [0, -1, 0, -1]].reshape(-1, 3)
            assert (len(np.unique(corners, axis=0)) == 1) == (task != "shape-motion")
            textures_drawn.setdefault(task, set()).update(value for kind, value in drawn if kind == "texture")
    assert textures_drawn["shape-motion-flat"] == {"flat"} and len(textures_drawn["shape-motion"]) > 1


def test_a_second_finetuning_recipe_reuses_the_pretrainings(tmp_path):
    """--finetune_tag: the tagged recipe's fine-tunings are new runs beside the first recipe's, on the same
    pretrainings and probes (same names and keys)."""
    first = _run_keys(tmp_path, "hog")
    tag = ("--finetune_lr", "3e-3", "--finetune_extra=--layer_decay 0.75", "--finetune_tag", "lr3e-3_ld0.75")
    second = _run_keys(tmp_path, "hog", *tag)
    shared = {"pretrain-joint-hog-s0", "probe-scratch-s0", "probe-joint-hog-s0"}
    assert {n: first[n] for n in shared} == {n: second[n] for n in shared}
    assert set(second) - set(first) == {"finetune-lr3e-3_ld0.75-scratch-s0", "finetune-lr3e-3_ld0.75-joint-hog-s0"}
    with pytest.raises(SystemExit):
        _transfer().parse_args(["--finetune_tag", "../elsewhere"])


def test_unlabeled_data_size_is_a_flag_and_a_larger_set_extends_the_default_one(monkeypatch):
    """--unlabeled_videos / --unlabeled_images set the pretraining data (at least 1); the first clips of a larger
    unlabeled set are the default set's (one generator stream), so a larger set only adds clips."""
    transfer = _transfer()
    args = transfer.parse_args(["--unlabeled_videos", "2048", "--unlabeled_images", "64"])
    assert (args.sizes.unlabeled_videos, args.sizes.unlabeled_images) == (2048, 64)
    assert transfer.parse_args([]).sizes == transfer.DataSizes()
    for bad in (["--unlabeled_videos", "0"], ["--unlabeled_images", "-3"]):
        with pytest.raises(SystemExit):
            transfer.parse_args(bad)
    monkeypatch.setattr(transfer, "encode_mp4", lambda clip, bit_rate=None: clip.tobytes())
    monkeypatch.setattr(transfer, "make_task_clip", lambda label, rng: rng.integers(0, 255, (2, 4, 4, 3), dtype="uint8"))
    small = [bytes_ for _, _, bytes_, _ in transfer._labeled_samples(3, 1234, "unlabeled", with_labels=False)]
    large = [bytes_ for _, _, bytes_, _ in transfer._labeled_samples(5, 1234, "unlabeled", with_labels=False)]
    assert large[:3] == small and len(set(large)) == 5


def test_runs_keep_their_keys_when_the_output_folder_is_moved(tmp_path):
    """A copied or moved output folder is reused there: paths under --output_dir do not enter the keys; paths
    elsewhere and every other argument still do."""
    here = _run_keys(tmp_path / "a", "tokenizer")
    moved = _run_keys(tmp_path / "elsewhere" / "b", "tokenizer")
    assert here == moved and len(here) == 6  # tokenizer, pretraining, 2 fine-tunings, 2 probes
    transfer = _transfer()
    run = transfer.Run("x", "run_finetuning.py", ["--train_shards", "/data/train", "--output_dir", "/o/runs/x"],
                       Path("/o/runs/x"), root=Path("/o"))  # fmt: skip
    other = transfer.Run("x", "run_finetuning.py", ["--train_shards", "/data2/train", "--output_dir", "/p/runs/x"],
                         Path("/p/runs/x"), root=Path("/p"))  # fmt: skip
    assert run.key != other.key  # the shards outside the output folder differ
    sibling = transfer.Run("x", "run_finetuning.py", ["--train_shards", "/o2/train", "--output_dir", "/o/runs/x"],
                           Path("/o/runs/x"), root=Path("/o"))  # fmt: skip
    assert transfer._relative_to("/o2/train", Path("/o")) == "/o2/train" and sibling.key != run.key
