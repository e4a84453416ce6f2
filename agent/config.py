"""The configuration: one typed, frozen tree of pydantic models, read from YAML in one place.

Every section forbids unknown keys and describes each of its fields; the stages take their section
as it is (`FaceStateTracker(cfg.tracking, cfg.smoothing)`, `make_detector(cfg.detector)`), so each
default is written once, here. Cross-field rules are validators without side effects.
`load_config` reads the YAML, refuses its 1.1 traps, and turns the first validation error into one
line: `FILE:LINE: key.path: reason`. `check-config` and `run` both call it.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import socket
import typing
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
# A source with one of these is a stream (capture.classify_source); here, not in capture, so that
# the validation can check the URL without loading OpenCV.
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://", "rtmp://")


def is_stream_url(text: str) -> bool:
    return text.lower().startswith(STREAM_SCHEMES)


class Invalid(ValueError):
    """A broken rule, raised by a validator; `key` names the setting it is about (relative to the
    section validated) when that is not the field being validated."""

    def __init__(self, reason: str, key: str | None = None):
        super().__init__(reason)
        self.key = key


def _shown(value: Any, limit: int = 60) -> str:
    """A value for an error line, cut short: a pasted blob must not become a thousand-column line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "…" + text[-4:]


# --- value types: what YAML gives, checked the same way wherever a setting takes it --------------

# C0 and C1 control characters: no setting has a use for them, and a broker rejects a topic or a
# client id holding one as malformed (the agent would only see a connection that keeps failing).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Python's stand-ins for bytes that are not UTF-8 (a file name from the command line);
        # OpenCV would crash on them.
        raise ValueError(f"not valid UTF-8 text (a file name in another encoding? rename it): {_shown(value)}") \
            from None
    control = _CONTROL.search(value)
    if control:  # a stream's password stays out of the journal
        raise ValueError(f"contains a control character (U+{ord(control.group()):04X}): {_shown(redact_url(value))}")
    return value


def _number_as_text(value: Any) -> Any:
    """`source: 0` means camera 0, `protocol: 5` MQTT 5: YAML reads both as numbers."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _yaml_number(value: Any) -> Any:
    if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e9 (no dot, no sign) as text; people mean the number
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise ValueError(f"expected a finite number, got {_shown(value)}") from None
    return value


def _readable(value: str) -> str:
    path = Path(value)
    if not path.exists():
        raise ValueError(f"file not found: {value}")
    if not path.is_file():
        raise ValueError(f"not a regular file: {value}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file not readable: {value}")
    return value


def _model_file(value: str) -> str:
    """A model setting names a readable file (a bundled model's bare name included)."""
    _readable(str(resolve_model_path(value)))
    return value


Text = Annotated[str, AfterValidator(_text)]
Number = Annotated[float, BeforeValidator(_yaml_number)]
File = Annotated[Text, AfterValidator(_readable)]
ModelFile = Annotated[Text, AfterValidator(_model_file)]


DetectorKind = Annotated[Literal["blazeface", "haar"], BeforeValidator(_number_as_text)]
MqttProtocol = Annotated[Literal["auto", "5", "3.1.1"], BeforeValidator(_number_as_text)]
LogLevel = Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_number_as_text)]


# U+FDD0..U+FDEF and the last two code points of every plane: MQTT forbids them in strings.
_NONCHARACTER = re.compile("[\ufdd0-\ufdef\ufffe\uffff\U0001fffe\U0001ffff\U0002fffe\U0002ffff"
                           "\U0003fffe\U0003ffff\U0010fffe\U0010ffff]")


def _mqtt_text(value: str | None) -> str | None:
    if value is not None and _NONCHARACTER.search(value):
        raise ValueError(f"contains a Unicode non-character, which MQTT forbids: {_shown(value)}")
    return value


def _invisible(text: str) -> str | None:
    """The first character of `text` that shows as nothing or as a blank other than the space
    (a zero-width space, a non-breaking space, a byte-order mark), as `U+XXXX NAME`."""
    for char in text:
        category = unicodedata.category(char)
        if category in ("Cf", "Co", "Cn", "Cs", "Zl", "Zp") or (category == "Zs" and char != " "):
            return f"U+{ord(char):04X} {unicodedata.name(char, '')}".rstrip()
    return None


