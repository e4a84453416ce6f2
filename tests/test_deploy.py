"""The systemd unit and the install/uninstall scripts, exercised in a scratch root.

No systemd runs here, so the unit's seccomp-based restrictions (SystemCallFilter=,
SystemCallErrorNumber=, MemoryDenyWriteExecute=, RestrictAddressFamilies=) are rebuilt from the
unit file with libseccomp, the way systemd builds them, and the installed agent is run under them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "emotion-agent.service"
INSTALLED_BINARY = "opt/emotion-agent/venv/bin/emotion-agent"


def run(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "deploy" / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


# What the agent imports at run time, as install.sh's `python3` would find it.
RUNTIME_IMPORTS = "import cv2, numpy, yaml, paho.mqtt.client, ai_edge_litert.interpreter"


@functools.cache  # asked once per test run, not once per scratch install
def system_python_has_the_dependencies() -> bool:
    done = subprocess.run(["python3", "-c", RUNTIME_IMPORTS], capture_output=True, timeout=120)
    return done.returncode == 0


# Asked of the system Python, whose packages the scratch venv sees, not of this test run's venv
# (which may have `wheel` where the system has not). Up to Python 3.11 a new venv brings its own
# setuptools (65.5 from ensurepip), which needs `wheel` to build; from 3.12 it brings none.
_BUILDS_OFFLINE = """
import importlib.util, sys
if importlib.util.find_spec("wheel"):
    sys.exit(0)
if sys.version_info >= (3, 12) and importlib.util.find_spec("setuptools"):
    import setuptools
    sys.exit(0 if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1) else 1)
sys.exit(1)
"""


def system_python_builds_wheels_offline() -> bool:
    return subprocess.run(["python3", "-c", _BUILDS_OFFLINE], capture_output=True, timeout=120).returncode == 0


def offline_pip_args() -> str:
    """Install only the project, with the packages already here, and build it without the network
    when this Python can (setuptools >= 70.1 builds wheels itself; older needs `wheel`).

    The scratch venv sees the system Python's packages (--system-site-packages), not this test
    run's venv: where the system Python lacks the runtime dependencies (a fresh machine), pip
    installs them as a user's install would, from its cache or the package index."""
    can_build = system_python_builds_wheels_offline()
    deps = "--no-deps" if system_python_has_the_dependencies() else ""
    # Otherwise pip fetches setuptools for an isolated build: the one download of this file.
    return f"{deps} --no-build-isolation".strip() if can_build else deps


