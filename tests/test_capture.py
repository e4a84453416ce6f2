import logging
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from agent.capture import ImageSource, LiveSource, VideoFileSource, camera_device, classify_source, make_source
from agent.errors import SourceError
from agent.types import CAMERA_STATUSES
from tests.conftest import face_jpeg, wait_until


def write_video(path, frames: int = 30, fps: float = 10.0, size=(64, 48)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for i in range(frames):
        image = np.full((size[1], size[0], 3), (i * 8) % 256, np.uint8)
        writer.write(image)
    writer.release()
    return path


def damage_frames(path, frames):
    """`path` with the JPEG of each of these frames zeroed, its AVI chunk left whole: as a bad
    block leaves it, the frame fails to decode and the frames after it still do."""
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]
    for frame in frames:
        end = data.rindex(b"\xff\xd9", starts[frame], starts[frame + 1]) + 2
        data[starts[frame]:end] = bytes(end - starts[frame])
    path.write_bytes(bytes(data))
    return path


def test_video_file_yields_every_frame_with_video_timestamps(tmp_path):
    source = VideoFileSource(str(write_video(tmp_path / "clip.avi", frames=30, fps=10)))
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    assert len(frames) == 30
    assert [f.index for f in frames] == list(range(30))
    assert frames[-1].timestamp == pytest.approx(2.9)
    assert source.status() == "ended" and source.dropped() == 0
    assert source.read() is None


@pytest.mark.parametrize("loop", [False, True])
def test_reading_on_the_callers_thread_gives_the_same_frames_and_starts_no_thread(tmp_path, loop):
    clip = str(write_video(tmp_path / "clip.avi", frames=12, fps=10))
    threaded, here = VideoFileSource(clip, loop=loop), VideoFileSource(clip, loop=loop)
    for _ in range(20 if loop else 13):  # past the end: None, or the file again from its start
        a, b = threaded.read(), here.read_here()
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.index, a.timestamp) == (b.index, b.timestamp)
            assert np.array_equal(a.image, b.image)
    assert here._thread is None and threaded._thread is not None
    for source in (threaded, here):
        source.close()


def test_looping_video_starts_over(tmp_path):
    source = VideoFileSource(str(write_video(tmp_path / "clip.avi", frames=5)), loop=True)
    got = [source.read() for _ in range(12)]
    assert all(f is not None for f in got)
    assert got[-1].index == 11


def test_image_source_is_one_still_frame(smiling_photo):
    source = ImageSource(str(smiling_photo))
    frame = source.read()
    assert frame.image.shape == (512, 512, 3) and source.still
    assert source.read() is None


@pytest.fixture
def live_source():
    """Starts LiveSources; closed after the test."""
    made: list[LiveSource] = []

    def make(target, **kwargs) -> LiveSource:
        made.append(LiveSource(target, **kwargs))
        return made[-1]

    yield make
    for source in made:
        source.close()


def test_live_source_hands_out_only_the_newest_frame_and_counts_the_rest(tmp_path, live_source):
    # A real VideoCapture on a file read as fast as it decodes stands in for a fast camera.
    clip = write_video(tmp_path / "clip.avi", frames=200, fps=30)
    source = live_source(str(clip), retry_initial_s=0.05, retry_max_s=0.1)
    first = source.read(timeout=5)
    assert first is not None
    time.sleep(0.3)  # a slow consumer
    second = source.read(timeout=5)
    assert second.index > first.index + 1, "a stale frame was handed out"
    assert source.dropped() > 0


def test_live_source_reopens_after_the_stream_ends_and_says_when_it_is_back(tmp_path, caplog, live_source):
    clip = write_video(tmp_path / "clip.avi", frames=10, fps=30)
    with caplog.at_level(logging.INFO, logger="agent.capture"):
        source = live_source(str(clip), retry_initial_s=0.05, retry_max_s=0.1)
        seen = set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(seen) < 15:
            frame = source.read(timeout=1)
            if frame is not None:
                seen.add(frame.index)
        assert len(seen) >= 15, "the source did not come back after the end of the stream"
    said = [r.getMessage() for r in caplog.records]
    went = [i for i, line in enumerate(said) if "reconnecting (it stopped giving frames" in line]
    back = [i for i, line in enumerate(said) if line.endswith(": ok")]
    assert went and back and back[-1] > went[0], said


