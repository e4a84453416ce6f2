"""Plain data types shared by every stage. Nothing here does I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class Emotion(enum.IntEnum):
    """The seven FER2013 classes, in the order every model output uses."""

    ANGRY = 0
    DISGUST = 1
    FEAR = 2
    HAPPY = 3
    SAD = 4
    SURPRISE = 5
    NEUTRAL = 6

    @property
    def label(self) -> str:
        return self.name.lower()


EMOTIONS: tuple[Emotion, ...] = tuple(Emotion)
EMOTION_LABELS: tuple[str, ...] = tuple(e.label for e in Emotion)
UNCERTAIN = "uncertain"
# What a face's emitted emotion can be: an emotion, or uncertain (the smoother's confidence gate).
STATES: tuple[str, ...] = EMOTION_LABELS + (UNCERTAIN,)
# The dominant emotion of the state and summary payloads when no face is in view.
NO_FACE = "none"
# The state's dominant emotion, and the stats' camera status, while analysis is switched off.
PAUSED = "paused"

# What a frame source says of itself (`FrameSource.status`): the stats' `camera` field and the
# options of Home Assistant's Camera sensor, which rejects a state that is not among them.
CAMERA_STATUSES: tuple[str, ...] = ("starting", "ok", "reconnecting", "ended", PAUSED)


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box in pixel coordinates of the frame it was found in."""

    x: float
    y: float
    w: float
    h: float

    @property
    def x2(self) -> float:
        return self.x + self.w

    @property
    def y2(self) -> float:
        return self.y + self.h

    @property
    def area(self) -> float:
        return max(0.0, self.w) * max(0.0, self.h)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.w / 2, self.y + self.h / 2)

    def iou(self, other: Box) -> float:
        ix = max(0.0, min(self.x2, other.x2) - max(self.x, other.x))
        iy = max(0.0, min(self.y2, other.y2) - max(self.y, other.y))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def expanded(self, margin: float) -> Box:
        """The box grown by `margin` times its size on every side (0.1 = 10 % each side)."""
        return Box(self.x - self.w * margin, self.y - self.h * margin,
                   self.w * (1 + 2 * margin), self.h * (1 + 2 * margin))

    def as_list(self) -> list[int]:
        return [round(self.x), round(self.y), round(self.w), round(self.h)]


@dataclass(frozen=True, slots=True)
class Detection:
    """A face found in one frame; `roll` is the tilt of its eye line in degrees (clockwise as seen,
    0 for a level face or a detector without eye keypoints)."""

    box: Box
    score: float
    roll: float = 0.0


@dataclass(frozen=True, slots=True)
class EmotionScores:
    """Seven probabilities in `Emotion` order, summing to about 1."""

    probs: tuple[float, ...]

    @classmethod
    def from_array(cls, values: np.ndarray) -> EmotionScores:
        return cls(tuple(float(v) for v in np.asarray(values, dtype=np.float64).ravel()))

    @property
    def top(self) -> Emotion:
        return Emotion(int(np.argmax(self.probs)))

    @property
    def confidence(self) -> float:
        return max(self.probs)

    def as_dict(self) -> dict[str, float]:
        return {label: round(p, 4) for label, p in zip(EMOTION_LABELS, self.probs)}


@dataclass(frozen=True, slots=True)
class FaceObservation:
    """A detected face with its per-frame (raw) emotion scores."""

    detection: Detection
    scores: EmotionScores


@dataclass(frozen=True, slots=True)
class Frame:
    """A captured frame with the time it was taken (seconds, monotonic-like)."""

    image: np.ndarray
    timestamp: float
    index: int
