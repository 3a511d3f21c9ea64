"""End-to-end latency: window close on the gateway -> its rows committed in TimescaleDB.

What runs (all real, all on this machine): 100 `millrace edge run` processes, one per
gateway, each with 20 simulated signals polled every second and 10 s windows (grace 2 s,
the plant's defaults); a TLS mosquitto from `millrace broker config`; one `millrace ingest`
worker with its default batching (200 ms / 20,000 rows); PostgreSQL 15 + TimescaleDB with
fsync on and `track_commit_timestamp = on`.

What is measured, per batch (one batch = one gateway's closed windows of one period):
- close -> commit: `pg_xact_commit_timestamp(xmin)` of its ingest-ledger row minus the
  batch's `sent_at`, which the agent stamps at the moment it closes the windows (the
  window end + grace). This is the target (p99 <= 1 s at nominal load).
- window end -> commit, per stored window: the commit time of its readings row minus the
  window's end (includes the 2 s grace the agent waits for late readings).
- the split: close -> worker received (agent, broker) and received -> commit (worker
  batching, COPY, commit).
Only windows that closed inside the measuring interval count (no warm-up, no shutdown).
Every gateway closes its windows on the same wall-clock boundary, so each close is a
burst of 100 batches at once: the worst case of nominal load, not an average.

Run: .venv/bin/python bench/latency.py [--gateways 100] [--signals 20] [--seconds 120]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime

from common import (
    CpuMeter,
    machine,
    percentile,
    plant,
    postmaster_pid,
    print_table,
    wait_until,
)

TARGET_P99_S = 1.0
PERIOD_S = 10
GRACE_S = 2.0
POLL_S = 1.0
STARTUP_TIMEOUT_S = 300.0
CPUS = os.cpu_count() or 1

_LATENCIES = """
SELECT
    extract(epoch FROM pg_xact_commit_timestamp(xmin) - sent_at),
    extract(epoch FROM received_at - sent_at),
    extract(epoch FROM pg_xact_commit_timestamp(xmin) - received_at),
    windows
