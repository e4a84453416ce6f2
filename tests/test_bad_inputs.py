"""Bad inputs a user can give the daemon's commands: each is one line on stderr and an exit code.

Found by a sweep of bad inputs; each used to end in a traceback, a crash, or a run that did nothing
and said it was fine. Run as a user would, in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_capture import write_video

REPO = Path(__file__).resolve().parents[1]


def agent(*args: str | bytes, stdout=subprocess.PIPE, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], stdout=stdout, stderr=subprocess.PIPE,
                          timeout=timeout, cwd=REPO)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("emotion-agent:")]
    assert len(lines) == 1, err
    return lines[0]


def header_only_video(tmp_path: Path) -> Path:
    path = write_video(tmp_path / "empty.avi", frames=0)
    assert path.stat().st_size > 0
    return path


def test_a_file_name_that_is_not_utf8_is_refused_before_opencv_crashes_on_it(tmp_path):
    # OpenCV segfaults on Python's stand-ins for such bytes: exit 139, nothing said.
    result = agent("run", "--source", b"v\xff.mp4")
    assert result.returncode == 2
    assert "not valid UTF-8" in one_line_error(result)


def test_a_video_without_a_frame_is_refused_by_run_and_by_check_config(tmp_path):
    video = header_only_video(tmp_path)
    result = agent("run", "--source", str(video))
    assert result.returncode == 4
    assert "has no frame that can be decoded" in one_line_error(result)
    config = tmp_path / "config.yaml"
    config.write_text(f"source: {video}\n")
    result = agent("check-config", str(config))
    assert result.returncode == 2
    assert "has no frame that can be decoded" in one_line_error(result)


@pytest.mark.parametrize("source, message", [
    ("2147483648", "camera index too large"),   # OpenCV's capture thread died on it; run went on, idle
    ("a" * 300, "cannot open source"),          # ENAMETOOLONG
])
def test_sources_check_config_used_to_pass(tmp_path, source, message):
    config = tmp_path / "config.yaml"
    config.write_text(f"source: '{source}'\n")
    result = agent("check-config", str(config))
    assert result.returncode == 2
    assert message in one_line_error(result)


def test_output_that_cannot_be_written_is_one_line():
    with open("/dev/full", "wb") as full:
        result = agent("check-config", str(REPO / "config.yaml"), stdout=full)
    assert result.returncode == 1
    assert "No space left on device" in one_line_error(result)


def test_ctrl_c_during_the_runtime_import_is_not_taken_for_a_missing_runtime():
    # An extension module's initialisation reports a Ctrl-C as an ImportError caused by it; taken
    # for "not installed", the agent fell back to TensorFlow and ran on to the end.
    from agent.interpreter import _not_installed

    interrupted = ImportError("initialization failed")
    interrupted.__cause__ = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        _not_installed(interrupted)
    assert _not_installed(ImportError("No module named 'tflite_runtime'")) is None


def _commands() -> list[list[str]]:
    """`python -m agent`, and the installed `emotion-agent` script where this environment has one."""
    script = Path(sys.executable).with_name("emotion-agent")
    return [[sys.executable, "-m", "agent"]] + ([[str(script)]] if script.exists() else [])


@pytest.mark.parametrize("command", _commands(), ids=lambda c: Path(c[-1]).name)
def test_ctrl_c_while_the_command_starts_is_exit_130_without_a_traceback(tmp_path, command):
    # The first tenth of a second imports argparse, logging and PyYAML. A Ctrl-C then used to
    # print a traceback: the console script imported agent.cli before main's handlers ran.
    # Here a yaml module that interrupts its own import stands in for a quick finger.
    (tmp_path / "yaml.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    result = subprocess.run([*command, "check-config", str(REPO / "config.yaml")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, timeout=120, cwd=tmp_path)
    assert "Traceback" not in result.stderr.decode(), result.stderr.decode()
    assert result.returncode == 130


# Stands in for a Ctrl-C that lands while MODULE sets up its classes: a pydantic model of the config
# or a dataclass field of the pipeline (Python 3.11 reports one in a field's set-up as a
# RuntimeError caused by the Ctrl-C).
INTERRUPTING_SITECUSTOMIZE = """\
import dataclasses, os, signal
import pydantic
module, set_name = {module!r}, dataclasses.Field.__set_name__
def interrupt_once(owner):
    global module
    if owner.__module__ == module:
        module = None
        os.kill(os.getpid(), signal.SIGINT)
