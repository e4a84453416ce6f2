"""What the face-state tracker reports: the state of each face in view, and the events between states.

Plain frozen data; `agent.faces` makes them, payloads and the preview read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.types import Box, EmotionScores


@dataclass(frozen=True, slots=True)
class TrackedFace:
    """The state of one tracked face after a frame."""

    face_id: int              # stable, starts at 1, never reused within a run
    box: Box                  # this frame's box, or the last known one while coasting through a short gap
    raw: EmotionScores        # the classifier's output for the last frame the face was seen in
    smoothed: EmotionScores   # time-weighted moving average of `raw`
    emotion: str              # the emitted label (EMOTION_LABELS) or "uncertain", also before the first dwell
    confidence: float         # smoothed probability of `emotion` (of the top class while "uncertain")
    first_seen: float
    last_seen: float


@dataclass(frozen=True, slots=True)
class FaceAppeared:
    face: TrackedFace
    at: float


@dataclass(frozen=True, slots=True)
class EmotionChanged:
    face: TrackedFace          # after the change: face.emotion is the new state
    previous: str | None       # None the first time the face's emotion becomes known
    previous_duration_s: float  # how long the previous state was emitted (from first_seen when previous is None)
    at: float


@dataclass(frozen=True, slots=True)
class FaceLost:
    face_id: int
    at: float
    seconds_in_view: float     # last_seen - first_seen
    last_emotion: str
    # Fraction of the in-view time spent in each emitted state (the 7 labels and "uncertain"); sums to 1.
    emotion_share: dict[str, float] = field(hash=False)


Event = FaceAppeared | EmotionChanged | FaceLost
