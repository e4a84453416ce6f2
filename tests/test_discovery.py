"""Home Assistant discovery payloads, checked against HA's own schema and against real payloads.

The schema below is HA's, transcribed (voluptuous is not a dependency) from:
- home-assistant/core homeassistant/components/mqtt/schemas.py: MQTT_AVAILABILITY_SINGLE_SCHEMA and
  MQTT_AVAILABILITY_LIST_SCHEMA (`availability_topic` and `availability` are vol.Exclusive),
  MQTT_ENTITY_DEVICE_INFO_SCHEMA (+ validate_device_has_at_least_one_identifier),
  MQTT_ORIGIN_INFO_SCHEMA (name required; sw_version, support_url), MQTT_ENTITY_COMMON_SCHEMA;
- .../mqtt/config.py: MQTT_RO_SCHEMA (state_topic required, value_template, qos, encoding);
- .../mqtt/sensor.py: _PLATFORM_SCHEMA_BASE (expire_after cv.positive_int, options, state_class,
  suggested_display_precision, ...) and validate_sensor_state_and_device_class_config;
- .../mqtt/event.py: _PLATFORM_SCHEMA_BASE (event_types required; device_class EventDeviceClass) and
  MqttEvent's message handler (the rendered value must be a JSON object with an `event_type` that
  is one of `event_types`);
- .../mqtt/discovery.py: TOPIC_MATCHER, the discovery topic pattern;
- home-assistant.io source/_integrations/mqtt.markdown ("Discovery topic": node_id and object_id
  are `[a-zA-Z0-9_-]`; "Naming of MQTT Entities"), sensor.mqtt.markdown ("When set, the entity
  category must be `diagnostic` for sensors") and event.mqtt.markdown.
HA itself ignores unknown keys in a discovery payload; here an unknown key is an error, because in
our payloads it can only be a typo or a key HA does not know.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
from paho.mqtt.client import topic_matches_sub

from agent import __version__, discovery, payloads
from agent.config import Config, client_id
from agent.events import EmotionChanged, FaceAppeared, FaceLost, TrackedFace
from agent.mqtt import OFFLINE, ONLINE, MemoryPublisher
from agent.topics import EVENT_KINDS, Topics
from agent.switch import ANALYSIS_OFF, ANALYSIS_ON, parse_command
from agent.types import CAMERA_STATUSES, EMOTION_LABELS, PAUSED, UNCERTAIN, Box, EmotionScores

WALL = 1_700_000_000.25
ROOT = Path(__file__).resolve().parents[1]

# --- HA's schema, as data -----------------------------------------------------------------------

Check = Callable[[Any], str | None]  # None when the value is valid, else what is wrong


def STRING(v: Any) -> str | None:
    return None if isinstance(v, str) else f"expected a string, got {v!r}"


def BOOLEAN(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"expected a boolean, got {v!r}"


TEMPLATE = STRING


def optional(check: Check) -> Check:
    """HA's `vol.Any(x, None)`."""
    return lambda v: None if v is None else check(v)


def one_of(*values: str) -> Check:
    return lambda v: None if v in values else f"expected one of {values}, got {v!r}"


def positive_int(v: Any) -> str | None:
    # cv.positive_int: an int >= 0 (0 disables expire_after).
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else f"expected an int >= 0, got {v!r}"


def string_list(v: Any) -> str | None:
    ok = isinstance(v, list) and v and all(isinstance(x, str) for x in v)
    return None if ok else f"expected a non-empty list of strings, got {v!r}"


def subscribe_topic(v: Any) -> str | None:
    # util.valid_subscribe_topic: a valid topic where '+' and '#' fill whole levels, '#' last.
    if not isinstance(v, str) or not v or "\0" in v or len(v.encode()) > 65535:
        return f"not a valid topic: {v!r}"
    levels = v.split("/")
    for i, level in enumerate(levels):
        if ("+" in level or "#" in level) and len(level) != 1:
            return f"wildcard must fill a whole level: {v!r}"
        if level == "#" and i != len(levels) - 1:
            return f"'#' must be the last level: {v!r}"
    return None


