"""The per-machine choice of the fp32 linear kernels (issue 16: "choose kernels per machine at run time from what is
measured there, a short calibration, cached, never from the vendor name"): `bevt.kernels_bevt.linear_kernels`.

No timing is asserted: the decision rule is tested on given timings, the calibration on its contract (what it
measures, that it is cached and reused, what the environment overrides), and the model on following the choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bevt import kernels_bevt
from bevt.kernels_bevt import BEVTLinear, choose_linear_kernels, linear_kernels

needs_onednn = pytest.mark.skipif(kernels_bevt.onednn_linear_op() is None, reason="no oneDNN in this torch build")


def fresh_calibration(tmp_path, monkeypatch, switch: str, choice) -> Path:
    """A fresh cache file, the environment switch `switch` unset and the in-process `choice` (an lru_cache) cleared."""
    path = tmp_path / "kernels.json"
    monkeypatch.setenv("BEVT_KERNEL_CACHE", str(path))
    monkeypatch.delenv(switch, raising=False)
    choice.cache_clear()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache file and a fresh in-process choice; the calibration replaced by given timings (counted)."""
    path = fresh_calibration(tmp_path, monkeypatch, "BEVT_ONEDNN_LINEAR", kernels_bevt._linear_kernels)
    state = {"timings": None, "calls": 0}

    def fake_calibrate(op):
        state["calls"] += 1
        return dict(state["timings"])

    monkeypatch.setattr(kernels_bevt, "_calibrate", fake_calibrate)
    yield path, state
    kernels_bevt._linear_kernels.cache_clear()


def timings(forward_onednn: float, weight_grad_onednn: float) -> dict[str, float]:
    """Calibration seconds with the standard products at 1.0."""
    return {"forward_aten": 1.0, "forward_onednn": forward_onednn, "weight_grad_aten": 1.0,
            "weight_grad_onednn": weight_grad_onednn}  # fmt: skip


def test_onednn_is_chosen_only_where_it_is_measured_faster_by_the_margin():
    assert choose_linear_kernels(timings(0.5, 0.6)) == (True, True)  # the AMD Zen 5 case: MKL on its AVX2 path
    assert choose_linear_kernels(timings(1.07, 1.13)) == (False, False)  # the Intel VM: oneDNN slower
    assert choose_linear_kernels(timings(0.97, 0.9)) == (False, True)  # within the 5% margin: the standard op
    assert choose_linear_kernels(timings(0.94, 1.0)) == (True, False)


@needs_onednn
def test_the_choice_is_measured_once_cached_and_reused(cache):
    path, state = cache
    state["timings"] = timings(1.1, 0.5)
    first = linear_kernels()
    assert (first.forward, first.weight_grad, first.source) == (False, True, "calibrated")
    assert first.timings == timings(1.1, 0.5)
    assert linear_kernels() is first and state["calls"] == 1  # in-process: no second calibration

    stored = json.loads(path.read_text())
    (key,) = stored
    assert f"{torch.get_num_threads()} threads" in key and torch.__version__ in key
    assert stored[key]["forward"] is False and stored[key]["weight_grad"] is True

    kernels_bevt._linear_kernels.cache_clear()  # a new process on the same machine reads the cache
    again = linear_kernels()
    assert (again.forward, again.weight_grad, again.source) == (False, True, "cache") and state["calls"] == 1

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # another thread count is another measurement, kept beside the first
    try:
        state["timings"] = timings(0.5, 0.5)
        other = linear_kernels()
    finally:
        torch.set_num_threads(threads)
    assert (other.forward, other.source) == (True, "calibrated") and state["calls"] == 2
    assert len(json.loads(path.read_text())) == 2


@needs_onednn
def test_a_damaged_or_unwritable_cache_costs_only_a_calibration(cache, tmp_path, monkeypatch):
    path, state = cache
    state["timings"] = timings(0.5, 0.5)
    path.write_text("{not json")
    assert linear_kernels().source == "calibrated" and state["calls"] == 1
    assert json.loads(path.read_text())  # rewritten whole
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setenv("BEVT_KERNEL_CACHE", str(blocked / "kernels.json"))  # its folder is a file: cannot write
    kernels_bevt._linear_kernels.cache_clear()
    choice = linear_kernels()
    assert (choice.forward, choice.source) == (True, "calibrated") and state["calls"] == 2