def interrupting(field, owner, name):
    interrupt_once(owner)
    return set_name(field, owner, name)
dataclasses.Field.__set_name__ = interrupting
pydantic.BaseModel.__pydantic_init_subclass__ = classmethod(lambda cls, **kwargs: interrupt_once(cls))
"""


@pytest.mark.parametrize("command", _commands(), ids=lambda c: Path(c[-1]).name)
@pytest.mark.parametrize("module", ["agent.config", "agent.pipeline"])  # the script's import; run's own
def test_ctrl_c_while_a_module_sets_up_its_classes_is_exit_130_without_a_traceback(tmp_path, command, module):
    # On Python 3.11 it was a traceback at agent.config and an "internal error ... please report it"
    # at agent.pipeline, both exit 1.
    (tmp_path / "sitecustomize.py").write_text(INTERRUPTING_SITECUSTOMIZE.format(module=module))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    result = subprocess.run([*command, "run", "--source", "missing.mp4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=120, cwd=tmp_path)
    err = result.stderr.decode()
    assert "Traceback" not in err and "internal error" not in err, err
    assert result.returncode == 130, err


def test_eval_reads_a_face_whose_file_name_is_not_utf8(tmp_path):
    # cv2.imread segfaulted on the name; the bytes are now read by Python and decoded by OpenCV.
    import cv2
    import numpy as np

    folder = tmp_path / "faces" / "happy"
    folder.mkdir(parents=True)
    ok, encoded = cv2.imencode(".png", np.full((48, 48), 128, np.uint8))
    for name in (b"plain.png", b"caf\xe9.png"):
        with open(bytes(folder) + b"/" + name, "wb") as f:
            f.write(encoded.tobytes())
    result = agent("eval", str(tmp_path / "faces"), "--json")
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert (report["count"], report["unreadable"]) == (2, 0)


def test_a_camera_index_of_thousands_of_digits_is_one_line():
    result = agent("run", "--source", "9" * 5000)  # int() itself refuses it
    assert result.returncode == 4
    assert "camera index too large" in one_line_error(result)


def test_a_model_that_cannot_load_is_the_only_line_on_stderr(tmp_path):
    # The runtime's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." used to come first.
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a model")
    config = tmp_path / "config.yaml"
    config.write_text(f"classifier:\n  model: {junk}\n")
    result = agent("check-config", str(config))
    assert result.returncode == 3
    assert result.stderr.decode().splitlines() == [one_line_error(result)]
    assert "cannot load model" in result.stderr.decode()


@pytest.mark.parametrize("size", [(7, 7), (100, 5), (1, 1)])
def test_check_config_takes_a_tiny_image(tmp_path, size):
    # Its cheap check read the image at an eighth of its size, which OpenCV refuses below 8 pixels.
    import cv2
    import numpy as np

    image = tmp_path / "tiny.png"
    cv2.imwrite(str(image), np.zeros((size[1], size[0], 3), np.uint8))
    config = tmp_path / "config.yaml"
    config.write_text(f"source: {image}\n")
    result = agent("check-config", str(config))
    assert result.returncode == 0, result.stderr.decode()
    assert ": image" in result.stdout.decode()


def test_a_video_file_under_dev_is_a_file_not_a_camera(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    video = write_video(shm / f"emotion-agent-test-{os.getpid()}.avi", frames=5)
    try:
        config = tmp_path / "config.yaml"
        config.write_text(f"source: {video}\n")
        result = agent("check-config", str(config))
        assert result.returncode == 0, result.stderr.decode()
        assert ": video" in result.stdout.decode()
    finally:
        video.unlink()


def test_a_closed_stdout_is_not_an_internal_error():
    result = subprocess.run(f"{sys.executable} -m agent check-config config.yaml >&-", shell=True, cwd=REPO,
                            stderr=subprocess.PIPE, timeout=120)
    assert "internal error" not in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_a_flush_timeout_of_zero_is_refused_up_front():
    result = agent("run", "--source", "0", "--flush-timeout", "0")
    assert result.returncode == 2
    assert "--flush-timeout: expected a number of seconds above 0" in result.stderr.decode()


def test_relative_files_in_a_config_are_found_from_its_folder_by_check_config_and_run(tmp_path, broker):
    # The service runs in /var/lib/emotion-agent with its config in /etc/emotion-agent: check-config,
    # run beside the config, said OK; the service said "file not found", exit 2, and stayed down.
    etc = tmp_path / "etc"
    etc.mkdir()
    write_video(etc / "clip.avi", frames=5)
    (etc / "mqtt_password").write_text("secret\n")
    config = etc / "config.yaml"
    config.write_text(f"source: clip.avi\nmqtt:\n  port: {broker.port}\n  username: alice\n"
                      "  password_file: mqtt_password\n")
    for command in (["check-config", str(config)], ["run", "--config", str(config)]):
        result = agent(*command)  # in the repository, not in etc
        assert result.returncode == 0, result.stderr.decode()
    assert f"source {etc / 'clip.avi'}: video" in agent("check-config", str(config)).stdout.decode()


def _source_through(command: str, source: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`command` (run, check-config, bench) given `source`, as a user would; stopped after 60 s."""
    if command == "check-config":
        config = tmp_path / "config.yaml"
        config.write_text(f"source: '{source}'\n")
        return agent("check-config", str(config), timeout=60)
    if command == "bench":
        return agent("bench", source, "--no-classic", "--rounds", "1", timeout=60)
    return agent("run", "--source", source, "--mqtt-port", "1", "--flush-timeout", "1", timeout=60)


