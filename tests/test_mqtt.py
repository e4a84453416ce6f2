"""The MQTT publisher against a real mosquitto: availability, Last Will, outages, ordering."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from agent.mqtt import BrokerSettings, Message, MqttPublisher
from tests.conftest import Broker, Subscriber, free_port, is_msg

AVAIL = "test/agent/availability"


def make_publisher(port: int, **overrides) -> MqttPublisher:
    settings = BrokerSettings(host="127.0.0.1", port=port, client_id=overrides.pop("client_id", "agent-under-test"),
                              availability_topic=AVAIL, reconnect_min_s=1, reconnect_max_s=2, **overrides)
    return MqttPublisher(settings)


def test_connect_publishes_retained_online_and_close_publishes_offline(broker, subscriber_factory):
    pub = make_publisher(broker.port)
    pub.start()
    assert pub.wait_connected(10) and pub.flush(10)  # the broker holds `online` before anyone subscribes
    late = subscriber_factory(broker.port, AVAIL)  # subscribes after: sees the retained value
    late.wait_for(is_msg(AVAIL, b"online", retained=True))
    pub.close()
    late.wait_for(is_msg(AVAIL, b"offline"))
    fresh = subscriber_factory(broker.port, AVAIL)
    fresh.wait_for(is_msg(AVAIL, b"offline", retained=True))


def test_last_will_marks_a_vanished_agent_offline(broker, subscriber_factory):
    sub = subscriber_factory(broker.port, AVAIL)
    script = textwrap.dedent(f"""
        import time
        from agent.mqtt import BrokerSettings, MqttPublisher
        p = MqttPublisher(BrokerSettings(host="127.0.0.1", port={broker.port}, client_id="doomed",
                                         availability_topic="{AVAIL}"))
        p.start(); assert p.wait_connected(10); print("up", flush=True); time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        sub.wait_for(is_msg(AVAIL, b"online"))
        proc.kill()  # no DISCONNECT: the broker must send the Will
        sub.wait_for(is_msg(AVAIL, b"offline"), timeout=15)
    finally:
        proc.kill()
        proc.wait()


def test_events_published_before_the_broker_exists_arrive_in_order(persistent_broker, subscriber_factory):
    broker = persistent_broker
    # A persistent subscriber session, as Home Assistant or Node-RED would have.
    sub = subscriber_factory(broker.port, "test/events", client_id="listener", clean_session=False)
    broker.stop()
    pub = make_publisher(broker.port, qos=1)
    pub.start()  # no broker: must not raise, must keep trying
    for i in range(20):
        pub.publish(Message("test/events", json.dumps({"n": i})))
    assert not pub.connected and pub.pending() == 20
    broker.start()
    try:
        assert pub.flush(20)
        for i in range(20):
            sub.wait_for(lambda item, i=i: item[0] == "test/events" and json.loads(item[1])["n"] == i, timeout=15)
        received = [json.loads(p)["n"] for t, p, _ in sub.all if t == "test/events"]
        assert sorted(set(received)) == list(range(20))
        first_seen = [n for k, n in enumerate(received) if n not in received[:k]]
        assert first_seen == list(range(20))
        assert pub.dropped == 0
    finally:
        pub.close()


def test_broker_restart_loses_no_event_and_republishes_retained_state(persistent_broker, subscriber_factory):
    broker = persistent_broker
    sub = subscriber_factory(broker.port, ["test/events", "test/state", AVAIL], client_id="listener",
                             clean_session=False)
    pub = make_publisher(broker.port, qos=1)
    pub.start()
    try:
        assert pub.wait_connected(10)
        pub.publish(Message("test/state", "before", retain=True))
        for i in range(10):
            pub.publish(Message("test/events", str(i)))
        assert pub.flush(10)
        # Let the broker hand these on before it goes down: what it held in flight to a subscriber
        # at its own shutdown is the broker's business, not the agent's.
        sub.wait_for(is_msg("test/events", b"9"))
        broker.stop()
        for i in range(10, 30):  # produced during the outage
            pub.publish(Message("test/events", str(i)))
        pub.publish(Message("test/state", "during", retain=True))
        broker.start()
        assert pub.flush(20)
        for i in range(30):
            sub.wait_for(is_msg("test/events", str(i).encode()), timeout=15)
        # availability and the latest retained state are back after the restart
        assert pub.connects >= 2
        sub.wait_for(is_msg("test/state", b"during"), timeout=10)
        fresh = subscriber_factory(broker.port, ["test/state", AVAIL])
        fresh.wait_for(is_msg("test/state", b"during", retained=True))
        fresh.wait_for(is_msg(AVAIL, b"online", retained=True))
    finally:
        pub.close()


