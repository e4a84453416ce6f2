"""Shared fixtures: a real mosquitto on a free port, a real subscriber, real photos."""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt import BrokerSettings, MqttPublisher
from tests import sample_photos

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


class Broker:
    """A mosquitto process we own: it can be stopped and started again on the same port."""

    def __init__(self, workdir: Path, extra_config: str = "", port: int | None = None, persistent: bool = False):
        self.persistent = persistent
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = port or free_port()
        self.workdir = workdir
        self.extra_config = extra_config
        self.process: subprocess.Popen | None = None
        self.log = workdir / "mosquitto.log"

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        body = self.extra_config or f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        # Persistence keeps subscribers' sessions (and their queued messages) across a restart.
        persistence = (f"persistence true\npersistence_location {self.workdir}/\n" if self.persistent
                       else "persistence false\n")
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to its own user, which cannot write pytest's
            # private tmp_path: its saved sessions would be lost across a restart.
            persistence += "user root\n"
        conf.write_text(f"{persistence}log_dest stderr\n{body}")
        self.process = subprocess.Popen([self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=self.log.open("ab"))
        wait_port(self.port)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


def _started_broker(tmp_path, persistent: bool = False):
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
    b = Broker(tmp_path, persistent=persistent)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def broker(tmp_path):
    """A mosquitto of the test's own, which it may stop, start, freeze or kill."""
    yield from _started_broker(tmp_path)


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory):
    """A mosquitto that the tests of a module share: for tests that leave it running and use client
    ids and topics of their own (what an earlier test left retained is still there)."""
    yield from _started_broker(tmp_path_factory.mktemp("shared-broker"))


@pytest.fixture
def persistent_broker(tmp_path):
    """A broker that keeps subscribers' sessions across its `stop()` and `start()`; stopped after the test."""
    yield from _started_broker(tmp_path, persistent=True)


@pytest.fixture
def agent_process():
    """Starts `python -m agent run ARGS...` (stderr piped, as text; `env` as subprocess takes it); each
    agent still running at teardown is killed, and all are reaped, also when the test failed."""
    started: list[subprocess.Popen] = []

    def start(*args: str, env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def stop_agent(proc: subprocess.Popen) -> tuple[int, float, str]:
    """SIGTERM the agent `proc` and wait (20 s at most): its exit code, the seconds that took, its stderr."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    return proc.returncode, time.monotonic() - started, err


def _acl_file(workdir: Path, users: dict[str, str], acl: str) -> str:
    """mosquitto's configuration lines for a password file with `users` and the ACL file `acl`."""
    passwords, acl_file = workdir / "passwords", workdir / "acl"
    passwords.write_text("".join(f"{user}:{password}\n" for user, password in users.items()))
    subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True)
    acl_file.write_text(acl)
    return f"allow_anonymous false\npassword_file {passwords}\nacl_file {acl_file}\n"


def _dynamic_security(workdir: Path, users: dict[str, str], allow: list[tuple[str, str]]) -> str:
    """mosquitto's configuration lines for its dynamic-security plugin, with `users` each allowed only
    `allow`; its file keeps a password as PBKDF2-SHA512."""
    plugins = glob.glob("/usr/lib/*/mosquitto_dynamic_security.so") + glob.glob("/usr/lib/mosquitto_dynamic_security.so")
    if not plugins:
        pytest.fail("mosquitto's dynamic-security plugin is not installed (Debian's mosquitto package has it)")
    clients = []
    for user, password in users.items():
        salt = os.urandom(12)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
        clients.append({"username": user, "password": base64.b64encode(digest).decode(), "iterations": 101,
                        "salt": base64.b64encode(salt).decode(), "roles": [{"rolename": "allowed"}]})
    config = workdir / "dynamic-security.json"
    config.write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                             "unsubscribe": True},
        "clients": clients, "groups": [],
        "roles": [{"rolename": "allowed", "acls": [{"acltype": acltype, "topic": topic, "allow": True}
                                                   for acltype, topic in allow]}]}))
    return f"plugin {plugins[0]}\nplugin_opt_config_file {config}\n"


@pytest.fixture(scope="module")
def restricted_broker(tmp_path_factory):
    """Starts a mosquitto that admits only `users` (name: password), each held to `acl`, with `extra`
    config lines besides (message_size_limit, max_packet_size); it logs every PUBLISH, taken or
    denied. `acl` is an ACL file's text, or dynamic security's allowed (acltype, topic) pairs,
    everything else denied: `[("publishClientSend", "test/#")]`. Only the latter refuses a SUBSCRIBE
    in the SUBACK: mosquitto 2.0 grants every subscription under an ACL file, and checks it only as
    it delivers a message. The tests of a module that ask for the same broker share it (started
    again if a test stopped it); all are stopped after the module."""
    made: dict[str, Broker] = {}

    def make(users: dict[str, str], acl: str | list[tuple[str, str]], extra: str = "") -> Broker:
        key = repr((sorted(users.items()), acl, extra))
        if key in made:
            broker = made[key]
            if broker.process is None:
                broker.start()
            return broker
        workdir = tmp_path_factory.mktemp("restricted-broker")
        auth = _acl_file(workdir, users, acl) if isinstance(acl, str) else _dynamic_security(workdir, users, acl)
        port = free_port()
        broker = Broker(workdir, port=port, extra_config=f"listener {port} 127.0.0.1\n{auth}log_type all\n{extra}")
        made[key] = broker
        broker.start()
        return broker

    yield make
    for broker in made.values():
        broker.stop()


