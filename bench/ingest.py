#!/usr/bin/env python3
"""Benchmark: ingest worker rows/s against its floor (binary COPY) and a naive bridge, one run.

All three phases store the same windows (one data set, generated once) into
the same schema, each on a fresh database of one PostgreSQL server with
production durability (fsync on, synchronous_commit on):

1. floor  - binary COPY from Python of the rows, in the worker's batch size,
            one transaction per batch (no broker, no decoding, no ledger, no rollups);
2. ingest - the real worker (`millrace ingest`, its own process) draining the same
            batches from its persistent session on the TLS broker: decode, validate,
            dedupe, COPY, rollup partials, commit, ack (its drain thread merges the
            partials into the rollup tables beside the committer);
3. naive  - what typical MQTT-to-Postgres bridges do: for every message, one INSERT
            and one commit per window (auto-ack), run on a prefix of the same messages
            for a fixed time.

Ends with one line: ingest_rows_per_s=... floor_rows_per_s=... naive_rows_per_s=...
ratio_vs_floor=... ratio_vs_naive=... cpu_per_row_vs_floor=... (CPU seconds per stored row of
workers, broker and database against the floor's process and database), after a `cpu:` line
that says how far the machine's cores let the ratio go.

`--profile-committer` measures instead where the committer's time goes: the writer's
steps run serially on the same data (no broker, no decoding), with and without the
rollup step (the COPY of the hourly partials), with the committer's CPU and its database
backend's CPU beside the wall time (CPU time says more than wall time on a shared
machine), then the drain that merges the partials into the rollup tables, timed apart:
it runs on its own thread and connection in the worker, not in the commit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from unittest import mock

REPO = Path(__file__).resolve().parents[1]

import psycopg  # noqa: E402
from scale_meter import Meter  # noqa: E402  (bench/ is the script's directory)

from millrace import topics  # noqa: E402
from millrace.cloud import dbupgrade, rollups  # noqa: E402
from millrace.cloud.ingest import rollup_drain  # noqa: E402
from millrace.cloud.ingest import writer as ingest_writer  # noqa: E402
from millrace.cloud.ingest.messages import Incoming  # noqa: E402
from millrace.cloud.ingest.writer import (  # noqa: E402
    READING_COLUMNS,
    READING_TYPES,
    BatchWriter,
    copy_rows,
    to_datetime,
)
from millrace.mqtt import tls_client  # noqa: E402
from millrace.wire import (  # noqa: E402
    CONTENT_TYPE_MSGPACK,
    Batch,
    Rejection,
    Window,
    decode_batch,
    encode_batch,
)
from millrace.wire.aggregate import AGGREGATE_FIELDS  # noqa: E402

try:  # the test suite's service fixtures; bench/run.py (make bench) puts the checkout on the path
    from tests.fixtures.fix_broker import MosquittoServer, PKIFixture, free_port
    from tests.fixtures.fix_postgres import PostgresServer
except ModuleNotFoundError as exc:
    raise SystemExit(
        "bench/ingest.py needs the checkout's tests package: run it with `make bench`, "
        "`bench/run.py --only ingest`, or `PYTHONPATH=. python bench/ingest.py` from the "
        f"repository root ({exc})"
    ) from exc

TARGET_RATIO_VS_FLOOR = 0.5
TARGET_RATIO_VS_NAIVE = 50.0
SERVICE_ID = "svc-bench"
# Production durability: the bridge's per-row commit pays an fsync, as it would in a plant.
PG_SETTINGS = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}
BATCH_MAX_ROWS = 20_000
WAIT_SECONDS = 600.0


def make_data(
    *, devices: int, metrics: int, windows_per_message: int, messages: int, seed: int
) -> list[Batch]:
    """`messages` batches, round-robin over devices; 1 s windows ending a minute ago."""
    rng = random.Random(seed)
    per_device = math.ceil(messages / devices)
    slots = math.ceil(per_device * windows_per_message / metrics)
    now_ms = int(time.time() * 1000)
    end_ms = now_ms - now_ms % 1000 - 60_000
    start_ms = end_ms - slots * 1000
    names = [f"sig{m:03d}" for m in range(metrics)]
    out: list[Batch] = []
    for d in range(devices):
        device = f"bench-{d:03d}"
        boot = uuid.UUID(int=rng.getrandbits(128)).hex
        windows: list[Window] = []
        for slot in range(slots):
            for name in names:
                base = rng.uniform(0, 100)
                count = 10
                lo, hi = base - 1.0, base + 1.0
                total = base * count
                windows.append(
                    Window(
                        name,
                        start_ms + slot * 1000,
                        1,
                        count,
                        total,
                        lo,
                        hi,
                        base,
                        base,
                        base * base * count + 2.0,
                        0,
                    )
                )
        for seq in range(per_device):
            chunk = windows[seq * windows_per_message : (seq + 1) * windows_per_message]
            if chunk:
                out.append(Batch(device, boot, seq, now_ms, windows=tuple(chunk)))
    out.sort(key=lambda b: (b.seq, b.device))
    return out[:messages]


def fresh_database(server: PostgresServer, name: str) -> str:
    dsn = server.create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    dbupgrade.upgrade(dsn)
    return dsn


def count_readings(dsn: str, statement: str = "SELECT count(*) FROM readings") -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(statement).fetchone()
        return int(row[0] or 0) if row else 0


_READINGS: Final = '{table="readings"}'
_PENDING: Final = "SELECT count(*) FROM (SELECT 1 FROM rollup_pending LIMIT 1) AS any_left"
_ROLLED_UP: Final = "SELECT sum(windows) FROM rollup_daily"


# -- phase 1: the floor ---------------------------------------------------------------------


def run_floor(
    dsn: str, batches: list[Batch], *, db_pid: int | None = None
) -> tuple[int, float, dict[str, float]]:
    """Binary COPY of every window as a readings row, BATCH_MAX_ROWS per transaction.

    Returns rows, seconds and the CPU seconds spent: `bench` (this process) and, given
    the postmaster's `db_pid`, `database` (all its processes).
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO devices (name) SELECT DISTINCT unnest(%s::text[])",
            [sorted({b.device for b in batches})],
        )
        conn.execute(
            "INSERT INTO metrics (name) SELECT DISTINCT unnest(%s::text[])",
            [
                sorted(
                    {w.metric for w in batches[0].windows}
                    | {w.metric for b in batches for w in b.windows}
                )
            ],
        )
        devices = dict(conn.execute("SELECT name, id FROM devices").fetchall())
        metrics = dict(conn.execute("SELECT name, id FROM metrics").fetchall())
        meter = Meter({"database": [db_pid]}) if db_pid else None
        python_cpu = time.process_time()
        started = time.perf_counter()
        rows: list[tuple[Any, ...]] = []
        total = 0
        times: dict[int, datetime] = {}

        def flush() -> None:
            with conn.transaction(), conn.cursor() as cur:
                copy_rows(cur, "readings", READING_COLUMNS, READING_TYPES, rows)
            rows.clear()

        for batch in batches:
            device_id = devices[batch.device]
            for w in batch.windows:
                ts = times.get(w.start_ms)
                if ts is None:
                    ts = times[w.start_ms] = to_datetime(w.start_ms)
                # The writer's row, spelled out as it does: the floor pays for no generic row.
                rows.append(
                    (
                        ts,
                        device_id,
                        metrics[w.metric],
                        w.period_s,
                        w.count,
                        w.sum,
                        w.min,
                        w.max,
                        w.first,
                        w.last,
                        w.sumsq,
                        w.rejected,
                    )
                )
            if len(rows) >= BATCH_MAX_ROWS:
                total += len(rows)
                flush()
        total += len(rows)
        if rows:
            flush()
        elapsed = time.perf_counter() - started
        cpu = {"bench": time.process_time() - python_cpu}
        if meter is not None:
            cpu.update(meter.cpu_seconds())
    return total, elapsed, cpu


