"""The configuration: one frozen tree of pydantic models, read from YAML in one place.

Each stage takes its section as it is, so every default is written once, here. `load_config` (run and
check-config alike) refuses YAML 1.1's traps and reports the first error as `FILE:LINE: key.path: reason`.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import socket
import stat
import unicodedata
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

from agent.errors import ConfigError
from agent.model_files import resolve_model_path
from agent.topics import MAX_MQTT_STRING

PASSWORD_ENV = "EMOTION_AGENT_MQTT_PASSWORD"
DEFAULT_TOPIC_PREFIX = "emotion-agent/{hostname}"
# A source with one of these is a stream; here, not in capture, so that validating it loads no OpenCV.
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://", "rtmp://")


def is_stream_url(text: str) -> bool:
    return text.lower().startswith(STREAM_SCHEMES)


class Invalid(ValueError):
    """A broken rule; `key` names the setting it is about when that is not the one being validated."""

    def __init__(self, reason: str, key: str | None = None):
        super().__init__(reason)
        self.key = key


def _shown(value: Any, limit: int = 60) -> str:
    """A value for an error line, cut short: a pasted blob must not make a thousand-column line."""
    text = "null" if value is None else repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "…" + text[-4:]


# --- value types: what YAML gives, checked the same way wherever a setting takes it --------------


def _text(value: str) -> str:
    """UTF-8 (OpenCV crashes on Python's stand-ins for other bytes) without control characters (a
    broker takes a topic or client id with one for malformed, and the agent would only see it fail)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"not valid UTF-8 text (a file name in another encoding? rename it): {_shown(value)}") \
            from None
    control = re.search("[\x00-\x1f\x7f-\x9f]", value)
    if control:  # redacted: a stream's password stays out of the journal
        raise ValueError(f"contains a control character (U+{ord(control.group()):04X}): {_shown(redact_url(value))}")
    return value


def _number_as_text(value: Any) -> Any:
    """`source: 0` means camera 0, `protocol: 5` MQTT 5: YAML reads both as numbers."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads 1e9 (no dot, no sign) as text, though people mean the number; and an integer of
    hundreds of digits is no float."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()) or \
            isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"expected a finite number, got {_shown(value)}") from None
    return value


def _readable(value: str) -> str:
    path = Path(value)
    problem = ("file not found" if not path.exists() else "not a regular file" if not path.is_file()
               else None if os.access(path, os.R_OK) else "file not readable")
    if problem:
        raise ValueError(f"{problem}: {value}")
    return value


def _model_file(name: str) -> str:
    _readable(str(resolve_model_path(name)))  # a readable file, or a bundled model's bare name
    return name


def _visible(text: str) -> str:
    """No character that shows as nothing or as a blank other than the space (a zero-width or a no-break
    space, a byte-order mark), nor a non-character (MQTT forbids them)."""
    for char in text:
        category = unicodedata.category(char)
        if category in ("Cf", "Co", "Cn", "Cs", "Zl", "Zp") or (category == "Zs" and char != " "):
            name = f"U+{ord(char):04X} {unicodedata.name(char, '')}".rstrip()
            raise ValueError(f"contains an invisible character ({name}), got {_shown(text)}")
    return text


def _topic_levels(topic: str) -> str:
    """Topics a subscription written by hand matches: `" kitchen "` would publish to `" kitchen /state"`."""
    if not topic or any(c in topic for c in "#+") or topic.startswith("/") or topic.endswith("/"):
        raise ValueError(f"expected topic levels without wildcards or leading/trailing '/', got {_shown(topic)}")
    if topic.startswith("$"):
        raise ValueError(f"topics starting with '$' are the broker's own (it drops what clients publish there), "
                         f"got {_shown(topic)}")
    if "//" in topic:
        raise ValueError(f"has an empty topic level ('//'), got {_shown(topic)}")
    if any(level != level.strip() for level in topic.split("/")):
        raise ValueError(f"a topic level starts or ends with a blank, got {_shown(topic)}; remove the blanks")
    return topic


def _host(host: str) -> str:
    # One colon is no IPv6 address but a port written into the host: the resolver would fail, forever.
    if not host or re.search(r"\s|/|^[a-z]+:|^\[", host) or host.count(":") == 1:
        raise ValueError("expected a host name or IP address without a port or brackets (no scheme, no path; the "
                         f"port goes in mqtt.port), got {_shown(host)}")
    try:
        host.encode("idna")  # as the socket layer does first, which fails on "a..b" inside paho's thread
    except UnicodeError:
        raise ValueError(f"not a valid host name (empty or over-long part between dots), got {_shown(host)}") \
            from None
    if len(host) > 253:
        raise ValueError(f"not a valid host name (over 253 characters), got {_shown(host)}")
    return host


def _max_bytes(limit: int) -> AfterValidator:
    """At most `limit` bytes of UTF-8: MQTT measures its strings in bytes."""
    def check(value: str) -> str:
        if len(value.encode()) > limit:
            raise ValueError(f"too long: {len(value.encode())} bytes, expected at most {limit}")
        return value
    return AfterValidator(check)


Text = Annotated[str, AfterValidator(_text)]
Number = Annotated[float, BeforeValidator(_yaml_number)]
File = Annotated[Text, AfterValidator(_readable)]
ModelFile = Annotated[Text, AfterValidator(_model_file)]
Topic = Annotated[Text, _max_bytes(1024), AfterValidator(_topic_levels), AfterValidator(_visible)]
Host = Annotated[Text, AfterValidator(_host)]
ClientId = Annotated[str, Field(min_length=1), AfterValidator(_text), _max_bytes(256), AfterValidator(_visible)]
UserName = Annotated[Text, _max_bytes(MAX_MQTT_STRING)]


class Section(BaseModel):
    """A config section: frozen, unknown keys refused, types strict (YAML gives typed values); an empty
    one (`mqtt:` and nothing under it) has every default."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, data: Any) -> Any:
        return {} if data is None else data


