"""The privacy switch: `<root>/analysis/set` (ON or OFF) and camera.enabled pause and resume the
analysis; paused, a camera or stream is closed and nothing is read. Against a real mosquitto and a
real MJPEG stream, with the real models."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import load_config
from agent.mqtt import MemoryPublisher
from agent.pipeline import build_agent
from agent.switch import AnalysisSwitch, parse_command
from tests.conftest import Subscriber, astronaut_bgr, face_jpeg, stop_agent, wait_until
from tests.test_end_to_end import still_video
from tests.test_pipeline import InstantCamera, received

ROOT = "sw/agent"
COMMAND = f"{ROOT}/analysis/set"
FACE_EVENTS = tuple(f"{ROOT}/event/{kind}" for kind in ("face_appeared", "emotion_changed", "face_lost"))


# --- the switch alone ------------------------------------------------------------------------------

@pytest.mark.parametrize("payload, enabled", [
    (b"ON", True), (b"OFF", False), (b"on", True), (b"Off", False), (b"  ON\n", True), (b"\toff ", False),
    (b"", None), (b"1", None), (b"true", None), (b"ONN", None), (b"O N", None), (b'{"state": "OFF"}', None),
    (b"\xff\xfe", None),
])
def test_commands_are_on_or_off_in_any_case_with_blanks_around(payload, enabled):
    assert parse_command(payload) is enabled


def test_the_config_decides_until_a_command_comes_and_then_the_command_does():
    switch = AnalysisSwitch(enabled=False)
    assert not switch.enabled and not switch.commanded
    switch.configure(True)  # a reload
    assert switch.enabled
    switch.command(COMMAND, b"OFF")
    assert not switch.enabled and switch.commanded
    switch.configure(True)  # a reload while a command stands: the command still decides
    assert not switch.enabled
    switch.command(COMMAND, b"")  # a retained command cleared: nothing changes
    assert not switch.enabled


def test_a_bad_command_is_one_warning_per_distinct_payload_and_changes_nothing(caplog):
    switch = AnalysisSwitch(enabled=True)
    with caplog.at_level(logging.WARNING, logger="agent.switch"):
        for payload in [b"maybe", b"maybe", b"\xff\xfe", b"maybe", b"x" * 100_000, b"x" * 100_000, b""]:
            switch.command(COMMAND, payload)
    assert switch.enabled
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3, warnings
    assert warnings[0] == f"{COMMAND}: ignored 'maybe': expected ON or OFF"
    assert all(len(w) < 200 for w in warnings)  # a huge payload is not copied into the log


def test_wait_changed_returns_at_a_command_and_at_a_wake():
    switch = AnalysisSwitch(enabled=True)
    assert not switch.wait_changed(0.05)
    threading.Timer(0.1, switch.command, args=(COMMAND, b"OFF")).start()
    assert switch.wait_changed(5) and not switch.enabled
    threading.Timer(0.1, switch.wake).start()
    assert switch.wait_changed(5)


# --- the loop, in process --------------------------------------------------------------------------

class CountingCamera(InstantCamera):
    """A live camera that always has a frame with a face; counts its reads, pauses and resumes."""

    def __init__(self) -> None:
        super().__init__(astronaut_bgr())
        self.reads = 0
        self.calls: list[str] = []

    def read(self):
        self.reads += 1
        time.sleep(0.02)
        return super().read()

    def pause(self):
        self.calls.append("pause")

    def resume(self):
        self.calls.append("resume")


def test_paused_the_loop_reads_nothing_pings_the_watchdog_and_face_ids_go_on(notify_socket):
    from agent.notify import SystemdNotifier

    path, sock = notify_socket
    cfg = load_config(None, {"source": "0", "mqtt.topic_prefix": ROOT, "mqtt.stats_interval_s": 1})
    camera, publisher, switch = CountingCamera(), MemoryPublisher(), AnalysisSwitch(True)
    agent = build_agent(cfg, source=camera, publisher=publisher, switch=switch)
    agent.notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000",
                                      "WATCHDOG_PID": str(os.getpid())})
    runner = threading.Thread(target=agent.run)
    runner.start()

    def said(topic: str, payload: str | None = None, after: int = 0) -> list:
        return [m for m in publisher.messages[after:] if m.topic == f"{ROOT}/{topic}"
                and (payload is None or m.payload == payload)]

    try:
        wait_until(lambda: said("event/face_appeared"), timeout=30)
        switch.command(COMMAND, b"OFF")
        wait_until(lambda: said("analysis", "OFF"), timeout=1)
        reads, paused_at = camera.reads, len(publisher.messages)
        received(sock)
        # Paused: the proof is what does not happen meanwhile, while the stats go on (every second).
        wait_until(lambda: len(said("stats", after=paused_at)) >= 3, timeout=10)
        assert camera.reads == reads
        assert received(sock).count(b"WATCHDOG=1") >= 2  # at most one per half WATCHDOG_USEC
        during = publisher.messages[paused_at:]
        assert not [m for m in during if m.topic.startswith(f"{ROOT}/event/")]
        assert all(json.loads(m.payload)["camera"] == "paused" for m in said("stats", after=paused_at))
        switch.command(COMMAND, b"ON")
        wait_until(lambda: len(said("event/face_appeared")) == 2, timeout=30)
    finally:
        agent.stop()
        runner.join(10)
    assert camera.calls == ["resume", "pause", "resume"]
    faces = [(m.topic.rsplit("/", 1)[1], json.loads(m.payload)["face_id"]) for m in publisher.messages
             if m.topic in (f"{ROOT}/event/face_appeared", f"{ROOT}/event/face_lost")]
    assert faces[:3] == [("face_appeared", 1), ("face_lost", 1), ("face_appeared", 2)]  # lost once; ids go on
    states = [json.loads(m.payload)["dominant_emotion"] for m in said("state")]
    assert "paused" in states and states[-1] == "none"
    assert [m.payload for m in said("analysis")] == ["ON", "OFF", "ON"]


# --- against a broker ------------------------------------------------------------------------------

@pytest.fixture
def start_agent(agent_process, tmp_path):
    """Starts the agent on `source` under `prefix` with the stats every second, and `camera` and
    `mqtt` settings besides (YAML lines indented under their section); a video file (a Path) loops
    in real time. Returns the process and its config file."""
    def start(port: int, source: Path | str, camera: str = "", mqtt: str = "",
              prefix: str = ROOT) -> tuple[subprocess.Popen, Path]:
        path = tmp_path / "config.yaml"
        path.write_text("mqtt:\n  stats_interval_s: 1\n  reconnect_max_s: 1\n" + mqtt
                        + "camera:\n  retry_initial_s: 0.2\n  retry_max_s: 0.5\n" + camera)
        args = ["--source", str(source), "--mqtt-port", str(port), "--log-level", "info", "--topic-prefix", prefix,
                "--config", str(path)]
        if isinstance(source, Path):
            args += ["--realtime", "--loop"]
        return agent_process(*args), path
    return start


@pytest.fixture
def clip(tmp_path) -> Path:
    return still_video(tmp_path / "clip.avi", seconds=4)


def command(sub: Subscriber, payload: bytes | str, retain: bool = True) -> None:
    """As Home Assistant's switch sends it: retained, QoS 1."""
    sub.client.publish(COMMAND, payload, qos=1, retain=retain).wait_for_publish(5)


