"""What the training loop measures between two log lines: running means, throughput, time per step phase."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["AverageMeter", "StepTimer", "ThroughputMeter", "WindowMeters"]


class AverageMeter:
    """Running mean of a scalar since the last `reset()` (`avg`), plus its last value (`val`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.val = float(value)
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else float("nan")


class ThroughputMeter:
    """Samples per second over the last `window` updates (each update: samples processed, seconds taken)."""

    def __init__(self, window: int = 20):
        if window < 1:
            raise ValueError(f"`window` must be >= 1, got {window!r}")
        self._samples: deque[float] = deque(maxlen=window)
        self._seconds: deque[float] = deque(maxlen=window)

    def update(self, num_samples: float, seconds: float) -> None:
        self._samples.append(float(num_samples))
        self._seconds.append(max(float(seconds), 0.0))

    @property
    def rate(self) -> float:
        total = sum(self._seconds)
        return sum(self._samples) / total if total > 0 else float("nan")


class StepTimer:
    """Time spent per phase of a training step (e.g. "data" waiting for the batch vs "compute").

    Use `with timer.phase("data"): batch = next(it)`; `averages()` gives the mean seconds per phase since the last
    `reset()`, `last` the seconds of each phase's most recent measurement.
    """

    def __init__(self) -> None:
        self.meters: dict[str, AverageMeter] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.meters.setdefault(name, AverageMeter()).update(time.perf_counter() - start)

    @property
    def last(self) -> dict[str, float]:
        return {name: meter.val for name, meter in self.meters.items()}

    def averages(self) -> dict[str, float]:
        return {name: meter.avg for name, meter in self.meters.items()}

    def reset(self) -> None:
        for meter in self.meters.values():
            meter.reset()


@dataclass
class WindowMeters:
    """Running means of named scalars between two log lines (`window`), the time per step phase (`timer`), and
    samples per second per stream (`throughput`: a sliding window, not reset)."""

    window: dict[str, AverageMeter] = field(default_factory=dict)
    timer: StepTimer = field(default_factory=StepTimer)
    throughput: dict[str, ThroughputMeter] = field(default_factory=dict)

    @classmethod
    def of(cls, names: Iterable[str], streams: Iterable[str] = ()) -> WindowMeters:
        """One `AverageMeter` per scalar name and one `ThroughputMeter` per stream."""
        return cls(
            window={name: AverageMeter() for name in names},
            throughput={stream: ThroughputMeter() for stream in streams},
        )

    def update(self, values: dict[str, float]) -> None:
        """Add one step's scalars (a name seen for the first time gets its meter)."""
        for name, value in values.items():
            self.window.setdefault(name, AverageMeter()).update(value)

    def averages(self) -> dict[str, float]:
        """Mean of each scalar over the window (NaN when no step was recorded)."""
        return {name: meter.avg for name, meter in self.window.items()}

    @staticmethod
    def finite(averages: dict[str, float]) -> dict[str, float]:
        return {name: value for name, value in averages.items() if not math.isnan(value)}

    def reset(self) -> None:
        """Start a new window (scalar means and phase timings; throughput keeps its sliding window)."""
        for meter in self.window.values():
            meter.reset()
        self.timer.reset()
