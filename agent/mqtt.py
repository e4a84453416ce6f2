"""The MQTT side: a paho-mqtt 2.x client that survives broker outages without losing messages.

- Connected means a successful CONNACK, nothing less.
- On every (re)connect: availability `online`, then every retained message (state, stats,
  discovery) as last published, then the messages queued during the outage, in order. An older
  retained value that was in flight at the disconnect, which paho re-sends after these, is
  followed by the latest once the broker has it, so the broker never ends on a stale value.
- While disconnected, messages wait in a bounded queue (QoS>0: paho's own ordered queue, which
  also re-sends what was in flight when the link dropped); when it is full, further messages are
  dropped and counted. Retained messages are not queued: only their latest value matters and it
  is re-sent on connect. An empty retained message (which deletes a topic's value) is sent once,
  like an event.
- The Last Will publishes a retained `offline` if the agent vanishes.
- MQTT 5 by default (`protocol` "auto" falls back to 3.1.1 for a broker that refuses 5): under
  3.1.1 a broker acknowledges a message its ACL refuses as if it took it. A refused message is
  counted and said once per topic and reason, and is not sent again; nor is one the broker hangs
  up on each time it is sent (larger than it takes), which paho would re-send at every reconnect.
- Said once, not at every reconnect: another client taking over the client id (MQTT 5's
  DISCONNECT 142: two agents with one id take turns for as long as both run), and a subscription
  the broker refuses.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import paho.mqtt as paho_mqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import BrokerError, ConfigError

logger = logging.getLogger(__name__)

ONLINE = "online"
OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: str
    retain: bool = False
    qos: int = 1

    @property
    def kept_retained(self) -> bool:
        """A retained value the publisher keeps and re-sends on every connect. An empty retained
        message deletes the topic's value on the broker: it is sent once, like an event."""
        return self.retain and self.payload != ""


class Publisher(Protocol):
    def publish(self, message: Message) -> None: ...

    def flush(self, timeout: float, cancel: threading.Event | None = None) -> bool: ...

    def close(self, timeout: float = 5.0) -> None: ...


def tls_files_digest(ca_file: str | None, cert_file: str | None, key_file: str | None) -> str:
    """A digest of the TLS files' contents: a reload compares it, as files are renewed in place
    (certbot, a CA rotated) and the same paths in the config would keep the old connection."""
    digest = hashlib.sha256()
    for name in (ca_file, cert_file, key_file):
        digest.update(Path(name).read_bytes() if name else b"")
        digest.update(b"\0")
    return digest.hexdigest()


class _EncryptedKey(Exception):
    pass


def _refuse_passphrase() -> str:
    raise _EncryptedKey


def check_tls_files(ca_file: str | None, cert_file: str | None, key_file: str | None) -> None:
    """Load the TLS files as a connection would, naming the one at fault. A file that does not load
    is a ConfigError, as a missing one is: systemd restarts the unit on a BrokerError, and a
    restart every few seconds cannot mend a file."""
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"mqtt.tls.ca_file: not a PEM CA certificate: {ca_file} ({exc})") from None
    if cert_file:
        try:
            # OpenSSL asks for an encrypted key's passphrase on the terminal, or reads stdin: a
            # service must fail instead, and say why.
            context.load_cert_chain(cert_file, key_file, password=_refuse_passphrase)
        except _EncryptedKey:
            raise ConfigError(f"mqtt.tls.key_file: the private key is encrypted with a passphrase, which a "
                              f"service cannot type: decrypt it (openssl pkey -in KEY -out PLAIN): "
                              f"{key_file or cert_file}") from None
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"mqtt.tls.cert_file/key_file: not a PEM certificate and its private key: "
                              f"{cert_file}, {key_file} ({exc})") from None


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    host: str
    port: int
    client_id: str
    availability_topic: str
    qos: int = 1
    keepalive_s: int = 30
    protocol: str = "auto"  # "auto", "5" or "3.1.1"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    queue_size: int = 1000
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0


_paho_logger = logging.getLogger("agent.paho")
# paho logs these as ERRORs on every retry, or as the link drops; the publisher says it in its
# own warnings instead, once, and again only when the reason changes. The socket errors are the
# reason given for the disconnect that follows.
_RETRY_NOISE = "Client is not connected"
_SOCKET_ERRORS = ("failed to receive on socket: ", "failed to send on socket: ")


