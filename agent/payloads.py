"""JSON payloads for every topic, built by pure functions. docs/mqtt.md documents each one.

Every payload carries `schema` (bumped on any incompatible change) and an ISO 8601 UTC
`timestamp` of the wall clock at which it was made.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from agent.events import EmotionChanged, Event, FaceAppeared, FaceLost, TrackedFace
from agent.types import NO_FACE, PAUSED, STATES, UNCERTAIN

SCHEMA_VERSION = 1


def iso_time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


def _face(face: TrackedFace) -> dict[str, Any]:
    return {
        "face_id": face.face_id,
        "emotion": face.emotion,
        "confidence": round(face.confidence, 4),
        "scores": face.smoothed.as_dict(),
        "box": face.box.as_list(),
    }


def event_kind(event: Event) -> str:
    if isinstance(event, FaceAppeared):
        return "face_appeared"
    if isinstance(event, EmotionChanged):
        return "emotion_changed"
    if isinstance(event, FaceLost):
        return "face_lost"
    raise TypeError(f"not an event: {event!r}")


def event_payload(event: Event, wall_time: float) -> dict[str, Any]:
    base: dict[str, Any] = {"schema": SCHEMA_VERSION, "event": event_kind(event), "timestamp": iso_time(wall_time)}
    if isinstance(event, FaceAppeared):
        base.update(_face(event.face))
    elif isinstance(event, EmotionChanged):
        base.update(_face(event.face))
        base["previous"] = event.previous
        base["previous_duration_s"] = round(event.previous_duration_s, 2)
    elif isinstance(event, FaceLost):
        base.update({
            "face_id": event.face_id,
            "last_emotion": event.last_emotion,
            "seconds_in_view": round(event.seconds_in_view, 2),
            "emotion_share": {k: round(v, 4) for k, v in event.emotion_share.items()},
        })
    return base


def dominant_emotion(faces: Sequence[TrackedFace]) -> str:
    """The emotion most faces in view show ('none' with no face; 'uncertain' if none is known).
    Ties go to the emotion with the higher summed confidence."""
    known = [f for f in faces if f.emotion != UNCERTAIN]
    if not faces:
        return NO_FACE
    if not known:
        return UNCERTAIN
    counts = Counter(f.emotion for f in known)
    weight = Counter()
    for f in known:
        weight[f.emotion] += f.confidence
    return max(counts, key=lambda e: (counts[e], weight[e]))


def state_payload(faces: Sequence[TrackedFace], wall_time: float) -> dict[str, Any]:
    counts = Counter(f.emotion for f in faces)
    return {
        "schema": SCHEMA_VERSION,
        "timestamp": iso_time(wall_time),
        "dominant_emotion": dominant_emotion(faces),
        "faces_in_view": len(faces),
        "counts": {state: counts.get(state, 0) for state in STATES},
        "faces": [_face(f) for f in sorted(faces, key=lambda f: f.face_id)],
    }


def paused_state_payload(wall_time: float) -> dict[str, Any]:
    """The state while analysis is switched off: no face, and `paused` for the dominant emotion."""
    return {**state_payload([], wall_time), "dominant_emotion": PAUSED}


def state_key(faces: Sequence[TrackedFace]) -> tuple:
    """What a state message reports, minus the noise: republish only when this changes."""
    return tuple(sorted((f.face_id, f.emotion) for f in faces))


@dataclass
class SummaryWindow:
    """Accumulates what happened between two summaries. Pure: fed with (now, faces)."""

    started: float
    frames: int = 0
    face_seconds: dict[str, float] = field(default_factory=dict)
    max_faces: int = 0
    face_frame_sum: int = 0
    events: Counter = field(default_factory=Counter)
    seen_ids: set = field(default_factory=set)
    _last: float | None = None

    def add_frame(self, now: float, faces: Sequence[TrackedFace], events: Sequence[Event] = ()) -> None:
        # The time since the previous frame (or the window's start) is credited to these faces, but
        # never from before a face was first seen: a face new after a camera outage was not there
        # for the outage.
        dt_s = max(0.0, now - (self.started if self._last is None else self._last))
        self._last = now
        self.frames += 1
        self.max_faces = max(self.max_faces, len(faces))
        self.face_frame_sum += len(faces)
        for f in faces:
            self.seen_ids.add(f.face_id)
            credit = min(dt_s, max(0.0, now - f.first_seen))
            self.face_seconds[f.emotion] = self.face_seconds.get(f.emotion, 0.0) + credit
        self.add_events(events)

    def add_events(self, events: Sequence[Event]) -> None:
        for e in events:
            self.events[event_kind(e)] += 1

    def _dominant(self, now_dominant: str) -> str:
        """The emotion with the most face-time, `uncertain` not counted. A tie (two faces of a still
        image, each in view as long) goes to the one `state` names now, else to the first in the
        fixed order: not to whichever came first, so a summary never contradicts the state for no
        reason."""
        known = {s: v for s, v in self.face_seconds.items() if s != UNCERTAIN and v > 0}
        if not known:
            return NO_FACE
        most = max(known.values())
        tied = [s for s in STATES if known.get(s) == most]
        return now_dominant if now_dominant in tied else tied[0]

    def payload(self, now: float, faces: Sequence[TrackedFace], wall_time: float) -> dict[str, Any]:
        total = sum(self.face_seconds.values())
        share = {s: round(self.face_seconds.get(s, 0.0) / total, 4) if total else 0.0 for s in STATES}
        counts = Counter(f.emotion for f in faces)
        now_dominant = dominant_emotion(faces)
        return {
            "schema": SCHEMA_VERSION,
            "timestamp": iso_time(wall_time),
            "window_s": round(max(0.0, now - self.started), 2),
            "faces_in_view": len(faces),
            "dominant_emotion": now_dominant,
            "counts": {s: counts.get(s, 0) for s in STATES},
            "window": {
                "frames": self.frames,
                "distinct_faces": len(self.seen_ids),
                "max_faces": self.max_faces,
                "mean_faces": round(self.face_frame_sum / self.frames, 3) if self.frames else 0.0,
                "dominant_emotion": self._dominant(now_dominant),
                "emotion_share": share,
                "events": {k: self.events.get(k, 0) for k in ("face_appeared", "emotion_changed", "face_lost")},
            },
        }
