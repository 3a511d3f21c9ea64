"""Loss is visible: an agent that ends uncleanly (SIGKILL, power cut, watchdog) leaves a
recorded hole.

Real parts: a `millrace edge run` subprocess SIGKILLed mid-window, the project's TLS
broker, an ingest worker and TimescaleDB. The next run's birth names the ended run and
the end of its last closed window per metric; the worker records one `data_holes` row
per metric. A clean stop (SIGTERM) records none; a hostile hole is dead-lettered.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from millrace import topics
from tests.cloud.ingest_support import (
    IngestDb,
    Publisher,
    ingest_db,
    make_config,
    publishers,
    query,
    running_worker,
    scalar,
    wait_for,
)
from tests.edge.agent_helpers import SIM_SIGNALS, AgentProcess, write_config

__all__ = ["ingest_db", "publishers"]  # fixtures used by name below

DEVICE = "hole-gw"
PERIOD_S = 1
METRIC = "sim.temp"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _ms(at: datetime) -> int:
    return round(at.timestamp() * 1000)


def _boot_of_db(dsn: str) -> str | None:
    rows = query(dsn, "SELECT boot_id FROM devices WHERE name = %s", (DEVICE,))
    return None if not rows or rows[0][0] is None else str(rows[0][0])


def _windows_of(dsn: str) -> int:
    return int(
        scalar(
            dsn,
            "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id"
            " WHERE d.name = %s",
            (DEVICE,),
        )
    )


def _outbox_run(outbox: Path) -> tuple[str, dict[str, int]]:
    """What the killed agent had durably recorded: its boot id and closed window ends."""
    with sqlite3.connect(outbox) as db:
        (boot,) = db.execute("SELECT boot_id FROM run").fetchone()
        closed = dict(db.execute("SELECT metric, end_ms FROM closed").fetchall())
    return str(boot), closed


def _start_and_wait(agent: AgentProcess, dsn: str, *, not_boot: str | None) -> str:
    """Start the agent; return its boot id once its birth and some windows are stored."""
    agent.start()
    wait_for(
        lambda: (_boot_of_db(dsn) or not_boot) != not_boot,
        what="the new run's birth",
    )
    boot = _boot_of_db(dsn)
    assert boot is not None
    stored = _windows_of(dsn)
    wait_for(lambda: _windows_of(dsn) >= stored + 2, what="windows of the new run")
    return boot


def _setup(
    broker_factory: Callable[..., Any], ingest_db: IngestDb, tmp_path: Path
) -> tuple[Any, AgentProcess, Path]:
    server = broker_factory()
    server.pki.issue(DEVICE)
    config = make_config(
        tmp_path,
        server=server,
        dsn=ingest_db.ingest_dsn,
        client_id="w-holes",
        group=f"holes-{uuid.uuid4().hex[:6]}",
    )
    (tmp_path / "gw").mkdir()
    agent_config = write_config(
        tmp_path / "gw" / "agent.toml",
        server=server,
        device=DEVICE,
        signals=SIM_SIGNALS,
        period_s=PERIOD_S,
    )
    return config, AgentProcess(agent_config), tmp_path / "gw" / "outbox.sqlite"


def test_loss_is_visible_sigkill_mid_window_records_the_hole(
    broker_factory: Callable[..., Any], ingest_db: IngestDb, tmp_path: Path
) -> None:
    config, agent, outbox = _setup(broker_factory, ingest_db, tmp_path)
    dsn = ingest_db.owner_dsn
    with running_worker(config):
        try:
            first = _start_and_wait(agent, dsn, not_boot=None)
            # Mid-window: half a period after a boundary, so a window is open and lost.
            time.sleep(PERIOD_S - (time.time() % PERIOD_S) + PERIOD_S / 2)
            agent.kill9()
            killed_ms = _now_ms()
            prev_boot, closed = _outbox_run(outbox)
            assert prev_boot == first
            assert set(closed) == {METRIC}
            before_ms = _now_ms()
            second = _start_and_wait(agent, dsn, not_boot=first)
            wait_for(lambda: scalar(dsn, "SELECT count(*) FROM data_holes") == 1, what="the hole")
        finally:
            agent.stop()
    rows = query(
        dsn,
        "SELECT d.name, h.prev_boot_id, h.boot_id, h.metric, h.from_ts, h.to_ts, h.cause,"
        " h.metrics_omitted FROM data_holes h JOIN devices d ON d.id = h.device_id",
    )
    ((device, prev, boot, metric, from_ts, to_ts, cause, omitted),) = rows
    assert (device, prev.hex, boot.hex, metric, cause, omitted) == (
        DEVICE,
        first,
        second,
        METRIC,
        "unclean end",
        0,
    )
    # From: the end of the last window the killed run closed into its outbox (stored:
    # the outbox survived the kill and drained), which is before the kill.
    assert _ms(from_ts) == closed[METRIC] <= killed_ms
    last_stored = query(
        dsn,
        "SELECT max(r.ts) FROM readings r JOIN devices d ON d.id = r.device_id"
        " WHERE d.name = %s AND r.ts < %s",
        (DEVICE, from_ts),
    )[0][0]
    assert _ms(last_stored) + PERIOD_S * 1000 == closed[METRIC]
    # To: the start of the next run.
    assert before_ms <= _ms(to_ts) <= _now_ms()
    assert from_ts < to_ts
    print(
        f"hole {metric}: {from_ts.astimezone(UTC):%H:%M:%S.%f}"
        f" .. {to_ts.astimezone(UTC):%H:%M:%S.%f}"
        f" ({(to_ts - from_ts).total_seconds():.2f} s); killed {killed_ms - closed[METRIC]} ms"
        " after the last closed window end"
    )


def test_loss_is_visible_hung_agent_killed_by_the_watchdog_records_the_whole_hang(
    broker_factory: Callable[..., Any], ingest_db: IngestDb, tmp_path: Path
) -> None:
    """A hang (SIGSTOP) of several windows, ended as systemd ends it (SIGABRT, then SIGKILL):
    the hole runs from before the hang to the restart."""
    config, agent, outbox = _setup(broker_factory, ingest_db, tmp_path)
    dsn = ingest_db.owner_dsn
    hung_periods = 4
    with running_worker(config):
        try:
            first = _start_and_wait(agent, dsn, not_boot=None)
            agent.signal(signal.SIGSTOP)
            hung_ms = _now_ms()
            time.sleep(hung_periods * PERIOD_S)
            agent.signal(signal.SIGABRT)  # the watchdog's signal: pending while stopped
            agent.kill9()
            _prev, closed = _outbox_run(outbox)
            second = _start_and_wait(agent, dsn, not_boot=first)
            wait_for(lambda: scalar(dsn, "SELECT count(*) FROM data_holes") == 1, what="the hole")
        finally:
            agent.stop()
    ((prev, boot, from_ts, to_ts),) = query(
        dsn, "SELECT prev_boot_id, boot_id, from_ts, to_ts FROM data_holes"
    )
    assert (prev.hex, boot.hex) == (first, second)
    assert _ms(from_ts) == closed[METRIC] <= hung_ms
    # Every window of the hang is inside the hole: nothing of them was stored.
    assert (to_ts - from_ts).total_seconds() >= hung_periods * PERIOD_S
    inside = scalar(
        dsn,
        "SELECT count(*) FROM readings WHERE ts >= %s AND ts + make_interval(secs => %s) <= %s",
        (from_ts, PERIOD_S, to_ts),
    )
    assert inside == 0


def test_loss_is_visible_clean_stop_records_no_hole(
    broker_factory: Callable[..., Any], ingest_db: IngestDb, tmp_path: Path
) -> None:
    config, agent, _outbox = _setup(broker_factory, ingest_db, tmp_path)
    dsn = ingest_db.owner_dsn
    with running_worker(config):
        try:
            first = _start_and_wait(agent, dsn, not_boot=None)
            agent.stop()  # SIGTERM: open windows are closed into the outbox, marked clean
            _start_and_wait(agent, dsn, not_boot=first)
            agent.stop()
            second = _start_and_wait(agent, dsn, not_boot=_boot_of_db(dsn))
            assert second != first
        finally:
            agent.stop()
    assert "ended uncleanly" not in agent.log()
    assert scalar(dsn, "SELECT count(*) FROM data_holes") == 0


def test_loss_is_visible_hostile_hole_is_dead_lettered(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    server = broker_factory()
    config = make_config(
        tmp_path,
        server=server,
        dsn=ingest_db.ingest_dsn,
        client_id="w-hostile",
        group=f"holes-{uuid.uuid4().hex[:6]}",
    )
    now = _now_ms()
    birth = {
        "device": "hostile-gw",
        "status": "online",
        "ts_ms": now,
        "boot_id": "ab" * 16,
        "prev_boot_id": "cd" * 16,
        "started_ms": now,
    }
    too_many = {**birth, "prev_closed_ms": {f"m{i}": now - 1000 for i in range(257)}}
    backwards = {**birth, "prev_closed_ms": {"t": now + 3_600_000}}
    good = {**birth, "prev_closed_ms": {"t": now - 5000}}
    with running_worker(config):
        pub = publishers(server, "hostile-gw")
        for payload in (too_many, backwards, good, good):
            pub.publish_raw(json.dumps(payload).encode(), topic=topics.state_topic("hostile-gw"))
        wait_for(
            lambda: scalar(ingest_db.owner_dsn, "SELECT count(*) FROM dead_letters") == 2,
            what="two dead letters",
        )
        wait_for(
            lambda: scalar(ingest_db.owner_dsn, "SELECT count(*) FROM data_holes") == 1,
            what="the good hole",
        )
    reasons = sorted(
        r for (r,) in query(ingest_db.owner_dsn, "SELECT reason FROM dead_letters ORDER BY 1")
    )
    assert "more than 256 metrics" in reasons[0] or "more than 256 metrics" in reasons[1]
    assert any("prev_closed_ms['t']" in r and "outside" in r for r in reasons)
    # The good birth sent twice is one hole.
    assert query(ingest_db.owner_dsn, "SELECT metric, to_ts - from_ts FROM data_holes")[0][0] == "t"


def test_loss_is_visible_hole_rows_per_device_are_capped(ingest_db: IngestDb) -> None:
    """A device inventing unclean ends cannot grow data_holes without bound."""
    from millrace.cloud import registry
    from millrace.wire import DeviceState

    now = _now_ms()
    metrics = {f"m{i:03d}": now - 1000 for i in range(256)}
    with psycopg.connect(ingest_db.ingest_dsn) as conn:
        for run in range(registry.MAX_HOLE_ROWS_PER_DEVICE_DAY // 256 + 3):
            birth = DeviceState(
                "noisy-gw",
                "online",
                now,
                f"{run + 1:032x}",
                prev_boot_id=f"{run + 1000:032x}",
                prev_closed_ms=metrics,
                started_ms=now,
            )
            with conn.transaction():
                registry.apply_state(conn, birth, received_at=datetime.now(UTC))
    rows = scalar(ingest_db.owner_dsn, "SELECT count(*) FROM data_holes")
    assert rows == registry.MAX_HOLE_ROWS_PER_DEVICE_DAY
