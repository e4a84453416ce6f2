"""The loop itself, in process: real models and a real video file; messages kept in memory."""

import json
import threading
import time

import pytest

from agent.capture import VideoFileSource
from agent.config import load_config
from agent.mqtt import MemoryPublisher
from agent.pipeline import build_agent
from agent.types import Frame
from tests.conftest import astronaut_bgr
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


class CameraWithOutage:
    """A live source standing in for a camera that goes away and comes back (no camera can be
    unplugged in a test): a real photo at 20 frames/s, then nothing for `outage_s`, then the photo
    again until the agent is stopped. Frame times are monotonic, as LiveSource's are, and its
    status follows its reads, as LiveSource's does."""

    live, still = True, False

    def __init__(self, image, publisher, before_s=1.0, outage_s=3.0):
        self.image, self.publisher = image, publisher
        self.started = time.monotonic()
        self.before_s, self.outage_s = before_s, outage_s
        self.index = 0
        self.messages_before_resume: int | None = None
        self._status = "starting"

    def read(self):
        elapsed = time.monotonic() - self.started
        if self.before_s <= elapsed < self.before_s + self.outage_s:
            time.sleep(0.2)  # LiveSource.read waits, then says there is nothing
            self._status = "reconnecting"
            return None
        if elapsed >= self.before_s and self.messages_before_resume is None:
            self.messages_before_resume = len(self.publisher.messages)
        time.sleep(0.05)
        self.index += 1
        self._status = "ok"
        return Frame(self.image, time.monotonic(), self.index)

    def status(self):
        return self._status

    def dropped(self):
        return 0

    def corrupt(self):
        return 0

    def pause(self):
        pass

    def resume(self):
        pass

    def close(self):
        pass


def test_a_camera_outage_loses_the_faces_and_a_face_after_it_is_a_new_one():
    cfg = load_config(None, {"source": "0", "mqtt.topic_prefix": "t/agent", "mqtt.stats_interval_s": 1})
    publisher = MemoryPublisher()
    camera = CameraWithOutage(astronaut_bgr(), publisher)
    agent = build_agent(cfg, source=camera, publisher=publisher)
    threading.Timer(5.5, agent.stop).start()
    agent.run()
    def json_under_root(m) -> bool:  # t/agent/analysis is a plain ON or OFF
        return m.topic.startswith("t/agent/") and m.payload.startswith("{")

    messages = [(m.topic, json.loads(m.payload)) for m in publisher.messages if json_under_root(m)]
    resume = sum(1 for m in publisher.messages[:camera.messages_before_resume] if json_under_root(m))
    events = [(t.rsplit("/", 1)[1], p["face_id"]) for t, p in messages if t.endswith(("face_appeared", "face_lost"))]
    assert [kind for kind, _ in events[:3]] == ["face_appeared", "face_lost", "face_appeared"]
    (_, first), (_, lost), (_, second) = events[:3]
    assert lost == first and second != first
    # Lost while the camera was away, not when it came back; the state said so; the rate was 0.
    lost_at = next(i for i, (t, _) in enumerate(messages) if t.endswith("event/face_lost"))
    assert lost_at < resume
    assert any(t == "t/agent/state" and p["faces_in_view"] == 0 for t, p in messages[lost_at:resume])
    outage_stats = [p for t, p in messages[lost_at:resume] if t == "t/agent/stats"]
    assert outage_stats and all(p["camera"] == "reconnecting" and p["fps"] == 0 for p in outage_stats)


def test_the_camera_status_goes_out_when_it_changes_not_a_stats_interval_later():
    # An automation on the camera sensor going `reconnecting`, or back to `ok`, waited up to
    # mqtt.stats_interval_s (30 s) for the stats that carry it.
    cfg = load_config(None, {"source": "0", "mqtt.topic_prefix": "t/agent"})
    publisher = MemoryPublisher()
    camera = CameraWithOutage(astronaut_bgr(), publisher, before_s=2.0, outage_s=1.5)
    agent = build_agent(cfg, source=camera, publisher=publisher)
    before_stop = []
    threading.Timer(5.0, lambda: (before_stop.append(len(publisher.messages)), agent.stop())).start()
    agent.run()
    said = [json.loads(m.payload)["camera"] for m in publisher.messages[:before_stop[0]] if m.topic == "t/agent/stats"]
    # Start-up, the first frame, the outage, the camera back: each once, long before 30 s.
    assert said == ["starting", "ok", "reconnecting", "ok"]


class FlappingCamera(CameraWithOutage):
    """A camera whose status changes at every read: one that fails at each reopen right after its
    first frame, with a short camera.retry_initial_s."""

    def read(self):
        time.sleep(0.02)
        self.index += 1
        self._status = "reconnecting" if self.index % 2 else "ok"
        return Frame(self.image, time.monotonic(), self.index)


def test_a_flapping_camera_status_sends_at_most_a_stats_a_second():
    cfg = load_config(None, {"source": "0", "mqtt.topic_prefix": "t/agent"})
    publisher = MemoryPublisher()
    agent = build_agent(cfg, source=FlappingCamera(astronaut_bgr(), publisher), publisher=publisher)
    started = time.monotonic()
    threading.Timer(3.0, agent.stop).start()
    agent.run()
    stats = [m for m in publisher.messages if m.topic == "t/agent/stats"]
    # Start-up, then one a second at most, and the last one at the end.
    assert 3 <= len(stats) <= 2 + (time.monotonic() - started) + 1, len(stats)


