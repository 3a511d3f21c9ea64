"""Helpers for the ingest tests: a migrated database with a least-privilege login, worker
configs and runners, batch generators with the aggregates they must produce, publishers.

Imported by the test modules (fixtures included), not registered as a plugin: only the
ingest tests use them.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from millrace import topics
from millrace.cloud import dbupgrade
from millrace.cloud.config import IngestConfig, load_config
from millrace.cloud.ingest import rollup_drain
from millrace.cloud.ingest.worker import Worker
from millrace.mqtt import tls_client
from millrace.wire import Batch, Window, content_type_for, encode_batch

SERVICE_ID = "svc-test"  # the session PKI's service identity, allowed by the ACL
WAIT_SECONDS = 60.0
POLL_SECONDS = 0.05
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


# -- database ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IngestDb:
    """A migrated database: `owner_dsn` (superuser) and `ingest_dsn` (least privilege)."""

    owner_dsn: str
    ingest_dsn: str
    login: str


def prepare_database(owner_dsn: str) -> IngestDb:
    """`db upgrade`, then a LOGIN role that is only a member of millrace_ingest."""
    dbupgrade.upgrade(owner_dsn)
    login = f"ingest_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(owner_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                sql.Identifier(login), sql.Identifier(dbupgrade.INGEST_ROLE)
            )
        )
    info = psycopg.conninfo.conninfo_to_dict(owner_dsn)
    info["user"] = login
    return IngestDb(owner_dsn, psycopg.conninfo.make_conninfo(**info), login)


@pytest.fixture
def ingest_db(fresh_db: str) -> IngestDb:
    return prepare_database(fresh_db)


def query(dsn: str, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(statement, params).fetchall()  # type: ignore[arg-type]


def scalar(dsn: str, statement: str, params: Sequence[Any] = ()) -> Any:
    return query(dsn, statement, params)[0][0]


def wait_for(
    predicate: Callable[[], bool], *, timeout_s: float = WAIT_SECONDS, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_ledger(dsn: str, expected: int, *, timeout_s: float = WAIT_SECONDS) -> None:
    """Wait until the ledger holds `expected` batches (never more: that would be a bug)."""

    def done() -> bool:
        count = scalar(dsn, "SELECT count(*) FROM ingest_ledger")
        assert count <= expected, f"ledger has {count} > {expected} batches"
        return bool(count == expected)

    wait_for(done, timeout_s=timeout_s, what=f"{expected} batches in the ledger")


# -- worker configuration and running ------------------------------------------------------


def write_config(
    path: Path,
    *,
    server: Any,
    dsn: str,
    client_id: str,
    group: str,
    extra: str = "",
    max_delay_ms: int = 100,
) -> Path:
    cert, key = server.pki.files(SERVICE_ID)
    path.write_text(
        f"""
[database]
dsn = "{dsn}"

[broker]
host = "{server.host}"
port = {server.port}
ca = "{server.ca}"
cert = "{cert}"
key = "{key}"
client_id = "{client_id}"
share_group = "{group}"
session_expiry_s = 600

[batch]
max_rows = 5000
max_delay_ms = {max_delay_ms}

[http]
port = 0

[retention]
enabled = false
{extra}
""",
        encoding="utf-8",
    )
    return path


def make_config(tmp_path: Path, **kw: Any) -> IngestConfig:
    name = f"{kw['client_id']}.toml"
    return load_config(write_config(tmp_path / name, **kw))


class WorkerThread:
    """A Worker running in a thread of the test process."""

    def __init__(self, config: IngestConfig) -> None:
        self.worker = Worker(config)
        self.result: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=config.broker.client_id)

    def _run(self) -> None:
        try:
            self.result = self.worker.run()
        except BaseException as exc:
            self.error = exc
            raise

    def start(self) -> WorkerThread:
        self._thread.start()
        if not self.worker.ready.wait(WAIT_SECONDS):
            raise AssertionError(f"worker not ready: {self.error!r}")
        consumer = self.worker._consumer
        assert consumer is not None and consumer.wait_connected(WAIT_SECONDS), "not subscribed"
        return self

    def stop(self) -> None:
        self.worker.request_stop()
        self._thread.join(WAIT_SECONDS)
        assert not self._thread.is_alive(), "worker did not stop"
        assert self.error is None, self.error

    def counter(self, name: str, **labels: str) -> float:
        value = self.worker.metrics.registry.get_sample_value(name, labels or None)
        return float(value or 0.0)


@contextlib.contextmanager
def running_worker(config: IngestConfig) -> Iterator[WorkerThread]:
    runner = WorkerThread(config).start()
    try:
        yield runner
    finally:
        runner.stop()


class WorkerProcess:
    """`millrace ingest --config FILE` as a child process (for SIGKILL/SIGTERM tests)."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "millrace.cli", "ingest", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "MILLRACE_LOG_LEVEL": "INFO"},
            )

    def wait_subscribed(self, *, timeout_s: float = WAIT_SECONDS) -> None:
        def connected() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            return (
                "connected to"
                in self.log_path.read_text(errors="replace").split("=== start", 1)[-1]
            )

        wait_for(connected, timeout_s=timeout_s, what="the worker to connect")

    def mark(self) -> None:
        with self.log_path.open("a") as log:
            log.write("\n=== start\n")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT_SECONDS)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT_SECONDS)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# -- data ------------------------------------------------------------------------------------


