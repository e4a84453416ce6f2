"""The box tracker on synthetic box sequences: ids survive crossings and short gaps, not long ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from agent.config import TrackingConfig
from agent.tracking import BoxTracker, min_cost_assignment
from agent.types import Box


def face(cx: float, cy: float, size: float = 60.0) -> Box:
    return Box(cx - size / 2, cy - size / 2, size, size)


def times(fps: float, seconds: float) -> list[float]:
    return [i / fps for i in range(int(round(seconds * fps)) + 1)]


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 3), (2, 5), (5, 2), (4, 4)])
def test_min_cost_assignment_finds_the_cheapest_full_assignment(rows, cols):
    rng = np.random.default_rng(rows * 10 + cols)
    for _ in range(20):
        cost = rng.random((rows, cols))
        pairs = min_cost_assignment(cost)
        assert len(pairs) == min(rows, cols)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
        if rows <= cols:
            best = min(sum(cost[r, c] for r, c in enumerate(perm)) for perm in itertools.permutations(range(cols), rows))
        else:
            best = min(sum(cost[r, c] for c, r in enumerate(perm)) for perm in itertools.permutations(range(rows), cols))
        assert sum(cost[r, c] for r, c in pairs) == pytest.approx(best)


def test_min_cost_assignment_of_nothing_is_empty():
    assert min_cost_assignment([]) == []
    assert min_cost_assignment([[]]) == []


@pytest.mark.parametrize("fps", [5, 15, 30])
def test_two_faces_crossing_keep_their_ids(fps):
    tracker = BoxTracker()
    ids_left_to_right, ids_right_to_left = set(), set()
    # Over 2 s one face walks 100 -> 500 px while the other walks 500 -> 100, slightly lower.
    for t in times(fps, 2.0):
        a, b = face(100 + 200 * t, 200), face(500 - 200 * t, 210)
        step = tracker.update(t, [b, a] if int(t * fps) % 2 else [a, b])  # the detector's order is arbitrary
        id_a, id_b = (step.ids[1], step.ids[0]) if int(t * fps) % 2 else step.ids
        ids_left_to_right.add(id_a)
        ids_right_to_left.add(id_b)
    assert ids_left_to_right == {1}
    assert ids_right_to_left == {2}


@pytest.mark.parametrize("fps", [5, 30])
def test_face_hidden_behind_another_while_crossing_keeps_its_id(fps):
    tracker = BoxTracker()
    seen_a, seen_b = [], []
    for t in times(fps, 2.0):
        a, b = face(100 + 200 * t, 200), face(500 - 200 * t, 200)
        if abs(a.x - b.x) < 60:  # b is behind a: only a is detected
            seen_a.append(tracker.update(t, [a]).ids[0])
        else:
            step = tracker.update(t, [a, b])
            seen_a.append(step.ids[0])
            seen_b.append(step.ids[1])
    assert set(seen_a) == {1}
    assert set(seen_b) == {2}


def test_a_fast_walker_at_a_low_frame_rate_keeps_its_id_from_its_second_frame():
    # At 5 frames/s a walker close to the camera moves 3/4 of a face between frames: the boxes
    # hardly overlap, and there is no velocity yet to predict the second one.
    tracker = BoxTracker()
    ids = [tracker.update(t, [face(100 + 300 * t, 200, size=80)]).ids for t in times(5, 1.0)]
    assert set(ids) == {(1,)}


def test_face_missing_for_less_than_the_gap_keeps_its_id():
    tracker = BoxTracker(TrackingConfig(max_gap_s=1.0))
    assert tracker.update(0.0, [face(100, 100)]).ids == (1,)
    step = tracker.update(0.5, [])
    assert step.coasting == (1,) and step.lost == ()
    step = tracker.update(0.9, [face(104, 100)])
    assert step.ids == (1,) and step.new == () and step.lost == ()


def test_face_missing_for_longer_than_the_gap_is_lost_and_comes_back_with_a_new_id():
    tracker = BoxTracker(TrackingConfig(max_gap_s=1.0))
    tracker.update(0.0, [face(100, 100)])
    assert tracker.update(0.6, []).coasting == (1,)
    step = tracker.update(1.2, [face(100, 100)])
    assert step.lost == (1,)
    assert step.ids == (2,) and step.new == (2,)


@pytest.mark.parametrize("interval", [1.0, 1.3, 5.0])
def test_at_a_frame_rate_slower_than_the_gap_a_face_seen_in_every_frame_keeps_its_id(interval):
    tracker = BoxTracker(TrackingConfig(max_gap_s=1.0))
    for k in range(6):
        step = tracker.update(k * interval, [face(100 + k, 100)])
        assert step.ids == (1,) and step.lost == ()
    step = tracker.update(5 * interval + 1.1, [])  # then it leaves: lost at the first frame past the gap
    assert step.lost == (1,) and tracker.open_ids == ()


def test_track_is_lost_on_the_first_frame_past_the_gap_even_without_detections():
    tracker = BoxTracker(TrackingConfig(max_gap_s=1.0))
    tracker.update(0.0, [face(100, 100)])
    assert tracker.update(1.0, []).lost == ()
    assert tracker.update(1.1, []).lost == (1,)
    assert tracker.open_ids == ()


def test_a_face_far_from_every_track_gets_a_new_id():
    tracker = BoxTracker()
    tracker.update(0.0, [face(100, 100)])
    step = tracker.update(0.1, [face(100, 100), face(400, 300)])
    assert step.ids == (1, 2) and step.new == (2,)


def test_a_box_of_very_different_size_at_the_same_place_is_a_new_face():
    tracker = BoxTracker()
    tracker.update(0.0, [face(300, 300, size=40)])
    step = tracker.update(0.1, [face(300, 300, size=200)])
    assert step.new == (2,) and step.coasting == (1,)


def test_an_overlapping_box_a_third_smaller_in_the_next_frame_is_another_face():
    # A scene cut in hamilton_640x360.mp4: the performer's box, then an audience member's (IoU 0.31).
    tracker = BoxTracker()
    tracker.update(7.01, [Box(261, 49, 97, 97)])
    assert tracker.update(7.04, [Box(308, 55, 65, 65)]).new == (2,)


@pytest.mark.parametrize("fps", [5, 30])
def test_a_face_walking_up_to_the_camera_keeps_its_id(fps):
    tracker = BoxTracker()
    ids = set()
    for t in times(fps, 2.0):
        ids.update(tracker.update(t, [face(300, 200, size=40 * 2 ** t)]).ids)  # doubles in size every second
    assert ids == {1}


def test_ids_are_never_reused():
    tracker = BoxTracker(TrackingConfig(max_gap_s=0.5))
    seen = []
    for k in range(4):
        seen += tracker.update(k * 1.0, [face(100, 100)]).ids
        tracker.update(k * 1.0 + 0.4, [])  # a frame without it: past the gap it is lost
    assert seen == [1, 2, 3, 4]


def test_close_drops_every_open_track():
    tracker = BoxTracker()
    tracker.update(0.0, [face(100, 100), face(400, 100)])
    assert tracker.close() == (1, 2)
    assert tracker.update(0.1, [face(100, 100)]).ids == (3,)


def test_jittery_small_faces_keep_their_ids():
    # Small faces in a 1080p crowd: a few pixels of detector jitter is a large share of the box.
    rng = np.random.default_rng(7)
    tracker = BoxTracker()
    ids = set()
    for t in times(30, 3.0):
        boxes = [face(200 + 30 * t + rng.normal(0, 3), 500 + rng.normal(0, 3), size=24 + rng.normal(0, 2)),
                 face(900 - 20 * t + rng.normal(0, 3), 520 + rng.normal(0, 3), size=28 + rng.normal(0, 2))]
        ids.add(tracker.update(t, boxes).ids)
    assert ids == {(1, 2)}


def test_expire_drops_only_the_tracks_unseen_for_longer_than_the_gap():
    # No frame comes (a camera outage): update() would give each track one more frame to be
    # matched in, expire() does not, and a face seen afterwards at the same place is a new one.
    tracker = BoxTracker(TrackingConfig(max_gap_s=1.0))
    first = tracker.update(0.0, [Box(100, 100, 50, 50)]).ids[0]
    second = tracker.update(0.8, [Box(300, 100, 50, 50)]).new[0]
    assert tracker.expire(1.5) == (first,)
    assert tracker.open_ids == (second,)
    assert tracker.expire(1.5) == ()
    assert tracker.expire(2.0) == (second,)
    after = tracker.update(2.1, [Box(100, 100, 50, 50)])
    assert after.new == after.ids and after.ids[0] not in (first, second)
