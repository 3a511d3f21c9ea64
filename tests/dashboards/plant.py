"""A small simulated plant written through the real ingest path, with its ground truth.

Batches are built with millrace.wire and stored by cloud.ingest.writer.BatchWriter,
alerts are raised by cloud.alerts.engine.AlertEngine, state and heartbeats go
through cloud.registry: the rows and rollups are exactly what production
writes. `Truth` keeps what the dashboard's queries must report.
"""

from __future__ import annotations

import math
import random
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from millrace.cloud import registry
from millrace.cloud.alerts.engine import AlertEngine
from millrace.cloud.alerts.rules import AlertRule, add_rule
from millrace.cloud.ingest import rollup_drain
from millrace.cloud.ingest.messages import DeadLetter, Incoming
from millrace.cloud.ingest.writer import BatchWriter, write_dead_letters
from millrace.wire import Batch, DeviceState, Event, Heartbeat, Window

WINDOW_S = 10
SLOW_WINDOW_S = 60
BATCH_S = 60  # one batch per device per minute of windows
READINGS_PER_WINDOW = 10
UNITS = {"temperature": "°C", "pressure": "bar", "power": "kW"}
# One device's birth gives temperature another unit: units are kept per device.
KELVIN_DEVICE = "oven-02"
DEVICES = ("oven-02", "press-01", "pump-03")
OFFLINE_DEVICE = "pump-03"
HOT_DEVICE = "press-01"  # its temperature crosses the alert threshold in the last hour
UNSYNCED_DEVICE = "oven-02"
GAP_DEVICE = "oven-02"
GAP_SEQS = (40, 41, 42)  # never delivered
LATE_DEVICE = "press-01"
LATE_DELAY_S = 240.0
TEMPERATURE_LIMIT = 80.0
DASH_LOGIN_ROLE = "dash_test"


@dataclass
class Truth:
    """What the database must hold, computed from the generated windows."""

    start: datetime
    end: datetime
    windows: dict[tuple[str, str], list[Window]] = field(default_factory=dict)
    batches: Counter[str] = field(default_factory=Counter)
    late_batches: Counter[str] = field(default_factory=Counter)
    unsynced_batches: Counter[str] = field(default_factory=Counter)
    received: list[tuple[datetime, int]] = field(default_factory=list)  # (received_at, windows)
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    missing_batches: int = 0
    boot_ids: dict[str, str] = field(default_factory=dict)

    def aggregate(
        self, device: str, metric: str, start: datetime, end: datetime, period_s: int
    ) -> dict[str, float]:
        """count, mean, min, max of the windows of one series starting in [start, end)."""
        lo, hi = start.timestamp() * 1000, end.timestamp() * 1000
        chosen = [
            w
            for w in self.windows[(device, metric)]
            if lo <= w.start_ms < hi and w.period_s == period_s
        ]
        count = sum(w.count for w in chosen)
        return {
            "windows": len(chosen),
            "count": count,
            "mean": sum(w.sum for w in chosen) / count if count else math.nan,
            "min": min((w.min for w in chosen), default=math.nan),
            "max": max((w.max for w in chosen), default=math.nan),
        }


def _signal(metric: str, device: str, t: float, rng: random.Random, *, hot: bool) -> float:
    phase = DEVICES.index(device)
    if metric == "temperature":
        base = 62 + 6 * math.sin(t / 1800 + phase) + (25 if hot else 0)
        return base + rng.gauss(0, 0.6)
    if metric == "pressure":
        return 4.2 + 0.3 * math.sin(t / 600 + phase) + rng.gauss(0, 0.05)
    return 12 + 3 * math.sin(t / 3600 + phase) + rng.gauss(0, 0.4)


def _window(
    metric: str, device: str, start_s: int, period_s: int, rng: random.Random, *, hot: bool
) -> Window:
    n = READINGS_PER_WINDOW
    values = [
        round(_signal(metric, device, start_s + i * period_s / n, rng, hot=hot), 6)
        for i in range(n)
    ]
    # About one window in 40 had a reading the agent refused (out of range).
    rejected = 1 if rng.random() < 0.025 else 0
    return Window(
        metric=metric,
        start_ms=start_s * 1000,
        period_s=period_s,
        count=n,
        sum=math.fsum(values),
        min=min(values),
        max=max(values),
        first=values[0],
        last=values[-1],
        sumsq=math.fsum(v * v for v in values),
        rejected=rejected,
    )


