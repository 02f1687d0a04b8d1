"""bfloat16 on CPU as a first-class path: every fused path of `kernels_bevt` (oneDNN linears, the chunked window
attention function, the LayerNorm/GELU recompute functions) under CPU autocast gives the gradients of the fp32
model within bf16 tolerance, as closely as the plain (unfused) autocast model does; Accelerate's
`mixed_precision="bf16"` really autocasts on CPU; both scripts train with `--mixed_precision bf16` on CPU."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_pretraining_inputs

from bevt import BEVTConfig, BEVTForMaskedVideoModeling

REPO = Path(__file__).resolve().parents[1]

# bf16 keeps 8 mantissa bits (relative rounding 2^-9); through a few layers the gradients of the plain autocast
# model differ from fp32 by up to ~5% (relative L2 norm, per parameter; measured on this model: 3-5% for the
# LayerNorm parameters of the first blocks, less elsewhere).
BF16_VS_FP32 = 0.1
# the fused paths round at the same points as the plain autocast model: measured <= 0.3% apart
FUSED_VS_PLAIN = 0.03


def _model(attn: str) -> BEVTForMaskedVideoModeling:
    torch.manual_seed(0)
    config = BEVTConfig.from_preset("test", drop_path_rate=0.0, attn_implementation=attn)
    model = BEVTForMaskedVideoModeling(config)
    for name, param in model.named_parameters():
        if "relative_position_bias_table" in name:
            param.data.normal_(std=1.0)  # non-trivial bias: its gradient path matters
    return model


def _graph_functions(loss: torch.Tensor) -> set[str]:
    """Names of the custom autograd functions in the graph of `loss`."""
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return {n for n in names if "Function" in n}


def _step(model, inputs, bf16: bool, plain: bool = False):
    """Loss, gradients and custom functions of one step: forward under CPU autocast (bf16) or not, backward outside
    it (as Accelerate runs it). `plain`: a global no-op forward hook makes every fused path step aside."""
    model.zero_grad(set_to_none=True)
    hook = torch.nn.modules.module.register_module_forward_hook(lambda *a: None) if plain else None
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**inputs)
        functions = _graph_functions(out.loss)
        out.loss.backward()
    finally:
        if hook is not None:
            hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, functions


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize(
    ("attn", "mode", "native"),
    [("eager", "train", "0"), ("eager", "eval", "0"), ("sdpa", "train", "0"), ("sdpa", "eval", "0"),
     ("sdpa", "train", "1")],  # fmt: skip
)
def test_bf16_autocast_step_matches_fp32_within_bf16_tolerance(attn, mode, native, monkeypatch):
    """native: the chunked attention's softmax through PyTorch's ops ("0") or the native kernels ("1"), in bf16
    and float32 alike."""
    torch.set_num_threads(1)
    monkeypatch.setenv("BEVT_ONEDNN_LINEAR", "1")  # the oneDNN fp32 linears run whatever this machine's calibration chose
    monkeypatch.setenv("BEVT_NATIVE_ATTENTION", native)
    from bevt.kernels_bevt import native_attention

    if native == "1" and native_attention(torch.bfloat16) is None:
        pytest.skip("the native attention kernels cannot be built here (no C++ compiler or ninja)")
    model = _model(attn).train(mode == "train")
    inputs = tiny_pretraining_inputs()
    loss32, grads32, fused32 = _step(model, inputs, bf16=False)
    loss16, grads16, fused16 = _step(model, inputs, bf16=True)
    loss_plain, grads_plain, fused_plain = _step(model, inputs, bf16=True, plain=True)

    # the fused paths really run (fp32: oneDNN linears too; bf16 linears are oneDNN's own bf16 F.linear)
    recompute = {"PreparedLinearFunctionBackward", "GeluLinearFunctionBackward"}
    assert recompute | {"OneDNNLinearFunctionBackward"} <= fused32
    assert recompute <= fused16 and "OneDNNLinearFunctionBackward" not in fused16
    assert not recompute & fused_plain
    window = "WindowAttentionFunctionBackward"
    assert (window in fused16) == (attn == "sdpa")

    assert math.isfinite(loss16.item()) and abs(loss16.item() - loss32.item()) < 0.02 * abs(loss32.item())
    assert loss16.item() != loss32.item()  # autocast did round something
    assert grads16.keys() == grads32.keys() == grads_plain.keys() and len(grads32) > 50
    for name, grad in grads16.items():
        assert grad.dtype == torch.float32, name  # fp32 parameters get fp32 gradients
        assert _relative(grad, grads32[name]) < BF16_VS_FP32, (name, _relative(grad, grads32[name]))
        assert _relative(grad, grads_plain[name]) < FUSED_VS_PLAIN, (name, _relative(grad, grads_plain[name]))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bf16_autocast_inference_matches_fp32(attn):
    """Inference under autocast (no autograd: SDPA's fused CPU kernel with a bf16 mask, oneDNN bf16 linears)."""
    torch.set_num_threads(1)
    model = _model(attn).eval()
    inputs = tiny_pretraining_inputs()
    with torch.no_grad():
        want = model(**inputs, return_logits=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(**inputs, return_logits=True)
    assert got.logits.dtype == torch.bfloat16  # really computed in bf16
    for a, b in ((got.logits, want.logits), (got.image_logits, want.image_logits)):
        assert _relative(a, b) < 0.05, _relative(a, b)
    assert abs(got.loss.item() - want.loss.item()) < 0.02 * abs(want.loss.item())


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process-wide state, reset around the test (other tests build Accelerators without mixed
    precision in this process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_bf16_autocasts_on_cpu(fresh_accelerate_state):
    """What `--mixed_precision bf16` gives the scripts on CPU with this Accelerate: `accelerator.autocast()` turns
    CPU autocast on, the prepared model computes its linears in bf16 and returns fp32 outputs, and the gradients
    are those of the fp32 model within bf16 tolerance."""
    from accelerate import Accelerator

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    assert accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16"
    model = _model("sdpa").train()
    inputs = tiny_pretraining_inputs()
    _, grads32, _ = _step(model, inputs, bf16=False)
    prepared = accelerator.prepare(model)
    seen = []
    handle = (
        prepared.bevt.encoder.layers[0]
        .blocks[0]
        .attention.qkv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    )
    model.zero_grad(set_to_none=True)
    try:
        with accelerator.autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            loss = prepared(**inputs).loss
        accelerator.backward(loss)
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert loss.dtype == torch.float32  # Accelerate converts the outputs back
    for name, param in model.named_parameters():
        assert _relative(param.grad, grads32[name]) < BF16_VS_FP32, name


def _script(name: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / name), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )


@pytest.mark.slow
def test_both_scripts_train_with_mixed_precision_bf16_on_cpu(
    tmp_path, pretraining_demo_data, finetuning_demo_data
):
    import shutil

    out = tmp_path / "pretraining"
    shutil.copytree(pretraining_demo_data, out / "demo_data")
    args = [
        "--output_dir",
        str(out),
        "--max_train_steps",
        "2",
        "--logging_steps",
        "1",
        "--mixed_precision",
        "bf16",
    ]
    result = _script("run_pretraining.py", args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Mixed precision type: bf16" in result.stderr and "step 2/2" in result.stderr
    assert "no effect on CPU" not in result.stderr
    assert (out / "model.safetensors").is_file()

    data = finetuning_demo_data
    args = [
        "--output_dir", str(tmp_path / "finetuning"), "--train_shards", str(data / "train"),
        "--validation_shards", str(data / "validation"), "--label_names", str(data / "train" / "labels.txt"),
        "--model_preset", "test", "--window_size", "4", "2", "2", "--image_size", "32", "--short_side", "36",
        "--num_frames", "8", "--sampling", "uniform", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--num_workers", "0", "--warmup_epochs", "0", "--max_train_steps", "2",
        "--eval_steps", "2", "--eval_num_clips", "1", "--eval_num_crops", "1", "--logging_steps", "1",
        "--dataset_name", "bevt-synthetic-temporal", "--mixed_precision", "bf16",
    ]  # fmt: skip
    result = _script("run_finetuning.py", args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Mixed precision type: bf16" in result.stderr
    assert "validation accuracy:" in result.stdout