# -- phase 2: the worker, end to end --------------------------------------------------------


def write_worker_config(
    path: Path, broker: MosquittoServer, dsn: str, http_port: int, *, client_id: str
) -> None:
    cert, key = broker.pki.files(SERVICE_ID)
    path.write_text(
        f"""
[database]
dsn = "{dsn}"
[broker]
host = "{broker.host}"
port = {broker.port}
ca = "{broker.ca}"
cert = "{cert}"
key = "{key}"
client_id = "{client_id}"
share_group = "bench"
[batch]
max_rows = {BATCH_MAX_ROWS}
max_delay_ms = 200
[http]
port = {http_port}
[retention]
enabled = false
""",
        encoding="utf-8",
    )


def start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "millrace.cli", "ingest", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )


def wait_log(log: Path, pattern: str, after: int) -> re.Match[str]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")[after:]
        match = re.search(pattern, text)
        if match:
            return match
        time.sleep(0.02)
    raise RuntimeError(f"worker never logged {pattern!r}:\n{log.read_text()[-3000:]}")


def metric_value(port: int, name: str, labels: str = "") -> float:
    """A worker's metric; `labels` as exposed, e.g. '{table="readings"}' (else the first)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def publish_all(
    broker: MosquittoServer, payloads: list[tuple[str, bytes]], device_ids: set[str]
) -> None:
    """Publish with each device's own certificate (the ACL allows nothing else)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = CONTENT_TYPE_MSGPACK
    clients = {}
    for device in sorted(device_ids):
        cert, key = broker.pki.issue(device)
        client = tls_client(
            f"pub-{device}", ca=broker.ca, cert=cert, key=key, max_inflight_messages=200
        )
        connected = threading.Event()
        client.on_connect = lambda *_a, ev=connected: ev.set()
        client.connect(broker.host, broker.port)
        client.loop_start()
        if not connected.wait(20):
            raise RuntimeError(f"publisher {device} could not connect")
        clients[device] = client
    infos = []
    for topic, payload in payloads:
        device = topics.parse_topic(topic).device_id
        infos.append(clients[device].publish(topic, payload, qos=1, properties=props))
    for info in infos:
        info.wait_for_publish(60)
    for client in clients.values():
        client.disconnect()
        client.loop_stop()


