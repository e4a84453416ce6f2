"""The privacy switch: whether the agent analyses, from the config and from MQTT commands.

Thread-safe and without I/O: paho's thread hands it commands, a reload its config, the frame loop
asks it whether to run. The last command received wins over the config's `camera.enabled` for as
long as the agent runs; with no command (none retained, or no broker), the config decides.
"""

from __future__ import annotations

import logging
import threading

from agent.signal_event import SignalSafeEvent

logger = logging.getLogger(__name__)

ANALYSIS_ON = "ON"
ANALYSIS_OFF = "OFF"


def parse_command(payload: bytes) -> bool | None:
    """True for ON, False for OFF (any case, blanks around ignored), None for anything else."""
    try:
        word = payload.decode("utf-8").strip().upper()
    except UnicodeDecodeError:
        return None
    return {ANALYSIS_ON: True, ANALYSIS_OFF: False}.get(word)


def state_word(enabled: bool) -> str:
    return ANALYSIS_ON if enabled else ANALYSIS_OFF


class AnalysisSwitch:
    def __init__(self, enabled: bool) -> None:
        self._configured = enabled
        self._commanded: bool | None = None
        # Also set by `wake`, from a signal handler: a plain Event's lock could deadlock there.
        self._changed = SignalSafeEvent()
        self._lock = threading.Lock()
        self._refused: set[bytes] = set()

    @property
    def enabled(self) -> bool:
        with self._lock:
            return self._decided()

    def _decided(self) -> bool:
        """The last command, or the config without one (the caller holds the lock)."""
        return self._configured if self._commanded is None else self._commanded

    @property
    def commanded(self) -> bool:
        """Whether a command has been received, and so decides rather than the config."""
        with self._lock:
            return self._commanded is not None

    def configure(self, enabled: bool) -> None:
        """The config's setting, at start and on every reload."""
        with self._lock:
            self._configured = enabled
        self._changed.set()

    def command(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """An MQTT command (a publisher's subscription callback). Anything but ON or OFF is one
        warning per distinct payload; an empty one (a retained command cleared) changes nothing."""
        if not payload:
            return
        enabled = parse_command(payload)
        if enabled is None:
            with self._lock:
                new = payload not in self._refused
                self._refused.add(payload)
            if new:
                logger.warning("%s: ignored %r: expected ON or OFF", topic, payload[:64].decode("utf-8", "replace"))
            return
        with self._lock:
            was = self._decided()
            self._commanded = enabled
        if enabled != was:
            logger.info("analysis switched %s by %s%s", state_word(enabled), topic,
                        " (its retained command)" if retained else "")
        self._changed.set()

    def wake(self) -> None:
        """Ends a `wait_changed` at once (the agent is stopping)."""
        self._changed.set()

    def wait_changed(self, timeout: float) -> bool:
        """Waits up to `timeout` s for a command, a reload or a `wake`; True (and re-armed) if one
        came. The caller reads `enabled` again."""
        if self._changed.wait(timeout):
            self._changed.clear()
            return True
        return False
