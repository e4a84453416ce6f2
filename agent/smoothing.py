"""Per-face emotion smoothing and the policy that decides when the emitted emotion changes.

Everything is in seconds, never in frames: the moving average weighs each new sample by the time
since the previous one, and a change must hold for a dwell time, so a face behaves the same at 5
and at 30 frames/s. Pure: every call takes `now`. The settings are the config's `smoothing`
section (SmoothingConfig, where the defaults and the figures they were chosen by are).
"""

from __future__ import annotations

import math

import numpy as np

from agent.config import SmoothingConfig
from agent.types import EMOTION_LABELS, UNCERTAIN, EmotionScores

# Slack for comparing times built from sums of frame intervals (0.1 + 0.2 != 0.3).
_EPS = 1e-9


def ema_weight(dt: float, window_s: float) -> float:
    """Weight of a sample that arrives `dt` seconds after the previous one: 1 - exp(-dt / window_s)."""
    return 1.0 - math.exp(-max(0.0, dt) / window_s)


class TimeWeightedAverage:
    """An exponential moving average whose step depends on the elapsed time, not the frame count."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.value: np.ndarray | None = None
        self._last: float | None = None

    def update(self, now: float, sample: np.ndarray) -> np.ndarray:
        sample = np.asarray(sample, dtype=np.float64)
        if self.value is None or self._last is None:
            self.value = sample.copy()
        else:
            self.value = self.value + ema_weight(now - self._last, self.window_s) * (sample - self.value)
        self._last = now
        return self.value


class ChangePolicy:
    """The emitted state of one face: a label or "uncertain", changing only after a held, clear lead.

    A label L replaces the emitted state when L is the smoothed leader, at least `confidence_gate`,
    and (unless the state is "uncertain") leads the emitted label by `change_margin`. "uncertain"
    replaces a label when the smoothed top probability falls below the gate. Either way the
    condition must hold without a break for `dwell_s`.

    One more way to "uncertain": when the emitted label has been beaten without a break for
    twice the dwell, but by challengers taking turns so that none held for the dwell, the face
    shows no one emotion, and keeping a label whose probability has collapsed would be wrong.
    """

    def __init__(self, params: SmoothingConfig, now: float):
        self.params = params
        self.state = UNCERTAIN
        self.since = now
        self._pending: str | None = None
        self._pending_since = now
        self._beaten_since: float | None = None

    def wanted(self, probs: np.ndarray) -> str | None:
        """The state these smoothed probabilities argue for, or None to keep the emitted one."""
        top = int(np.argmax(probs))
        p_top = float(probs[top])
        if p_top < self.params.confidence_gate:
            return UNCERTAIN if self.state != UNCERTAIN else None
        label = EMOTION_LABELS[top]
        if label == self.state:
            return None
        if self.state == UNCERTAIN:
            return label
        current = float(probs[EMOTION_LABELS.index(self.state)])
        return label if p_top - current >= self.params.change_margin - _EPS else None

    def update(self, now: float, probs: np.ndarray) -> str | None:
        """Feeds one frame; returns the previous state if the emitted state changed, else None."""
        wanted = self.wanted(probs)
        if wanted != self._pending:
            self._pending, self._pending_since = wanted, now
        if wanted is None:
            self._beaten_since = None
            return None
        if self._beaten_since is None:
            self._beaten_since = now
        dwell = self.params.dwell_s - _EPS
        if now - self._pending_since >= dwell:
            return self._switch(wanted, now)
        if self.state != UNCERTAIN and now - self._beaten_since >= 2 * dwell:
            # The challenger of the moment keeps its time: if it goes on leading, it is emitted
            # as soon as it has led for the dwell, not a dwell after this.
            pending, since = self._pending, self._pending_since
            previous = self._switch(UNCERTAIN, now)
            self._pending, self._pending_since = pending, since
            return previous
        return None

    def _switch(self, state: str, now: float) -> str:
        previous, self.state, self.since = self.state, state, now
        self._pending, self._beaten_since = None, None
        return previous


class EmotionSmoother:
    """One face's smoothed scores and emitted state."""

    def __init__(self, params: SmoothingConfig, now: float):
        self.average = TimeWeightedAverage(params.window_s)
        self.policy = ChangePolicy(params, now)

    @property
    def state(self) -> str:
        return self.policy.state

    @property
    def since(self) -> float:
        return self.policy.since

    @property
    def smoothed(self) -> EmotionScores:
        if self.average.value is None:
            raise RuntimeError("no scores yet")
        return EmotionScores.from_array(self.average.value)

    @property
    def confidence(self) -> float:
        """Smoothed probability of the emitted emotion (of the top class while "uncertain")."""
        probs = self.smoothed.probs
        if self.state == UNCERTAIN:
            return max(probs)
        return probs[EMOTION_LABELS.index(self.state)]

    def update(self, now: float, scores: EmotionScores) -> str | None:
        """Feeds one frame's raw scores; returns the previous state if the emitted state changed."""
        probs = self.average.update(now, np.asarray(scores.probs))
        return self.policy.update(now, probs)