def test_live_source_that_cannot_open_keeps_retrying_and_says_so(tmp_path, caplog, live_source):
    with caplog.at_level(logging.WARNING, logger="agent.capture"):
        source = live_source(str(tmp_path / "unplugged.avi"), retry_initial_s=0.05, retry_max_s=0.1)
        assert source.read(timeout=0.5) is None
        assert source.status() == "reconnecting"
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1, "one line when it goes, not one per retry"
    assert "reconnecting (cannot open it" in said[0] and "up to every 0.1 s" in said[0]


@pytest.mark.parametrize("text, kind", [
    ("0", "camera"), ("2", "camera"), ("rtsp://cam.local/stream", "stream"), ("http://cam/mjpg", "stream"),
    ("HTTPS://cam/mjpg", "stream"),
])
def test_source_kinds(text, kind):
    assert classify_source(text)[0] == kind


def test_file_source_kinds(tmp_path, smiling_photo):
    assert classify_source(str(smiling_photo)) == ("image", str(smiling_photo))
    assert classify_source(str(write_video(tmp_path / "a.avi")))[0] == "video"


@pytest.mark.parametrize("make, message", [
    (lambda tmp: str(tmp / "missing.mp4"), "source not found"),
    (lambda tmp: str(tmp), "source is a directory"),
    (lambda tmp: "~no-such-user-emotion-agent/x.mp4", r"source not found: .* \(no user no-such-user-emotion-agent "),
    (lambda tmp: unix_socket(tmp / "sock"), "source is a socket, not a file"),
])
def test_unusable_source_is_one_line(tmp_path, make, message):
    with pytest.raises(SourceError, match=message):
        make_source(make(tmp_path))


def unix_socket(path) -> str:
    import socket

    socket.socket(socket.AF_UNIX).bind(str(path))  # the file stays after the socket is closed
    return str(path)


@pytest.mark.parametrize("source", ["/dev/video99", "99"])  # an index opens /dev/video<index> on Linux
def test_a_missing_camera_device_is_waited_for_like_an_unplugged_camera(caplog, source):
    source = make_source(source, None)
    try:
        assert source.live and source.status() == "paused"  # opened by the agent once analysis is on
        source.resume()
        assert source.read(timeout=0.3) is None
        assert source.status() in ("starting", "reconnecting")
    finally:
        source.close()
    assert "camera device /dev/video99 is not present (yet)" in caplog.text



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="V4L2's device names")
@pytest.mark.parametrize("target, device", [
    (0, "/dev/video0"), (99, "/dev/video99"),
    # OpenCV takes an index's hundreds for the backend to use (VideoCapture(CAP_V4L2 + 3)): 203 opens
    # /dev/video3 and 103 none at all. "/dev/video203 is not present" was said with /dev/video3 there.
    (203, "/dev/video3"), (103, None), (1903, None),
    ("/dev/video5", "/dev/video5"),
])
def test_the_camera_device_is_the_one_opencv_opens(target, device):
    assert camera_device(target) == device

@pytest.mark.parametrize("name", ["photo", "photo.mp4", "photo.gif"])
def test_a_photo_is_an_image_whatever_its_name(tmp_path, smiling_photo, name):
    import shutil

    renamed = tmp_path / name
    if name.endswith(".gif"):
        pil = pytest.importorskip("PIL.Image")
        pil.open(smiling_photo).save(renamed)
    else:
        shutil.copy(smiling_photo, renamed)
    assert classify_source(str(renamed)) == ("image", str(renamed))