def _batches(device: str, truth: Truth, rng: random.Random) -> list[tuple[Batch, datetime]]:
    boot_id = uuid.UUID(int=rng.getrandbits(128)).hex
    truth.boot_ids[device] = boot_id
    start_s = int(truth.start.timestamp())
    end_s = int(truth.end.timestamp())
    out: list[tuple[Batch, datetime]] = []
    rejected_total = 0
    state = "idle"
    for seq, batch_start in enumerate(range(start_s, end_s, BATCH_S)):
        windows: list[Window] = []
        # Hot for 20 minutes an hour ago (raised, then cleared), and again for the last 10
        # minutes (still active).
        hot = device == HOT_DEVICE and (
            end_s - 3600 <= batch_start < end_s - 2400 or batch_start >= end_s - 600
        )
        for metric in ("temperature", "pressure"):
            for w_start in range(batch_start, batch_start + BATCH_S, WINDOW_S):
                windows.append(_window(metric, device, w_start, WINDOW_S, rng, hot=hot))
        windows.append(_window("power", device, batch_start, SLOW_WINDOW_S, rng, hot=False))
        events: list[Event] = []
        if seq % 20 == 0:
            state = "running" if state == "idle" else "idle"
            events.append(Event("state", (batch_start + 5) * 1000, state))
        if seq % 45 == 7:
            events.append(Event("door_open", (batch_start + 30) * 1000, True))
        sent_s = batch_start + BATCH_S + 1
        late = device == LATE_DEVICE and seq % 30 == 29 and sent_s + LATE_DELAY_S <= end_s
        delay = LATE_DELAY_S if late else 0.3
        received_at = datetime.fromtimestamp(sent_s + delay, tz=UTC)
        rejected_total += sum(w.rejected for w in windows)
        batch = Batch(
            device=device,
            boot_id=boot_id,
            seq=seq,
            sent_at_ms=sent_s * 1000,
            windows=tuple(windows),
            events=tuple(events),
            clock_synced=device != UNSYNCED_DEVICE,
            rejected=rejected_total,
        )
        if device == GAP_DEVICE and seq in GAP_SEQS:
            truth.missing_batches += 1
            continue
        out.append((batch, received_at))
        truth.batches[device] += 1
        truth.received.append((received_at, len(windows)))
        if delay > 60:
            truth.late_batches[device] += 1
        if not batch.clock_synced:
            truth.unsynced_batches[device] += 1
        truth.events[device] += len(events)
        for w in windows:
            truth.windows.setdefault((device, w.metric), []).append(w)
            truth.rejected[(device, w.metric)] += w.rejected
    return out


def fill_plant(
    dsn: str, *, hours: float = 3.0, now: datetime | None = None, seed: int = 7
) -> Truth:
    """Write `hours` of data for three devices ending at `now`; returns the ground truth."""
    end = (now or datetime.now(UTC)).replace(microsecond=0)
    end = end - timedelta(seconds=end.second % BATCH_S)
    truth = Truth(start=end - timedelta(hours=hours), end=end)
    rng = random.Random(seed)
    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            add_rule(
                conn,
                AlertRule(
                    name="temperature high",
                    metric="temperature",
                    condition="above",
                    high=TEMPERATURE_LIMIT,
                    severity="critical",
                    hysteresis=2.0,
                    description="Process temperature above its limit",
                ),
            )
            add_rule(
                conn,
                AlertRule(
                    name="pressure low",
                    metric="pressure",
                    condition="below",
                    low=3.0,
                    severity="warning",
                ),
            )
        engine = AlertEngine.load(conn, reload_after_s=None)
        writer = BatchWriter()
        for device in DEVICES:
            at = truth.start - timedelta(seconds=5)
            with conn.transaction():
                units = {**UNITS, "temperature": "K"} if device == KELVIN_DEVICE else UNITS
                registry.apply_state(
                    conn,
                    DeviceState(
                        device, "online", int(at.timestamp() * 1000), "", "0.1.0", "cfg1", units
                    ),
                    received_at=at,
                )
            batches = _batches(device, truth, rng)
            for i in range(0, len(batches), 40):
                chunk = batches[i : i + 40]
                writer.prepare(conn, [b for b, _ in chunk])
                with conn.transaction():
                    result = writer.write(conn, [Incoming(b, r) for b, r in chunk])
                    engine.evaluate(conn, result.windows)
            _heartbeats(conn, device, truth, rng)
        with conn.transaction():
            registry.apply_state(
                conn,
                DeviceState(OFFLINE_DEVICE, "offline", int(end.timestamp() * 1000)),
                received_at=end,
            )
        _dead_letters(conn, truth)
        rollup_drain.drain_all(conn)  # the worker's drain merges the partials within a second
    return truth