# --- the tree ------------------------------------------------------------------------------------


class CameraConfig(Section):
    enabled: bool = Field(True, description="Analysis on (true) or off (false); while the agent runs, its MQTT "
                          "switch takes precedence.")
    width: int | None = Field(None, ge=16, le=16384,
                              description="Requested capture width in pixels (null: the camera's default).")
    height: int | None = Field(None, ge=16, le=16384,
                               description="Requested capture height in pixels (null: the camera's default).")
    fps: Number | None = Field(None, gt=0, le=1000, description="Requested capture rate (null: the camera's default).")
    max_fps: Number | None = Field(None, ge=0.001, le=1000, description="Process at most this many frames a second "
                                   "(null: as fast as frames come); saves CPU on a Pi.")
    retry_initial_s: Number = Field(1.0, ge=0.05, le=3600,
                                    description="First wait before reopening a failed camera or stream.")
    retry_max_s: Number = Field(30.0, ge=0.05, le=3600,
                                description="Longest wait between reopen attempts (the wait doubles up to this).")
    stall_timeout_s: Number = Field(
        10.0, ge=0.5, le=3600, description="A stream (rtsp://, http://) that sends nothing for this long, or takes "
        "longer to open, is taken for lost and reopened (a camera on Wi-Fi can stall with its connection open).")

    @model_validator(mode="after")
    def _backoff(self) -> CameraConfig:
        if self.retry_max_s < self.retry_initial_s:
            raise Invalid(f"must be at least camera.retry_initial_s ({self.retry_initial_s})", "retry_max_s")
        return self


