"""`emotion-agent eval` end to end through the real command."""

import json
import logging
import os
import shutil
import subprocess
import sys

import cv2
import pytest

from agent.cli import main
from tests.conftest import astronaut_bgr


@pytest.fixture
def tiny_fer(tmp_path):
    """The astronaut's face in a FER2013-style folder: 48x48 gray, framed like FER faces."""
    face = cv2.cvtColor(astronaut_bgr()[10:230, 130:340], cv2.COLOR_BGR2GRAY)
    (tmp_path / "happy").mkdir()
    cv2.imwrite(str(tmp_path / "happy" / "a.png"), cv2.resize(face, (48, 48), interpolation=cv2.INTER_AREA))
    return tmp_path


def test_eval_prints_accuracy_as_json(tiny_fer, capsys):
    assert main(["eval", str(tiny_fer), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 1 and report["accuracy"] == 1.0
    assert 0 < report["ece"] < 1  # one right face: 1 - its top score


def test_eval_takes_a_ck_plus_folder_as_it_is(tiny_fer, capsys, caplog):
    (tiny_fer / "sadness").mkdir()
    (tiny_fer / "contempt").mkdir()
    shutil.copy(tiny_fer / "happy" / "a.png", tiny_fer / "contempt" / "a.png")
    caplog.set_level(logging.INFO, logger="agent.tools.eval_emotion")
    assert main(["eval", str(tiny_fer), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 1 and report["accuracy"] == 1.0
    assert "1 image(s) in contempt skipped: not one of the seven classes" in caplog.text


def test_eval_margins_reports_each_margin(tiny_fer, capsys):
    assert main(["eval", str(tiny_fer), "--margins", "0,0.1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["faces"] == 1 and set(report["accuracy"]) == {"0", "0.1"}
    assert report["whole_image_accuracy"] == 1.0  # the same face, classified as FER frames it


@pytest.mark.parametrize("args, message", [
    (["eval", "/nonexistent"], "not found: /nonexistent"),
    (["eval", "{tmp}", "--margins", "a,b"], "--margins: expected numbers"),
    (["eval", "{tmp}"], "no class folders"),
    (["eval", "--faces", "{tmp}"], "no imglab .xml files"),
    (["eval", "--faces", "/nonexistent", "--plot", "x.png"], "does not apply with --faces"),  # before any work
    (["eval", "--limit", "0", "{tmp}"], "expected a whole number of at least 1, got 0"),
    (["eval", ""], "DIR: empty path"),
    (["eval", "{tmp}", "--margins", ""], "--margins: expected values between -0.3 and 1.0"),
    (["eval", "--faces", "{tmp}", "--margins", "0.1"], "--margins measures the emotion crops"),
    (["eval", "{tmp}", "--plot", "x.txt"], "expected a file name ending in .png, .pdf, .svg"),
    (["eval", "{tmp}", "--plot", "/proc/new/x.png"], "--plot: cannot create folder /proc/new"),
    (["eval", "--faces", "{xml:<dataset><images/></dataset>}"], "no <image> elements"),
    (["eval", "--faces", "{xml:<dataset><images><image file='a.jpg'><box top='1' left='1' width='-3' "
      "height='5'/></image></images></dataset>}"], "a <box> needs positive width and height"),
    (["eval", "--faces", "{xml:<dataset><images><image file='a.jpg'><box top='nan' left='1' width='3' "
      "height='5'/></image></images></dataset>}"], "a <box> needs finite numbers"),
    (["eval", "--faces", "{xml:<?xml version='1.0' encoding='bogus'?><dataset/>}"],
     "marks.xml: unknown encoding: bogus"),
])
def test_eval_bad_input_is_one_line(tmp_path, capsys, args, message):
    def expand(arg: str) -> str:
        if arg.startswith("{xml:"):
            (tmp_path / "marks.xml").write_text(arg[5:-1])
            return str(tmp_path / "marks.xml")
        return arg.replace("{tmp}", str(tmp_path))
    try:
        assert main([expand(a) for a in args]) != 0
    except SystemExit as exit_:  # argparse's own one-line usage error
        assert exit_.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_plot_draws_into_a_new_folder(tiny_fer, tmp_path_factory, capsys):
    target = tmp_path_factory.mktemp("plots") / "new" / "folder" / "confusion.png"
    assert main(["eval", str(tiny_fer), "--plot", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("plot, message", [
    ("{out}/taken.png", "--plot: {out}/taken.png is a folder, not a file"),
    ("/proc/x.png", "/proc"),  # root may create nothing there; anyone else may not write there
    ("{out}/" + "n" * 300 + ".png", "File name too long"),
])
def test_eval_plot_that_cannot_be_written_is_one_line_before_any_work(tiny_fer, tmp_path_factory, capsys,
                                                                       plot, message):
    out = tmp_path_factory.mktemp("plots")
    (out / "taken.png").mkdir()
    assert main(["eval", "--limit", "5", "--plot", plot.format(out=out), str(tiny_fer)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("emotion-agent: error: --plot: ") and message.format(out=out) in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["taken.png"]  # the write check leaves nothing behind


def run_unprivileged(*args: str) -> subprocess.CompletedProcess:
    """`python -m agent ARGS`, without root's power to read any folder: as root, under setpriv with
    the capabilities that bypass file permissions dropped."""
    command = [sys.executable, "-m", "agent", *args]
    if os.geteuid() == 0:
        setpriv = [shutil.which("setpriv") or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        try:
            usable = subprocess.run([*setpriv, "true"], capture_output=True, timeout=10).returncode == 0
        except OSError:
            usable = False
        if not usable:
            pytest.skip("running as root without a usable setpriv: no folder can be made unreadable")
        command = setpriv + command
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("unreadable", ["happy", ""], ids=["a class folder", "the folder itself"])
def test_eval_on_a_folder_it_cannot_list_is_one_line(tiny_fer, unreadable):
    folder = tiny_fer / unreadable
    folder.chmod(0)
    try:
        done = run_unprivileged("eval", str(tiny_fer))
    finally:
        folder.chmod(0o755)
    assert done.returncode == 4, done.stderr
    assert done.stderr.endswith(f"emotion-agent: error: cannot list folder {folder}: Permission denied\n")
    assert "Traceback" not in done.stderr


def test_eval_plot_without_matplotlib_is_one_line_before_any_work(tiny_fer, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["eval", str(tiny_fer), "--plot", "x.png"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "--plot needs matplotlib" in captured.err


def test_margin_chosen_by_measurement_beats_a_loose_crop(shared_data, capsys):
    assert main(["eval", str(shared_data / "fer2013" / "publictest"), "--margins", "0.1,0.4",
                 "--limit", "60", "--json"]) == 0
    accuracy = json.loads(capsys.readouterr().out)["accuracy"]
    assert accuracy["0.1"] > accuracy["0.4"] + 0.05
