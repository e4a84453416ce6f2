"""The JSON payloads, built from synthetic faces and events: fields, order, rounding, time stamps."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re

import pytest

from agent import payloads
from agent.events import EmotionChanged, FaceAppeared, FaceLost, TrackedFace
from agent.types import EMOTION_LABELS, UNCERTAIN, Box, EmotionScores

import mqtt_doc_examples

WALL = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def scores(**probs: float) -> EmotionScores:
    """Seven probabilities; the ones not named share what is left."""
    rest = (1 - sum(probs.values())) / (len(EMOTION_LABELS) - len(probs))
    return EmotionScores(tuple(probs.get(label, rest) for label in EMOTION_LABELS))


def face(face_id: int, emotion: str, confidence: float = 0.7) -> TrackedFace:
    s = scores(**{emotion if emotion != UNCERTAIN else "neutral": confidence})
    return TrackedFace(face_id=face_id, box=Box(10.4, 20.6, 64.2, 63.5), raw=s, smoothed=s, emotion=emotion,
                       confidence=confidence, first_seen=1.0, last_seen=2.0)


def share(**parts: float) -> dict[str, float]:
    return {state: parts.get(state, 0.0) for state in payloads.STATES}


EVENTS = {
    "face_appeared": FaceAppeared(face(3, UNCERTAIN, 0.31), at=1.0),
    "emotion_changed": EmotionChanged(face(3, "happy", 0.83456), previous="neutral", previous_duration_s=2.3456,
                                      at=3.0),
    "face_lost": FaceLost(face_id=3, at=9.0, seconds_in_view=7.891, last_emotion="happy",
                          emotion_share=share(uncertain=0.1, neutral=0.3, happy=0.6)),
}


# --- events -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(EVENTS))
def test_every_event_payload_names_its_schema_kind_face_and_utc_time(kind):
    payload = payloads.event_payload(EVENTS[kind], WALL)
    assert payload["schema"] == payloads.SCHEMA_VERSION
    assert payload["event"] == kind == payloads.event_kind(EVENTS[kind])
    assert payload["face_id"] == 3
    assert ISO_UTC.fullmatch(payload["timestamp"])
    parsed = dt.datetime.fromisoformat(payload["timestamp"].replace("Z", "+00:00"))
    assert parsed.timestamp() == pytest.approx(WALL, abs=1e-3)


@pytest.mark.parametrize("kind", ["face_appeared", "emotion_changed"])
def test_face_events_carry_the_seven_scores_in_model_order(kind):
    event = EVENTS[kind]
    payload = payloads.event_payload(event, WALL)
    assert list(payload["scores"]) == list(EMOTION_LABELS)
    assert list(payload["scores"].values()) == [round(p, 4) for p in event.face.smoothed.probs]
    assert payload["emotion"] == event.face.emotion
    assert payload["confidence"] == round(event.face.confidence, 4)
    assert payload["box"] == [10, 21, 64, 64]


def test_emotion_changed_tells_the_previous_state_and_how_long_it_lasted():
    payload = payloads.event_payload(EVENTS["emotion_changed"], WALL)
    assert (payload["emotion"], payload["previous"], payload["previous_duration_s"]) == ("happy", "neutral", 2.35)


def test_the_first_known_emotion_has_no_previous_state():
    first = EmotionChanged(face(3, "sad"), previous=None, previous_duration_s=0.5, at=1.5)
    payload = payloads.event_payload(first, WALL)
    assert payload["previous"] is None
    assert json.loads(payloads.encode(payload))["previous"] is None


def test_face_lost_reports_the_time_in_view_and_a_share_per_state_summing_to_one():
    payload = payloads.event_payload(EVENTS["face_lost"], WALL)
    assert (payload["last_emotion"], payload["seconds_in_view"]) == ("happy", 7.89)
    assert list(payload["emotion_share"]) == list(payloads.STATES)
    assert sum(payload["emotion_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert "scores" not in payload and "emotion" not in payload


def test_something_that_is_not_an_event_is_refused():
    with pytest.raises(TypeError, match="not an event"):
        payloads.event_kind(face(1, "happy"))


@pytest.mark.parametrize("epoch,iso", [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (WALL, "2023-11-14T22:13:20.250Z"),
    (1_700_000_000.0004, "2023-11-14T22:13:20.000Z"),
])
def test_time_stamps_are_utc_with_milliseconds_and_a_z(epoch, iso):
    assert payloads.iso_time(epoch) == iso


# --- state --------------------------------------------------------------------------------------

def test_the_state_counts_every_state_and_lists_faces_by_id():
    faces = [face(5, "sad"), face(2, "happy"), face(9, "happy"), face(4, UNCERTAIN, 0.3)]
    payload = payloads.state_payload(faces, WALL)
    assert payload["schema"] == payloads.SCHEMA_VERSION and ISO_UTC.fullmatch(payload["timestamp"])
    assert payload["faces_in_view"] == 4
    assert payload["counts"] == share(happy=2, sad=1, uncertain=1)
    assert list(payload["counts"]) == list(payloads.STATES)
    assert [f["face_id"] for f in payload["faces"]] == [2, 4, 5, 9]
    assert payload["dominant_emotion"] == "happy"


def test_an_empty_view_reports_no_face_and_zero_counts():
    payload = payloads.state_payload([], WALL)
    assert (payload["dominant_emotion"], payload["faces_in_view"], payload["faces"]) == ("none", 0, [])
    assert set(payload["counts"].values()) == {0}


@pytest.mark.parametrize("faces,dominant", [
    ([], payloads.NO_FACE),
    ([face(1, UNCERTAIN, 0.3), face(2, UNCERTAIN, 0.2)], UNCERTAIN),
    ([face(1, UNCERTAIN, 0.3), face(2, UNCERTAIN, 0.2), face(3, "fear", 0.5)], "fear"),  # uncertain never wins
    ([face(1, "sad", 0.9), face(2, "happy", 0.6), face(3, "happy", 0.6)], "happy"),      # more faces win
    ([face(1, "sad", 0.9), face(2, "happy", 0.6)], "sad"),                               # tie: more confidence
    ([face(1, "sad", 0.5), face(2, "happy", 0.6)], "happy"),
    ([face(1, "sad", 0.4), face(2, "sad", 0.4), face(3, "angry", 0.9), face(4, "angry", 0.7)], "angry"),
])
def test_the_dominant_emotion_is_the_most_shown_with_ties_to_the_more_confident(faces, dominant):
    assert payloads.dominant_emotion(faces) == dominant


def test_the_state_key_changes_with_ids_and_emotions_only():
    before = [face(1, "happy", 0.7), face(2, "sad", 0.6)]
    jitter = [face(2, "sad", 0.65), face(1, "happy", 0.9)]
    assert payloads.state_key(before) == payloads.state_key(jitter)
    assert payloads.state_key(before) != payloads.state_key([face(1, "happy"), face(2, "neutral")])
    assert payloads.state_key(before) != payloads.state_key([face(1, "happy")])


# --- summary ------------------------------------------------------------------------------------

def test_a_summary_shares_the_time_between_states_and_sums_to_one():
    window = payloads.SummaryWindow(started=10.0)
    timeline = [(10.0, [face(1, "happy")]), (11.0, [face(1, "happy")]), (12.0, [face(1, "sad")]),
                (13.0, [face(1, "sad"), face(2, UNCERTAIN, 0.3)]), (14.0, [face(1, "sad")]), (15.0, [])]
    for now, faces in timeline:
        window.add_frame(now, faces)
    payload = payloads.SummaryWindow.payload(window, 15.0, [], WALL)
    w = payload["window"]
    # happy 10->11; sad 11->12, 12->13, 13->14; uncertain 12->13: 1 + 3 + 1 face-seconds.
    assert w["emotion_share"] == share(happy=0.2, sad=0.6, uncertain=0.2)
    assert sum(w["emotion_share"].values()) == pytest.approx(1.0)
    assert w["dominant_emotion"] == "sad"
    assert (w["frames"], w["distinct_faces"], w["max_faces"], w["mean_faces"]) == (6, 2, 2, 1.0)
    assert (payload["window_s"], payload["faces_in_view"], payload["dominant_emotion"]) == (5.0, 0, "none")


def test_a_face_is_credited_no_time_from_before_it_was_first_seen():
    # After a camera outage the first frame comes 30 s after the last: the face in it is new and
    # was not in view (happy or otherwise) for those 30 s.
    window = payloads.SummaryWindow(started=0.0)
    window.add_frame(0.0, [])
    new_face = dataclasses.replace(face(7, "happy"), first_seen=30.0, last_seen=30.0)
    window.add_frame(30.0, [new_face])
    window.add_frame(31.0, [dataclasses.replace(new_face, emotion="sad", last_seen=31.0)])
    assert window.face_seconds == {"happy": 0.0, "sad": 1.0}
    assert window.payload(31.0, [], WALL)["window"]["emotion_share"] == share(sad=1.0)


def test_the_dominant_emotion_of_a_window_ignores_uncertain_time():
    window = payloads.SummaryWindow(started=0.0)
    for i in range(10):
        window.add_frame(float(i), [face(1, UNCERTAIN, 0.3)] if i < 8 else [face(1, "surprise")])
    assert window.payload(9.0, [], WALL)["window"]["dominant_emotion"] == "surprise"


@pytest.mark.parametrize("faces, state_says", [
    ([face(1, "neutral", 0.6), face(2, "happy", 0.9)], "happy"),
    ([face(1, "happy", 0.6), face(2, "neutral", 0.9)], "neutral"),  # not just the first in the fixed order
])
def test_a_tie_in_face_time_goes_to_the_emotion_the_state_names(faces, state_says):
    # Two faces of a still image, in view as long: the window said "neutral" (the first it saw)
    # while state, which breaks ties by confidence, said "happy".
    window = payloads.SummaryWindow(started=0.0)
    for i in range(5):
        window.add_frame(float(i), faces)
    payload = window.payload(4.0, faces, WALL)
    assert payload["dominant_emotion"] == state_says
    assert payload["window"]["dominant_emotion"] == state_says
    assert window.payload(4.0, [], WALL)["window"]["dominant_emotion"] == "happy"  # fixed order: happy before neutral


def test_a_summary_counts_the_events_of_its_window():
    window = payloads.SummaryWindow(started=0.0)
    window.add_frame(0.0, [face(3, UNCERTAIN)], [EVENTS["face_appeared"]])
    window.add_frame(1.0, [face(3, "happy")], [EVENTS["emotion_changed"]])
    window.add_frame(2.0, [], [EVENTS["face_lost"]])
    assert window.payload(2.0, [], WALL)["window"]["events"] == {
        "face_appeared": 1, "emotion_changed": 1, "face_lost": 1}


def test_an_empty_window_reports_no_face_and_zero_shares():
    window = payloads.SummaryWindow(started=5.0)
    payload = window.payload(5.0, [], WALL)
    w = payload["window"]
    assert (w["frames"], w["mean_faces"], w["dominant_emotion"]) == (0, 0.0, "none")
    assert set(w["emotion_share"].values()) == {0.0}
    assert payloads.encode(payload)


# --- encoding -----------------------------------------------------------------------------------

def test_encoding_is_compact_json():
    encoded = payloads.encode(payloads.state_payload([face(1, "happy")], WALL))
    assert ", " not in encoded and ": " not in encoded
    assert json.loads(encoded)["counts"]["happy"] == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encoding_refuses_numbers_json_cannot_carry(bad):
    # A NaN confidence (a broken model output) must fail loudly, not publish invalid JSON.
    payload = payloads.event_payload(EmotionChanged(face(1, "happy", bad), previous="sad", previous_duration_s=1.0,
                                                    at=2.0), WALL)
    with pytest.raises(ValueError):
        payloads.encode(payload)


# --- docs/mqtt.md -------------------------------------------------------------------------------

DOC = __import__("pathlib").Path(__file__).resolve().parents[1] / "docs" / "mqtt.md"


def doc_examples(marker: str) -> dict[str, object]:
    """The JSON blocks of docs/mqtt.md announced by `<!-- marker: name -->`."""
    blocks = re.findall(rf"<!-- {marker}: (\S+) -->\s*```json\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return {name: json.loads(body) for name, body in blocks}


def test_the_docs_show_exactly_the_payloads_the_code_makes_for_their_scenario():
    """Values and number types included: the docs' examples are the real tracker's output."""
    examples = doc_examples("example")
    made = mqtt_doc_examples.scenario_payloads()
    assert set(examples) == set(made) | mqtt_doc_examples.NOT_GENERATED
    for name, payload in made.items():
        assert json.dumps(examples[name]) == json.dumps(payload), (
            f"docs/mqtt.md example {name!r} is stale: run python tests/mqtt_doc_examples.py --write")


def test_the_doc_scenario_shows_a_face_appearing_settling_smiling_and_leaving():
    made = mqtt_doc_examples.scenario_payloads()
    assert made["face_appeared"]["emotion"] == UNCERTAIN
    assert (made["emotion_changed_first"]["previous"], made["emotion_changed_first"]["emotion"]) == (None, "neutral")
    assert (made["emotion_changed"]["previous"], made["emotion_changed"]["emotion"]) == ("neutral", "happy")
    assert made["face_lost"]["last_emotion"] == "happy"
    assert made["state_empty"]["faces_in_view"] == 0 and made["state"]["dominant_emotion"] == "happy"
    for name, payload in made.items():
        assert payload["schema"] == payloads.SCHEMA_VERSION
        assert ISO_UTC.fullmatch(payload["timestamp"]), name
