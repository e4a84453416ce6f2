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


def test_a_video_file_is_prepared_on_the_reading_thread_not_on_one_of_its_own(tmp_path):
    from agent.capture import VideoFileSource
    from tests.test_capture import write_video

    prepared_on = set()
    source = VideoFileSource(str(write_video(tmp_path / "clip.avi", frames=20)))
    ahead = DetectAhead(source, lambda frame: True,
                        lambda frame: prepared_on.add(threading.current_thread().name), lambda prepared: [])
    frames = 0
    while ahead.read() is not None:
        frames += 1
    ahead.close()
    source.close()
    assert frames == 20
    assert prepared_on == {"detect-ahead"}  # prepare runs where the frame was read
    assert source._thread is None  # and the source started no decode thread


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


def test_the_agent_on_a_video_emits_exactly_what_inline_detection_gives(tmp_path):
    """The loop detecting ahead (a file) against the reference path that detects inline, frame by
    frame, with the same schedule: the same events, in the same order."""
    import json

    from agent import payloads
    from agent.capture import VideoFileSource
    from agent.config import load_config
    from agent.tools.flicker import face_sequences, observe_video
    from agent.mqtt import MemoryPublisher
    from agent.classify import make_classifier
    from agent.detect import make_detector
    from agent.pipeline import build_agent, make_tracker_from
    from tests.test_end_to_end import still_video

    video = str(still_video(tmp_path / "clip.avi", seconds=6, fps=10))
    cfg = load_config(None, {"source": video, "mqtt.topic_prefix": "t/a"})
    publisher = MemoryPublisher()
    agent = build_agent(cfg, source=VideoFileSource(video), publisher=publisher)
    agent.run()
    agent.source.close()
    seen = [(m.topic.rsplit("/", 1)[1], json.loads(m.payload)) for m in publisher.messages
            if m.topic.startswith("t/a/event/")]
    observed, _ = observe_video(video, make_detector(cfg.detector), make_classifier(cfg.classifier),
                                detect_interval_s=cfg.detector.interval_s)
    _, expected = face_sequences(observed, make_tracker_from(cfg))
    expected = [(payloads.event_kind(e), payloads.event_payload(e, 0.0)) for e in expected]
    assert len(seen) >= 5  # appeared, first known, ... lost, twice (the face leaves and comes back)
    strip = ("timestamp",)
    assert [(k, {f: v for f, v in p.items() if f not in strip}) for k, p in seen] == \
        [(k, {f: v for f, v in p.items() if f not in strip}) for k, p in expected]
