"""The README's promises that a test can hold: CI runs exactly its test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shell_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text, re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    test_section = readme.split("## Test", 1)[1]
    command = shell_blocks(test_section)[0]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    last_command = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")][-1]
    assert last_command == command


def test_the_install_command_installs_into_a_virtualenv_and_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = shell_blocks(readme.split("## Install and run", 1)[1])[0]
    assert install.startswith("python3 -m venv ") and " install . " in install and " run --source " in install
