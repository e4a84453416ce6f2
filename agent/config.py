"""The configuration: one typed, frozen tree, validated in one place.

Every field carries its description and its constraints in dataclass metadata, so `check-config`,
`run` and the documented config.yaml all agree. Errors name the key path, the YAML line, the bad
value and what was expected, in one line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError
from agent.model_files import resolve_model_path
from agent.topics import MAX_MQTT_STRING

PASSWORD_ENV = "EMOTION_AGENT_MQTT_PASSWORD"
DEFAULT_TOPIC_PREFIX = "emotion-agent/{hostname}"
# A source with one of these is a stream (capture.classify_source); here, not in capture, so that
# the validation can check the URL without loading OpenCV.
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://", "rtmp://")


def is_stream_url(text: str) -> bool:
    return text.lower().startswith(STREAM_SCHEMES)


def setting(default: Any, description: str, *, min: float | None = None,
            max: float | None = None, choices: tuple[str, ...] | None = None,
            min_exclusive: bool = False) -> Any:
    """A dataclass field with its description and range, read by the validator."""
    meta = {"description": description, "min": min, "max": max, "choices": choices,
            "min_exclusive": min_exclusive}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        factory = default if callable(default) else (lambda: default)
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, description: str) -> Any:
    return field(default_factory=cls, metadata={"description": description})


@dataclass(frozen=True, slots=True)
class CameraConfig:
    width: int | None = setting(None, "Requested capture width in pixels (null: the camera's default).", min=16,
                                max=16384)
    height: int | None = setting(None, "Requested capture height in pixels (null: the camera's default).", min=16,
                                 max=16384)
    fps: float | None = setting(None, "Requested capture rate (null: the camera's default).", min=0, min_exclusive=True,
                                  max=1000)
    max_fps: float | None = setting(
        None, "Process at most this many frames a second (null: as fast as frames come); saves CPU on a Pi.",
        min=0, min_exclusive=True, max=1000)
    retry_initial_s: float = setting(1.0, "First wait before reopening a failed camera or stream.", min=0.05,
                                    max=3600)
    retry_max_s: float = setting(30.0, "Longest wait between reopen attempts (the wait doubles up to this).", min=0.05,
                                max=3600)
    stall_timeout_s: float = setting(
        10.0, "A stream (rtsp://, http://) that sends nothing for this long, or takes longer to open, is taken "
        "for lost and reopened (a camera on Wi-Fi can stall with its connection open).", min=0.5, max=3600)


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    kind: str = setting("blazeface", "Face detector: blazeface (MediaPipe full-range TFLite) or haar (OpenCV cascade).",
                        choices=("blazeface", "haar"))
    model: str | None = setting(None, "BlazeFace model file, or a bundled one's name (null: the bundled "
                                "face_detection_full_range.tflite; face_detection_full_range_int8.tflite is "
                                "faster on CPUs with int8 dot products, see models/MODELS.md).")
    score_threshold: float = setting(0.5, "Minimum face score to keep a detection (blazeface).", min=0, max=1)
    nms_iou: float = setting(0.3, "Overlap above which two detections are merged into one.", min=0, max=1)
    min_face_size: int = setting(24, "Ignore faces smaller than this many pixels (width).", min=1, max=16384)
    haar_scale_factor: float = setting(1.3, "Haar cascade scale step.", min=1.01, max=2.0)
    haar_min_neighbors: int = setting(5, "Haar cascade neighbours a detection needs.", min=0, max=50)
    interval_s: float = setting(
        0.1, "Run the detector at most this often (seconds); in between, faces are classified at their "
             "last boxes. 0 runs it on every frame. The detector is the costliest stage.", min=0, max=5)
    threads: int = setting(1, "Interpreter threads for the detector.", min=1, max=16)


@dataclass(frozen=True, slots=True)
class ClassifierConfig:
    model: str | None = setting(None, "Emotion model file, or a bundled one's name (null: the bundled default, "
                                "see models/MODELS.md).")
    crop_margin: float = setting(0.1, "Grow each face box by this fraction of its size on every side before "
                                      "classifying (FER2013 faces are framed looser than detector boxes).",
                                 min=-0.3, max=1.0)
    threads: int = setting(1, "Interpreter threads for the classifier.", min=1, max=16)


@dataclass(frozen=True, slots=True)
class TrackingConfig:
    max_gap_s: float = setting(1.0, "A face unseen for less than this keeps its id.", min=0, max=3600)
    min_iou: float = setting(0.2, "Minimum overlap to match a detection to a track.", min=0, max=1)


@dataclass(frozen=True, slots=True)
class SmoothingConfig:
    # Defaults measured on real video with `python -m agent.flicker` (docs/benchmarks.md).
    window_s: float = setting(0.25, "Time constant of the moving average of each face's 7 probabilities.",
                              min=0, min_exclusive=True, max=60)
    change_margin: float = setting(0.03, "A new emotion must lead the current one by this much (probability).",
                                   min=0, max=1)
    dwell_s: float = setting(0.25, "...and hold that lead this long before an emotion_changed event.", min=0,
                            max=60)
    confidence_gate: float = setting(0.3, "Below this smoothed probability the state is 'uncertain'.", min=0, max=1)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    enabled: bool = setting(False, "Connect with TLS.")
    ca_file: str | None = setting(None, "CA certificate file (null: the system's trust store).")
    cert_file: str | None = setting(None, "Client certificate file, for brokers that require one.")
    key_file: str | None = setting(None, "Client private key file (with cert_file).")
    insecure: bool = setting(False, "Skip the broker host name check. Only for testing.")


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    enabled: bool = setting(True, "Publish Home Assistant MQTT discovery messages.")
    prefix: str = setting("homeassistant", "Home Assistant's discovery prefix.")


@dataclass(frozen=True, slots=True)
class MqttConfig:
    host: str = setting("127.0.0.1", "Broker host name or address.")
    port: int = setting(1883, "Broker port (8883 is usual for TLS).", min=1, max=65535)
    protocol: str = setting(
        "auto", "MQTT version: 5 (the broker says when it refuses a message, e.g. by its ACL), 3.1.1, or auto: 5, "
        "and 3.1.1 from then on if the broker does not speak 5 (mosquitto before 1.6, RabbitMQ before 3.13).",
        choices=("auto", "5", "3.1.1"))
    client_id: str | None = setting(None, "MQTT client id (null: emotion-agent-<hostname>, followed by the topic root "
                                                "when topic_prefix is not the default).")
    topic_prefix: str = setting(DEFAULT_TOPIC_PREFIX, "Root of every topic; {hostname} is replaced.")
    qos: int = setting(1, "QoS of events and state (0, 1 or 2).", min=0, max=2)
    keepalive_s: int = setting(30, "Keep-alive interval; the broker sends the Last Will after 1.5x this.",
                               min=5, max=65535)
    username: str | None = setting(None, "User name, if the broker requires one.")
    password_file: str | None = setting(
        None, "File holding the password (or set " + PASSWORD_ENV + ", or systemd credential mqtt_password).")
    tls: TlsConfig = section(TlsConfig, "TLS settings.")
    queue_size: int = setting(1000, "Messages kept while the broker is unreachable; beyond it the newest are "
                                    "dropped and counted.", min=1, max=1_000_000)
    reconnect_min_s: float = setting(1.0, "First wait before reconnecting.", min=0.1, max=3600)
    reconnect_max_s: float = setting(60.0, "Longest wait between reconnects.", min=1, max=3600)
    summary_interval_s: float = setting(60.0, "Period of the summary message.", min=1, max=86400)
    stats_interval_s: float = setting(30.0, "Period of the stats message.", min=1, max=86400)
    discovery: DiscoveryConfig = section(DiscoveryConfig, "Home Assistant discovery.")


@dataclass(frozen=True, slots=True)
class Config:
    source: str = setting("0", "Camera index (0), video file, image file, or rtsp:// / http(s):// URL.")
    camera: CameraConfig = section(CameraConfig, "Capture settings.")
    detector: DetectorConfig = section(DetectorConfig, "Face detection.")
    classifier: ClassifierConfig = section(ClassifierConfig, "Expression classification.")
    tracking: TrackingConfig = section(TrackingConfig, "Face tracking.")
    smoothing: SmoothingConfig = section(SmoothingConfig, "Per-face smoothing and change policy.")
    mqtt: MqttConfig = section(MqttConfig, "MQTT broker and topics.")
    log_level: str = setting("info", "Logging level.", choices=("debug", "info", "warning", "error"))

    def redacted(self) -> dict[str, Any]:
        """The config as a plain dict, safe to log: secrets never live in it (the password comes
        from a file, the environment or a systemd credential), and the user name is masked."""
        data = dataclasses.asdict(self)
        if data["mqtt"]["username"]:
            data["mqtt"]["username"] = "***"
        data["source"] = redact_url(data["source"])
        return data


def redact_url(text: str) -> str:
    """`text` with the password of a URL's user info masked (rtsp://admin:***@cam/stream), for logs:
    cameras take their credentials in the URL, and a journal is read by more people than a config."""
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urllib.parse.urlsplit(text)
        # No @ in the address: a password with a / ? or # in it, which ends the address early.
        user_in_address = "@" in parts.netloc
    except ValueError:  # not a URL after all (a port that is no number)
        user_in_address = False
    if not user_in_address:  # everything up to the last @ is masked
        scheme, _, rest = text.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    if parts.password is None:
        return text
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


# --- validation -------------------------------------------------------------------------------

_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_YAML11_OCTAL = re.compile(r"[-+]?0[0-7_]+")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class _Lines:
    """Maps key paths ("mqtt.port") to their line in the YAML file, for error messages."""

    def __init__(self, text: str | None, origin: str):
        self.origin = origin
        self.lines: dict[str, int] = {}
        self.duplicates: list[tuple[str, int, int]] = []  # (path, line, line of the first one)
        self.sexagesimal: list[tuple[str, int, str]] = []  # (path, line, the number as written)
        if text:
            try:
                self._walk(yaml.compose(text), "")
            except yaml.YAMLError:
                pass

    def _walk(self, node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                if path in self.lines:
                    self.duplicates.append((path, key.start_mark.line + 1, self.lines[path]))
                    continue
                self.lines[path] = key.start_mark.line + 1
                # YAML 1.1 reads a plain 1:30 as base 60 (90): `source: 1:30` would open camera 90.
                # Only the source, a text setting that also takes a number: elsewhere a number is
                # meant, and `stats_interval_s: 1:00` (60) has always worked.
                if path == "source" and isinstance(value, yaml.ScalarNode) and value.style is None \
                        and ":" in value.value and value.tag.endswith((":int", ":float")):
                    self.sexagesimal.append((path, value.start_mark.line + 1, value.value))
                self._walk(value, path)

    def where(self, path: str) -> str:
        line = self.lines.get(path)
        return f"{self.origin}:{line}: " if line else (f"{self.origin}: " if self.origin else "")


def _shown(value: Any, limit: int = 60) -> str:
    """A value for an error line, cut short: a pasted blob must not become a thousand-column line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "…" + text[-4:]