@pytest.mark.parametrize("qos", [0, 1])
def test_a_full_outage_queue_delivers_the_oldest_in_order_and_counts_the_newest_dropped(tmp_path, qos):
    port = free_port()
    broker = Broker(tmp_path, persistent=True, port=port, extra_config=(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nqueue_qos0_messages true\n"))
    broker.start()
    # A persistent subscriber, away during the delivery: the broker keeps what it missed.
    away = Subscriber(broker.port, "test/events", client_id="away", clean_session=False).start()
    away.stop()
    broker.stop()
    pub = make_publisher(broker.port, qos=qos, queue_size=5)
    pub.start()
    try:
        for i in range(12):
            pub.publish(Message("test/events", str(i)))
        assert pub.dropped == 7
        assert pub.pending() == 5
        broker.start()
        assert pub.flush(15)
        back = Subscriber(broker.port, "test/events", client_id="away", clean_session=False).start()
        try:
            back.wait_for(lambda item: item[1] == b"4")
            assert [p for _, p, _ in back.all] == [b"0", b"1", b"2", b"3", b"4"]
        finally:
            back.stop()
    finally:
        pub.close()
        broker.stop()


def test_flush_reports_undelivered_messages_when_no_broker(broker):
    broker.stop()
    pub = make_publisher(broker.port, qos=1)
    pub.start()
    pub.publish(Message("test/events", "x"))
    try:
        assert pub.flush(0.5) is False
        assert pub.pending() == 1
    finally:
        pub.close()


def test_subscription_handler_gets_home_assistant_birth(broker, subscriber_factory):
    got = []
    settings = BrokerSettings(host="127.0.0.1", port=broker.port, client_id="agent-birth", availability_topic=AVAIL)
    pub = MqttPublisher(settings, subscriptions={"homeassistant/status": lambda t, p: got.append(p)})
    pub.start()
    try:
        assert pub.wait_connected(10)
        other = subscriber_factory(broker.port, "nothing")
        import time
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            other.client.publish("homeassistant/status", "online", qos=1)
            time.sleep(0.2)
        assert got and got[0] == b"online"
    finally:
        pub.close()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_every_qos_delivers(broker, subscriber_factory, qos):
    sub = subscriber_factory(broker.port, "test/q")
    pub = make_publisher(broker.port, qos=qos)
    pub.start()
    try:
        assert pub.wait_connected(10)
        pub.publish(Message("test/q", "hello", qos=qos))
        assert pub.flush(5)
        sub.wait_for(is_msg("test/q", b"hello"))
    finally:
        pub.close()


def test_an_unreachable_broker_is_one_warning_not_an_error_per_retry(broker, caplog):
    broker.stop()
    pub = make_publisher(broker.port, qos=1)
    with caplog.at_level(logging.INFO):
        pub.start()
        pub.publish(Message("test/events", "x"))
        assert not pub.flush(3.5)  # three retries at 1 s
        pub.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings if "cannot connect" in r.getMessage()][:1]
    assert not [r for r in warnings if r.levelno >= logging.ERROR], [r.getMessage() for r in warnings]


def test_qos0_messages_cut_off_by_a_broker_crash_are_sent_after_the_reconnect(tmp_path, subscriber_factory):
    # paho drops the QoS 0 packets it has not written when it reconnects, without a callback:
    # unless the publisher takes them back, they are lost, and pending() never falls to 0 again.
    broker = Broker(tmp_path)
    broker.start()
    settings = BrokerSettings(host="127.0.0.1", port=broker.port, client_id="agent-qos0", availability_topic=AVAIL,
                              qos=0, reconnect_min_s=2, reconnect_max_s=2)
    pub = MqttPublisher(settings)
    pub.start()
    try:
        assert pub.wait_connected(10)
        os.kill(broker.process.pid, signal.SIGSTOP)  # a hung broker: the socket fills, paho queues the rest
        padding = "x" * 200_000
        for i in range(40):
            pub.publish(Message("test/events", f"{i:02d}:{padding}", qos=0))
        deadline = time.monotonic() + 5
        while pub.pending() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pub.pending() > 0
        os.kill(broker.process.pid, signal.SIGKILL)
        broker.process.wait()
        broker.start()
        sub = subscriber_factory(broker.port, "test/events")  # in before the publisher's retry, 2 s on
        assert pub.flush(20)
        assert pub.pending() == 0
        sub.wait_for(lambda item: item[1].startswith(b"39:"), timeout=10)
        got = [int(p[:2]) for _, p, _ in sub.all]
        # What the dead broker had read is gone (QoS 0); what paho still held arrives, in order.
        assert got == list(range(got[0], 40))
    finally:
        pub.close(1)
        broker.stop()


def test_a_retained_value_in_flight_when_the_link_drops_does_not_outlive_a_newer_one(tmp_path, subscriber_factory):
    # paho re-sends what was in flight at the disconnect after the connect callback, which sends
    # the latest retained values: the broker ended on the older state, and Home Assistant showed it.
    broker = Broker(tmp_path)
    broker.start()
    pub = make_publisher(broker.port, client_id="agent-replay")
    pub.start()
    try:
        assert pub.wait_connected(10)
        pub.publish(Message("test/state", "S0", retain=True))
        assert pub.flush(5)
        os.kill(broker.process.pid, signal.SIGSTOP)  # S1 goes out and is never acknowledged
        pub.publish(Message("test/state", "S1", retain=True))
        time.sleep(0.3)
        os.kill(broker.process.pid, signal.SIGKILL)
        broker.process.wait()
        deadline = time.monotonic() + 5
        while pub.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pub.connected
        pub.publish(Message("test/state", "S2", retain=True))  # the newest, during the outage
        broker.start()
        assert pub.wait_connected(10)
        assert pub.flush(10)
        sub = subscriber_factory(broker.port, "test/state")
        topic, payload, retained = sub.wait_for(is_msg("test/state"), timeout=5)
        assert (payload, retained) == (b"S2", True)
    finally:
        pub.close(1)
        broker.stop()


def test_two_agents_with_one_client_id_are_told_so(broker, caplog):
    # The broker drops a client when another connects with its id: they take turns forever, and
    # "lost the broker connection" alone does not say why.
    first, second = make_publisher(broker.port, client_id="same-id"), make_publisher(broker.port, client_id="same-id")
    def drops_since(told: int, level: int = logging.DEBUG, said: str = "lost the broker connection") -> list[str]:
        return [r.getMessage() for r in caplog.records[told:] if r.levelno >= level and r.getMessage().startswith(said)]

    with caplog.at_level(logging.DEBUG, logger="agent.mqtt"):
        first.start()
        second.start()
        try:
            deadline = time.monotonic() + 20
            while "using the client id 'same-id'" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.2)
            told = len(caplog.records)
            # They go on taking turns, a drop a second or so: wait until six more were logged at all.
            deadline = time.monotonic() + 30
            while len(drops_since(told)) < 6 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(drops_since(told)) >= 6, "the two clients stopped taking turns"
            after = drops_since(told, logging.WARNING)
            connects_after = drops_since(told, logging.INFO, "connected to broker")
        finally:
            first.close(1)
            second.close(1)
    assert "is another client using the client id 'same-id'? (set mqtt.client_id)" in caplog.text
    # Said, the rest is not a warning a second, nor an info line, for as long as it lasts.
    assert len(after) <= 2, after
    assert len(connects_after) <= 2, connects_after