def is_msg(topic, payload=None, retained=None):
    """A predicate for `Subscriber.wait_for`: a message on `topic`, with this payload and retain flag
    where given."""
    def match(item):
        t, p, r = item
        return t == topic and (payload is None or p == payload) and (retained is None or r == retained)
    return match


def wait_until(predicate, timeout: float) -> float:
    """Seconds until `predicate()` held; AssertionError past `timeout`."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - started


def reload_and_wait_for(proc, sub: Subscriber, topic: str, timeout: float = 60) -> None:
    """SIGHUP the agent `proc` and wait until `topic` comes again after it: the pipeline started over."""
    before = len(sub.all)
    proc.send_signal(signal.SIGHUP)
    sub.wait_for(lambda m: m[0] == topic and sub.all.index(m) >= before, timeout=timeout)


class Subscriber:
    """A real MQTT client that records every message it gets, for assertions with timeouts."""

    def __init__(self, port: int, topics: str | list[str] = "#", client_id: str | None = None,
                 clean_session: bool = True, login: tuple[str, str] | None = None, ca_file: Path | None = None):
        self.messages: queue.Queue = queue.Queue()
        self.all: list[tuple[str, bytes, bool]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "", clean_session=clean_session)
        if login is not None:
            self.client.username_pw_set(*login)
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file))
        self._subscribed = queue.Queue()
        topics = [topics] if isinstance(topics, str) else topics

        def on_connect(client, userdata, flags, reason_code, properties):
            for t in topics:
                client.subscribe(t, qos=1)

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            self._subscribed.put(mid)

        def on_message(client, userdata, msg):
            item = (msg.topic, msg.payload, bool(msg.retain))
            self.all.append(item)
            self.messages.put(item)

        # Reconnect quickly after a broker restart (paho's default backoff grows to 2 minutes).
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.port = port

    def start(self, timeout: float = 10.0) -> Subscriber:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        self._subscribed.get(timeout=timeout)
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(self, predicate, timeout: float = 10.0):
        """The first message (topic, payload, retained) matching `predicate`, already seen or coming."""
        for item in list(self.all):
            if predicate(item):
                return item
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no matching message")
            try:
                item = self.messages.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError("no matching message") from None
            if predicate(item):
                return item

    def on_topic(self, suffix: str) -> list[dict]:
        return [json.loads(p) for t, p, _ in self.all if t.endswith(suffix) and p.startswith(b"{")]


@pytest.fixture
def subscriber_factory():
    made = []

    def make(port: int, topics="#", **kwargs) -> Subscriber:
        sub = Subscriber(port, topics, **kwargs).start()
        made.append(sub)
        return sub

    yield make
    for sub in made:
        sub.stop()


@pytest.fixture
def publishers():
    """Starts MQTT publishers with the given settings, subscribed to `subscriptions` (topic: callback);
    closed after the test."""
    made: list[MqttPublisher] = []

    def make(settings: BrokerSettings, subscriptions: dict | None = None) -> MqttPublisher:
        pub = MqttPublisher(settings)
        for topic, callback in (subscriptions or {}).items():
            pub.subscribe(topic, callback)
        made.append(pub)
        pub.start()
        return pub

    yield make
    for pub in made:
        pub.close(timeout=1.0)


@pytest.fixture
def mjpeg_server():
    """Starts MJPEG-over-HTTP servers as an ESP32-CAM serves them (tests/mjpeg_server.py); closed after the test."""
    from tests.mjpeg_server import MjpegServer

    made = []

    def make(frames, **kwargs) -> MjpegServer:
        server = MjpegServer(frames, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (only on the developers' machines)")
    return SHARED_DATA


def astronaut_bgr() -> np.ndarray:
    """scikit-image's astronaut photo (Eileen Collins, smiling), as OpenCV's BGR."""
    pytest.importorskip("skimage.data")
    return sample_photos.astronaut_bgr()


def face_jpeg() -> bytes:
    """The astronaut photo as one JPEG, as an MJPEG camera sends a frame."""
    from tests.mjpeg_server import jpeg

    return jpeg(astronaut_bgr())


def grace_hopper_path() -> Path:
    pytest.importorskip("matplotlib.cbook")
    return sample_photos.grace_hopper_path()


@pytest.fixture
def smiling_photo(tmp_path) -> Path:
    import cv2

    path = tmp_path / "astronaut.jpg"
    cv2.imwrite(str(path), astronaut_bgr())
    return path


@pytest.fixture
def notify_socket(tmp_path):
    """A systemd notification socket to hand an agent: (its path for NOTIFY_SOCKET, the socket)."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()