def test_the_environment_forces_or_disables_oneDNN_without_calibrating(cache, monkeypatch):
    _, state = cache
    monkeypatch.setenv("BEVT_ONEDNN_LINEAR", "0")
    kernels_bevt.onednn_linear_op.cache_clear()
    try:
        assert linear_kernels().source == "disabled" and not linear_kernels().forward
    finally:
        monkeypatch.setenv("BEVT_ONEDNN_LINEAR", "1")
        kernels_bevt.onednn_linear_op.cache_clear()
    if kernels_bevt.onednn_linear_op() is not None:
        forced = linear_kernels()
        assert (forced.forward, forced.weight_grad, forced.source) == (True, True, "forced")
    assert state["calls"] == 0
    monkeypatch.setenv("BEVT_ONEDNN_LINEAR", "fast")
    with pytest.raises(ValueError, match="BEVT_ONEDNN_LINEAR must be auto, 1 or 0, got 'fast'"):
        linear_kernels()


@needs_onednn
@pytest.mark.parametrize("onednn", [False, True])
def test_the_model_linears_follow_the_calibration(cache, monkeypatch, onednn):
    """A deep layer: oneDNN's forward and weight gradient run exactly when chosen; the values are F.linear's."""
    _, state = cache
    state["timings"] = timings(0.5, 0.5) if onednn else timings(1.2, 1.2)
    weight_grads = []
    real = torch.mkldnn_linear_backward_weights
    monkeypatch.setattr(torch, "mkldnn_linear_backward_weights", lambda *a: weight_grads.append(1) or real(*a))
    layer = BEVTLinear(256, 512)
    hidden = torch.randn(300, 256, requires_grad=True)
    out = layer(hidden)
    assert (type(out.grad_fn).__name__ == "OneDNNLinearFunctionBackward") == onednn
    out.square().sum().backward()
    assert bool(weight_grads) == onednn
    expected = torch.nn.functional.linear(hidden.double(), layer.weight.double(), layer.bias.double())
    torch.testing.assert_close(out, expected.float(), atol=1e-4, rtol=1e-5)


