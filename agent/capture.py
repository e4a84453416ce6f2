"""Frame sources: a camera or stream read on its own thread (newest frame wins), a video file read
in order, or a single image.

A live source never ends: a failed read closes the device and reopens it with backoff, and its
`status` tells the outside world ("ok", "reconnecting"). A file source drops nothing and ends at
end of file.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np

from agent import MAX_IMAGE_PIXELS
from agent.config import is_stream_url, redact_url
from agent.errors import SourceError
from agent.types import PAUSED, Frame

logger = logging.getLogger(__name__)

if "OPENCV_LOG_LEVEL" not in os.environ:
    # OpenCV and its FFmpeg print several lines for every failed open (an unplugged camera is
    # retried forever) and for damaged files; the agent reports these in one line of its own.
    # Setting OPENCV_LOG_LEVEL (e.g. =INFO) brings them back for debugging.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET; read when FFmpeg first opens

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


class FrameSource(Protocol):
    live: bool   # frames come in real time and the newest wins; the source never ends
    still: bool  # one still image: the loop holds it while smoothing settles

    def read(self) -> Frame | None:
        """The next frame to process, or None once a finite source is exhausted."""

    def status(self) -> str:
        """One of `types.CAMERA_STATUSES`: 'starting' (a live source before its first frame), 'ok',
        'reconnecting', 'ended'."""

    def dropped(self) -> int:
        """Frames captured but never handed out (a live source skips stale frames)."""

    def corrupt(self) -> int:
        """Frames that were unreadable or malformed and were skipped."""

    def pause(self) -> None:
        """Analysis is switched off: a live source lets go of its camera or stream; a file is simply
        not read meanwhile."""

    def resume(self) -> None:
        """Analysis is back on: a live source opens its camera or stream again."""

    def close(self) -> None: ...


def _valid_frame(image: np.ndarray | None) -> bool:
    return (image is not None and isinstance(image, np.ndarray) and image.ndim in (2, 3)
            and image.shape[0] > 0 and image.shape[1] > 0 and image.dtype == np.uint8)


def _ends_whole(tail: bytes) -> bool:
    return b"\xff\xd9" in tail[-64:]  # a whole JPEG ends with its EOI marker (padding may follow)


def is_truncated_jpeg(path: str | Path) -> bool:
    """Whether the file is a JPEG cut short (a copy or a card that stopped early): libjpeg decodes
    what is there and greys out the rest, so it reads, but is not the picture."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return False
        f.seek(max(0, Path(path).stat().st_size - 64))
        tail = f.read()
    return not _ends_whole(tail)