def test_a_truncated_video_says_so_and_yields_what_it_has(tmp_path, caplog):
    clip = write_video(tmp_path / "clip.avi", frames=100)
    data = clip.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    source = VideoFileSource(str(cut))
    frames = 0
    while source.read() is not None:
        frames += 1
    source.close()
    assert 10 < frames < 100
    assert f"ended after {frames} of its 100 frames" in caplog.text


@pytest.mark.parametrize("here", [False, True], ids=["read", "read_here"])
def test_a_frame_that_cannot_be_decoded_is_counted_and_the_rest_of_the_video_follows(tmp_path, caplog, here):
    # The failed read used to be taken for the end: the run stopped there, with exit 0.
    source = VideoFileSource(str(damage_frames(write_video(tmp_path / "clip.avi", frames=30), [12])))
    frames = []
    while (frame := source.read_here() if here else source.read()) is not None:
        frames.append(frame)
    source.close()
    assert [f.index for f in frames] == [i for i in range(30) if i != 12]
    after = next(f for f in frames if f.index == 13)
    assert int(after.image[0, 0, 0]) == pytest.approx(13 * 8, abs=3) and after.timestamp == pytest.approx(1.3)
    assert source.corrupt() == 1
    assert "frame 12 cannot be decoded; skipped" in caplog.text and "ended after" not in caplog.text


def test_a_looped_video_skips_its_damaged_frame_on_every_pass(tmp_path):
    # Indices go on growing across passes: the second pass took its failed read for the end.
    source = VideoFileSource(str(damage_frames(write_video(tmp_path / "clip.avi", frames=30), [12])), loop=True)
    try:
        indices = [source.read_here().index for _ in range(29 * 3)]
    finally:
        source.close()
    assert indices == [i for i in range(90) if i % 30 != 12]
    assert source.corrupt() == 3


def test_a_video_resumed_past_a_damaged_frame_starts_at_the_right_frame(tmp_path):
    video = damage_frames(write_video(tmp_path / "clip.avi", frames=30), [12])
    source = VideoFileSource(str(video), start_index=20)
    try:
        first = source.read()
    finally:
        source.close()
    assert first.index == 20 and int(first.image[0, 0, 0]) == pytest.approx(20 * 8, abs=3)
    # The run that got this far counted frame 12: a reload does not count it again.
    assert source.corrupt() == 0


@pytest.mark.parametrize("name", ["cam1-12:30.mp4", "2024-01-01T12:30:00.mp4"])
def test_a_relative_file_name_with_a_colon_is_a_file_not_a_protocol(tmp_path, monkeypatch, name):
    # FFmpeg took "cam1-12" for a protocol: "not a video file OpenCV can decode".
    writer = cv2.VideoWriter(str(tmp_path / name), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV cannot write MPEG-4")
    for _ in range(5):
        writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    monkeypatch.chdir(tmp_path)
    source = make_source(name)
    try:
        assert source.read() is not None
    finally:
        source.close()
    with pytest.raises(SourceError) as refused:  # messages keep the name as given
        VideoFileSource(name + ".missing")
    assert str(refused.value).startswith(f"cannot open video {name}.missing: ")


def test_corrupt_video_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(SourceError, match="cannot open video"):
        make_source(str(bad))


def test_corrupt_image_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(SourceError, match="cannot read image"):
        make_source(str(bad))


def test_a_jpeg_cut_short_is_read_but_named_as_damaged(tmp_path, smiling_photo, caplog):
    whole = smiling_photo.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) // 3])
    with caplog.at_level(logging.WARNING, logger="agent.capture"):
        ImageSource(str(smiling_photo))
        assert not caplog.records
        frame = ImageSource(str(cut)).read()
    assert frame is not None and frame.image.shape == cv2.imread(str(smiling_photo)).shape
    assert [r.getMessage() for r in caplog.records] == [f"image {cut} is damaged (a JPEG cut short): its lower part is blank"]


