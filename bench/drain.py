"""Backlog drain after a one-hour outage of 20 gateways: how many times faster than real time.

1. The outage: for each of 20 gateways, the edge library's own `Agent` (pipeline ->
   windows -> batches -> SQLite outbox, the code `millrace edge run` runs) is fed one
   hour of readings in simulated time: 20 signals at 1 Hz, 10 s windows, closed at
   window end + grace exactly as the running agent closes them. That leaves 360 batches
   of 20 windows in each gateway's outbox (7,200 batches, 144,000 windows in all), ending
   at the last 10 s boundary before now. Nothing is published: no broker is reachable.
2. The recovery: 20 `millrace edge run` processes start on those outboxes against the
   plant (TLS mosquitto, one `millrace ingest` worker, TimescaleDB with fsync on). The
   clock runs from their launch (process start included) until the last outage batch is
   committed (its commit timestamp, read from the server afterwards).
3. The check: the database holds exactly 20 x 20 x 360 windows for the outage hour, with
   the reading counts and sums that were fed, 360 ledger batches per gateway, no sequence
   gaps and no dead letters, and the outboxes hold none of the outage batches any more.

It runs twice, on fresh gateways: with the agent's defaults (the backlog is paced at
`backlog_batches_per_s` = 20 so live data never waits behind it: 360 batches take 18 s
at best), and with the pacing lifted (`backlog_batches_per_s` = 100000), which shows what
broker, worker and database can absorb. The first is the plant's figure.

Run: .venv/bin/python bench/drain.py [--gateways 20] [--signals 20] [--outage-s 3600]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from common import Plant, machine, plant, print_table, wait_until

TARGET_X_REALTIME = 50.0
PERIOD_S = 10
GRACE_S = 2.0
READINGS_PER_WINDOW = 10  # 1 Hz
DRAIN_TIMEOUT_S = 600.0
UNTHROTTLED_BATCHES_PER_S = 100_000


@dataclass(frozen=True, slots=True)
class Filled:
    """One gateway's outbox after the simulated outage."""

    device: str
    config: Path
    boot_id: str
    batches: int
    readings: int
    value_sum: float


def value(signal: int, window: int, k: int) -> float:
    """Deterministic readings; halves sum exactly in float64, so sums compare exactly."""
    return 20.0 + ((signal * 7 + window * 3 + k) % 13) * 0.5


def fill_outbox(device: str, config_path: Path, *, t0_ms: int, windows: int) -> Filled:
    """One hour of the real agent's windowing + outbox, in simulated time, no network."""
    from millrace.edge.agent import Agent
    from millrace.edge.config import load_config

    agent = Agent(load_config(config_path))
    signals = len(agent.config.signals)
    period_ms = PERIOD_S * 1000
    step_ms = period_ms // READINGS_PER_WINDOW
    reading = agent.pipeline.reading
    total = 0.0
    batches = 0
    for w in range(windows):
        start = t0_ms + w * period_ms
        for s in range(signals):
            for k in range(READINGS_PER_WINDOW):
                v = value(s, w, k)
                reading(s, start + k * step_ms, v)
                total += v
        batches += agent.flush_to_outbox(wall_ms=start + period_ms + int(GRACE_S * 1000))
    stats = agent.outbox.stats()
    agent.outbox.close()
    agent.release()  # the state directory's lock, for the agent process started next
    assert stats.batches == batches == windows, (device, stats, batches)
    return Filled(
        device, config_path, agent.boot_id, batches, windows * signals * READINGS_PER_WINDOW, total
    )


@dataclass(frozen=True, slots=True)
class Drained:
    label: str
    fill_s: float
    drain_s: float
    after_first_s: float
    batches: int
    windows: int
    readings: int
    ok: bool
    problems: tuple[str, ...]
    outage_s: float

    @property
    def x_realtime(self) -> float:
        return self.outage_s / self.drain_s