@needs_onednn
def test_the_real_calibration_measures_every_candidate(tmp_path, monkeypatch):
    """The unpatched calibration: positive seconds for the four products (no claim on which wins)."""
    monkeypatch.setenv("BEVT_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    measured = kernels_bevt._calibrate(kernels_bevt.onednn_linear_op())
    assert set(measured) == {"forward_aten", "forward_onednn", "weight_grad_aten", "weight_grad_onednn"}
    assert all(value > 0 for value in measured.values())


def test_cpu_info_reads_the_first_processor_and_falls_back_without_proc(monkeypatch, tmp_path):
    """One reading of the CPU for the calibration key and the benchmarks: model name, vendor / family / model, ISA
    flags of the first processor; without /proc/cpuinfo, `platform`'s name and no flags."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 68\n"
        "model name\t: AMD EPYC 9B45\nflags\t\t: fpu avx2 avx512f\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    real_path = kernels_bevt.Path
    monkeypatch.setattr(kernels_bevt, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    kernels_bevt.cpu_info.cache_clear()
    try:
        info = kernels_bevt.cpu_info()
        assert info == {
            "model": "AMD EPYC 9B45", "id": "AuthenticAMD family 26 model 68",
            "flags": frozenset({"fpu", "avx2", "avx512f"}),
        }  # fmt: skip
        assert kernels_bevt._cpu_model() == "AMD EPYC 9B45"
        kernels_bevt.cpu_info.cache_clear()
        monkeypatch.setattr(kernels_bevt, "Path", lambda p: tmp_path / "missing" if p == "/proc/cpuinfo" else real_path(p))
        info = kernels_bevt.cpu_info()
        assert info["model"] and info["flags"] == frozenset() and info["id"] == "? family ? model ?"
    finally:
        kernels_bevt.cpu_info.cache_clear()


def test_bf16_speed_is_measured_once_per_machine_and_isa_cap_and_cached(tmp_path, monkeypatch):
    """`bf16_matmul_speedup`: float32 over bf16 seconds of one real product pair (> 0), written to the cache under a key
    that names the thread count and any ONEDNN_MAX_CPU_ISA cap, and read back instead of measured again."""
    path = tmp_path / "kernels.json"
    monkeypatch.setenv("BEVT_KERNEL_CACHE", str(path))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    kernels_bevt._bf16_matmul_speedup.cache_clear()
    try:
        measured = kernels_bevt.bf16_matmul_speedup()
        assert measured is not None and measured > 0
        (key, entry), = json.loads(path.read_text()).items()
        assert key.startswith("bf16 matmul|") and "isa cap none" in key and f"{torch.get_num_threads()} threads" in key
        assert entry["speedup"] == measured and set(entry["seconds"]) == {"float32", "bfloat16"}

        kernels_bevt._bf16_matmul_speedup.cache_clear()  # a new process: the cached value, no measurement
        path.write_text(json.dumps({key: {"speedup": 0.25}}))
        assert kernels_bevt.bf16_matmul_speedup() == 0.25
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")  # another cap: measured again, kept apart
        assert kernels_bevt.bf16_matmul_speedup() > 0
        keys = set(json.loads(path.read_text()))
        assert len(keys) == 2 and any("isa cap AVX512_CORE_BF16" in k for k in keys)
        kernels_bevt._bf16_matmul_speedup.cache_clear()
        path.write_text(json.dumps({key.replace("none", "AVX512_CORE_BF16"): {"speedup": "fast"}}))  # damaged
        assert kernels_bevt.bf16_matmul_speedup() > 0
    finally:
        kernels_bevt._bf16_matmul_speedup.cache_clear()


@pytest.mark.parametrize("speedup", [0.6, 1.2, 4.8, None])
def test_bf16_training_on_a_cpu_without_fast_bf16_products_is_warned(monkeypatch, caplog, speedup):
    """--mixed_precision bf16 on CPU: a warning where bf16 products are measured slower than float32 (or fail), an
    info line with the measured speed otherwise."""
    import logging

    from accelerate import PartialState

    from bevt.training import runtime

    PartialState()  # the scripts' logger needs Accelerate's state (start_run has made the Accelerator by then)
    monkeypatch.setattr(kernels_bevt, "bf16_matmul_speedup", lambda: speedup)
    with caplog.at_level(logging.INFO, logger="bevt.training.runtime"):
        assert runtime.check_cpu_bf16_speed() == speedup
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if speedup == 0.6:
        assert len(warnings) == 1 and "only 0.60x the float32 speed" in warnings[0] and "no faster" in warnings[0]
    elif speedup is None:
        assert len(warnings) == 1 and "failed" in warnings[0]
    else:
        assert warnings == [] and any(f"{speedup:.2f}x the float32 speed" in r.getMessage() for r in caplog.records)


def test_a_bf16_product_far_slower_than_float32_is_measured_once(tmp_path, monkeypatch):
    """Where the warm-up bf16 product takes over 5x the float32 one (a slow fallback path), the probe stops there
    (no timed rounds): the answer (bf16 slower) does not need them."""
    monkeypatch.setenv("BEVT_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    calls: list[int] = []

    def fake_median(run, repeats=kernels_bevt.CALIBRATION_REPEATS, clock=None):
        calls.append(repeats)
        return 1.0 if len(calls) == 1 else 10.0  # float32 warm-up 1 s, bf16 warm-up 10 s

    monkeypatch.setattr(kernels_bevt, "_median_seconds", fake_median)
    kernels_bevt._bf16_matmul_speedup.cache_clear()
    try:
        assert kernels_bevt.bf16_matmul_speedup() == pytest.approx(0.1) and calls == [1, 1]
    finally:
        kernels_bevt._bf16_matmul_speedup.cache_clear()


@pytest.mark.parametrize(
    ("precision", "device", "local_main", "expected"),
    [
        ("bf16", "cpu", True, True),
        ("bf16", "cpu", False, False),  # another process of the same machine: the local main one measures
        ("bf16", "cuda", True, False),
        ("no", "cpu", True, False),
        ("fp16", "cpu", True, False),
    ],
)
def test_the_bf16_speed_probe_runs_once_per_machine_on_cpu_only(precision, device, local_main, expected):
    """One bf16 probe per machine: on the local main process of a bf16 CPU run (the other processes share that CPU;
    timing products on all of them at once would measure their contention)."""
    from types import SimpleNamespace

    from bevt.training import runtime

    accelerator = SimpleNamespace(
        mixed_precision=precision, device=torch.device(device), is_local_main_process=local_main
    )
    assert runtime.needs_cpu_bf16_check(accelerator) is expected


def test_the_memory_allocator_is_read_from_the_process_maps(tmp_path, monkeypatch):
    """`memory_allocator`: a preloaded tcmalloc / jemalloc is named from the libraries mapped into the process;
    otherwise glibc's malloc (this test process, unless something was preloaded)."""
    import os
    import platform

    libc_malloc = "glibc malloc" if platform.libc_ver()[0] == "glibc" else "system malloc"
    if not os.environ.get("LD_PRELOAD"):
        assert kernels_bevt.memory_allocator() == libc_malloc
    maps = tmp_path / "maps"
    line = "7f5e1c000000-7f5e1c021000 r-xp 00000000 08:01 123 {}\n"
    for library, expected in [
        ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10", "tcmalloc"),
        ("/opt/lib/libjemalloc.so.2", "jemalloc"),
        ("/usr/lib/x86_64-linux-gnu/libc.so.6", libc_malloc),  # glibc itself
    ]:
        maps.write_text(line.format("/usr/lib/x86_64-linux-gnu/libm.so.6") + line.format(library) + "7ffd-7ffe rw-p 0 0 0\n")
        monkeypatch.setattr(kernels_bevt, "PROCESS_MAPS", str(maps))
        assert kernels_bevt.memory_allocator() == expected, library
    monkeypatch.setattr(kernels_bevt, "PROCESS_MAPS", str(tmp_path / "missing"))  # no /proc: the libc's malloc
    assert kernels_bevt.memory_allocator() == libc_malloc


@pytest.mark.parametrize("allocator", ["glibc malloc", "tcmalloc"])
def test_a_cpu_run_under_glibc_malloc_is_told_how_to_preload_tcmalloc(tmp_path, monkeypatch, allocator):
    """The scripts' CPU hint: under glibc's malloc, the LD_PRELOAD line (with the installed library's path where
    there is one, else the package to install); nothing when another allocator is in use."""
    from bevt.training import runtime

    monkeypatch.setattr(kernels_bevt, "memory_allocator", lambda: allocator)
    monkeypatch.setattr(runtime, "TCMALLOC_PATHS", (str(tmp_path / "absent.so"),))
    hint = runtime.cpu_allocator_hint()
    if allocator == "tcmalloc":
        assert hint is None
        return
    assert "LD_PRELOAD=" in hint and "libtcmalloc-minimal4" in hint and "glibc malloc" in hint
    installed = tmp_path / "libtcmalloc_minimal.so.4"
    installed.write_bytes(b"")
    monkeypatch.setattr(runtime, "TCMALLOC_PATHS", (str(tmp_path / "absent.so"), str(installed)))
    assert f"LD_PRELOAD={installed} " in runtime.cpu_allocator_hint()


_FAULTS_OF_REPEATED_STEPS = """
import resource, sys, torch
from bevt.kernels_bevt import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
x = torch.ones(2**23)  # 32 MiB
counts = []
for step in range(10):  # a step's temporaries: the same large blocks (32 and 64 MiB) every step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = x * 2
    z = torch.cat([y, x])
    del y, z
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(counts[4:]))
"""


@pytest.mark.skipif(kernels_bevt.memory_allocator() != "glibc malloc", reason="glibc's malloc only")
def test_glibc_malloc_keeps_freed_large_blocks_for_the_next_steps():
    """`keep_freed_memory`: the large temporaries of a repeated step are reused (next to no page faults) instead
    of being mapped and zeroed afresh every step (~24k faults of 4 KiB a step here).
    Process-wide, so it is checked in fresh processes."""
    import subprocess
    import sys

    def run(mode: str) -> tuple[bool, int]:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_OF_REPEATED_STEPS, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0] == "True", int(out[1])

    applied, tuned_faults = run("tuned")
    _, default_faults = run("default")
    assert applied
    # six steps: ~24k faults each by default; tuned, at most one block is mapped again when the heap's layout
    # shifts (seen: 0 or 16k in all)
    assert default_faults > 6 * 16000 and tuned_faults < default_faults / 4, (default_faults, tuned_faults)


