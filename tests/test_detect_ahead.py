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

    def detect_if_due(frame):
        threads.add(threading.current_thread().name)
        return [frame.index] if frame.index % 3 == 0 else None

    ahead = DetectAhead(ListSource(50), detect_if_due)
    got = []
    while (item := ahead.read()) is not None:
        got.append(item)
    ahead.close()
    assert [f.index for f, _ in got] == list(range(50))
    assert all(d == ([f.index] if f.index % 3 == 0 else None) for f, d in got)
    assert threads == {"detect-ahead"}  # never the loop's thread
    assert ahead.read() is None


def test_a_detector_failure_reaches_the_loop():
    def detect_if_due(frame):
        if frame.index == 5:
            raise RuntimeError("interpreter failed")
        return None

    ahead = DetectAhead(ListSource(10), detect_if_due)
    with pytest.raises(RuntimeError, match="interpreter failed"):
        while ahead.read() is not None:
            pass
    ahead.close()


def test_close_stops_a_reader_that_is_ahead():
    ahead = DetectAhead(ListSource(10_000), lambda frame: None, depth=2)
    assert ahead.read() is not None
    ahead.close()
    assert not ahead._thread.is_alive()