def aligned_now_ms(period_s: int) -> int:
    now = int(time.time() * 1000)
    return now - now % (period_s * 1000)


def make_window(rng: random.Random, metric: str, start_ms: int, period_s: int) -> Window:
    count = rng.randint(1, 20)
    values = [round(rng.uniform(-50.0, 150.0), 3) for _ in range(count)]
    return Window(
        metric=metric,
        start_ms=start_ms,
        period_s=period_s,
        count=count,
        sum=math.fsum(values),
        min=min(values),
        max=max(values),
        first=values[0],
        last=values[-1],
        sumsq=math.fsum(v * v for v in values),
        rejected=rng.randint(0, 2),
    )


def make_batches(
    device: str,
    *,
    batches: int,
    windows_per_batch: int,
    metrics: Sequence[str] = ("temp", "pressure", "flow"),
    period_s: int = 60,
    seed: int = 1,
    boot_id: str | None = None,
    first_seq: int = 0,
    end_ms: int | None = None,
) -> list[Batch]:
    """Consecutive batches of one device, windows going back in time from `end_ms`.

    The windows cover (batches * windows_per_batch / len(metrics)) periods, so with the
    defaults a few hundred batches span hours and cross at least one UTC midnight.
    """
    rng = random.Random(seed)
    boot_id = boot_id or uuid.UUID(int=rng.getrandbits(128)).hex
    end_ms = end_ms if end_ms is not None else aligned_now_ms(period_s) - period_s * 1000
    total = batches * windows_per_batch
    slots = math.ceil(total / len(metrics))
    start_ms = end_ms - slots * period_s * 1000
    windows = [
        make_window(
            rng,
            metrics[i % len(metrics)],
            start_ms + (i // len(metrics)) * period_s * 1000,
            period_s,
        )
        for i in range(total)
    ]
    now_ms = int(time.time() * 1000)
    out = []
    for b in range(batches):
        chunk = windows[b * windows_per_batch : (b + 1) * windows_per_batch]
        out.append(
            Batch(
                device=device,
                boot_id=boot_id,
                seq=first_seq + b,
                sent_at_ms=now_ms,
                windows=tuple(chunk),
            )
        )
    return out


@dataclass(slots=True)
class Agg:
    count: int
    sum: float
    min: float
    max: float
    sumsq: float
    first: float
    first_ms: int
    last: float
    last_ms: int
    windows: int

    def add(self, w: Window) -> None:
        self.count += w.count
        self.sum += w.sum
        self.sumsq += w.sumsq
        self.min = min(self.min, w.min)
        self.max = max(self.max, w.max)
        self.windows += 1
        if w.start_ms < self.first_ms:
            self.first, self.first_ms = w.first, w.start_ms
        if w.start_ms >= self.last_ms:  # a split window's part added later ended later
            self.last, self.last_ms = w.last, w.start_ms


def expected_rollups(
    batches: Iterable[Batch], bucket_ms: int
) -> dict[tuple[str, str, int, int], Agg]:
    """Aggregates per (device, metric, period, bucket) computed straight from the batches."""
    out: dict[tuple[str, str, int, int], Agg] = {}
    for batch in batches:
        for w in batch.windows:
            key = (batch.device, w.metric, w.period_s, w.start_ms - w.start_ms % bucket_ms)
            if key in out:
                out[key].add(w)
            else:
                out[key] = Agg(
                    w.count, w.sum, w.min, w.max, w.sumsq, w.first, w.start_ms, w.last,
                    w.start_ms, 1,
                )  # fmt: skip
    return out


def stored_rollups(dsn: str, table: str) -> dict[tuple[str, str, int, int], Agg]:
    rows = query(
        dsn,
        sql.SQL(
            "SELECT d.name, m.name, r.period_s,"
            " (extract(epoch FROM r.bucket) * 1000)::bigint, r.count, r.sum, r.min, r.max,"
            " r.sumsq, r.first, (extract(epoch FROM r.first_ts) * 1000)::bigint, r.last,"
            " (extract(epoch FROM r.last_ts) * 1000)::bigint, r.windows"
            " FROM {} r JOIN devices d ON d.id = r.device_id JOIN metrics m ON m.id = r.metric_id"
        )
        .format(sql.Identifier(table))
        .as_string(),
    )
    return {(r[0], r[1], r[2], r[3]): Agg(*r[4:]) for r in rows}


def stored_readings(dsn: str) -> dict[tuple[str, str, int, int], tuple[Any, ...]]:
    rows = query(
        dsn,
        "SELECT d.name, m.name, r.period_s, (extract(epoch FROM r.ts) * 1000)::bigint,"
        " r.count, r.sum, r.min, r.max, r.first, r.last, r.sumsq, r.rejected"
        " FROM readings r JOIN devices d ON d.id = r.device_id"
        " JOIN metrics m ON m.id = r.metric_id",
    )
    return {(r[0], r[1], r[2], r[3]): tuple(r[4:]) for r in rows}


def expected_readings(batches: Iterable[Batch]) -> dict[tuple[str, str, int, int], tuple[Any, ...]]:
    return {
        (b.device, w.metric, w.period_s, w.start_ms): (
            w.count,
            w.sum,
            w.min,
            w.max,
            w.first,
            w.last,
            w.sumsq,
            w.rejected,
        )
        for b in batches
        for w in b.windows
    }


def drain_rollups(dsn: str) -> int:
    """Merge every committed rollup partial now (the worker's drain does it each interval)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return rollup_drain.drain_all(conn).partials


def assert_rollups_match(dsn: str, batches: Sequence[Batch]) -> None:
    drain_rollups(dsn)
    for table, bucket_ms in (("rollup_hourly", HOUR_MS), ("rollup_daily", DAY_MS)):
        expected = expected_rollups(batches, bucket_ms)
        stored = stored_rollups(dsn, table)
        assert stored.keys() == expected.keys(), table
        for key, want in expected.items():
            got = stored[key]
            where = f"{table} {key}"
            assert (got.count, got.min, got.max, got.windows) == (
                want.count, want.min, want.max, want.windows,
            ), where  # fmt: skip
            assert (got.first, got.first_ms, got.last, got.last_ms) == (
                want.first, want.first_ms, want.last, want.last_ms,
            ), where  # fmt: skip
            assert math.isclose(got.sum, want.sum, rel_tol=1e-9, abs_tol=1e-9), where
            assert math.isclose(got.sumsq, want.sumsq, rel_tol=1e-9, abs_tol=1e-9), where


def assert_stored_exactly(dsn: str, batches: Sequence[Batch]) -> None:
    """Readings equal the published windows one for one; rollups equal their aggregates."""
    assert stored_readings(dsn) == expected_readings(batches)
    assert_rollups_match(dsn, batches)
    keys = {(b.device, b.boot_id, b.seq) for b in batches}
    ledger = query(
        dsn,
        "SELECT d.name, replace(l.boot_id::text, '-', ''), l.seq"
        " FROM ingest_ledger l JOIN devices d ON d.id = l.device_id",
    )
    assert len(ledger) == len(set(ledger))
    assert set(ledger) == keys


# -- publishing -----------------------------------------------------------------------------


class Publisher:
    """A device's own client (its certificate), publishing batches with QoS 1."""

    def __init__(self, server: Any, device: str, *, max_inflight: int = 100) -> None:
        cert, key = server.pki.issue(device)
        self.device = device
        self.client = tls_client(
            f"pub-{device}-{uuid.uuid4().hex[:6]}",
            ca=server.ca,
            cert=cert,
            key=key,
            max_inflight_messages=max_inflight,
        )
        connected = threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect(server.host, server.port)
        self.client.loop_start()
        if not connected.wait(WAIT_SECONDS):
            raise AssertionError(f"publisher {device} could not connect")

    def publish_raw(
        self,
        payload: bytes,
        *,
        topic: str | None = None,
        content_type: str | None = None,
        wait: bool = True,
    ) -> Any:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = None
        if content_type is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = content_type
        info = self.client.publish(
            topic or topics.data_topic(self.device), payload, qos=1, properties=props
        )
        if wait:
            info.wait_for_publish(WAIT_SECONDS)
            assert info.is_published(), "no PUBACK"
        return info

    def publish(self, batches: Iterable[Batch], *, encoding: str = "msgpack") -> None:
        infos = [
            self.publish_raw(
                encode_batch(b, encoding=encoding),  # type: ignore[arg-type]
                content_type=content_type_for(encoding),  # type: ignore[arg-type]
                wait=False,
            )
            for b in batches
        ]
        for info in infos:
            info.wait_for_publish(WAIT_SECONDS)
            assert info.is_published(), "no PUBACK"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publishers() -> Iterator[Callable[..., Publisher]]:
    made: list[Publisher] = []

    def make(server: Any, device: str) -> Publisher:
        pub = Publisher(server, device)
        made.append(pub)
        return pub

    yield make
    for pub in made:
        with contextlib.suppress(Exception):
            pub.close()


def count_by_device(batches: Iterable[Batch]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for b in batches:
        counts[b.device] += 1
    return dict(counts)
