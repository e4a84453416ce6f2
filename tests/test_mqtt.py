"""The MQTT publisher against a real mosquitto: availability, Last Will, outages, ordering."""

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from agent.mqtt import BrokerSettings, MemoryPublisher, Message, MqttPublisher, Publisher
from tests.conftest import Broker, Subscriber, free_port, is_msg, wait_until

AVAIL = "test/agent/availability"


def make_publisher(port: int, **overrides) -> MqttPublisher:
    values = dict(host="127.0.0.1", port=port, client_id="agent-under-test", availability_topic=AVAIL,
                  reconnect_min_s=1, reconnect_max_s=1)
    values.update(overrides)
    return MqttPublisher(BrokerSettings(**values))


def paho_said(caplog, text: str) -> int:
    """How many of paho's log lines (DEBUG, forwarded to agent.paho) hold `text`."""
    return sum(text in r.getMessage() for r in caplog.records if r.name == "agent.paho")


def test_connect_publishes_retained_online_and_close_publishes_offline(shared_broker, subscriber_factory):
    broker = shared_broker
    AVAIL = "test/online-offline/availability"
    pub = make_publisher(broker.port, client_id="agent-online-offline", availability_topic=AVAIL)
    pub.start()
    assert pub.wait_connected(10) and pub.flush(10)  # the broker holds `online` before anyone subscribes
    late = subscriber_factory(broker.port, AVAIL)  # subscribes after: sees the retained value
    late.wait_for(is_msg(AVAIL, b"online", retained=True))
    pub.close()
    late.wait_for(is_msg(AVAIL, b"offline"))
    fresh = subscriber_factory(broker.port, AVAIL)
    fresh.wait_for(is_msg(AVAIL, b"offline", retained=True))


def test_last_will_marks_a_vanished_agent_offline(shared_broker, subscriber_factory):
    broker = shared_broker
    AVAIL = "test/last-will/availability"
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


def test_after_a_late_connack_what_was_in_flight_goes_first_then_online_then_what_is_new(broker, subscriber_factory,
                                                                                         caplog):
    # A broker that takes the TCP connection but answers CONNECT late (frozen, overloaded): paho wrote
    # what was published meanwhile right after the CONNECT, so new events reached the broker before
    # those in flight at the disconnect and before `online`, and the retained state went back to an
    # older value (the latest, sent on connect, then the one in flight, re-sent by paho after it).
    root = "test/late"
    sub = subscriber_factory(broker.port, f"{root}/#")
    caplog.set_level(logging.DEBUG, logger="agent.paho")
    pub = make_publisher(broker.port, client_id="agent-late", availability_topic=f"{root}/availability",
                         keepalive_s=1)
    pub.start()
    try:
        assert pub.wait_connected(10)
        pub.publish(Message(f"{root}/state", "S0", retain=True))
        assert pub.flush(10)
        sub.wait_for(is_msg(f"{root}/state", b"S0"))
        frozen_at = len(sub.all)
        os.kill(broker.process.pid, signal.SIGSTOP)
        for i in range(3):
            pub.publish(Message(f"{root}/event", f"in flight {i}"))
        pub.publish(Message(f"{root}/state", "S1", retain=True))
        wait_until(lambda: paho_said(caplog, f"'b'{root}/state''") == 2, 5)  # S1 written, as S0 was
        wait_until(lambda: not pub.connected, 10)  # the keepalive: no answer for 1 s
        tries = paho_said(caplog, "Sending CONNECT")
        wait_until(lambda: paho_said(caplog, "Sending CONNECT") > tries, 10)  # connected to the frozen broker
        for i in range(3):
            pub.publish(Message(f"{root}/event", f"new {i}"))
        pub.publish(Message(f"{root}/state", "S2", retain=True))
        os.kill(broker.process.pid, signal.SIGCONT)
        assert pub.flush(30)
        sub.wait_for(is_msg(f"{root}/event", b"new 2"), timeout=10)
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
        pub.close(1)
    after = sub.all[frozen_at:]
    first = {}
    for index, (topic, payload, _) in enumerate(after):
        first.setdefault((topic.rsplit("/", 1)[1], payload.decode()), index)
    in_flight = [first[("event", f"in flight {i}")] for i in range(3)]
    new = [first[("event", f"new {i}")] for i in range(3)]
    assert max(in_flight) < first[("availability", "online")] < min(new), after
    states = [payload for topic, payload, _ in after if topic == f"{root}/state"]
    assert states == sorted(states) and states[-1] == b"S2", states  # never back to an older value
    assert pub.refused == pub.dropped == 0


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


