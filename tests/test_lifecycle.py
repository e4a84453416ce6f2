"""The daemon's life: signals, config reload, a broker that restarts under it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Subscriber, face_jpeg, reload_and_wait_for, stop_agent
from tests.test_end_to_end import still_video


@pytest.fixture
def start_agent(agent_process):
    """Starts the agent on `source` with the broker on `port`, at info level, under `prefix` (none: the
    config's); a video file (a Path) is paced in real time, and with `loop` starts over at its end.
    Stopped and reaped after the test (conftest's agent_process)."""
    def start(port: int, source: Path | str, config: Path | None = None, prefix: str = "life/agent",
              loop: bool = True, extra: tuple[str, ...] = (), env: dict | None = None) -> subprocess.Popen:
        args = ["--source", str(source), "--mqtt-port", str(port), "--log-level", "info", *extra]
        if isinstance(source, Path):
            args += ["--realtime", *(["--loop"] if loop else [])]
        if prefix:
            args += ["--topic-prefix", prefix]
        if config is not None:
            args += ["--config", str(config)]
        return agent_process(*args, env=env)
    return start


@pytest.fixture
def clip(tmp_path) -> Path:
    return still_video(tmp_path / "clip.avi", seconds=4)


def test_sigterm_publishes_final_summary_and_offline_then_exits_0_within_5_s(broker, subscriber_factory, start_agent,
                                                                             clip):
    sub = subscriber_factory(broker.port, "life/agent/#")
    proc = start_agent(broker.port, clip)
    sub.wait_for(lambda m: m[0] == "life/agent/event/emotion_changed", timeout=60)
    code, took, err = stop_agent(proc)
    assert code == 0, err
    assert took < 5.0
    sub.wait_for(lambda m: m[0] == "life/agent/summary")
    sub.wait_for(lambda m: m[0] == "life/agent/event/face_lost")
    sub.wait_for(lambda m: m[0] == "life/agent/availability" and m[1] == b"offline")
    assert "Traceback" not in err


@pytest.fixture
def running_with_a_config(broker, subscriber_factory, start_agent, tmp_path):
    """Starts the agent on `video` with a --config file of `text` (so SIGHUP reloads it), under life/agent/;
    returns (that file, a subscriber to life/agent/#, the process) once `first` came."""
    def start(text: str, video: Path, first: str = "life/agent/event/emotion_changed",
              loop: bool = True) -> tuple[Path, Subscriber, subprocess.Popen]:
        config = tmp_path / "config.yaml"
        config.write_text(text)
        sub = subscriber_factory(broker.port, "life/agent/#")
        proc = start_agent(broker.port, video, config=config, loop=loop)
        sub.wait_for(lambda m: m[0] == first, timeout=60)
        return config, sub, proc
    return start


def test_a_reload_that_keeps_the_broker_keeps_the_connection(running_with_a_config, clip):
    config, sub, proc = running_with_a_config("smoothing:\n  dwell_s: 0.25\n", clip)
    config.write_text("smoothing:\n  dwell_s: 0.5\n")
    before = len(sub.all)
    # The pipeline restarts (the face is found again under a new id) on the same connection.
    reload_and_wait_for(proc, sub, "life/agent/event/face_appeared")
    code, _, err = stop_agent(proc)
    assert code == 0, err
    assert "configuration reloaded" in err and "goes on from frame" not in err  # --loop: it starts over
    availability = [p for t, p, _ in sub.all if t == "life/agent/availability"]
    assert availability == [b"online", b"offline"], "a reload on the same broker must not blink offline"
    assert err.count("connected to broker") == 1
    # docs/mqtt.md: a face id is never reused while the agent runs. The reloaded pipeline's tracker
    # started at 1 again: face_lost 1, then face_appeared 1 for the face found again.
    appeared = [json.loads(p)["face_id"] for t, p, _ in sub.all if t == "life/agent/event/face_appeared"]
    earlier = [json.loads(p)["face_id"] for t, p, _ in sub.all[:before] if t == "life/agent/event/face_appeared"]
    assert earlier and appeared[len(earlier)] > max(earlier), appeared


def test_sighup_reloads_the_config(broker, subscriber_factory, start_agent, clip, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("mqtt:\n  topic_prefix: first/agent\n")
    sub = subscriber_factory(broker.port, ["first/#", "second/#"])
    proc = start_agent(broker.port, clip, config=config, prefix="")
    sub.wait_for(lambda m: m[0] == "first/agent/event/face_appeared", timeout=60)
    config.write_text("mqtt:\n  topic_prefix: second/agent\n  prot: 1\n")  # a typo: rejected, kept running
    # Read and rejected before the file changes again: the old config's pipeline starts over.
    reload_and_wait_for(proc, sub, "first/agent/event/face_appeared")
    assert proc.poll() is None
    config.write_text("mqtt:\n  topic_prefix: second/agent\n")
    proc.send_signal(signal.SIGHUP)
    # The state comes after the discovery: once it is here, everything retained is on the broker
    # (a subscriber that came in before would get them live, not retained).
    sub.wait_for(lambda m: m[0] == "second/agent/state", timeout=60)
    # Home Assistant keeps no dead twin: the first device's discovery and state are emptied.
    retained = subscriber_factory(broker.port, ["homeassistant/#", "first/#", "second/#"])
    retained.wait_for(lambda m: m[0] == "second/agent/state" and m[2])
    retained.wait_for(lambda m: m[0].startswith("homeassistant/") and b"second/agent" in m[1] and m[2])
    code, _, err = stop_agent(proc)
    assert code == 0, err
    assert "new configuration rejected" in err and "mqtt.prot: unknown setting" in err
    left = {t for t, p, kept in retained.all if kept and p}
    assert not any(b"first/agent" in p for t, p, kept in retained.all if kept and t.startswith("homeassistant/"))
    assert "first/agent/state" not in left and "first/agent/stats" not in left
    assert "second/agent/state" in left


def test_a_reload_while_the_password_file_is_missing_keeps_the_daemon_and_its_connection(
        running_with_a_config, clip, tmp_path):
    # The password file moved away (a rotation half done): the reload was rejected, but the old
    # connection was closed all the same and the old config could not log in again: exit 2, and
    # systemd, told not to restart on 2, left the service down.
    password = tmp_path / "mqtt_password"
    password.write_text("secret\n")
    _, sub, proc = running_with_a_config(f"mqtt:\n  username: agent\n  password_file: {password}\n", clip,
                                         first="life/agent/event/face_appeared")
    password.rename(tmp_path / "mqtt_password.moved")
    reload_and_wait_for(proc, sub, "life/agent/event/face_appeared")
    assert proc.poll() is None
    code, _, err = stop_agent(proc)
    assert code == 0, err
    assert "new configuration rejected" in err and "keeps the password it has" in err
    availability = [p for t, p, _ in sub.all if t == "life/agent/availability"]
    assert availability == [b"online", b"offline"]


def test_a_sigterm_during_a_reload_is_not_forgotten(running_with_a_config, clip):
    # systemd's stop can follow a reload at once; it used to stop the agent being replaced, and the
    # next one ran on until systemd's SIGKILL.
    _, sub, proc = running_with_a_config("smoothing:\n  dwell_s: 0.25\n", clip)
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.05)
    code, _, err = stop_agent(proc)
    assert code == 0, err
    sub.wait_for(lambda m: m[0] == "life/agent/availability" and m[1] == b"offline")
    assert "Traceback" not in err


def test_a_sighup_while_a_reload_builds_the_next_agent_does_not_tell_systemd_stopping(
        broker, clip, tmp_path, monkeypatch):
    # That agent is stopped before its first frame and a reload follows; its run used to end with
    # STOPPING=1, which systemd takes for the start of a stop (and a SIGKILL 10 s on). In process,
    # so the second SIGHUP can be sent from inside the build, where it used to do harm.
    import agent.pipeline
    from agent.cli import main

    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.1)
    got: list[str] = []

    def listen() -> None:
        while sock.fileno() != -1:
            try:
                message = sock.recv(4096).decode()
            except OSError:
                continue
            got.append(message)
            if message.startswith("READY=1"):
                readies = sum(m.startswith("READY=1") for m in got)
                # the first start: reload; the agent after both reloads: stop
                os.kill(os.getpid(), signal.SIGHUP if readies == 1 else signal.SIGTERM)

    builds = []
    real_build = agent.pipeline.build_agent

    def build(*args, **kwargs):
        builds.append(1)
        if len(builds) == 2:  # the first reload's build: a second SIGHUP comes now
            os.kill(os.getpid(), signal.SIGHUP)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(agent.pipeline, "build_agent", build)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    config = tmp_path / "config.yaml"
    config.write_text("smoothing:\n  dwell_s: 0.25\n")
    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        code = main(["run", "--source", str(clip), "--loop", "--realtime", "--mqtt-port", str(broker.port),
                     "--config", str(config)])
        time.sleep(0.3)
    finally:
        sock.close()
    assert code == 0
    assert len(builds) == 3  # the start, the reload the second signal cut short, the reload after it
    assert [m for m in got if m.startswith("STOPPING=1")] == ["STOPPING=1"] and got[-1] == "STOPPING=1", got


EVENT_LOG = re.compile(r"(face_appeared|emotion_changed|face_lost) face (\d+)")


def test_broker_restart_mid_run_loses_no_event(persistent_broker, subscriber_factory, start_agent, clip):
    broker = persistent_broker
    sub = subscriber_factory(broker.port, "life/agent/event/+", client_id="home-automation", clean_session=False)
    proc = start_agent(broker.port, clip, extra=("--flush-timeout", "30"))
    sub.wait_for(lambda m: m[0] == "life/agent/event/emotion_changed", timeout=60)
    broker.stop()
    time.sleep(4)  # the clip loops: faces are lost and found while the broker is down
    broker.start()
    time.sleep(3)
    code, _, err = stop_agent(proc)
    assert code == 0, err
    produced = [(kind, int(face)) for kind, face in EVENT_LOG.findall(err)]
    assert len(produced) >= 6
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        received = [(t.rsplit("/", 1)[1], json.loads(p)["face_id"]) for t, p, _ in sub.all]
        if all(e in received for e in produced):
            break
        time.sleep(0.2)
    missing = [e for e in produced if e not in received]
    assert not missing, f"lost across the broker restart: {missing}"


def test_unreachable_camera_keeps_the_agent_running_and_says_so(broker, subscriber_factory, start_agent, tmp_path):
    from tests.conftest import free_port

    config = tmp_path / "config.yaml"
    config.write_text("mqtt:\n  stats_interval_s: 1\ncamera:\n  retry_initial_s: 0.2\n  retry_max_s: 0.5\n")
    sub = subscriber_factory(broker.port, "life/agent/#")
    proc = start_agent(broker.port, f"http://127.0.0.1:{free_port()}/camera.mjpg", config=config)
    _, payload, _ = sub.wait_for(lambda m: m[0] == "life/agent/stats" and b'"reconnecting"' in m[1], timeout=30)
    assert json.loads(payload)["frames"] == 0
    fresh = subscriber_factory(broker.port, "life/agent/stats")
    assert fresh.wait_for(lambda m: m[2])  # retained: a dashboard sees the camera's state at once
    assert proc.poll() is None
    code, took, err = stop_agent(proc)
    assert code == 0 and took < 5.0, err


def test_home_assistant_birth_gets_discovery_again(broker, subscriber_factory, start_agent, clip):
    proc = start_agent(broker.port, clip)
    first = subscriber_factory(broker.port, "homeassistant/+/+/+/config")
    first.wait_for(lambda m: m[0].endswith("dominant_emotion/config"), timeout=60)
    watcher = subscriber_factory(broker.port, "homeassistant/#")
    watcher.wait_for(lambda m: m[0].endswith("/config"))
    before = sum(1 for t, _, r in watcher.all if t.endswith("/config") and not r)
    watcher.client.publish("homeassistant/status", "online", qos=1)
    # a live (not retained) copy of the discovery messages arrives after the birth message
    watcher.wait_for(lambda m: m[0].endswith("dominant_emotion/config") and not m[2], timeout=10)
    assert sum(1 for t, _, r in watcher.all if t.endswith("/config") and not r) > before
    code, _, err = stop_agent(proc)
    assert code == 0, err


def retained_once_in(port: int, subscriber_factory, config: Path) -> dict[str, bytes]:
    """Every value retained under first/, second/ and homeassistant/, once all of `config`'s retained
    topics are in: mosquitto sends all it retains for a subscription at once, so whatever an earlier
    run left is in by then too."""
    from agent.config import load_config
    from agent.pipeline import retained_topics

    retained = subscriber_factory(port, ["homeassistant/#", "first/#", "second/#"])
    for topic in retained_topics(load_config(str(config))):
        retained.wait_for(lambda m: m[0] == topic and m[2])
    return {t: p for t, p, is_retained in retained.all if is_retained and p}


def test_a_restart_with_other_topics_empties_what_the_last_run_left_retained(broker, subscriber_factory, clip,
                                                                            tmp_path):
    # A reload knows the old topics; a restart only through the record in the state directory.
    config, state = tmp_path / "config.yaml", tmp_path / "state"
    state.mkdir()
    env = dict(os.environ, STATE_DIRECTORY=str(state))

    def run_with_prefix(prefix: str) -> subprocess.CompletedProcess:
        config.write_text(f"mqtt:\n  topic_prefix: {prefix}\n")
        return subprocess.run([sys.executable, "-m", "agent", "run", "--source", str(clip), "--config", str(config),
                               "--mqtt-port", str(broker.port), "--log-level", "info"],
                              env=env, capture_output=True, text=True, timeout=120)

    first = run_with_prefix("first/agent")
    assert first.returncode == 0, first.stderr
    second = run_with_prefix("second/agent")
    assert second.returncode == 0, second.stderr
    kept = retained_once_in(broker.port, subscriber_factory, config)
    assert not [t for t, p in kept.items() if t.startswith("first/agent/") and t != "first/agent/availability"]
    assert not [t for t, p in kept.items() if t.startswith("homeassistant/") and b"first/agent" in p]
    assert [t for t, p in kept.items() if t.startswith("homeassistant/") and b"second/agent" in p]
    record = json.loads(next(state.glob("retained-*.json")).read_text())
    assert not [t for t in record["topics"] if "first" in t]  # settled: delivered, so forgotten
    assert re.search(r"emptying \d+ retained topic\(s\) an earlier configuration left", second.stderr), second.stderr


def test_a_reload_that_moves_the_topics_while_the_broker_is_down_still_empties_the_old_ones(
        persistent_broker, tmp_path, subscriber_factory, start_agent, clip):
    # The old agent's emptying cannot reach a broker that is down, and its connection is closed
    # for the new one: the record hands the old topics to the new agent, which empties them.
    broker = persistent_broker
    config, state = tmp_path / "config.yaml", tmp_path / "state"
    state.mkdir()
    config.write_text("mqtt:\n  topic_prefix: first/agent\n  reconnect_max_s: 1\n")
    proc = start_agent(broker.port, clip, config=config, prefix="", env=dict(os.environ, STATE_DIRECTORY=str(state)))
    subscriber_factory(broker.port, "first/#").wait_for(lambda m: m[0] == "first/agent/state", timeout=60)
    broker.stop()
    config.write_text("mqtt:\n  topic_prefix: second/agent\n  reconnect_max_s: 1\n")
    proc.send_signal(signal.SIGHUP)
    time.sleep(5)  # the old connection gives up on its queue (3 s) and the new agent starts
    broker.start()
    subscriber_factory(broker.port, "second/#").wait_for(lambda m: m[0] == "second/agent/state", timeout=60)
    code, _, err = stop_agent(proc)
    assert code == 0, err
    kept = retained_once_in(broker.port, subscriber_factory, config)
    assert not [t for t in kept if t.startswith("first/agent/") and t != "first/agent/availability"]
    assert not [t for t, p in kept.items() if t.startswith("homeassistant/") and b"first/agent" in p]


def test_a_reload_during_a_file_run_goes_on_from_where_it_was(running_with_a_config, tmp_path):
    # Played from the start again, the video's events would all be published twice.
    video = still_video(tmp_path / "clip.avi", seconds=6)  # 60 frames at 10 frames/s
    # no --loop: the run ends with the video
    _, sub, proc = running_with_a_config("smoothing:\n  dwell_s: 0.25\n", video, loop=False)
    proc.send_signal(signal.SIGHUP)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0, err
    assert "configuration reloaded" in err and "SIGHUP: the video goes on from frame" in err
    sub.wait_for(lambda m: m[0] == "life/agent/availability" and m[1] == b"offline")
    summaries = [json.loads(p) for t, p, _ in sub.all if t == "life/agent/summary"]
    assert len(summaries) >= 2  # one closing each agent's run
    assert sum(s["window"]["frames"] for s in summaries) == 60


def test_a_stalled_mjpeg_stream_is_reported_its_faces_lost_and_it_comes_back(broker, subscriber_factory, mjpeg_server,
                                                                            start_agent, tmp_path):
    # An ESP32-CAM on Wi-Fi stalls with its connection open: the stats said "ok" for 30 s. (A
    # SIGTERM during a stalled read is test_capture's: here the 1.5 s stall timeout would end it.)
    server = mjpeg_server([face_jpeg()], fps=10)
    config = tmp_path / "config.yaml"
    config.write_text("mqtt:\n  stats_interval_s: 1\n"
                      "camera:\n  retry_initial_s: 0.2\n  retry_max_s: 0.5\n  stall_timeout_s: 1.5\n")
    sub = subscriber_factory(broker.port, "life/agent/#")
    proc = start_agent(broker.port, server.url, config=config)
    sub.wait_for(lambda m: m[0] == "life/agent/event/face_appeared", timeout=60)
    time.sleep(1)
    before = len(sub.all)
    stalled = time.monotonic()
    server.stall()

    def since_the_stall(m) -> bool:
        return sub.all.index(m) >= before

    sub.wait_for(lambda m: m[0] == "life/agent/event/face_lost" and since_the_stall(m), timeout=5)
    sub.wait_for(lambda m: m[0] == "life/agent/state" and b'"faces_in_view":0' in m[1] and since_the_stall(m))
    sub.wait_for(lambda m: m[0] == "life/agent/stats" and b'"reconnecting"' in m[1] and since_the_stall(m),
                 timeout=10)
    assert time.monotonic() - stalled < 5
    server.resume()
    sub.wait_for(lambda m: m[0] == "life/agent/event/face_appeared" and since_the_stall(m), timeout=10)
    code, took, err = stop_agent(proc)
    assert code == 0 and took < 5.0, err
    assert err.count("reconnecting (it stopped giving frames") == 1 and err.count(f"stream {server.url}: ok") == 2, err
