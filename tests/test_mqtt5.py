"""MQTT 5 against real mosquitto processes: what the broker refuses is said and counted, where MQTT
3.1.1 had it acknowledged as delivered, and a file run that had messages refused fails; `mqtt.protocol`;
and the fall back to 3.1.1 for a broker that speaks nothing newer (mosquitto before 1.6), played by a
small server in front of a real mosquitto."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import threading
from typing import Callable

import pytest

from agent.config import load_config
from agent.mqtt import BrokerSettings, Message
from agent.pipeline import make_publisher_from
from agent.topics import Topics
from tests.conftest import is_msg, wait_until

AVAIL = "test/agent/availability"
USER, PASSWORD = "agent", "agent-pass-123"
READER = ("reader", "reader-pass-123")
USERS = {USER: PASSWORD, READER[0]: READER[1]}
ACL = f"user {USER}\ntopic readwrite test/agent/#\n\nuser {READER[0]}\ntopic read #\n"
DENIED = "homeassistant/sensor/agent/dominant_emotion/config"
BIRTH = "homeassistant/status"
# mosquitto's line for each connection: the client id, the protocol (p2: 3.1.1, p5: 5), clean start.
CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(p(\d), c(\d)")


def settings(port: int, **overrides) -> BrokerSettings:
    values = dict(host="127.0.0.1", port=port, client_id="agent-under-test", availability_topic=AVAIL,
                  username=USER, password=PASSWORD, reconnect_min_s=1, reconnect_max_s=1)
    values.update(overrides)
    return BrokerSettings(**values)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "agent.mqtt" and r.levelno >= logging.WARNING]


def stays_below(count, limit: int, seconds: float) -> bool:
    """Whether `count()` stays below `limit` for `seconds`."""
    try:
        wait_until(lambda: count() >= limit, seconds)
    except AssertionError:
        return True
    return False


# --- refusals --------------------------------------------------------------------------------------

@pytest.fixture
def held(restricted_broker, publishers, subscriber_factory, caplog):
    """A publisher connected to a broker that holds it to ACL and to `extra` config lines, and a
    subscriber to everything there."""
    def make(extra: str = "", **overrides):
        broker = restricted_broker(USERS, ACL, extra=extra)
        sub = subscriber_factory(broker.port, "#", login=READER)
        caplog.set_level(logging.INFO, logger="agent.mqtt")
        pub = publishers(settings(broker.port, **overrides))
        assert pub.wait_connected(10)
        return pub, sub

    return make


def test_a_topic_the_acl_denies_is_one_warning_counted_and_the_other_topics_still_arrive(held, caplog):
    # Under 3.1.1 mosquitto acknowledges a denied message as delivered: Home Assistant showed no
    # entity, and neither it nor the agent's log said why. (QoS 1 only: at QoS 2 the refusal is in
    # the PUBREC, which paho answers as if the broker took the message, and does not pass on.)
    qos = 1
    pub, sub = held(qos=qos)
    for i in range(50):
        pub.publish(Message(DENIED, str(i), qos=qos))
        pub.publish(Message("test/agent/event/face_appeared", str(i), qos=qos))
    assert pub.flush(10) and pub.pending() == 0  # nothing refused is waited for, nor sent again
    sub.wait_for(is_msg("test/agent/event/face_appeared", b"49"))
    assert pub.refused == 50
    assert warnings_of(caplog) == [f"the broker refused a message to {DENIED}: Not authorized "
                                   "(check the broker's ACL for this user/topic)"]


def test_a_message_over_the_maximum_packet_size_of_the_connack_is_not_sent(held, caplog):
    # paho does not check the broker's Maximum Packet Size: mosquitto hung up on the message, and
    # paho sent it again at every reconnect.
    pub, sub = held("max_packet_size 1000\n")
    pub.publish(Message("test/agent/big", "x" * 2000))
    pub.publish(Message("test/agent/fits", "x" * 977))  # 1000 bytes as a packet
    assert pub.flush(10)
    sub.wait_for(lambda m: m[0] == "test/agent/fits")
    assert pub.refused == 1
    assert stays_below(lambda: pub.connects, 2, 2)
    assert warnings_of(caplog) == ["not sending a message to test/agent/big: 2022 bytes, and the broker takes at "
                                   "most 1000 (the broker's max_packet_size or message_size_limit)"]


@pytest.mark.parametrize("limit, protocol, retain", [
    ("max_packet_size", "3.1.1", False), ("max_packet_size", "3.1.1", True), ("message_size_limit", "5", False)],
    ids=["3.1.1-event", "3.1.1-retained", "5-message_size_limit"])
def test_a_message_the_broker_hangs_up_on_twice_is_dropped_not_sent_forever(held, caplog, limit, protocol, retain):
    # Under 3.1.1 mosquitto hangs up on a packet over max_packet_size and says nothing more; paho
    # sent it again at every reconnect, forever, and nothing behind it ever arrived. Under 5 it
    # answers one over message_size_limit with PUBACK 149 (Packet too large), which paho 2.x takes
    # for a malformed packet: paho hangs up itself.
    pub, sub = held(f"{limit} 1000\n", protocol=protocol)
    pub.publish(Message("test/agent/big", "x" * 2000, retain=retain))
    pub.publish(Message("test/agent/event/face_appeared", "behind it"))
    assert pub.flush(20)
    sub.wait_for(is_msg("test/agent/event/face_appeared", b"behind it"))
    assert pub.refused == 1
    connects = pub.connects
    assert connects == 3  # hung up on at the first send, and at the one after the reconnect
    assert stays_below(lambda: pub.connects, connects + 1, 2)
    dropped = [text for text in warnings_of(caplog) if not text.startswith("lost the broker connection")]
    assert dropped == ["dropped a message to test/agent/big: the broker closed the connection each time it was "
                       "sent (larger than it takes, or outside its ACL?)"]


@pytest.mark.parametrize("protocol, reason", [("5", "Not authorized"), ("3.1.1", "Unspecified error")])
def test_a_subscription_the_acl_refuses_is_one_warning_that_names_the_topic(
        restricted_broker, publishers, caplog, protocol, reason):
    # The SUBACK's refusal went unread: Home Assistant's birth message never came, so discovery was
    # not re-sent when it restarted, and nothing said why.
    broker = restricted_broker({USER: PASSWORD}, [("publishClientSend", "test/agent/#")])
    caplog.set_level(logging.INFO, logger="agent.mqtt")
    pub = publishers(settings(broker.port, protocol=protocol), subscriptions={BIRTH: lambda *message: None})
    told = [f"the broker refused the subscription to {BIRTH}: {reason} (check the broker's ACL: this user needs "
            f"to read {BIRTH})"]
    wait_until(lambda: warnings_of(caplog) == told, 10)
    broker.stop()
    broker.start()
    wait_until(lambda: pub.connects == 2, 15)
    pub.publish(Message("test/agent/event/face_appeared", "after the SUBACK"))  # answered after it
    assert pub.flush(10)
    assert [text for text in warnings_of(caplog) if "subscription" in text] == told  # not again at the reconnect


def test_a_file_run_that_had_messages_refused_fails_and_says_so(restricted_broker, smiling_photo, tmp_path):
    # The README promises exit 0 only once the broker has every message; a run whose events the
    # ACL refused exited 0.
    broker = restricted_broker({USER: PASSWORD}, f"user {USER}\n" + "".join(
        f"topic write test/agent/{topic}\n" for topic in ("availability", "state", "stats", "summary")))
    config = tmp_path / "config.yaml"
    config.write_text(f"mqtt:\n  port: {broker.port}\n  username: {USER}\n  client_id: agent-file-run\n"
                      "  topic_prefix: test/agent\n  discovery:\n    enabled: false\n")
    done = subprocess.run([sys.executable, "-m", "agent", "run", "--source", str(smiling_photo), "--config",
                           str(config), "--flush-timeout", "30"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "EMOTION_AGENT_MQTT_PASSWORD": PASSWORD})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert re.fullmatch(rf"emotion-agent: error: \d+ message\(s\) refused by broker 127.0.0.1:{broker.port} "
                        r"\(the warnings above name their topics\)", lines[-1]), lines[-1]
    assert any("the broker refused a message to test/agent/event/face_appeared: Not authorized" in line
               for line in lines), done.stderr
    assert "Traceback" not in done.stderr


# --- the protocol ----------------------------------------------------------------------------------

@pytest.mark.parametrize("written, level", [("5", "5"), ("'5'", "5"), ("auto", "5"), ("'3.1.1'", "2")])
def test_mqtt_protocol_is_what_the_broker_sees_with_a_clean_start_every_time(broker, tmp_path, written, level):
    config = tmp_path / "config.yaml"
    config.write_text(f"mqtt:\n  port: {broker.port}\n  client_id: protocol-{level}\n  protocol: {written}\n")
    pub = make_publisher_from(load_config(config), Topics("test/agent"), on_birth=lambda *message: None)
    pub.start()
    try:
        assert pub.wait_connected(10)
        broker.stop()
        broker.start()
        wait_until(lambda: pub.connects == 2, 15)
    finally:
        pub.close(1)
    # As 3.1.1's clean session: paho's MQTT 5 default starts clean on the first connection only.
    seen = [(p, clean) for client, p, clean in CONNECTED.findall(broker.log.read_text())
            if client == f"protocol-{level}"]
    assert seen == [(level, "1"), (level, "1")]


class FrontOfMosquitto:
    """A small server in front of the real mosquitto at `upstream_port`, to play a broker that does
    what Debian's mosquitto 2.0 does not: `_serve` gets each connection, `_relay` hands it on."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._open: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _relay(self, conn: socket.socket, connect: bytes | socket.socket,
               farewell: Callable[[], bytes] = bytes) -> None:
        """Hand `conn`, whose CONNECT was read, to mosquitto until either end closes; `farewell()` goes
        to the client once mosquitto has closed its side. `connect`: the CONNECT to send, or the
        connection to mosquitto it went out on."""
        upstream = connect if isinstance(connect, socket.socket) else self._upstream(connect)
        self._open += [conn, upstream]
        # The client's side is closed after its farewell, by the second pipe alone: the first, failing
        # to write to a mosquitto that just dropped it, would close it before the farewell.
        threading.Thread(target=pipe, args=(conn, upstream), kwargs={"closes": (upstream,)}, daemon=True).start()
        pipe(upstream, conn, farewell)

    def _upstream(self, connect: bytes) -> socket.socket:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        upstream.sendall(connect)
        return upstream

    def drop_connections(self) -> None:
        for sock in self._open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._open.clear()

    def close(self) -> None:
        self._listener.close()
        self.drop_connections()


