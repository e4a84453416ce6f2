"""Per-stage latency and frame-rate bookkeeping for the stats topic and `bench`. Pure."""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field

import numpy as np

STAGES = ("decode", "detect", "classify", "track", "publish")


@dataclass
class StageTimes:
    """Keeps the last `window` samples of each stage, in seconds."""

    window: int = 300
    samples: dict[str, collections.deque] = field(default_factory=dict)
    frame_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=120))
    frames: int = 0

    def add(self, stage: str, seconds: float) -> None:
        queue = self.samples.get(stage)
        if queue is None:
            queue = self.samples[stage] = collections.deque(maxlen=self.window)
        queue.append(seconds)

    def frame_done(self, now: float) -> None:
        self.frames += 1
        self.frame_times.append(now)

    def fps(self, now: float | None = None) -> float:
        """Frames a second over the recent frames; 0 at `now` (the frame clock, monotonic) when
        none came for `stalled_after(1.0)`: a stalled camera does not keep reporting the rate it had."""
        if len(self.frame_times) < 2:
            return 0.0
        span = self.frame_times[-1] - self.frame_times[0]
        if span <= 0:
            return 0.0
        if now is not None and now - self.frame_times[-1] > self.stalled_after(1.0):
            return 0.0
        return (len(self.frame_times) - 1) / span

    def stalled_after(self, at_least: float) -> float:
        """How long without a frame means the source has stalled: `at_least`, or twice the recent
        interval between frames where that is longer (a snapshot camera's frame every 5 s is its
        rate, not an outage). Never, before two frames have shown what the rate is."""
        if len(self.frame_times) < 2:
            return math.inf
        interval = (self.frame_times[-1] - self.frame_times[0]) / (len(self.frame_times) - 1)
        return max(at_least, 2 * interval)

    def percentile_ms(self, stage: str, q: float) -> float:
        queue = self.samples.get(stage)
        if not queue:
            return 0.0
        snapshot = np.array(list(queue), float)  # DetectAhead's thread may append to "detect" meanwhile
        return float(np.percentile(snapshot, q)) * 1000

    def latency_ms(self) -> dict[str, dict[str, float]]:
        return {s: {"p50": round(self.percentile_ms(s, 50), 3), "p99": round(self.percentile_ms(s, 99), 3)}
                for s in STAGES if s in self.samples}


class Stopwatch:
    """`lap()` returns the seconds since the previous lap (perf_counter, monotonic)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed
