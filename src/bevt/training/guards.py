"""What stops or skips a training step: non-finite losses (`NonFiniteLossGuard`) and stop signals (`GracefulExit`)."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["GracefulExit", "NonFiniteLossError", "NonFiniteLossGuard", "is_finite"]


def is_finite(value: torch.Tensor | float) -> bool:
    """True when `value` (a number or a tensor, all elements) is finite."""
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


class NonFiniteLossError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss (or gradient norm)."""


class NonFiniteLossGuard:
    """Skip optimizer steps whose loss (or gradient norm) is NaN/inf; stop after `max_consecutive` in a row.

    Call `update(finite)` once per optimizer step with whether the step is usable (in multi-process training pass
    the value agreed by all ranks, so every rank skips the same steps). Returns True when the step should be
    applied. `total_skipped` counts every skipped step (log it). Raises `NonFiniteLossError` when the
    `max_consecutive`-th consecutive non-finite step is seen.
    """

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"`max_consecutive` must be >= 1, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def update(self, finite: bool, step: int | None = None) -> bool:
        if finite:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            where = f" (last at step {step})" if step is not None else ""
            raise NonFiniteLossError(
                f"the loss or gradient norm was NaN/inf for {self.consecutive} optimizer steps in a row{where}; "
                "stopping. Lower --learning_rate, use --mixed_precision bf16 instead of fp16, check the data, or "
                "resume from an earlier checkpoint."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total_skipped = int(state.get("total_skipped", 0))


class GracefulExit:
    """Context manager turning SIGTERM/SIGINT into a stop request, so the loop can save a checkpoint and exit.

    The first signal sets `requested` (and `signal_number`); a second one restores the default handlers and
    re-raises (KeyboardInterrupt for SIGINT), so a stuck job can still be interrupted. `should_stop(accelerator)`
    agrees across ranks through `Accelerator.set_trigger()` / `check_trigger()` (any rank's request stops all; one
    tiny all-reduce): call it at the same point on every rank. Handlers can only be installed from the main thread;
    elsewhere this is a no-op.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:  # second signal: give up gracefully, behave as without us
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.requested = True
        self.signal_number = signum

    def __enter__(self) -> GracefulExit:
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def should_stop(self, accelerator: Any = None) -> bool:
        """Whether any rank received a stop signal (collective when `accelerator` is given)."""
        if accelerator is None:
            return self.requested
        if self.requested:
            accelerator.set_trigger()
        return accelerator.check_trigger()

    @property
    def exit_code(self) -> int:
        """Exit status after a stop: 128 + the signal number. A rank that stops because another rank got the signal
        (schedulers signal every rank, usually with SIGTERM) reports 128 + SIGTERM."""
        return 128 + (self.signal_number if self.signal_number is not None else signal.SIGTERM)

    def describe(self) -> str:
        """Why the run stopped, for the log."""
        if self.signal_number is not None:
            return f"received signal {self.signal_number}"
        return "another rank received a stop signal"