def icon(v: Any) -> str | None:
    # cv.icon: "prefix:name".
    return None if isinstance(v, str) and re.fullmatch(r"[\w-]+:[\w-]+", v) else f"not an icon: {v!r}"


def url(v: Any) -> str | None:
    # cv.configuration_url: http(s) or homeassistant:// URL.
    return None if isinstance(v, str) and re.match(r"(https?|homeassistant)://\S+$", v) else f"not a URL: {v!r}"


def qos(v: Any) -> str | None:
    return None if v in (0, 1, 2) and not isinstance(v, bool) else f"expected QoS 0, 1 or 2, got {v!r}"


def mapping(schema: dict[str, Check], required: tuple[str, ...] = ()) -> Callable[[Any], list[str]]:
    def check(value: Any) -> list[str]:
        if not isinstance(value, dict):
            return [f"expected a mapping, got {value!r}"]
        errors = [f"missing required key {key!r}" for key in required if key not in value]
        for key, item in value.items():
            if key not in schema:
                errors.append(f"unknown key {key!r}")
                continue
            result = schema[key](item)
            if isinstance(result, str):
                errors.append(f"{key}: {result}")
            elif isinstance(result, list):
                errors += [f"{key}.{e}" for e in result]
        return errors
    return check


DEVICE = {
    "identifiers": string_list, "connections": lambda v: None if isinstance(v, list) and all(
        isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c) for c in v) else "bad connections",
    "manufacturer": STRING, "model": STRING, "model_id": STRING, "name": STRING, "hw_version": STRING,
    "serial_number": STRING, "sw_version": STRING, "via_device": STRING, "suggested_area": STRING,
    "configuration_url": url,
}
ORIGIN = {"name": STRING, "sw_version": STRING, "support_url": url}
AVAILABILITY_ITEM = {"topic": subscribe_topic, "payload_available": STRING, "payload_not_available": STRING,
                     "value_template": TEMPLATE}

def publish_topic(v: Any) -> str | None:
    # util.valid_publish_topic: a valid topic without wildcards.
    if isinstance(v, str) and ("+" in v or "#" in v):
        return f"a wildcard in a topic to publish to: {v!r}"
    return subscribe_topic(v)


COMMON = {
    # availability (schemas.py)
    "availability_topic": subscribe_topic, "availability_template": TEMPLATE,
    "payload_available": STRING, "payload_not_available": STRING,
    "availability_mode": one_of("all", "any", "latest"),
    "availability": lambda v: [e for item in v for e in mapping(AVAILABILITY_ITEM, ("topic",))(item)]
    if isinstance(v, list) else ["expected a list"],
    # MQTT_ENTITY_COMMON_SCHEMA
    "device": mapping(DEVICE), "origin": mapping(ORIGIN, ("name",)), "enabled_by_default": BOOLEAN,
    "entity_category": one_of("config", "diagnostic"), "icon": icon, "entity_picture": url,
    "json_attributes_topic": subscribe_topic, "json_attributes_template": TEMPLATE,
    "object_id": STRING,  # deprecated in HA 2025.10, removed in 2026.4: see test below
    "default_entity_id": STRING,
    "unique_id": STRING,
    # MQTT_RO_SCHEMA (config.py)
    "state_topic": subscribe_topic, "value_template": TEMPLATE, "qos": qos, "encoding": STRING,
}
# SensorStateClass; `measurement_angle` arrived in HA 2025.7.
STATE_CLASSES = ("measurement", "measurement_angle", "total", "total_increasing")
# A subset of SensorDeviceClass (the full list is long): add one here before using it.
SENSOR_DEVICE_CLASSES = ("enum", "timestamp", "duration", "frequency", "data_size", "data_rate")
SENSOR = {
    **COMMON,
    "device_class": optional(one_of(*SENSOR_DEVICE_CLASSES)), "expire_after": positive_int,
    "force_update": BOOLEAN, "last_reset_value_template": TEMPLATE, "name": optional(STRING),
    "options": string_list, "suggested_display_precision": positive_int,
    "state_class": optional(one_of(*STATE_CLASSES)), "unit_of_measurement": optional(STRING),
}
EVENT = {
    **COMMON,
    "device_class": optional(one_of("button", "doorbell", "motion")),  # EventDeviceClass
    "name": optional(STRING), "event_types": string_list,
}
# .../mqtt/switch.py: MQTT_RW_SCHEMA (config.py: command_topic required, retain) and its own keys.
SWITCH = {
    **COMMON,
    "command_topic": publish_topic, "command_template": TEMPLATE, "retain": BOOLEAN, "optimistic": BOOLEAN,
    "payload_on": STRING, "payload_off": STRING, "state_on": STRING, "state_off": STRING,
    "device_class": optional(one_of("outlet", "switch")), "name": optional(STRING),
}
COMPONENTS = {"sensor": (SENSOR, ("state_topic",)), "event": (EVENT, ("state_topic", "event_types")),
              "switch": (SWITCH, ("command_topic",))}

