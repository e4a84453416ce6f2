"""What each command loads: the daemon never imports the measuring tools (agent.tools), and parsing
any command's arguments loads neither them nor OpenCV. Each case runs in a fresh interpreter, as
a user's command does; the modules another test imported would hide a regression here."""

import subprocess
import sys

import pytest

PROBE = """
import sys
from agent import cli
{body}
print(" ".join(sorted(m for m in sys.modules if m == "cv2" or m.startswith("agent.tools"))))
"""


def loaded(body: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.parametrize("argv", [
    ["run", "--source", "0", "--show"],
    ["check-config", "config.yaml"],
    ["eval", "faces/", "--json"],
    ["bench", "video.mp4", "--no-classic"],
])
def test_parsing_a_command_loads_neither_the_tools_nor_opencv(argv):
    assert loaded(f"cli._parser().parse_args({argv!r})") == set()


def test_run_up_to_its_source_loads_no_tool(tmp_path):
    # The source is checked after the pipeline, the broker client and the models' code are imported.
    missing = tmp_path / "missing.mp4"
    body = f"cli.main(['run', '--source', {str(missing)!r}, '--mqtt-port', '1']); assert 'agent.mqtt' in sys.modules"
    assert loaded(body) == {"cv2"}


@pytest.mark.parametrize("tool", ["flicker", "convert", "convert_detector"])
def test_the_published_python_m_commands_still_run_the_moved_tools(tool):
    done = subprocess.run([sys.executable, "-m", f"agent.{tool}", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m agent.tools.{tool} ")
