"""Progress for long runs: a one-line bar on a terminal, plain periodic log lines elsewhere
(systemd's journal, CI logs), where a carriage-return bar would be noise."""

from __future__ import annotations

import logging
import math
import sys
import time

logger = logging.getLogger(__name__)


def frames_total(frame_count: int | None, max_frames: int | None) -> int | None:
    """The frames a run over a video reads, for the bar: as many as the video holds, at most
    `max_frames` (None or 0: no limit); None where the video does not say how many it holds."""
    return min(frame_count or 0, max_frames or 10 ** 9) or None


class Progress:
    def __init__(self, label: str, total: int | None, *, stream=None, log_every_s: float = 10.0):
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every_s = log_every_s
        self.done = 0
        self._start = time.monotonic()
        self._last_draw = -math.inf  # the first update always shows

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw >= 0.1:
                self._draw(now)
        elif now - self._last_draw >= self.log_every_s:
            self._last_draw = now
            logger.info("%s: %s", self.label, self._text(now))

    def _text(self, now: float) -> str:
        rate = self.done / max(now - self._start, 1e-9)
        if self.total:
            return f"{self.done}/{self.total} ({self.done / self.total:.0%}, {rate:.1f}/s)"
        return f"{self.done} ({rate:.1f}/s)"

    def _draw(self, now: float) -> None:
        self._last_draw = now
        bar = ""
        if self.total:
            filled = int(30 * min(1.0, self.done / self.total))
            bar = "[" + "#" * filled + "." * (30 - filled) + "] "
        self.stream.write(f"\r{self.label}: {bar}{self._text(now)}")
        self.stream.flush()

    def close(self) -> None:
        now = time.monotonic()
        if self.tty:
            self._draw(now)
            self.stream.write("\n")
            self.stream.flush()
        else:
            logger.info("%s: finished %s", self.label, self._text(now))