class DetectorConfig(Section):
    kind: Literal["blazeface", "haar"] = Field(
        "blazeface", description="Face detector: blazeface (MediaPipe full-range TFLite) or haar (OpenCV cascade).")
    model: ModelFile | None = Field(None, description="BlazeFace model file, or a bundled one's name (null: the "
                                    "bundled face_detection_full_range.tflite; face_detection_full_range_int8.tflite "
                                    "is faster on CPUs with int8 dot products, see models/MODELS.md).")
    score_threshold: Number = Field(0.5, ge=0, le=1, description="Minimum face score to keep a detection (blazeface).")
    nms_iou: Number = Field(0.3, ge=0, le=1, description="Overlap above which two detections are merged into one.")
    min_face_size: int = Field(24, ge=1, le=16384, description="Ignore faces smaller than this many pixels (width).")
    haar_scale_factor: Number = Field(1.3, ge=1.01, le=2.0, description="Haar cascade scale step.")
    haar_min_neighbors: int = Field(5, ge=0, le=50, description="Haar cascade neighbours a detection needs.")
    interval_s: Number = Field(
        0.1, ge=0, le=5, description="Run the detector at most this often (seconds); in between, faces are "
        "classified at their last boxes. 0 runs it on every frame. The detector is the costliest stage.")
    threads: int = Field(1, ge=1, le=16, description="Interpreter threads for the detector.")

    @model_validator(mode="after")
    def _model_only_for_blazeface(self) -> DetectorConfig:
        if self.kind == "haar" and self.model is not None:
            raise Invalid("applies to blazeface only; the haar detector uses OpenCV's own cascade", "model")
        return self


class ClassifierConfig(Section):
    model: ModelFile | None = Field(None, description="Emotion model file, or a bundled one's name (null: the "
                                    "bundled default, see models/MODELS.md).")
    crop_margin: Number = Field(0.1, ge=-0.3, le=1.0, description="Grow each face box by this fraction of its size "
                                "on every side before classifying (FER2013 faces are framed looser than detector "
                                "boxes).")
    threads: int = Field(1, ge=1, le=16, description="Interpreter threads for the classifier.")


class TrackingConfig(Section):
    max_gap_s: Number = Field(1.0, ge=0, le=3600, description="A face unseen for less than this keeps its id.")
    min_iou: Number = Field(0.2, ge=0, le=1, description="Minimum overlap to match a detection to a track.")


class SmoothingConfig(Section):
    """Defaults measured with `python -m agent.tools.flicker` on ../shared/data/videos: the figures, and
    the neighbours and earlier values tried, are in docs/benchmarks.md."""

    window_s: Number = Field(0.25, gt=0, le=60,
                             description="Time constant of the moving average of each face's 7 probabilities.")
    change_margin: Number = Field(0.0, ge=0, le=1,
                                  description="A new emotion must lead the current one by this much (probability).")
    dwell_s: Number = Field(0.25, ge=0, le=60,
                            description="...and hold that lead this long before an emotion_changed event.")
    confidence_gate: Number = Field(0.3, ge=0, le=1,
                                    description="Below this smoothed probability the state is 'uncertain'.")