def _topic_levels(topic: str) -> str:
    """A topic prefix that names the topics the user sees: no wildcard, no empty level, no level
    with blanks around it, nothing invisible (`" kitchen "` and `kitchen\\u200b` published to topics
    no subscription written by hand matches)."""
    if not topic or any(c in topic for c in "#+\0") or topic.startswith("/") or topic.endswith("/"):
        raise ValueError(f"expected topic levels without wildcards or leading/trailing '/', got {_shown(topic)}")
    if topic.startswith("$"):
        raise ValueError(f"topics starting with '$' are the broker's own (it drops what clients publish there), "
                         f"got {_shown(topic)}")
    if len(topic.encode()) > 1024:
        raise ValueError(f"too long: {len(topic.encode())} bytes, expected at most 1024")
    if "//" in topic:
        raise ValueError(f"has an empty topic level ('//'), got {_shown(topic)}")
    if any(level != level.strip() for level in topic.split("/")):
        raise ValueError(f"a topic level starts or ends with a blank, got {_shown(topic)}; remove the blanks")
    invisible = _invisible(topic)
    if invisible:
        raise ValueError(f"contains an invisible character ({invisible}), got {_shown(topic)}")
    return topic


Topic = Annotated[Text, AfterValidator(_mqtt_text), AfterValidator(_topic_levels)]