def since(sub: Subscriber, mark: int, predicate):
    """`predicate`, for the messages `sub` got after its first `mark` (by identity: an earlier
    message may be equal)."""
    return lambda m: predicate(m) and any(m is later for later in sub.all[mark:])


def is_face_event(m) -> bool:
    return m[0] in FACE_EVENTS


def on_brings_faces_back(sub: Subscriber, proc: subprocess.Popen) -> None:
    """Switches the analysis on, sees a face appear after that, and stops the agent (exit 0)."""
    mark = len(sub.all)
    command(sub, "ON")
    sub.wait_for(since(sub, mark, lambda m: m[0] == f"{ROOT}/event/face_appeared"), timeout=30)
    code, _, err = stop_agent(proc)
    assert code == 0, err


def retained_command(port: int, payload: bytes) -> None:
    """Leaves `payload` retained on the command topic, as Home Assistant's switch does."""
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(COMMAND, payload, qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def test_off_closes_the_stream_within_a_second_and_on_brings_the_events_back(broker, subscriber_factory,
                                                                             mjpeg_server, start_agent):
    server = mjpeg_server([face_jpeg()], fps=10)
    sub = subscriber_factory(broker.port, f"{ROOT}/#")
    proc, _ = start_agent(broker.port, server.url)
    _, first, _ = sub.wait_for(lambda m: m[0] == f"{ROOT}/event/face_appeared", timeout=60)
    assert server.streaming() == 1
    mark = len(sub.all)
    command(sub, "OFF")
    took = wait_until(lambda: server.streaming() == 0, timeout=1.0)  # the server saw its client go
    sub.wait_for(since(sub, mark, lambda m: m[:2] == (f"{ROOT}/analysis", b"OFF")), timeout=1.0 - took)
    off_at = len(sub.all)
    sub.wait_for(since(sub, mark, lambda m: m[0] == f"{ROOT}/state" and b'"dominant_emotion":"paused"' in m[1]))
    sub.wait_for(since(sub, off_at, lambda m: m[0] == f"{ROOT}/stats" and json.loads(m[1])["camera"] == "paused"),
                 timeout=3)
    with pytest.raises(TimeoutError):  # nothing read, nothing seen
        sub.wait_for(since(sub, off_at, is_face_event), timeout=3)
    assert server.streaming() == 0 and server.connections == 1
    # The faces in view were lost once, as the switch went off.
    lost = [json.loads(p)["face_id"] for t, p, _ in sub.all[mark:off_at] if t == f"{ROOT}/event/face_lost"]
    assert lost == [json.loads(first)["face_id"]]
    # What a dashboard sees now: paused, not "no faces"; the agent online.
    fresh = subscriber_factory(broker.port, [f"{ROOT}/state", f"{ROOT}/analysis", f"{ROOT}/availability"])
    assert json.loads(fresh.wait_for(lambda m: m[0] == f"{ROOT}/state" and m[2])[1])["dominant_emotion"] == "paused"
    assert fresh.wait_for(lambda m: m[0] == f"{ROOT}/analysis" and m[2])[1] == b"OFF"
    assert fresh.wait_for(lambda m: m[0] == f"{ROOT}/availability" and m[2])[1] == b"online"
    command(sub, "ON")
    _, again, _ = sub.wait_for(since(sub, off_at, lambda m: m[0] == f"{ROOT}/event/face_appeared"), timeout=30)
    assert json.loads(again)["face_id"] > json.loads(first)["face_id"]  # ids go on
    assert server.streaming() == 1
    code, _, err = stop_agent(proc)
    assert code == 0, err
    assert "analysis switched OFF by sw/agent/analysis/set" in err and "Traceback" not in err


def test_off_closes_the_stream_within_a_second_even_in_a_long_max_fps_rest(broker, subscriber_factory,
                                                                            mjpeg_server, start_agent):
    # The rest between two frames waited on a stop only: at max_fps 0.1 the camera closed 9 s late.
    server = mjpeg_server([face_jpeg()], fps=10)
    sub = subscriber_factory(broker.port, f"{ROOT}/#")
    proc, _ = start_agent(broker.port, server.url, camera="  max_fps: 0.1\n")
    sub.wait_for(lambda m: m[0] == f"{ROOT}/event/face_appeared", timeout=60)
    command(sub, "OFF")
    assert wait_until(lambda: server.streaming() == 0, timeout=1.5) < 1.5
    code, _, err = stop_agent(proc)
    assert code == 0, err


def test_a_retained_off_at_start_keeps_a_new_agent_paused_without_opening_the_stream(broker, subscriber_factory,
                                                                                    mjpeg_server, start_agent):
    server = mjpeg_server([face_jpeg()], fps=10)
    retained_command(broker.port, b"OFF")
    sub = subscriber_factory(broker.port, f"{ROOT}/#")
    proc, _ = start_agent(broker.port, server.url)
    sub.wait_for(lambda m: m[:2] == (f"{ROOT}/analysis", b"OFF"), timeout=60)
    sub.wait_for(lambda m: m[0] == f"{ROOT}/state" and b'"dominant_emotion":"paused"' in m[1])
    sub.wait_for(lambda m: m[0] == f"{ROOT}/stats" and json.loads(m[1])["camera"] == "paused")
    with pytest.raises(TimeoutError):
        sub.wait_for(is_face_event, timeout=3)
    assert server.connections == 0  # never opened, not even for a moment
    assert not [m for m in sub.all if m[:2] == (f"{ROOT}/analysis", b"ON")]
    on_brings_faces_back(sub, proc)


def test_a_looping_video_stops_at_off_within_a_second_and_goes_on_at_on(broker, subscriber_factory, start_agent,
                                                                       clip):
    retained_command(broker.port, b"off")  # any case
    sub = subscriber_factory(broker.port, f"{ROOT}/#")
    proc, _ = start_agent(broker.port, clip)
    sub.wait_for(lambda m: m[:2] == (f"{ROOT}/analysis", b"OFF"), timeout=60)
    with pytest.raises(TimeoutError):
        sub.wait_for(is_face_event, timeout=3)
    command(sub, " On\n")
    sub.wait_for(lambda m: m[0] == f"{ROOT}/event/emotion_changed", timeout=30)
    mark = len(sub.all)
    sent = time.monotonic()
    command(sub, "OFF")
    sub.wait_for(since(sub, mark, lambda m: m[:2] == (f"{ROOT}/analysis", b"OFF")), timeout=1)
    assert time.monotonic() - sent < 1.0
    off_at = len(sub.all)
    with pytest.raises(TimeoutError):
        sub.wait_for(since(sub, off_at, is_face_event), timeout=3)
    stats = [json.loads(p) for t, p, _ in sub.all[off_at:] if t == f"{ROOT}/stats"]
    assert stats and all(s["camera"] == "paused" for s in stats)
    assert len({s["frames"] for s in stats}) == 1  # not a frame read
    on_brings_faces_back(sub, proc)


def test_garbage_commands_are_one_warning_each_and_never_stop_the_agent(broker, subscriber_factory, start_agent,
                                                                       clip):
    sub = subscriber_factory(broker.port, f"{ROOT}/#")
    proc, _ = start_agent(broker.port, clip)
    sub.wait_for(lambda m: m[0] == f"{ROOT}/event/face_appeared", timeout=60)
    garbage = [b"maybe", b"maybe", b"\xff\xfe\x00", b'{"state": "OFF"}', b"1", b"x" * 200_000, b"maybe", b""]
    for payload in garbage:
        command(sub, payload)
    mark = len(sub.all)
    command(sub, "\tOFF ")  # the agent took all of the above, in order, before this
    sub.wait_for(since(sub, mark, lambda m: m[:2] == (f"{ROOT}/analysis", b"OFF")), timeout=5)
    assert proc.poll() is None
    assert not [m for m in sub.all[:mark] if m[:2] == (f"{ROOT}/analysis", b"OFF")]
    code, _, err = stop_agent(proc)
    assert code == 0, err
    ignored = [line for line in err.splitlines() if "ignored" in line and COMMAND in line]
    assert len(ignored) == 5, ignored  # maybe, the bytes, the JSON, 1, the long one; the empty one is silent
    assert "Traceback" not in err and max(len(line) for line in ignored) < 300


def test_sighup_applies_camera_enabled_until_a_command_decides(broker, subscriber_factory, start_agent, clip):
    sub = subscriber_factory(broker.port, f"{ROOT}/#")
    proc, config = start_agent(broker.port, clip, camera="  enabled: false\n")
    sub.wait_for(lambda m: m[:2] == (f"{ROOT}/analysis", b"OFF"), timeout=60)
    with pytest.raises(TimeoutError):
        sub.wait_for(is_face_event, timeout=3)
    config.write_text(config.read_text().replace("enabled: false", "enabled: true"))
    proc.send_signal(signal.SIGHUP)
    sub.wait_for(lambda m: m[0] == f"{ROOT}/event/face_appeared", timeout=60)
    mark = len(sub.all)
    command(sub, "OFF")  # from now on the command decides
    sub.wait_for(since(sub, mark, lambda m: m[:2] == (f"{ROOT}/analysis", b"OFF")), timeout=5)
    mark = len(sub.all)
    proc.send_signal(signal.SIGHUP)  # camera.enabled still true
    sub.wait_for(since(sub, mark, lambda m: m[:2] == (f"{ROOT}/analysis", b"OFF")), timeout=60)  # the new agent's
    with pytest.raises(TimeoutError):
        sub.wait_for(since(sub, mark, is_face_event), timeout=3)
    code, _, err = stop_agent(proc)
    assert code == 0, err
    assert "SIGHUP: camera.enabled is true, but the last command on sw/agent/analysis/set (OFF) decides" in err


def test_without_a_broker_at_start_the_config_decides_and_a_retained_command_applies_later(
        persistent_broker, subscriber_factory, start_agent, clip):
    broker = persistent_broker
    retained_command(broker.port, b"OFF")
    broker.stop()  # it keeps the retained command for when it is back
    proc, _ = start_agent(broker.port, clip)
    lines: list[str] = []
    analysing = threading.Event()

    def read_log() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "face_appeared face 1" in line:
                analysing.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    assert analysing.wait(60)  # as camera.enabled (true) says
    broker.start()
    sub = subscriber_factory(broker.port, f"{ROOT}/#")
    sub.wait_for(lambda m: m[:2] == (f"{ROOT}/analysis", b"OFF"), timeout=30)
    sub.wait_for(lambda m: m[0] == f"{ROOT}/state" and b'"dominant_emotion":"paused"' in m[1], timeout=5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    reader.join(5)
    err = "".join(lines)
    assert "no broker yet: analysis ON as camera.enabled says" in err
    assert "analysis switched OFF by sw/agent/analysis/set (its retained command)" in err


DEPLOY = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"


def deploy_acl() -> str:
    """The mosquitto ACL file that docs/deploy.md shows."""
    import re

    (acl,) = re.findall(r"<!-- acl: mosquitto -->\s*```conf\n(.*?)```", DEPLOY.read_text(encoding="utf-8"), re.S)
    return acl


def test_under_the_acl_of_deploy_md_only_home_assistants_user_may_pause_the_agent(
        restricted_broker, subscriber_factory, start_agent, clip, tmp_path):
    users = {"homeassistant": "ha-secret", "emotion-agent": "agent-secret", "nodered": "nodered-secret"}
    broker = restricted_broker(users, deploy_acl())
    root = "emotion-agent/testhost"
    password = tmp_path / "mqtt_password"
    password.write_text("agent-secret\n")
    ha = subscriber_factory(broker.port, ["emotion-agent/#", "homeassistant/#"], login=("homeassistant", "ha-secret"))
    proc, _ = start_agent(broker.port, clip, prefix=root,
                          mqtt=f"  username: emotion-agent\n  password_file: {password}\n")
    ha.wait_for(lambda m: m[0] == f"{root}/event/face_appeared", timeout=60)
    for user in ("emotion-agent", "nodered"):  # the agent's own user too: it may only read the command
        other = subscriber_factory(broker.port, f"{root}/stats", login=(user, users[user]))
        other.client.publish(f"{root}/analysis/set", "OFF", qos=1, retain=True).wait_for_publish(5)
    with pytest.raises(TimeoutError):
        ha.wait_for(lambda m: m[:2] == (f"{root}/analysis", b"OFF"), timeout=3)
    ha.client.publish(f"{root}/analysis/set", "OFF", qos=1, retain=True).wait_for_publish(5)
    ha.wait_for(lambda m: m[:2] == (f"{root}/analysis", b"OFF"), timeout=5)
    last_stats = json.loads([p for t, p, _ in ha.all if t == f"{root}/stats"][-1])
    code, _, err = stop_agent(proc)
    assert code == 0, err
    # The agent's grants are complete: everything it sent was taken, discovery included.
    assert last_stats["mqtt"]["refused"] == 0, err
    assert "refused" not in err
    assert any(t.startswith("homeassistant/switch/") for t, _, _ in ha.all)