class TlsConfig(Section):
    enabled: bool = Field(False, description="Connect with TLS.")
    ca_file: File | None = Field(None, description="CA certificate file (null: the system's trust store).")
    cert_file: File | None = Field(None, description="Client certificate file, for brokers that require one.")
    key_file: File | None = Field(None, description="Client private key file (with cert_file).")
    insecure: bool = Field(False, description="Skip the broker host name check. Only for testing.")

    @model_validator(mode="after")
    def _consistent(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise Invalid("cert_file and key_file must be given together", "key_file")
        if (self.ca_file or self.cert_file) and not self.enabled:
            raise Invalid("TLS files are set but tls.enabled is false", "enabled")
        if self.insecure and not self.enabled:
            raise Invalid("set, but tls.enabled is false", "insecure")
        return self


class DiscoveryConfig(Section):
    enabled: bool = Field(True, description="Publish Home Assistant MQTT discovery messages.")
    prefix: Topic = Field("homeassistant", description="Home Assistant's discovery prefix.")


class MqttConfig(Section):
    host: Host = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual for TLS).")
    protocol: Annotated[Literal["auto", "5", "3.1.1"], BeforeValidator(_number_as_text)] = Field(
        "auto", description="MQTT version: 5 (the broker says when it refuses a message, e.g. by its ACL), 3.1.1, "
        "or auto: 5, and 3.1.1 from then on if the broker does not speak 5 (mosquitto before 1.6, RabbitMQ before "
        "3.13).")
    client_id: ClientId | None = Field(
        None, description="MQTT client id (null: emotion-agent-<hostname>, followed, when topic_prefix is not the "
        "default, by the topic root and a short hash of it).")
    topic_prefix: Topic = Field(DEFAULT_TOPIC_PREFIX, description="Root of every topic; {hostname} is replaced.")
    qos: int = Field(1, ge=0, le=2, description="QoS of events and state (0, 1 or 2).")
    keepalive_s: int = Field(30, ge=5, le=65535,
                             description="Keep-alive interval; the broker sends the Last Will after 1.5x this.")
    username: UserName | None = Field(None, description="User name, if the broker requires one.")
    password_file: File | None = Field(None, description="File holding the password (or set " + PASSWORD_ENV
                                       + ", or systemd credential mqtt_password).")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings.")
    queue_size: int = Field(1000, ge=1, le=1_000_000, description="Messages kept while the broker is unreachable; "
                            "beyond it the newest are dropped and counted.")
    reconnect_min_s: Number = Field(1.0, ge=0.1, le=3600, description="First wait before reconnecting.")
    reconnect_max_s: Number = Field(60.0, ge=1, le=3600, description="Longest wait between reconnects.")
    summary_interval_s: Number = Field(60.0, ge=1, le=86400, description="Period of the summary message.")
    stats_interval_s: Number = Field(30.0, ge=1, le=86400, description="Period of the stats message.")
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig, description="Home Assistant discovery.")

    @field_validator("username", mode="before")
    @classmethod
    def _no_blank_user(cls, value: Any) -> Any:
        # A template's `username: ""` means no user; kept, it was sent with no password, and refused.
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _rules(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise Invalid(f"must be at least mqtt.reconnect_min_s ({self.reconnect_min_s})", "reconnect_max_s")
        if self.password_file is None:
            return self
        if self.username is None:
            raise Invalid("set, but mqtt.username is not (an empty one counts as none): the password would never "
                          "be sent", "password_file")
        try:
            password = read_password(self)
        except ConfigError as exc:  # "mqtt.password_file: what is wrong"
            raise Invalid(str(exc).partition(": ")[2], "password_file") from None
        if not password:
            raise Invalid(f"the file is empty: {self.password_file}", "password_file")
        return self


def _check_stream_url(source: str) -> None:
    """A stream URL without a host, or with a port that is none, would be reopened forever."""
    shown = _shown(redact_url(source))
    try:
        parts = urllib.parse.urlsplit(source)
    except ValueError as exc:  # an unclosed or invalid [IPv6] literal
        raise ValueError(f"not a valid stream URL ({exc}): {shown}") from None
    try:
        port = parts.port
    except ValueError:  # not a number, or over 65535
        port = 0
    if port == 0:
        raise ValueError(f"the stream URL's port must be a number from 1 to 65535: {shown}")
    # udp://@:1234 and tcp://:5000?listen=1 (a port, no host) receive on every interface.
    if not parts.hostname and not (parts.scheme.lower() in ("udp", "tcp") and port):
        raise ValueError(f"the stream URL has no host: {shown}")


class Config(Section):
    source: Annotated[Text, BeforeValidator(_number_as_text)] = Field(
        "0", description="Camera index (0), video file, image file, or rtsp:// / http(s):// URL.")
    camera: CameraConfig = Field(default_factory=CameraConfig, description="Capture settings.")
    detector: DetectorConfig = Field(default_factory=DetectorConfig, description="Face detection.")
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig, description="Expression classification.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Face tracking.")
    smoothing: SmoothingConfig = Field(default_factory=SmoothingConfig,
                                       description="Per-face smoothing and change policy.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="MQTT broker and topics.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Logging level.")

    @field_validator("source")
    @classmethod
    def _source(cls, source: str) -> str:
        stripped = source.strip()  # as capture.classify_source reads it
        if not stripped:
            raise ValueError("must not be empty")
        if is_stream_url(stripped):
            _check_stream_url(stripped)
        return source

    def redacted(self) -> dict[str, Any]:
        """The config as a plain dict, safe to log: the password never lives in it, the user name and a
        stream's password are masked."""
        data = self.model_dump()
        if data["mqtt"]["username"]:
            data["mqtt"]["username"] = "***"
        data["source"] = redact_url(data["source"])
        return data


def redact_url(text: str) -> str:
    """`text` with a URL's password masked (rtsp://admin:***@cam/stream): cameras take their
    credentials in the URL, and a journal is read by more people than a config."""
    address = re.match(r"([^:/]+://)([^/?#]*)@", text)  # the user info ends at the address's last @
    if address:
        user, colon, _ = address.group(2).partition(":")
        return f"{address.group(1)}{user}:***@{text[address.end():]}" if colon else text
    if "://" in text and "@" in text:  # a / ? or # in the password ends the address early: mask all
        scheme, _, rest = text.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return text


def iter_settings(model: type[BaseModel] = Config, prefix: str = ""):
    """(dotted path, default, description) for every leaf setting, in declaration order."""
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(info.annotation, type) and issubclass(info.annotation, Section):
            yield from iter_settings(info.annotation, path)
        else:
            yield path, info.get_default(call_default_factory=True), info.description or ""


# --- errors as one line ------------------------------------------------------------------------

# pydantic's words for a type or a bound, and the settings' own
_WORDS = (("Input should be", "expected"), ("a valid integer", "an integer"), ("a valid number", "a number"),
          ("a valid boolean", "true or false"), ("a valid string", "a string"),
          ("greater than or equal to", "at least"), ("less than or equal to", "at most"))


def _section(loc: list[str]) -> Any:
    model: Any = Config
    for name in loc:
        model = model.model_fields[name].annotation
    return model


def _reason(error: Any, loc: list[str]) -> str:
    """A validator's own words, or pydantic's in the words of the settings."""
    kind, value = error["type"], error["input"]
    if "error" in error.get("ctx", {}):
        return str(error["ctx"]["error"])
    if kind == "extra_forbidden":
        known = list(_section(loc[:-1]).model_fields)
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        return "unknown setting" + (f" (did you mean '{close[0]}'?)" if close else "") + \
            f"; valid here: {', '.join(known)}"
    if kind == "model_type":  # `tls: true` for `tls: {enabled: true}`: say which setting is meant
        meant = isinstance(value, bool) and "enabled" in _section(loc).model_fields
        return f"expected a mapping of settings, got {_shown(value)}" + \
            (f" (did you mean {'.'.join(loc)}.enabled: {str(value).lower()}?)" if meant else "")
    text = error["msg"]
    for theirs, ours in _WORDS:
        text = text.replace(theirs, ours)
    hint = " (YAML reads a plain yes, no, on or off as true or false: quote it)" \
        if isinstance(value, bool) and kind in ("string_type", "literal_error") else ""
    return f"{text[:1].lower()}{text[1:]}, got {_shown(value)}{hint}"


def _one_line(exc: ValidationError, lines: _Lines) -> ConfigError:
    """The first validation error as `FILE:LINE: key.path: reason`."""
    error = exc.errors(include_url=False)[0]
    loc = [str(part) for part in error["loc"]]
    key = getattr(error.get("ctx", {}).get("error"), "key", None)
    path = ".".join(loc + (key.split(".") if key else [])) or "(top level)"
    return ConfigError(f"{lines.where(path)}{path}: {_reason(error, loc)}")


# --- reading the YAML ------------------------------------------------------------------------------

_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _Lines:
    """The line of each key path ("mqtt.port") in a composed YAML document, for error lines; refuses
    the document's first YAML 1.1 trap."""

    def __init__(self, node: yaml.Node | None, origin: str):
        self.origin = origin
        self.lines: dict[str, int] = {}
        if node is not None:
            self._walk(node, "")

    def _walk(self, node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.ScalarNode):
            self._check(node, prefix)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                line = key.start_mark.line + 1
                if path in self.lines:  # YAML keeps the last silently: a typo'd copy must not win unseen
                    raise ConfigError(f"{self.origin}:{line}: {path}: set twice (first on line {self.lines[path]}); "
                                      "keep one")
                self.lines[path] = line
                self._walk(value, path)

    def _check(self, node: yaml.ScalarNode, path: str) -> None:
        if node.style is not None:  # quoted: text, as written
            return
        at = f"{self.origin}:{node.start_mark.line + 1}: "
        # A plain 010 is octal 8: `source: 010` would open camera 8.
        if node.tag == _INT and re.fullmatch(r"[-+]?0[0-7_]+", node.value):
            raise ConfigError(f"{at}{node.value} is an octal number in YAML (= {int(node.value.replace('_', ''), 8)})"
                              "; write it without the leading zero, or quote it")
        # A plain 1:30 is base 60 (90): camera 90. Only in the source: elsewhere a number is meant.
        elif path == "source" and ":" in node.value and node.tag in (_INT, _FLOAT):
            raise ConfigError(f"{at}{path}: {node.value} is a base-60 number in YAML (= {yaml.safe_load(node.value)})"
                              f"; write the number you mean, or quote it ('{node.value}')")

    def where(self, path: str) -> str:
        """'FILE:LINE: ' of a key path, or of its closest section in the file (a rule about a key left at
        its default); 'FILE: ' where neither is in it."""
        while path and path not in self.lines:
            path = path.rpartition(".")[0]
        line = self.lines.get(path)
        return f"{self.origin}:{line}: " if line else (f"{self.origin}: " if self.origin else "")


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 16


def _quoting_hint(text: str, mark: Any) -> str:
    """A plain value that starts with { or [ is a YAML mapping or list, and the parser does not say so."""
    lines = text.splitlines()
    for number in {mark.line, max(mark.line - 1, 0)} if mark else ():  # it may stop on the next line
        if number < len(lines) and re.match(r"^\s*(-\s+)?[^#'\"]*?:\s+[{\[]", lines[number]):
            return f" (line {number + 1}: quote a text value that starts with {{ or [, as in " \
                   "topic_prefix: \"{hostname}/kitchen\")"
    return ""


def _read(path: Path | str) -> str:
    if not str(path).strip():
        raise ConfigError("config path is empty")
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # /dev/zero would be read forever
            raise ConfigError(f"config path is {'a directory' if stat.S_ISDIR(info.st_mode) else 'not a regular file'}"
                              f": {path}")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file too large: {path} ({info.st_size:,} bytes, "
                              f"at most {MAX_CONFIG_BYTES:,}; a full config is a few KB)")
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file is not UTF-8 text: {path}") from None
    except OSError as exc:  # no permission, a name too long, an I/O error
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None


def _check_events(text: str, origin: str) -> None:
    """Before the document is composed: aliases, which the config has no use for and which make any walk
    of it exponential ("billion laughs"), and nesting deep enough to exhaust PyYAML's recursion."""
    depth = 0
    for event in yaml.parse(text):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"{origin}:{event.start_mark.line + 1}: YAML aliases (*{event.anchor}) "
                              "are not supported in the config; write the value out")
        depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{origin}:{event.start_mark.line + 1}: nested more than {MAX_CONFIG_DEPTH} "
                              "levels deep; the config has three")