class Section(BaseModel):
    """A config section: frozen, unknown keys refused, types strict (YAML gives typed values);
    an empty section (`mqtt:` and nothing under it) has every default."""

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
    max_fps: Number | None = Field(None, gt=0, le=1000, description="Process at most this many frames a second "
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
    kind: DetectorKind = Field(
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
    """The defaults were measured with `python -m agent.tools.flicker` on the three videos in
    ../shared/data/videos (BlazeFace + the int8 MiniXception, 30.2 face-seconds, 20 faces):
    13.9 emitted changes per face-minute against 359.5 raw per-frame label changes (ratio 0.039;
    0.143 keeping every 6th frame, ~5 fps); 58 spliced held expressions all got their event,
    median 0.47 s, p90 0.96 s, max 1.04 s after the step (~5 fps: 34 of 34, max 1.68 s; with the
    detector run every 0.1 s: ratio 0.031, 51 of 52, max 0.87 s, the miss a face torn between
    angry and sad that left about a second after the step). The earlier 0.5/0.1/0.4/0.4 missed
    22 of the 58 and took up to 1.42 s. (Counts of every pair of held windows; the tuning was
    done when one window per other emotion was counted: 27 steps, 9 missed.) Single passes swing
    with +-1 grey level of noise; pooled with four such passes (`--noise-runs 4`), detector on every
    frame: 3 of 223 missed, p90 0.87 s; the earlier guess 58 of 220, p90 1.30 s. Neighbours (window 0.2-0.3,
    dwell 0.25-0.3, margin 0-0.03, gate 0.25-0.3) do about as well; a margin of 0.05 or more
    misses faces torn between two classes (angry 0.45 vs sad 0.35), a gate of 0.4 calls most
    crowd faces "uncertain".
    """

    window_s: Number = Field(0.25, gt=0, le=60,
                             description="Time constant of the moving average of each face's 7 probabilities.")
    change_margin: Number = Field(0.03, ge=0, le=1,
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


def _host(host: str) -> str:
    if not host or re.search(r"\s|/|^[a-z]+:", host):
        raise ValueError(f"expected a host name or IP address (no scheme, no path), got {_shown(host)}")
    if host.count(":") == 1 or host.startswith("["):
        # One colon is no IPv6 address: a port written into the host (the resolver would fail, forever).
        raise ValueError(f"expected a host name or IP address without a port or brackets (the port goes in "
                         f"mqtt.port), got {_shown(host)}")
    try:
        host.encode("idna")  # what the socket layer does first; it fails on "a..b" inside paho's thread
    except UnicodeError:
        raise ValueError(f"not a valid host name (empty or over-long part between dots), got {_shown(host)}") \
            from None
    if len(host) > 253:  # a part over 63 characters fails the idna check above
        raise ValueError(f"not a valid host name (at most 253 characters, 63 between dots), got {_shown(host)}")
    return host


def _bytes(low: int, high: int, words: str) -> AfterValidator:
    """An MQTT string of `low` to `high` bytes (UTF-8); `words` say what is wrong with one of N bytes."""
    def check(value: str) -> str:
        if not low <= len(value.encode()) <= high:
            raise ValueError(words.format(len(value.encode())))
        return value
    return AfterValidator(check)


Host = Annotated[Text, AfterValidator(_host)]
ClientId = Annotated[Text, AfterValidator(_mqtt_text), _bytes(1, 256, "expected 1 to 256 bytes, got {}")]
UserName = Annotated[Text, _bytes(0, MAX_MQTT_STRING, f"too long: {{}} bytes, MQTT allows {MAX_MQTT_STRING}")]


class MqttConfig(Section):
    host: Host = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual for TLS).")
    protocol: MqttProtocol = Field(
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
        # What a template leaves for "no user" (`username: ""`). Kept, it was sent as an empty
        # user name with no password, even with a password_file: refused by any broker that
        # needs a login, and nothing said why.
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
    # udp://@:1234 and tcp://:5000?listen=1 (no host, a port) receive on every interface; anything
    # else needs a host.
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
    log_level: LogLevel = Field("info", description="Logging level.")

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
        """The config as a plain dict, safe to log: secrets never live in it (the password comes
        from a file, the environment or a systemd credential), and the user name is masked."""
        data = self.model_dump()
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


def iter_settings(model: type[BaseModel] = Config, prefix: str = ""):
    """(dotted path, default, description) for every leaf setting, in declaration order."""
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if _is_section(info.annotation):
            yield from iter_settings(info.annotation, path)
        else:
            yield path, info.get_default(call_default_factory=True), info.description or ""


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


# --- errors as one line ------------------------------------------------------------------------

_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
             "bool_parsing": "true or false", "string_type": "a string", "literal_error": "a string"}
_MAPPING_ERRORS = ("model_type", "model_attributes_type", "dict_type")
_YAML11_BOOL_HINT = " (YAML reads a plain yes, no, on or off as true or false: quote it)"


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    """The section at a key path (None past a leaf setting)."""
    model: Any = Config
    for name in loc:
        info = model.model_fields.get(name) if model is not None else None
        model = info.annotation if info is not None and _is_section(info.annotation) else None
    return model


def _out_of_range(loc: list[str], kind: str, value: Any) -> str:
    info = _model_at(loc[:-1]).model_fields[loc[-1]]  # type: ignore[union-attr]
    bounds = {name: getattr(m, name) for m in info.metadata for name in ("ge", "gt", "le") if hasattr(m, name)}
    if kind == "less_than_equal":
        return f"expected at most {bounds['le']}, got {_shown(value)}"
    low = f"greater than {bounds['gt']}" if "gt" in bounds else f"at least {bounds['ge']}"
    high = f" and at most {bounds['le']}" if "le" in bounds else ""
    return f"expected {low}{high}, got {_shown(value)}"


def _reason(error: dict, loc: list[str]) -> str:
    """What is wrong with a setting, in the words of the settings (not of pydantic's types)."""
    kind, value = error["type"], error["input"]
    raised = (error.get("ctx") or {}).get("error")
    if raised is not None:  # a validator's own words
        return str(raised)
    if kind == "extra_forbidden":
        known = list(_model_at(loc[:-1]).model_fields)  # type: ignore[union-attr]
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        return "unknown setting" + (f" (did you mean '{close[0]}'?)" if close else "") + \
            f"; valid here: {', '.join(known)}"
    if kind in _MAPPING_ERRORS:  # `tls: true` for `tls: {enabled: true}`: say which setting is meant
        meant = isinstance(value, bool) and "enabled" in _model_at(loc).model_fields  # type: ignore[union-attr]
        return f"expected a mapping of settings, got {_shown(value)}" + \
            (f" (did you mean {'.'.join(loc)}.enabled: {str(value).lower()}?)" if meant else "")
    if kind == "literal_error" and isinstance(value, str):
        choices = typing.get_args(_model_at(loc[:-1]).model_fields[loc[-1]].annotation)  # type: ignore[union-attr]
        return f"expected one of {', '.join(choices)}, got {_shown(value)}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal"):
        return _out_of_range(loc, kind, value)
    if kind == "finite_number":
        return f"expected a finite number, got {_shown(value)}"
    expected = _EXPECTED.get(kind)
    if expected is None:
        return f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {_shown(value)}"
    if value is None:
        return f"must not be empty, expected {expected}"
    hint = _YAML11_BOOL_HINT if isinstance(value, bool) and expected == "a string" else ""
    return f"expected {expected}, got {_shown(value)}{hint}"


def _one_line(exc: ValidationError, lines: _Lines) -> ConfigError:
    """The first validation error as `FILE:LINE: key.path: reason`."""
    error = exc.errors(include_url=False)[0]
    loc = [str(part) for part in error["loc"]]
    raised = (error.get("ctx") or {}).get("error")
    if isinstance(raised, Invalid) and raised.key:
        loc += raised.key.split(".")
    path = ".".join(loc) or "(top level)"
    return ConfigError(f"{lines.where(path)}{path}: {_reason(error, loc)}")


# --- reading the YAML ------------------------------------------------------------------------------

_YAML11_OCTAL = re.compile(r"[-+]?0[0-7_]+")
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _Lines:
    """The line of each key path ("mqtt.port") in a composed YAML document, for error messages;
    and the YAML 1.1 traps in it, as ready error lines, in document order."""

    def __init__(self, node: yaml.Node | None, origin: str):
        self.origin = origin
        self.lines: dict[str, int] = {}
        self.traps: list[str] = []
        if node is not None:
            self._walk(node, "")

    def _walk(self, node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.ScalarNode):
            self._check(node, prefix)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._walk(item, prefix)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                line = key.start_mark.line + 1
                if path in self.lines:
                    # YAML would silently keep the last one: a typo'd copy of a section must not win unseen.
                    self.traps.append(f"{self.origin}:{line}: {path}: set twice (first on line {self.lines[path]}); "
                                      "keep one")
                    continue
                self.lines[path] = line
                self._walk(value, path)

    def _check(self, node: yaml.ScalarNode, path: str) -> None:
        if node.style is not None:  # quoted: text, as written
            return
        at = f"{self.origin}:{node.start_mark.line + 1}: "
        # YAML 1.1 reads a plain 010 as octal 8: `source: 010` would open camera 8.
        if node.tag == _INT and _YAML11_OCTAL.fullmatch(node.value):
            self.traps.append(f"{at}{node.value} is an octal number in YAML (= {int(node.value.replace('_', ''), 8)}); "
                              "write it without the leading zero, or quote it")
        # ...and a plain 1:30 as base 60 (90): `source: 1:30` would open camera 90. Only the source,
        # a text setting that also takes a number: elsewhere a number is meant, and
        # `stats_interval_s: 1:00` (60) has always worked.
        elif path == "source" and ":" in node.value and node.tag in (_INT, _FLOAT):
            self.traps.append(f"{at}{path}: {node.value} is a base-60 number in YAML (= {yaml.safe_load(node.value)}); "
                              f"write the number you mean, or quote it ('{node.value}')")

    def where(self, path: str) -> str:
        """'FILE:LINE: ' of a key path, or of its closest section in the file (a rule about a key
        left at its default); 'FILE: ' where neither is in it."""
        while path and path not in self.lines:
            path = path.rpartition(".")[0]
        line = self.lines.get(path)
        return f"{self.origin}:{line}: " if line else (f"{self.origin}: " if self.origin else "")


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 16
# A plain value that starts with { or [ is a YAML mapping or list: `topic_prefix: {hostname}/x`
# does not parse, and the parser's words for it do not say why.
_FLOW_START = re.compile(r"^\s*(-\s+)?[^#'\"]*?:\s+[{\[]")


def _quoting_hint(text: str, mark: Any) -> str:
    if mark is None:
        return ""
    lines = text.splitlines()
    for number in {mark.line, max(mark.line - 1, 0)}:  # the parser may stop on the next line
        if number < len(lines) and _FLOW_START.match(lines[number]):
            return f" (line {number + 1}: quote a text value that starts with {{ or [, as in " \
                   "topic_prefix: \"{hostname}/kitchen\")"
    return ""


def _read(path: Path | str) -> str:
    if not str(path).strip():
        raise ConfigError("config path is empty")
    file = Path(path)
    try:
        if file.exists() and not file.is_file() and not file.is_dir():
            raise ConfigError(f"config path is not a regular file: {path}")  # /dev/zero would never end
        size = file.stat().st_size if file.is_file() else 0
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file too large: {path} ({size:,} bytes, "
                              f"at most {MAX_CONFIG_BYTES:,}; a full config is a few KB)")
        return file.read_text(encoding="utf-8")
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


def _check_events(text: str, origin: str) -> None:
    """Before the document is composed: aliases, which have no use in this config and make any walk
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
    lines = _Lines(node, origin)
    if lines.traps:
        raise ConfigError(lines.traps[0])
    return data, lines


# Settings that name a file. A relative one in a config file is taken from the file's folder, as
# nginx and mosquitto do: the service runs in /var/lib/emotion-agent with its config in
# /etc/emotion-agent, and check-config, run from anywhere, must find what the service finds.
_FILE_SETTINGS = ("source", "detector.model", "classifier.model", "mqtt.password_file", "mqtt.tls.ca_file",
                  "mqtt.tls.cert_file", "mqtt.tls.key_file")


def _in_folder(dotted: str, value: Any, folder: Path) -> Any:
    """A file setting's value from a config file in `folder`: a relative file name made the folder's."""
    if not isinstance(value, str) or not value.strip() or value.startswith("~") or Path(value).is_absolute():
        return value  # not a relative file name; the validation says what is wrong with a non-text
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


def _relative_to_config(data: dict, folder: Path) -> None:
    for dotted in _FILE_SETTINGS:
        *sections, key = dotted.split(".")
        node: Any = data
        for name in sections:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node:
            node[key] = _in_folder(dotted, node[key], folder)


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


def setting_location(path: Path | str, key: str) -> str:
    """'FILE:LINE: ' of a setting in a config file, for an error found after loading it (the source
    checks of check-config); 'FILE: ' where the file does not set it."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        node = None
    return _Lines(node, str(path)).where(key)


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Validated, frozen config from a YAML file (or the defaults) plus dotted-key overrides
    (`--set detector.model=null` too: None means the default)."""
    origin = "" if path is None else str(path)
    text = "" if path is None else _read(path)
    data, lines = _parse(text, origin) if text else (None, _Lines(None, origin))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of settings at the top level, got {type(data).__name__}")
    if path is not None:  # before the overrides: a --source on the command line is the working folder's
        _relative_to_config(data, Path(path).absolute().parent)
    for dotted, value in (overrides or {}).items():
        _set_path(data, dotted, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _one_line(exc, lines) from None


# --- what the settings mean --------------------------------------------------------------------


def hostname() -> str:
    """The host name as a topic-safe token."""
    name = socket.gethostname().split(".")[0] or "localhost"
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def topic_root(cfg: MqttConfig) -> str:
    return cfg.topic_prefix.replace("{hostname}", hostname())


def default_topic_root(host: str) -> str:
    """The topic root on `host` of an agent left with the default topic_prefix."""
    return DEFAULT_TOPIC_PREFIX.replace("{hostname}", host)


def short_hash(text: str) -> str:
    """8 hex digits of `text`'s SHA-256: what tells apart two names that read alike once made safe."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def client_id(cfg: MqttConfig) -> str:
    """The configured id, or emotion-agent-<hostname>; with a topic root other than the default,
    followed by the root made safe and a short hash of the root as it is. Two agents on one host,
    told apart by their topic prefixes, must not share an id (the broker would keep disconnecting
    one of them) nor, since the discovery node id comes from it, a Home Assistant device; and
    `door/cam` and `door-cam` read alike once made safe."""
    if cfg.client_id:
        return cfg.client_id
    base = f"emotion-agent-{hostname()}"
    root = topic_root(cfg)
    if root == default_topic_root(hostname()):
        return base
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", root.replace("/", "-"))[:64]
    return f"{base}-{safe}-{short_hash(root)}"


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
