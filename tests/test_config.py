from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.cli import main
from agent.config import Config, client_id, hostname, iter_settings, load_config, read_password, topic_root
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_load_without_a_file():
    cfg = load_config(None)
    assert cfg.mqtt.port == 1883 and cfg.mqtt.qos == 1 and cfg.detector.kind == "blazeface"


def test_shipped_config_yaml_is_valid_and_documents_every_setting():
    cfg = load_config(ROOT / "config.yaml")
    assert cfg == Config()  # the shipped file states the defaults
    text = (ROOT / "config.yaml").read_text()
    for path, _default, _description in iter_settings():
        assert path.split(".")[-1] + ":" in text, f"config.yaml does not document {path}"


def test_a_bundled_model_can_be_named_without_its_folder(tmp_path, monkeypatch):
    from agent.model_files import default_model_path, resolve_model_path

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "detector:\n  model: face_detection_full_range_int8.tflite\n")
    assert resolve_model_path(load_config(path).detector.model) == default_model_path(
        "face_detection_full_range_int8.tflite")
    # a file of that name beside the config (or, given on the command line, in the working folder)
    # comes first: the bare name then means it
    Path("face_detection_full_range_int8.tflite").write_bytes(b"x")
    assert resolve_model_path(load_config(path).detector.model) == tmp_path / "face_detection_full_range_int8.tflite"
    cfg = load_config(None, {"detector.model": "face_detection_full_range_int8.tflite"})
    assert resolve_model_path(cfg.detector.model) == Path("face_detection_full_range_int8.tflite")


def test_overrides_replace_file_values(tmp_path):
    cfg = load_config(write(tmp_path, "mqtt:\n  port: 1999\n"), {"mqtt.port": 2000, "source": "clip.mp4"})
    assert cfg.mqtt.port == 2000 and cfg.source == "clip.mp4"


def test_numeric_source_means_a_camera_index(tmp_path):
    assert load_config(write(tmp_path, "source: 0\n")).source == "0"


def test_topic_root_contains_the_host_name_by_default():
    import socket

    assert socket.gethostname().split(".")[0].replace(".", "_")[:3] in topic_root(Config().mqtt)