def install(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("install.sh", "--root", str(root), "--no-systemctl", "--system-site-packages",
               "--pip-args", offline_pip_args(), *extra)


@pytest.fixture(scope="module")
def scratch_install(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    done = install(root)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_creates_a_working_command_config_secrets_and_unit(scratch_install):
    root = scratch_install
    help_text = subprocess.run([str(root / INSTALLED_BINARY), "--help"], capture_output=True, text=True,
                               timeout=60).stdout
    assert "check-config" in help_text
    config = root / "etc/emotion-agent/config.yaml"
    assert config.read_text() == (ROOT / "config.yaml").read_text()
    assert mode(config) == 0o640 and mode(config.parent) == 0o750
    env = root / "etc/emotion-agent/env"
    assert mode(env) == 0o600 and "# EMOTION_AGENT_MQTT_PASSWORD=" in env.read_text()
    assert (root / "etc/systemd/system/emotion-agent.service").read_text() == UNIT.read_text()


@pytest.mark.parametrize("installed, verified_as", [
    ("emotion-agent.service", "emotion-agent.service"),
    ("emotion-agent@.service", "emotion-agent@kitchen.service"),  # the template, as an instance of it
], ids=["unit", "instance"])
def test_installed_units_pass_systemd_analyze_verify(scratch_install, tmp_path, installed, verified_as):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart= exists: point it at the scratch install's real command,
    # every other line unchanged.
    text = (scratch_install / "etc/systemd/system" / installed).read_text()
    assert f"ExecStart=/{INSTALLED_BINARY} " in text
    unit = tmp_path / verified_as
    unit.write_text(text.replace(f"/{INSTALLED_BINARY}", str(scratch_install / INSTALLED_BINARY)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_the_instance_template_is_the_unit_with_its_own_name_and_config(scratch_install):
    template = (scratch_install / "etc/systemd/system/emotion-agent@.service").read_text().splitlines()
    unit = UNIT.read_text().splitlines()
    unit = unit[unit.index("[Unit]"):]  # its header comment, however long, gives way to the template's
    assert template[3:] == [line.replace("Description=emotion-agent: ", "Description=emotion-agent %i: ")
                                .replace("--config /etc/emotion-agent/config.yaml", "--config /etc/emotion-agent/%i.yaml")
                            for line in unit]
    assert sum(a != b for a, b in zip(template[3:], unit)) == 2  # both lines were found and changed
    assert all(line.startswith("# ") for line in template[:3]) and "emotion-agent@NAME" in template[0]


def template_sed_args() -> list[str]:
    """The arguments of install.sh's sed that makes the instance template from the unit."""
    script = (ROOT / "deploy" / "install.sh").read_text()
    start = script.index("\nsed -e ") + 1
    end = script.index('"$source_dir/deploy/emotion-agent.service"', start)
    return shlex.split(script[start:end].replace("\\\n", " "))[1:]


@pytest.mark.parametrize("header", [0, 1, 3])
def test_the_template_keeps_every_comment_below_the_units_header_however_long_it_is(tmp_path, header):
    # '1,/^\[Unit\]$/' starts looking for [Unit] on line 2: on a unit without a header comment the
    # range ran to its end, and the template lost every comment in it.
    body = UNIT.read_text().splitlines(keepends=True)
    body = body[body.index("[Unit]\n"):]
    unit = tmp_path / "emotion-agent.service"
    unit.write_text("".join(f"# header line {n}\n" for n in range(header)) + "".join(body))
    done = subprocess.run(["sed", *template_sed_args(), str(unit)], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    made = done.stdout.splitlines(keepends=True)
    assert len(made) == len(body) and [line for line in made if line.startswith("#")] == \
        [line for line in body if line.startswith("#")]


def test_unit_is_hardened_and_watchdogged():
    lines = set(UNIT.read_text().splitlines())
    for line in ("Type=notify", "NotifyAccess=main", "Restart=on-failure", "WatchdogSec=60s", "User=emotion-agent",
                 "SupplementaryGroups=video", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                 "PrivateTmp=yes", "DevicePolicy=closed", "DeviceAllow=char-video4linux rw",
                 "CapabilityBoundingSet=", "MemoryDenyWriteExecute=yes", "SystemCallFilter=@system-service"):
        assert line in lines, line


# --- the unit's seccomp restrictions, as systemd builds them ---------------------------------

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 4, 6, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


def scmp_errno(code: int) -> int:
    return 0x00050000 | code


class ScmpArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def unit_settings(name: str) -> list[str]:
    prefix = name + "="
    return [line[len(prefix):] for line in UNIT.read_text().splitlines() if line.startswith(prefix)]


def syscall_groups() -> dict[str, list[str]]:
    """Every @group with its members, from `systemd-analyze syscall-filter`."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for raw in out.splitlines():
        line = raw.strip()
        if not raw.startswith(" ") and line.startswith("@"):
            current = groups.setdefault(line, [])
        elif current is not None and line and not line.startswith("#"):
            current.append(line)
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for name in names:
        out |= expand(groups[name], groups) if name.startswith("@") else {name}
    return out


class UnitSeccomp:
    """Builds the unit's filters in the parent; `apply` only loads them (in the child, before exec)."""

    def __init__(self):
        path = ctypes.util.find_library("seccomp")
        if not sys.platform.startswith("linux") or path is None or not shutil.which("systemd-analyze"):
            pytest.skip("needs Linux, libseccomp and systemd-analyze")
        self.lib = ctypes.CDLL(path, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                                    ctypes.POINTER(ScmpArgCmp)]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.filters: list[int] = []
        self.describe: list[str] = []
        families = unit_settings("RestrictAddressFamilies")
        if families:
            allowed = {getattr(socket, name) for name in families[-1].split()}
            rules = [("socket", scmp_errno(errno.EAFNOSUPPORT), [(0, SCMP_CMP_EQ, f, 0)])
                     for f in range(64) if f not in allowed]
            rules.append(("socket", scmp_errno(errno.EAFNOSUPPORT), [(0, SCMP_CMP_GT, 63, 0)]))
            self.filters.append(self._build(SCMP_ACT_ALLOW, rules))
            self.describe.append(f"RestrictAddressFamilies={families[-1]}")
        if unit_settings("MemoryDenyWriteExecute") == ["yes"]:
            deny = scmp_errno(errno.EPERM)
            self.filters.append(self._build(SCMP_ACT_ALLOW, [
                ("mmap", deny, [(2, SCMP_CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC)]),
                ("mprotect", deny, [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
                ("pkey_mprotect", deny, [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
                ("shmat", deny, [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
            ]))
            self.describe.append("MemoryDenyWriteExecute=yes")
        filters = unit_settings("SystemCallFilter")
        if filters:
            # systemd: the first line is an allow list (with @default added), '~' lines take away
            # from it; a denied call gets SystemCallErrorNumber= or kills the process.
            groups = syscall_groups()
            allowed_calls = expand(["@default"], groups)
            for entry in filters:
                names = entry.lstrip("~").split()
                if entry.startswith("~"):
                    allowed_calls -= expand(names, groups)
                else:
                    allowed_calls |= expand(names, groups)
            code = unit_settings("SystemCallErrorNumber")
            default = scmp_errno(getattr(errno, code[-1])) if code else 0x80000000  # KILL_PROCESS
            # Last, as systemd does: it may deny seccomp() itself.
            self.filters.append(self._build(default, [(n, SCMP_ACT_ALLOW, []) for n in sorted(allowed_calls)]))
            self.describe.append("SystemCallFilter=" + " / ".join(filters))

    def _build(self, default: int, rules) -> int:
        ctx = self.lib.seccomp_init(default)
        assert ctx, "seccomp_init failed"
        for name, action, cmps in rules:
            nr = self.lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a system call on this architecture
                continue
            arr = (ScmpArgCmp * max(1, len(cmps)))(*(ScmpArgCmp(*c) for c in cmps))
            rc = self.lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
            assert rc in (0, -errno.EEXIST), f"seccomp_rule_add {name}: {os.strerror(-rc)}"
        return ctx

    def apply(self) -> None:
        for ctx in self.filters:
            if self.lib.seccomp_load(ctx) != 0:
                raise OSError("seccomp_load failed")

    def run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        # close_fds=False: after the filter is loaded, nothing but execve() should run in the child.
        return subprocess.run(args, preexec_fn=self.apply, close_fds=False, capture_output=True, text=True,
                              **kwargs)


@pytest.fixture(scope="module")
def unit_seccomp() -> UnitSeccomp:
    return UnitSeccomp()


def test_the_emulated_filters_do_deny_what_the_unit_forbids(unit_seccomp):
    # So that the next tests' passing means something.
    probe = """
import mmap, os, socket
for name, attempt in [("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),
                      ("wx", lambda: mmap.mmap(-1, 4096, prot=7)),
                      ("affinity", lambda: os.sched_setaffinity(0, {0}))]:
    try:
        attempt()
        print(name, "allowed")
    except OSError as exc:
        print(name, exc.errno)
"""
    done = unit_seccomp.run([sys.executable, "-c", probe], timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == [f"netlink {errno.EAFNOSUPPORT}", f"wx {errno.EPERM}",
                                           f"affinity {errno.EPERM}"], unit_seccomp.describe


def test_broker_names_resolve_without_netlink_sockets(unit_seccomp):
    # glibc asks netlink for the host's addresses (AI_ADDRCONFIG, sorting); the unit allows no AF_NETLINK.
    probe = ("import socket; "
             "print(socket.getaddrinfo('localhost', 1883, 0, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG))")
    done = unit_seccomp.run([sys.executable, "-c", probe], timeout=60)
    assert done.returncode == 0 and "1883" in done.stdout, done.stderr


def test_installed_agent_runs_under_the_units_seccomp_restrictions(unit_seccomp, scratch_install, broker, tmp_path):
    from tests.test_end_to_end import still_video

    video = still_video(tmp_path / "clip.avi", seconds=2)
    done = unit_seccomp.run([str(scratch_install / INSTALLED_BINARY), "run", "--source", str(video),
                             "--mqtt-host", "localhost", "--mqtt-port", str(broker.port)], timeout=120)
    assert done.returncode == 0, f"{unit_seccomp.describe}\nrc {done.returncode}\n{done.stderr[-3000:]}"
    for line in ("XNNPACK delegate", "first frame processed", "processed 20 frames"):  # LiteRT's fast kernels too
        assert line in done.stderr, done.stderr[-3000:]


# --- install twice, upgrade, uninstall ----------------------------------------------------------

def test_second_install_keeps_the_users_config_and_upgrades_the_code(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                                ".pytest_cache", ".benchmarks"))
    root = tmp_path / "root"
    root.mkdir()
    assert install(root, "--source", str(source)).returncode == 0
    config = root / "etc/emotion-agent/config.yaml"
    config.write_text("source: rtsp://camera.local/stream\n")
    with (source / "agent/__init__.py").open("a") as f:
        f.write("\nUPGRADED = True\n")
    done = install(root, "--source", str(source))
    assert done.returncode == 0, done.stderr
    assert config.read_text() == "source: rtsp://camera.local/stream\n"
    assert "keeping the existing" in done.stdout
    python = root / "opt/emotion-agent/venv/bin/python"
    # Without PYTHONPATH: a developer's pointing at a checkout would import that, not the installed copy.
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    upgraded = subprocess.run([str(python), "-c", "import agent; print(agent.UPGRADED)"], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path, env=clean_env)
    assert upgraded.stdout.strip() == "True", upgraded.stderr
    assert not (source / "build").exists() and not list(source.glob("*.egg-info")), "built inside the checkout"


@pytest.mark.parametrize("name, text, setting, unit", [
    pytest.param("config.yaml", "mqtt:\n  port: many\n", "mqtt.port", "emotion-agent.service", id="config"),
    pytest.param("kitchen.yaml", "source: 1\ndetector:\n  interval_s: soon\n", "detector.interval_s",
                 "emotion-agent@.service", id="instance-config"),
])
def test_install_refuses_a_bad_config_before_touching_its_unit(tmp_path, name, text, setting, unit):
    root = tmp_path / "root"
    config = root / "etc/emotion-agent" / name
    config.parent.mkdir(parents=True)
    config.write_text(text)
    done = install(root)
    assert done.returncode != 0
    assert setting in done.stderr and f"fix {config}" in done.stderr
    assert not (root / "etc/systemd/system" / unit).exists()


def test_uninstall_removes_what_install_added_and_keeps_config_unless_purged(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert install(root).returncode == 0
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    for name in ("emotion-agent.service", "emotion-agent@kitchen.service"):  # as systemctl enable links them
        (wants / name).symlink_to(f"/etc/systemd/system/{name.replace('kitchen', '')}")
    (wants / "other.service").symlink_to("/etc/systemd/system/other.service")
    done = run("uninstall.sh", "--root", str(root), "--no-systemctl")
    assert done.returncode == 0, done.stderr
    assert not (root / "opt/emotion-agent").exists()
    assert not (root / "etc/systemd/system/emotion-agent.service").exists()
    assert not (root / "etc/systemd/system/emotion-agent@.service").exists()
    assert [p.name for p in wants.iterdir()] == ["other.service"]
    assert sorted(p.name for p in (root / "etc/emotion-agent").iterdir()) == ["config.yaml", "env"]
    assert run("uninstall.sh", "--root", str(root), "--no-systemctl").returncode == 0, "twice must work"
    assert run("uninstall.sh", "--root", str(root), "--no-systemctl", "--purge").returncode == 0
    assert not (root / "etc/emotion-agent").exists()


@pytest.mark.parametrize("script, args, message", [
    ("install.sh", ["--bogus"], "unknown option: --bogus"),
    ("install.sh", ["--root", "/nonexistent/dir"], "root directory not found"),
    ("install.sh", ["--source", "/tmp"], "no pyproject.toml in /tmp"),
    ("uninstall.sh", ["--bogus"], "unknown option: --bogus"),
    ("uninstall.sh", ["--root", "/nonexistent/dir"], "root directory not found"),
])
def test_bad_arguments_are_one_line(script, args, message):
    done = run(script, *args)
    assert done.returncode != 0 and message in done.stderr and len(done.stderr.splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root may install live")
def test_live_install_needs_root():
    done = run("install.sh")
    assert done.returncode != 0 and "run as root" in done.stderr