class Mqtt311OnlyBroker(FrontOfMosquitto):
    """A broker that speaks MQTT 3.1.1 and older only, as mosquitto 1.5 (Raspbian buster) does: it
    answers an MQTT 5 CONNECT with return code 1, unacceptable protocol version, and hangs up. Any
    other connection it hands, CONNECT and all, to the real mosquitto at `upstream_port`."""

    def __init__(self, upstream_port: int, answers_mqtt5: bool = True):
        self.answers_mqtt5 = answers_mqtt5  # False: hang up without a word, as RabbitMQ 3.10 does
        self.levels: list[int] = []  # the protocol level of each CONNECT, in order
        super().__init__(upstream_port)

    def _serve(self, conn: socket.socket) -> None:
        connect = read_packet(conn)
        level = connect[connect.index(b"MQTT") + 4]
        self.levels.append(level)
        if level == 5:
            if self.answers_mqtt5:
                conn.sendall(bytes.fromhex("20020001"))
            conn.close()
            return
        self._relay(conn, connect)


class SaysSessionTakenOver(FrontOfMosquitto):
    """A broker that tells an MQTT 5 client why it drops it for another client with its client id:
    DISCONNECT with reason code 142, Session taken over, then the socket closed, as ejabberd and
    mosquitto's development branch do. The mosquitto 2.0 behind it only closes the socket."""

    def __init__(self, upstream_port: int):
        self._newest: dict[str, socket.socket] = {}  # client id: its latest connection
        self._connecting = threading.Lock()
        super().__init__(upstream_port)

    def _serve(self, conn: socket.socket) -> None:
        connect = read_packet(conn)
        client_id = client_id_of(connect)
        mqtt5 = connect[connect.index(b"MQTT") + 4] == 5
        # One CONNECT at a time, up to its CONNACK: then mosquitto has dropped the older connection
        # before the next comes, and "newest" is in mosquitto's order. Two clients that connected at
        # once could reach it in the other order, and the one it dropped got no farewell.
        with self._connecting:
            self._newest[client_id] = conn
            upstream = self._upstream(connect)
            conn.sendall(read_packet(upstream))
        self._relay(conn, upstream, lambda: bytes.fromhex("e0018e") if mqtt5 and self._newest[client_id] is not conn
                    else b"")


