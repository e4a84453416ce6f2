"""Topic names, in one place. Pure: a test can check every name without a broker."""

from __future__ import annotations

from dataclasses import dataclass

EVENT_KINDS = ("face_appeared", "emotion_changed", "face_lost")


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

    def event(self, kind: str) -> str:
        """Never retained: face_appeared, emotion_changed, face_lost."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        return f"{self.root}/event/{kind}"

    @property
    def events_filter(self) -> str:
        return f"{self.root}/event/+"