# C0 and C1 control characters: no setting has a use for them, and a broker rejects a topic or a
# client id holding one as malformed (the agent would only see a connection that keeps failing).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _check_text(value: str, path: str, lines: _Lines) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Python's stand-ins for bytes that are not UTF-8 (a file name from the command line);
        # OpenCV would crash on them.
        _fail(lines, path, f"not valid UTF-8 text (a file name in another encoding? rename it): {_shown(value)}")
    control = _CONTROL.search(value)
    if control:
        shown = redact_url(value) if path == "source" else value  # a stream's password stays out of the journal
        _fail(lines, path, f"contains a control character (U+{ord(control.group()):04X}): {_shown(shown)}")


def _fail(lines: _Lines, path: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{lines.where(path)}{path}: {message}")


def _plain_type(annotation: Any) -> tuple[type, bool]:
    """(base type, optional) of an annotation such as `int | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _convert(value: Any, meta: dict, base: type, optional: bool, path: str, lines: _Lines) -> Any:
    if value is None:
        if optional:
            return None
        _fail(lines, path, f"must not be empty, expected {_TYPE_NAMES.get(base, base.__name__)}")
    if base is bool:
        if not isinstance(value, bool):
            _fail(lines, path, f"expected true or false, got {_shown(value)}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(lines, path, f"expected an integer, got {_shown(value)}")
    elif base is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e9 (no dot, no sign) as text; people mean the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(lines, path, f"expected a number, got {_shown(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer of hundreds of digits
            _fail(lines, path, f"expected a finite number, got {_shown(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            _fail(lines, path, f"expected a finite number, got {_shown(value)}")
    elif base is str:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and (path == "source" or meta.get("choices")):
            value = str(value)  # `source: 0` means camera 0, `protocol: 5` MQTT 5
        if not isinstance(value, str):
            _fail(lines, path, f"expected a string, got {_shown(value)}")
        _check_text(value, path, lines)
        if path == "mqtt.username" and not value.strip():
            # What a template leaves for "no user" (`username: ""`). Kept, it was sent as an empty
            # user name with no password, even with a password_file: refused by any broker that
            # needs a login, and nothing said why.
            return None
    low, high, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if choices is not None and value not in choices:
        _fail(lines, path, f"expected one of {', '.join(choices)}, got {_shown(value)}")
    if low is not None and (value < low or (meta.get("min_exclusive") and value == low)):
        bound = f"greater than {low}" if meta.get("min_exclusive") else f"at least {low}"
        _fail(lines, path, f"expected {bound}" + (f" and at most {high}" if high is not None else "")
              + f", got {_shown(value)}")
    if high is not None and value > high:
        _fail(lines, path, f"expected at most {high}, got {_shown(value)}")
    return value


def _build(cls: type, data: Any, prefix: str, lines: _Lines) -> Any:
    if data is None:
        data = {}
    known = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(data, dict):
        # `tls: true` for `tls: {enabled: true}`: say which setting is meant
        meant = f" (did you mean {prefix}.enabled: {str(data).lower()}?)" if isinstance(data, bool) \
            and "enabled" in known else ""
        _fail(lines, prefix or "(top level)", f"expected a mapping of settings, got {_shown(data)}{meant}")
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in known:
            path = f"{prefix}.{key}" if prefix else str(key)
            suggestion = _closest(str(key), known)
            _fail(lines, path, "unknown setting" + (f" (did you mean '{suggestion}'?)" if suggestion else "")
                  + f"; valid here: {', '.join(known)}")
    values = {}
    for name, f in known.items():
        path = f"{prefix}.{name}" if prefix else name
        base, optional = _plain_type(hints[name])
        if dataclasses.is_dataclass(base):
            values[name] = _build(base, data.get(name), path, lines)
        elif name in data:
            values[name] = _convert(data[name], f.metadata, base, optional, path, lines)
    return cls(**values)


def _closest(key: str, known: dict) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _model_file(setting: str | None) -> str | None:
    """The file a model setting means (a bundled model's bare name included), for the file checks."""
    return str(resolve_model_path(setting)) if setting else None


# U+FDD0..U+FDEF and the last two code points of every plane: MQTT forbids them in strings.
_NONCHARACTER = re.compile("[\ufdd0-\ufdef\ufffe\uffff\U0001fffe\U0001ffff\U0002fffe\U0002ffff"
                           "\U0003fffe\U0003ffff\U0010fffe\U0010ffff]")


def _check_rules(cfg: Config, lines: _Lines) -> None:
    """Cross-field rules; no side effects."""
    m = cfg.mqtt
    if not m.host or re.search(r"\s|/|^[a-z]+:", m.host):
        _fail(lines, "mqtt.host", f"expected a host name or IP address (no scheme, no path), got {_shown(m.host)}")
    if m.host.count(":") == 1 or m.host.startswith("["):
        # One colon is no IPv6 address: a port written into the host (the resolver would fail, forever).
        _fail(lines, "mqtt.host", f"expected a host name or IP address without a port or brackets "
              f"(the port goes in mqtt.port), got {_shown(m.host)}")
    try:
        m.host.encode("idna")  # what the socket layer does first; it fails on "a..b" inside paho's thread
    except UnicodeError:
        _fail(lines, "mqtt.host", f"not a valid host name (empty or over-long part between dots), got {_shown(m.host)}")
    if len(m.host) > 253:  # a part over 63 characters fails the idna check above
        _fail(lines, "mqtt.host", f"not a valid host name (at most 253 characters, 63 between dots), "
              f"got {_shown(m.host)}")
    if m.username is not None and len(m.username.encode()) > MAX_MQTT_STRING:
        _fail(lines, "mqtt.username", f"too long: {len(m.username.encode())} bytes, MQTT allows {MAX_MQTT_STRING}")
    if m.client_id is not None and not 1 <= len(m.client_id.encode()) <= 256:
        _fail(lines, "mqtt.client_id", f"expected 1 to 256 bytes, got {len(m.client_id.encode())}")
    if m.reconnect_max_s < m.reconnect_min_s:
        _fail(lines, "mqtt.reconnect_max_s", f"must be at least mqtt.reconnect_min_s ({m.reconnect_min_s})")
    if cfg.camera.retry_max_s < cfg.camera.retry_initial_s:
        _fail(lines, "camera.retry_max_s", f"must be at least camera.retry_initial_s ({cfg.camera.retry_initial_s})")
    prefix = m.topic_prefix
    if not prefix or any(c in prefix for c in "#+\0") or prefix.startswith("/") or prefix.endswith("/"):
        _fail(lines, "mqtt.topic_prefix", f"expected topic levels without wildcards or leading/trailing '/', "
              f"got {_shown(prefix)}")
    if prefix.startswith("$"):
        _fail(lines, "mqtt.topic_prefix", f"topics starting with '$' are the broker's own (it drops what clients "
              f"publish there), got {_shown(prefix)}")
    if len(prefix.encode()) > 1024:
        _fail(lines, "mqtt.topic_prefix", f"too long: {len(prefix.encode())} bytes, expected at most 1024")
    for path, text in (("mqtt.topic_prefix", prefix), ("mqtt.client_id", m.client_id or ""),
                       ("mqtt.discovery.prefix", m.discovery.prefix)):
        if _NONCHARACTER.search(text):
            _fail(lines, path, f"contains a Unicode non-character, which MQTT forbids: {_shown(text)}")
    disc = m.discovery.prefix
    if not disc or any(c in disc for c in "#+\0") or disc.startswith(("/", "$")) or disc.endswith("/") \
            or len(disc.encode()) > 1024:
        _fail(lines, "mqtt.discovery.prefix", f"expected topic levels without wildcards, got {_shown(disc)}")
    if (m.tls.cert_file is None) != (m.tls.key_file is None):
        _fail(lines, "mqtt.tls.key_file", "cert_file and key_file must be given together")
    files = [("mqtt.password_file", m.password_file), ("mqtt.tls.ca_file", m.tls.ca_file),
             ("mqtt.tls.cert_file", m.tls.cert_file), ("mqtt.tls.key_file", m.tls.key_file),
             ("detector.model", _model_file(cfg.detector.model)),
             ("classifier.model", _model_file(cfg.classifier.model))]
    for path, value in files:
        if value is None:
            continue
        if not Path(value).exists():
            _fail(lines, path, f"file not found: {value}")
        if not Path(value).is_file():
            _fail(lines, path, f"not a regular file: {value}")
        if not os.access(value, os.R_OK):
            _fail(lines, path, f"file not readable: {value}")
    if any((m.tls.ca_file, m.tls.cert_file)) and not m.tls.enabled:
        _fail(lines, "mqtt.tls.enabled", "TLS files are set but tls.enabled is false")
    if m.tls.insecure and not m.tls.enabled:
        _fail(lines, "mqtt.tls.insecure", "set, but tls.enabled is false")
    if m.password_file is not None:
        if m.username is None:
            _fail(lines, "mqtt.password_file", "set, but mqtt.username is not (an empty one counts as none): "
                  "the password would never be sent")
        if not read_password(m):
            _fail(lines, "mqtt.password_file", f"the file is empty: {m.password_file}")
    if cfg.detector.kind == "haar" and cfg.detector.model is not None:
        _fail(lines, "detector.model", "applies to blazeface only; the haar detector uses OpenCV's own cascade")
    if not cfg.source.strip():
        _fail(lines, "source", "must not be empty")
    _check_stream_url(cfg.source.strip(), lines)


def _check_stream_url(source: str, lines: _Lines) -> None:
    """A stream URL without a host, or with a port that is none, would be reopened forever."""
    if not is_stream_url(source):
        return
    shown = _shown(redact_url(source))
    try:
        parts = urllib.parse.urlsplit(source)
    except ValueError as exc:  # an unclosed or invalid [IPv6] literal
        _fail(lines, "source", f"not a valid stream URL ({exc}): {shown}")
    try:
        port = parts.port
    except ValueError:  # not a number, or over 65535
        port = 0
    if port == 0:
        _fail(lines, "source", f"the stream URL's port must be a number from 1 to 65535: {shown}")
    # udp://@:1234 and tcp://:5000?listen=1 (no host, a port) receive on every interface; anything
    # else needs a host.
    if not parts.hostname and not (parts.scheme.lower() in ("udp", "tcp") and port):
        _fail(lines, "source", f"the stream URL has no host: {shown}")


def _set_path(data: dict, dotted: str, value: Any) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


# Settings that name a file. A relative one in a config file is taken from the file's folder, as
# nginx and mosquitto do: the service runs in /var/lib/emotion-agent with its config in
# /etc/emotion-agent, and check-config, run from anywhere, must find what the service finds.
_FILE_SETTINGS = ("source", "detector.model", "classifier.model", "mqtt.password_file", "mqtt.tls.ca_file",
                  "mqtt.tls.cert_file", "mqtt.tls.key_file")


def _relative_to_config(data: dict, folder: Path) -> None:
    """The file settings of a config file's `data`, relative ones made relative to `folder`."""
    for dotted in _FILE_SETTINGS:
        *sections, key = dotted.split(".")
        node: Any = data
        for name in sections:
            node = node.get(name) if isinstance(node, dict) else None
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value.strip() or value.startswith("~") or Path(value).is_absolute():
            continue  # not a relative file name; the validation says what is wrong with a non-text
        if dotted == "source":
            value = value.strip()  # as capture.classify_source reads it
            if value.isdigit() or "://" in value:  # a camera index or a URL
                continue
        path = folder / value
        if dotted.endswith(".model"):  # a bare name that is no file there: the bundled model
            try:
                path = resolve_model_path(value, folder)
            except ValueError:  # a NUL or a stray surrogate in the name: the validation says so
                pass
        node[key] = str(path)


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 16


# A plain value that starts with { or [ is a YAML mapping or list: `topic_prefix: {hostname}/x`
# does not parse, and the parser's words for it do not say why.
_FLOW_START = re.compile(r"^\s*(-\s+)?[^#'\"]*?:\s+[{\[]")


def _quoting_hint(text: str | None, mark: Any) -> str:
    if not text or mark is None:
        return ""
    for number in {mark.line, max(mark.line - 1, 0)}:  # the parser may stop on the next line
        line = text.splitlines()[number] if number < len(text.splitlines()) else ""
        if _FLOW_START.match(line):
            return f" (line {number + 1}: quote a text value that starts with {{ or [, as in " \
                   "topic_prefix: \"{hostname}/kitchen\")"
    return ""


def setting_location(path: Path | str, key: str) -> str:
    """'FILE:LINE: ' of a setting in a config file, for an error found after loading it (the source
    checks of check-config); 'FILE: ' where the file does not set it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = None
    return _Lines(text, str(path)).where(key)


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Validated, frozen config from a YAML file (or the defaults) plus dotted-key overrides."""
    text = None
    origin = ""
    if path is not None:
        origin = str(path)
        if not origin.strip():
            raise ConfigError("config path is empty")
        file = Path(path)
        try:
            if file.exists() and not file.is_file() and not file.is_dir():
                raise ConfigError(f"config path is not a regular file: {path}")  # /dev/zero would never end
            size = file.stat().st_size if file.is_file() else 0
            if size > MAX_CONFIG_BYTES:
                raise ConfigError(f"config file too large: {path} ({size:,} bytes, "
                                  f"at most {MAX_CONFIG_BYTES:,}; a full config is a few KB)")
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"config path is a directory, not a file: {path}") from None
        except PermissionError:
            raise ConfigError(f"config file not readable (permission denied): {path}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file is not UTF-8 text: {path}") from None
        except OSError as exc:  # a name too long, an I/O error
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        depth = 0
        for event in yaml.parse(text or ""):
            # Aliases have no use in this config, and a few nested ones make any walk of the
            # document exponential ("billion laughs").
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(f"{origin}:{event.start_mark.line + 1}: YAML aliases (*{event.anchor}) "
                                  "are not supported in the config; write the value out")
            # The config is three levels deep; thousands would exhaust PyYAML's recursion.
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError(f"{origin}:{event.start_mark.line + 1}: nested more than {MAX_CONFIG_DEPTH} "
                                  "levels deep; the config has three")
            # YAML 1.1 reads a plain 010 as octal 8: `source: 010` would open camera 8.
            if isinstance(event, yaml.ScalarEvent) and event.implicit[0] and event.style is None \
                    and _YAML11_OCTAL.fullmatch(event.value):
                raise ConfigError(f"{origin}:{event.start_mark.line + 1}: {event.value} is an octal number in YAML "
                                  f"(= {int(event.value.replace('_', ''), 8)}); write it without the leading "
                                  "zero, or quote it")
        data = yaml.safe_load(text) if text else {}
    except ValueError as exc:  # int() refuses a literal of over 4300 digits; a date that is none
        problem = "a number of thousands of digits" if "digits" in str(exc) else str(exc).splitlines()[0]
        raise ConfigError(f"{origin}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}: " if mark else f"{origin}: "
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}invalid YAML: {problem}{_quoting_hint(text, mark)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of settings at the top level, got {type(data).__name__}")
    if path is not None:  # before the overrides: a --source on the command line is the working folder's
        _relative_to_config(data, Path(path).absolute().parent)
    for dotted, value in (overrides or {}).items():
        _set_path(data, dotted, value)  # None too: `--set classifier.model=null` means the bundled default
    lines = _Lines(text, origin)
    if lines.duplicates:
        # YAML would silently keep the last one: a typo'd copy of a section must not win unseen.
        path, line, first = lines.duplicates[0]
        raise ConfigError(f"{origin}:{line}: {path}: set twice (first on line {first}); keep one")
    if lines.sexagesimal:
        path, line, number = lines.sexagesimal[0]
        raise ConfigError(f"{origin}:{line}: {path}: {number} is a base-60 number in YAML "
                          f"(= {yaml.safe_load(number)}); write the number you mean, or quote it ('{number}')")
    cfg = _build(Config, data, "", lines)
    _check_rules(cfg, lines)
    return cfg


def hostname() -> str:
    """The host name as a topic-safe token."""
    name = socket.gethostname().split(".")[0] or "localhost"
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def topic_root(cfg: MqttConfig) -> str:
    return cfg.topic_prefix.replace("{hostname}", hostname())


def default_topic_root(host: str) -> str:
    """The topic root on `host` of an agent left with the default topic_prefix."""
    return DEFAULT_TOPIC_PREFIX.replace("{hostname}", host)


def client_id(cfg: MqttConfig) -> str:
    """The configured id, or emotion-agent-<hostname>, plus the topic root when it is not the default:
    two agents on one host, told apart by their topic prefixes, must not share an id (the broker
    would keep disconnecting one of them) nor, since the discovery node id comes from it, Home
    Assistant entities."""
    if cfg.client_id:
        return cfg.client_id
    base = f"emotion-agent-{hostname()}"
    root = topic_root(cfg)
    if root == default_topic_root(hostname()):
        return base
    return f"{base}-{re.sub(r'[^A-Za-z0-9_-]', '_', root.replace('/', '-'))}"


def read_password(cfg: MqttConfig) -> str | None:
    """The MQTT password: password_file, then the environment, then systemd's credentials directory."""
    found = _password(cfg)
    if found is None:
        return None
    password, what = found
    # paho's network thread dies on either of these (a struct error, an encoding error), and then
    # the agent only ever says the broker is unreachable.
    try:
        size = len(password.encode("utf-8"))
    except UnicodeEncodeError:
        raise ConfigError(f"{what}: the password is not valid UTF-8") from None
    if size > MAX_MQTT_STRING:
        raise ConfigError(f"{what}: the password is too long: {size} bytes, MQTT allows {MAX_MQTT_STRING}")
    return password


def _password(cfg: MqttConfig) -> tuple[str, str] | None:
    """(the password, where it came from), or None."""
    if cfg.password_file:
        return _read_secret(Path(cfg.password_file), "mqtt.password_file"), "mqtt.password_file"
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV], PASSWORD_ENV
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / "mqtt_password").is_file():
        what = "systemd credential mqtt_password"
        return _read_secret(Path(creds) / "mqtt_password", what), what
    return None


def _read_secret(path: Path, what: str) -> str:
    try:  # utf-8-sig: without the byte-order mark Windows editors put first
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: not UTF-8 text: {path}") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None


def iter_settings(cls: type = Config, prefix: str = ""):
    """(dotted path, default, description) for every leaf setting, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        base, _ = _plain_type(hints[f.name])
        if dataclasses.is_dataclass(base):
            yield from iter_settings(base, path)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield path, default, f.metadata.get("description", "")
