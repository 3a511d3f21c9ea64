"""The agent trusts only the project CA under the right host name, and cannot impersonate."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.edge.agent_helpers import SIM_SIGNALS, Collector, Forwarder, agent_thread, write_config
from tests.fixtures.fix_broker import PKIFixture

pytestmark = pytest.mark.security


def device_for(test_pki: Any, name: str) -> str:
    device = f"edge-{name}-{uuid.uuid4().hex[:6]}"
    test_pki.issue(device)
    return device


def test_hostname_verification_refuses_a_name_the_certificate_lacks(
    broker: Any, test_pki: Any, tmp_path: Path
) -> None:
    device = device_for(test_pki, "hostname")
    # 127.0.0.2 reaches the very same broker, but its certificate does not name that address.
    wrong = Forwarder("127.0.0.2", ("127.0.0.1", broker.port))
    right = Forwarder("127.0.0.1", ("127.0.0.1", broker.port))
    try:
        config = write_config(
            tmp_path / "edge.toml",
            server=broker,
            device=device,
            signals=SIM_SIGNALS,
            host="127.0.0.2",
            port=wrong.port,
        )
        with agent_thread(config) as agent:
            deadline = time.monotonic() + 4
            while wrong.accepted < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert wrong.accepted >= 2, "the agent did not retry"
            assert agent.publisher.stats.connects == 0
            assert "certificate" in agent.publisher.last_error
        ok = write_config(
            tmp_path / "edge-ok.toml",
            server=broker,
            device=device,
            signals=SIM_SIGNALS,
            host="127.0.0.1",
            port=right.port,
        )
        with agent_thread(ok) as agent:
            deadline = time.monotonic() + 10
            while not agent.publisher.connected and time.monotonic() < deadline:
                time.sleep(0.1)
            assert agent.publisher.connected, "control: the right name must connect"
    finally:
        wrong.close()
        right.close()


def test_a_broker_signed_by_another_ca_is_refused(
    broker: Any, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = PKIFixture(tmp_path_factory.mktemp("other-pki"))
    cert, key = other.issue("edge-stranger")
    config = write_config(
        tmp_path / "edge.toml", server=broker, device="edge-stranger", signals=SIM_SIGNALS
    )
    text = config.read_text()
    for old, new in (
        (str(broker.ca), str(other.ca)),
        (str(broker.pki.files("edge-stranger")[0]), str(cert)),
        (str(broker.pki.files("edge-stranger")[1]), str(key)),
    ):
        text = text.replace(old, new)
    config.write_text(text)
    with agent_thread(config) as agent:
        time.sleep(2)
        assert agent.publisher.stats.connects == 0
        assert "certificate" in agent.publisher.last_error


def test_a_device_cannot_publish_as_another_and_keeps_its_batches(
    broker: Any, test_pki: Any, mqtt_connect: Any, tmp_path: Path
) -> None:
    victim = device_for(test_pki, "victim")
    thief = device_for(test_pki, "thief")
    collector = Collector(victim)
    collector.attach(mqtt_connect, broker, f"svc-{victim}")
    # The thief's certificate, configured with the victim's device id.
    config = write_config(
        tmp_path / "edge.toml",
        server=broker,
        device=victim,
        signals=SIM_SIGNALS,
        cert_id=thief,
    )
    with agent_thread(config) as agent:
        time.sleep(4)
        stats = agent.outbox.stats()
        connects, refused = agent.publisher.stats.connects, agent.publisher.stats.refused
    assert not collector.of("/data") and not collector.of("/state")
    assert not collector.of("/health")
    # The broker answered "not authorized": nothing counts as delivered or leaves the outbox.
    assert connects >= 1 and refused >= 1
    assert stats.batches >= 2