SHORT_SESSION_S = 5.0
KEEPALIVE_TIMEOUT = 141  # the reason code paho gives when the broker says nothing for a keepalive
SESSION_TAKEN_OVER = 142  # an MQTT 5 broker's DISCONNECT: another client connected with this client id
TAKEOVER_RETOLD_S = 3600.0
UNSUPPORTED_PROTOCOL = 132  # paho's reason for a 3.1.1 broker's CONNACK to an MQTT 5 CONNECT
NOT_AUTHORIZED = 135
PACKET_TOO_LARGE = 149
# What to look at when the broker refuses a message, by its reason code.
_REFUSAL_HINTS = {NOT_AUTHORIZED: "check the broker's ACL for this user/topic",
                  PACKET_TOO_LARGE: "the broker's max_packet_size or message_size_limit"}
# How long paho's thread may take to write the DISCONNECT and end, before the socket is cut.
STOP_GRACE_S = 1.0


def _failure_reason(code: int) -> ReasonCode:
    """paho's ReasonCode for a failure `code`, under whichever packet MQTT 5 lists it: paho will not
    name a code for a packet that does not list it."""
    for packet_type in (PacketTypes.PUBACK, PacketTypes.DISCONNECT, PacketTypes.CONNACK):
        try:
            return ReasonCode(packet_type, identifier=code)
        except (KeyError, ValueError):
            continue
    return ReasonCode(PacketTypes.PUBACK, "Unspecified error")


def _publish_size(message: Message) -> int:
    """The bytes of `message`'s MQTT 5 PUBLISH packet, which a broker's Maximum Packet Size counts."""
    remaining = 2 + len(message.topic.encode()) + (2 if message.qos else 0) + 1 + len(message.payload.encode())
    length_bytes = next(n for n in (1, 2, 3, 4) if remaining < 128 ** n)
    return 1 + length_bytes + remaining


class _Client(paho.Client):
    """paho's client with what this publisher needs and paho 2.x does not offer. The one place that
    reaches into paho's internals (as paho 2.0 to 2.2 have them); tests/test_mqtt5.py holds each
    use to account against a real broker."""

    # paho's internals used below. A paho release without one of them gets `fits` False: this
    # class then does what paho.Client does (the publisher speaks 3.1.1), rather than fail in
    # paho's network thread, which would stop every message.
    INTERNALS = ("_protocol", "_out_message_mutex", "_out_messages", "_in_packet",
                 "_handle_pubackcomp", "_handle_pubrec", "_do_on_publish")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fits = all(hasattr(self, name) for name in self.INTERNALS)

    @property
    def speaks_mqtt5(self) -> bool:
        # not paho's `protocol` property: paho 2.0.0's recurses forever
        return self.fits and self._protocol == paho.MQTTv5

    def use_mqtt311(self) -> None:
        """Speak MQTT 3.1.1, with a clean session, from the next connection on. paho fixes the version
        when the client is made, and a new client would lose the messages this one holds; paho
        changes `_protocol` itself to fall back from 3.1.1 to 3.1."""
        self._protocol = paho.MQTTv311
        self._clean_session = True

    def use_mqtt5(self) -> None:
        """Speak MQTT 5 again from the next connection on (the clean start given to connect_async
        holds)."""
        self._protocol = paho.MQTTv5

    def in_flight(self) -> list[int]:
        """The mids of the QoS>0 messages not yet acknowledged, oldest first: what paho re-sends."""
        if not self.fits:
            return []
        with self._out_message_mutex:
            return [mid for mid, m in self._out_messages.items() if m.qos > 0]

    def forget(self, mids: list[int]) -> None:
        """Never send these messages again. From on_connect only, before paho re-sends what was in
        flight and counts it afresh: at a disconnect, paho 2.0 may be amid that loop."""
        if not self.fits or not mids:
            return
        with self._out_message_mutex:
            for mid in mids:
                self._out_messages.pop(mid, None)

    def _handle_pubackcomp(self, cmd, *rest):
        refused = self._refusal() if cmd == "PUBACK" else None
        return super()._handle_pubackcomp(cmd, *rest) if refused is None else refused

    def _handle_pubrec(self, *rest):
        refused = self._refusal()
        return super()._handle_pubrec(*rest) if refused is None else refused

    def _refusal(self) -> MQTTErrorCode | None:
        """The PUBACK or PUBREC at hand, if its reason code is a failure, ended as paho ends a refused
        PUBACK: on_publish with the reason, the message released. paho 2.2 answers a refused PUBREC
        with a PUBREL, as if the broker took the message, and reports the PUBCOMP's success; and it
        takes mosquitto's PUBACK 149 (Packet too large: its answer to a payload over
        message_size_limit, a code MQTT 5 gives DISCONNECT only) for a malformed packet, hangs up,
        and re-sends the message at every reconnect. None for any other acknowledgement."""
        packet = self._in_packet["packet"]
        if not self.speaks_mqtt5 or len(packet) < 3 or packet[2] < 0x80:
            return None
        mid = int.from_bytes(packet[:2], "big")
        with self._out_message_mutex:
            if mid not in self._out_messages:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            return self._do_on_publish(mid, _failure_reason(packet[2]), Properties(PacketTypes.PUBACK))


