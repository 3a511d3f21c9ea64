"""Several brokers at the edge: which one a gateway prefers, when it moves, what config says.

The moves themselves, under load through real brokers into a real worker and
database, are proven in tests/cloud/test_broker_failover.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from millrace.edge.brokers import BrokerChoice, preferred_index
from millrace.edge.config import load_config
from millrace.errors import ConfigError

A, B, C = ("a.plant.example", 8883), ("b.plant.example", 8883), ("c.plant.example", 8884)


def test_preferred_broker_is_stable_per_device_and_spreads_a_fleet_evenly() -> None:
    fleet = [f"gw{i:04d}" for i in range(1000)]
    counts = [0, 0]
    for device in fleet:
        counts[preferred_index(device, 2, spread=True)] += 1
    assert min(counts) > 400, counts  # about half each, not all on the first broker
    assert [preferred_index(d, 2, spread=True) for d in fleet[:50]] == [
        preferred_index(d, 2, spread=True) for d in fleet[:50]
    ]
    assert {preferred_index(d, 2, spread=False) for d in fleet} == {0}
    assert {preferred_index(d, 1, spread=True) for d in fleet} == {0}


def test_a_lost_broker_moves_to_the_next_at_once_and_backs_off_only_when_all_failed() -> None:
    device = next(d for d in (f"gw{i}" for i in range(100)) if preferred_index(d, 3, spread=True))
    choice = BrokerChoice([A, B, C], device, spread=True)
    first = choice.current
    assert first == [A, B, C][preferred_index(device, 3, spread=True)] and not choice.away
    choice.connected()
    assert choice.failed() is False and choice.away  # lost: the next broker, no wait
    second = choice.current
    assert choice.failed() is False  # refused too: the third, still no wait
    assert choice.failed() is True  # every broker failed in a row: back off
    assert choice.current == first and {first, second} < {A, B, C}
    choice.failed()
    choice.connected()
    assert choice.away and choice.preferred == first
    choice.back_to_preferred()
    assert choice.current == first and not choice.away
    single = BrokerChoice([A], device, spread=True)
    assert single.failed() is True and single.current == A  # one broker: as before


def _config(tmp_path: Path, broker: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
device_id = "gw0001"
[broker]
{broker}
ca = "ca.pem"
cert = "c.pem"
key = "k.pem"
[outbox]
path = "outbox.sqlite"
[state]
dir = "state"
[[signals]]
metric = "sim.temp"
driver = "sim"
"""
    )
    return path


def test_edge_config_takes_several_broker_hosts_and_names_the_bad_key(tmp_path: Path) -> None:
    single = load_config(_config(tmp_path, 'host = "a.plant.example"')).broker
    assert single.endpoints == (A,) and single.spread and single.failback_s == 60.0
    several = load_config(
        _config(
            tmp_path,
            'hosts = ["a.plant.example:8883", "b.plant.example", "c.plant.example:8884"]\n'
            "spread = false\nfailback_s = 5",
        )
    ).broker
    assert several.endpoints == (A, B, C) and (several.host, several.port) == A
    assert several.spread is False and several.failback_s == 5.0
    for bad, key in (
        ('host = "a.plant.example"\nhosts = ["b.plant.example"]', "broker.host"),
        ("hosts = []", "broker.hosts"),
        ('hosts = ["a.plant.example:0"]', r"broker.hosts\[0\]"),
        ('hosts = ["a.plant.example", "a.plant.example:8883"]', r"broker.hosts\[1\]"),
        ('hosts = "a.plant.example"', "broker.hosts"),
        ('hosts = ["a.plant.example"]\nfailback_s = 0', "broker.failback_s"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(_config(tmp_path, bad))
