import os
import socket
import time

import pytest

from agent.notify import SystemdNotifier, watchdog_interval
from tests.conftest import wait_until


def test_ready_status_and_watchdog_reach_the_socket(notify_socket):
    path, sock = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
    notifier.ready()
    assert sock.recv(1024) == b"READY=1\nSTATUS=started"
    notifier.watchdog()
    assert sock.recv(1024) == b"WATCHDOG=1"
    notifier.watchdog()  # within half the interval: no second ping
    notifier.status("camera reconnecting")
    assert sock.recv(1024) == b"STATUS=camera reconnecting"


def test_abstract_socket_names_start_with_at(tmp_path):
    name = f"emotion-agent-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert sock.recv(1024) == b"STOPPING=1"
    finally:
        sock.close()


def test_outside_systemd_nothing_happens():
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    notifier.ready()
    notifier.watchdog()
    notifier.status("x")
    notifier.stopping()


def test_a_dead_socket_is_logged_once_not_raised(tmp_path, caplog):
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    notifier.ready()
    notifier.status("x")
    assert sum("cannot notify systemd" in r.message for r in caplog.records) == 1


def test_a_nul_byte_in_the_socket_path_is_logged_not_raised(caplog):
    SystemdNotifier({"NOTIFY_SOCKET": "/run/a\0b"}).ready()
    assert any("cannot notify systemd" in r.message for r in caplog.records)


def test_the_first_watchdog_ping_goes_out_at_once(notify_socket):
    path, sock = notify_socket
    SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3600000000"}).watchdog()  # an hour
    assert sock.recv(1024) == b"WATCHDOG=1"


def test_no_watchdog_pings_without_watchdog_usec(notify_socket):
    path, sock = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    notifier.watchdog()
    notifier.stopping()  # the next datagram is this one: no ping was sent before it
    assert sock.recv(1024) == b"STOPPING=1"


def test_status_is_one_line_and_sent_only_when_it_changes(notify_socket):
    path, sock = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    notifier.status("camera reconnecting")
    notifier.status("camera reconnecting")
    notifier.status("camera\nlost\nREADY=1")
    assert sock.recv(1024) == b"STATUS=camera reconnecting"
    assert sock.recv(1024) == b"STATUS=camera lost READY=1"
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(1024)


def test_reloading_carries_the_monotonic_time(notify_socket):
    path, sock = notify_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    SystemdNotifier({"NOTIFY_SOCKET": path}).reloading()
    reloading, stamp = sock.recv(1024).decode().split("\n")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert reloading == "RELOADING=1"
    assert stamp.startswith("MONOTONIC_USEC=") and before <= int(stamp.split("=")[1]) <= after


def test_during_a_reload_stopping_is_not_sent_until_ready(notify_socket):
    # systemd takes STOPPING=1 as the start of a shutdown and kills the process TimeoutStopSec later.
    path, sock = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    notifier.reloading()
    notifier.stopping()  # the old pipeline winding down
    notifier.ready()
    notifier.stopping()  # a real stop
    assert sock.recv(1024).startswith(b"RELOADING=1\n")
    assert sock.recv(1024) == b"READY=1\nSTATUS=started"
    assert sock.recv(1024) == b"STOPPING=1"


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "abc"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
])
def test_watchdog_interval_is_read_only_for_this_process(env, expected):
    assert watchdog_interval(env) == expected


def _notifications(sock) -> list[str]:
    """What the agent sends to `sock`, read all the while by a thread, as systemd does."""
    import threading

    got: list[str] = []

    def read() -> None:
        try:
            while True:
                got.append(sock.recv(1024).decode())
        except OSError:
            pass

    threading.Thread(target=read, daemon=True).start()
    return got


def test_the_agent_reports_ready_once_started_and_pings_the_watchdog_for_frames(notify_socket, broker, tmp_path):
    import subprocess
    import sys

    from tests.test_end_to_end import still_video

    path, sock = notify_socket
    got = _notifications(sock)
    video = still_video(tmp_path / "clip.avi", seconds=2)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    done = subprocess.run([sys.executable, "-m", "agent", "run", "--source", str(video), "--realtime",
                           "--mqtt-port", str(broker.port)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: got and got[-1] == "STOPPING=1", timeout=3)
    assert got[0] == "READY=1\nSTATUS=started"
    assert got.count("WATCHDOG=1") >= 10  # 2 s of frames, a ping every 0.1 s


def test_the_agent_reports_ready_with_no_camera_plugged_in(notify_socket, broker, agent_process):
    # READY=1 waited for the first frame: on a first install with the camera not there yet,
    # `systemctl restart` in deploy/install.sh hung for TimeoutStartSec (120 s) and failed.
    from tests.conftest import stop_agent

    path, sock = notify_socket
    got = _notifications(sock)
    proc = agent_process("--source", "/dev/video99", "--mqtt-port", str(broker.port),
                         env=dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="60000000"))
    try:
        wait_until(lambda: "STATUS=camera starting" in got or "STATUS=camera reconnecting" in got, timeout=60)
        assert got[0] == "READY=1\nSTATUS=started"
        assert "WATCHDOG=1" not in got  # no frame, no ping: a camera absent for a minute restarts the service
    finally:
        code, _, err = stop_agent(proc)
    assert code == 0, err
