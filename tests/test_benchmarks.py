"""The benchmark scripts stay correct: the reference implementation computes our math, the GPU script runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from helpers import tiny_pretraining_inputs  # noqa: E402
from reference_bevt import reference_pretraining_loss  # noqa: E402

from bevt import BEVTConfig, BEVTForMaskedVideoModeling  # noqa: E402


def test_reference_matches_model_loss_and_gradients():
    torch.manual_seed(0)
    model = BEVTForMaskedVideoModeling(BEVTConfig.from_preset("test", drop_path_rate=0.0))
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name:
            p.data.normal_(std=1.0)
    inputs = tiny_pretraining_inputs()
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
        torch.testing.assert_close(
            dict(model.named_parameters())[name].grad, grad, atol=1e-4, rtol=1e-3, msg=name
        )


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


def test_bench_model_smoke_reports_machine_rates_flops_and_utilisation(tmp_path):
    out = tmp_path / "model.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--smoke", "--threads", "1", "--profile", "5",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    machine = report["machine"]
    assert machine["cpu_model"] and machine["isa"] and machine["threads"] == 1
    assert machine["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    kernels = machine["linear_kernels"]  # what this machine's calibration chose for the fp32 linears
    assert kernels["source"] in ("calibrated", "cache", "disabled") and "fp32 linears (BEVT_ONEDNN_LINEAR)" in result.stdout
    for p in ("fp32", "bf16"):
        assert report["gemm"][f"{p}_gflops"]["mean"] > 0
        assert (
            report["train_step_s"][f"ours_{p}"]["median"] > 0
            and report["inference_s"][f"ours_{p}"]["median"] > 0
        )
        assert 0 < report["utilisation_of_gemm_rate"][f"train_ours_{p}"]
    assert report["train_loss_abs_diff"]["fp32"] < 1e-3 and report["train_loss_abs_diff"]["bf16"] < 5e-2
    # the reference projects every position onto the vocabulary, ours only the masked ones
    assert report["train_gflop"]["reference"] > report["train_gflop"]["ours"] > 0
    assert report["inference_gflop"]["ours"] > 0
    assert "| train | bf16 |" in result.stdout and "ISA:" in result.stdout
    for p in ("fp32", "bf16"):  # the profile: top ops and category shares of our step
        profile = report["train_profile"][f"ours_{p}"]
        assert len(profile["top_ops"]) == 5 and profile["categories"]["GEMM"] > 0
        assert abs(sum(profile["categories"].values()) - 1) < 1e-6


def test_bench_model_flop_count_matches_a_hand_count():
    """The FLOPs that the benchmark divides by come from FlopCounterMode: for one BEVTLinear under autograd (the
    oneDNN path steps aside for the counter) they are the 3 products of forward and backward."""
    from bench_model import count_flops

    from bevt.kernels_bevt import BEVTLinear

    layer = BEVTLinear(64, 32)
    hidden = torch.randn(10, 64, requires_grad=True)
    assert count_flops(lambda: layer(hidden).sum().backward()) == 3 * 2 * 10 * 64 * 32


def test_bench_linear_kernels_smoke_reports_the_choice_shapes_and_steps(tmp_path):
    env = {**os.environ, "BEVT_KERNEL_CACHE": str(tmp_path / "kernels.json")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_linear_kernels.py"), "--smoke"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "calibration (calibrated" in out and (tmp_path / "kernels.json").is_file()
    assert out.count("| 392 |") == 4 and "all shapes: forward" in out
    losses = {line.rsplit("loss ", 1)[1] for line in out.splitlines() if line.startswith("fp32 training step")}
    assert len(losses) == 1  # the three kernel choices compute the same loss (to the printed digits)