def _close_seconds(pub: MqttPublisher, timeout: float) -> float:
    started = time.monotonic()
    pub.close(timeout)
    return time.monotonic() - started


def test_close_does_not_wait_out_the_keepalive_of_a_broker_that_never_answers():
    # A broker that takes the TCP connection and then says nothing (hung, or not MQTT at all):
    # paho keeps its thread alive until the 30 s keepalive gives up, beyond systemd's stop timeout.
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
    pub = make_publisher(listener.getsockname()[1], keepalive_s=30)
    pub.start()
    try:
        deadline = time.monotonic() + 5
        while not held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held, "paho never opened the connection"
        pub.publish(Message("test/events", "waiting", qos=1))
        assert _close_seconds(pub, 1) < 8
    finally:
        listener.close()
        for conn, _ in held:
            conn.close()


def test_close_does_not_wait_out_the_keepalive_of_a_broker_that_hangs(tmp_path):
    # Connected, then the broker stops reading: the socket fills, so not even the DISCONNECT can
    # be written, and paho's thread would live on until the keepalive (30 s) closed the socket.
    broker = Broker(tmp_path)
    broker.start()
    pub = make_publisher(broker.port, keepalive_s=30)
    pub.start()
    try:
        assert pub.wait_connected(10)
        os.kill(broker.process.pid, signal.SIGSTOP)
        padding = "x" * 200_000
        for i in range(40):
            pub.publish(Message("test/events", f"{i:02d}:{padding}", qos=1))
        assert _close_seconds(pub, 1) < 8
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
        broker.stop()


