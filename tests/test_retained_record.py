"""The record of retained topics kept across restarts: pure file logic, no broker."""

import json
import logging
import socket

from agent.retained_record import RetainedRecord, record_path

BROKER = "broker.lan:1883"


def test_stale_topics_are_those_the_last_run_kept_on_the_same_broker(tmp_path):
    path = record_path(str(tmp_path), "/etc/emotion-agent/config.yaml")
    assert RetainedRecord(path).begin(BROKER, {"a/state", "a/stats"}) == set()  # the first run
    second = RetainedRecord(path)
    assert second.begin(BROKER, {"b/state", "a/stats"}) == {"a/state"}
    # Until a run ends with everything delivered, the emptied topics stay recorded.
    assert RetainedRecord(path).begin(BROKER, {"b/state", "a/stats"}) == {"a/state"}
    second.settled()
    assert RetainedRecord(path).begin(BROKER, {"b/state"}) == {"a/stats"}


def test_another_broker_forgets_the_old_topics(tmp_path):
    path = record_path(str(tmp_path), "config.yaml")
    RetainedRecord(path).begin(BROKER, {"a/state"})
    assert RetainedRecord(path).begin("other:1883", {"b/state"}) == set()
    assert RetainedRecord(path).begin(BROKER, {"b/state"}) == set()


def test_a_record_from_another_host_is_left_alone(tmp_path, caplog):
    # An SD card image cloned to a second device carries the first one's record: its topics are
    # the first device's, live.
    path = record_path(str(tmp_path), "config.yaml")
    path.write_text(json.dumps({"host": socket.gethostname() + "-golden", "broker": BROKER, "topics": ["a/state"]}))
    with caplog.at_level(logging.INFO):
        assert RetainedRecord(path).begin(BROKER, {"b/state"}) == set()
    assert "-golden: its topics are left alone" in caplog.text
    assert RetainedRecord(path).begin(BROKER, {"c/state"}) == {"b/state"}  # now it is this host's


def test_each_config_file_and_topic_prefix_has_its_own_record_and_none_without_a_state_directory(tmp_path):
    one = record_path(str(tmp_path), "/etc/a.yaml")
    assert one.parent == tmp_path and record_path(f"{tmp_path}:/var/lib/other", "/etc/a.yaml") == one
    # Two agents on one host, one config, told apart by --topic-prefix: neither empties the other's.
    others = {record_path(str(tmp_path), "/etc/b.yaml"), record_path(str(tmp_path), "/etc/a.yaml", "door/cam"),
              record_path(str(tmp_path), "/etc/a.yaml", "hall/cam"), record_path(str(tmp_path), None)}
    assert len(others | {one}) == 5
    assert record_path(None, "/etc/a.yaml") is None and record_path("", "/etc/a.yaml") is None
    assert RetainedRecord(None).begin(BROKER, {"a"}) == set()


def test_a_damaged_record_is_a_warning_and_a_new_start(tmp_path, caplog):
    path = record_path(str(tmp_path), "config.yaml")
    host = socket.gethostname()
    for damaged in ("{not json", json.dumps({"host": host, "broker": BROKER}),
                    json.dumps({"host": host, "broker": 1, "topics": []}),
                    json.dumps({"host": host, "broker": BROKER, "topics": [1]}), json.dumps([1, 2]),
                    json.dumps({"host": host, "broker": BROKER, "topics": "a/state"})):
        path.write_text(damaged)
        with caplog.at_level(logging.WARNING):
            assert RetainedRecord(path).begin(BROKER, {"a"}) == set()
        assert "cannot use the record of retained topics" in caplog.text
        caplog.clear()
    path.write_bytes(b"\xff\xfe")
    with caplog.at_level(logging.WARNING):
        assert RetainedRecord(path).begin(BROKER, {"a"}) == set()
    assert "cannot use the record" in caplog.text


def test_an_unwritable_state_directory_is_one_warning_and_no_failure(tmp_path, caplog):
    record = RetainedRecord(tmp_path / "missing" / "retained.json")
    with caplog.at_level(logging.WARNING):
        assert record.begin(BROKER, {"a"}) == set()
        record.settled()
        record.begin(BROKER, {"b"})
    assert caplog.text.count("cannot save the record of retained topics") == 1


def test_topics_no_publish_can_take_are_skipped_not_handed_on(tmp_path, caplog):
    # A hand-edited or damaged record once named `x/#`: publishing its empty message raised, at
    # every start, since the record keeps what it hands out.
    path = record_path(str(tmp_path), "config.yaml")
    bad = ["x/#", "a/+/state", "", "nul\0topic", "t" * 65536]
    path.write_text(json.dumps({"host": socket.gethostname(), "broker": BROKER, "topics": ["a/state", *bad]}))
    with caplog.at_level(logging.WARNING):
        assert RetainedRecord(path).begin(BROKER, {"b/state"}) == {"a/state"}
    assert "skipping 5 topic(s) that cannot be published to" in caplog.text
    assert set(json.loads(path.read_text())["topics"]) == {"a/state", "b/state"}
