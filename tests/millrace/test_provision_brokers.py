"""`millrace provision` writes every broker of a plant with several into agent.toml."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from millrace.edge.config import parse_config
from millrace.errors import ConfigError
from millrace.ops import broker_live, pki, provision
from millrace.ops.provision_cli import _brokers, register


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["provision", *argv])


def _agent_config(host: str | None, port: int, hosts: list[tuple[str, int]]) -> str:
    context = provision.agent_config_context(
        "gw-1", broker_host=host or "unused.example", broker_port=port, broker_hosts=hosts
    )
    return provision.render_agent_config(None, context)


def test_repeated_broker_flags_become_the_agents_broker_hosts(tmp_path: Path) -> None:
    brokers = ["--broker", "a.example:8883", "--broker", "b.example:8884"]
    args = _parse(["gw-1", "--pki", str(tmp_path), "--out", "b.tar.gz", *brokers])
    host, port, hosts = _brokers(args.broker, args.pki)
    assert hosts == [("a.example", 8883), ("b.example", 8884)]
    config = parse_config(_agent_config(host, port, hosts), base=tmp_path, source="agent.toml")
    assert config.broker.endpoints == (("a.example", 8883), ("b.example", 8884))


def test_without_broker_flags_the_recorded_brokers_of_the_plant_are_used(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    pki.init_pki(pki_dir, hosts=["mqtt.plant.example"])
    # One recorded broker: the old default (the name on the broker certificate, 8883).
    broker_live.remember(pki_dir, broker_live.BrokerTarget("a.example", 18883, "operator"))
    assert _brokers([], pki_dir) == (None, 8883, [])
    # Several (`up --ha`, `broker sync --remember`): every one of them, in recorded order.
    broker_live.remember(
        pki_dir,
        broker_live.BrokerTarget("a.example", 18883, "operator"),
        broker_live.BrokerTarget("b.example", 18884, "operator"),
    )
    host, port, hosts = _brokers([], pki_dir)
    text = _agent_config(host, port, hosts)
    assert 'hosts = ["a.example:18883", "b.example:18884"]' in text
    assert "\nhost = " not in text and "\nport = " not in text
    # One explicit --broker still wins over the record.
    assert _brokers(["c.example"], pki_dir) == ("c.example", 8883, [])


def test_a_bad_broker_among_several_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--broker"):
        _brokers(["a.example", "b.example:0"], tmp_path)
