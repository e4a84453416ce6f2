"""systemd's sd_notify protocol, without a dependency: one datagram per state change.

Contract with the daemon (deploy/emotion-agent.service is Type=notify with WatchdogSec=):
- `ready()` once the agent has started (config and models loaded, MQTT under way), before the
  first frame: a camera not plugged in yet is the usual first install, and must not hold
  `systemctl start` up to TimeoutStartSec and fail it. `status()` says where the camera is.
- `watchdog()` only after a frame really was processed, never from a timer or another thread:
  a hung camera or a stuck interpreter stops the pings and systemd restarts the service (as it
  does a minute after READY=1 with no camera: the restart also gives the service a camera driver
  loaded since). The one exception is the loop's own `camera.max_fps` rest after a frame, which
  pings as it waits: a rest longer than WatchdogSec is the agent's choice, not a hang.
- `stopping()` only when the process is about to exit: systemd takes STOPPING=1 as the start of
  the shutdown and kills the process TimeoutStopSec later if it is still there.
- On a reload (SIGHUP): `reloading()` first, then `ready()` again once the new configuration has
  started. Between the two, `stopping()` sends nothing: the old pipeline winding down
  is not the process stopping.
- `status(text)`: a line for `systemctl status`; sent only when it changes.

Everything is a no-op when NOTIFY_SOCKET is unset (not under systemd, tests). A failure to send
is logged once and never raised: the frame loop must not die for want of a notification.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written '@name' and addressed with a leading NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._interval = watchdog_interval(env)
        self._last_ping: float | None = None
        self._status: str | None = None
        self._reloading = False
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def _send(self, message: str) -> None:
        if not self._address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never block the frame loop on a slow reader: an undelivered ping is only a ping.
                sock.setblocking(False)
                sock.connect(self._address)
                sock.sendall(message.encode())
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in a path name
            if not self._warned:  # once: a broken notify socket must not flood the journal
                logger.warning("cannot notify systemd (%s): %s", message.split("=")[0], exc)
                self._warned = True

    def ready(self) -> None:
        self._reloading = False
        self._status = "started"
        self._send(f"READY=1\nSTATUS={self._status}")

    def status(self, text: str) -> None:
        # One line: a newline would start another assignment in the datagram.
        text = " ".join(text.splitlines())
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")

    def stopping(self) -> None:
        if not self._reloading:
            self._send("STOPPING=1")

    def reloading(self) -> None:
        # systemd (Type=notify-reload, v253+) wants the monotonic time of the request with RELOADING=1.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._reloading = True
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def watchdog(self) -> None:
        """Ping at most twice per watchdog interval (systemd's advice); no-op without a watchdog."""
        if not self._address or self._interval is None:
            return
        now = time.monotonic()
        if self._last_ping is None or now - self._last_ping >= self._interval / 2:
            self._last_ping = now
            self._send("WATCHDOG=1")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds from WATCHDOG_USEC, if the watchdog is meant for this process (WATCHDOG_PID)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None