class MqttPublisher:
    """Publishes `Message`s through paho's network thread; see the module docstring."""

    def __init__(self, settings: BrokerSettings, *,
                 subscriptions: dict[str, Callable[[str, bytes], None]] | None = None):
        self._s = settings
        self._subscriptions = dict(subscriptions or {})
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._connected = False
        self._resent = False  # the connect-time re-sends have been handed to paho
        self._closing = False
        self._backlog: collections.deque[Message] = collections.deque()
        self._retained: dict[str, Message] = {}
        self._unsent_retained: set[str] = set()  # topics whose latest retained value no connection has sent
        self._unacked: dict[int, Message] = {}
        # Acknowledged before _send recorded them, with the broker's reason code.
        self._early_acks: dict[int, ReasonCode] = {}
        self._replayed: set[int] = set()  # retained values in flight at the last disconnect
        self.dropped = 0
        self.refused = 0  # messages the broker would not take (MQTT 5 says so), or hung up on
        self._told: set[tuple[str, str, int | None]] = set()  # refusals said: (what, topic, reason code)
        self._max_packet: int | None = None  # the broker's Maximum Packet Size, from its MQTT 5 CONNACK
        self._suspects: list[Message] = []  # in flight at the last disconnect (the availability aside)
        self._dropped_mids: list[int] = []  # for paho to forget at the next connect (its thread only)
        self.connects = 0
        self.last_error: str | None = None
        self._connected_at = 0.0
        self._short_sessions = 0  # connections in a row that the broker dropped within seconds
        self._taken_over = False  # the last connection ended as another client took over its client id
        self._takeover_told_at: float | None = None  # when the takeover warning was last given
        self._socket_error: str | None = None  # what the socket said as paho lost it
        self._hanging_up = False  # close() is disconnecting on purpose
        self._ended = False  # the connection attempt now over was reported as such (paho's thread only)
        self._refused = False  # the broker's CONNACK refused the connection now being closed
        self._hung_up_on_mqtt5 = False  # this try speaks 3.1.1 as the last, in MQTT 5, was hung up on
        # Read before the client loads them, so a renewal in between is seen at the next reload.
        self.tls_digest: str | None = None
        if settings.tls:
            try:
                self.tls_digest = tls_files_digest(settings.ca_file, settings.cert_file, settings.key_file)
            except OSError:
                pass  # _make_client names the file at fault
        self._client = self._make_client()

    # --- setup -------------------------------------------------------------------------------

    @property
    def settings(self) -> BrokerSettings:
        return self._s

    def _make_client(self) -> _Client:
        s = self._s
        client = None
        if s.protocol != "3.1.1":
            client = _Client(CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=paho.MQTTv5)
            if not client.fits:
                logger.warning("paho-mqtt %s is not one this agent knows (2.0 to 2.2): speaking MQTT 3.1.1, "
                               "under which the broker does not say when it refuses a message", paho_mqtt.__version__)
                client = None
        if client is None:
            client = _Client(CallbackAPIVersion.VERSION2, client_id=s.client_id, clean_session=True)
        client.on_log = self._handle_log
        client.will_set(s.availability_topic, OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=max(1, round(s.reconnect_min_s)),
                                   max_delay=max(1, round(s.reconnect_max_s)))
        client.max_inflight_messages_set(100)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            check_tls_files(s.ca_file, s.cert_file, s.key_file)
            try:
                client.tls_set(ca_certs=s.ca_file, certfile=s.cert_file, keyfile=s.key_file,
                               cert_reqs=ssl.CERT_REQUIRED)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(f"mqtt.tls: cannot load certificates: {exc}") from None  # as check_tls_files
            client.tls_insecure_set(s.tls_insecure)
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_pre_connect = self._handle_pre_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        return client

    def start(self) -> None:
        """Connect in the background; an unreachable broker is retried with backoff, forever."""
        # MQTT 5's clean start with no session expiry (the default) is 3.1.1's clean session.
        clean = {"clean_start": True} if self._client.speaks_mqtt5 else {}
        try:
            self._client.connect_async(self._s.host, self._s.port, keepalive=self._s.keepalive_s, **clean)
        except (ValueError, OSError) as exc:
            raise BrokerError(f"mqtt.host: cannot use {self._s.host}:{self._s.port}: {exc}") from None
        self._client.loop_start()

    # --- paho callbacks (network thread) -----------------------------------------------------

    def _handle_log(self, client, userdata, level, text: str) -> None:
        if text.startswith(_SOCKET_ERRORS):
            self._socket_error = text.split(": ", 1)[1]
            return
        if text.startswith(_RETRY_NOISE):
            return
        if self._hanging_up and level == paho.MQTT_LOG_ERR:
            return  # paho 2.2 logs an ERROR from its loop once the socket is closed on purpose
        _paho_logger.log(paho.LOGGING_LEVEL[level], "%s", text)

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._socket_error = None
        if reason_code.is_failure:
            self._refused = True  # the broker hangs up next: this is the reason, already given
            self._report_refusal(reason_code)
            return
        client.forget(self._dropped_mids)  # before paho re-sends what was in flight, after this callback
        self._dropped_mids = []
        online = Message(self._s.availability_topic, ONLINE, retain=True, qos=1)
        with self._lock:
            self._max_packet = getattr(properties, "MaximumPacketSize", None)
            # Here, not at the disconnect: paho drops the unsent QoS 0 packets when it reconnects,
            # and a message handed to it as the link went down is among them too.
            self._requeue_unsent_qos0()
            # paho re-sends what was in flight at the disconnect, after this callback, so after
            # the latest retained values it sends here: an older value in flight would then be the
            # one the broker keeps. Each is answered with its topic's latest once acknowledged.
            self._replayed = {mid for mid, message in self._unacked.items() if message.kept_retained}
            self._connected = True
            self.connects += 1
            self._connected_at = time.monotonic()
            self.last_error = None
            self._retained.pop(online.topic, None)
            retained = list(self._retained.values())
            self._retained = {online.topic: online, **self._retained}  # re-sent first on HA's birth too
            backlog = list(self._backlog)
            self._backlog.clear()
        if self._hung_up_on_mqtt5:
            self._hung_up_on_mqtt5 = False
            self._say_mqtt311("closed an MQTT 5 connection before accepting it, and took MQTT 3.1.1")
        # Once a takeover, or the guess at one, has been said, not at each round: two agents with one
        # client id connect every second or so for as long as both run.
        quiet = self._taken_over or self._short_sessions >= 3
        logger.log(logging.DEBUG if quiet else logging.INFO, "connected to broker %s:%d", self._s.host, self._s.port)
        if self._subscriptions:  # one SUBSCRIBE: its SUBACK's reason codes are in this order
            client.subscribe([(topic, 1) for topic in self._subscriptions])
        self._send(online)
        for message in retained + backlog:
            self._send(message)
        with self._lock:
            self._unsent_retained.difference_update(m.topic for m in retained)  # in flight now, or delivered
            self._resent = self._connected
            self._idle.notify_all()

    def _report_refusal(self, reason_code: ReasonCode) -> None:
        """A refused CONNECT, said once, not at every retry for months; a broker that speaks only
        MQTT 3.1.1 is spoken to in 3.1.1 from then on, where `protocol` is "auto"."""
        hint = ""
        if reason_code == UNSUPPORTED_PROTOCOL and self._client.speaks_mqtt5:
            # Every broker that speaks 5 speaks 3.1.1 too: falling back can cost the refusal
            # reports, never the connection.
            if self._s.protocol == "auto":
                self._client.use_mqtt311()
                self._say_mqtt311("does not speak MQTT 5")
                return
            hint = " (the broker speaks MQTT 3.1.1 only: set mqtt.protocol to auto or 3.1.1)"
        text = f"{reason_code}{hint}"
        if text != self.last_error:
            logger.error("broker %s:%d refused the connection: %s; retrying", self._s.host, self._s.port, text)
        self.last_error = text

    def _say_mqtt311(self, what: str) -> None:
        logger.info("broker %s:%d %s: using MQTT 3.1.1, under which it does not say when it refuses a message",
                    self._s.host, self._s.port, what)

    def _try_the_other_protocol(self, reason_code) -> bool:
        """A broker older than MQTT 5 may hang up on its CONNECT without a CONNACK (RabbitMQ before
        3.13 does), where mosquitto 1.5 refuses it. So while nothing has connected, with `protocol`
        "auto", a hang-up on MQTT 5 is tried again in 3.1.1, quietly (said once 3.1.1 connects); one
        on 3.1.1 too is not the protocol's doing (a TLS port, say): it is reported as any hang-up, and
        the next try is MQTT 5 again. True where the hang-up is not to be reported."""
        if self._s.protocol != "auto" or self.connects or reason_code == KEEPALIVE_TIMEOUT:
            return False
        if self._client.speaks_mqtt5:
            self._client.use_mqtt311()
            self._hung_up_on_mqtt5 = True
            return True
        if self._hung_up_on_mqtt5:
            self._client.use_mqtt5()
            self._hung_up_on_mqtt5 = False
        return False

    def _handle_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its `except OSError`: the exception at hand is the reason
        # (refused, unresolvable host, TLS verification failed), which paho logs only at DEBUG.
        self._socket_error = None
        reason = sys.exc_info()[1]
        text = (str(reason).strip() or type(reason).__name__) if reason is not None else "connection failed"
        # A plain MQTT listener resets a TLS handshake, or answers it with what TLS cannot read.
        # Only while these settings never worked: after that it is the broker that hangs up.
        plain_port = isinstance(reason, (ConnectionResetError, ssl.SSLError)) \
            and not isinstance(reason, ssl.SSLCertVerificationError)
        if self._s.tls and plain_port and self.connects == 0:
            text += " (if this port takes plain MQTT, set mqtt.tls.enabled: false or use the broker's TLS port)"
        if text != self.last_error:
            logger.warning("cannot connect to broker %s:%d: %s; retrying", self._s.host, self._s.port, text)
        self.last_error = text

    def _handle_pre_connect(self, client, userdata) -> None:
        self._ended = False

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            was_connected = self._connected
            self._connected = False
            self._resent = False
            self._idle.notify_all()
        if self._ended:
            return  # paho 2.2 says it twice when the link breaks as it re-sends what was in flight
        self._ended = True
        why = self._socket_error or str(reason_code)
        self._socket_error = None
        refused, self._refused = self._refused, False
        if self._closing:
            return
        self._taken_over = was_connected and reason_code == SESSION_TAKEN_OVER
        if self._taken_over:
            self._report_takeover()
        elif was_connected:
            # A broker drops a client when another connects with its id: two agents with one
            # client id take turns, each knocked off within a second, and nothing else says why.
            lasted = time.monotonic() - self._connected_at
            self._short_sessions = self._short_sessions + 1 if lasted < SHORT_SESSION_S else 0
            # Once the hint below is given, the rest of such a run of drops is not a warning each:
            # at one a second it would be most of the journal.
            level = logging.DEBUG if self._short_sessions > 3 else logging.WARNING
            logger.log(level, "lost the broker connection (%s); reconnecting", why)
            if self._drop_what_it_hangs_up_on(lasted):
                self._short_sessions = 0  # explained, and no other client's doing
            elif self._short_sessions == 3:
                logger.warning("the broker keeps dropping this connection as soon as it is made: is another "
                               "client using the client id %r? (set mqtt.client_id)", self._s.client_id)
        elif not refused and not self._try_the_other_protocol(reason_code):  # a refusal: said with its CONNACK
            self._report_hang_up(reason_code, why)

    def _report_takeover(self) -> None:
        """An MQTT 5 broker's word that another client connected with this client id: two agents with
        one id knock each other off at every reconnect, forever. Said once, in one line, not at each
        round; reconnecting goes on, as the other may be an agent being stopped. Under 3.1.1, and from
        mosquitto 2.0 even under 5, the broker only closes the socket, as at any drop: there the guess
        from short sessions in _handle_disconnect is all there is."""
        self._short_sessions = 0  # explained: no guess at the cause
        with self._lock:
            self._suspects = []  # nor a message in flight to blame, and drop, for it
        # Once an hour at most: as long as both agents run, a reminder in the journal, and one that
        # starts days later is still told.
        now = time.monotonic()
        told = self._takeover_told_at is not None and now - self._takeover_told_at < TAKEOVER_RETOLD_S
        level = logging.DEBUG if told else logging.WARNING
        if not told:
            self._takeover_told_at = now
        logger.log(level, "the broker disconnected this agent because another client connected with the same client "
                   "id %r: is a second agent running with the same mqtt.client_id or mqtt.topic_prefix? Reconnecting",
                   self._s.client_id)

    def _drop_what_it_hangs_up_on(self, lasted: float) -> bool:
        """Drop the message the broker hangs up on each time it is sent (over mosquitto's
        max_packet_size, or outside the ACL of a broker that disconnects for it): paho would re-send
        it at every reconnect, forever, with everything behind it stuck. It is in flight at two
        disconnects in a row, the second soon after its connect; of such messages, the largest. Not
        always the first: a small one sent just before it can lose its PUBACK to the reset too. Never
        the availability `online`, sent anew at every connect: dropped, the agent would show as
        offline. Every copy goes, and a retained value is not re-sent at the next connect. Lock not
        held."""
        mids = self._client.in_flight()
        with self._lock:
            now = [self._unacked[m] for m in mids
                   if m in self._unacked and self._unacked[m].topic != self._s.availability_topic]
            before, self._suspects = self._suspects, now
            repeated = [message for message in now if message in before]
            if not repeated or lasted >= SHORT_SESSION_S:
                return False
            culprit = max(repeated, key=_publish_size)
            self._suspects = []
            mids = [m for m, message in self._unacked.items() if message == culprit]
            for m in mids:
                del self._unacked[m]
            self._note_refusal(culprit.topic, None, "dropped a message to %s: the broker closed the connection each "
                               "time it was sent (larger than it takes, or outside its ACL?)", culprit.topic)
            self._replayed.difference_update(mids)
            if self._retained.get(culprit.topic) == culprit:
                del self._retained[culprit.topic]
                self._unsent_retained.discard(culprit.topic)
            self._dropped_mids += mids
            self._idle.notify_all()
        return True

    def _report_hang_up(self, reason_code, why: str) -> None:
        """The connection closed before its CONNACK: a TLS listener hangs up on a plain CONNECT, for
        one, and something that is no MQTT broker may never answer at all. Said once, and again only
        when what happens changes: not the socket's words, as a peer that hangs up can reset the
        connection one time and close it the next. The hints only while these settings never
        worked: after that it is the broker (restarting, full) that hangs up."""
        if reason_code == KEEPALIVE_TIMEOUT:
            what, reason = f"did not answer the connection within {self._s.keepalive_s} s", ""
            hint = "is this its MQTT port?"
        else:
            what, reason = "closed the connection before accepting it", f": {why}"
            hint = "" if self._s.tls else "if it listens with TLS on this port, set mqtt.tls.enabled: true"
        hint = f" ({hint})" if hint and self.connects == 0 else ""
        if what + hint != self.last_error:
            logger.warning("broker %s:%d %s%s; retrying%s", self._s.host, self._s.port, what, reason, hint)
        self.last_error = what + hint

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            message = self._unacked.get(mid)
            if message is not None and reason_code.is_failure:
                self._note_broker_refusal(message.topic, reason_code)
            latest = self._latest_after_replay(mid, message) if message is not None else None
            if latest is None:
                if message is None:
                    self._early_acks[mid] = reason_code  # acknowledged before _send recorded it
                self._unacked.pop(mid, None)
                self._idle.notify_all()
                return
        # Before the replayed value counts as delivered, so that a flush waits for this one too.
        # paho's lock is reentrant: publishing from its callback is safe.
        self._send(latest)
        with self._lock:
            self._unacked.pop(mid, None)
            self._idle.notify_all()

    def _note_refusal(self, topic: str, code: int | None, fmt: str, *args) -> None:
        """Count a message the broker did not take; say so once per topic and reason, not at every
        message for months (an ACL refuses a topic for as long as it is published). Lock held."""
        self.refused += 1
        self._warn_once(("publish", topic, code), fmt, *args)

    def _warn_once(self, key: tuple[str, str, int | None], fmt: str, *args) -> None:
        """A warning the first time `key` (what was refused, its topic, the reason code) is met. Lock held."""
        if key not in self._told:
            self._told.add(key)
            logger.warning(fmt, *args)

    def _note_broker_refusal(self, topic: str, reason_code: ReasonCode) -> None:
        """A PUBACK or PUBREC's failure reason (MQTT 5 only). Lock held."""
        hint = _REFUSAL_HINTS.get(reason_code.value)
        self._note_refusal(topic, reason_code.value, "the broker refused a message to %s: %s%s", topic, reason_code,
                           f" ({hint})" if hint else "")

    def _latest_after_replay(self, mid: int, message: Message) -> Message | None:
        """The value to send after the broker acknowledged `message`, when that was an older
        retained value paho re-sent after the latest (see _handle_connect). Lock held."""
        if mid not in self._replayed:
            return None
        self._replayed.discard(mid)
        latest = self._retained.get(message.topic)
        if latest is None or latest == message or not self._connected:
            return None  # no newer value, or it is re-sent at the next connect anyway
        return latest

    def _handle_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        """A subscription the broker's ACL refuses fails in the SUBACK (0x80 under 3.1.1, 135 Not
        authorized under 5), and nothing else would tell: Home Assistant's birth message never comes,
        and discovery is not re-sent when it restarts. Said once per topic and reason, not at every
        reconnect."""
        with self._lock:
            for topic, reason_code in zip(self._subscriptions, reason_code_list):
                if reason_code.is_failure:
                    self._warn_once(("subscribe", topic, reason_code.value), "the broker refused the subscription to "
                                    "%s: %s (check the broker's ACL: this user needs to read %s)", topic, reason_code,
                                    topic)

    def _handle_message(self, client, userdata, message) -> None:
        for pattern, callback in self._subscriptions.items():
            if paho.topic_matches_sub(pattern, message.topic):
                try:
                    callback(message.topic, message.payload)
                except Exception:
                    logger.exception("handler for %s failed", message.topic)

    # --- publishing --------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        """Hand a message to paho. A QoS>0 message stays in paho's ordered queue until the broker
        acknowledges it, across reconnects, so order holds across an outage.

        paho is called without our lock held: its network thread holds its own lock while it
        calls `_handle_publish`, which takes ours, and the opposite order would deadlock."""
        if self._too_large(message):
            return
        info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
        with self._lock:
            kept = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
                info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and message.qos > 0)  # paho re-sends it after CONNACK
            if kept:
                early = self._early_acks.pop(info.mid, None)
                if early is None:
                    self._unacked[info.mid] = message
                elif early.is_failure:
                    self._note_broker_refusal(message.topic, early)
            elif not message.kept_retained:
                self._queue(message)  # QoS 0 while the link was down: paho would drop it

    def _too_large(self, message: Message) -> bool:
        """Whether `message` is over the Maximum Packet Size of the broker's MQTT 5 CONNACK, which
        paho does not check: the broker would hang up on it (counted and said as a refusal)."""
        limit = self._max_packet
        if limit is None:
            return False
        size = _publish_size(message)
        if size <= limit:
            return False
        with self._lock:
            self._note_refusal(message.topic, PACKET_TOO_LARGE, "not sending a message to %s: %d bytes, and the "
                               "broker takes at most %d (%s)", message.topic, size, limit,
                               _REFUSAL_HINTS[PACKET_TOO_LARGE])
        return True

    def _requeue_unsent_qos0(self) -> None:
        """QoS 0 messages paho had not finished writing when the link dropped: paho discards them
        on reconnect without a callback, so they go back to the front of the backlog, in order, to
        be sent now that it is connected again (a kept retained value needs not: it is re-sent
        anyway). Left in `_unacked` they would never leave it. Called with the lock held."""
        unsent = [mid for mid, message in self._unacked.items() if message.qos == 0]
        if not unsent:
            return
        kept = [m for m in (self._unacked.pop(mid) for mid in unsent) if not m.kept_retained]
        backlog = kept + list(self._backlog)
        self._backlog.clear()
        for message in backlog:
            self._queue(message)

    def _count_drop(self) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 100 == 0:
            logger.warning("broker unreachable and %d messages queued: dropped %d so far",
                           self._s.queue_size, self.dropped)

    def _queue(self, message: Message) -> None:
        if len(self._backlog) >= self._s.queue_size:
            # The newest is the one not kept, as for QoS 1 and 2, whose queue lives in paho and
            # cannot give up its oldest: one rule for every QoS, and no gap inside what is kept.
            self._count_drop()
            return
        self._backlog.append(message)

    def publish(self, message: Message) -> None:
        """Send now, or keep for the next connection; never blocks on the network."""
        with self._lock:
            if message.retain:  # the topic's latest value replaces what was kept for it
                self._retained.pop(message.topic, None)
                self._unsent_retained.discard(message.topic)
            if message.kept_retained:
                # Only the latest value matters, and it is (re)sent on every connect.
                self._retained[message.topic] = message
                send = self._connected
                if not send:
                    self._unsent_retained.add(message.topic)  # pending, for a flush, until that connect
            elif self._connected:
                send = True
            elif message.qos == 0:
                self._queue(message)
                send = False
            elif len(self._unacked) >= self._s.queue_size:
                self._count_drop()  # the outage queue is full: the newest is the one not kept
                send = False
            else:
                send = True
        if send:
            self._send(message)

    def republish_retained(self) -> None:
        """Send every retained message again (Home Assistant restarted and asked for them)."""
        with self._lock:
            retained = list(self._retained.values()) if self._connected else []
        for message in retained:
            self._send(message)

    # --- state -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def pending(self) -> int:
        """Messages not yet acknowledged by the broker (queued, in flight, or kept for the next connect)."""
        with self._lock:
            return self._pending_locked()

    def _pending_locked(self) -> int:
        return len(self._backlog) + len(self._unacked) + len(self._unsent_retained)

    def flush(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        """Wait until every message is delivered; False if `timeout` passed first, or `cancel` was set
        (a SIGTERM while a file run waits for an absent broker)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending_locked():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (cancel is not None and cancel.is_set()):
                    return False
                self._idle.wait(min(remaining, 0.2))
        return True

    def wait_connected(self, timeout: float) -> bool:
        """Wait for a CONNACK and for availability, retained state and the backlog to be handed
        to paho, so a `flush` after it covers them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._resent:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.2))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Publish `offline`, wait for it, disconnect cleanly (so the broker does not send the Will).
        Returns within about `timeout` + 2 * STOP_GRACE_S, even when the broker stopped answering."""
        with self._lock:
            self._closing = True
            connected = self._connected
        if connected:
            info = self._client.publish(self._s.availability_topic, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        # Connected or not: it also ends a connection attempt waiting for its CONNACK, or a
        # wait between retries.
        self._hanging_up = True
        self._client.disconnect()
        # paho's thread ends once it has written all it holds; a broker that stopped reading
        # keeps it alive until the keepalive runs out (30 s, past systemd's 10 s stop timeout).
        stopper = threading.Thread(target=self._client.loop_stop, name="mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(STOP_GRACE_S)
        if stopper.is_alive():
            sock = self._client.socket()
            if sock is not None:
                try:  # the plain socket's shutdown, also under TLS: paho's read then fails and it ends
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass
            stopper.join(STOP_GRACE_S)


class MemoryPublisher:
    """Keeps messages in memory: for `bench` (no broker in the measurement) and scripted runs."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.dropped = 0
        self.refused = 0
        self.connects = 0

    def publish(self, message: Message) -> None:
        self.messages.append(message)

    def republish_retained(self) -> None:
        pass

    def pending(self) -> int:
        return 0

    def flush(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        return True

    def start(self) -> None:
        pass

    def close(self, timeout: float = 5.0) -> None:
        pass