def test_a_stream_password_stays_out_of_the_log(tmp_path, caplog, live_source):
    url = "rtsp://admin:S3cret@192.168.1.20:554/stream1?channel=1"
    missing = str(tmp_path / "nothing.avi")  # a real capture that cannot open, standing in for the camera
    with caplog.at_level(logging.INFO, logger="agent.capture"):
        source = live_source(url, retry_initial_s=0.05, retry_max_s=0.1,
                             open_capture=lambda target: cv2.VideoCapture(missing))
        assert source.read(timeout=0.3) is None
    assert "stream rtsp://admin:***@192.168.1.20:554/stream1?channel=1: reconnecting" in caplog.text
    assert "S3cret" not in caplog.text


def test_loop_and_realtime_are_said_to_be_ignored_where_they_do_nothing(tmp_path, smiling_photo, caplog):
    video = tmp_path / "clip.avi"
    write_video(video, 3)
    with caplog.at_level(logging.WARNING, logger="agent.capture"):
        make_source(str(video), None, realtime=True, loop=True).close()
        assert not caplog.records  # a video file uses both
        for _ in range(2):  # a reload builds the source again: said once
            make_source(str(smiling_photo), None, loop=True).close()
        camera = make_source("/dev/video99", None, realtime=True, loop=True)
        camera.close()
    said = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(said) == 2
    assert f"--loop: for video files only; ignored for an image {smiling_photo}" in said
    assert "--realtime and --loop: for video files only; ignored for a live source /dev/video99" in said


def test_a_video_can_start_at_a_frame_with_its_own_indexes_and_times(tmp_path):
    video = write_video(tmp_path / "clip.avi", 30, fps=10.0)
    source = VideoFileSource(str(video), start_index=12)
    try:
        frames = []
        while (frame := source.read()) is not None:
            frames.append(frame)
    finally:
        source.close()
    assert [f.index for f in frames] == list(range(12, 30))
    assert frames[0].timestamp == pytest.approx(1.2)
    # The pixels are those of frame 12 (each frame of the clip has its own grey level).
    assert int(frames[0].image[0, 0, 0]) == pytest.approx((12 * 8) % 256, abs=3)


# --- a live MJPEG stream over HTTP, served as an ESP32-CAM serves it ---------------------------------

def frame_from(source: LiveSource, timeout: float = 5.0):
    frame = source.read(timeout=timeout)
    assert frame is not None, f"no frame in {timeout} s (status {source.status()})"
    return frame


@pytest.mark.parametrize("content_length", [True, False])
def test_an_esp32_mjpeg_stream_is_read_with_or_without_content_length(mjpeg_server, content_length, live_source):
    server = mjpeg_server([face_jpeg()], fps=20, content_length=content_length)
    source = live_source(server.url)
    frames = [frame_from(source) for _ in range(5)]
    assert all(f.image.shape == (512, 512, 3) for f in frames)
    assert frames[-1].index > frames[0].index and source.status() == "ok" and source.corrupt() == 0


@pytest.mark.parametrize("stall", [
    pytest.param(lambda server: server.stall(), id="nothing-sent"),
    # FFmpeg reads on for the length a part claims (here the next 100 MB of the stream), growing the
    # part as it comes: no frame until the read gives up at the stall timeout, as for a stall.
    pytest.param(lambda server: server.send_next(face_jpeg(), "99999999"), id="a-part-claiming-100-MB"),
])
def test_a_stream_that_stalls_with_its_connection_open_is_reported_and_reopened(mjpeg_server, caplog, stall, live_source):
    # FFmpeg's read waited 30 s on a stalled stream, and all that while the camera showed "ok".
    server = mjpeg_server([face_jpeg()], fps=20)
    with caplog.at_level(logging.INFO, logger="agent.capture"):
        # 0.2 s to the first retry: "reconnecting" lasts long enough to be seen where it reopens at once.
        source = live_source(server.url, retry_initial_s=0.2, retry_max_s=0.2, stall_timeout_s=1)
        frame_from(source)
        stall(server)
        assert wait_until(lambda: source.status() == "reconnecting", timeout=5) < 3
        server.resume()
        # Not the next frame read: one captured before the stall may still be waiting, unread.
        wait_until(lambda: source.status() == "ok", timeout=10)
        frame_from(source)
        assert server.connections >= 2
    said = [r.getMessage() for r in caplog.records]
    assert [line for line in said if "reconnecting" in line] == [
        f"stream {server.url}: reconnecting (it stopped giving frames; retrying with backoff up to every 0.2 s)"]
    assert said[-1] == f"stream {server.url}: ok"