# discovery.py TOPIC_MATCHER, anchored at our prefix.
TOPIC_PATTERN = r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config"


def schema_errors(component: str, payload: dict[str, Any]) -> list[str]:
    """What HA's discovery schema would reject in `payload` (plus unknown keys)."""
    if component not in COMPONENTS:
        return [f"component {component!r} is not one this validator knows"]
    schema, required = COMPONENTS[component]
    errors = mapping(schema, required)(payload)
    if "availability_topic" in payload and "availability" in payload:
        errors.append("availability_topic and availability are mutually exclusive")
    device = payload.get("device")
    if isinstance(device, dict):
        if not device.get("identifiers") and not device.get("connections"):
            errors.append("device needs at least one of identifiers and connections")
        if "name" not in device:
            # Since HA 2023.8 a device shared by several entities must be named in each of them.
            errors.append("device has no name")
        if "unique_id" not in payload:
            errors.append("a device only works with a unique_id")
    if component == "sensor":
        if "options" in payload:
            if payload.get("device_class") != "enum":
                errors.append("options need device_class enum")
            if payload.get("state_class") or payload.get("unit_of_measurement"):
                errors.append("options cannot go with state_class or unit_of_measurement")
        if "last_reset_value_template" in payload and payload.get("state_class") != "total":
            errors.append("last_reset_value_template needs state_class total")
        if payload.get("entity_category", "diagnostic") != "diagnostic":
            errors.append("a sensor's entity_category must be diagnostic")
    default_id = payload.get("default_entity_id")
    if isinstance(default_id, str) and not re.fullmatch(rf"{component}\.[a-z0-9_]+", default_id):
        errors.append(f"default_entity_id must be '{component}.<object id>', got {default_id!r}")
    return errors


# --- the agent's side ---------------------------------------------------------------------------

def scores(top: str, p: float = 0.7) -> EmotionScores:
    rest = (1 - p) / (len(EMOTION_LABELS) - 1)
    return EmotionScores(tuple(p if label == top else rest for label in EMOTION_LABELS))


def tracked(face_id: int, emotion: str, confidence: float = 0.7) -> TrackedFace:
    s = scores(emotion if emotion != UNCERTAIN else "neutral", confidence)
    return TrackedFace(face_id=face_id, box=Box(10.0 * face_id, 20.0, 64.0, 64.0), raw=s, smoothed=s,
                       emotion=emotion, confidence=confidence, first_seen=1.0, last_seen=2.5)


FACE_SETS = [
    [],
    [tracked(1, UNCERTAIN, 0.3)],
    [tracked(1, "happy"), tracked(2, "happy"), tracked(3, "sad", 0.9)],
    [tracked(4, "angry"), tracked(5, UNCERTAIN, 0.35)],
] + [[tracked(9, label)] for label in EMOTION_LABELS]


def event_samples() -> list[dict[str, Any]]:
    face = tracked(7, "surprise", 0.81)
    events = [
        FaceAppeared(tracked(7, UNCERTAIN, 0.3), at=1.0),
        EmotionChanged(face, previous=None, previous_duration_s=0.4, at=1.4),
        EmotionChanged(tracked(7, "happy"), previous="surprise", previous_duration_s=2.25, at=3.65),
        FaceLost(face_id=7, at=5.0, seconds_in_view=4.0, last_emotion="happy",
                 emotion_share=dict.fromkeys(payloads.STATES, 0.0) | {UNCERTAIN: 0.1, "surprise": 0.5, "happy": 0.4}),
    ]
    return [payloads.event_payload(e, WALL) for e in events]