def test_malloc_tuning_is_off_under_another_allocator_or_when_asked(monkeypatch):
    monkeypatch.setenv("BEVT_MALLOC_TUNING", "0")
    assert kernels_bevt.keep_freed_memory() is False
    monkeypatch.setenv("BEVT_MALLOC_TUNING", "auto")
    monkeypatch.setattr(kernels_bevt, "memory_allocator", lambda: "tcmalloc")
    assert kernels_bevt.keep_freed_memory() is False
    monkeypatch.setenv("BEVT_MALLOC_TUNING", "maybe")
    with pytest.raises(ValueError, match="BEVT_MALLOC_TUNING must be auto, 1 or 0"):
        kernels_bevt.keep_freed_memory()


# ---------------------------------------------------------------------------------------------------------------
# Native attention softmax (C++ built on the running machine, used where its calibration measured it faster)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def native_module():
    """The built native attention module (built at first use, into the session's kernel cache folder)."""
    module = kernels_bevt._native_attention_module()
    if module is None:
        pytest.skip("no C++ compiler or ninja: the native attention kernels cannot be built here")
    return module


@pytest.fixture
def native_cache(tmp_path, monkeypatch):
    """A fresh cache file and in-process choice, a stand-in module, and the calibration replaced by given timings."""
    path = fresh_calibration(tmp_path, monkeypatch, "BEVT_NATIVE_ATTENTION", kernels_bevt._native_attention_choice)
    module = object()
    state = {"timings": None, "calls": 0}

    def fake_calibrate(got, dtype):
        assert got is module
        state["calls"] += 1
        return dict(state["timings"])

    monkeypatch.setattr(kernels_bevt, "_native_attention_module", lambda: module)
    monkeypatch.setattr(kernels_bevt, "_calibrate_native_attention", fake_calibrate)
    yield path, state, module
    kernels_bevt._native_attention_choice.cache_clear()