def test_a_burst_while_connected_is_delivered_whole_not_held_to_the_outage_queue(shared_broker, subscriber_factory):
    # queue_size bounds what waits for a broker that is away, not what a connected one takes.
    sub = subscriber_factory(shared_broker.port, "test/burst")
    pub = make_publisher(shared_broker.port, client_id="agent-burst", availability_topic="test/burst-agent/availability",
                         queue_size=5)
    pub.start()
    try:
        assert pub.wait_connected(10)
        for i in range(50):
            pub.publish(Message("test/burst", str(i)))
        assert pub.flush(10) and pub.dropped == 0
        sub.wait_for(is_msg("test/burst", b"49"))
        assert [p for _, p, _ in sub.all] == [str(i).encode() for i in range(50)]
    finally:
        pub.close(1)


def test_flush_reports_undelivered_messages_when_no_broker():
    pub = make_publisher(free_port(), qos=1)
    pub.start()
    pub.publish(Message("test/events", "x"))
    try:
        assert pub.flush(0.5) is False
        assert pub.pending() == 1
    finally:
        pub.close()


def test_a_subscription_gets_topic_payload_and_retain_flag_and_is_renewed_at_every_connect(broker,
                                                                                          subscriber_factory):
    # Home Assistant's birth message and, for the privacy switch, a retained command.
    other = subscriber_factory(broker.port, "nothing")
    other.client.publish("test/sub/a/cmd", "before", qos=1, retain=True).wait_for_publish(5)
    got: queue.Queue = queue.Queue()
    pub = make_publisher(broker.port, client_id="agent-subscribes")
    pub.subscribe("test/sub/+/cmd", lambda *message: got.put(message))
    pub.start()
    try:
        assert got.get(timeout=10) == ("test/sub/a/cmd", b"before", True)
        other.client.publish("test/sub/b/cmd", "live", qos=1)
        assert got.get(timeout=10) == ("test/sub/b/cmd", b"live", False)
        other.client.publish("test/later", "kept", qos=1, retain=True).wait_for_publish(5)
        pub.subscribe("test/later", lambda *message: got.put(message))  # while connected: at once
        assert got.get(timeout=10) == ("test/later", b"kept", True)
        broker.stop()  # no persistence: the broker forgets every subscription and retained message
        broker.start()
        wait_until(other.client.is_connected, 15)
        other.client.publish("test/sub/c/cmd", "after", qos=1, retain=True)
        assert got.get(timeout=15)[:2] == ("test/sub/c/cmd", b"after")  # subscribed again
        assert pub.connects == 2
    finally:
        pub.close(1)


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_every_qos_delivers(shared_broker, subscriber_factory, qos):
    broker = shared_broker
    sub = subscriber_factory(broker.port, "test/q")
    pub = make_publisher(broker.port, qos=qos, client_id=f"agent-qos{qos}")
    pub.start()
    try:
        assert pub.wait_connected(10)
        pub.publish(Message("test/q", "hello", qos=qos))
        assert pub.flush(5)
        sub.wait_for(is_msg("test/q", b"hello"))
    finally:
        pub.close()


def test_an_unreachable_broker_is_one_warning_not_an_error_per_retry(caplog):
    pub = make_publisher(free_port(), qos=1)
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
        wait_until(lambda: pub.pending() > 0, 5)
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


