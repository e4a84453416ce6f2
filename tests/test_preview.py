"""The preview's sizes, without a screen: its window's (the real window is in test_end_to_end) and
its labels'."""

import cv2
import numpy as np
import pytest

from agent.events import TrackedFace
from agent.preview import _COLOURS, draw_overlay, label_font, window_size
from agent.types import Box

LABEL = "#12 surprise 100%"


@pytest.mark.parametrize("frame, screen, expected", [
    ((640, 360), (1920, 1080), (640, 360)),    # opened at 400x300: the frame shrank to 400x225
    ((1920, 1080), (1920, 1080), (1728, 972)),  # 90 % of the screen, the aspect ratio kept
    ((1920, 1080), (1366, 768), (1228, 691)),
    ((300, 900), (1024, 768), (230, 691)),     # a portrait frame: its height decides
    ((640, 360), None, (640, 360)),            # no screen known: at most 1280x720
    ((3840, 2160), None, (1280, 720)),
])
def test_the_window_opens_at_the_frames_size_within_the_screen(frame, screen, expected):
    assert window_size(*frame, screen) == expected


@pytest.mark.parametrize("frame", [(320, 240), (640, 360), (640, 480), (1280, 720), (1920, 1080), (3840, 2160)])
@pytest.mark.parametrize("screen", [(1024, 768), (1920, 1080), None])
def test_labels_are_at_least_12_pixels_high_on_the_screen(frame, screen):
    # On a 640x360 frame they were 7 pixels high, 5 once the 400x300 window shrank the frame.
    scale, thickness = label_font(*frame)
    (_, height), _ = cv2.getTextSize(LABEL, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    shown = window_size(*frame, screen)[0] / frame[0]
    assert height * shown >= 12
    assert height <= frame[1] / 15  # and not a banner across the face


def test_the_label_drawn_on_a_640x360_frame_is_at_least_12_pixels_high():
    face = TrackedFace(face_id=12, box=Box(200, 150, 120, 120), raw=None, smoothed=None, emotion="happy",
                       confidence=1.0, first_seen=0.0, last_seen=0.0)
    canvas = draw_overlay(np.zeros((360, 640, 3), np.uint8), [face], fps=0)
    above = canvas[:145]  # the label sits on a patch of the emotion's colour above the face's box
    patch_rows = np.where(np.all(above == _COLOURS["happy"], axis=2).any(axis=1))[0]
    patch = above[patch_rows[0]:patch_rows[-1] + 1]
    text_rows = np.where((patch.astype(int).sum(axis=2) < 150).any(axis=1))[0]  # its black text
    assert text_rows[-1] - text_rows[0] + 1 >= 12
