"""The loop itself, in process: real models and a real video file; messages kept in memory."""

import json

import pytest

from agent.capture import VideoFileSource
from agent.config import load_config
from agent.mqtt import MemoryPublisher
from agent.pipeline import build_agent
from tests.test_end_to_end import still_video


class CountingDetector:
    """Wraps the real detector and counts its runs (the loop calls prepare, then run)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def detect(self, image):
        return self.run(self.prepare(image))

    def prepare(self, image):
        return self.inner.prepare(image)

    def run(self, prepared):
        self.calls += 1
        return self.inner.run(prepared)


def make_agent(tmp_path, interval_s: float, seconds: float = 3.0):
    video = still_video(tmp_path / "clip.avi", seconds=seconds, fps=10)
    cfg = load_config(None, {"source": str(video), "detector.interval_s": interval_s,
                             "mqtt.topic_prefix": "t/agent"})
    agent = build_agent(cfg, source=VideoFileSource(str(video)), publisher=MemoryPublisher())
    agent.detector = CountingDetector(agent.detector)
    return agent


@pytest.mark.parametrize("interval_s, expected_calls", [(0, 30), (0.1, 30), (0.25, 10), (1.0, 3)])
def test_detector_runs_at_most_once_per_interval_but_every_frame_is_classified(tmp_path, interval_s,
                                                                               expected_calls):
    agent = make_agent(tmp_path, interval_s)
    result = agent.run()
    assert result.frames == 30
    assert agent.detector.calls == expected_calls
    assert len(agent.times.samples["classify"]) == 30


def test_faces_are_lost_within_one_interval_after_they_leave(tmp_path):
    agent = make_agent(tmp_path, 0.5, seconds=6)
    agent.run()
    lost = [json.loads(m.payload) for m in agent.publisher.messages if m.topic.endswith("event/face_lost")]
    assert len(lost) == 2  # the clip's face leaves for 2 s in the middle, then comes back


def test_discovery_and_state_are_retained_events_are_not(tmp_path):
    agent = make_agent(tmp_path, 0.1)
    agent.run()
    messages = agent.publisher.messages
    assert any(m.topic.startswith("homeassistant/") and m.retain for m in messages)
    assert all(m.retain for m in messages if m.topic in ("t/agent/state", "t/agent/stats"))
    assert not any(m.retain for m in messages if m.topic.startswith(("t/agent/event/", "t/agent/summary")))
    assert all(m.topic.startswith(("t/agent/", "homeassistant/")) for m in messages)