FROM ingest_ledger
WHERE sent_at >= %s AND sent_at < %s
"""
# Per stored window; its rows may come from a savepoint (a subtransaction), whose xid
# PostgreSQL stamps with the commit time of the whole transaction.
_FROM_WINDOW_END = """
SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - (ts + make_interval(secs => period_s)))
FROM readings
WHERE ts + make_interval(secs => period_s) >= %s AND ts + make_interval(secs => period_s) < %s
"""


def gateway_ids(count: int) -> list[str]:
    return [f"gw-{i:03d}" for i in range(1, count + 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=100)
    parser.add_argument("--signals", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=120.0, help="measuring interval")
    args = parser.parse_args()
    devices = gateway_ids(args.gateways)
    with plant("latency", devices) as stack:
        configs = [
            (d, stack.edge_config(d, signals=args.signals, poll_s=POLL_S, period_s=PERIOD_S))
            for d in devices
        ]
        launched = time.monotonic()
        agents = stack.start_agents(configs)
        # Warm-up: every gateway has had a batch committed (its first, partial window).
        wait_until(
            lambda: (
                stack.check_running(agents)
                and stack.query("SELECT count(DISTINCT device_id) FROM ingest_ledger")[0][0]
                >= len(devices)
            ),
            timeout_s=STARTUP_TIMEOUT_S,
            what="a committed batch from every gateway",
        )
        startup_s = time.monotonic() - launched
        # Measure from the next window boundary for a whole number of windows.
        now = time.time()
        start_s = (int(now) // PERIOD_S + 1) * PERIOD_S
        windows = max(1, int(args.seconds // PERIOD_S))
        end_s = start_s + windows * PERIOD_S
        time.sleep(max(0.0, start_s - time.time()))
        assert stack.cluster is not None
        meter = CpuMeter(
            {
                "agents": [a.pid for a in agents],
                "broker": [s.pid for s in stack.services if s.name == "broker"],
                "ingest": [s.pid for s in stack.services if s.name == "ingest"],
                "postgres": [postmaster_pid(stack.cluster)],
            }
        )
        # The last window of the interval closes at end + grace; leave time for its commit.
        time.sleep(max(0.0, end_s + GRACE_S + 3.0 - time.time()))
        cpu = meter.stop()
        stack.stop_agents(agents)
        # Closes happen at boundary + grace: the interval [start, end) of close times.
        lo = datetime.fromtimestamp(start_s + GRACE_S - 0.5, UTC)
        hi = datetime.fromtimestamp(end_s + GRACE_S - 0.5, UTC)
        rows = stack.query(_LATENCIES, (lo, hi))
        ends = stack.query(
            _FROM_WINDOW_END,
            (datetime.fromtimestamp(start_s, UTC), datetime.fromtimestamp(end_s, UTC)),
        )
        dead = stack.query("SELECT count(*) FROM dead_letters")[0][0]
    close = [float(r[0]) for r in rows]
    transit = [float(r[1]) for r in rows]
    worker = [float(r[2]) for r in rows]
    from_end = [float(r[0]) for r in ends]
    expected = len(devices) * windows
    p50, p99 = percentile(close, 50), percentile(close, 99)
    ours = cpu["agents"] + cpu["broker"] + cpu["ingest"] + cpu["postgres"]
    others = max(0.0, cpu["machine"] * CPUS - ours)
    table = [
        ("gateways x signals", f"{len(devices)} x {args.signals}", "one edge agent process each"),
        ("readings/s sampled", f"{len(devices) * args.signals / POLL_S:,.0f}", "1 Hz per signal"),
        ("window / grace", f"{PERIOD_S} s / {GRACE_S:g} s", "plant defaults"),
        ("agents started in", f"{startup_s:.0f} s", "until each had a batch committed"),
        ("measuring interval", f"{windows * PERIOD_S} s", f"{windows} window closes"),
        ("batches measured / expected", f"{len(close)} / {expected}", "1 per gateway per window"),
        ("windows measured / expected", f"{len(from_end)} / {expected * args.signals}", ""),
        ("rows per batch", f"{rows[0][3] if rows else 0}", ""),
        ("close -> commit p50", f"{p50 * 1000:.0f} ms", ""),
        ("close -> commit p99", f"{p99 * 1000:.0f} ms", f"target <= {TARGET_P99_S * 1000:.0f} ms"),
        ("close -> commit max", f"{max(close, default=0) * 1000:.0f} ms", ""),
        ("  close -> worker received p50", f"{percentile(transit, 50) * 1000:.0f} ms", ""),
        ("  close -> worker received p99", f"{percentile(transit, 99) * 1000:.0f} ms", ""),
        ("  received -> commit p50", f"{percentile(worker, 50) * 1000:.0f} ms", ""),
        ("  received -> commit p99", f"{percentile(worker, 99) * 1000:.0f} ms", ""),
        ("window end -> commit p50", f"{percentile(from_end, 50) * 1000:.0f} ms", "incl. grace"),
        ("window end -> commit p99", f"{percentile(from_end, 99) * 1000:.0f} ms", "incl. grace"),
        (f"CPU: {len(devices)} agents", f"{cpu['agents']:.2f}", "cores"),
        ("CPU: mosquitto", f"{cpu['broker']:.3f}", "cores"),
        ("CPU: ingest worker", f"{cpu['ingest']:.3f}", "cores"),
        ("CPU: postgres", f"{cpu['postgres']:.3f}", "cores"),
        ("CPU: other processes", f"{others:.2f}", "cores (not part of the benchmark)"),
        ("CPU: machine busy", f"{cpu['machine'] * 100:.0f} %", f"of {CPUS} cores"),
        ("dead letters", f"{dead}", "must be 0"),
    ]
    print(f"machine: {machine()}")
    print_table(table)
    print(
        f"e2e_gateways={len(devices)} e2e_signals={args.signals}"
        f" latency_p50_ms={p50 * 1000:.0f} latency_p99_ms={p99 * 1000:.0f}"
        f" latency_p99_vs_target={p99 / TARGET_P99_S:.2f}"
        f" latency_window_end_p99_ms={percentile(from_end, 99) * 1000:.0f}"
        f" latency_batches={len(close)} latency_expected={expected}"
        f" machine_busy={cpu['machine']:.2f}"
    )
    complete = len(close) == expected and len(from_end) == expected * args.signals
    return 0 if complete and dead == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