def decoded_jpeg(data: np.ndarray | None) -> np.ndarray | None:
    """One JPEG of a stream, decoded; None if it is damaged: empty, not a JPEG, or cut short (which
    libjpeg and FFmpeg would show with its lower part grey)."""
    if data is None or data.size < 4 or not _ends_whole(data.ravel()[-64:].tobytes()):
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def put_until_stopped(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` in a bounded queue, waiting for room but not past `stop`; False if stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def opencv_file_name(path: str) -> str:
    """The name to hand OpenCV for a file the user named: absolute, or FFmpeg takes what comes
    before a colon (`cam1-12:30.mp4`) for a protocol and cannot open it; with ~ expanded."""
    return os.path.abspath(os.path.expanduser(path))


def is_stream(target: int | str) -> bool:
    return isinstance(target, str) and is_stream_url(target)


def open_stream(url: str, timeout_s: float) -> cv2.VideoCapture:
    """A capture of a stream URL whose opening and each read give up after `timeout_s`. Without it
    FFmpeg waits 30 s for a stream that stalls with its connection open, as a camera on Wi-Fi does."""
    ms = round(timeout_s * 1000)
    return cv2.VideoCapture(url, cv2.CAP_ANY, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])


# What an HTTP camera may answer with a stream: MJPEG's multipart parts, a video, or raw bytes.
_VIDEO_CONTENT_TYPES = ("multipart/", "video/", "application/octet-stream")


def http_stream_problem(url: str, timeout_s: float) -> str | None:
    """What an http(s) URL that OpenCV cannot open answers, in a few words: an HTTP error status
    (404 Not Found: the path is wrong), an answer that is no video (the camera's web page), or no
    answer at all. None for other URLs. One GET, read up to its headers."""
    import http.client  # only where a stream fails to open
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return None
    # As FFmpeg does, no check of the certificate: a camera's own is seldom one a CA signed.
    unchecked = ssl.create_default_context()
    unchecked.check_hostname = False
    unchecked.verify_mode = ssl.CERT_NONE
    handlers: list[urllib.request.BaseHandler] = [urllib.request.HTTPSHandler(context=unchecked)]
    if parts.username is not None:  # urllib takes no user info in the URL: given as a login instead
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        logins = urllib.request.HTTPPasswordMgrWithDefaultRealm()
        logins.add_password(None, url, urllib.parse.unquote(parts.username),
                            urllib.parse.unquote(parts.password or ""))
        handlers += [urllib.request.HTTPBasicAuthHandler(logins), urllib.request.HTTPDigestAuthHandler(logins)]
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=timeout_s) as answer:
            kind = answer.headers.get_content_type() if answer.headers.get("Content-Type") else None
    except urllib.error.HTTPError as exc:
        try:
            phrase = http.HTTPStatus(exc.code).phrase
        except ValueError:
            phrase = "(an unknown status)"
        return f"the server answered {exc.code} {phrase}"
    except http.client.HTTPException as exc:  # an RTSP server or the like on that port
        return f"the server's answer is not HTTP ({type(exc).__name__})"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout_s:g} s"
        return f"no connection ({getattr(reason, 'strerror', None) or reason})"
    said = f"Content-Type {kind}" if kind else "no Content-Type"
    if kind is None or not kind.startswith(_VIDEO_CONTENT_TYPES):
        return f"the server's answer is not a video stream ({said})"
    return f"the server's answer ({said}) does not decode as video"


def camera_device(target: int | str) -> str | None:
    """The device file a camera source opens, where it is known: a /dev path as given, or on
    Linux an index, which OpenCV's V4L2 backend opens as /dev/video<index>. OpenCV takes an
    index's hundreds for the backend to use: 203 is /dev/video3 through V4L2 (CAP_V4L2 + 3), and
    103 or 1903 no device file."""
    if isinstance(target, int):
        if not sys.platform.startswith("linux"):
            return None
        backend, index = divmod(target, 100)
        return f"/dev/video{index}" if backend * 100 in (0, cv2.CAP_V4L2) else None
    return target


def camera_device_missing(kind: str, target: int | str) -> bool:
    """A camera device that is not there now (it is waited for, like an unplugged camera)."""
    device = camera_device(target) if kind == "camera" else None
    return device is not None and not Path(device).exists()


def read_image(path: str | Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray | None:
    """The image in file `path`, or None where there is none to decode: not a file (a named pipe
    would have OpenCV wait for a writer, forever), or not an image OpenCV reads. SourceError for
    one whose header claims more than MAX_IMAGE_PIXELS: OpenCV refuses it before decoding
    (agent/__init__.py sets its limit)."""
    if not os.path.isfile(path):
        return None
    try:
        return _read_image(path, flags)
    except cv2.error as exc:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):
            raise SourceError(f"cannot read image {path}: its header claims more than the "
                              f"{MAX_IMAGE_PIXELS // 1_000_000} million pixels the agent decodes; a smaller "
                              f"copy will do (faces need far fewer pixels)") from None
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "refused"
        raise SourceError(f"cannot read image {path}: OpenCV refused it ({reason[-120:]})") from None


def _read_image(path: str | Path, flags: int) -> np.ndarray | None:
    """cv2.imread for any file name, None where imread gives None. OpenCV crashes on a name that
    is not UTF-8 (Python hands it over with stand-ins for the odd bytes): for such a name Python
    reads the bytes and OpenCV only decodes them (imdecode, which gives up on a JPEG cut short
    where imread shows its top part, so only there)."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        try:
            data = np.fromfile(name, np.uint8)
        except (OSError, ValueError):
            return None
        return cv2.imdecode(data, flags) if data.size else None
    return cv2.imread(name, flags)


class ImageSource:
    """A single image file: one frame, then the end."""

    live = False
    still = True

    def __init__(self, path: str):
        image = read_image(path)
        if image is None:
            raise SourceError(f"cannot read image {path}: not an image file OpenCV can decode")
        if is_truncated_jpeg(path):
            # libjpeg decodes what is there and greys out the rest: say so rather than find no face.
            logger.warning("image %s is damaged (a JPEG cut short): its lower part is blank", path)
        self._image: np.ndarray | None = image
        self._ended = False

    def read(self) -> Frame | None:
        if self._image is None:
            self._ended = True
            return None
        frame = Frame(self._image, 0.0, 0)
        self._image = None
        return frame

    def status(self) -> str:
        return "ended" if self._ended else "ok"

    def dropped(self) -> int:
        return 0

    def corrupt(self) -> int:
        return 0

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def close(self) -> None:
        self._image = None


class VideoFileSource:
    """A video file, every frame in order, stamped with its position in the video.

    The timestamps are the video's own (index / fps), so smoothing in seconds behaves as it would
    live, however fast or slow the machine decodes. `read` decodes a few frames ahead on a thread
    of its own (OpenCV releases the GIL while decoding), so decoding overlaps inference and no
    frame is dropped. A caller that is itself a thread running ahead (agent.detect_ahead) calls
    `read_here` instead, which decodes on the caller's thread: no second thread, no second queue
    of frames (at 1080p, 6 MB a frame). One source is read one way only. With `realtime` the reads
    are paced to the video's rate; with `loop` the file starts over at its end (soak tests, demos).
    """

    live = False
    still = False
    PREFETCH = 4
    # A frame that fails to decode before the video's known end is skipped: a bad block or a lost
    # packet spoils a frame or a few, and the frames after it decode. This many failed reads in a
    # row are taken for the end of a file cut short: damage seldom spans more frames, and at a real
    # early end each read fails at once, so the tries cost nothing.
    FAILED_READS_AT_AN_END = 10

    def __init__(self, path: str, *, realtime: bool = False, loop: bool = False, start_index: int = 0):
        """`start_index`: the first frame to hand out (a reload resumes where the last run stopped);
        the frames before it are decoded but not kept, so indexes and timestamps stay the video's."""
        self._path = path
        self._realtime = realtime
        self._loop = loop
        self._cap = self._open()
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps and 1 <= fps <= 240 else 25.0
        self.frame_count: int | None = max(int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0) or None  # as the container says
        self._index = 0
        self._pass_start = 0  # the index of this pass's first frame: with --loop, indices go on growing
        self._corrupt = 0
        # Exact, unlike a seek to a frame number. Damaged frames on the way were reported by the
        # run that got this far: not counted or logged again.
        while self._index < start_index and self._next(lambda: (self._cap.grab(), None), counted=False)[0]:
            self._index += 1
        self._start = time.monotonic() - self._index / self.fps  # realtime pacing goes on from there
        self._paused_at: float | None = None
        self._ended = False
        self._frames: queue.Queue[Frame | None] = queue.Queue(maxsize=self.PREFETCH)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # started by the first `read`

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(opencv_file_name(self._path))
        if not cap.isOpened():
            raise SourceError(f"cannot open video {self._path}: not a video file OpenCV can decode")
        return cap

    def _decode_next(self) -> Frame | None:
        """The next valid frame, decoded on the calling thread; None at the end (or on an error,
        logged: the frames before it were good)."""
        try:
            while not self._stop.is_set():
                ok, image = self._next(self._cap.read)
                if not ok:
                    if self._loop and self._index > 0:
                        self._cap.release()
                        self._cap = self._open()
                        self._pass_start = self._index
                        continue
                    expected = self.frame_count
                    if expected and self._index < expected * 0.98:  # container counts are often off by a frame or two
                        logger.warning("video %s ended after %d of its %d frames: truncated or damaged?",
                                       self._path, self._index, expected)
                    return None
                index = self._index
                self._index += 1
                if not _valid_frame(image):
                    self._corrupt += 1
                    continue
                return Frame(image, index / self.fps, index)
        except (SourceError, cv2.error) as exc:
            logger.error("video %s: %s", self._path, exc)
        return None

    def _next(self, step: Callable[[], tuple[bool, np.ndarray | None]], *,
              counted: bool = True) -> tuple[bool, np.ndarray | None]:
        """`step` (the capture's read, or a grab) once, or again past frames that fail to decode
        before the video's known end: each is counted as corrupt (if `counted`), and its index
        passes with it. (False, None) at the end, with `_index` after the last frame that decoded."""
        failed = 0
        while True:
            ok, image = step()
            if ok:
                if failed and counted:
                    logger.warning("video %s: %s cannot be decoded; skipped", self._path,
                                   f"frame {self._index}" if failed == 1
                                   else f"frames {self._index} to {self._index + failed - 1}")
                    self._corrupt += failed
                self._index += failed
                return True, image
            failed += 1
            if (failed >= self.FAILED_READS_AT_AN_END or not self.frame_count
                    or self._index - self._pass_start + failed >= self.frame_count):
                return False, None

    def _decode(self) -> None:
        while True:
            frame = self._decode_next()
            if not self._put(frame) or frame is None:
                return

    def _put(self, item: Frame | None) -> bool:
        return put_until_stopped(self._frames, item, self._stop)

    def _handed_out(self, frame: Frame | None) -> Frame | None:
        if frame is None:
            self._ended = True
            return None
        if self._realtime:
            delay = self._start + frame.timestamp - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        return frame

    def read(self) -> Frame | None:
        if self._ended:
            return None
        if self._thread is None:
            self._thread = threading.Thread(target=self._decode, name="decode", daemon=True)
            self._thread.start()
        return self._handed_out(self._frames.get())

    def read_here(self) -> Frame | None:
        """`read`, decoding on the calling thread."""
        if self._ended:
            return None
        return self._handed_out(self._decode_next())

    def status(self) -> str:
        return "ended" if self._ended else "ok"

    def dropped(self) -> int:
        return 0

    def corrupt(self) -> int:
        return self._corrupt

    def pause(self) -> None:
        """Nothing to let go of (the loop stops reading); with `realtime`, the video's clock stops."""
        if self._paused_at is None:
            self._paused_at = time.monotonic()

    def resume(self) -> None:
        """With `realtime`, the video goes on at its own rate from where it was, not in a rush to
        catch up with the time it was paused."""
        if self._paused_at is not None:
            self._start += time.monotonic() - self._paused_at
            self._paused_at = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._cap.release()


class LiveSource:
    """A camera or network stream read on its own thread; `read` returns the newest frame.

    A slow consumer never falls behind the camera: frames it had no time for are counted as
    dropped. A failed read reopens the device with exponential backoff, forever, so an unplugged
    USB camera or a restarted RTSP server comes back by itself; a stream that sends nothing for
    `stall_timeout_s` counts as failed.

    `pause()` closes the device or stream (its LED goes out, another program may open it) as soon
    as the read under way returns: within a frame interval, or for a stalled stream at its stall
    timeout. `resume()` opens it again. One made `paused` opens nothing until resumed.
    """

    live = True
    still = False
    # How long `close` waits for the capture thread. One blocked on a stalled stream is not waited
    # for: its read gives up at the stall timeout, and the thread then releases the capture and
    # ends, while a stop (systemd allows it 10 s) or a reload has gone on.
    CLOSE_WAIT_S = 1.0

    def __init__(self, target: int | str, *, width: int | None = None, height: int | None = None,
                 fps: float | None = None, retry_initial_s: float = 1.0, retry_max_s: float = 30.0,
                 stall_timeout_s: float = 10.0, open_capture=None, paused: bool = False):
        self._target = target
        self._props = {cv2.CAP_PROP_FRAME_WIDTH: width, cv2.CAP_PROP_FRAME_HEIGHT: height, cv2.CAP_PROP_FPS: fps}
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._stream = is_stream(target)
        self._stall_timeout = stall_timeout_s
        self._open_capture = open_capture or (functools.partial(open_stream, timeout_s=stall_timeout_s)
                                              if self._stream else cv2.VideoCapture)
        self._cond = threading.Condition()
        self._latest: np.ndarray | None = None
        self._latest_index = -1
        self._latest_time = 0.0
        self._consumed_index = -1
        self._captured = 0
        self._dropped = 0
        self._corrupt = 0
        self._paused = paused
        self._status = PAUSED if paused else "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def _open(self) -> cv2.VideoCapture | None:
        cap = self._open_capture(self._target)
        if not cap.isOpened():
            cap.release()
            return None
        for prop, value in self._props.items():
            if value:
                cap.set(prop, value)
        return cap

    def _hands_over_jpegs(self, cap: cv2.VideoCapture) -> bool:
        """Whether `cap`, an MJPEG stream (an ESP32-CAM's, an IP camera's http one), now gives its
        JPEGs undecoded, to be decoded here: FFmpeg scales every frame to the size of the first (a
        frame size changed in the camera's web page came out squashed to the old one, until a
        reconnect) and hands out a JPEG cut short with its lower part grey."""
        return (self._stream and int(cap.get(cv2.CAP_PROP_FOURCC)) == cv2.VideoWriter_fourcc(*"MJPG")
                and cap.set(cv2.CAP_PROP_FORMAT, -1))

    def _set_status(self, status: str, why: str = "") -> None:
        """The capture thread's news; none while paused (the status says so until `resume`)."""
        with self._cond:
            if self._paused or status == self._status:
                return
            self._status = status
            self._cond.notify_all()
        self._say(logging.WARNING if status != "ok" else logging.INFO, status,
                  f" ({why}; retrying with backoff up to every {self._retry_max:g} s)" if why else "")

    def _say(self, level: int, status: str, why: str = "") -> None:
        logger.log(level, "%s %s: %s%s", "stream" if self._stream else "camera", redact_url(str(self._target)),
                   status, why)

    def _why_not_open(self) -> str:
        problem = self._stream and http_stream_problem(str(self._target), min(self._stall_timeout, 5.0))
        return problem or "unplugged, busy, or nothing listening there"

    def _run(self) -> None:
        delay = self._retry_initial
        while not self._stop.is_set():
            try:
                delay = self._attempt(delay)
            except Exception as exc:  # a dead capture thread would leave the agent blind until a restart
                self._set_status("reconnecting", f"{type(exc).__name__}: {exc}")
                delay = self._back_off(delay)

    def _back_off(self, delay: float) -> float:
        """Waits `delay` (or until paused or closed); the next, doubled delay."""
        self._wait_for(lambda: self._paused, delay)
        return min(delay * 2, self._retry_max)

    def _attempt(self, delay: float) -> float:
        """One open-and-read of the source (or one wait while paused); the next backoff delay."""
        if self._paused:
            self._wait_for(lambda: not self._paused)
            return self._retry_initial  # back on: opened at once
        cap = self._open()
        if cap is None:
            if self._status not in ("reconnecting", PAUSED):  # said once, as it goes
                self._set_status("reconnecting", f"cannot open it: {self._why_not_open()}")
            return self._back_off(delay)
        try:
            if self._read_until_lost(cap):
                delay = self._retry_initial
        finally:
            cap.release()
        if not (self._stop.is_set() or self._paused):
            self._set_status("reconnecting", "it stopped giving frames")
            delay = self._back_off(delay)
        return delay

    def _wait_for(self, condition: Callable[[], bool], timeout: float | None = None) -> None:
        """Waits until `condition()` (checked whenever pause, resume or close notify), the source is
        closed, or `timeout` passed."""
        with self._cond:
            self._cond.wait_for(lambda: self._stop.is_set() or condition(), timeout)

    def _read_until_lost(self, cap: cv2.VideoCapture) -> bool:
        """Reads `cap` into the newest frame until it fails, the source is paused or closed; whether
        any frame came."""
        got = False
        failures = 0
        jpegs = self._hands_over_jpegs(cap)
        while not (self._stop.is_set() or self._paused):
            if jpegs:
                # Not `read`: it fails for an empty part (some cameras send one while the sensor
                # is busy) as for a lost stream, and five in a row reopened it. Its grab works.
                ok = cap.grab()
                image = decoded_jpeg(cap.retrieve()[1]) if ok else None
            else:
                ok, image = cap.read()
            if not ok:
                failures += 1
                # A few failed reads in a row mean the device or stream is gone.
                if failures >= 5:
                    break
                continue
            if not _valid_frame(image):
                self._corrupt += 1
                continue
            self._corrupt += failures  # reads that failed between good frames: damaged ones, skipped
            failures = 0
            got = True
            if self._status != "ok":  # logged when the camera is back; no lock taken on every frame
                self._set_status("ok")
            self._keep(image)
        return got

    def _keep(self, image: np.ndarray) -> None:
        """`image` becomes the newest frame (not once paused: it would be handed out on resume)."""
        with self._cond:
            if self._paused:
                return
            if self._latest_index > self._consumed_index:
                self._dropped += 1  # overwritten before anyone took it
            self._captured += 1
            self._latest = image
            self._latest_index = self._captured - 1
            self._latest_time = time.monotonic()
            self._status = "ok"
            self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            if self._paused:
                return
            self._paused = True
            self._status = PAUSED
            self._consumed_index = self._latest_index  # a frame from before the pause is not handed out after it
            self._cond.notify_all()
        self._say(logging.INFO, "paused: closing it")

    def resume(self) -> None:
        with self._cond:
            if not self._paused:
                return
            self._paused = False
            self._status = "starting"
            self._cond.notify_all()
        self._say(logging.INFO, "resumed: opening it")

    def read(self, timeout: float = 1.0) -> Frame | None:
        """The newest frame not yet handed out; waits up to `timeout`, then returns None only if
        the source was closed (a live source has no end). Callers loop on it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._latest_index <= self._consumed_index and not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if self._stop.is_set():
                return None
            self._consumed_index = self._latest_index
            return Frame(self._latest, self._latest_time, self._latest_index)

    def status(self) -> str:
        return self._status

    def dropped(self) -> int:
        return self._dropped

    def corrupt(self) -> int:
        return self._corrupt

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=self.CLOSE_WAIT_S)


# OpenCV takes a C int; beyond it, its capture thread dies on the conversion.
MAX_CAMERA_INDEX = 2 ** 31 - 1


def classify_source(source: str) -> tuple[str, int | str]:
    """('camera'|'stream'|'image'|'video', target) for a --source string, or SourceError."""
    text = source.strip()
    if not text:
        raise SourceError("source is empty (expected a camera index, an image or video file, or a URL)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes of another encoding in a file name: OpenCV would crash on them
        raise SourceError(f"source file name is not valid UTF-8 (rename the file): {text!r}") from None
    if text.isdigit():
        return "camera", _camera_index(text)
    if is_stream(text):
        return "stream", text
    path = _expanded(text)
    if text.startswith("/dev/") and not (path.is_file() or _pipe_or_socket(path)):  # a video in /dev/shm is a file
        # Like a camera index, a device path that is not there is waited for: a USB camera may be
        # unplugged at start, or enumerate after the service.
        return "camera", str(path)
    _check_readable_file(path, text)
    # By content, not by name: a photo saved without its suffix, or as .gif, is still one image.
    kind = "image" if cv2.haveImageReader(str(path)) or path.suffix.lower() in IMAGE_SUFFIXES else "video"
    return kind, str(path)


def _camera_index(text: str) -> int:
    if len(text) > 10 or int(text) > MAX_CAMERA_INDEX:  # int() itself refuses 4300 digits
        raise SourceError(f"camera index too large: {text[:20]}{'…' if len(text) > 20 else ''} "
                          f"(cameras are numbered from 0; /dev/video2 is 2)")
    return int(text)


def _expanded(text: str) -> Path:
    """The path `text` names, with ~ expanded."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # pathlib's "Could not determine home directory"
        home = text.split("/")[0]
        why = f"no user {home[1:]} on this machine" if len(home) > 1 else "no home directory known for ~"
        raise SourceError(f"source not found: {text} ({why})") from None


def _check_readable_file(path: Path, text: str) -> None:
    """SourceError unless `path` is a file this user may read."""
    try:
        if not path.exists():
            raise SourceError(f"source not found: {text} (expected a camera index, an image or video file, "
                              "or an rtsp:// or http(s):// URL)")
        if path.is_dir():
            raise SourceError(f"source is a directory, not a file: {text}")
        if special := _pipe_or_socket(path):  # opening a FIFO waits for a writer, maybe forever
            raise SourceError(f"source is {special}, not a file: {text}")
        with path.open("rb"):
            pass
    except PermissionError:
        raise SourceError(f"source not readable (permission denied): {text}") from None
    except OSError as exc:  # a name too long, a folder on the way that cannot be entered
        raise SourceError(f"cannot open source {text}: {exc.strerror or exc}") from None


def _pipe_or_socket(path: Path) -> str | None:
    """What `path` is if it is a named pipe or a socket: neither a file nor a camera device."""
    if path.is_fifo():
        return "a named pipe (FIFO)"
    return "a socket" if path.is_socket() else None


def check_file_source(kind: str, target: int | str) -> None:
    """SourceError unless an image or video file gives a frame: a file OpenCV opens can still hold
    none (a video of a header only), and a run on it would end at once, having done nothing."""
    # Whole: at an eighth of its size (IMREAD_REDUCED_*) a JPEG meets OpenCV's pixel limit only at
    # that size, and a progressive one's coefficients still take 1.2 GB at 20000x20000.
    if kind == "image" and read_image(target, cv2.IMREAD_GRAYSCALE) is None:
        raise SourceError(f"cannot read image {target}: not an image file OpenCV can decode")
    if kind == "video":
        source = VideoFileSource(str(target))  # its own one line for a file OpenCV cannot open
        try:
            first = source.read_here()
        finally:
            source.close()
        if first is None:
            raise SourceError(f"video {target} has no frame that can be decoded")


def check_video_file(video: str, command: str) -> None:
    """SourceError unless `video` is a video file with a frame to measure: what `command` needs."""
    kind, target = classify_source(video)  # one clear line for a missing file, a folder, a URL
    if kind != "video":
        raise SourceError(f"{command} needs a video file; {video} is {'an' if kind == 'image' else 'a'} {kind}")
    check_file_source(kind, target)


# What make_source has said it ignores, and for which source.
_SAID_IGNORED: set[tuple[str, ...]] = set()


def make_source(source: str, camera=None, *, realtime: bool = False, loop: bool = False,
                start_index: int = 0) -> FrameSource:
    """The frame source for a --source string, configured from the camera section (`start_index`:
    where a video file starts). A camera or stream is made paused: it is opened by `resume()`, once
    the agent knows that analysis is on (Agent.run)."""
    kind, target = classify_source(source)
    if kind == "video":
        check_file_source(kind, target)
        return VideoFileSource(str(target), realtime=realtime, loop=loop, start_index=start_index)
    ignored = [flag for flag, given in (("--realtime", realtime), ("--loop", loop)) if given]
    if ignored and (source, *ignored) not in _SAID_IGNORED:  # said once, not at every reload
        _SAID_IGNORED.add((source, *ignored))
        logger.warning("%s: for video files only; ignored for %s %s", " and ".join(ignored),
                       "an image" if kind == "image" else "a live source", redact_url(str(target)))
    if kind == "image":
        return ImageSource(str(target))
    if camera_device_missing(kind, target):
        logger.warning("camera device %s is not present (yet): waiting for it", camera_device(target))
    options = {}
    if camera is not None:
        options = dict(width=camera.width, height=camera.height, fps=camera.fps,
                       retry_initial_s=camera.retry_initial_s, retry_max_s=camera.retry_max_s,
                       stall_timeout_s=camera.stall_timeout_s)
    return LiveSource(target, paused=True, **options)
