"""Security against real mosquitto processes: TLS with verification on by default, passwords,
client certificates and an ACL; the password never reaches a log, and no image leaves the device.

The throwaway PKI is made with the `openssl` command (EC keys: fast). What the agent tried to
publish is read from the broker's own log, not only from a subscriber: with an ACL in place the
broker silently drops a forbidden publish, so a subscriber alone could never see a stray topic.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.mqtt import BrokerSettings, Message
from tests.conftest import ROOT, Broker, Subscriber, free_port, reload_and_wait_for, stop_agent, wait_until

PREFIX = "test/agent"
ALLOWED_ROOTS = (f"{PREFIX}/", "homeassistant/")
AGENT_ID = "secure-agent"
AGENT_USER, AGENT_PASSWORD = "agent", "Tr0ub4dor-and-3-horses"
READER_USER, READER_PASSWORD = "reader", "reader-pass-123"
PASSWORD_ENV = "EMOTION_AGENT_MQTT_PASSWORD"

# mosquitto 2.x, log_type all: one line per PUBLISH a client sent, accepted or not.
PUBLISH_LINE = re.compile(r"(Received|Denied) PUBLISH from (\S+) \(d\d, q\d, r\d, m\d+, '([^']*)', "
                          r"\.\.\. \((\d+) bytes\)\)")
BASE64_BLOB = re.compile(rb"[A-Za-z0-9+/]{1024,}={0,2}")


# --- the PKI, the users and the ACL -------------------------------------------------------------

def openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    openssl(directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "2", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem")


def make_cert(directory: Path, name: str, ca: str, san: str | None = None) -> None:
    openssl(directory, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
    ext = directory / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\n" + (f"subjectAltName={san}\n" if san else ""))
    openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", str(ext))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    for tool in ("openssl", "mosquitto_passwd"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (apt-get install openssl mosquitto)")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "server", "ca", san="IP:127.0.0.1,DNS:localhost")
    make_cert(d, "client", "ca")
    make_cert(d, "rogue-server", "other-ca", san="IP:127.0.0.1,DNS:localhost")  # right name, wrong CA
    make_cert(d, "elsewhere-server", "ca", san="DNS:broker.example.invalid")  # right CA, wrong name
    passwords = d / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), AGENT_USER, AGENT_PASSWORD], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), READER_USER, READER_PASSWORD], check=True)
    (d / "acl").write_text(f"user {AGENT_USER}\n"
                           f"topic write {PREFIX}/#\n"
                           "topic write homeassistant/#\n"
                           "topic read homeassistant/status\n"
                           "\n"
                           f"user {READER_USER}\n"
                           "topic read #\n")
    return d


def tls_broker(workdir: Path, pki: Path, server: str = "server", client_certs: bool = False,
               port: int | None = None) -> Broker:
    port = port or free_port()
    body = (f"listener {port} 127.0.0.1\n"
            f"cafile {pki}/ca.pem\ncertfile {pki}/{server}.pem\nkeyfile {pki}/{server}.key\n"
            f"require_certificate {'true' if client_certs else 'false'}\n"
            f"allow_anonymous false\npassword_file {pki}/passwords\nacl_file {pki}/acl\n"
            "log_type all\n")
    broker = Broker(workdir, extra_config=body, port=port)
    broker.start()
    return broker


@pytest.fixture
def broker_dir(tmp_path) -> Path:
    d = tmp_path / "broker"
    d.mkdir()
    return d


@pytest.fixture
def secure_broker(broker_dir, pki):
    broker = tls_broker(broker_dir, pki)
    yield broker
    broker.stop()


def reader(port: int, pki: Path, topics: str | list[str] = "#", ca: str = "ca.pem") -> Subscriber:
    return Subscriber(port, topics, login=(READER_USER, READER_PASSWORD), ca_file=pki / ca).start()


def agent_settings(port: int, pki: Path, **overrides) -> BrokerSettings:
    values = dict(host="127.0.0.1", port=port, client_id=AGENT_ID, availability_topic=f"{PREFIX}/availability",
                  username=AGENT_USER, password=AGENT_PASSWORD, tls=True, ca_file=str(pki / "ca.pem"),
                  reconnect_min_s=1, reconnect_max_s=1)
    values.update(overrides)
    return BrokerSettings(**values)


@dataclass(frozen=True, slots=True)
class SentPublish:
    client_id: str
    topic: str
    size: int
    denied: bool


def sent_publishes(broker: Broker, client_id: str) -> list[SentPublish]:
    """Every PUBLISH the broker got from `client_id`, as its log tells (accepted or denied)."""
    found = []
    for match in PUBLISH_LINE.finditer(broker.log.read_text(errors="replace")):
        verb, client, topic, size = match.groups()
        if client == client_id:
            found.append(SentPublish(client, topic, int(size), verb == "Denied"))
    return found


def outside_roots(publishes: list[SentPublish]) -> list[str]:
    return [p.topic for p in publishes if not p.topic.startswith(ALLOWED_ROOTS)]


# --- the publisher against the broker ------------------------------------------------------------

def test_tls_with_a_password_connects_and_delivers(secure_broker, pki, publishers):
    sub = reader(secure_broker.port, pki, f"{PREFIX}/#")
    try:
        pub = publishers(agent_settings(secure_broker.port, pki))
        assert pub.wait_connected(10), pub.last_error
        pub.publish(Message(f"{PREFIX}/event/face_appeared", '{"face_id": 1}'))
        assert pub.flush(10)
        _, payload, _ = sub.wait_for(lambda m: m[0] == f"{PREFIX}/event/face_appeared")
        assert json.loads(payload) == {"face_id": 1}
        assert pub.last_error is None and pub.connects == 1
    finally:
        sub.stop()


@pytest.mark.parametrize("username, password", [
    (AGENT_USER, "wrong-password"),
    ("nobody", AGENT_PASSWORD),
    (None, None),  # anonymous, and the broker allows no anonymous client
], ids=["wrong-password", "unknown-user", "anonymous"])
def test_refused_credentials_leave_the_publisher_disconnected_and_say_why(
        secure_broker, pki, publishers, caplog, username, password):
    caplog.set_level("ERROR", logger="agent.mqtt")
    pub = publishers(agent_settings(secure_broker.port, pki, username=username, password=password))
    wait_until(lambda: pub.last_error is not None, 10)
    assert pub.last_error == "Not authorized" and not pub.connected
    time.sleep(2.5)  # two more refusals, a second apart: said once, not at every retry for months
    refusals = [r.getMessage() for r in caplog.records if r.name == "agent.mqtt"]
    assert len(refusals) == 1 and "refused the connection: Not authorized; retrying" in refusals[0]
    assert all(AGENT_PASSWORD not in text for text in refusals)


def test_a_plain_connection_to_the_tls_port_is_one_warning_that_says_so(secure_broker, pki, publishers, caplog):
    # The broker hangs up on a plain CONNECT: paho said only "failed to receive on socket", as an
    # ERROR, at every retry, and the agent nothing of its own.
    caplog.set_level("INFO")
    pub = publishers(agent_settings(secure_broker.port, pki, tls=False, ca_file=None))
    wait_until(lambda: pub.last_error is not None, 10)
    time.sleep(2.5)  # two more tries, a second apart
    assert pub.connects == 0
    said = [r.getMessage() for r in caplog.records if r.name == "agent.mqtt"]
    assert len(said) == 1, said
    assert said[0].startswith(f"broker 127.0.0.1:{secure_broker.port} closed the connection before accepting it: ")
    assert said[0].endswith("; retrying (if it listens with TLS on this port, set mqtt.tls.enabled: true)")
    assert "Client is not connected" not in said[0] and "Connection State" not in said[0]
    assert pub.last_error == ("closed the connection before accepting it "
                              "(if it listens with TLS on this port, set mqtt.tls.enabled: true)")  # the CLI's last line
    assert not [r for r in caplog.records if r.name == "agent.paho" and r.levelno >= logging.WARNING]


def test_tls_to_a_plain_port_is_one_warning_with_a_hint(broker, pki, publishers, caplog):
    # The plain listener resets the TLS handshake: "Connection reset by peer", and nothing said why.
    caplog.set_level("INFO")
    pub = publishers(agent_settings(broker.port, pki))
    wait_until(lambda: pub.last_error is not None, 10)
    time.sleep(2.5)  # two more tries, a second apart
    said = [r.getMessage() for r in caplog.records if r.name == "agent.mqtt"]
    assert len(said) == 1, said
    assert said[0].startswith(f"cannot connect to broker 127.0.0.1:{broker.port}: ")
    assert said[0].endswith("(if this port takes plain MQTT, set mqtt.tls.enabled: false or use the broker's TLS "
                            "port); retrying")


def test_a_broker_certificate_signed_by_another_ca_is_refused_even_with_tls_insecure(broker_dir, pki, publishers):
    broker = tls_broker(broker_dir, pki, server="rogue-server")
    try:
        by_default = publishers(agent_settings(broker.port, pki))
        # tls.insecure skips the host name check only, never the certificate chain.
        insecure = publishers(agent_settings(broker.port, pki, client_id="insecure", tls_insecure=True))
        # The same broker is fine for a client that trusts its CA: the refusals are the check.
        trusting_its_ca = publishers(agent_settings(broker.port, pki, client_id="control",
                                                    ca_file=str(pki / "other-ca.pem")))
        assert trusting_its_ca.wait_connected(10)
        assert not by_default.wait_connected(1)
        assert not insecure.wait_connected(0.1)
    finally:
        broker.stop()


def test_a_broker_certificate_for_another_host_is_refused_unless_tls_insecure(broker_dir, pki, publishers):
    broker = tls_broker(broker_dir, pki, server="elsewhere-server")
    try:
        checking = publishers(agent_settings(broker.port, pki))
        insecure = publishers(agent_settings(broker.port, pki, client_id="insecure", tls_insecure=True))
        assert insecure.wait_connected(10)
        assert not checking.wait_connected(1)
    finally:
        broker.stop()


def test_a_refused_broker_certificate_is_named_in_last_error_and_the_log(broker_dir, pki, publishers, caplog):
    caplog.set_level("WARNING", logger="agent.mqtt")
    broker = tls_broker(broker_dir, pki, server="rogue-server")
    try:
        pub = publishers(agent_settings(broker.port, pki))
        wait_until(lambda: pub.last_error is not None, 10)
        assert "certificate verify failed" in pub.last_error.lower() and not pub.connected
        said = [r.getMessage() for r in caplog.records if r.name == "agent.mqtt"]
        assert any("certificate verify failed" in text.lower() for text in said), said
    finally:
        broker.stop()


def test_a_broker_that_requires_client_certificates_admits_only_a_client_with_one(broker_dir, pki, publishers):
    broker = tls_broker(broker_dir, pki, client_certs=True)
    try:
        with_cert = publishers(agent_settings(broker.port, pki, cert_file=str(pki / "client.pem"),
                                              key_file=str(pki / "client.key")))
        without = publishers(agent_settings(broker.port, pki, client_id="no-cert"))
        assert with_cert.wait_connected(10)
        assert not without.wait_connected(1)
    finally:
        broker.stop()


def test_the_acl_drops_a_stray_topic_and_the_broker_log_shows_it(secure_broker, pki, publishers):
    """The control for the topic checks below: a publish outside the agent's roots never reaches
    a subscriber, so only the broker's log can show that the agent tried."""
    sub = reader(secure_broker.port, pki, "#")
    try:
        pub = publishers(agent_settings(secure_broker.port, pki))
        assert pub.wait_connected(10)
        pub.publish(Message("elsewhere/leak", "x"))
        pub.publish(Message(f"{PREFIX}/event/ok", "y"))
        assert pub.flush(10)
        sub.wait_for(lambda m: m[0] == f"{PREFIX}/event/ok")
        with pytest.raises(TimeoutError):
            sub.wait_for(lambda m: m[0] == "elsewhere/leak", timeout=1)
        sent = sent_publishes(secure_broker, AGENT_ID)
        assert outside_roots(sent) == ["elsewhere/leak"]
        assert [p.topic for p in sent if p.denied] == ["elsewhere/leak"]
    finally:
        sub.stop()


