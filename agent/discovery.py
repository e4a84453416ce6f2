"""Home Assistant MQTT discovery payloads, built by pure functions.

Each entity is one retained message at `<prefix>/<component>/<node_id>/<object_id>/config`
(HA's single-component discovery, understood by every HA release that has MQTT discovery). They are
re-sent on every connect and whenever Home Assistant announces itself on `<prefix>/status`.

The entities, all on one device:
- sensors on the state topic: the dominant emotion (an `enum` sensor), faces in view, and faces
  per emotion;
- diagnostic sensors on the stats topic: frames per second, camera status (an `enum` sensor),
  dropped frames and dropped MQTT messages;
- two `event` entities fed by the event topics: "Emotion" fires on every emotion change with the
  new emotion as its event type, "Face" on every face event with its kind as the event type;
- a `switch`, "Analysis": the privacy switch (off closes the camera), retained on both its topics.

tests/test_discovery.py checks every payload against HA's schema and renders every template
against real payloads; docs/mqtt.md shows what HA makes of them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.config import default_topic_root, short_hash, topic_safe
from agent.mqtt import OFFLINE, ONLINE
from agent.switch import ANALYSIS_OFF, ANALYSIS_ON
from agent.topics import EVENT_KINDS, Topics
from agent.types import CAMERA_STATUSES, NO_FACE, PAUSED, STATES, UNCERTAIN

# What the state's dominant_emotion can be: `payloads.dominant_emotion`, or paused.
DOMINANT_OPTIONS = STATES + (NO_FACE, PAUSED)

# Entity names are shown after the device name ("Emotion agent pi4 Happy faces"), so they name
# only the feature (HA's has_entity_name convention, on for every MQTT entity since HA 2023.8).
_FACES_NAME = {
    "angry": "Angry faces",
    "disgust": "Disgusted faces",
    "fear": "Fearful faces",
    "happy": "Happy faces",
    "sad": "Sad faces",
    "surprise": "Surprised faces",
    "neutral": "Neutral faces",
    UNCERTAIN: "Uncertain faces",
}

# How many republish periods a sensor may miss before HA shows it as unavailable.
EXPIRE_PERIODS = 3


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    prefix: str
    node_id: str            # topic-safe, unique per agent (derived from the client id)
    device_name: str
    topics: Topics
    state_expire_after_s: int   # outlasts three periods of the state's re-sending (with each summary)
    stats_expire_after_s: int
    support_url: str | None = None  # shown by HA in its log next to the origin, if given


def device_name_for(host: str, root: str) -> str:
    """`Emotion agent <host>` for the default topic root `emotion-agent/<host>`; for another root, a
    name of its own (the rule config.client_id follows): two agents on one host are two devices, and
    HA, which makes entity ids from the device name, must not show them under one name nor give the
    one discovered second ids ending in `_2`. A root that goes on from the default
    (`emotion-agent/<host>-kitchen`, as docs/deploy.md suggests for a second camera) is named by what
    follows `emotion-agent/`; any other gets the host and the root."""
    default = default_topic_root(host)
    if root.startswith(default):
        return f"Emotion agent {host}{root[len(default):]}"
    return f"Emotion agent {host} {root}"


def node_id_for(client_id: str) -> str:
    """The client id as a topic-safe node id (HA's device identifier, and a level of each discovery
    topic): as it is when it is already safe (the default client id always is); else made safe and
    followed by a short hash of it, so that `a b` and `a_b` stay two devices."""
    safe = topic_safe(client_id)
    return safe if safe == client_id else f"{safe}_{short_hash(client_id)}"


def birth_topic(prefix: str) -> str:
    return f"{prefix}/status"


def expire_after_for(period_s: float) -> int:
    """`expire_after` for a topic re-sent every `period_s` seconds: a whole number of seconds
    (HA requires a positive int) that outlasts EXPIRE_PERIODS periods."""
    return max(1, math.ceil(EXPIRE_PERIODS * period_s))


def _device(s: DiscoverySettings) -> dict[str, Any]:
    return {
        "identifiers": [s.node_id],
        "name": s.device_name,
        "manufacturer": "emotion-agent",
        "model": "emotion-agent (BlazeFace + FER2013 expression model, TFLite)",
        "sw_version": __version__,
    }


def _origin(s: DiscoverySettings) -> dict[str, Any]:
    origin: dict[str, Any] = {"name": "emotion-agent", "sw_version": __version__}
    if s.support_url:
        origin["support_url"] = s.support_url
    return origin


def _entity(s: DiscoverySettings, component: str, object_id: str, name: str,
            **config: Any) -> tuple[str, dict[str, Any]]:
    # No `object_id`: HA 2025.10 deprecated it (removed in 2026.4) for `default_entity_id`, and
    # without either HA derives the entity id from the device and entity names, which is stable
    # (kept in its registry by unique_id) and follows the user's entity-id settings.
    payload: dict[str, Any] = {
        "name": name,
        "unique_id": f"{s.node_id}_{object_id}",
        "availability_topic": s.topics.availability,
        "payload_available": ONLINE,
        "payload_not_available": OFFLINE,
        "device": _device(s),
        "origin": _origin(s),
        **config,
    }
    return f"{s.prefix}/{component}/{s.node_id}/{object_id}/config", payload


def _sensor(s: DiscoverySettings, object_id: str, name: str, state_topic: str, template: str,
            expire_after: int, **extra: Any) -> tuple[str, dict[str, Any]]:
    return _entity(s, "sensor", object_id, name, state_topic=state_topic, value_template=template,
                   expire_after=expire_after, **extra)


def _event(s: DiscoverySettings, object_id: str, name: str, state_topic: str, event_types: list[str],
           template: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    # HA's MQTT event entity wants a JSON object with `event_type` (one of `event_types`); the
    # value template builds it from our payload, so the payload itself needs no such field.
    # QoS 1: an event lost between broker and HA is not sent again.
    return _entity(s, "event", object_id, name, state_topic=state_topic, event_types=event_types,
                   value_template=template, qos=1, **extra)


def _json_template(fields: dict[str, str]) -> str:
    """A template rendering a JSON object whose values are `value_json` paths."""
    body = ", ".join(f"'{key}': value_json.{path}" for key, path in fields.items())
    return "{{ {" + body + "} | tojson }}"


def discovery_messages(s: DiscoverySettings) -> list[tuple[str, dict[str, Any]]]:
    """(topic, payload) for every entity the agent offers."""
    state, stats = s.topics.state, s.topics.stats
    messages = [
        _sensor(s, "dominant_emotion", "Dominant emotion", state, "{{ value_json.dominant_emotion }}",
                s.state_expire_after_s, device_class="enum", options=list(DOMINANT_OPTIONS),
                icon="mdi:emoticon-outline"),
        _sensor(s, "faces_in_view", "Faces in view", state, "{{ value_json.faces_in_view }}",
                s.state_expire_after_s, icon="mdi:account-group", state_class="measurement"),
    ]
    for label in STATES:
        messages.append(_sensor(
            s, f"faces_{label}", _FACES_NAME[label], state, f"{{{{ value_json.counts.{label} }}}}",
            s.state_expire_after_s, icon="mdi:emoticon", state_class="measurement"))
    messages += [
        _sensor(s, "fps", "Frames per second", stats, "{{ value_json.fps }}", s.stats_expire_after_s,
                unit_of_measurement="fps", state_class="measurement", suggested_display_precision=1,
                entity_category="diagnostic", icon="mdi:speedometer"),
        _sensor(s, "camera", "Camera", stats, "{{ value_json.camera }}", s.stats_expire_after_s,
                device_class="enum", options=list(CAMERA_STATUSES), entity_category="diagnostic", icon="mdi:cctv"),
        _sensor(s, "dropped_frames", "Dropped frames", stats, "{{ value_json.dropped_frames }}",
                s.stats_expire_after_s, state_class="total_increasing", entity_category="diagnostic",
                icon="mdi:filmstrip-off"),
        _sensor(s, "dropped_messages", "Dropped messages", stats, "{{ value_json.mqtt.dropped }}",
                s.stats_expire_after_s, state_class="total_increasing", entity_category="diagnostic",
                icon="mdi:message-alert"),
        _event(s, "emotion", "Emotion", s.topics.event("emotion_changed"), list(STATES),
               _json_template({"event_type": "emotion", "face_id": "face_id", "previous": "previous",
                               "confidence": "confidence"}),
               icon="mdi:emoticon-excited-outline"),
        _event(s, "face", "Face", s.topics.events_filter, list(EVENT_KINDS),
               _json_template({"event_type": "event", "face_id": "face_id"}), icon="mdi:face-recognition"),
        # retain: HA publishes its command retained, so a switch flipped while the agent is away
        # is applied when it comes back
        _entity(s, "switch", "analysis", "Analysis", command_topic=s.topics.analysis_command,
                state_topic=s.topics.analysis, payload_on=ANALYSIS_ON, payload_off=ANALYSIS_OFF,
                retain=True, qos=1, icon="mdi:cctv"),
    ]
    return messages


def encoded(messages: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str]]:
    return [(topic, json.dumps(payload, separators=(",", ":"))) for topic, payload in messages]
