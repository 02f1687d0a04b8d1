"""benchmarks/transfer.py runs end to end at a tiny budget and writes its table with every row."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_transfer_benchmark_smoke_writes_every_row(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "transfer.py"), "--smoke", "--jobs", "1",
               "--output_dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "transfer_eval.json").read_text())
    table = (tmp_path / "transfer_eval.md").read_text()
    starts = [row["start"] for row in report["rows"]]
    expected = ["scratch", "joint-tokenizer", "joint-hog", "joint-pixel", "joint-random", "video-only-hog",
                "image-only-hog"]  # fmt: skip
    assert starts == expected
    for row in report["rows"]:
        assert row["pretraining"] in table
        for protocol in ("finetune", "probe"):  # every run of every row finished and was scored on the eval split
            (value,) = row[protocol]["values"]
            assert 0.0 <= value <= 1.0
        if row["start"] != "scratch":
            assert row["pretraining_final"]["0"] is not None  # JSON keys are strings
    assert {"psnr", "codebook_usage"} <= set(report["tokenizers"]["0"])
    assert all(run["status"] == "done" for run in report["runs"].values())
