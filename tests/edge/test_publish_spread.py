"""The per-device send offset: a fleet closing windows on one edge does not publish at once."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from millrace.edge.agent import Agent
from millrace.edge.config import load_config, parse_config
from millrace.edge.pacing import publish_offset_s
from millrace.errors import ConfigError
from tests.edge.agent_helpers import SIM_SIGNALS, Collector, write_config


def test_offsets_of_a_thousand_ids_fill_the_range_evenly_and_stay_put() -> None:
    ids = [f"gw-{n:05d}" for n in range(1, 1001)]
    offsets = [publish_offset_s(i, 5.0) for i in ids]
    assert all(0.0 <= o < 5.0 for o in offsets)
    tenths = Counter(int(o / 0.5) for o in offsets)
    assert sorted(tenths) == list(range(10))
    assert min(tenths.values()) >= 70 and max(tenths.values()) <= 130, tenths  # 100 expected
    assert offsets == [publish_offset_s(i, 5.0) for i in ids], "stable across calls"
    assert publish_offset_s("gw-00001", 2.5) == pytest.approx(offsets[0] / 2)
    assert publish_offset_s("gw-00001", 0.0) == 0.0, "0 disables"


_CONFIG = """
device_id = "press-01"
[broker]
host = "broker.plant.example"
ca = "ca.crt"
cert = "d.crt"
key = "d.key"
[windows]
period_s = {period}
{extra}
[outbox]
path = "outbox.sqlite"
[state]
dir = "state"
[[signals]]
metric = "t"
driver = "sim"
"""


def _windows(period: int, extra: str = "") -> Any:
    text = _CONFIG.format(period=period, extra=extra)
    return parse_config(text, base=Path("/nonexistent"), source="agent.toml").windows


def test_spread_is_off_by_default_and_a_bad_one_names_its_key() -> None:
    # Off unless asked for: the design's close->commit p99 <= 1 s has no room for it.
    assert _windows(10).spread_s == 0.0
    assert _windows(10, "extra_periods_s = [60]").spread_s == 0.0
    assert _windows(10, "extra_periods_s = [60]\npublish_spread_s = 5").spread_s == 5.0
    assert _windows(10, "publish_spread_s = 0").spread_s == 0.0
    assert _windows(10, "publish_spread_s = 7.5").spread_s == 7.5
    for bad, problem in (("10", "shorter than the shortest period"), ("-1", "-1")):
        with pytest.raises(ConfigError, match=problem) as info:
            _windows(10, f"publish_spread_s = {bad}")
        assert "publish_spread_s" in str(info.value)


SPREAD_S = 3.0


def _late_device(prefix: str) -> str:
    """A device id whose offset is in the second half of the spread (a clear wait)."""
    return next(
        f"{prefix}-{n}"
        for n in range(1000)
        if publish_offset_s(f"{prefix}-{n}", SPREAD_S) >= SPREAD_S / 2
    )


@pytest.mark.integration
def test_the_batch_is_in_the_outbox_at_close_and_sent_only_after_the_offset(
    broker: Any, test_pki: Any, mqtt_connect: Any, tmp_path: Path
) -> None:
    device = _late_device("edge-spread")
    test_pki.issue(device)
    offset = publish_offset_s(device, SPREAD_S)
    collector = Collector(device, receipts=False)  # unreceipted: the outbox keeps the batch
    collector.attach(mqtt_connect, broker, f"svc-{device}")
    path = write_config(
        tmp_path / "edge.toml", server=broker, device=device, signals=SIM_SIGNALS, period_s=10
    )
    path.write_text(
        path.read_text().replace("[outbox]", f"publish_spread_s = {SPREAD_S}\n[outbox]")
    )
    agent = Agent(load_config(path))
    try:
        agent.publisher.start()
        deadline = time.monotonic() + 30
        while not agent.publisher.connected:
            assert time.monotonic() < deadline, "no broker connection"
            time.sleep(0.05)
        start_ms = 1_700_000_000_000  # a 10 s window edge
        agent.pipeline.reading(0, start_ms + 1_000, 21.5)

        closed_at = time.monotonic()
        assert agent.flush_to_outbox(wall_ms=start_ms + 10_200) == 1
        assert agent.outbox.stats().batches == 1, "written to the outbox at close"

        collector.wait(lambda c: bool(c.of("/data")), 60, "the held batch")
        sent = collector.of("/data")[0]
        assert sent.at >= closed_at + offset, (sent.at - closed_at, offset)
        (batch,) = collector.batches()
        assert [w.start_ms for w in batch.windows] == [start_ms], "timestamps unchanged"
        assert batch.sent_at_ms == start_ms + 10_200
        assert agent.outbox.stats().batches == 1, "still held until a receipt"
    finally:
        agent.publisher.shutdown(timeout_s=2)
        agent.outbox.close()
        agent.release()