def test_native_attention_is_used_where_measured_faster_once_per_dtype_and_cached(native_cache):
    path, state, module = native_cache
    state["timings"] = {"torch": 1.0, "native": 0.5}
    assert kernels_bevt.native_attention(torch.bfloat16) is module
    state["timings"] = {"torch": 1.0, "native": 0.97}  # within the 5% margin: PyTorch's ops
    assert kernels_bevt.native_attention(torch.float32) is None
    assert kernels_bevt.native_attention(torch.bfloat16) is module and state["calls"] == 2
    assert kernels_bevt.native_attention(torch.float16) is None  # no kernel for it: never calibrated
    stored = json.loads(path.read_text())
    entries = {key.rsplit("|", 1)[-1]: value for key, value in stored.items() if key.startswith("native attention|")}
    assert entries["torch.bfloat16"] == {"native": True, "timings": {"torch": 1.0, "native": 0.5}}
    assert entries["torch.float32"]["native"] is False
    assert all(kernels_bevt.native_attention_build_name() in key for key in stored)
    kernels_bevt._native_attention_choice.cache_clear()  # a new process reads the file: no calibration
    assert kernels_bevt.native_attention(torch.bfloat16) is module and state["calls"] == 2


def test_native_attention_setting_forces_or_disables_without_calibrating(native_cache, monkeypatch):
    _, state, module = native_cache
    monkeypatch.setenv("BEVT_NATIVE_ATTENTION", "1")
    assert kernels_bevt.native_attention(torch.float32) is module
    monkeypatch.setenv("BEVT_NATIVE_ATTENTION", "off")
    assert kernels_bevt.native_attention(torch.float32) is None and kernels_bevt.native_attention_module() is None
    assert state["calls"] == 0
    monkeypatch.setenv("BEVT_NATIVE_ATTENTION", "sometimes")
    with pytest.raises(ValueError, match="BEVT_NATIVE_ATTENTION must be auto, 1 or 0, got 'sometimes'"):
        kernels_bevt.native_attention(torch.float32)


def test_native_build_is_named_after_the_cpu_so_a_shared_cache_never_loads_a_foreign_build(monkeypatch):
    here = kernels_bevt.native_attention_build_name()
    assert here == kernels_bevt.native_attention_build_name() and here.startswith("bevt_attention_")
    other = {"model": "Some Other CPU", "id": "?", "flags": frozenset({"avx2"})}
    monkeypatch.setattr(kernels_bevt, "cpu_info", lambda: other)
    assert kernels_bevt.native_attention_build_name() != here