def run_phase(
    stack: Plant,
    devices: list[str],
    *,
    label: str,
    signals: int,
    outage_s: int,
    broker_options: str,
) -> Drained:
    windows = outage_s // PERIOD_S
    now_s = int(time.time())
    end_s = now_s - now_s % PERIOD_S - PERIOD_S
    t0_ms = (end_s - windows * PERIOD_S) * 1000
    configs = {
        d: stack.edge_config(
            d,
            signals=signals,
            poll_s=1.0,
            period_s=PERIOD_S,
            broker=broker_options,
            windows=f"grace_s = {GRACE_S}",
        )
        for d in devices
    }
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(devices)) as pool:
        filled = list(
            pool.map(lambda d: fill_outbox(d, configs[d], t0_ms=t0_ms, windows=windows), devices)
        )
    fill_s = time.monotonic() - began
    boots = [uuid.UUID(hex=f.boot_id) for f in filled]
    expected_batches = sum(f.batches for f in filled)

    def committed() -> int:
        return int(
            stack.query("SELECT count(*) FROM ingest_ledger WHERE boot_id = ANY(%s)", (boots,))[0][
                0
            ]
        )

    launched = time.time()
    agents = stack.start_agents((d, configs[d]) for d in devices)
    try:
        wait_until(
            lambda: stack.check_running(agents) and committed() >= expected_batches,
            timeout_s=DRAIN_TIMEOUT_S,
            what=f"{expected_batches} outage batches committed",
        )
    finally:
        stack.stop_agents(agents)
    first_received, last_commit = stack.query(
        "SELECT extract(epoch FROM min(received_at)),"
        " extract(epoch FROM max(pg_xact_commit_timestamp(xmin)))"
        " FROM ingest_ledger WHERE boot_id = ANY(%s)",
        (boots,),
    )[0]
    drain_s = float(last_commit) - launched
    after_first_s = float(last_commit) - float(first_received)
    problems = verify(stack, filled, t0_ms=t0_ms, end_ms=end_s * 1000, signals=signals)
    return Drained(
        label=label,
        fill_s=fill_s,
        drain_s=drain_s,
        after_first_s=after_first_s,
        batches=expected_batches,
        windows=len(devices) * signals * windows,
        readings=sum(f.readings for f in filled),
        ok=not problems,
        problems=tuple(problems),
        outage_s=float(outage_s),
    )


