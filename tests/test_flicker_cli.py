"""`python -m agent.tools.flicker` run as a user runs it: a bad input is one line before any measuring,
--set values are read as in the YAML config, and Ctrl-C ends it without a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from agent.errors import ConfigError
from agent.tools.flicker import parse_setting
from tests.test_bench import empty_video
from tests.test_end_to_end import still_video


def flicker(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.tools.flicker", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def clip(tmp_path):
    return still_video(tmp_path / "clip.avi", seconds=1)


@pytest.mark.parametrize("item, key, value", [
    ("detector.threads=2", "detector.threads", 2),
    ("mqtt.tls.enabled=true", "mqtt.tls.enabled", True),
    ("classifier.model=null", "classifier.model", None),
    ("smoothing.dwell_s=0.5", "smoothing.dwell_s", 0.5),
    ("source=clip.mp4", "source", "clip.mp4"),
    ("mqtt.client_id='007'", "mqtt.client_id", "007"),
])
def test_set_values_are_read_as_the_yaml_config_reads_them(item, key, value):
    assert parse_setting(item) == (key, value)
    assert type(parse_setting(item)[1]) is type(value)


@pytest.mark.parametrize("item, message", [
    ("detector.threads", "--set: expected KEY=VALUE, got 'detector.threads'"),
    ("=2", "--set: expected KEY=VALUE"),
    ("detector.threads=", "--set: expected KEY=VALUE"),
    ("detector.threads=[1", "--set detector.threads: invalid value '[1'"),
    ("detector.threads=*a", "--set detector.threads: YAML aliases are not supported"),
])
def test_a_bad_set_is_a_config_error(item, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("*", r"\*")):
        parse_setting(item)


def test_whole_number_boolean_and_null_settings_can_be_set(clip):
    done = flicker(clip, "--max-frames", 3, "--set", "detector.threads=2", "--set", "mqtt.tls.enabled=true",
                   "--set", "classifier.model=null", "--set", "smoothing.dwell_s=0.5")
    assert done.returncode == 0, done.stderr
    # 0.5, not the default 0.25: the setting took
    assert "dwell_s=0.5" in done.stdout and f"{clip}: 3 frames" in done.stdout


@pytest.mark.parametrize("args", [["--every", "25"], ["--hold-s", "0.01", "--every", "3"]])
def test_frames_further_apart_than_twice_hold_s_are_measured(clip, args):
    # A held window then had no frame in it: ZeroDivisionError, with a traceback.
    done = flicker(clip, *args)
    assert done.returncode == 0, done.stderr
    assert "spliced held windows" in done.stdout


BAD_FLICKER_INPUTS = [
    (["{clip}", "--hold-s", "-1"], "argument --hold-s: expected a finite number above 0, got -1"),
    (["{clip}", "--hold-s", "nan"], "argument --hold-s: expected a finite number above 0, got nan"),
    (["{clip}", "--horizon-s", "0"], "argument --horizon-s: expected a finite number above 0, got 0"),
    (["{clip}", "--max-frames", "-1"], "argument --max-frames: expected a whole number of at least 1, got -1"),
    (["{clip}", "{tmp}/missing.avi"], "error: source not found: {tmp}/missing.avi (expected a camera index, an "
                                      "image or video file, or an rtsp:// or http(s):// URL)"),
    (["{clip}", "{tmp}"], "error: source is a directory, not a file: {tmp}"),
    (["{clip}", "{empty}"], "error: video {empty} has no frame that can be decoded"),
    (["{clip}", "--set", "detector.threads=[1"], "error: --set detector.threads: invalid value '[1': expected ',' "
                                                 "or ']', but got '<stream end>'"),
    (["{clip}", "--set", "detector.threads=x"], "error: detector.threads: expected an integer, got 'x'"),
]


@pytest.mark.parametrize("args, message", BAD_FLICKER_INPUTS, ids=[m[:60] for _, m in BAD_FLICKER_INPUTS])
def test_flicker_bad_input_is_one_line_before_any_measuring(tmp_path, clip, args, message):
    names = {"tmp": tmp_path, "clip": clip, "empty": empty_video(tmp_path / "empty.avi")}
    done = flicker(*(a.format(**names) for a in args))
    assert done.returncode != 0 and done.stdout == ""  # not even the first video was measured
    assert message.format(**names) in done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("args, code", [
    (["{clip}", "--set", "bogus=1"], 2),          # a ConfigError, as emotion-agent's commands exit
    (["{tmp}/missing.avi"], 4),                    # a SourceError
])
def test_flicker_errors_are_worded_and_numbered_as_emotion_agents(tmp_path, clip, args, code):
    # They read "error: ..." and all exited 1.
    done = flicker(*(a.format(tmp=tmp_path, clip=clip) for a in args))
    assert done.returncode == code
    assert done.stderr.startswith("emotion-agent: error: ") and done.stderr.count("\n") == 1


def test_a_reader_that_stops_early_is_one_line_not_a_traceback(clip):
    # `| head -1`: the print that met the closed pipe ended in a BrokenPipeError traceback.
    done = subprocess.run(f"{sys.executable} -m agent.tools.flicker {clip} | true", shell=True, capture_output=True,
                          text=True, timeout=120)
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == "emotion-agent: error: Broken pipe"


@pytest.mark.parametrize("after", [
    "INFO agent.tools.progress: clip.avi: 1/",  # measuring the first pass
    "spliced held windows",               # its report printed; measuring the noise runs
])
def test_ctrl_c_ends_flicker_without_a_traceback(clip, after):
    # Many noise runs: far more work than the test waits for.
    process = subprocess.Popen([sys.executable, "-m", "agent.tools.flicker", str(clip), "--noise-runs", "100"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if line.startswith(after):
                process.send_signal(signal.SIGINT)
                break
        rest, _ = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    output = "".join(seen) + rest
    assert process.returncode == 130, output
    assert output.endswith("interrupted\n") and "Traceback" not in output
    if after.startswith("spliced"):
        assert f"{clip}: 10 frames" in output  # what was measured before Ctrl-C was reported
