"""Simulated MQTT sensor nodes seen by a plain subscriber on a plain local broker.

One fleet of nodes (one per fault kind) runs once for the module while a
subscriber records every message; the tests then check what each node showed.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from millrace.fieldsim.faults import DeviceFaults, Fault, faulted_value
from millrace.fieldsim.fleet import Fleet, FleetConfig
from millrace.fieldsim.models import value_at
from millrace.fieldsim.specs import load_sensor_specs

pytestmark = pytest.mark.integration

SEED = 5
PREFIX = "simtest"
RUN_SECONDS = 5.0
SLOW_DELAY_SECONDS = 0.5
SIGNALS = load_sensor_specs().mqtt
NODE_FAULTS = {
    "gw0001": None,
    "gw0002": Fault("gw0002-node", "stuck"),
    "gw0003": Fault("gw0003", "spike"),
    "gw0004": Fault("gw0004", "nan"),
    "gw0005": Fault("gw0005", "out_of_range"),
    "gw0006": Fault("gw0006", "garbage"),
    "gw0007": Fault("gw0007", "slow", delay_s=SLOW_DELAY_SECONDS),
    "gw0008": Fault("gw0008", "dropout", 1.5, 1.5),
    "gw0009": Fault("gw0009", "refused", 1.5, 1.5),
}


@dataclass(frozen=True)
class Received:
    at: float
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Recording:
    started_at: float
    messages: list[Received]
    ground_truth: list[list[str]]

    def of(self, gateway: str, kind: str = "sensor") -> list[Received]:
        topic = f"{PREFIX}/{gateway}-node/{kind}"
        return [m for m in self.messages if m.topic == topic]


def field(doc: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        doc = doc[part]
    return doc


@pytest.fixture(scope="module")
def recording(local_broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Recording:
    workdir: Path = tmp_path_factory.mktemp("mqtt-nodes")
    config = FleetConfig(
        devices=len(NODE_FAULTS),
        kinds=("mqtt",),
        seed=SEED,
        mqtt_host=local_broker.host,
        mqtt_port=local_broker.port,
        topic_prefix=PREFIX,
        manifest=workdir / "manifest.json",
        ground_truth=workdir / "gt.csv",
        faults=tuple(f for f in NODE_FAULTS.values() if f is not None),
    )

    async def scenario() -> Recording:
        messages: list[Received] = []
        async with aiomqtt.Client(local_broker.host, local_broker.port) as sub:
            await sub.subscribe(f"{PREFIX}/#", qos=1)

            async def collect() -> None:
                async for msg in sub.messages:
                    messages.append(
                        Received(time.time(), str(msg.topic), bytes(msg.payload), msg.retain)  # type: ignore[arg-type]
                    )

            collector = asyncio.create_task(collect())
            fleet = Fleet(config)
            await fleet.start()
            await asyncio.sleep(RUN_SECONDS)
            await fleet.stop()
            await asyncio.sleep(0.3)
            collector.cancel()
        rows = [line.split(",") for line in (workdir / "gt.csv").read_text().splitlines()[1:]]
        return Recording(fleet.started_at, messages, rows)

    return asyncio.run(scenario())


def step_of(message: Received, delay: float = 0.0) -> float:
    return math.floor(message.at - delay)


def test_clean_node_publishes_the_model_as_nested_json(recording: Recording) -> None:
    sensor = recording.of("gw0001")
    assert len(sensor) >= 3
    for message in sensor:
        doc = json.loads(message.payload)
        assert set(doc) == {"temperature", "humidity", "battery"}
        t = step_of(message)
        for sig in SIGNALS:
            assert field(doc, sig.path) == round(
                value_at(SEED, "gw0001-node", sig.spec, t), sig.decimals
            )


def test_status_is_online_then_offline_on_clean_stop(recording: Recording) -> None:
    status = [m.payload for m in recording.of("gw0001", "status")]
    assert status == [b"online", b"offline"]


def test_ground_truth_logs_every_published_value(recording: Recording) -> None:
    sensor = recording.of("gw0001")
    rows = [r for r in recording.ground_truth if r[1] == "gw0001-node"]
    assert len(rows) == len(sensor) * len(SIGNALS)
    published = sorted(
        (sig.spec.name, float(field(json.loads(m.payload), sig.path)))
        for m in sensor
        for sig in SIGNALS
    )
    assert sorted((r[2], float(r[4])) for r in rows) == published


def test_stuck_node_repeats_the_value_from_the_fault_start(recording: Recording) -> None:
    payloads = {m.payload for m in recording.of("gw0002")}
    assert len(payloads) == 1 and len(recording.of("gw0002")) >= 3
    doc = json.loads(payloads.pop())
    for sig in SIGNALS:
        want = value_at(SEED, "gw0002-node", sig.spec, recording.started_at)
        assert field(doc, sig.path) == round(want, sig.decimals)


def test_spiking_node_jumps_by_several_valid_spans(recording: Recording) -> None:
    window = DeviceFaults.pin(
        [NODE_FAULTS["gw0003"]],
        device="gw0003-node",
        gateway="gw0003",
        started_at=recording.started_at,
    ).windows[0]
    spikes = 0
    for message in recording.of("gw0003"):
        doc, t = json.loads(message.payload), step_of(message)
        for sig in SIGNALS:
            clean = value_at(SEED, "gw0003-node", sig.spec, t)
            want = faulted_value(
                window, seed=SEED, device="gw0003-node", spec=sig.spec, t=t, clean=clean
            )
            assert field(doc, sig.path) == round(want, sig.decimals)
            spikes += abs(field(doc, sig.path) - clean) > sig.spec.valid_span
    assert spikes >= 1


def test_nan_node_publishes_nan_tokens(recording: Recording) -> None:
    sensor = recording.of("gw0004")
    assert sensor and all(b"NaN" in m.payload for m in sensor)
    for message in sensor:
        doc = json.loads(message.payload)
        assert all(math.isnan(field(doc, sig.path)) for sig in SIGNALS)


def test_out_of_range_node_exceeds_every_valid_max(recording: Recording) -> None:
    sensor = recording.of("gw0005")
    assert sensor
    for message in sensor:
        doc = json.loads(message.payload)
        assert all(field(doc, sig.path) > sig.spec.valid_max for sig in SIGNALS)


def test_garbage_node_publishes_bytes_that_are_not_json(recording: Recording) -> None:
    sensor = recording.of("gw0006")
    assert len(sensor) >= 3
    for message in sensor:
        with pytest.raises(ValueError):
            json.loads(message.payload)


def test_slow_node_publishes_each_step_late(recording: Recording) -> None:
    sensor = recording.of("gw0007")
    assert len(sensor) >= 3
    for message in sensor:
        assert message.at - math.floor(message.at) >= SLOW_DELAY_SECONDS
        doc = json.loads(message.payload)
        sig = SIGNALS[0]
        assert field(doc, sig.path) == round(
            value_at(SEED, "gw0007-node", sig.spec, step_of(message)), sig.decimals
        )


@pytest.mark.parametrize("gateway", ["gw0008", "gw0009"])
def test_connection_faults_fire_the_last_will_and_silence_the_node(
    recording: Recording, gateway: str
) -> None:
    status = recording.of(gateway, "status")
    assert [m.payload for m in status] == [b"online", b"offline", b"online", b"offline"]
    went, back = status[1].at, status[2].at
    fault = NODE_FAULTS[gateway]
    assert fault is not None and fault.duration_s is not None
    assert went >= recording.started_at + fault.start_s
    assert back >= recording.started_at + fault.start_s + fault.duration_s
    sensor = recording.of(gateway)
    assert any(m.at < went for m in sensor) and any(m.at > back for m in sensor)
    assert not any(went < m.at < back for m in sensor)
