"""Numerical faults in the pretraining loop: a step whose loss or gradient norm is NaN/inf is skipped (weights and
optimizer state untouched, counted, logged), training goes on after it, and `--max_nonfinite_steps` bad steps in a
row stop the run with a clear message. Exercises the engine's `optimizer_step` (what every script's loop runs) with
a real Accelerator and the pretraining statistics; the end-to-end stop is covered by
`test_pretraining.py::test_nonfinite_losses_stop_the_run_with_a_clear_message`.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from helpers import load_script

from bevt.training import NonFiniteLossError, NonFiniteLossGuard, optimizer_step


@pytest.fixture(scope="module")
def script():
    return load_script("run_pretraining.py")


def _setup():
    from accelerate import Accelerator
    from transformers import get_scheduler

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = get_scheduler("constant", optimizer=optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, scheduler


def _stats(loss: float, n: int) -> list[torch.Tensor]:
    return [torch.tensor([loss, 0.0, loss, 0.0, 0.5])] * n


def test_nonfinite_steps_are_skipped_counted_logged_then_stop(script, caplog: pytest.LogCaptureFixture):
    accelerator, model, optimizer, scheduler = _setup()
    guard = NonFiniteLossGuard(max_consecutive=3)
    x = torch.randn(8, 4)

    def step(loss_value: float, step_number: int, poison_grad: bool = False):
        loss = model(x).pow(2).mean()
        accelerator.backward(loss)
        if poison_grad:
            model.weight.grad[0, 0] = math.inf
        return optimizer_step(
            accelerator, model, optimizer, scheduler, guard, _stats(loss_value, 2),
            names=script.STAT_NAMES, max_grad_norm=3.0, step=step_number,
        )  # fmt: skip

    result = step(1.0, 1)
    assert result.applied and math.isfinite(result.grad_norm)
    before = copy.deepcopy(model.state_dict())
    optimizer_before = copy.deepcopy(optimizer.state_dict()["state"])
    with caplog.at_level(logging.WARNING):
        nan_loss = step(math.nan, 2)  # a NaN loss (one micro-batch is enough)
        inf_grad = step(1.0, 3, poison_grad=True)  # a finite loss but an infinite gradient
    assert not nan_loss.applied and not inf_grad.applied
    assert all(math.isnan(v) for v in nan_loss.metrics.values())
    for name, value in model.state_dict().items():  # the bad steps changed nothing
        assert torch.equal(value, before[name]), name
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], optimizer_before[0]["exp_avg"])
    assert all(p.grad is None for p in model.parameters())  # gradients of the bad step are dropped
    assert guard.total_skipped == 2 and guard.consecutive == 2
    assert "step 2: non-finite loss or gradient norm, update skipped (1 in a row, 1 in total" in caplog.text
    assert "step 3: non-finite" in caplog.text and "the run stops at 3 in a row" in caplog.text

    assert step(1.0, 4).applied and guard.consecutive == 0  # training goes on after isolated bad steps
    assert not any(torch.equal(v, before[n]) for n, v in model.state_dict().items())
    step(math.inf, 5)
    step(math.nan, 6)
    with pytest.raises(
        NonFiniteLossError, match=r"NaN/inf for 3 optimizer steps in a row \(last at step 7\)"
    ):
        step(math.nan, 7)
    assert guard.total_skipped == 5


def test_guard_state_survives_a_resume():
    guard = NonFiniteLossGuard(max_consecutive=4)
    for finite in (False, False, True, False):
        guard.update(finite)
    resumed = NonFiniteLossGuard(max_consecutive=4)
    resumed.load_state_dict(guard.state_dict())
    assert (resumed.consecutive, resumed.total_skipped) == (1, 3)
    with pytest.raises(ValueError, match="`max_consecutive` must be >= 1"):
        NonFiniteLossGuard(0)
