"""Face detection a few frames ahead of the loop, on threads of their own, for file sources.

Which frames get a fresh detection depends only on the frames' own timestamps (the detector runs
at most every `detector.interval_s` of video time), so a thread can decode the file (itself:
`VideoFileSource.read_here`, no decode thread besides), pick the due frames and prepare the
model's input for them, while a second thread runs the model on the frame prepared before, and
the loop still classifies the frames before that. The results are the same
as detecting inline, frame for frame; only the wall time shrinks, as the detector (the costliest
stage) overlaps the rest. LiteRT and OpenCV release the GIL while they compute, so the overlap is
real in CPython.

Live sources do not use it: there the loop must take the newest frame, not one queued behind.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from agent.capture import FrameSource, put_until_stopped
from agent.types import Detection, Frame

# Frames queued ahead of the loop: enough to ride out a detector run, few enough to hold little.
DEPTH = 6


class DetectAhead:
    """Reads `source` in order on its own thread. For each frame `is_due` (called in frame order)
    says whether it gets a detection; if so `prepare` runs on that thread and `run` on a worker
    of its own (the interpreter only ever on that one). `read()` hands out (frame, detections or
    None when none was due), in frame order, then None at the end."""

    def __init__(self, source: FrameSource, is_due: Callable[[Frame], bool], prepare: Callable[[Frame], Any],
                 run: Callable[[Any], list[Detection]], depth: int = DEPTH):
        # This thread already runs ahead of the loop: a source that can decode on it need not
        # run (and queue frames on) a thread of its own.
        self._read = getattr(source, "read_here", source.read)
        self._is_due, self._prepare, self._run_model = is_due, prepare, run
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detect")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="detect-ahead", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        return put_until_stopped(self._queue, item, self._stop)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self._read()
                if frame is None:
                    break
                job = self._worker.submit(self._run_model, self._prepare(frame)) if self._is_due(frame) else None
                if not self._put((frame, job)):
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
            return None
        frame, job = item
        try:
            return frame, (job.result() if job is not None else None)
        except BaseException:
            self._ended = True
            raise

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._worker.shutdown(wait=True, cancel_futures=True)
