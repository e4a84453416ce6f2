"""Face detection a few frames ahead of the loop, on a thread of its own, for file sources.

Which frames get a fresh detection depends only on the frames' own timestamps (the detector runs
at most every `detector.interval_s` of video time), so a thread can read the file and run the
detector on the due frames while the loop is still classifying the frames before them. The
results are the same as detecting inline, frame for frame; only the wall time shrinks, as the
detector (the costliest stage) overlaps the rest on a second core. LiteRT and OpenCV release the
GIL while they compute, so the overlap is real in CPython.

Live sources do not use it: there the loop must take the newest frame, not one queued behind.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

from agent.capture import FrameSource
from agent.types import Detection, Frame

# Frames queued ahead of the loop: enough to ride out one detector run, few enough to hold little.
DEPTH = 4

DetectIfDue = Callable[[Frame], "list[Detection] | None"]


class DetectAhead:
    """Reads `source` and calls `detect_if_due` on each frame, in order, on its own thread;
    `read()` hands out (frame, detections or None when none was due), then None at the end."""

    def __init__(self, source: FrameSource, detect_if_due: DetectIfDue, depth: int = DEPTH):
        self._source = source
        self._detect_if_due = detect_if_due
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="detect-ahead", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self._source.read()
                if frame is None:
                    break
                if not self._put((frame, self._detect_if_due(frame))):
                    return
        except BaseException as exc:  # handed to the loop, which raises it where it belongs
            self._put(exc)
            return
        self._put(None)

    def read(self) -> tuple[Frame, list[Detection] | None] | None:
        if self._ended:
            return None
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if item is None:
            self._ended = True
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