@pytest.fixture
def agent(tmp_path):
    """A real Agent (stages it does not need to build these messages left out) publishing to memory."""
    from agent.capture import ImageSource
    from agent.config import topic_root
    from agent.pipeline import Agent

    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), np.zeros((48, 64, 3), np.uint8))
    cfg = Config()
    return Agent(cfg=cfg, source=ImageSource(str(image)), detector=None, classifier=None, tracker=None,
                 publisher=MemoryPublisher(), topics=Topics(topic_root(cfg.mqtt)), clock=lambda: WALL)


@pytest.fixture
def published(agent) -> list[tuple[str, dict[str, Any], bool]]:
    """What the agent publishes as discovery: (topic, payload, retained)."""
    agent.publish_discovery()
    return [(m.topic, json.loads(m.payload), m.retain) for m in agent.publisher.messages]


@pytest.fixture
def samples(agent) -> dict[str, list[Any]]:
    """Real payloads per topic, as the agent builds them (JSON ones parsed; the switch's state is
    plain text)."""
    topics = agent.topics
    by_topic: dict[str, list[Any]] = {
        topics.state: [payloads.state_payload(faces, WALL) for faces in FACE_SETS] + [payloads.paused_state_payload(WALL)],
        topics.stats: [agent.stats_payload()],
        topics.analysis: [ANALYSIS_ON, ANALYSIS_OFF],
    }
    for payload in event_samples():
        by_topic.setdefault(topics.event(payload["event"]), []).append(payload)
    return by_topic


def settings(topics: Topics, node_id: str = "emotion-agent-pi4") -> discovery.DiscoverySettings:
    return discovery.DiscoverySettings(
        prefix="homeassistant", node_id=node_id, device_name="Emotion agent pi4", topics=topics,
        state_expire_after_s=discovery.expire_after_for(60), stats_expire_after_s=discovery.expire_after_for(30),
        support_url="https://example.org/emotion-agent")


# --- the checks ---------------------------------------------------------------------------------

def test_every_discovery_payload_passes_home_assistants_schema(published):
    assert published
    errors = {}
    for topic, payload, _ in published:
        component = topic.split("/")[1]
        if found := schema_errors(component, payload):
            errors[topic] = found
    assert errors == {}


def test_a_support_url_goes_into_the_origin_and_still_passes_the_schema():
    for topic, payload in discovery.discovery_messages(settings(Topics("emotion-agent/pi4"))):
        assert payload["origin"]["support_url"] == "https://example.org/emotion-agent"
        assert schema_errors(topic.split("/")[1], payload) == []


def test_discovery_messages_are_retained_at_topics_home_assistant_matches(published, agent):
    prefix = agent.cfg.mqtt.discovery.prefix
    for topic, payload, retained in published:
        assert retained, topic
        assert topic.startswith(prefix + "/")
        match = re.fullmatch(TOPIC_PATTERN, topic[len(prefix) + 1:])
        assert match, topic
        assert match["component"] in COMPONENTS
        assert match["node_id"] == discovery.node_id_for(client_id(agent.cfg.mqtt))
        assert payload["unique_id"] == f"{match['node_id']}_{match['object_id']}"


def test_unique_ids_differ_within_an_agent_and_between_agents():
    topics = Topics("emotion-agent/pi4")
    one = [p["unique_id"] for _, p in discovery.discovery_messages(settings(topics, "emotion-agent-kitchen"))]
    two = [p["unique_id"] for _, p in discovery.discovery_messages(settings(topics, "emotion-agent-hall"))]
    assert len(set(one)) == len(one)
    assert not set(one) & set(two)


def test_every_entity_goes_unavailable_with_the_agents_last_will(published, agent):
    for topic, payload, _ in published:
        assert payload["availability_topic"] == agent.topics.availability, topic
        # The publisher sends ONLINE on connect and the broker sends OFFLINE as the Last Will.
        assert (payload["payload_available"], payload["payload_not_available"]) == (ONLINE, OFFLINE)


def test_every_entity_listens_to_a_topic_the_agent_publishes(published, samples):
    for topic, payload, _ in published:
        assert any(topic_matches_sub(payload["state_topic"], t) for t in samples), topic