def verify(
    stack: Plant, filled: list[Filled], *, t0_ms: int, end_ms: int, signals: int
) -> list[str]:
    """What the database and the outboxes hold, against what was fed."""
    problems: list[str] = []
    windows = (end_ms - t0_ms) // (PERIOD_S * 1000)
    lo = datetime.fromtimestamp(t0_ms / 1000, UTC)
    hi = datetime.fromtimestamp(end_ms / 1000, UTC)
    by_device = {
        name: (int(n), int(count), float(total), first.timestamp(), last.timestamp())
        for name, n, count, total, first, last in stack.query(
            "SELECT d.name, count(*), sum(r.count), sum(r.sum), min(r.ts), max(r.ts)"
            " FROM readings r JOIN devices d ON d.id = r.device_id"
            " WHERE d.name = ANY(%s) AND r.ts >= %s AND r.ts < %s GROUP BY d.name",
            ([f.device for f in filled], lo, hi),
        )
    }
    ledger = dict(
        stack.query(
            "SELECT d.name, count(*) FROM ingest_ledger l JOIN devices d ON d.id = l.device_id"
            " WHERE l.boot_id = ANY(%s) GROUP BY d.name",
            ([uuid.UUID(hex=f.boot_id) for f in filled],),
        )
    )
    for f in filled:
        got = by_device.get(f.device)
        want_rows = windows * signals
        if got is None:
            problems.append(f"{f.device}: no windows stored")
            continue
        rows, count, total, first, last = got
        if rows != want_rows:
            problems.append(f"{f.device}: {rows} windows stored, {want_rows} expected")
        if count != f.readings:
            problems.append(f"{f.device}: {count} readings stored, {f.readings} fed")
        if total != f.value_sum:
            problems.append(f"{f.device}: sum {total!r} stored, {f.value_sum!r} fed")
        if not math.isclose(first, t0_ms / 1000) or not math.isclose(
            last, end_ms / 1000 - PERIOD_S
        ):
            problems.append(f"{f.device}: windows span {first}..{last}, not the outage hour")
        if ledger.get(f.device) != f.batches:
            problems.append(f"{f.device}: {ledger.get(f.device)} ledger batches, {f.batches} sent")
        with sqlite3.connect(f.config.parent / "outbox.sqlite") as db:
            left = db.execute(
                "SELECT count(*) FROM batches WHERE boot_id = ?", (f.boot_id,)
            ).fetchone()[0]
        if left:
            problems.append(f"{f.device}: {left} outage batches still in the outbox")
    gaps = stack.query(
        "SELECT count(*) FROM sequence_gaps WHERE boot_id = ANY(%s)",
        ([uuid.UUID(hex=f.boot_id) for f in filled],),
    )[0][0]
    if gaps:
        problems.append(f"{gaps} sequence gaps")
    dead = stack.query("SELECT count(*) FROM dead_letters")[0][0]
    if dead:
        problems.append(f"{dead} dead letters")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=20)
    parser.add_argument("--signals", type=int, default=20)
    parser.add_argument("--outage-s", type=int, default=3600)
    args = parser.parse_args()
    if args.outage_s % PERIOD_S:
        parser.error(f"--outage-s must be a multiple of {PERIOD_S}")
    paced = [f"gw-p{i:02d}" for i in range(1, args.gateways + 1)]
    unpaced = [f"gw-u{i:02d}" for i in range(1, args.gateways + 1)]
    with plant("drain", paced + unpaced) as stack:
        default = run_phase(
            stack,
            paced,
            label="agent defaults (paced)",
            signals=args.signals,
            outage_s=args.outage_s,
            broker_options="",
        )
        lifted = run_phase(
            stack,
            unpaced,
            label="pacing lifted",
            signals=args.signals,
            outage_s=args.outage_s,
            broker_options=f"backlog_batches_per_s = {UNTHROTTLED_BATCHES_PER_S}",
        )
    print(f"machine: {machine()}")
    rows: list[tuple[str, str, str]] = [
        ("gateways x signals", f"{args.gateways} x {args.signals}", "1 Hz, 10 s windows"),
        ("outage", f"{args.outage_s} s", f"{args.outage_s // PERIOD_S} batches per gateway"),
    ]
    for phase in (default, lifted):
        rows += [
            (f"[{phase.label}] outboxes filled in", f"{phase.fill_s:.1f} s", "not timed below"),
            (
                f"[{phase.label}] batches / windows",
                f"{phase.batches:,} / {phase.windows:,}",
                f"{phase.readings:,} readings",
            ),
            (f"[{phase.label}] drain time", f"{phase.drain_s:.1f} s", "agent launch -> commit"),
            (
                f"[{phase.label}]   after first receipt",
                f"{phase.after_first_s:.1f} s",
                "first batch received -> last commit",
            ),
            (
                f"[{phase.label}] windows committed / s",
                f"{phase.windows / phase.drain_s:,.0f}",
                "",
            ),
            (
                f"[{phase.label}] x real time",
                f"{phase.x_realtime:.0f}x",
                f"target >= {TARGET_X_REALTIME:.0f}x",
            ),
            (
                f"[{phase.label}] database check",
                "exact" if phase.ok else "FAILED",
                "; ".join(phase.problems[:3]),
            ),
        ]
    print_table(rows)
    print(
        f"drain_gateways={args.gateways} drain_outage_s={args.outage_s}"
        f" drain_s={default.drain_s:.1f} drain_x_realtime={default.x_realtime:.0f}"
        f" drain_vs_target={default.x_realtime / TARGET_X_REALTIME:.2f}"
        f" drain_unpaced_s={lifted.drain_s:.1f}"
        f" drain_unpaced_x_realtime={lifted.x_realtime:.0f}"
        f" drain_windows_per_s={lifted.windows / lifted.drain_s:.0f}"
        f" drain_exact={int(default.ok and lifted.ok)}"
    )
    return 0 if default.ok and lifted.ok else 1


if __name__ == "__main__":
    sys.exit(main())