def test_password_comes_from_file_then_environment(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    cfg = load_config(write(tmp_path, f"mqtt:\n  username: u\n  password_file: {secret}\n"))
    assert read_password(cfg.mqtt) == "s3cret"
    monkeypatch.setenv("EMOTION_AGENT_MQTT_PASSWORD", "fromenv")
    assert read_password(load_config(None).mqtt) == "fromenv"


def test_a_password_file_saved_with_a_byte_order_mark_gives_the_password_without_it(tmp_path):
    # Windows editors save UTF-8 with a BOM; sent along, the broker would refuse the password.
    secret = tmp_path / "pw"
    secret.write_bytes("\ufeffs3cret\r\n".encode("utf-8"))
    cfg = load_config(write(tmp_path, f"mqtt:\n  username: u\n  password_file: {secret}\n"))
    assert read_password(cfg.mqtt) == "s3cret"


def test_config_object_is_frozen():
    with pytest.raises(ValidationError, match="frozen"):
        Config().mqtt.port = 1  # type: ignore[misc]


BAD_CONFIGS = [
    ("mqtt:\n  prot: 1883\n", "config.yaml:2: mqtt.prot: unknown setting (did you mean 'port'?)"),
    ("mqtt:\n  port: abc\n", "config.yaml:2: mqtt.port: expected an integer, got 'abc'"),
    ("mqtt:\n  port: 70000\n", "config.yaml:2: mqtt.port: expected at most 65535, got 70000"),
    ("mqtt:\n  port: 0\n", "mqtt.port: expected at least 1, got 0"),
    ("mqtt:\n  qos: 3\n", "mqtt.qos: expected at most 2, got 3"),
    ("mqtt:\n  qos: true\n", "mqtt.qos: expected an integer, got True"),
    ("mqtt: 5\n", "mqtt: expected a mapping of settings, got 5"),
    ("mqtt:\n  host: 'mqtt://broker'\n", "mqtt.host: expected a host name or IP address"),
    ("mqtt:\n  host: ''\n", "mqtt.host: expected a host name or IP address"),
    ("mqtt:\n  topic_prefix: 'home/#'\n", "mqtt.topic_prefix: expected topic levels without wildcards"),
    ("mqtt:\n  topic_prefix: 'home/'\n", "mqtt.topic_prefix: expected topic levels"),
    ("mqtt:\n  queue_size: 0\n", "mqtt.queue_size: expected at least 1"),
    ("mqtt:\n  password_file: /nonexistent/pw\n", "mqtt.password_file: file not found: /nonexistent/pw"),
    ("mqtt:\n  tls:\n    ca_file: /nonexistent/ca.pem\n", "mqtt.tls.ca_file: file not found"),
    ("mqtt:\n  tls:\n    enabled: yes please\n", "mqtt.tls.enabled: expected true or false, got 'yes please'"),
    ("mqtt:\n  reconnect_min_s: 10\n  reconnect_max_s: 5\n", "mqtt.reconnect_max_s: must be at least"),
    ("detector:\n  kind: yolo\n", "detector.kind: expected 'blazeface' or 'haar', got 'yolo'"),
    ("mqtt:\n  protocol: 4\n", "config.yaml:2: mqtt.protocol: expected 'auto', '5' or '3.1.1', got '4'"),
    ("mqtt:\n  protocol: 3.1\n", "mqtt.protocol: expected 'auto', '5' or '3.1.1', got '3.1'"),
    ("mqtt:\n  protocol: v5\n", "mqtt.protocol: expected 'auto', '5' or '3.1.1', got 'v5'"),
    ("mqtt:\n  protocol: ''\n", "mqtt.protocol: expected 'auto', '5' or '3.1.1', got ''"),
    ("mqtt:\n  protocol: true\n", "mqtt.protocol: expected 'auto', '5' or '3.1.1', got True (YAML reads a plain yes"),
    ("mqtt:\n  protocol: null\n", "mqtt.protocol: expected 'auto', '5' or '3.1.1', got null"),
    ("detector:\n  model: /nonexistent/model.tflite\n", "detector.model: file not found"),
    ("classifier:\n  model: missing.tflite\n", "classifier.model: file not found: /"),  # in the config's folder
    ("classifier:\n  crop_margin: 5\n", "classifier.crop_margin: expected at most 1, got 5.0"),
    ("smoothing:\n  window_s: 0\n", "smoothing.window_s: expected greater than 0"),
    ("smoothing:\n  window_s: .nan\n", "smoothing.window_s: expected a finite number"),
    # a frame every 17 minutes at the least: 1e-300 validated, then rested for good after its first frame
    ("camera:\n  max_fps: 1e-300\n", "camera.max_fps: expected at least 0.001"),
    ("smoothing:\n  confidence_gate: -0.1\n", "smoothing.confidence_gate: expected at least 0"),
    ("tracking:\n  max_gap_s: null\n", "tracking.max_gap_s: expected a number, got null"),
    ("log_level: loud\n", "log_level: expected 'debug', 'info', 'warning' or 'error', got 'loud'"),
    ("source: ''\n", "source: must not be empty"),
    ("- a\n- b\n", "expected a mapping of settings at the top level, got list"),
    ("mqtt:\n  port: [1\n", "invalid YAML"),
    # config.yaml's own `topic_prefix: "emotion-agent/{hostname}"` without its quotes: YAML's words
    # alone ("expected <block end>, but found '<scalar>'") do not say why
    ("mqtt:\n  topic_prefix: {hostname}/kitchen\n", 'config.yaml:2: invalid YAML: expected <block end>, but found '
     "'<scalar>' (line 2: quote a text value that starts with { or [, as in topic_prefix: \"{hostname}/kitchen\")"),
    ("mqtt:\n  tls: true\n", "config.yaml:2: mqtt.tls: expected a mapping of settings, got True "
     "(did you mean mqtt.tls.enabled: true?)"),
    ("mqtt:\n  discovery: false\n", "mqtt.discovery: expected a mapping of settings, got False "
     "(did you mean mqtt.discovery.enabled: false?)"),
    ("camera:\n  retry_initial_s: 10\n  retry_max_s: 1\n", "camera.retry_max_s: must be at least"),
    ("smoothing:\n  dwell_s: 1e9\n", "smoothing.dwell_s: expected at most 60, got 1000000000.0"),  # YAML 1.1: '1e9'
    ("smoothing:\n  dwell_s: 1e-9x\n", "smoothing.dwell_s: expected a number, got '1e-9x'"),
    ("mqtt:\n  queue_size: 100000000\n", "mqtt.queue_size: expected at most 1000000, got 100000000"),
    ("source: [" + "1, " * 500 + "1]\n", "source: expected a string, got [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, …, 1]"),
    ("a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n", "config.yaml:2: YAML aliases (*a) are not supported"),
    ("mqtt:\n  host: " + "a" * 64 + ".lan\n", "mqtt.host: not a valid host name"),
    ("mqtt:\n  client_id: " + "c" * 300 + "\n", "mqtt.client_id: too long: 300 bytes, expected at most 256"),
    ("mqtt:\n  topic_prefix: $SYS/x\n", "mqtt.topic_prefix: topics starting with '$' are the broker's own"),
    ("mqtt:\n  topic_prefix: " + "t" * 2000 + "\n", "mqtt.topic_prefix: too long: 2000 bytes"),
    ("mqtt:\n  tls:\n    insecure: true\n", "mqtt.tls.insecure: set, but tls.enabled is false"),
    ("mqtt:\n  password_file: /dev/null\n", "mqtt.password_file: not a regular file: /dev/null"),
    ("mqtt:\n  password_file: /\n", "mqtt.password_file: not a regular file: /"),
    ("detector:\n  kind: haar\n  model: /dev/null\n", "detector.model: not a regular file"),
    ("mqtt:\n  port: 1883\n  port: 1884\n", "config.yaml:3: mqtt.port: set twice (first on line 2)"),
    ("source: 010\n", "config.yaml:1: 010 is an octal number in YAML (= 8); write it without the leading zero"),
    ("mqtt:\n  queue_size: 0100\n", "config.yaml:2: 0100 is an octal number in YAML (= 64)"),
    ("mqtt:\n  host: a\nsource: 0\nmqtt:\n  port: 1\n", "config.yaml:4: mqtt: set twice (first on line 1)"),
    # Found by a sweep of bad inputs: each of these used to end in a traceback, or in a broker that
    # silently refused every message.
    ("detector:\n  interval_s: 1" + "0" * 400 + "\n", "detector.interval_s: expected a finite number"),
    ("mqtt:\n  port: 1" + "0" * 5000 + "\n", "invalid YAML: a number of thousands of digits"),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "config.yaml:1: nested more than 16 levels deep"),
    ("".join(f"{' ' * i}k{i}:\n" for i in range(500)), "nested more than 16 levels deep"),
    ('mqtt:\n  topic_prefix: "a\\ud800b"\n', "mqtt.topic_prefix: not valid UTF-8 text"),
    ('mqtt:\n  topic_prefix: "a\\u0001b"\n', "mqtt.topic_prefix: contains a control character (U+0001)"),
    ('mqtt:\n  client_id: "a\\x7fb"\n', "mqtt.client_id: contains a control character (U+007F)"),
    ('mqtt:\n  discovery:\n    prefix: "ha\\ufffe"\n',
     "mqtt.discovery.prefix: contains an invisible character (U+FFFE)"),
    ("mqtt:\n  host: a..b\n", "mqtt.host: not a valid host name (empty or over-long part between dots)"),
    ("mqtt:\n  host: broker.lan:1883\n", "mqtt.host: expected a host name or IP address without a port"),
    ("mqtt:\n  host: '[::1]'\n", "mqtt.host: expected a host name or IP address without a port or brackets"),
    ("mqtt:\n  username: " + "u" * 70000 + "\n", "mqtt.username: too long: 70000 bytes, expected at most 65535"),
    # YAML 1.1's base 60: these were camera 90 and camera 5400, silently.
    ("source: 1:30\n", "config.yaml:1: source: 1:30 is a base-60 number in YAML (= 90); write the number you mean, "
                       "or quote it ('1:30')"),
    ("source: 1:30:00\n", "config.yaml:1: source: 1:30:00 is a base-60 number in YAML (= 5400)"),
    # Stream URLs that passed check-config and were then reopened forever.
    ("source: 'rtsp://'\n", "config.yaml:1: source: the stream URL has no host: 'rtsp://'"),
    ("source: 'http://'\n", "source: the stream URL has no host: 'http://'"),
    ("source: 'udp://'\n", "source: the stream URL has no host: 'udp://'"),
    ("source: 'rtsp://u:p@cam:99999/x'\n", "source: the stream URL's port must be a number from 1 to 65535: "
                                           "'rtsp://u:***@cam:99999/x'"),
    ("source: 'rtsp://cam:0/x'\n", "source: the stream URL's port must be a number from 1 to 65535"),
    ("source: 'rtsp://u:p@[::1/x'\n", "source: not a valid stream URL (Invalid IPv6 URL): 'rtsp://u:***@[::1/x'"),
    # Topic prefixes that passed and published to topics no subscription written by hand matches.
    ('mqtt:\n  topic_prefix: " kitchen "\n', "config.yaml:2: mqtt.topic_prefix: a topic level starts or ends with "
                                            "a blank, got ' kitchen '"),
    ("mqtt:\n  topic_prefix: 'home/ kitchen'\n", "config.yaml:2: mqtt.topic_prefix: a topic level starts or ends "
                                                "with a blank"),
    ('mqtt:\n  topic_prefix: "kitchen\\u200b"\n', "config.yaml:2: mqtt.topic_prefix: contains an invisible "
                                                 "character (U+200B ZERO WIDTH SPACE), got 'kitchen\\u200b'"),
    ('mqtt:\n  topic_prefix: "kitchen\\u00a0cam"\n', "mqtt.topic_prefix: contains an invisible character (U+00A0 "
                                                    "NO-BREAK SPACE)"),
    ('mqtt:\n  topic_prefix: "\\ufeffkitchen"\n', "mqtt.topic_prefix: contains an invisible character (U+FEFF"),
    ('mqtt:\n  topic_prefix: "kitchen\\tcam"\n', "mqtt.topic_prefix: contains a control character (U+0009)"),
    ("mqtt:\n  topic_prefix: 'home//kitchen'\n", "config.yaml:2: mqtt.topic_prefix: has an empty topic level ('//')"),
    ("mqtt:\n  topic_prefix: 'home/+/kitchen'\n", "mqtt.topic_prefix: expected topic levels without wildcards"),
    ('mqtt:\n  discovery:\n    prefix: " homeassistant"\n', "config.yaml:3: mqtt.discovery.prefix: a topic level "
                                                          "starts or ends with a blank"),
    ("camera:\n  enabled: 'off'\n", "config.yaml:2: camera.enabled: expected true or false, got 'off'"),
    ("camera:\n  enabled: 0\n", "camera.enabled: expected true or false, got 0"),
    ("mqtt:\n  topic_prefix: no\n", "mqtt.topic_prefix: expected a string, got False (YAML reads a plain yes, no, "
                                    "on or off as true or false: quote it)"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS, ids=[m.split(":")[0] + m[:30] for _, m in BAD_CONFIGS])
def test_bad_config_is_one_clear_line(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    # check-config runs the same validation and prints the same line, no traceback
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def big_config(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("#" * (2 << 20) + "\n")  # read in 30 s, before a size limit
    return path


@pytest.mark.parametrize("make_path, message", [
    (lambda tmp: tmp / "nope.yaml", "config file not found"),
    (lambda tmp: tmp, "config path is a directory"),
    (lambda tmp: "/dev/zero", "config path is not a regular file: /dev/zero"),  # would be read forever
    (lambda tmp: "", "config path is empty"),
    (lambda tmp: tmp / ("a" * 300), "cannot read config file"),  # ENAMETOOLONG
    (lambda tmp: big_config(tmp), "config file too large"),
])
def test_unusable_config_path_is_one_line(tmp_path, capsys, make_path, message):
    assert main(["check-config", str(make_path(tmp_path))]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("source, message", [
    ("/nonexistent/clip.mp4", "config.yaml:3: source not found: /nonexistent/clip.mp4"),
    ("{tmp}", "config.yaml:3: source is a directory, not a file"),
    ("{tmp}/fake.png", "config.yaml:3: source: cannot read image {tmp}/fake.png: not an image file"),
])
def test_check_config_checks_the_source_as_run_does(tmp_path, capsys, source, message):
    (tmp_path / "fake.png").write_text("not a picture")
    message = message.format(tmp=tmp_path)
    path = write(tmp_path, f"mqtt:\n  port: 1883\nsource: {source.format(tmp=tmp_path)}\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("section, message, status", [
    ("classifier:\n  model: {junk}\n", "cannot load model", 3),
    ("detector:\n  model: {junk}\n", "cannot load model", 3),
    # Config errors, as a missing file is: systemd restarts the unit on any status but 2 and 3.
    ("mqtt:\n  tls:\n    enabled: true\n    ca_file: {junk}\n", "mqtt.tls.ca_file: not a PEM CA certificate", 2),
    ("mqtt:\n  tls:\n    enabled: true\n    cert_file: {junk}\n    key_file: {junk}\n",
     "mqtt.tls.cert_file/key_file: not a PEM certificate and its private key", 2),
])
def test_check_config_loads_what_run_loads(tmp_path, capsys, section, message, status):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model, not a certificate")
    assert main(["check-config", str(write(tmp_path, "source: /dev/video97\n" + section.format(junk=junk)))]) == status
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("source", ["/dev/video97", "97"])  # an index opens /dev/video<index> on Linux
def test_check_config_says_a_missing_camera_device_is_waited_for(tmp_path, capsys, source):
    assert main(["check-config", str(write(tmp_path, f"source: {source}\n"))]) == 0
    assert "camera (not present now: run waits for it)" in capsys.readouterr().out


def test_check_config_accepts_the_shipped_file(capsys):
    assert main(["check-config", str(ROOT / "config.yaml")]) == 0
    assert "OK" in capsys.readouterr().out


def test_two_agents_on_one_host_with_different_topic_roots_get_different_client_ids(tmp_path):
    host = hostname()
    default = load_config(None).mqtt
    door = load_config(None, {"mqtt.topic_prefix": "door/cam"}).mqtt
    named = load_config(None, {"mqtt.topic_prefix": "door/cam", "mqtt.client_id": "mine"}).mqtt
    assert client_id(default) == f"emotion-agent-{host}"
    assert client_id(door).startswith(f"emotion-agent-{host}-door-cam-")
    assert client_id(named) == "mine"


@pytest.mark.parametrize("first, second", [("door/cam", "door-cam"), ("a b", "a_b"), ("kitchen/cam", "kitchen_cam"),
                                           ("café", "caf_")])
def test_topic_prefixes_that_read_alike_once_made_safe_get_different_client_ids(first, second):
    # Both were emotion-agent-<host>-door-cam: two agents took the session from each other (37
    # connects in 35 s) and were one Home Assistant device.
    ids = [client_id(load_config(None, {"mqtt.topic_prefix": prefix}).mqtt) for prefix in (first, second)]
    assert ids[0] != ids[1]
    for cid in ids:  # still readable, and what any broker takes
        assert cid.startswith(f"emotion-agent-{hostname()}-") and len(cid.encode()) <= 256
        assert all(c.isascii() and (c.isalnum() or c in "-_") for c in cid), cid


def test_a_long_topic_root_still_gives_a_client_id_a_broker_takes():
    cid = client_id(load_config(None, {"mqtt.topic_prefix": "t" * 1000}).mqtt)
    assert len(cid.encode()) <= 256


@pytest.mark.parametrize("written, enabled", [("true", True), ("false", False), ("off", False), ("on", True),
                                              ("no", False), ("yes", True)])
def test_camera_enabled_takes_yaml_booleans_as_every_switch_does(tmp_path, written, enabled):
    assert load_config(write(tmp_path, f"camera:\n  enabled: {written}\n")).camera.enabled is enabled
    assert load_config(None).camera.enabled is True


@pytest.mark.parametrize("prefix", ["living room/cam", "küche/kamera", "emotion-agent/{hostname}-kitchen", "a/b/c"])
def test_topic_prefixes_with_inner_blanks_and_letters_of_any_language_are_accepted(prefix):
    assert load_config(None, {"mqtt.topic_prefix": prefix}).mqtt.topic_prefix == prefix


@pytest.mark.parametrize("written, protocol", [("5", "5"), ("'5'", "5"), ("'3.1.1'", "3.1.1"), ("3.1.1", "3.1.1"),
                                               ("auto", "auto")])
def test_mqtt_protocol_takes_5_written_as_a_number_too(tmp_path, written, protocol):
    assert load_config(write(tmp_path, f"mqtt:\n  protocol: {written}\n")).mqtt.protocol == protocol


def test_numbers_in_exponent_notation_are_numbers_though_yaml_1_1_reads_them_as_text(tmp_path):
    cfg = load_config(write(tmp_path, "smoothing:\n  window_s: 5e-1\n  dwell_s: 2E-1\n"))
    assert (cfg.smoothing.window_s, cfg.smoothing.dwell_s) == (0.5, 0.2)


@pytest.mark.parametrize("username, content, message", [
    ("agent", b"", "mqtt.password_file: the file is empty"),
    ("agent", b"\xff\xfe\x00secret", "mqtt.password_file: the password is not valid UTF-8 text"),
    (None, b"secret", "mqtt.password_file: set, but mqtt.username is not"),
])
def test_a_password_file_that_cannot_be_used_is_one_line(tmp_path, username, content, message):
    secret = tmp_path / "pw"
    secret.write_bytes(content)
    user = f"  username: {username}\n" if username else ""
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, f"mqtt:\n{user}  password_file: {secret}\n"))


def test_haar_with_a_model_file_is_refused_rather_than_ignored(tmp_path):
    with pytest.raises(ConfigError, match="detector.model: applies to blazeface only"):
        load_config(write(tmp_path, f"detector:\n  kind: haar\n  model: {ROOT / 'config.yaml'}\n"))


def test_an_override_of_null_sets_the_bundled_default_over_the_file(tmp_path):
    # `python -m agent.flicker --config int8.yaml --set detector.model=null` used to keep the file's model.
    path = write(tmp_path, "detector:\n  model: face_detection_full_range_int8.tflite\n")
    assert load_config(path).detector.model is not None
    assert load_config(path, {"detector.model": None}).detector.model is None


def test_the_logged_config_masks_a_stream_password():
    cfg = load_config(None, {"source": "rtsp://admin:S3cret@cam.lan:554/live"})
    assert cfg.redacted()["source"] == "rtsp://admin:***@cam.lan:554/live"
    assert load_config(None, {"source": "rtsp://cam.lan/live"}).redacted()["source"] == "rtsp://cam.lan/live"


@pytest.mark.parametrize("source", ["rtsp://admin:hunter2@cam:99999/x", "rtsp://admin:hunter2@[::1/x",
                                    "rtsp://admin:hunter2@cam/x\\u0001"])
def test_a_refused_stream_url_keeps_its_password_out_of_the_error(tmp_path, capsys, source):
    assert main(["check-config", str(write(tmp_path, f'source: "{source}"\n'))]) == 2
    err = capsys.readouterr().err
    assert "source:" in err and "***@" in err and "hunter2" not in err


@pytest.mark.parametrize("source", ["rtsp://admin:S3cret@cam.lan:554/live", "rtsp://[fe80::1%25eth0]/x",
                                    "rtsp://u:p@[::1]:8554/x?channel=1&subtype=0", "http://cam.lan/mjpg",
                                    "RTSP://cam.lan/x", "udp://@:1234",  # udp: received on every interface
                                    "tcp://:5000?listen=1"])  # FFmpeg listens on every interface
def test_stream_urls_with_credentials_ipv6_literals_and_queries_are_accepted(source):
    assert load_config(None, {"source": source}).source == source


def test_base_60_numbers_are_still_numbers_where_a_number_is_meant(tmp_path):
    assert load_config(write(tmp_path, "mqtt:\n  stats_interval_s: 1:00\n")).mqtt.stats_interval_s == 60


def test_a_password_with_a_slash_is_masked_though_it_ends_the_address_early(tmp_path):
    # urlsplit ends the address at the /, so it saw no password and printed the URL whole.
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, "source: rtsp://admin:p/ss@cam/s\n"))
    assert "p/ss" not in str(refused.value) and "rtsp://***@cam/s" in str(refused.value)


