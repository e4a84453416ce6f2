"""Frame-rate bookkeeping for the stats topic."""

import pytest

from agent.stats import StageTimes


def frames_at(times):
    stats = StageTimes()
    for t in times:
        stats.frame_done(t)
    return stats


def test_fps_is_the_rate_of_the_recent_frames():
    stats = frames_at([i / 20 for i in range(21)])
    assert stats.fps() == pytest.approx(20.0)
    assert stats.fps(now=1.5) == pytest.approx(20.0)  # half a second without a frame: still running


def test_fps_is_zero_once_frames_stop_coming():
    stats = frames_at([i / 20 for i in range(21)])
    assert stats.fps(now=2.1) == 0.0


def test_a_slow_camera_is_not_taken_for_a_stalled_one():
    # camera.max_fps: 0.2 — a frame every 5 s is its normal rate, not an outage.
    stats = frames_at([0.0, 5.0, 10.0])
    assert stats.fps(now=19.0) == pytest.approx(0.2)
    assert stats.fps(now=21.0) == 0.0


def test_fps_needs_two_frames():
    assert frames_at([]).fps() == 0.0
    assert frames_at([3.0]).fps(now=3.0) == 0.0
