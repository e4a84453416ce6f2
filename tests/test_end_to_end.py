"""The real command, real models, real photos, a real broker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import astronaut_bgr, wait_until

PREFIX = "test/agent"


def run_agent(port: int, source: Path | str, *extra: str, timeout: float = 120, env=None,
              config: Path | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "agent", "run", "--source", str(source), "--mqtt-port", str(port),
            "--topic-prefix", PREFIX, *extra]
    if config is not None:
        args += ["--config", str(config)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def events(sub, kind: str) -> list[dict]:
    return [json.loads(p) for t, p, _ in sub.all if t == f"{PREFIX}/event/{kind}"]


def test_smiling_photo_puts_a_happy_event_on_the_broker(broker, subscriber_factory, smiling_photo):
    sub = subscriber_factory(broker.port, f"{PREFIX}/#")
    done = run_agent(broker.port, smiling_photo)
    assert done.returncode == 0, done.stderr
    changed = events(sub, "emotion_changed")
    assert changed, f"no emotion_changed event; stderr: {done.stderr[-2000:]}"
    event = changed[0]
    assert event["emotion"] == "happy" and event["previous"] is None
    assert list(event["scores"]) == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert event["confidence"] == max(event["scores"].values()) or event["confidence"] > 0.5
    x, y, w, h = event["box"]
    assert 120 < x + w / 2 < 330 and 20 < y + h / 2 < 250  # the astronaut's face
    # the face appeared before its emotion was known, and was lost at the end
    assert events(sub, "face_appeared")[0]["face_id"] == event["face_id"]
    assert events(sub, "face_lost")[0]["face_id"] == event["face_id"]
    # a fresh subscriber sees the retained state and availability at once
    fresh = subscriber_factory(broker.port, [f"{PREFIX}/state", f"{PREFIX}/availability"])
    fresh.wait_for(lambda m: m[0] == f"{PREFIX}/availability" and m[1] == b"offline" and m[2])
    fresh.wait_for(lambda m: m[0] == f"{PREFIX}/state" and m[2])


def still_video(path: Path, seconds: float = 4.0, fps: float = 10.0) -> Path:
    """The astronaut photo, slowly drifting, as a video with a face-less gap in the middle."""
    image = astronaut_bgr()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (640, 480))
    frames = int(seconds * fps)
    for i in range(frames):
        canvas = np.full((480, 640, 3), 90, np.uint8)
        if not frames // 2 <= i < frames // 2 + fps * 2:  # 2 s with no face: the face is lost
            dx = i
            canvas[:, dx:dx + 512] = cv2.resize(image, (512, 480))[:, : 640 - dx]
        writer.write(canvas)
    writer.release()
    return path


def test_video_file_runs_to_completion_with_events_and_summaries(broker, subscriber_factory, tmp_path):
    video = still_video(tmp_path / "clip.avi", seconds=6)
    config = tmp_path / "config.yaml"
    config.write_text("mqtt:\n  summary_interval_s: 1\n  stats_interval_s: 1\n")
    sub = subscriber_factory(broker.port, f"{PREFIX}/#")
    done = run_agent(broker.port, video, config=config)
    assert done.returncode == 0, done.stderr
    appeared = events(sub, "face_appeared")
    lost = events(sub, "face_lost")
    assert len(appeared) == 2 and len(lost) == 2, "the face gone for 2 s must come back with a new id"
    assert appeared[0]["face_id"] != appeared[1]["face_id"]
    assert any(e["emotion"] == "happy" for e in events(sub, "emotion_changed"))
    summaries = [json.loads(p) for t, p, _ in sub.all if t == f"{PREFIX}/summary"]
    assert len(summaries) >= 4
    assert summaries[0]["faces_in_view"] == 1 and summaries[0]["window"]["frames"] >= 9
    assert abs(sum(summaries[0]["window"]["emotion_share"].values()) - 1) < 0.01
    stats = [json.loads(p) for t, p, _ in sub.all if t == f"{PREFIX}/stats"]
    assert stats and stats[-1]["frames"] == 60 and stats[-1]["camera"] == "ended"
    assert {"detect", "classify"} <= set(stats[-1]["latency_ms"])
    # Only a subscriber that arrives later sees the retain flag (3.1.1 clears it on live delivery).
    late = subscriber_factory(broker.port, f"{PREFIX}/#")
    for suffix in ("state", "stats", "availability", "analysis"):
        late.wait_for(lambda item, s=suffix: item[0] == f"{PREFIX}/{s}" and item[2])
    time.sleep(0.5)  # the broker sends its retained messages in one burst after the subscription
    assert {t.rsplit("/", 1)[1] for t, _, _ in late.all} == {"state", "stats", "availability", "analysis"}, \
        "events and summaries must never be retained"


@pytest.mark.parametrize("discovery, expected_prefix", [
    ("enabled: true", "homeassistant"),
    ("enabled: true\n    prefix: ha/disc", "ha/disc"),
    ("enabled: false", None),
])
def test_discovery_goes_under_its_prefix_or_nowhere(broker, subscriber_factory, smiling_photo, tmp_path,
                                                    discovery, expected_prefix):
    config = tmp_path / "config.yaml"
    config.write_text(f"mqtt:\n  discovery:\n    {discovery}\n")
    sub = subscriber_factory(broker.port, "#")
    done = run_agent(broker.port, smiling_photo, config=config)
    assert done.returncode == 0, done.stderr
    sub.wait_for(lambda item: item[0] == f"{PREFIX}/availability" and item[1] == b"offline")
    outside = {t for t, _, _ in sub.all if not t.startswith(PREFIX + "/")}
    if expected_prefix is None:
        assert outside == set()
    else:
        assert outside and all(t.startswith(expected_prefix + "/") and t.endswith("/config") for t in outside)


def test_run_without_a_broker_fails_after_the_flush_timeout(tmp_path, smiling_photo):
    from tests.conftest import free_port

    done = run_agent(free_port(), smiling_photo, "--flush-timeout", "1")
    assert done.returncode == 1
    assert "message(s) not delivered" in done.stderr and "Traceback" not in done.stderr


def _file(tmp, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


def _video(tmp: Path) -> str:
    return str(still_video(tmp / "one_second.avi", seconds=1))


BAD_COMMAND_LINES = [
    (lambda tmp: ["--source", "/nonexistent.mp4"], "source not found: /nonexistent.mp4", 4),
    (lambda tmp: ["--source", str(tmp)], "source is a directory", 4),
    (lambda tmp: ["--source", _file(tmp, "broken.jpg", b"not a jpeg")], "cannot read image", 4),
    (lambda tmp: ["--source", _file(tmp, "broken.mp4", b"\0" * 4096)], "cannot open video", 4),
    (lambda tmp: ["--mqtt-port", "99999"], "expected a port number 1..65535", 2),
    (lambda tmp: ["--mqtt-port", "abc"], "expected a port number 1..65535", 2),
    (lambda tmp: ["--flush-timeout", "-1"], "expected a number of seconds from 0 to 86400", 2),
    (lambda tmp: ["--flush-timeout", "nan"], "expected a number of seconds from 0 to 86400", 2),
    (lambda tmp: ["--flush-timeout", "1e20"], "expected a number of seconds from 0 to 86400", 2),
    (lambda tmp: ["--source", _video(tmp), "--config", _file(tmp, "c.yaml", b"classifier:\n  model: "
                  + _file(tmp, "junk.tflite", b"junk").encode() + b"\n")], "cannot load model", 3),  # decode thread up
    (lambda tmp: ["--mqtt-host", "mqtt://x"], "mqtt.host: expected a host name or IP address", 2),
    (lambda tmp: ["--mqtt-host", "a b"], "mqtt.host: expected a host name or IP address", 2),
    (lambda tmp: ["--topic-prefix", "a/#"], "mqtt.topic_prefix: expected topic levels without wildcards", 2),
    (lambda tmp: ["--config", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml", 2),
    (lambda tmp: ["--config", _file(tmp, "c.yaml", b"classifier:\n  model: "
                                    + _file(tmp, "junk.tflite", b"junk").encode() + b"\n")], "cannot load model", 3),
    (lambda tmp: ["--config", _file(tmp, "c.yaml", b"detector:\n  model: /nonexistent.tflite\n")],
     "detector.model: file not found", 2),
    (lambda tmp: ["--config", _file(tmp, "c.yaml", b"mqtt:\n  tls:\n    enabled: true\n    ca_file: "
                                    + _file(tmp, "ca.pem", b"not a certificate").encode() + b"\n")],
     "mqtt.tls.ca_file: not a PEM CA certificate", 2),
]


# The status is the unit's restart policy: systemd restarts it on 4 (a source), never on 2 or 3.
@pytest.mark.parametrize("make_args, message, status", BAD_COMMAND_LINES, ids=[m for _, m, _ in BAD_COMMAND_LINES])
def test_bad_command_line_is_one_line_and_its_exit_status(tmp_path, smiling_photo, make_args, message, status):
    args = make_args(tmp_path)
    if "--source" not in args:
        args += ["--source", str(smiling_photo)]
    done = subprocess.run([sys.executable, "-m", "agent", "run", *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == status, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert "terminate called" not in done.stderr, "aborted instead of exiting"


def free_display(first: int = 90 + os.getpid() % 500) -> int:
    """A display number, from `first` on, that no X server has: no lock file, no socket file, and
    nothing answers on its abstract socket or its TCP port."""
    from agent.preview import x_display_problem

    for number in range(first, first + 1000):
        if (not Path(f"/tmp/.X{number}-lock").exists() and not Path(f"/tmp/.X11-unix/X{number}").exists()
                and x_display_problem(f":{number}") and x_display_problem(f"localhost:{number}")):
            return number
    raise AssertionError(f"no free X display number from {first} to {first + 999}")


@pytest.fixture
def xvfb():
    if not shutil.which("Xvfb") or not shutil.which("xdotool"):
        pytest.fail("Xvfb and xdotool are needed for the preview test (apt-get install xvfb xdotool)")
    display = f":{free_display()}"
    proc = subprocess.Popen(["Xvfb", display, "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socket_path = Path(f"/tmp/.X11-unix/X{display[1:]}")
    deadline = time.monotonic() + 10
    while not socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield display
    proc.terminate()
    proc.wait(timeout=10)


def test_preview_window_shows_the_photo_and_quits_on_q(broker, subscriber_factory, agent_process, smiling_photo,
                                                       xvfb):
    sub = subscriber_factory(broker.port, f"{PREFIX}/#")
    env = dict(os.environ, DISPLAY=xvfb)
    env.pop("WAYLAND_DISPLAY", None)
    proc = agent_process("--source", str(smiling_photo), "--show", "--mqtt-port", str(broker.port),
                         "--topic-prefix", PREFIX, env=env)
    window = ""
    deadline = time.monotonic() + 60
    while not window and time.monotonic() < deadline:
        found = subprocess.run(["xdotool", "search", "--name", "^emotion-agent$"], env=env,
                               capture_output=True, text=True)
        window = found.stdout.split()[0] if found.stdout.split() else ""
        time.sleep(0.2)
    assert window, "the preview window never appeared"
    # At the photo's size, which fits the 1024x768 screen (it opened at 400x300, the photo shrunk to fit).
    def geometry() -> str:
        return subprocess.run(["xdotool", "getwindowgeometry", window], env=env, capture_output=True,
                              text=True).stdout

    wait_until(lambda: "Geometry: 512x512" in geometry(), timeout=10)
    # The window stays open on a still image until the user quits.
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)
    subprocess.run(["xdotool", "windowactivate", "--sync", window], env=env, capture_output=True)
    subprocess.run(["xdotool", "key", "--window", window, "q"], env=env, check=True)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert any(e["emotion"] == "happy" for e in events(sub, "emotion_changed"))


def test_real_video_runs_to_completion_with_events_and_summaries(broker, subscriber_factory, shared_data, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("mqtt:\n  summary_interval_s: 2\n")
    sub = subscriber_factory(broker.port, f"{PREFIX}/#")
    done = run_agent(broker.port, shared_data / "videos" / "hamilton_640x360.mp4", config=config)
    assert done.returncode == 0, done.stderr
    appeared, lost = events(sub, "face_appeared"), events(sub, "face_lost")
    assert appeared and {e["face_id"] for e in appeared} == {e["face_id"] for e in lost}
    assert events(sub, "emotion_changed")
    summaries = [json.loads(p) for t, p, _ in sub.all if t == f"{PREFIX}/summary"]
    assert len(summaries) >= 5  # 9.2 s of video, one every 2 s, and a final one
    assert sum(s["window"]["frames"] for s in summaries) == 275


@pytest.mark.parametrize("display, message", [
    (None, "DISPLAY is not set"),
    # Set, but no X server there: Qt would abort. A free number: with an X server on :77, as was
    # taken for granted, the run waited 120 s for a window to be closed.
    (":{free}", "cannot reach DISPLAY=:{free}"),
    ("localhost:{free}", "cannot reach DISPLAY=localhost:{free}"),
    ("garbage", "is not a display name"),
])
def test_show_on_an_unusable_display_is_one_clear_line(broker, smiling_photo, display, message):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    if display:
        free = free_display(77)
        env["DISPLAY"], message = display.format(free=free), message.format(free=free)
    done = run_agent(broker.port, smiling_photo, "--show", env=env)
    assert done.returncode == 6, done.stderr
    assert "needs a display" in done.stderr and message in done.stderr
    assert done.stderr.strip().count("\n") == 0


def _write_xauthority(path: Path, cookie: bytes) -> None:
    """An X authority file with one MIT-MAGIC-COOKIE-1 for any display (family "wild")."""
    def field(value: bytes) -> bytes:
        return len(value).to_bytes(2, "big") + value
    path.write_bytes(b"\xff\xff" + field(b"") + field(b"") + field(b"MIT-MAGIC-COOKIE-1") + field(cookie))


def test_show_with_a_display_that_refuses_the_cookie_is_one_clear_line(broker, smiling_photo, tmp_path):
    # The socket answers, so only opening a window finds out; Qt then aborts the whole process.
    if not shutil.which("Xvfb"):
        pytest.fail("Xvfb is needed for the preview tests (apt-get install xvfb xdotool)")
    server_auth, client_auth = tmp_path / "server.auth", tmp_path / "client.auth"
    _write_xauthority(server_auth, os.urandom(16))
    _write_xauthority(client_auth, os.urandom(16))
    display = f":{free_display(600 + os.getpid() % 300)}"
    xvfb = subprocess.Popen(["Xvfb", display, "-auth", str(server_auth), "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from agent.preview import x_display_problem

        deadline = time.monotonic() + 10
        while x_display_problem(display) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if xvfb.poll() is not None or x_display_problem(display) is not None:
            pytest.fail(f"Xvfb did not start on {display} (another X server there?)")
        env = {k: v for k, v in os.environ.items() if k != "WAYLAND_DISPLAY"}
        env.update(DISPLAY=display, XAUTHORITY=str(client_auth))
        done = run_agent(broker.port, smiling_photo, "--show", env=env)
    finally:
        xvfb.terminate()
        xvfb.wait(timeout=10)
    assert done.returncode == 6, done.stderr
    assert f"--show cannot open a window on DISPLAY={display}:" in done.stderr
    assert done.stderr.strip().count("\n") == 0


def test_the_display_check_accepts_a_live_x_server(xvfb):
    from agent.preview import x_display_problem

    assert x_display_problem(xvfb) is None
    assert "cannot reach" in x_display_problem(f":{free_display(int(xvfb[1:]) + 1)}")


def test_sigterm_ends_the_wait_for_an_absent_broker_after_a_file_run(agent_process, smiling_photo):
    from tests.conftest import free_port, stop_agent

    proc = agent_process("--source", str(smiling_photo), "--mqtt-port", str(free_port()), "--flush-timeout", "600")
    for line in proc.stderr:  # wait until the run is over and only the flush remains
        if "first frame processed" in line:
            break
    time.sleep(1.0)
    code, took, err = stop_agent(proc)
    assert code == 0 and took < 5, err
    assert "not acknowledged" in err