def read_varint(data: bytes, at: int) -> tuple[int, int]:
    """MQTT's variable byte integer at `at`: its value, and where what follows it starts."""
    value, shift = 0, 0
    while True:
        value |= (data[at] & 0x7F) << shift
        shift += 7
        at += 1
        if data[at - 1] < 0x80:
            return value, at


def client_id_of(connect: bytes) -> str:
    at = connect.index(b"MQTT") + 4
    level, at = connect[at], at + 4  # the level, the flags and the keep alive
    if level == 5:
        properties, at = read_varint(connect, at)
        at += properties
    size = int.from_bytes(connect[at:at + 2], "big")
    return connect[at + 2:at + 2 + size].decode()


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed mid-packet")
        data += chunk
    return data


def read_packet(conn: socket.socket) -> bytes:
    """One MQTT packet, its fixed header included."""
    header = read_exactly(conn, 2)
    while header[-1] >= 0x80:  # the remaining length goes on
        header += read_exactly(conn, 1)
    remaining, _ = read_varint(header, 1)
    return header + read_exactly(conn, remaining)


def pipe(source: socket.socket, sink: socket.socket, farewell: Callable[[], bytes] = bytes,
         closes: tuple[socket.socket, ...] | None = None) -> None:
    """Copy `source` to `sink` until `source` ends or fails, then `farewell()`; then close `closes`
    (both by default). The farewell follows a reset too: mosquitto resets a connection it drops
    with the client's next packet unread."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    try:
        sink.sendall(farewell())
    except OSError:
        pass
    for sock in (source, sink) if closes is None else closes:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@pytest.fixture
def mqtt311_only(shared_broker):
    made = []

    def make(answers_mqtt5: bool = True) -> Mqtt311OnlyBroker:
        made.append(Mqtt311OnlyBroker(shared_broker.port, answers_mqtt5))
        return made[-1]

    yield make
    for old in made:
        old.close()


@pytest.mark.parametrize("answers_mqtt5, what", [
    (True, "does not speak MQTT 5"),  # mosquitto 1.5: a CONNACK with return code 1
    (False, "closed an MQTT 5 connection before accepting it, and took MQTT 3.1.1"),  # RabbitMQ 3.10: no CONNACK
], ids=["refuses", "hangs-up"])
def test_auto_speaks_3_1_1_from_then_on_to_a_broker_that_refuses_mqtt_5(
        shared_broker, mqtt311_only, publishers, subscriber_factory, caplog, answers_mqtt5, what):
    old = mqtt311_only(answers_mqtt5)
    sub = subscriber_factory(shared_broker.port, "test/agent/#")
    caplog.set_level(logging.INFO, logger="agent.mqtt")
    pub = publishers(settings(old.port, username=None, password=None))
    assert pub.wait_connected(10)
    pub.publish(Message("test/agent/event/face_appeared", "through 3.1.1"))
    assert pub.flush(10)
    sub.wait_for(is_msg("test/agent/event/face_appeared", b"through 3.1.1"))
    old.drop_connections()
    wait_until(lambda: pub.connects == 2, 10)
    assert old.levels == [5, 4, 4]  # not MQTT 5 again at the reconnect
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "agent.mqtt"]
    assert [(level, text) for level, text in said if "MQTT" in text] == [
        ("INFO", f"broker 127.0.0.1:{old.port} {what}: using MQTT 3.1.1, under which it does not say "
                 "when it refuses a message")]
    assert not [text for level, text in said if level == "ERROR" or "retrying" in text]  # no hang-up warning
    assert pub.last_error is None


def test_mqtt_5_only_against_a_3_1_1_broker_is_one_line_that_says_what_to_set(mqtt311_only, publishers, caplog):
    old = mqtt311_only()
    caplog.set_level(logging.INFO, logger="agent.mqtt")
    pub = publishers(settings(old.port, protocol="5", username=None, password=None))
    wait_until(lambda: len(old.levels) >= 3, 10)  # three tries, a second apart
    assert not pub.connected and set(old.levels) == {5}
    said = [r.getMessage() for r in caplog.records if r.name == "agent.mqtt"]
    assert said == [f"broker 127.0.0.1:{old.port} refused the connection: Unsupported protocol version (the broker "
                    "speaks MQTT 3.1.1 only: set mqtt.protocol to auto or 3.1.1); retrying"]


# --- two agents with one client id -----------------------------------------------------------------

@pytest.fixture
def says_taken_over(shared_broker):
    front = SaysSessionTakenOver(shared_broker.port)
    yield front
    front.close()


def test_a_session_taken_over_is_one_warning_that_names_the_client_id_not_lines_at_every_round(
        says_taken_over, publishers, caplog):
    # Two agents with one client id knock each other off at every reconnect. The broker said why, but
    # the log had "lost the broker connection (Session taken over)" three times from each, then a
    # guess at the cause, and "connected to broker" every second for as long as both ran.
    caplog.set_level(logging.INFO, logger="agent.mqtt")
    same = settings(says_taken_over.port, client_id="emotion-agent-pi4", protocol="5", username=None, password=None)
    first, second = publishers(same), publishers(same)
    wait_until(lambda: first.connects + second.connects >= 6, 20)  # each taken over twice at least
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "agent.mqtt"]
    told = ("WARNING", "the broker disconnected this agent because another client connected with the same client id "
            "'emotion-agent-pi4': is a second agent running with the same mqtt.client_id or mqtt.topic_prefix? "
            "Reconnecting")
    assert said.count(told) == 2  # once from each
    connected = ("INFO", f"connected to broker 127.0.0.1:{says_taken_over.port}")
    assert [line for line in said if line != told] == [connected] * 2  # the first connection of each only


def test_a_session_taken_over_is_told_again_after_a_while(says_taken_over, publishers, caplog, monkeypatch):
    # Said once a run, a second agent with the same id started days later went unsaid.
    import agent.mqtt

    monkeypatch.setattr(agent.mqtt, "TAKEOVER_RETOLD_S", 1.5)
    caplog.set_level(logging.INFO, logger="agent.mqtt")
    same = settings(says_taken_over.port, client_id="emotion-agent-pi4", protocol="5", username=None, password=None)
    publishers(same), publishers(same)
    told = lambda: [r for r in caplog.records if r.levelno == logging.WARNING and "same client id" in r.getMessage()]
    wait_until(lambda: len(told()) >= 4, 20)  # twice from each, in rounds a second or so apart