def test_without_a_compiler_the_torch_path_runs_and_says_why(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    kernels_bevt._native_attention_module.cache_clear()
    try:
        with caplog.at_level("INFO", logger="bevt.kernels_bevt"):
            assert kernels_bevt._native_attention_module() is None
        assert "no C++ compiler ('/nonexistent/c++')" in caplog.text
    finally:
        kernels_bevt._native_attention_module.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_softmax_matches_torch_and_never_writes_denormals(dtype, native_module):
    module = native_module
    g = torch.Generator().manual_seed(0)
    batch, heads, windows, n = 2, 3, 4, 49
    raw = (torch.randn(batch, windows * heads, n, n, generator=g) * 4).to(dtype)
    bias = torch.randn(heads, n, n, generator=g)
    mask = torch.where(torch.rand(6, n, n, generator=g) < 0.4, -100.0, 0.0)  # the original code's value
    mask.diagonal(dim1=1, dim2=2).zero_()
    scores = raw.float().view(batch, windows, heads, n, n) + bias + mask[2:6, None]
    expected = scores.softmax(-1).view(raw.shape)
    probs = torch.empty_like(raw)
    module.softmax_forward(raw, bias, mask, heads, 2, probs)
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 8e-3}
    torch.testing.assert_close(probs.float(), expected, **tolerance)
    masked = (mask[2:6, None] < 0).expand(windows, heads, n, n).repeat(batch, 1, 1, 1).reshape(raw.shape)
    assert torch.all(probs[masked] == 0)  # exp(-100 + ...) underflows to an exact 0, not a denormal
    assert not ((probs != 0) & (probs.float().abs() < torch.finfo(torch.float32).tiny)).any()

    grad = torch.randn(raw.shape, generator=g).to(dtype)
    expected_grad = torch._softmax_backward_data(grad.float(), probs.float(), -1, torch.float32)
    grad_bias = torch.ones(heads, n, n)  # added to
    module.softmax_backward(probs, grad, grad_bias, heads)
    torch.testing.assert_close(grad.float(), expected_grad, **tolerance)
    want_bias = 1 + expected_grad.view(batch, windows, heads, n, n).sum((0, 1))
    torch.testing.assert_close(grad_bias, want_bias, atol=1e-5, rtol=1e-5)


def test_native_softmax_refuses_bad_input_with_a_clear_error(native_module):
    module = native_module
    raw, bias = torch.randn(1, 4, 5, 5), torch.randn(2, 5, 5)
    with pytest.raises(RuntimeError, match="scores must be a contiguous 4-d CPU tensor"):
        module.softmax_forward(raw.transpose(2, 3), bias, torch.empty(0), 2, 0, torch.empty_like(raw))
    with pytest.raises(RuntimeError, match="mismatched shapes or dtypes"):
        module.softmax_forward(raw, torch.randn(3, 5, 5), torch.empty(0), 2, 0, torch.empty_like(raw))
    with pytest.raises(RuntimeError, match="mismatched mask"):  # windows 1..2 of a 2-window mask
        module.softmax_forward(raw, bias, torch.zeros(2, 5, 5), 2, 1, torch.empty_like(raw))
    with pytest.raises(RuntimeError, match="must both be float32 or both bfloat16"):
        module.softmax_forward(raw.half(), bias, torch.empty(0), 2, 0, torch.empty_like(raw).half())


def test_the_real_native_calibration_times_both_candidates(native_module):
    timings = kernels_bevt._calibrate_native_attention(native_module, torch.float32)
    assert set(timings) == {"torch", "native"} and all(0 < t < 5 for t in timings.values())


@pytest.mark.parametrize("local_main", [True, False])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_the_local_main_process_prepares_the_cpu_kernels_before_the_others(monkeypatch, local_main, precision):
    """`prepare_cpu_kernels`: the machine's local main process calibrates (and builds) for the run's dtypes, then
    every process waits at the barrier; the others read the cache afterwards."""
    from types import SimpleNamespace

    from bevt.training import runtime

    events = []
    monkeypatch.setattr(kernels_bevt, "linear_kernels", lambda: events.append("linear"))
    monkeypatch.setattr(kernels_bevt, "native_attention", lambda dtype: events.append(str(dtype)))
    accelerator = SimpleNamespace(
        is_local_main_process=local_main,
        mixed_precision=precision,
        wait_for_everyone=lambda: events.append("barrier"),
    )
    runtime.prepare_cpu_kernels(accelerator)
    expected = ["linear", "torch.float32"] + (["torch.bfloat16"] if precision == "bf16" else [])
    assert events == (expected if local_main else []) + ["barrier"]
