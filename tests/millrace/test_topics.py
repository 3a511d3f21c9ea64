"""Topic builders and the parser agree, and reject ids that would escape a device's subtree."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from millrace import topics
from millrace.errors import WireError

device_ids = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,62}\Z")
commands = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,31}\Z")


@given(device_ids)
def test_device_topics_parse_back(device_id: str) -> None:
    for kind, build in (
        ("data", topics.data_topic),
        ("state", topics.state_topic),
        ("health", topics.health_topic),
        ("receipt", topics.receipt_topic),
    ):
        parsed = topics.parse_topic(build(device_id))
        assert (parsed.kind, parsed.device_id, parsed.command) == (kind, device_id, None)
    assert topics.parse_topic(topics.alert_topic(device_id)).kind == "alert"


@given(device_ids, commands)
def test_command_topics_parse_back(device_id: str, name: str) -> None:
    assert topics.parse_topic(topics.cmd_topic(device_id, name)) == topics.Topic(
        "cmd", device_id, name
    )
    assert topics.parse_topic(topics.reply_topic(device_id, name)) == topics.Topic(
        "reply", device_id, name
    )


@pytest.mark.parametrize("bad", ["", "A", "-x", "a/b", "a+b", "a#", "x" * 64, "ümlaut"])
def test_bad_device_ids_are_refused(bad: str) -> None:
    with pytest.raises(WireError, match="device id"):
        topics.data_topic(bad)


@pytest.mark.parametrize(
    "topic",
    [
        "millrace/v2/d/a/data",
        "millrace/v1/d/a/other",
        "millrace/v1/d/a",
        "millrace/v1/d/a/cmd/x/y",
        "other/v1/d/a/data",
        "millrace/v1/d/A/data",
    ],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(WireError):
        topics.parse_topic(topic)


def test_shared_subscription_filter() -> None:
    assert (
        topics.shared("ingest", topics.all_devices_filter("data"))
        == "$share/ingest/millrace/v1/d/+/data"
    )
    with pytest.raises(WireError):
        topics.shared("a/b", "x")
