"""Test-only fault injection: make the process kill itself (SIGKILL) at a deterministic point of a run.

`BEVT_TEST_KILL_AT=step:N` kills every rank right after optimizer step N (before that step's logging, evaluation
and checkpoint); `BEVT_TEST_KILL_AT=save:N` kills every rank in the middle of saving checkpoint N (its Accelerate
state and data position written to the temporary folder, not yet marked complete nor renamed). Crash tests use it
instead of timed kills. Unset (always, outside tests): nothing happens.
"""

from __future__ import annotations

import os
import signal

__all__ = ["KILL_AT_ENV", "kill_if_requested"]

KILL_AT_ENV = "BEVT_TEST_KILL_AT"


def kill_if_requested(point: str, number: int) -> None:
    """SIGKILL this process when `BEVT_TEST_KILL_AT` is `f"{point}:{number}"`."""
    if os.environ.get(KILL_AT_ENV) == f"{point}:{number}":
        os.kill(os.getpid(), signal.SIGKILL)