def run_worker_phase(
    broker: MosquittoServer,
    dsn: str,
    batches: list[Batch],
    workdir: Path,
    *,
    workers: int = 1,
    db_pid: int,
) -> tuple[int, float, dict[str, float]]:
    """Pre-queue every batch in the workers' sessions, then time them draining it.

    The clock runs from the first worker's "connected" log line to the last commit
    (millrace_ingest_last_commit_timestamp_seconds), so process start-up is not counted.
    `rollups_behind_s`: from the last commit until the drains left no partial pending
    (polled every 0.1 s), how far the rollups trailed the readings at the end.
    `cpu_<group>`: CPU seconds of the workers, the broker and the database from the moment
    every worker's "connected" line was seen until the rollups were complete.
    """
    configs = [workdir / f"ingest-{i}.toml" for i in range(workers)]
    logs = [workdir / f"ingest-{i}.log" for i in range(workers)]
    ports = [free_port() for _ in range(workers)]
    for i, config in enumerate(configs):
        write_worker_config(config, broker, dsn, ports[i], client_id=f"bench-ingest-{i}")
    # First start: creates the persistent sessions and their shared subscriptions.
    procs = [start_worker(config, log) for config, log in zip(configs, logs, strict=True)]
    for log in logs:
        wait_log(log, r"connected to", 0)
    time.sleep(0.5)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    payloads = [(topics.data_topic(b.device), encode_batch(b)) for b in batches]
    publish_all(broker, payloads, {b.device for b in batches})
    expected = sum(len(b.windows) for b in batches)
    offsets = [len(log.read_text(errors="replace")) for log in logs]
    procs = [start_worker(config, log) for config, log in zip(configs, logs, strict=True)]
    stats = {
        "batches": 0.0,
        "commit_s_sum": 0.0,
        "duplicates": 0.0,
        "receipts": 0.0,
        "receipt_s": 0.0,
    }
    try:
        connected = []
        for log, offset in zip(logs, offsets, strict=True):
            match = wait_log(
                log,
                r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO"
                r" millrace\.cloud\.ingest\.consumer: connected",
                offset,
            )
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            connected.append(stamp)
        meter = Meter(
            {"worker": [p.pid for p in procs], "broker": [broker.pid or 0], "database": [db_pid]}
        )
        deadline = time.monotonic() + WAIT_SECONDS
        # Polled from the workers' counters: a count(*) of readings every 0.2 s cost the
        # database about as much CPU as the ledger, and it was charged to the ingest.
        while (
            sum(metric_value(port, "millrace_ingest_rows_total", _READINGS) for port in ports)
            < expected
        ):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"workers did not finish:\n{logs[0].read_text()[-3000:]}")
            time.sleep(0.2)
        last_commit = max(
            metric_value(port, "millrace_ingest_last_commit_timestamp_seconds") for port in ports
        )
        while count_readings(dsn, _PENDING) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the rollup drains did not empty rollup_pending")
            time.sleep(0.1)
        stats["rollups_behind_s"] = time.time() - last_commit
        stats.update({f"cpu_{k}": v for k, v in meter.cpu_seconds().items()})
        for port in ports:
            stats["batches"] += metric_value(port, "millrace_ingest_batches_total")
            stats["commit_s_sum"] += metric_value(port, "millrace_ingest_commit_seconds_sum")
            stats["duplicates"] += metric_value(port, "millrace_ingest_duplicates_total")
            stats["receipts"] += metric_value(port, "millrace_ingest_receipts_published_total")
            stats["receipt_s"] += metric_value(port, "millrace_ingest_receipt_seconds_total")
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return expected, last_commit - min(connected), stats