def test_the_statuses_sources_report_are_the_ones_home_assistant_is_offered(mjpeg_server, tmp_path, live_source):
    # HA's enum sensor rejects a state missing from its options: every status must be among them.
    server = mjpeg_server([face_jpeg()], fps=20)
    stream = live_source(server.url, retry_initial_s=0.05, retry_max_s=0.2, stall_timeout_s=1)
    seen = [stream.status()]
    frame_from(stream)
    seen.append(stream.status())
    server.stall()
    wait_until(lambda: stream.status() != "ok", timeout=5)
    seen.append(stream.status())
    stream.pause()
    seen.append(stream.status())
    video = VideoFileSource(str(write_video(tmp_path / "clip.avi", frames=3)))
    seen.append(video.status())
    while video.read() is not None:
        pass
    seen.append(video.status())
    assert seen == ["starting", "ok", "reconnecting", "paused", "ok", "ended"]
    assert set(seen) == set(CAMERA_STATUSES)


def test_closing_a_source_blocked_in_a_stalled_read_does_not_wait_for_the_read(mjpeg_server):
    # It waited 5 s, so a SIGTERM took longer than that to end the daemon.
    server = mjpeg_server([face_jpeg()], fps=20)
    source = LiveSource(server.url, stall_timeout_s=30)
    frame_from(source)
    server.stall()
    time.sleep(0.3)  # the capture thread is now in a read that waits for the stream
    started = time.monotonic()
    source.close()
    assert time.monotonic() - started < 2
    assert source.read(timeout=0.1) is None


@pytest.mark.parametrize("path, why", [
    ("/capture.jpg", "the server answered 404 Not Found"),  # a wrong path
    ("/", "the server's answer is not a video stream (Content-Type text/html)"),  # the camera's web page
])
@pytest.mark.parametrize("login", ["", "admin:S3cret@"])
def test_a_stream_url_that_answers_without_video_says_what_the_server_answered(mjpeg_server, caplog, live_source,
                                                                                  path, why, login):
    # Both were "cannot open it: unplugged, busy, or nothing listening there", with the server up.
    server = mjpeg_server([face_jpeg()], fps=20)
    url = f"http://{login}127.0.0.1:{server.port}{path}"
    with caplog.at_level(logging.INFO, logger="agent.capture"):
        source = live_source(url, retry_initial_s=0.05, retry_max_s=0.1)
        assert wait_until(lambda: source.status() == "reconnecting", timeout=10) < 10
    shown = url.replace("S3cret", "***")
    assert [r.getMessage() for r in caplog.records] == [
        f"stream {shown}: reconnecting (cannot open it: {why}; retrying with backoff up to every 0.1 s)"]


def test_a_stream_url_with_nothing_listening_says_so(caplog, live_source):
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/stream"
    with caplog.at_level(logging.INFO, logger="agent.capture"):
        source = live_source(url, retry_initial_s=0.05, retry_max_s=0.1)
        assert wait_until(lambda: source.status() == "reconnecting", timeout=10) < 10
    assert "reconnecting (cannot open it: no connection (Connection refused); retrying" in caplog.text