def _heartbeats(
    conn: psycopg.Connection[Any], device: str, truth: Truth, rng: random.Random
) -> None:
    t = truth.start
    backlog = 0
    while t <= truth.end:
        if device == OFFLINE_DEVICE:
            backlog = min(backlog + rng.randint(0, 3), 400)
        skew_ms = 4200 if device == UNSYNCED_DEVICE else 15
        hb = Heartbeat(
            device=device,
            boot_id=truth.boot_ids[device],
            ts_ms=int(t.timestamp() * 1000) + skew_ms,
            outbox_batches=backlog,
            outbox_bytes=backlog * 900,
            outbox_oldest_age_s=float(backlog * 60),
            dropped_batches=2 if device == OFFLINE_DEVICE else 0,
            rejected_readings=sum(v for (d, _), v in truth.rejected.items() if d == device),
            cpu_percent=3.5,
            rss_bytes=42_000_000,
            disk_free_bytes=8_000_000_000,
            cert_days_left=21.0 if device == HOT_DEVICE else 340.0,
            clock_synced=device != UNSYNCED_DEVICE,
            agent_version="0.1.0",
        )
        with conn.transaction():
            registry.apply_heartbeat(conn, hb, received_at=t)
        t += timedelta(minutes=5)


def _dead_letters(conn: psycopg.Connection[Any], truth: Truth) -> None:
    at = truth.end - timedelta(minutes=20)
    letters = [
        DeadLetter(
            topic="millrace/v1/d/press-01/data",
            device="press-01",
            code="invalid",
            reason="window 'temperature'.start_ms: not aligned to a multiple of the period",
            content_type="application/json",
            payload=b'{"v":1,"d":"press-01","w":[["temperature",1234,10]]}',
            received_at=at,
        ),
        DeadLetter(
            topic="millrace/v1/d/oven-02/data",
            device="oven-02",
            code="invalid",
            reason="sent_at_ms: 1 is outside [946684800000, 4102444800000]",
            content_type="application/json",
            payload=b'{"v":1,"d":"oven-02","t":1}',
            received_at=at + timedelta(minutes=3),
        ),
        DeadLetter(
            topic="millrace/v1/d/pump-03/data",
            device="pump-03",
            code="undecodable",
            reason="cannot decode payload: ExtraData",
            content_type="application/msgpack",
            payload=bytes(range(0, 48)),
            received_at=at + timedelta(minutes=7),
        ),
    ]
    with conn.transaction(), conn.cursor() as cur:
        write_dead_letters(cur, letters)
    truth.dead_letters.update(d.code for d in letters)


def dashboard_dsn(superuser_dsn: str) -> str:
    """A login for the dashboard's least-privilege role (trust auth in tests)."""
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DASH_LOGIN_ROLE,))
        if exists.fetchone() is None:
            conn.execute(f"CREATE ROLE {DASH_LOGIN_ROLE} LOGIN IN ROLE millrace_dashboard")
    return superuser_dsn.replace("postgres@", f"{DASH_LOGIN_ROLE}@", 1)


def per_minute_windows(truth: Truth) -> dict[datetime, int]:
    """Windows per minute of receive time (what the ingest timeline must show)."""
    out: dict[datetime, int] = defaultdict(int)
    for received_at, n in truth.received:
        out[received_at.replace(second=0, microsecond=0)] += n
    return dict(out)
