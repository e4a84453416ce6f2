"""Topic names, in one place. Pure: a test can check every name without a broker."""

from __future__ import annotations

from dataclasses import dataclass

EVENT_KINDS = ("face_appeared", "emotion_changed", "face_lost")
MAX_MQTT_STRING = 65535  # an MQTT string carries a 16-bit length


def publishable(topic: str) -> bool:
    """Whether MQTT allows a PUBLISH to `topic`: not empty, no wildcard, no NUL, within 65535 bytes."""
    try:
        encoded = topic.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return 0 < len(encoded) <= MAX_MQTT_STRING and not any(c in topic for c in "+#\0")


@dataclass(frozen=True, slots=True)
class Topics:
    root: str

    @property
    def availability(self) -> str:
        """Retained 'online'; the broker publishes the retained Last Will 'offline'."""
        return f"{self.root}/availability"

    @property
    def state(self) -> str:
        """Retained: the present (dominant emotion, faces in view)."""
        return f"{self.root}/state"

    @property
    def summary(self) -> str:
        """Periodic statistics over a window; not retained."""
        return f"{self.root}/summary"

    @property
    def stats(self) -> str:
        """Retained: frames/s, latencies, dropped frames, camera and broker status."""
        return f"{self.root}/stats"

    @property
    def analysis(self) -> str:
        """Retained ON or OFF: whether the agent is analysing (the privacy switch's state)."""
        return f"{self.root}/analysis"

    @property
    def analysis_command(self) -> str:
        """ON or OFF from Home Assistant's switch (retained there), or anyone the broker's ACL allows."""
        return f"{self.root}/analysis/set"

    def event(self, kind: str) -> str:
        """Never retained: face_appeared, emotion_changed, face_lost."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        return f"{self.root}/event/{kind}"

    @property
    def events_filter(self) -> str:
        return f"{self.root}/event/+"