def slug(text: str) -> str:
    """HA's slugify, for ASCII text."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def ha_entity_ids(s: discovery.DiscoverySettings) -> set[str]:
    """The entity ids HA derives from the device and entity names (no object_id or default_entity_id
    is sent): `<platform>.<slug of device name + entity name>`, a `_2` added when taken."""
    return {f"{topic.split('/')[1]}.{slug(p['device']['name'] + ' ' + p['name'])}"
            for topic, p in discovery.discovery_messages(s)}


def test_two_agents_on_one_host_are_two_devices_with_names_and_entity_ids_of_their_own():
    # config.client_id gives an agent with another topic root its own client id, so its own node id
    # and device; named alike, HA shows two "Emotion agent pi4" and gives the one discovered second
    # entity ids ending in _2: which camera an automation follows depends on who came first.
    from agent.config import hostname, load_config
    from agent.pipeline import discovery_settings

    host = hostname()
    default = discovery_settings(load_config(None))
    door = discovery_settings(load_config(None, {"mqtt.topic_prefix": "door/cam"}))
    named = discovery_settings(load_config(None, {"mqtt.topic_prefix": "door/cam", "mqtt.client_id": "mine"}))
    kitchen = discovery_settings(load_config(None, {"mqtt.topic_prefix": "emotion-agent/{hostname}-kitchen"}))
    assert default.device_name == f"Emotion agent {host}"  # as before: the docs' entity ids hold
    assert door.device_name == named.device_name == f"Emotion agent {host} door/cam"
    assert kitchen.device_name == f"Emotion agent {host}-kitchen"  # docs/deploy.md's second camera
    assert not ha_entity_ids(default) & ha_entity_ids(door)
    assert not ha_entity_ids(default) & ha_entity_ids(kitchen)
    assert f"sensor.emotion_agent_{slug(host)}_door_cam_dominant_emotion" in ha_entity_ids(door)
    assert f"sensor.emotion_agent_{slug(host)}_kitchen_dominant_emotion" in ha_entity_ids(kitchen)


@pytest.mark.parametrize("first, second", [("door/cam", "door-cam"), ("a b", "a_b")])
def test_topic_prefixes_that_read_alike_once_made_safe_are_two_devices(first, second):
    # Both agents were one Home Assistant device (one identifier, one set of unique_ids): each
    # agent's discovery overwrote the other's.
    from agent.config import load_config
    from agent.pipeline import discovery_settings

    one, two = (discovery_settings(load_config(None, {"mqtt.topic_prefix": p})) for p in (first, second))
    assert one.node_id != two.node_id
    assert not {p["unique_id"] for _, p in discovery.discovery_messages(one)} & \
        {p["unique_id"] for _, p in discovery.discovery_messages(two)}


@pytest.mark.parametrize("client_id", ["emotion-agent-pi4", "kitchen_cam-2"])
def test_a_client_id_that_is_already_topic_safe_is_the_node_id_as_it_is(client_id):
    assert discovery.node_id_for(client_id) == client_id  # the devices HA knows keep their identifiers


def test_configured_client_ids_that_read_alike_once_made_safe_are_two_devices():
    ids = {discovery.node_id_for(c) for c in ("a b", "a_b", "a/b", "a+b")}
    assert len(ids) == 4 and all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)


def test_no_entity_name_repeats_the_device_name(published):
    # HA prefixes every MQTT entity's name with its device's (has_entity_name, HA 2023.8); a name
    # equal to or starting with the device name is flagged by HA and shown twice.
    for topic, payload, _ in published:
        device = payload["device"]["name"].lower()
        assert payload["name"] and not payload["name"].lower().startswith(device), topic


def test_no_payload_uses_the_deprecated_object_id(published):
    # HA 2025.10 deprecated object_id (a repair issue per entity) and removes it in 2026.4.
    assert [t for t, p, _ in published if "object_id" in p] == []


# --- templates against real payloads ------------------------------------------------------------

VALUE_JSON_PATH = re.compile(r"value_json((?:\.[A-Za-z_]\w*)+)")
# Jinja resolves `value_json.items` to the dict's method before the key: such a key is unreachable.
DICT_ATTRIBUTES = set(dir(dict))


def resolve(payload: Any, path: str) -> Any:
    """`value_json.a.b` in a template -> payload["a"]["b"]; KeyError if the payload has no such field."""
    node = payload
    for part in path.strip(".").split("."):
        if part in DICT_ATTRIBUTES:
            raise KeyError(f"{part!r} is a dict attribute: Jinja finds it before the key")
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def payloads_for(state_topic: str, samples: dict[str, list[dict]]) -> list[dict]:
    return [p for topic, ps in samples.items() if topic_matches_sub(state_topic, topic) for p in ps]


def templated(published) -> list[tuple[str, dict[str, Any], bool]]:
    """The entities that read a JSON payload through a value template (all but the switch, whose
    state is the plain ON or OFF: test_the_switch_...)."""
    return [(topic, payload, retained) for topic, payload, retained in published if topic.split("/")[1] != "switch"]


def test_templates_refer_only_to_fields_the_payloads_contain(published, samples):
    missing = []
    for topic, payload, _ in templated(published):
        paths = VALUE_JSON_PATH.findall(payload["value_template"])
        assert paths, f"{topic}: no value_json path in {payload['value_template']!r}"
        for sample in payloads_for(payload["state_topic"], samples):
            for path in paths:
                try:
                    value = resolve(sample, path)
                except KeyError as exc:
                    missing.append((topic, path, sample.get("event", sample.get("dominant_emotion")), str(exc)))
                    continue
                if "event_types" not in payload:  # a sensor's state is one scalar
                    assert not isinstance(value, (dict, list)), f"{topic}: {path} is not a scalar"
    assert missing == []


def test_numeric_sensors_read_numbers(published, samples):
    for topic, payload, _ in published:
        if "state_class" in payload or "unit_of_measurement" in payload:
            (path,) = VALUE_JSON_PATH.findall(payload["value_template"])
            for sample in payloads_for(payload["state_topic"], samples):
                value = resolve(sample, path)
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (topic, value)


def test_dominant_emotion_options_cover_every_value_the_state_can_report(published, samples, agent):
    (payload,) = [p for _, p, _ in published if p["unique_id"].endswith("_dominant_emotion")]
    reported = {s["dominant_emotion"] for s in samples[agent.topics.state]}
    # The face sets reach every value: each label, "uncertain" and "none"; and "paused".
    assert reported == set(EMOTION_LABELS) | {UNCERTAIN, payloads.NO_FACE, PAUSED}
    assert set(payload["options"]) == reported


def test_the_camera_sensor_is_an_enum_of_every_camera_status(published):
    (payload,) = [p for _, p, _ in published if p["unique_id"].endswith("_camera")]
    # docs/mqtt.md's list; test_capture checks that sources report exactly CAMERA_STATUSES
    assert payload["device_class"] == "enum" and payload["options"] == [
        "starting", "ok", "reconnecting", "ended", "paused"]
    assert payload["options"] == list(CAMERA_STATUSES)


def test_the_switch_commands_the_agent_and_shows_the_state_it_publishes(published, samples, agent):
    (payload,) = [p for t, p, _ in published if t.split("/")[1] == "switch"]
    assert payload["name"] == "Analysis" and payload["icon"].startswith("mdi:")
    # HA publishes payload_on/off to the command topic: the agent's own subscription reads them.
    assert payload["command_topic"] == agent.topics.analysis_command
    assert parse_command(payload["payload_on"].encode()) is True
    assert parse_command(payload["payload_off"].encode()) is False
    # The state HA shows is the one the agent publishes (no state_on/off: the payloads are the same).
    assert payload["state_topic"] == agent.topics.analysis
    assert set(samples[agent.topics.analysis]) == {payload["payload_on"], payload["payload_off"]}
    # Retained by HA, so a switch flipped while the agent was away is applied when it comes back.
    assert payload["retain"] is True and payload["qos"] == 1 and not payload.get("optimistic")


def test_every_state_count_has_a_sensor(published, samples, agent):
    counted = set(samples[agent.topics.state][0]["counts"])
    sensed = {VALUE_JSON_PATH.findall(p["value_template"])[0].split(".")[-1]
              for _, p, _ in templated(published) if ".counts." in p["value_template"]}
    assert sensed == counted


def test_event_types_cover_what_the_event_payloads_report(published, samples, agent):
    events = {p["unique_id"].rsplit("_", 1)[-1]: p for _, p, _ in published if "event_types" in p}
    assert set(events) == {"emotion", "face"}
    changed = samples[agent.topics.event("emotion_changed")]
    assert {s["emotion"] for s in changed} <= set(events["emotion"]["event_types"])
    assert set(events["emotion"]["event_types"]) == set(payloads.STATES)
    assert set(events["face"]["event_types"]) == set(EVENT_KINDS)


def test_templates_render_as_home_assistant_renders_them(published, samples):
    """HA renders value templates with Jinja2 (sandboxed), `value_json` being the parsed payload.
    Rendered here the same way, with undefined names as errors."""
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined)
    for topic, payload, _ in templated(published):
        template = env.from_string(payload["value_template"])
        for sample in payloads_for(payload["state_topic"], samples):
            rendered = template.render(value_json=sample, value=payloads.encode(sample))
            if "event_types" in payload:
                # MqttEvent: json_loads_object(rendered), then pops event_type, the rest are attributes.
                event = json.loads(rendered)
                assert isinstance(event, dict), (topic, rendered)
                assert event.pop("event_type") in payload["event_types"], (topic, rendered)
                assert event and all(not isinstance(v, (dict, list)) for v in event.values()), (topic, rendered)
            elif "options" in payload:
                assert rendered in payload["options"], (topic, rendered)
            elif "state_class" in payload:
                float(rendered)
            else:
                assert rendered and rendered != "None", (topic, rendered)


# --- expiry --------------------------------------------------------------------------------------

def test_expire_after_outlasts_the_republish_period_of_its_topic(published, agent):
    """The state is re-sent with every summary, the stats every stats interval: a sensor must not
    expire between two of them."""
    m = agent.cfg.mqtt
    period = {agent.topics.state: m.summary_interval_s, agent.topics.stats: m.stats_interval_s}
    sensors = [(t, p) for t, p, _ in published if t.split("/")[1] == "sensor"]
    assert sensors
    for topic, payload in sensors:
        assert payload["expire_after"] > period[payload["state_topic"]], topic


@pytest.mark.parametrize("max_fps, state_s, stats_s", [(None, 180, 90), (1, 180, 90), (0.02, 180, 150),
                                                       (0.005, 600, 600)])
def test_expire_after_outlasts_the_frame_interval_camera_max_fps_asks_for(max_fps, state_s, stats_s):
    # State and stats go out after a frame: with a frame every 200 s the sensors went unavailable
    # between two frames of a healthy camera.
    from agent.config import load_config
    from agent.pipeline import discovery_settings

    settings = discovery_settings(load_config(None, {"camera.max_fps": max_fps}))
    assert (settings.state_expire_after_s, settings.stats_expire_after_s) == (state_s, stats_s)


@pytest.mark.parametrize("period_s,expected", [(60, 180), (30, 90), (1, 3), (0.1, 1), (2.5, 8)])
def test_expire_after_for_a_period_is_three_periods_in_whole_seconds(period_s, expected):
    assert discovery.expire_after_for(period_s) == expected
    assert discovery.expire_after_for(period_s) > period_s


def test_events_carry_no_expiry():
    # HA's event schema has no expire_after: an event entity is stateless.
    for topic, payload in discovery.discovery_messages(settings(Topics("r"))):
        if topic.split("/")[1] == "event":
            assert "expire_after" not in payload


# --- the validator itself -----------------------------------------------------------------------

def _good_sensor() -> dict[str, Any]:
    return {"name": "Faces in view", "unique_id": "n_faces", "state_topic": "r/state",
            "value_template": "{{ value_json.faces_in_view }}", "availability_topic": "r/availability",
            "device": {"identifiers": ["n"], "name": "Agent"}, "origin": {"name": "emotion-agent"}}


@pytest.mark.parametrize("change,message", [
    ({"stat_topic": "r/state"}, "unknown key 'stat_topic'"),
    ({"availability": [{"topic": "r/availability"}]}, "mutually exclusive"),
    ({"expire_after": -1}, "expire_after: expected an int >= 0"),
    ({"expire_after": "60"}, "expire_after: expected an int >= 0"),
    ({"state_class": "gauge"}, "state_class: expected one of"),
    ({"entity_category": "config"}, "entity_category must be diagnostic"),
    ({"entity_category": "system"}, "entity_category: expected one of"),
    ({"options": ["a", "b"]}, "options need device_class enum"),
    ({"options": ["a"], "device_class": "enum", "state_class": "measurement"}, "cannot go with state_class"),
    ({"state_topic": "r/+x"}, "state_topic: wildcard must fill a whole level"),
    ({"state_topic": "r/#/x"}, "'#' must be the last level"),
    ({"icon": "emoticon"}, "icon: not an icon"),
    ({"qos": 3}, "qos: expected QoS"),
    ({"device": {"name": "Agent"}}, "at least one of identifiers and connections"),
    ({"device": {"identifiers": ["n"]}}, "device has no name"),
    ({"device": {"identifiers": ["n"], "name": "A", "sw": "1"}}, "device.unknown key 'sw'"),
    ({"origin": {"sw_version": "1"}}, "origin.missing required key 'name'"),
    ({"origin": {"name": "x", "support_url": "example.org"}}, "origin.support_url: not a URL"),
    ({"default_entity_id": "faces_in_view"}, "default_entity_id must be 'sensor.<object id>'"),
    ({"unique_id": None}, "unique_id: expected a string"),
])
def test_the_validator_rejects_what_home_assistant_rejects(change, message):
    payload = _good_sensor() | change
    assert schema_errors("sensor", _good_sensor()) == []
    assert any(message in e for e in schema_errors("sensor", payload)), schema_errors("sensor", payload)


def test_the_validator_requires_a_state_topic_and_event_types():
    event = {k: v for k, v in _good_sensor().items() if k != "state_topic"}
    assert "missing required key 'state_topic'" in schema_errors("event", event)
    assert "missing required key 'event_types'" in schema_errors("event", event)


@pytest.mark.parametrize("client_id,node_id", [
    ("emotion-agent-pi4", "emotion-agent-pi4"),
    ("emotion agent/pi4.local", "emotion_agent_pi4_local_"),  # and a hash of the client id
    ("kamera-küche#1", "kamera-k_che_1_"),
])
def test_node_ids_keep_only_the_characters_a_discovery_topic_allows(client_id, node_id):
    made = discovery.node_id_for(client_id)
    assert made == node_id or re.fullmatch(re.escape(node_id) + "[0-9a-f]{8}", made)
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", made)


def test_home_assistants_birth_topic_is_status_under_the_prefix():
    assert discovery.birth_topic("homeassistant") == "homeassistant/status"


# --- docs/mqtt.md -------------------------------------------------------------------------------

DOC = ROOT / "docs" / "mqtt.md"


def doc_blocks(marker: str) -> dict[str, Any]:
    """The JSON blocks of docs/mqtt.md announced by `<!-- marker: name -->`."""
    blocks = re.findall(rf"<!-- {marker}: (\S+) -->\s*```json\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return {name: json.loads(body) for name, body in blocks}


def test_the_discovery_messages_in_the_docs_are_the_ones_the_agent_sends():
    shown = doc_blocks("discovery")
    assert shown
    s = discovery.DiscoverySettings(prefix="homeassistant", node_id="emotion-agent-pi4", device_name="Emotion agent pi4",
                                    topics=Topics("emotion-agent/pi4"), state_expire_after_s=180, stats_expire_after_s=90)
    sent = dict(discovery.discovery_messages(s))
    for topic, payload in shown.items():
        payload["device"]["sw_version"] = payload["origin"]["sw_version"] = __version__
        assert payload == sent[topic], topic


def test_the_stats_example_in_the_docs_has_the_fields_the_agent_sends(agent):
    def keys(value):
        return [(k, keys(v)) for k, v in value.items()] if isinstance(value, dict) else None

    for stage in ("decode", "detect", "classify", "track", "publish"):
        agent.times.add(stage, 0.01)
    assert keys(doc_blocks("example")["stats"]) == keys(agent.stats_payload())