@pytest.mark.parametrize("username", ["''", "'  '"])
def test_an_empty_user_name_is_no_user_name(tmp_path, username):
    # Kept, it went to the broker as an empty user name, without the password_file's password.
    assert load_config(write(tmp_path, f"mqtt:\n  username: {username}\n")).mqtt.username is None
    secret = tmp_path / "pw"
    secret.write_text("s3cret")
    with pytest.raises(ConfigError, match="mqtt.password_file: set, but mqtt.username is not"):
        load_config(write(tmp_path, f"mqtt:\n  username: {username}\n  password_file: {secret}\n"))


def test_relative_files_in_a_config_file_are_its_folder_s_and_on_the_command_line_the_working_one(
        tmp_path, monkeypatch):
    # The service runs in /var/lib/emotion-agent and its config is /etc/emotion-agent/config.yaml:
    # `cd /etc/emotion-agent && emotion-agent check-config config.yaml` said OK, the service exited 2.
    from agent.model_files import default_model_path

    etc, work = tmp_path / "etc", tmp_path / "work"
    etc.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("pw", "ca.pem", "cert.pem", "key.pem", "mine.tflite"):
        (etc / name).write_text("s3cret\n")
    bundled = "face_detection_full_range_int8.tflite"
    (work / bundled).write_bytes(b"x")  # in the working folder: not what the config means
    path = write(etc, f"source: clip.mp4\ndetector:\n  model: {bundled}\nclassifier:\n  model: mine.tflite\n"
                      "mqtt:\n  username: u\n  password_file: pw\n  tls:\n    enabled: true\n    ca_file: ca.pem\n"
                      "    cert_file: cert.pem\n    key_file: key.pem\n")
    cfg = load_config(path)
    assert cfg.source == str(etc / "clip.mp4")
    assert read_password(cfg.mqtt) == "s3cret"
    assert (cfg.mqtt.tls.ca_file, cfg.mqtt.tls.cert_file, cfg.mqtt.tls.key_file) == tuple(
        str(etc / name) for name in ("ca.pem", "cert.pem", "key.pem"))
    assert cfg.classifier.model == str(etc / "mine.tflite")
    assert Path(cfg.detector.model) == default_model_path(bundled)
    (etc / bundled).write_bytes(b"x")  # a file of a bundled model's name in the config's folder comes first
    assert load_config(path).detector.model == str(etc / bundled)
    # The command line's are the working folder's; camera indexes and URLs are no file names.
    assert load_config(path, {"source": "clip.mp4"}).source == "clip.mp4"
    for source in ("0", "rtsp://cam.lan/live"):
        assert load_config(write(etc, f"source: '{source}'\n")).source == source
    with pytest.raises(ConfigError, match=f"mqtt.password_file: file not found: {etc / 'nope'}$"):
        load_config(write(etc, "mqtt:\n  username: u\n  password_file: nope\n"))


def test_an_invalid_date_is_not_called_a_long_number(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "mqtt:\n  client_id: 2024-02-30\n"))
    assert "invalid YAML" in str(info.value) and "digits" not in str(info.value)


def test_ipv6_hosts_are_still_hosts(tmp_path):
    for host in ("::1", "fe80::1%eth0", "2001:db8::10"):
        assert load_config(write(tmp_path, f"mqtt:\n  host: '{host}'\n")).mqtt.host == host


def test_a_password_mqtt_cannot_carry_is_one_line(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("p" * 70000)
    with pytest.raises(ConfigError, match="mqtt.password_file: the password is too long: 70000 bytes"):
        load_config(write(tmp_path, f"mqtt:\n  username: u\n  password_file: {secret}\n"))
    monkeypatch.setenv("EMOTION_AGENT_MQTT_PASSWORD", "sec\udcffret")  # a byte that is not UTF-8
    with pytest.raises(ConfigError, match="EMOTION_AGENT_MQTT_PASSWORD: the password is not valid UTF-8"):
        read_password(load_config(None, {"mqtt.username": "u"}).mqtt)
