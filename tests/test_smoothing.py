"""The moving average and the change policy, in seconds: same behaviour at any frame rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.config import SmoothingConfig
from agent.smoothing import ChangePolicy, EmotionSmoother, TimeWeightedAverage, ema_weight
from agent.types import EMOTION_LABELS, UNCERTAIN, EmotionScores

PARAMS = SmoothingConfig(window_s=0.5, change_margin=0.1, dwell_s=0.4, confidence_gate=0.4)


def probs(label: str, p: float = 0.8) -> np.ndarray:
    """`p` on `label`, the rest spread evenly over the other six."""
    out = np.full(len(EMOTION_LABELS), (1 - p) / (len(EMOTION_LABELS) - 1))
    out[EMOTION_LABELS.index(label)] = p
    return out


def times(fps: float, seconds: float) -> list[float]:
    return [i / fps for i in range(int(round(seconds * fps)) + 1)]


def test_two_half_steps_weigh_the_same_as_one_whole_step():
    dt, window = 0.2, 0.5
    assert (1 - ema_weight(dt / 2, window)) ** 2 == pytest.approx(1 - ema_weight(dt, window))


@pytest.mark.parametrize("fps", [5, 10, 30])
def test_average_reaches_the_same_value_after_the_same_time_at_any_frame_rate(fps):
    average = TimeWeightedAverage(window_s=0.5)
    average.update(0.0, np.zeros(7))
    for t in times(fps, 1.0)[1:]:
        value = average.update(t, np.ones(7))
    # A step reaches 1 - e^-2 of its height after two time constants, whatever the frame rate.
    assert value[0] == pytest.approx(1 - math.exp(-2), abs=1e-9)


def test_first_sample_is_taken_as_it_is():
    assert TimeWeightedAverage(0.5).update(3.0, probs("sad")).tolist() == probs("sad").tolist()


def run_policy(sequence, params=PARAMS):
    """Feeds (now, probs) through a smoother; returns [(now, previous, new)] for each change."""
    smoother = EmotionSmoother(params, sequence[0][0])
    changes = []
    for now, p in sequence:
        previous = smoother.update(now, EmotionScores.from_array(p))
        if previous is not None:
            changes.append((now, previous, smoother.state))
    return changes


def test_state_is_uncertain_until_the_first_dwell_has_passed():
    smoother = EmotionSmoother(PARAMS, 0.0)
    for t in times(30, 0.3):
        smoother.update(t, EmotionScores.from_array(probs("happy", 0.9)))
    assert smoother.state == UNCERTAIN
    smoother.update(0.4, EmotionScores.from_array(probs("happy", 0.9)))
    assert smoother.state == "happy"


@pytest.mark.parametrize("fps", [5, 30])
def test_one_frame_spikes_of_other_emotions_change_nothing(fps):
    rng = np.random.default_rng(fps)
    sequence = []
    for i, t in enumerate(times(fps, 20.0)):
        if i > 0 and rng.random() < 0.3:
            sequence.append((t, probs(rng.choice(["sad", "angry"]), 0.9)))  # never two frames in a row below
        else:
            sequence.append((t, probs("neutral", 0.75)))
        if len(sequence) >= 2 and sequence[-2][1].argmax() != 6 and sequence[-1][1].argmax() != 6:
            sequence[-1] = (t, probs("neutral", 0.75))
    assert run_policy(sequence) == [(pytest.approx(0.4, abs=1 / fps + 1e-9), UNCERTAIN, "neutral")]


@pytest.mark.parametrize("fps", [5, 30])
def test_a_held_change_is_emitted_once_within_a_second(fps):
    sequence = [(t, probs("neutral") if t < 3.0 else probs("happy")) for t in times(fps, 6.0)]
    changes = run_policy(sequence)
    assert [(prev, new) for _, prev, new in changes] == [(UNCERTAIN, "neutral"), ("neutral", "happy")]
    assert 3.0 < changes[1][0] <= 4.0


def test_a_lead_smaller_than_the_margin_never_changes_the_state():
    close_call = np.array([0.0, 0.0, 0.0, 0.45, 0.0, 0.0, 0.55])  # neutral ahead of happy by 0.1
    nearly = np.array([0.0, 0.0, 0.0, 0.52, 0.0, 0.0, 0.48])      # then happy ahead by only 0.04
    sequence = [(t, close_call) for t in times(10, 2.0)] + [(2.0 + t, nearly) for t in times(10, 10.0)[1:]]
    assert [new for _, _, new in run_policy(sequence)] == ["neutral"]


def test_flat_scores_are_uncertain():
    flat = np.full(7, 1 / 7)
    smoother = EmotionSmoother(PARAMS, 0.0)
    for t in times(30, 5.0):
        assert smoother.update(t, EmotionScores.from_array(flat)) is None
    assert smoother.state == UNCERTAIN
    assert smoother.confidence == pytest.approx(1 / 7)


def test_fading_confidence_turns_uncertain_after_the_dwell_and_back():
    sequence = ([(t, probs("sad", 0.8)) for t in times(10, 3.0)]
                + [(3.0 + t, probs("sad", 0.25)) for t in times(10, 3.0)[1:]]
                + [(6.0 + t, probs("sad", 0.8)) for t in times(10, 3.0)[1:]])
    changes = run_policy(sequence)
    assert [(prev, new) for _, prev, new in changes] == [(UNCERTAIN, "sad"), ("sad", UNCERTAIN), (UNCERTAIN, "sad")]
    # The average needs ~0.65 s to fall from 0.8 under the 0.4 gate, then the 0.4 s dwell.
    assert 3.9 < changes[1][0] <= 4.5 and 6.0 < changes[2][0] <= 7.0


def test_dwell_restarts_when_the_lead_is_broken():
    policy = ChangePolicy(PARAMS, 0.0)
    policy.update(0.0, probs("happy"))
    policy.update(0.4, probs("happy"))
    assert policy.state == "happy"
    policy.update(0.5, probs("sad"))
    policy.update(0.8, probs("happy"))  # the lead broke at 0.8...
    policy.update(0.9, probs("sad"))    # ...so the dwell starts again here
    assert policy.update(1.2, probs("sad")) is None
    assert policy.update(1.3, probs("sad")) == "happy"
    assert policy.state == "sad" and policy.since == 1.3


def test_confidence_is_the_smoothed_probability_of_the_emitted_emotion():
    smoother = EmotionSmoother(PARAMS, 0.0)
    for t in times(10, 1.0):
        smoother.update(t, EmotionScores.from_array(probs("happy", 0.7)))
    assert smoother.state == "happy"
    assert smoother.confidence == pytest.approx(0.7)


def test_a_label_beaten_by_challengers_taking_turns_turns_uncertain():
    policy = ChangePolicy(PARAMS, 0.0)
    for t in times(10, 1.0):
        policy.update(t, probs("happy"))
    assert policy.state == "happy"
    sad_ahead = np.array([0.0, 0.0, 0.0, 0.05, 0.5, 0.0, 0.45])
    neutral_ahead = sad_ahead[[0, 1, 2, 3, 6, 5, 4]]
    changes = []
    for k, t in enumerate(times(10, 2.0)[1:]):
        previous = policy.update(1.0 + t, sad_ahead if k % 2 else neutral_ahead)
        if previous is not None:
            changes.append((round(1.0 + t, 6), previous, policy.state))
    # Beaten from 1.1 s on, by neither challenger for the 0.4 s dwell: uncertain after twice the dwell.
    assert changes == [(1.9, "happy", UNCERTAIN)]