@pytest.mark.parametrize("command, code", [("run", 4), ("check-config", 2), ("bench", 4)])
def test_a_home_directory_of_no_user_is_one_line(tmp_path, command, code):
    # pathlib's RuntimeError ("Could not determine home directory") was an internal error.
    result = _source_through(command, "~no-such-user-emotion-agent/x.mp4", tmp_path)
    assert result.returncode == code
    assert "no user no-such-user-emotion-agent on this machine" in one_line_error(result)


@pytest.mark.parametrize("command, code", [("run", 4), ("check-config", 2), ("bench", 4)])
@pytest.mark.parametrize("under_dev", [False, True], ids=["tmp", "dev-shm"])
def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path, command, code, under_dev):
    # Opening it to check it was readable waited for a writer, silently, for ever; under /dev it
    # was taken for a camera.
    folder = Path("/dev/shm") if under_dev else tmp_path
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        pytest.skip(f"no writable {folder}")
    fifo = folder / f"emotion-agent-test-{os.getpid()}.fifo"
    os.mkfifo(fifo)
    try:
        result = _source_through(command, str(fifo), tmp_path)
    finally:
        fifo.unlink()
    assert result.returncode == code
    assert "is a named pipe (FIFO), not a file" in one_line_error(result)


@pytest.mark.parametrize("args, says", [
    (["run", "--mqtt-port", "abc"], "emotion-agent run: error: argument --mqtt-port: expected a port number"),
    (["run", "--bogus"], "emotion-agent: error: unrecognized arguments: --bogus"),
    (["eval"], "emotion-agent eval: error: the following arguments are required: DIR"),
    ([], "emotion-agent: error: the following arguments are required: COMMAND"),
])
def test_a_usage_error_is_one_line_that_points_to_help(args, says):
    result = agent(*args)
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines  # argparse's own error is the usage block, then the reason
    assert lines[0].startswith(says) and lines[0].endswith("--help)"), lines


def _gray_png(path: Path) -> Path:
    import cv2
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((48, 48), 128, np.uint8))
    return path


