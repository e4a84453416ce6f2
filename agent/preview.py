"""The optional local preview (`--show`): draws results, never computes them."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
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


# Where the screen's size cannot be known, the window is at most this large.
DEFAULT_MAX_WINDOW = (1280, 720)


def label_font(width: int, height: int) -> tuple[float, int]:
    """(font scale, thickness) of the labels on a `width` x `height` frame: 14 pixels high on a
    frame of 360 lines or fewer, growing with a larger frame, so that they stay readable where
    the window shows it smaller."""
    scale = 0.6 * max(1.0, min(width, height) / 360)
    return scale, max(1, round(1.6 * scale))


def window_size(width: int, height: int, screen: tuple[int, int] | None) -> tuple[int, int]:
    """The size to open the window at for a `width` x `height` frame: the frame's own, or smaller
    at the same aspect ratio to fit 90 % of `screen` (its panels and the window's title bar take
    the rest), or DEFAULT_MAX_WINDOW where the screen is unknown."""
    limit = (int(screen[0] * 0.9), int(screen[1] * 0.9)) if screen else DEFAULT_MAX_WINDOW
    factor = min(1.0, limit[0] / width, limit[1] / height)
    return max(1, round(width * factor)), max(1, round(height * factor))


def screen_size() -> tuple[int, int] | None:
    """The size of DISPLAY's default X screen, or None where it cannot be known. Through libX11,
    which opencv-python's Qt loads for its window anyway."""
    import ctypes

    try:
        x11 = ctypes.CDLL("libX11.so.6")
    except OSError:
        return None
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    for function in (x11.XDefaultScreen, x11.XCloseDisplay):
        function.argtypes = [ctypes.c_void_p]
    for function in (x11.XDisplayWidth, x11.XDisplayHeight):
        function.argtypes = [ctypes.c_void_p, ctypes.c_int]
    display = x11.XOpenDisplay(None)
    if not display:
        return None
    try:
        screen = x11.XDefaultScreen(display)
        return x11.XDisplayWidth(display, screen), x11.XDisplayHeight(display, screen)
    finally:
        x11.XCloseDisplay(display)


def draw_overlay(image: np.ndarray, faces: Sequence[TrackedFace], fps: float) -> np.ndarray:
    """A copy of `image` with each face's box, id, emotion and confidence, and the frame rate."""
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    font, thickness = label_font(canvas.shape[1], canvas.shape[0])
    pad = thickness + 2
    for face in faces:
        x, y, w, h = face.box.as_list()
        colour = _COLOURS.get(face.emotion, (255, 255, 255))
        cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, thickness + 1)
        label = f"#{face.face_id} {face.emotion} {face.confidence:.0%}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font, thickness)
        top = max(0, y - th - base - 2 * pad)
        cv2.rectangle(canvas, (x, top), (x + tw + 2 * pad, top + th + base + 2 * pad), colour, cv2.FILLED)
        cv2.putText(canvas, label, (x + pad, top + th + pad), cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0),
                    thickness, cv2.LINE_AA)
    status = (f"{fps:.1f} fps   " if fps > 0 else "") + f"faces: {len(faces)}"
    (tw, th), base = cv2.getTextSize(status, cv2.FONT_HERSHEY_SIMPLEX, font, thickness)
    bottom = canvas.shape[0]
    cv2.rectangle(canvas, (0, bottom - th - base - 4 * pad), (tw + 8 * pad, bottom), (0, 0, 0), cv2.FILLED)
    cv2.putText(canvas, status, (4 * pad, bottom - base - 2 * pad), cv2.FONT_HERSHEY_SIMPLEX, font, (0, 255, 0),
                thickness, cv2.LINE_AA)
    return canvas


def x_display_problem(display: str | None) -> str | None:
    """Why the X display named by `display` (DISPLAY's value) cannot be used, or None if it can.

    Checked by connecting to its socket before OpenCV tries: OpenCV's Qt aborts the whole process
    (SIGABRT, no exception) when the display it is given cannot be reached."""
    if not display:
        return "none found (DISPLAY is not set)"
    match = re.fullmatch(r"(?P<host>[^:]*):(?P<number>\d+)(\.\d+)?", display)
    if not match:
        return f"DISPLAY={display!r} is not a display name such as :0"
    host, number = match["host"], int(match["number"])
    try:
        if host in ("", "unix") and sys.platform.startswith("linux"):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                try:  # the abstract socket first, as Xlib does; then the file
                    sock.connect(f"\0/tmp/.X11-unix/X{number}")
                except OSError:
                    sock.connect(f"/tmp/.X11-unix/X{number}")
        else:
            socket.create_connection((host or "localhost", 6000 + number), timeout=2).close()
    except OSError as exc:
        return f"cannot reach DISPLAY={display} ({exc.strerror or exc})"
    return None


# Opens and closes a window (not named as the preview, which a test looks for), in a child
# process of its own: see window_problem.
_WINDOW_PROBE = "import cv2; cv2.namedWindow('display check'); cv2.destroyAllWindows(); cv2.waitKey(1)"


def window_problem(timeout: float = 30.0) -> str | None:
    """Why OpenCV would abort on opening a window here, or None.

    A display whose socket answers can still refuse the connection (no or a wrong X authority
    cookie, as under sudo or a service), or Qt's platform plugin can fail to load; Qt then aborts
    the whole process. So a child tries first, and its dying words become the reason. A child that
    fails otherwise (a build without GUI support raises cv2.error) is left to the real attempt,
    which says so itself. Only Linux has Qt on X11 to check."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        done = subprocess.run([sys.executable, "-c", _WINDOW_PROBE], capture_output=True, text=True,
                              errors="replace", timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode >= 0:
        return None
    said = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    return "; ".join(said[:2]) or f"a test window was killed by signal {-done.returncode}"


def _display_problem() -> str | None:
    if not sys.platform.startswith("linux"):
        return None
    display = os.environ.get("DISPLAY")
    if not display and os.environ.get("WAYLAND_DISPLAY"):
        # opencv-python's Qt speaks X11 only; a Wayland desktop offers it through XWayland.
        return "opencv-python's window needs X11: DISPLAY is not set (enable XWayland)"
    return x_display_problem(display)


class Preview:
    """A window showing the annotated frames; `show` returns False once the user pressed q or Esc
    or closed the window."""

    def __init__(self) -> None:
        problem = _display_problem()
        if problem:
            raise PreviewError(f"--show needs a display: {problem}; run without --show or under a desktop "
                               "session")
        problem = window_problem()
        if problem:
            raise PreviewError(f"--show cannot open a window on DISPLAY={os.environ.get('DISPLAY')}: {problem} "
                               "(is XAUTHORITY right for this user?)")
        try:
            cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO | cv2.WINDOW_GUI_NORMAL)
        except cv2.error as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
            raise PreviewError(f"--show cannot open a window (does this OpenCV build have GUI support? "
                               f"opencv-python-headless has none): {reason}") from None
        self._opened = True
        self._seen_visible = False
        self._screen = screen_size()
        self._sized = False

    def show(self, image: np.ndarray, faces: Sequence[TrackedFace], fps: float, wait_ms: int = 1) -> bool:
        if not self._sized:  # Qt opens a resizable window at 400x300, whatever the frame
            cv2.resizeWindow(WINDOW, *window_size(image.shape[1], image.shape[0], self._screen))
            self._sized = True
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
