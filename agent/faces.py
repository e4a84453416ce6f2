"""Per-face state over time: ids from the box tracker, emotions from the smoother, and the events.

Pure: fed with (now, observations) per frame; no clock, no I/O. The same sequence gives the same
events at any frame rate, because tracking gaps, smoothing and dwell are all in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from agent.config import SmoothingConfig, TrackingConfig
from agent.events import EmotionChanged, Event, FaceAppeared, FaceLost, TrackedFace
from agent.smoothing import EmotionSmoother
from agent.tracking import BoxTracker
from agent.types import STATES, UNCERTAIN, Box, EmotionScores, FaceObservation


@dataclass(slots=True)
class _Face:
    face_id: int
    first_seen: float
    last_seen: float
    box: Box
    raw: EmotionScores
    smoother: EmotionSmoother
    state_since: float = 0.0   # when the emitted state began
    known: bool = False        # whether the emotion has ever been known (not "uncertain")
    time_in_state: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATES, 0.0))

    def snapshot(self) -> TrackedFace:
        return TrackedFace(face_id=self.face_id, box=self.box, raw=self.raw, smoothed=self.smoother.smoothed,
                           emotion=self.smoother.state, confidence=self.smoother.confidence,
                           first_seen=self.first_seen, last_seen=self.last_seen)

    def lost(self, now: float) -> FaceLost:
        in_view = self.last_seen - self.first_seen
        total = sum(self.time_in_state.values())
        if total > 0:
            share = {s: t / total for s, t in self.time_in_state.items()}
        else:  # seen in one frame only: all of no time was spent in the state it had
            share = {s: float(s == self.smoother.state) for s in STATES}
        return FaceLost(face_id=self.face_id, at=now, seconds_in_view=in_view, last_emotion=self.smoother.state,
                        emotion_share=share)


class FaceStateTracker:
    """Tracks faces, smooths each one's emotion, and reports what changed."""

    def __init__(self, tracking: TrackingConfig = TrackingConfig(), smoothing: SmoothingConfig = SmoothingConfig(),
                 *, first_id: int = 1):
        """`tracking` and `smoothing`: the config's sections (their defaults when not given);
        `first_id`: the id of the first new face (a reloaded pipeline goes on from the last one's next_id)."""
        self.params = smoothing
        self._tracker = BoxTracker(tracking, first_id=first_id)
        self._faces: dict[int, _Face] = {}

    def update(self, now: float, observations: Sequence[FaceObservation]) -> tuple[list[TrackedFace], list[Event]]:
        """Faces currently in view (including ones coasting within max_gap_s) and the events this frame caused,
        in order: losses of faces unseen for more than max_gap_s, then per observation its appearance
        and its emotion change."""
        step = self._tracker.update(now, [o.detection.box for o in observations])
        events: list[Event] = [self._faces.pop(face_id).lost(now) for face_id in step.lost]
        new = set(step.new)
        for face_id, obs in zip(step.ids, observations):
            if face_id in new:
                face = _Face(face_id, now, now, obs.detection.box, obs.scores, EmotionSmoother(self.params, now),
                             state_since=now)
                self._faces[face_id] = face
                changed_from = face.smoother.update(now, obs.scores)
                events.append(FaceAppeared(face.snapshot(), at=now))
            else:
                face = self._faces[face_id]
                # The time since the last sighting (a short gap included) was spent in the state emitted then.
                face.time_in_state[face.smoother.state] += now - face.last_seen
                face.last_seen, face.box, face.raw = now, obs.detection.box, obs.scores
                changed_from = face.smoother.update(now, obs.scores)
            if changed_from is not None:
                events.append(self._changed(face, changed_from, now))
        return self.faces(), events

    def expire(self, now: float, unseen_s: float | None = None) -> list[Event]:
        """FaceLost for every face unseen for longer than `unseen_s` (max_gap_s) at `now`, when no
        frame comes (a camera outage): without it they would stay in view until the next frame."""
        return [self._faces.pop(face_id).lost(now) for face_id in self._tracker.expire(now, unseen_s)]

    def close(self, now: float) -> list[Event]:
        """FaceLost for every open track (used at shutdown)."""
        self._tracker.close()
        events: list[Event] = [face.lost(now) for face in self._faces.values()]
        self._faces.clear()
        return events

    @property
    def next_id(self) -> int:
        """The id the next new face gets."""
        return self._tracker.next_id

    def faces(self) -> list[TrackedFace]:
        return [self._faces[i].snapshot() for i in sorted(self._faces)]

    @staticmethod
    def _changed(face: _Face, previous: str, now: float) -> EmotionChanged:
        event = EmotionChanged(face.snapshot(), previous=previous if face.known else None,
                               previous_duration_s=now - face.state_since, at=now)
        face.state_since = now
        face.known = face.known or face.smoother.state != UNCERTAIN
        return event
