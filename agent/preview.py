"""The optional local preview (`--show`): draws results, never computes them."""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

import cv2
import numpy as np

from agent.errors import PreviewError
from agent.events import TrackedFace
from agent.types import UNCERTAIN

logger = logging.getLogger(__name__)

WINDOW = "emotion-agent"
QUIT_KEYS = {ord("q"), ord("Q"), 27}  # 27 = Esc
_COLOURS = {  # BGR
    "angry": (40, 40, 220), "disgust": (40, 140, 40), "fear": (160, 60, 160), "happy": (40, 200, 250),
    "sad": (200, 120, 40), "surprise": (230, 200, 40), "neutral": (200, 200, 200), UNCERTAIN: (120, 120, 120),
}


def draw_overlay(image: np.ndarray, faces: Sequence[TrackedFace], fps: float) -> np.ndarray:
    """A copy of `image` with each face's box, id, emotion and confidence, and the frame rate."""
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    scale = max(0.4, min(canvas.shape[:2]) / 720)
    thickness = max(1, round(2 * scale))
    for face in faces:
        x, y, w, h = face.box.as_list()
        colour = _COLOURS.get(face.emotion, (255, 255, 255))
        cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, thickness)
        label = f"#{face.face_id} {face.emotion} {face.confidence:.0%}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, thickness)
        top = max(0, y - th - base - 4)
        cv2.rectangle(canvas, (x, top), (x + tw + 4, top + th + base + 4), colour, cv2.FILLED)
        cv2.putText(canvas, label, (x + 2, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (0, 0, 0),
                    thickness, cv2.LINE_AA)
    status = (f"{fps:.1f} fps   " if fps > 0 else "") + f"faces: {len(faces)}"
    (tw, th), base = cv2.getTextSize(status, cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, thickness)
    bottom = canvas.shape[0]
    cv2.rectangle(canvas, (0, bottom - th - base - 12), (tw + 16, bottom), (0, 0, 0), cv2.FILLED)
    cv2.putText(canvas, status, (8, bottom - base - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (0, 255, 0),
                thickness, cv2.LINE_AA)
    return canvas


def _has_display() -> bool:
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


class Preview:
    """A window showing the annotated frames; `show` returns False once the user pressed q or Esc
    or closed the window."""

    def __init__(self) -> None:
        if not _has_display():
            raise PreviewError("--show needs a display: none found (DISPLAY is not set); run without --show "
                               "or under a desktop session")
        try:
            cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO | cv2.WINDOW_GUI_NORMAL)
        except cv2.error as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
            raise PreviewError(f"--show cannot open a window (does this OpenCV build have GUI support? "
                               f"opencv-python-headless has none): {reason}") from None
        self._opened = True
        self._seen_visible = False

    def show(self, image: np.ndarray, faces: Sequence[TrackedFace], fps: float, wait_ms: int = 1) -> bool:
        cv2.imshow(WINDOW, draw_overlay(image, faces, fps))
        key = cv2.waitKey(wait_ms) & 0xFF
        if key in QUIT_KEYS:
            return False
        try:
            visible = cv2.getWindowProperty(WINDOW, cv2.WND_PROP_VISIBLE) >= 1
        except cv2.error:
            return False
        # A new window is not mapped yet for the first frames: only a window that was visible
        # and no longer is has been closed by the user.
        if visible:
            self._seen_visible = True
        return visible or not self._seen_visible

    def hold(self, image: np.ndarray, faces: Sequence[TrackedFace], fps: float, should_stop) -> None:
        """Keep a still image on screen until q/Esc, the window is closed, or `should_stop()`."""
        while not should_stop() and self.show(image, faces, fps, wait_ms=50):
            pass

    def close(self) -> None:
        if self._opened:
            cv2.destroyAllWindows()
            cv2.waitKey(1)
            self._opened = False