def _parse(text: str, origin: str) -> tuple[Any, _Lines]:
    """The document's data and its line map, or one line that says why there is none."""
    try:
        _check_events(text, origin)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except ValueError as exc:  # int() refuses a literal of over 4300 digits; a date that is none
        problem = "a number of thousands of digits" if "digits" in str(exc) else str(exc).splitlines()[0]
        raise ConfigError(f"{origin}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}: " if mark else f"{origin}: "
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}invalid YAML: {problem}{_quoting_hint(text, mark)}") from None
    return data, _Lines(node, origin)


# Settings that name a file. A relative one in a config file is the file's folder's, as in nginx and
# mosquitto: the service runs in /var/lib/emotion-agent, its config is in /etc/emotion-agent.
_FILE_SETTINGS = ("source", "detector.model", "classifier.model", "mqtt.password_file", "mqtt.tls.ca_file",
                  "mqtt.tls.cert_file", "mqtt.tls.key_file")


def _holder(data: Any, dotted: str, create: bool = False) -> tuple[Any, str]:
    """The mapping that holds a dotted setting (None where there is none), and the setting's key in it."""
    *sections, key = dotted.split(".")
    for name in sections:
        if create and not isinstance(data.get(name), dict):
            data[name] = {}
        data = data.get(name) if isinstance(data, dict) else None
    return data, key