@pytest.mark.parametrize("pipe, message", [
    ("marks.xml", "cannot read imglab XML {tmp}/marks.xml: not a file"),
    ("a.png", "cannot read image {tmp}/a.png named in the XML: not a file"),
])
def test_a_named_pipe_for_eval_faces_is_refused_without_waiting_for_a_writer(tmp_path, pipe, message):
    # The XML parser, or OpenCV for an image the XML names, waited for a writer, for ever.
    (tmp_path / "marks.xml").write_text("<dataset><images><image file='a.png'/></images></dataset>")
    (tmp_path / pipe).unlink(missing_ok=True)
    os.mkfifo(tmp_path / pipe)
    result = agent("eval", "--faces", str(tmp_path / "marks.xml"), timeout=30)
    assert result.returncode == 4
    assert one_line_error(result).endswith(message.format(tmp=tmp_path))


def png_header_claiming(width: int, height: int) -> bytes:
    """A small PNG file whose header claims `width` x `height` pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
            + chunk(b"IEND", b""))


def progressive_jpeg_claiming(width: int, height: int) -> bytes:
    """A small progressive JPEG whose frame header claims `width` x `height` pixels."""
    import struct

    import cv2
    import numpy as np

    ok, data = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    data = bytearray(data.tobytes())
    struct.pack_into(">HH", data, data.index(b"\xff\xc2") + 5, height, width)
    return bytes(data)


def tiff_header_claiming(width: int, height: int) -> bytes:
    """A TIFF file of one strip whose header claims `width` x `height` 8-bit gray pixels, with no data."""
    import struct

    tags = [(256, width), (257, height), (258, 8), (259, 1), (262, 1), (273, 8), (277, 1), (278, height),
            (279, width * height)]
    entries = b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in tags)  # LONG values
    return b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0)


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize("name, claiming", [
    # A 1.2 MB PNG of 20000x20000 pixels took run 2.4 GB, which would get a Pi's agent killed for
    # memory; under OpenCV's own limit (2^30 pixels), nothing refused it.
    ("bomb.png", png_header_claiming),
    # Read at an eighth of its size, as check-config did, a JPEG met the limit at that size only,
    # and a progressive one's coefficients took 1.2 GB.
    ("bomb.jpg", progressive_jpeg_claiming),
    # libtiff tried to read 400 MB (of a 114-byte file) and said so in six lines.
    ("bomb.tif", tiff_header_claiming),
])
def test_a_picture_too_large_to_decode_is_refused_unread(tmp_path, command, name, claiming):
    image = tmp_path / name
    image.write_bytes(claiming(20000, 20000))
    config = tmp_path / "config.yaml"
    config.write_text(f"source: {image}\nmqtt:\n  port: 9\n")
    result = agent(*(["run", "--config", str(config)] if command == "run" else ["check-config", str(config)]))
    assert result.returncode == (4 if command == "run" else 2)
    assert one_line_error(result).endswith(f"cannot read image {image}: its header claims more than the 100 million "
                                           f"pixels the agent decodes; a smaller copy will do (faces need far "
                                           f"fewer pixels)")
    assert result.stderr.decode().count("\n") == 1


@pytest.mark.parametrize("make_bad, said", [
    # OpenCV opened it and waited for a writer: eval hung, silently, for ever.
    pytest.param(lambda path: os.mkfifo(path), None, id="named-pipe"),
    # One such file among thousands ended the whole eval with exit 4; others it cannot read are skipped.
    pytest.param(lambda path: path.write_bytes(png_header_claiming(40000, 40000)),
                 "b.png: its header claims more than the 100 million pixels", id="over-the-pixel-limit"),
])
def test_a_face_file_eval_cannot_read_is_skipped_not_the_end_of_it(tmp_path, make_bad, said):
    _gray_png(tmp_path / "faces" / "happy" / "a.png")
    make_bad(tmp_path / "faces" / "happy" / "b.png")
    result = agent("eval", str(tmp_path / "faces"), "--json", timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert (report["count"], report["unreadable"]) == (1, 1)
    if said is not None:
        assert said in result.stderr.decode()