def test_a_retained_value_in_flight_when_the_link_drops_does_not_outlive_a_newer_one(tmp_path, subscriber_factory,
                                                                                      caplog):
    # paho re-sends what was in flight at the disconnect after the connect callback, which sent
    # the latest retained values: the broker ended on the older state, and Home Assistant showed it.
    broker = Broker(tmp_path)
    broker.start()
    caplog.set_level(logging.DEBUG, logger="agent.paho")
    pub = make_publisher(broker.port, client_id="agent-replay")
    pub.start()
    try:
        assert pub.wait_connected(10)
        pub.publish(Message("test/state", "S0", retain=True))
        assert pub.flush(5)
        os.kill(broker.process.pid, signal.SIGSTOP)  # S1 goes out and is never acknowledged
        pub.publish(Message("test/state", "S1", retain=True))
        wait_until(lambda: paho_said(caplog, "'b'test/state''") == 2, 5)
        os.kill(broker.process.pid, signal.SIGKILL)
        broker.process.wait()
        wait_until(lambda: not pub.connected, 5)
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


def test_two_agents_with_one_client_id_are_told_so(shared_broker, caplog):
    broker = shared_broker
    # The broker drops a client when another connects with its id: they take turns forever, and
    # "lost the broker connection" alone does not say why.
    first, second = make_publisher(broker.port, client_id="same-id"), make_publisher(broker.port, client_id="same-id")
    def drops_since(told: int, level: int = logging.DEBUG, said: str = "lost the broker connection") -> list[str]:
        return [r.getMessage() for r in caplog.records[told:] if r.levelno >= level and r.getMessage().startswith(said)]

    with caplog.at_level(logging.DEBUG, logger="agent.mqtt"):
        first.start()
        second.start()
        try:
            wait_until(lambda: "using the client id 'same-id'" in caplog.text, 20)
            told = len(caplog.records)
            # They go on taking turns, a drop a second or so: wait until six more were logged at all.
            wait_until(lambda: len(drops_since(told)) >= 6, 30)  # else the two clients stopped taking turns
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
        wait_until(lambda: held, 5)  # paho opened the connection
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


def test_an_empty_retained_message_is_delivered_once_not_re_sent_with_the_retained_values(shared_broker,
                                                                                         subscriber_factory):
    # Emptying a topic someone used to own: re-sent on every reconnect and Home Assistant birth,
    # it would wipe whatever the topic's new owner retains there.
    broker = shared_broker
    pub = make_publisher(broker.port, client_id="old-owner", availability_topic="test/old-owner/availability")
    pub.publish(Message("test/old/state", "", retain=True))
    assert pub.pending() == 1  # before the first connection: a flush waits for it
    pub.start()
    other = make_publisher(broker.port, client_id="new-owner", availability_topic="test/new-owner/availability")
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
            wait_until(lambda: len(held) >= 3, 15)  # three tries, all silent
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
    with caplog.at_level(logging.INFO, logger="agent.mqtt"), caplog.at_level(logging.DEBUG, logger="agent.paho"):
        pub.start()
        try:
            wait_until(lambda: paho_said(caplog, "Connection failed, retrying") >= 2, 10)  # refused tries first
            broker.start()
            assert pub.wait_connected(10)
            broker.stop()
            wait_until(lambda: not pub.connected, 10)
        finally:
            pub.close(1)
            broker.stop()
    lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lost the broker connection")]
    assert len(lost) == 1, caplog.text
    assert "Connection State" not in lost[0] and "not connected" not in lost[0]


def test_both_publishers_have_all_that_the_publisher_protocol_names():
    # Callers used four of them through getattr and hasattr, as the protocol named three.
    names = set(Publisher.__annotations__) | {name for name in vars(Publisher) if not name.startswith("_")}
    assert {"start", "publish", "subscribe", "flush", "close", "refused", "last_error"} <= names
    for pub in (make_publisher(free_port()), MemoryPublisher()):
        assert [name for name in sorted(names) if not hasattr(pub, name)] == [], type(pub).__name__


def test_the_memory_publisher_plays_a_message_to_the_subscriptions_that_match():
    pub, got = MemoryPublisher(), []
    pub.subscribe("test/+/cmd", lambda *message: got.append(message))
    pub.receive("test/a/cmd", b"OFF", retained=True)
    pub.receive("test/a/other", b"ON")
    assert got == [("test/a/cmd", b"OFF", True)]