def _in_folder(dotted: str, value: Any, folder: Path) -> Any:
    """A file setting's value from a config file in `folder`: a relative file name made the folder's."""
    if not isinstance(value, str) or not value.strip() or value.startswith("~") or Path(value).is_absolute():
        return value  # no relative file name; the validation says what is wrong with a non-text
    if dotted == "source":
        value = value.strip()  # as capture.classify_source reads it
        if value.isdigit() or "://" in value:  # a camera index or a URL
            return value
    if dotted.endswith(".model"):  # a bare name that is no file there: the bundled model
        try:
            return str(resolve_model_path(value, folder))
        except ValueError:  # a NUL or a stray surrogate in the name: the validation says so
            pass
    return str(folder / value)


def setting_location(path: Path | str, key: str) -> str:
    """'FILE:LINE: ' of a setting in a config file, for an error found after loading it (check-config's
    source checks); 'FILE: ' where the file does not set it."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        return _Lines(node, str(path)).where(key)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        return f"{path}: "


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Validated, frozen config from a YAML file (or the defaults) plus dotted-key overrides
    (`--set detector.model=null` too: None means the default)."""
    origin = "" if path is None else str(path)
    text = "" if path is None else _read(path)
    data, lines = _parse(text, origin)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of settings at the top level, got {type(data).__name__}")
    for dotted in _FILE_SETTINGS if path is not None else ():  # not the overrides': the working folder's
        holder, key = _holder(data, dotted)
        if isinstance(holder, dict) and key in holder:
            holder[key] = _in_folder(dotted, holder[key], Path(path).absolute().parent)
    for dotted, value in (overrides or {}).items():
        holder, key = _holder(data, dotted, create=True)
        holder[key] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _one_line(exc, lines) from None


