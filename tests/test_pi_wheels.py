"""Every runtime dependency installs from wheels on 64-bit Raspberry Pi OS (aarch64, Python 3.11,
glibc 2.36 on Bookworm): resolved by pip against the package index, nothing compiled."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
# pip matches manylinux tags exactly: name every glibc level Bookworm (2.36) can run.
PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{n}_aarch64" for n in range(17, 37)]


def test_runtime_dependencies_resolve_to_aarch64_wheels(tmp_path):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    report = tmp_path / "report.json"
    args = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
            "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
            "--target", str(tmp_path / "target"), "--report", str(report)]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    done = subprocess.run(args + deps, capture_output=True, text=True, timeout=240)
    if done.returncode != 0 and ("connection" in done.stderr.lower() or "network" in done.stderr.lower()):
        pytest.skip("the package index is unreachable from here")
    assert done.returncode == 0, done.stderr[-2000:]
    files = [item["download_info"]["url"].rsplit("/", 1)[1] for item in json.loads(report.read_text())["install"]]
    names = {f.split("-")[0].lower().replace("_", "-") for f in files}
    for dep in ("numpy", "opencv-python", "ai-edge-litert", "paho-mqtt", "pyyaml"):
        assert dep in names
    for wheel in files:
        assert wheel.endswith(".whl")
        assert "aarch64" in wheel or "-none-any" in wheel, f"{wheel} would not run on a Pi"
