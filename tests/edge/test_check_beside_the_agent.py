"""`edge check` run beside the agent keeps off the agent's local-broker connection.

issue 14: the check connected to the gateway-local broker with the running agent's own
client id (and resumed its session), so the broker dropped the agent; the two then took
the id from each other about once a second. install.sh and the rollout run the check while
the old agent is up.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from millrace.edge.check import read_all_once
from millrace.edge.config import parse_config
from millrace.edge.drivers.mqtt import LocalMqttSource
from tests.edge.test_local_mqtt import CONFIG, Sink

pytestmark = pytest.mark.integration


def test_edge_check_uses_its_own_client_id_and_leaves_the_agent_connected(
    local_mqtt: int,
) -> None:
    config = parse_config(CONFIG.format(port=local_mqtt), base=Path("/"))
    agent_sink = Sink()
    agent_source = LocalMqttSource(
        config.local_mqtt["nodes"],
        list(enumerate(config.signals)),
        device_id="dev-a",
        sink=agent_sink,
    )
    agent_source.start()
    node = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="node")
    node.connect("127.0.0.1", local_mqtt)
    node.loop_start()
    stop = threading.Event()

    def publish_until_stopped() -> None:
        while not stop.is_set():
            node.publish("tele/plug/SENSOR", b'{"ENERGY":{"Power":7.0}}', qos=1)
            node.publish("stat/plug/POWER", b"ON", qos=1)
            stop.wait(0.1)

    publisher = threading.Thread(target=publish_until_stopped, daemon=True)
    try:
        deadline = time.monotonic() + 10
        publisher.start()
        while not agent_sink.readings and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent_sink.readings, "the agent's source never got a reading"
        results = read_all_once(config, mqtt_wait_s=5.0)
        assert results[0] == (7.0, "") and results[1] == ("ON", ""), results
        time.sleep(1.0)  # the broker would have dropped the agent by now
        seen = len(agent_sink.readings)
        deadline = time.monotonic() + 5
        while len(agent_sink.readings) == seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(agent_sink.readings) > seen, "the agent stopped receiving after the check"
        assert agent_source.errors == 0, "the check knocked the agent off the local broker"
    finally:
        stop.set()
        publisher.join(5)
        node.loop_stop()
        node.disconnect()
        agent_source.stop()