# --- what the settings mean --------------------------------------------------------------------


def hostname() -> str:
    """The host name as a topic-safe token."""
    name = socket.gethostname().split(".")[0] or "localhost"
    return topic_safe(name)


def topic_root(cfg: MqttConfig) -> str:
    return cfg.topic_prefix.replace("{hostname}", hostname())


def default_topic_root(host: str) -> str:
    """The topic root on `host` of an agent left with the default topic_prefix."""
    return DEFAULT_TOPIC_PREFIX.replace("{hostname}", host)


def topic_safe(text: str) -> str:
    """`text` with every character a topic level or client id should not carry made `_`."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def short_hash(text: str) -> str:
    """8 hex digits of `text`'s SHA-256: what tells apart two names that read alike once made safe."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def client_id(cfg: MqttConfig) -> str:
    """The configured id, or emotion-agent-<hostname>, followed for a topic root other than the default by
    the root made safe and its hash: two agents on one host must share neither a broker session nor (the
    discovery node id comes from it) a Home Assistant device, and `door/cam` reads as `door-cam`."""
    if cfg.client_id:
        return cfg.client_id
    base = f"emotion-agent-{hostname()}"
    root = topic_root(cfg)
    if root == default_topic_root(hostname()):
        return base
    safe = topic_safe(root.replace("/", "-"))[:64]
    return f"{base}-{safe}-{short_hash(root)}"


def read_password(cfg: MqttConfig) -> str | None:
    """The MQTT password: password_file, then the environment, then systemd's credentials directory."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if cfg.password_file:
        what, path = "mqtt.password_file", Path(cfg.password_file)
    elif os.environ.get(PASSWORD_ENV):
        what, path = PASSWORD_ENV, None
    elif creds and Path(creds, "mqtt_password").is_file():
        what, path = "systemd credential mqtt_password", Path(creds, "mqtt_password")
    else:
        return None
    # paho's network thread dies on a password that is no UTF-8 or too long for MQTT, and then the
    # agent only ever says the broker is unreachable. utf-8-sig: without a Windows editor's BOM.
    try:
        password = os.environ[PASSWORD_ENV] if path is None else path.read_text(encoding="utf-8-sig").strip()
        size = len(password.encode("utf-8"))
    except UnicodeError:
        raise ConfigError(f"{what}: the password is not valid UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if size > MAX_MQTT_STRING:
        raise ConfigError(f"{what}: the password is too long: {size} bytes, MQTT allows {MAX_MQTT_STRING}")
    return password
