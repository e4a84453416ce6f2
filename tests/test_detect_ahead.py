"""Detection ahead of the loop gives the same detections, frame for frame, as detecting inline."""

import threading

import pytest

from agent.detect_ahead import DetectAhead
from agent.types import Frame


class ListSource:
    live = False
    still = False

    def __init__(self, n: int):
        self._frames = [Frame(None, i / 30, i) for i in range(n)]

    def read(self):
        return self._frames.pop(0) if self._frames else None


def test_every_frame_comes_in_order_with_the_detection_made_for_it():
    threads = set()

    def run(frame):
        threads.add(threading.current_thread().name)
        return [frame.index]

    ahead = DetectAhead(ListSource(50), lambda frame: frame.index % 3 == 0, lambda frame: frame, run)
    got = []
    while (item := ahead.read()) is not None:
        got.append(item)
    ahead.close()
    assert [f.index for f, _ in got] == list(range(50))
    assert all(d == ([f.index] if f.index % 3 == 0 else None) for f, d in got)
    assert len(threads) == 1 and threading.current_thread().name not in threads  # one worker, not the loop
    assert ahead.read() is None


def test_a_detector_failure_reaches_the_loop():
    def run(frame):
        if frame.index == 5:
            raise RuntimeError("interpreter failed")
        return []

    ahead = DetectAhead(ListSource(10), lambda frame: True, lambda frame: frame, run)
    with pytest.raises(RuntimeError, match="interpreter failed"):
        while ahead.read() is not None:
            pass
    ahead.close()


def test_close_stops_a_reader_that_is_ahead():
    ahead = DetectAhead(ListSource(10_000), lambda frame: False, lambda frame: frame, lambda p: [], depth=2)
    assert ahead.read() is not None
    ahead.close()
    assert not ahead._thread.is_alive()