def test_a_stream_url_whose_server_speaks_no_http_is_said_and_the_capture_goes_on(caplog, live_source):
    # An RTSP server on the port of an http:// URL: the probe's BadStatusLine killed the capture
    # thread, which then never retried.
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    answered = threading.Event()

    def answer_like_rtsp():
        listener.settimeout(10)
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            client.recv(4096)
            client.sendall(b"RTSP/1.0 400 Bad Request\r\n\r\n")
            client.close()
            answered.set()

    threading.Thread(target=answer_like_rtsp, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/stream"
    try:
        with caplog.at_level(logging.INFO, logger="agent.capture"):
            source = live_source(url, retry_initial_s=0.05, retry_max_s=0.1)
            assert wait_until(lambda: source.status() == "reconnecting", timeout=10) < 10
            answered.clear()
            assert answered.wait(5), "the capture thread stopped retrying"
    finally:
        listener.close()
    assert "reconnecting (cannot open it: the server's answer is not HTTP (BadStatusLine); retrying" in caplog.text


def test_a_stream_that_reboots_comes_back_with_one_line_each_way(mjpeg_server, caplog, live_source):
    server = mjpeg_server([face_jpeg()], fps=20)
    with caplog.at_level(logging.INFO, logger="agent.capture"):
        source = live_source(server.url, retry_initial_s=0.1, retry_max_s=0.4)
        first = frame_from(source)
        server.down()  # connection reset, then refused
        wait_until(lambda: source.status() == "reconnecting", timeout=5)
        time.sleep(1.5)  # several refused reopens
        server.up()
        assert wait_until(lambda: source.status() == "ok", timeout=5) < 1.5  # the wait is at most retry_max_s
        assert frame_from(source).index > first.index
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"stream {server.url}: ok",
                    f"stream {server.url}: reconnecting (it stopped giving frames; retrying with backoff up to every 0.4 s)",
                    f"stream {server.url}: ok"]


@pytest.mark.parametrize("damage", [
    pytest.param(lambda good: good[: len(good) // 3], id="cut-short"),  # was handed out with its lower part grey
    pytest.param(lambda good: bytes(range(256)) * 20, id="not-a-jpeg"),  # was skipped, but not counted
    pytest.param(lambda good: b"", id="empty"),  # five in a row were taken for a lost stream, and not counted
])
def test_damaged_parts_of_a_stream_are_skipped_quietly_and_counted(mjpeg_server, damage, caplog, capfd, live_source):
    good = face_jpeg()
    server = mjpeg_server([good], fps=20)
    source = live_source(server.url)
    frame_from(source)
    for _ in range(6):  # more than the failed reads in a row that mean the stream is gone
        server.send_next(damage(good))
    sent = server.sent
    wait_until(lambda: server.sent > sent + 9, timeout=5)
    after = frame_from(source)
    assert source.corrupt() == 6
    whole = cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(after.image, whole)
    assert source.status() == "ok" and server.connections == 1  # the same connection goes on
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # Rejected before decoding: libjpeg, which writes to stderr (the journal) for a part it
    # decodes, never sees them.
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("length", ["0", "-1", "none", "3000000000"])
def test_a_part_whose_content_length_makes_no_sense_is_read_to_its_boundary(mjpeg_server, length, caplog, live_source):
    # FFmpeg, which splits the stream into parts, takes such a length for none given.
    server = mjpeg_server([face_jpeg()], fps=20)
    source = live_source(server.url)
    frame_from(source)
    server.send_next(face_jpeg(), length)
    sent = server.sent
    wait_until(lambda: server.sent > sent + 3, timeout=5)
    frame_from(source)
    assert source.corrupt() == 0 and server.connections == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_stream_whose_frame_size_changes_gives_frames_of_the_new_size(mjpeg_server, live_source):
    # FFmpeg scaled every frame to the first one's size: a camera switched to a wider frame size
    # in its web page came out squashed, until the next reconnect.
    from tests.conftest import astronaut_bgr
    from tests.mjpeg_server import jpeg

    photo = astronaut_bgr()
    wide = np.hstack([photo, photo[:, ::-1]])
    server = mjpeg_server([jpeg(photo)], fps=20)
    source = live_source(server.url)
    assert frame_from(source).image.shape == (512, 512, 3)
    server.frames = [jpeg(wide)]
    sent = server.sent
    wait_until(lambda: server.sent > sent + 3, timeout=5)
    after = frame_from(source)
    assert after.image.shape == (512, 1024, 3)
    assert np.abs(after.image.astype(int) - wide).mean() < 3  # the picture as sent, not scaled
    assert server.connections == 1