# -- phase 3: a naive bridge ----------------------------------------------------------------


_NAIVE_INSERT = (
    f"INSERT INTO readings ({', '.join(READING_COLUMNS)})"
    f" VALUES ({', '.join(['%s'] * len(READING_COLUMNS))})"
)


def run_naive(
    broker: MosquittoServer, dsn: str, batches: list[Batch], *, seconds: float, per_row: bool
) -> tuple[int, float]:
    """Auto-ack subscriber; per message: INSERT each window, commit per row (or per message)."""
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute(
            "INSERT INTO devices (name) SELECT unnest(%s::text[])",
            [sorted({b.device for b in batches})],
        )
        setup.execute(
            "INSERT INTO metrics (name) SELECT unnest(%s::text[])",
            [sorted({w.metric for b in batches for w in b.windows})],
        )
        devices = dict(setup.execute("SELECT name, id FROM devices").fetchall())
        metrics = dict(setup.execute("SELECT name, id FROM metrics").fetchall())
    inbox: queue.Queue[bytes] = queue.Queue()
    cert, key = broker.pki.files(SERVICE_ID)
    sub = tls_client(f"naive-{uuid.uuid4().hex[:6]}", ca=broker.ca, cert=cert, key=key)
    subscribed = threading.Event()
    sub.on_connect = lambda c, *_a: c.subscribe(topics.all_devices_filter("data"), qos=1)
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.on_message = lambda _c, _u, msg: inbox.put(bytes(msg.payload))
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    if not subscribed.wait(20):
        raise RuntimeError("naive subscriber could not subscribe")
    # Enough messages for the time box even at 20k rows/s; the bridge sees them live.
    needed = min(len(batches), max(20, int(seconds * 20_000 / max(1, len(batches[0].windows)))))
    publisher = threading.Thread(
        target=publish_all,
        args=(
            broker,
            [(topics.data_topic(b.device), encode_batch(b)) for b in batches[:needed]],
            {b.device for b in batches[:needed]},
        ),
        daemon=True,
    )
    publisher.start()
    rows = 0
    with psycopg.connect(dsn) as conn:
        first = inbox.get(timeout=60)
        started = time.perf_counter()
        payload: bytes | None = first
        while payload is not None and time.perf_counter() - started < seconds:
            batch = decode_batch(payload, content_type=CONTENT_TYPE_MSGPACK)
            assert not isinstance(batch, Rejection)
            device_id = devices[batch.device]
            for w in batch.windows:
                key = (to_datetime(w.start_ms), device_id, metrics[w.metric], w.period_s)
                conn.execute(_NAIVE_INSERT, (*key, *(getattr(w, f) for f in AGGREGATE_FIELDS)))
                rows += 1
                if per_row:
                    conn.commit()
                if time.perf_counter() - started >= seconds:
                    break
            conn.commit()
            try:
                payload = inbox.get(timeout=5)
            except queue.Empty:
                payload = None
        elapsed = time.perf_counter() - started
    sub.disconnect()
    sub.loop_stop()
    publisher.join(60)
    return rows, elapsed


