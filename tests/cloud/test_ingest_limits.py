"""Per-device bounds at ingest: the id cache, dead letters (issue "The guarantee must not
end at the broker", item 4)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from millrace.cloud.config import parse_config
from millrace.cloud.ingest.idcache import IdCache
from millrace.cloud.ingest.letterlimit import DeadLetterLimiter
from millrace.cloud.ingest.limits import IngestLimits
from millrace.cloud.ingest.messages import DeadLetter, Incoming, WriteResult
from millrace.cloud.ingest.worker import Worker
from millrace.cloud.ingest.writer import BatchWriter
from millrace.errors import ConfigError
from millrace.wire import CONTENT_TYPE_MSGPACK, Batch, Window, decode_batch
from tests.cloud.ingest_support import IngestDb, ingest_db, query  # noqa: F401  (fixture)


@pytest.mark.integration
def test_the_id_cache_stays_within_its_bound_and_keeps_ids_exact(
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    cache = IdCache(limit=3)
    seen: dict[str, int] = {}
    with psycopg.connect(ingest_db.ingest_dsn) as conn:
        for i in range(0, 20, 2):
            names = {f"m{i}", f"m{i + 1}"}
            cache.ensure(conn, {"press-1"}, names | {"hot"})  # "hot" is in every batch
            assert len(cache.metrics) <= 3
            assert names | {"hot"} <= cache.metrics.keys()  # the batch in hand is all there
            for name in names | {"hot"}:
                assert seen.setdefault(name, cache.metrics[name]) == cache.metrics[name]
        assert cache.metrics.evicted == 18
        cache.ensure(conn, {"press-1"}, {"m0"})  # evicted long ago: looked up again, same id
        assert cache.metrics["m0"] == seen["m0"] and len(cache.metrics) == 3
        ids: dict[str, Any] = dict(conn.execute("SELECT name, id FROM metrics").fetchall())
    assert {name: ids[name] for name in seen} == seen


START_MS = 1_764_000_000_000  # aligned to 10 s
NOW = datetime(2025, 11, 24, 16, 0, tzinfo=UTC)


def _window(metric: str) -> Window:
    return Window(metric, START_MS, 10, 1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)


def _batch(device: str, seq: int, *metrics: str) -> Incoming:
    batch = Batch(device, "a" * 32, seq, START_MS + 10_000, windows=tuple(map(_window, metrics)))
    return Incoming(batch, NOW)


def _write(dsn: str, writer: BatchWriter, *items: Incoming) -> WriteResult:
    with psycopg.connect(dsn) as conn:
        writer.prepare(conn, [i.batch for i in items])
        with conn.transaction():
            return writer.write(conn, list(items))


@pytest.mark.integration
def test_metrics_over_a_devices_cap_are_dead_lettered_and_the_rest_stored(
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    writer = BatchWriter(IngestLimits(max_metrics_per_device=2))
    result = _write(ingest_db.ingest_dsn, writer, _batch("press-1", 1, "a", "b"))
    assert result.metrics_refused == 0
    # A third metric is over press-1's cap; another device has its own room.
    result = _write(
        ingest_db.ingest_dsn,
        writer,
        _batch("press-1", 2, "a", "c", "d"),
        _batch("press-2", 1, "c", "d"),
    )
    assert result.metrics_refused == 1 and result.readings == 3
    stored = query(
        ingest_db.owner_dsn,
        "SELECT d.name, m.name FROM readings r JOIN devices d ON d.id = r.device_id"
        " JOIN metrics m ON m.id = r.metric_id ORDER BY 1, 2",
    )
    # press-1's "a" of seq 2 merged into seq 1's window (same window key).
    assert stored == [("press-1", "a"), ("press-1", "b"), ("press-2", "c"), ("press-2", "d")]
    letters = query(ingest_db.owner_dsn, "SELECT device, code, reason, payload FROM dead_letters")
    assert len(letters) == 1
    device, code, reason, payload = letters[0]
    assert (device, code) == ("press-1", "too_many_metrics")
    assert "'c'" in reason and "'d'" in reason and "'a'" not in reason
    refused = decode_batch(bytes(payload), content_type=CONTENT_TYPE_MSGPACK)
    assert isinstance(refused, Batch) and [w.metric for w in refused.windows] == ["c", "d"]
    # A redelivered batch is a duplicate: no second letter. A fresh worker decides alike.
    _write(
        ingest_db.ingest_dsn,
        BatchWriter(IngestLimits(max_metrics_per_device=2)),
        _batch("press-1", 2, "c"),
    )
    assert len(query(ingest_db.owner_dsn, "SELECT 1 FROM dead_letters")) == 1
    _write(
        ingest_db.ingest_dsn,
        BatchWriter(IngestLimits(max_metrics_per_device=2)),
        _batch("press-1", 3, "c"),
    )
    assert len(query(ingest_db.owner_dsn, "SELECT 1 FROM dead_letters")) == 2


def _letter(device: str | None) -> DeadLetter:
    return DeadLetter("millrace/v1/d/x/data", device, "invalid", "bad", None, b"x" * 10, NOW)


def test_dead_letters_are_rate_limited_per_device() -> None:
    clock = [0.0]
    limiter = DeadLetterLimiter(per_minute=60, burst=3, clock=lambda: clock[0])
    kept, over = limiter.admit([_letter("dev-a")] * 5 + [_letter("dev-b"), _letter(None)])
    assert [d.device for d in kept] == ["dev-a"] * 3 + ["dev-b", None]
    assert over == {"dev-a": 2}
    clock[0] = 1.0  # one letter a second comes back
    kept, over = limiter.admit([_letter("dev-a")] * 2)
    assert len(kept) == 1 and over == {"dev-a": 1} and limiter.suppressed_total == 3


@pytest.mark.integration
def test_dead_letters_over_the_rate_are_counted_per_device_not_stored(
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    writer = BatchWriter(letters=DeadLetterLimiter(per_minute=1, burst=2))
    with psycopg.connect(ingest_db.ingest_dsn) as conn:
        for _ in range(2):
            with conn.transaction(), conn.cursor() as cur:
                writer.write_dead_letters(cur, [_letter("dev-a")] * 4 + [_letter("dev-b")])
    assert query(
        ingest_db.owner_dsn, "SELECT device, count(*) FROM dead_letters GROUP BY 1 ORDER BY 1"
    ) == [
        ("dev-a", 2),
        ("dev-b", 2),
    ]
    assert query(ingest_db.owner_dsn, "SELECT device, suppressed FROM dead_letter_overflow") == [
        ("dev-a", 6)
    ]


def _config(tmp_path: Path, limits: dict[str, object]) -> dict[str, object]:
    for name in ("ca.crt", "w.crt", "w.key"):
        (tmp_path / name).write_text("x")
    broker = {"host": "b", "ca": "ca.crt", "cert": "w.crt", "key": "w.key", "client_id": "w-1"}
    return {"database": {"dsn": "postgresql://i@db/m"}, "broker": broker, "limits": limits}


def test_limits_come_from_the_config_and_reach_the_worker(tmp_path: Path) -> None:
    assert parse_config(_config(tmp_path, {}), base=tmp_path).limits == IngestLimits()
    config = parse_config(
        _config(
            tmp_path,
            {
                "max_gaps_per_stream": 10,
                "max_metrics_per_device": 20,
                "id_cache_names": 5000,
                "dead_letters_per_minute": 6,
                "dead_letter_burst": 7,
            },
        ),
        base=tmp_path,
    )
    assert config.limits == IngestLimits(10, 20, 5000, 6.0, 7)
    worker = Worker(config)
    writer = worker._store.writer
    assert (writer.max_gaps, writer.cap.limit, writer.ids.metrics.limit) == (10, 20, 5000)
    assert (writer.letters.burst, writer.letters.rate_per_s) == (7, 0.1)
    writer.letters.admit([_letter("dev-a")] * 9)  # 7 pass, 2 over: the worker counts them
    suppressed = "millrace_ingest_dead_letters_suppressed_total"
    assert worker.metrics.registry.get_sample_value(suppressed) == 2
    for key, bad in (("max_metrics_per_device", 0), ("dead_letters_per_minute", 0), ("x", 1)):
        with pytest.raises(ConfigError, match=rf"limits\.{key}"):
            parse_config(_config(tmp_path, {key: bad}), base=tmp_path)