# --- the real command --------------------------------------------------------------------------

def write_config(path: Path, port: int, pki: Path, password_file: Path | None = None) -> Path:
    lines = ["mqtt:", f"  port: {port}", f"  client_id: {AGENT_ID}", f"  topic_prefix: {PREFIX}",
             f"  username: {AGENT_USER}"]
    if password_file is not None:
        lines.append(f"  password_file: {password_file}")
    lines += ["  tls:", "    enabled: true", f"    ca_file: {pki / 'ca.pem'}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(config: Path, photo: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config), "--source", str(photo),
                           *extra], capture_output=True, text=True, env=env, timeout=120)


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in (PASSWORD_ENV, "CREDENTIALS_DIRECTORY")}


@dataclass(frozen=True)
class CliRun:
    done: subprocess.CompletedProcess
    received: list  # (topic, payload, retained) the reader got
    sent: list[SentPublish]  # what the broker got from the agent


@pytest.fixture(scope="module", params=["password_file", "environment"])
def cli_run(request, pki, tmp_path_factory, smiling_photo_module) -> CliRun:
    """The real agent on a smiling photo, over TLS with a password, at debug log level, against a
    broker with the ACL; a reader subscribed to everything."""
    tmp = tmp_path_factory.mktemp(f"cli-{request.param}")
    broker = tls_broker(tmp, pki)
    sub = reader(broker.port, pki, "#")
    try:
        env = clean_env()
        if request.param == "password_file":
            secret = tmp / "mqtt_password"
            secret.write_text(AGENT_PASSWORD + "\n")
            config = write_config(tmp / "config.yaml", broker.port, pki, password_file=secret)
        else:
            env[PASSWORD_ENV] = AGENT_PASSWORD
            config = write_config(tmp / "config.yaml", broker.port, pki)
        done = run_cli(config, smiling_photo_module, "--log-level", "debug", env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        # `offline` is the agent's last message: after it, the reader has everything.
        sub.wait_for(lambda m: m[0] == f"{PREFIX}/availability" and m[1] == b"offline")
        return CliRun(done, list(sub.all), sent_publishes(broker, AGENT_ID))
    finally:
        sub.stop()
        broker.stop()


@pytest.fixture(scope="module")
def smiling_photo_module(tmp_path_factory) -> Path:
    import cv2

    from tests.conftest import astronaut_bgr

    path = tmp_path_factory.mktemp("photo") / "astronaut.jpg"
    cv2.imwrite(str(path), astronaut_bgr())
    return path


def test_the_agent_over_tls_with_a_password_reports_the_smile(cli_run):
    changed = [json.loads(p) for t, p, _ in cli_run.received if t == f"{PREFIX}/event/emotion_changed"]
    assert [e["emotion"] for e in changed] == ["happy"]


def test_the_password_never_appears_in_debug_logs(cli_run):
    output = cli_run.done.stdout + cli_run.done.stderr
    assert re.search(r"\bDEBUG\b", output), "debug logging was not on: this check would prove nothing"
    assert AGENT_PASSWORD not in output


def test_the_agent_publishes_only_under_its_root_and_homeassistant(cli_run):
    assert len(cli_run.sent) >= 5  # availability, discovery, events, state, summary, stats
    assert outside_roots(cli_run.sent) == []
    assert [p.topic for p in cli_run.sent if p.denied] == []
    # and everything it sent reached the reader subscribed to `#`
    assert {p.topic for p in cli_run.sent} == {t for t, _, _ in cli_run.received}


def test_no_payload_carries_image_data_or_the_password(cli_run):
    assert max(p.size for p in cli_run.sent) <= 16 * 1024
    for topic, payload, _ in cli_run.received:
        assert len(payload) <= 16 * 1024, topic
        assert not payload.startswith((b"\xff\xd8\xff", b"\x89PNG")), f"an image on {topic}"
        assert b"\xff\xd8\xff" not in payload and b"\x89PNG\r\n" not in payload, f"an image inside {topic}"
        assert not BASE64_BLOB.search(payload), f"a base64 blob (an image?) on {topic}"
        assert AGENT_PASSWORD.encode() not in payload, f"the password on {topic}"


def test_an_encrypted_client_key_is_one_line_not_a_passphrase_prompt(tmp_path):
    # OpenSSL asked for the passphrase: on a terminal check-config waited for it, under a service
    # it printed its prompts and then a misleading "not a PEM certificate" error.
    openssl(tmp_path, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "2",
            "-subj", "/CN=client", "-keyout", "client.key", "-out", "client.pem", "-passout", "pass:xyz")
    config = tmp_path / "config.yaml"
    config.write_text(f"mqtt:\n  tls:\n    enabled: true\n    cert_file: {tmp_path / 'client.pem'}\n"
                      f"    key_file: {tmp_path / 'client.key'}\n")
    done = subprocess.run([sys.executable, "-m", "agent", "check-config", str(config)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, cwd=ROOT, start_new_session=True)
    assert done.returncode == 2  # a config error: systemd does not restart the unit for it
    assert "pass phrase" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"emotion-agent: error: mqtt.tls.key_file: the private key is encrypted with a passphrase, which a service "
        f"cannot type: decrypt it (openssl pkey -in KEY -out PLAIN): {tmp_path / 'client.key'}"]


@pytest.fixture
def start_agent_with_its_own_ca_file(tmp_path: Path, pki: Path, agent_process):
    """Starts the agent over TLS to the broker on `port`, on a looping clip, its CA file a copy of the
    PKI's that a test can replace in place; returns the process and that file."""
    from tests.test_end_to_end import still_video

    def start(port: int) -> tuple[subprocess.Popen, Path]:
        ca_file = tmp_path / "agent-ca.pem"
        shutil.copy(pki / "ca.pem", ca_file)
        secret = tmp_path / "mqtt_password"
        secret.write_text(AGENT_PASSWORD + "\n")
        config = write_config(tmp_path / "config.yaml", port, pki, password_file=secret)
        config.write_text(config.read_text().replace(str(pki / "ca.pem"), str(ca_file)))
        clip = still_video(tmp_path / "clip.avi", seconds=4)
        proc = agent_process("--config", str(config), "--source", str(clip), "--loop", "--realtime", env=clean_env())
        return proc, ca_file
    return start


def test_a_reload_after_the_ca_file_was_renewed_in_place_connects_with_the_new_one(
        pki, tmp_path, start_agent_with_its_own_ca_file):
    # The same path in the config, new contents: the reload kept the connection and its old TLS
    # context, and once the broker served the new CA's certificate the agent never got back in.
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = tls_broker(tmp_path / "first", pki)
    proc, ca_file = start_agent_with_its_own_ca_file(first.port)
    second = None
    try:
        sub = reader(first.port, pki, f"{PREFIX}/#")
        sub.wait_for(lambda m: m[0] == f"{PREFIX}/event/face_appeared", timeout=60)
        sub.stop()
        shutil.copy(pki / "other-ca.pem", ca_file)  # renewed: the broker's next certificate is the other CA's
        proc.send_signal(signal.SIGHUP)
        first.stop()
        second = tls_broker(tmp_path / "second", pki, server="rogue-server", port=first.port)
        later = reader(second.port, pki, f"{PREFIX}/#", ca="other-ca.pem")
        later.wait_for(lambda m: m[0] == f"{PREFIX}/event/face_appeared", timeout=30)
        later.stop()
        code, _, err = stop_agent(proc)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert code == 0, err[-3000:]
    assert "SIGHUP: the TLS files changed: connecting again with them" in err


def test_a_reload_while_the_ca_file_is_half_written_keeps_the_connection(secure_broker, pki,
                                                                         start_agent_with_its_own_ca_file):
    # Other contents that do not load (a copy under way): the connection was closed for them, the
    # new one could not be made, nor the old config's, and the daemon exited.
    proc, ca_file = start_agent_with_its_own_ca_file(secure_broker.port)
    sub = reader(secure_broker.port, pki, f"{PREFIX}/#")
    try:
        sub.wait_for(lambda m: m[0] == f"{PREFIX}/event/face_appeared", timeout=60)
        ca_file.write_text("")
        reload_and_wait_for(proc, sub, f"{PREFIX}/event/face_appeared")
    finally:
        sub.stop()
    assert proc.poll() is None
    code, _, err = stop_agent(proc)
    assert code == 0, err[-3000:]
    assert "the broker connection keeps the TLS files it has" in err
    assert err.count("connected to broker") == 1


def test_the_agent_with_a_wrong_password_exits_non_zero_with_one_line(secure_broker, pki, tmp_path, smiling_photo):
    secret = tmp_path / "mqtt_password"
    secret.write_text("wrong-password\n")
    config = write_config(tmp_path / "config.yaml", secure_broker.port, pki, password_file=secret)
    done = run_cli(config, smiling_photo, "--flush-timeout", "2", env=clean_env())
    assert done.returncode == 1, done.stderr[-3000:]
    assert "refused the connection: Not authorized" in done.stderr  # logged as it happens
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("emotion-agent: error:") and "failed: Not authorized" in last, last
    assert "Traceback" not in done.stderr and AGENT_PASSWORD not in done.stderr


def test_the_agent_facing_a_broker_certificate_from_another_ca_exits_naming_it(broker_dir, pki, tmp_path,
                                                                               smiling_photo):
    broker = tls_broker(broker_dir, pki, server="rogue-server")
    try:
        config = write_config(tmp_path / "config.yaml", broker.port, pki)
        env = {**clean_env(), PASSWORD_ENV: AGENT_PASSWORD}
        done = run_cli(config, smiling_photo, "--flush-timeout", "2", env=env)
        assert done.returncode == 1, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("emotion-agent: error:") and "certificate verify failed" in last, last
        assert "Traceback" not in done.stderr
    finally:
        broker.stop()


def test_a_password_in_the_environment_without_a_user_name_is_not_silently_dropped(monkeypatch, caplog):
    from agent.config import PASSWORD_ENV, load_config
    from agent.pipeline import make_publisher_from
    from agent.topics import Topics

    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    with caplog.at_level(logging.WARNING, logger="agent.pipeline"):
        publisher = make_publisher_from(load_config(None), Topics("t/a"), lambda *_: None)
    assert publisher.settings.password is None
    assert any("mqtt.username is not" in r.getMessage() for r in caplog.records)
    assert not any("s3cret" in r.getMessage() for r in caplog.records)


def test_check_config_keeps_a_camera_password_out_of_its_ok_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("source: rtsp://admin:hunter2@127.0.0.1:8554/live\n")
    done = subprocess.run([sys.executable, "-m", "agent", "check-config", str(config)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "OK (source rtsp://admin:***@127.0.0.1:8554/live: stream" in done.stdout
    assert "hunter2" not in done.stdout + done.stderr
