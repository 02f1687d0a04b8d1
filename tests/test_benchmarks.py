"""The benchmark scripts stay correct: the reference implementation computes our math, the GPU script runs."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from reference_bevt import reference_pretraining_loss  # noqa: E402

from bevt import BEVTConfig, BEVTForMaskedVideoModeling  # noqa: E402


def test_reference_matches_model_loss_and_gradients():
    torch.manual_seed(0)
    model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test", drop_path_rate=0.0))
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name:
            p.data.normal_(std=1.0)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "pixel_values": torch.randn(2, 8, 3, 64, 64, generator=g),
        "bool_masked_pos": torch.rand(2, 4, 4, 4, generator=g) < 0.5,
        "labels": torch.randint(0, 64, (2, 8, 4, 4), generator=g),
        "image_pixel_values": torch.randn(3, 3, 64, 64, generator=g),
        "image_bool_masked_pos": torch.rand(3, 4, 4, generator=g) < 0.5,
        "image_labels": torch.randint(0, 64, (3, 4, 4), generator=g),
    }
    ours = model(**inputs, return_logits=True)
    ours.loss.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss, video_logits, image_logits = reference_pretraining_loss(model, **inputs)
    loss.backward()
    torch.testing.assert_close(ours.loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.logits, video_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.image_logits, image_logits, atol=1e-4, rtol=1e-4)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-4, rtol=1e-3, msg=name)


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_benchmark.py"), "--smoke", "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    train = report["train"][0]
    assert train["step_s"] > 0 and 0 < train["tokenizer_share"] < 1 and train["step_tflop"] > 0
    assert report["inference"]["clips_per_s"] > 0
    versus = report["train_vs_reference"]  # same math: the bf16 losses agree to bf16 precision
    assert versus["speedup_vs_reference"] > 0 and versus["loss_abs_diff"] < 0.05
