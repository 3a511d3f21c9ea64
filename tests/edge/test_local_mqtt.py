"""mqtt signals from a local broker (as ESPHome/Tasmota nodes publish), parsed on arrival."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from millrace.edge.config import parse_config
from millrace.edge.pipeline import Pipeline
from millrace.edge.sampler import Sampler
from millrace.errors import ConfigError

pytestmark = pytest.mark.integration

CONFIG = """
device_id = "dev-a"
[broker]
host = "localhost"
ca = "ca.crt"
cert = "c.crt"
key = "c.key"
[windows]
period_s = 1
grace_s = 0.1
[outbox]
path = "o.sqlite"
[state]
dir = "s"
[local_mqtt.nodes]
host = "127.0.0.1"
port = {port}
[[signals]]
metric = "plug.power"
driver = "mqtt"
source = "nodes"
topic = "tele/plug/SENSOR"
field = "ENERGY.Power"
valid_min = 0
[[signals]]
metric = "plug.on"
driver = "mqtt"
source = "nodes"
topic = "stat/plug/POWER"
kind = "state"
"""


class Sink:
    def __init__(self) -> None:
        self.readings: list[tuple[int, Any]] = []
        self.failures: list[tuple[int, str]] = []
        self.event = threading.Event()

    def reading(self, index: int, ts_ms: int, raw: object) -> None:
        self.readings.append((index, raw))
        self.event.set()

    def failure(self, index: int, ts_ms: int, reason: str) -> None:
        self.failures.append((index, reason))
        self.event.set()


def test_local_broker_messages_become_readings(local_mqtt: int) -> None:
    config = parse_config(CONFIG.format(port=local_mqtt), base=Path("/"))
    sink = Sink()
    sampler = Sampler(config, sink)
    sampler.start()
    node = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="node")
    node.connect("127.0.0.1", local_mqtt)
    node.loop_start()
    try:
        deadline = time.monotonic() + 10
        # Publish until the agent's subscription is in place and the first reading lands.
        while not sink.readings and time.monotonic() < deadline:
            node.publish("tele/plug/SENSOR", b'{"ENERGY":{"Power":12.5}}').wait_for_publish(2)
            sink.event.wait(0.2)
        node.publish("tele/plug/SENSOR", b'{"ENERGY":{}}').wait_for_publish(2)
        node.publish("stat/plug/POWER", b"ON").wait_for_publish(2)
        node.publish("tele/other", b"1").wait_for_publish(2)
        deadline = time.monotonic() + 5
        while (not sink.failures or len(sink.readings) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        node.loop_stop()
        node.disconnect()
        sampler.stop()
    assert (0, 12.5) in sink.readings
    assert (1, "ON") in sink.readings
    assert sink.failures and sink.failures[0][0] == 0 and "no field" in sink.failures[0][1]
    assert all(index in (0, 1) for index, _ in sink.readings)


def test_pipeline_turns_pushed_state_into_events(local_mqtt: int) -> None:
    config = parse_config(CONFIG.format(port=local_mqtt), base=Path("/"))
    pipe = Pipeline(config.signals, periods_s=[1], grace_ms=100)
    sampler = Sampler(config, pipe)
    sampler.start()
    node = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="node2")
    node.connect("127.0.0.1", local_mqtt)
    node.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not pipe.pending_events and time.monotonic() < deadline:
            node.publish("stat/plug/POWER", b"ON").wait_for_publish(2)
            time.sleep(0.1)
        node.publish("stat/plug/POWER", b"ON").wait_for_publish(2)
        node.publish("stat/plug/POWER", b"OFF").wait_for_publish(2)
        deadline = time.monotonic() + 5
        while pipe.pending_events < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        node.loop_stop()
        node.disconnect()
        sampler.stop()
    events = pipe.drain(int(time.time() * 1000)).events
    assert [e.value for e in events] == [True, False]


def _subscribed(sampler_sink: Sink, node: paho.Client) -> None:
    """Publish a marker until the agent's subscription delivers it (the session exists)."""
    deadline = time.monotonic() + 10
    while not sampler_sink.readings and time.monotonic() < deadline:
        node.publish("stat/plug/POWER", b"READY", qos=1).wait_for_publish(2)
        sampler_sink.event.wait(0.2)
    assert sampler_sink.readings, "the agent never subscribed"


def test_qos1_readings_published_while_the_agent_is_down_arrive_after_restart(
    local_mqtt: int,
) -> None:
    """The agent's session outlives its restart: the local broker queues QoS 1 readings."""
    config = parse_config(CONFIG.format(port=local_mqtt), base=Path("/"))
    assert config.local_mqtt["nodes"].session_expiry_s > 0
    node = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="node-q", protocol=paho.MQTTv5)
    node.connect("127.0.0.1", local_mqtt)
    node.loop_start()
    first = Sink()
    sampler = Sampler(config, first)
    sampler.start()
    try:
        _subscribed(first, node)
        sampler.stop()
        count = 25
        for i in range(count):
            payload = f'{{"ENERGY":{{"Power":{i}}}}}'.encode()
            node.publish("tele/plug/SENSOR", payload, qos=1).wait_for_publish(2)
        second = Sink()
        sampler = Sampler(parse_config(CONFIG.format(port=local_mqtt), base=Path("/")), second)
        sampler.start()
        deadline = time.monotonic() + 10
        while len(second.readings) < count and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sampler.stop()
        node.loop_stop()
        node.disconnect()
    assert sorted(raw for index, raw in second.readings if index == 0) == [
        float(i) for i in range(count)
    ]


def test_local_mqtt_session_expiry_is_validated() -> None:
    with pytest.raises(ConfigError, match="session_expiry_s"):
        parse_config(
            CONFIG.format(port=1883).replace(
                "port = 1883\n", "port = 1883\nsession_expiry_s = -1\n", 1
            ),
            base=Path("/"),
        )
    text = CONFIG.format(port=1883).replace("port = 1883\n", "port = 1883\nsession_expiry_s = 0\n")
    assert parse_config(text, base=Path("/")).local_mqtt["nodes"].session_expiry_s == 0


def test_clean_stop_logs_no_lost_local_broker_warning(
    local_mqtt: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopping on purpose is not "lost local broker ... Normal disconnection"."""
    from millrace.edge.drivers.mqtt import LocalMqttSource

    config = parse_config(CONFIG.format(port=local_mqtt), base=Path("/"))
    sink = Sink()
    items = list(enumerate(config.signals))
    source = LocalMqttSource(config.local_mqtt["nodes"], items, device_id="dev-a", sink=sink)
    with caplog.at_level("INFO", logger="millrace.edge.drivers.mqtt"):
        source.start()
        deadline = time.monotonic() + 10
        while "connected to local broker" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "connected to local broker nodes" in caplog.text
        source.stop()
    assert "disconnected from local broker nodes" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= 30], caplog.text
    assert source.errors == 0