# -- the committer's steps, serially ----------------------------------------------------------


def backend_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a local process (the database backend), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_committer(
    dsn: str, batches: list[Batch], *, rollup_step: bool
) -> tuple[float, dict[str, float]]:
    """`BatchWriter.write` + commit per commit batch, as the worker's committer does them.

    Returns the wall time and, per step, its wall time; `python_cpu` and `backend_cpu` are
    the CPU seconds of this process and of the database backend over the run. Without
    `rollup_step` the hourly merge and the partials' COPY are taken out (for measurement
    only). `upserts_in_commit` counts rollup upserts inside the commits (the drain does
    them: 0); `drain` is the drain's wall time after the commits, not part of the commits'.
    """
    steps: dict[str, float] = {"copy_pending": 0.0}
    upserts = [0]
    write_rollups = rollups.write_rollups

    def counted(*args: Any) -> int:
        upserts[0] += 1
        return write_rollups(*args)

    def timed(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                steps[name] = steps.get(name, 0.0) + time.perf_counter() - started

        return call

    per_commit = max(1, BATCH_MAX_ROWS // max(1, len(batches[0].windows)))
    received = datetime.now().astimezone()
    commits = [
        [Incoming(b, received) for b in batches[i : i + per_commit]]
        for i in range(0, len(batches), per_commit)
    ]
    writer = BatchWriter()
    partials = rollups.copy_pending if rollup_step else lambda _cur, _hourly: 0
    with contextlib.ExitStack() as patches, psycopg.connect(dsn) as conn:
        for target, name, fn in (
            (writer, "_claim", writer._claim),
            (writer, "_copy", writer._copy),
            (rollups, "copy_pending", partials),
            (ingest_writer, "record_streams", ingest_writer.record_streams),
            (writer, "_devices_seen", writer._devices_seen),
        ):
            patches.enter_context(mock.patch.object(target, name, timed(name.strip("_"), fn)))
        patches.enter_context(mock.patch.object(rollups, "write_rollups", counted))
        if not rollup_step:
            patches.enter_context(mock.patch.object(rollups, "add_hourly", lambda *_a: None))
        writer.prepare(conn, batches)
        conn.commit()
        gc.collect()
        gc.freeze()  # the worker's GC settings (cloud/ingest/worker.py)
        gc.set_threshold(10_000)
        python_cpu, backend_cpu = time.process_time(), backend_cpu_s(conn.info.backend_pid)
        started = time.perf_counter()
        for commit in commits:
            with conn.transaction():
                writer.write(conn, commit)
                committing = time.perf_counter()
            steps["commit"] = steps.get("commit", 0.0) + time.perf_counter() - committing
        elapsed = time.perf_counter() - started
        steps["python_cpu"] = time.process_time() - python_cpu
        steps["backend_cpu"] = backend_cpu_s(conn.info.backend_pid) - backend_cpu
        steps["upserts_in_commit"] = upserts[0]
        conn.autocommit = True
        started = time.perf_counter()
        rollup_drain.drain_all(conn)
        steps["drain"] = time.perf_counter() - started
    return elapsed, steps


def profile_committer(pg: PostgresServer, batches: list[Batch], *, runs: int) -> None:
    """Floor, committer and committer without rollups, `runs` times each, interleaved."""
    rows = sum(len(b.windows) for b in batches)
    print(f"committer profile: {len(batches)} batches, {rows} rows, {runs} runs of each")
    print("| run | floor s | committer s | without rollups s | steps (s) |")
    print("|---|---|---|---|---|")
    results: dict[str, list[float]] = {"floor": [], "with": [], "without": [], "drain": []}
    upserts_in_commit = 0
    for run in range(runs):
        _, floor_s, _ = run_floor(fresh_database(pg, f"profile_floor_{run}"), batches)
        with_s, with_steps = run_committer(
            fresh_database(pg, f"profile_with_{run}"), batches, rollup_step=True
        )
        without_s, without_steps = run_committer(
            fresh_database(pg, f"profile_without_{run}"), batches, rollup_step=False
        )
        results["floor"].append(floor_s)
        results["with"].append(with_s)
        results["without"].append(without_s)
        shown = ", ".join(
            f"{k} {v:.2f}/{without_steps.get(k, 0.0):.2f}" for k, v in with_steps.items()
        )
        print(f"| {run + 1} | {floor_s:.2f} | {with_s:.2f} | {without_s:.2f} | {shown} |")
        results["drain"].append(with_steps["drain"])
        upserts_in_commit = max(upserts_in_commit, int(with_steps["upserts_in_commit"]))
    print(
        "(steps: with / without rollups; copy includes building the rows and the hourly merge;"
        " drain: after the commits, on the worker's drain thread in production)"
    )
    best = {k: min(v) for k, v in results.items()}
    print(
        f"committer_s={best['with']:.3f} committer_without_rollups_s={best['without']:.3f}"
        f" drain_s={best['drain']:.3f} rollup_upserts_in_commit={upserts_in_commit}"
        f" floor_s={best['floor']:.3f}"
        f" serial_ratio_vs_floor={best['floor'] / best['with']:.3f}"
        f" serial_ratio_without_rollups={best['floor'] / best['without']:.3f}"
    )


# -- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--metrics", type=int, default=50)
    parser.add_argument("--windows-per-message", type=int, default=250)
    parser.add_argument("--messages", type=int, default=1600)
    parser.add_argument("--naive-seconds", type=float, default=10.0)
    parser.add_argument(
        "--workers", type=int, default=1, help="ingest worker processes in one share group"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--profile-committer",
        type=int,
        metavar="RUNS",
        default=0,
        help="only profile the committer's steps serially, RUNS times (no broker)",
    )
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()

    for tool in ("mosquitto",):
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")):
            print(
                f"bench/ingest.py: {tool} is not installed (run scripts/bootstrap)", file=sys.stderr
            )
            return 2
    batches = make_data(
        devices=args.devices,
        metrics=args.metrics,
        windows_per_message=args.windows_per_message,
        messages=args.messages,
        seed=args.seed,
    )
    rows_total = sum(len(b.windows) for b in batches)
    if args.profile_committer:
        pg_only = PostgresServer(settings=PG_SETTINGS)
        try:
            pg_only.start()
            profile_committer(pg_only, batches, runs=args.profile_committer)
        finally:
            pg_only.close()
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="millrace-bench-ingest-"))
    pg = PostgresServer(settings=PG_SETTINGS)
    broker: MosquittoServer | None = None
    try:
        pg.start()
        pki = PKIFixture(workdir / "pki")
        pki.issue(SERVICE_ID, role="service")
        broker_dir = workdir / "broker"
        broker_dir.mkdir()
        broker = MosquittoServer(pki, broker_dir)
        broker.start()

        db_pid = int((pg.datadir / "postmaster.pid").read_text().splitlines()[0])
        floor_rows, floor_s, floor_cpu = run_floor(
            fresh_database(pg, "bench_floor"), batches, db_pid=db_pid
        )
        ingest_dsn = fresh_database(pg, "bench_ingest")
        ingest_rows, ingest_s, stats = run_worker_phase(
            broker, ingest_dsn, batches, workdir, workers=args.workers, db_pid=db_pid
        )
        stored = count_readings(ingest_dsn)
        rolled_up = count_readings(ingest_dsn, _ROLLED_UP)
        if stored != rows_total or rolled_up != rows_total:
            raise RuntimeError(
                f"worker stored {stored} rows and rolled up {rolled_up}, expected {rows_total}"
            )
        naive_rows, naive_s = run_naive(
            broker,
            fresh_database(pg, "bench_naive"),
            batches,
            seconds=args.naive_seconds,
            per_row=True,
        )
        batch_rows, batch_s = run_naive(
            broker,
            fresh_database(pg, "bench_naive_msg"),
            batches,
            seconds=args.naive_seconds,
            per_row=False,
        )
    finally:
        if broker is not None:
            broker.stop()
        pg.close()
        shutil.rmtree(workdir, ignore_errors=True)

    floor = floor_rows / floor_s
    ingest = ingest_rows / ingest_s
    naive = naive_rows / naive_s
    per_message = batch_rows / batch_s
    print(
        f"data: {len(batches)} messages x {args.windows_per_message} windows = {rows_total} rows,"
        f" {args.devices} devices x {args.metrics} metrics, 1 s windows"
    )
    settings = ", ".join(f"{k}={v}" for k, v in PG_SETTINGS.items())
    print(f"database: PostgreSQL with TimescaleDB, {settings}")
    print()
    print(f"| {'phase':<52} | {'rows':>9} | {'seconds':>8} | {'rows/s':>10} |")
    print(f"|{'-' * 54}|{'-' * 11}|{'-' * 10}|{'-' * 12}|")
    for name, rows, secs in (
        ("floor: binary COPY from Python (20k rows per tx)", floor_rows, floor_s),
        (
            f"ingest ({args.workers} worker): broker -> rows + rollups",
            ingest_rows,
            ingest_s,
        ),
        ("naive bridge: INSERT + commit per row", naive_rows, naive_s),
        ("(context) bridge: INSERT per row, commit per message", batch_rows, batch_s),
    ):
        print(f"| {name:<52} | {rows:>9} | {secs:>8.2f} | {rows / secs:>10.0f} |")
    print()
    print(
        f"worker: {stats['batches']:.0f} commits,"
        f" {stats['commit_s_sum']:.2f} s inside write+commit,"
        f" {stats['duplicates']:.0f} duplicates;"
        f" rollups complete {stats['rollups_behind_s']:.2f} s after the last commit"
    )
    print(
        f"receipts: {stats['receipts']:.0f} messages for {len(batches)} batches"
        f" ({stats['receipts'] / max(stats['batches'], 1):.1f} per commit),"
        f" {stats['receipt_s']:.2f} s on the committer thread"
        f" ({stats['receipt_s'] / max(ingest_s, 1e-9):.1%} of the ingest phase)"
    )
    # What the machine's cores allow: the CPU seconds each way spent, spread over all cores.
    cores = os.cpu_count() or 1
    floor_cpu_s = sum(floor_cpu.values())
    ingest_cpu = {k[4:]: v for k, v in stats.items() if k.startswith("cpu_")}
    ingest_cpu_s = sum(ingest_cpu.values())
    print(
        f"cpu: floor {floor_cpu_s:.2f} s ("
        + ", ".join(f"{k} {v:.2f}" for k, v in floor_cpu.items())
        + f"); ingest {ingest_cpu_s:.2f} s ("
        + ", ".join(f"{k} {v:.2f}" for k, v in ingest_cpu.items())
        + f"); on {cores} cores the ingest's CPU alone needs {ingest_cpu_s / cores:.2f} s,"
        f" so ratio_vs_floor cannot pass {floor_s / (ingest_cpu_s / cores):.2f} here"
    )
    ratio_floor = ingest / floor
    ratio_naive = ingest / naive
    result = {
        "ingest_rows_per_s": round(ingest),
        "floor_rows_per_s": round(floor),
        "naive_rows_per_s": round(naive),
        "ratio_vs_floor": round(ratio_floor, 3),
        "ratio_vs_naive": round(ratio_naive, 1),
        "cpu_per_row_vs_floor": round(ingest_cpu_s / ingest_rows / (floor_cpu_s / floor_rows), 2),
    }
    if args.json:
        print(json.dumps({**result, "per_message_commit_rows_per_s": round(per_message)}))
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