class OneFrameThenGone(CameraWithOutage):
    """A stream that gives one frame and then no more (it died right after it connected)."""

    def read(self):
        if self.index:
            time.sleep(0.2)
            return None
        self.index += 1
        return Frame(self.image, time.monotonic(), self.index)

    def status(self):
        return "reconnecting" if self.index else "starting"


def test_a_face_on_the_only_frame_before_the_camera_went_is_lost_all_the_same():
    # With one frame the rate is unknown, and the face stayed in view until the agent stopped.
    cfg = load_config(None, {"source": "0", "mqtt.topic_prefix": "t/agent"})
    publisher = MemoryPublisher()
    agent = build_agent(cfg, source=OneFrameThenGone(astronaut_bgr(), publisher), publisher=publisher)
    before_stop = []
    threading.Timer(3.0, lambda: (before_stop.append(len(publisher.messages)), agent.stop())).start()
    agent.run()
    topics = [m.topic for m in publisher.messages[:before_stop[0]]]
    assert "t/agent/event/face_appeared" in topics and "t/agent/event/face_lost" in topics
    last_state = [m for m in publisher.messages[:before_stop[0]] if m.topic == "t/agent/state"][-1]
    assert json.loads(last_state.payload)["faces_in_view"] == 0


def test_the_first_stats_come_before_any_frame_and_replace_what_the_last_run_left(tmp_path):
    # After a watchdog restart the last run's retained stats said "reconnecting" (and its speed)
    # for a whole stats interval while the camera worked again.
    agent = make_agent(tmp_path, 0.1)
    agent.run()
    messages = agent.publisher.messages
    topics = [m.topic for m in messages]
    first = topics.index("t/agent/stats")
    assert first < topics.index("t/agent/event/face_appeared")
    assert messages[first].retain and json.loads(messages[first].payload)["frames"] == 0


def test_the_first_state_says_no_face_before_any_frame(tmp_path):
    agent = make_agent(tmp_path, 0.1)
    agent.run()
    first_state = next(m for m in agent.publisher.messages if m.topic == "t/agent/state")
    assert json.loads(first_state.payload)["faces_in_view"] == 0
    first_frame_message = next(i for i, m in enumerate(agent.publisher.messages) if m.topic.startswith("t/agent/event/"))
    assert agent.publisher.messages.index(first_state) < first_frame_message


class SlowCamera(CameraWithOutage):
    """A healthy camera slower than tracking.max_gap_s (a snapshot URL): a frame every `period_s`;
    in between, reads wait up to a second and come back empty, as LiveSource's do."""

    def __init__(self, image, period_s=2.0):
        super().__init__(image, publisher=None, before_s=1e9, outage_s=0.0)
        self.period_s = period_s
        self.next_frame = time.monotonic()

    def read(self):
        wait = self.next_frame - time.monotonic()
        if wait > 1.0:
            time.sleep(1.0)
            return None
        time.sleep(max(0.0, wait))
        self.next_frame += self.period_s
        self.index += 1
        return Frame(self.image, time.monotonic(), self.index)


def test_a_camera_slower_than_the_gap_keeps_its_faces_between_frames():
    cfg = load_config(None, {"source": "0", "mqtt.topic_prefix": "t/agent"})
    publisher = MemoryPublisher()
    agent = build_agent(cfg, source=SlowCamera(astronaut_bgr()), publisher=publisher)
    threading.Timer(6.5, agent.stop).start()  # frames at 0, 2, 4 and 6 s
    agent.run()
    kinds = [m.topic.rsplit("/", 1)[1] for m in publisher.messages if m.topic.startswith("t/agent/event/face_")]
    assert kinds == ["face_appeared", "face_lost"]  # one face, lost only at the end


class InstantCamera(CameraWithOutage):
    """A live camera that always has a frame ready."""

    def __init__(self, image):
        super().__init__(image, publisher=None, before_s=1e9, outage_s=0.0)

    def read(self):
        self.index += 1
        return Frame(self.image, time.monotonic(), self.index)


def received(sock) -> list[bytes]:
    """The notifications waiting on the socket (conftest's notify_socket)."""
    sock.setblocking(False)
    got = []
    while True:
        try:
            got.append(sock.recv(1024))
        except BlockingIOError:
            return got


def test_the_watchdog_is_pinged_through_a_camera_max_fps_rest(notify_socket):
    # The rest between frames is the agent's choice: with camera.max_fps below one frame per
    # WatchdogSec, systemd killed the service at every rest for want of a ping.
    import os

    from agent.notify import SystemdNotifier

    path, sock = notify_socket
    cfg = load_config(None, {"source": "0", "mqtt.topic_prefix": "t/agent", "camera.max_fps": 0.2})
    agent = build_agent(cfg, source=InstantCamera(astronaut_bgr()), publisher=MemoryPublisher())
    agent.notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000",
                                      "WATCHDOG_PID": str(os.getpid())})
    threading.Timer(3.5, agent.stop).start()  # one frame at 0 s, then resting until 5 s
    agent.run()
    pings = received(sock)
    # At most two a second (the notifier's own limit): one after the frame, then through the rest.
    assert pings.count(b"WATCHDOG=1") >= 4, pings


def test_the_loop_stops_on_an_event_a_signal_handler_may_set(tmp_path):
    # SIGTERM's handler sets it; a plain threading.Event deadlocks a handler that comes while the
    # main thread is inside the same event's wait (tests/test_signal_event.py).
    from agent.signal_event import SignalSafeEvent

    assert isinstance(make_agent(tmp_path, 0.1)._stop, SignalSafeEvent)