def test_a_flush_waits_for_a_retained_value_published_before_the_first_connection(broker, subscriber_factory):
    # It counted only the queue and what was in flight: a retained value kept for the first
    # connection was not waited for, and a run that published nothing else could end without it.
    broker.stop()
    pub = make_publisher(broker.port)
    pub.start()
    try:
        pub.publish(Message("test/agent/state", "kept", retain=True))
        assert pub.pending() == 1
        assert not pub.flush(0.5)
        broker.start()
        assert pub.flush(10) and pub.pending() == 0
    finally:
        pub.close(1)
    fresh = subscriber_factory(broker.port, "test/agent/state")
    assert fresh.wait_for(lambda m: m[2], timeout=5)[1] == b"kept"


def test_an_empty_retained_message_is_delivered_once_not_re_sent_with_the_retained_values(broker,
                                                                                         subscriber_factory):
    # Emptying a topic someone used to own: re-sent on every reconnect and Home Assistant birth,
    # it would wipe whatever the topic's new owner retains there.
    pub = make_publisher(broker.port)
    pub.publish(Message("test/old/state", "", retain=True))
    assert pub.pending() == 1  # before the first connection: a flush waits for it
    pub.start()
    other = make_publisher(broker.port, client_id="new-owner")
    other.start()
    try:
        assert pub.flush(10) and pub.pending() == 0
        other.publish(Message("test/old/state", "theirs", retain=True))
        assert other.flush(10)
        pub.republish_retained()
        assert pub.flush(10)
        fresh = subscriber_factory(broker.port, "test/old/state")
        assert fresh.wait_for(lambda m: m[2])[1] == b"theirs"
    finally:
        pub.close(1)
        other.close(1)



def test_a_listener_that_never_answers_is_one_warning_that_says_so(caplog):
    # Something that takes the connection and never speaks MQTT: paho gives up after a keepalive.
    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept_forever():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    pub = make_publisher(listener.getsockname()[1], keepalive_s=1)
    try:
        with caplog.at_level(logging.INFO, logger="agent.mqtt"):
            pub.start()
            deadline = time.monotonic() + 15
            while len(held) < 3 and time.monotonic() < deadline:  # three tries, all silent
                time.sleep(0.05)
        assert len(held) >= 3
    finally:
        pub.close(1)
        listener.close()
        for conn in held:
            conn.close()
    said = [r.getMessage() for r in caplog.records if r.name == "agent.mqtt"]
    assert said == [f"broker 127.0.0.1:{pub.settings.port} did not answer the "
                    "connection within 1 s; retrying (is this its MQTT port?)"]


def test_a_lost_connection_is_reported_with_its_own_reason_not_an_earlier_retrys(tmp_path, caplog):
    # paho's "Client is not connected ... Last known Connection State" from the retries before the
    # first connection was taken for a socket error, and given as the reason of the next loss.
    broker = Broker(tmp_path)
    pub = make_publisher(broker.port)
    with caplog.at_level(logging.INFO, logger="agent.mqtt"):
        pub.start()
        try:
            time.sleep(2.5)  # a few refused tries before the broker is there
            broker.start()
            assert pub.wait_connected(10)
            broker.stop()
            deadline = time.monotonic() + 10
            while pub.connected and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            pub.close(1)
            broker.stop()
    lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lost the broker connection")]
    assert len(lost) == 1, caplog.text
    assert "Connection State" not in lost[0] and "not connected" not in lost[0]
