"""The ingest worker's loop: receive, decode, validate, write, commit, THEN acknowledge.

Messages are classified as they arrive (decode + validate), collected into a
batch that closes by rows or time, and written in one transaction together
with dead letters, device state, heartbeats and alert evaluation. Only after
COMMIT returns are the messages acknowledged, so a crash at any point leaves
them unacknowledged in the broker's session and they are delivered again;
the ingest ledger makes the second delivery a no-op.

Failures, by kind:
- a message that cannot be stored (bad payload, bad values) -> dead letter, acked;
- a data error from the database (class 22/23/54) -> the batch is retried one
  message per transaction, and only the offending message is dead-lettered;
- deadlock/serialization/lock timeout -> the batch is retried;
- the database unreachable or unusable (down, privileges, schema missing) ->
  stop consuming (disconnect: the session keeps the unacked messages), back
  off and retry, reconnect, and the broker redelivers everything unacked.
"""

from __future__ import annotations

import gc
import logging
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import psycopg

from millrace import topics
from millrace.cloud import registry
from millrace.cloud.alerts.engine import AlertEngine
from millrace.cloud.alerts.rules import ANY_METRIC
from millrace.cloud.batcher import Batcher
from millrace.cloud.config import IngestConfig
from millrace.cloud.consumer import Consumer, Inbound
from millrace.cloud.metrics import HealthServer, IngestMetrics, loop_health
from millrace.cloud.retention import RetentionPolicy, RetentionScheduler
from millrace.cloud.validate import Limits, validate_batch
from millrace.cloud.writer import BatchWriter, DeadLetter, Incoming, WriteResult, write_dead_letters
from millrace.errors import IngestError, WireError
from millrace.wire import AlertMessage, Batch, DeviceState, Heartbeat, Rejection, decode_batch

log = logging.getLogger(__name__)

LOOP_WAKE_SECONDS: Final = 0.5
DB_BACKOFF_MIN_SECONDS: Final = 0.5
DB_BACKOFF_MAX_SECONDS: Final = 10.0
DB_CONNECT_TIMEOUT_SECONDS: Final = 5
# Long enough for any sane batch, short enough that a wedged lock surfaces.
STATEMENT_TIMEOUT_MS: Final = 60_000
TRANSIENT_RETRIES: Final = 5
# SQLSTATE classes that blame the data of one message, not the database.
POISON_SQLSTATE_CLASSES: Final = frozenset({"22", "23", "54"})
# Allocations between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD_OBJECTS: Final = 10_000
# bench/ingest.py: +0.02-0.04 of ratio_vs_floor over the default 0.005 s.
GIL_SWITCH_INTERVAL_SECONDS: Final = 0.001


class DatabaseDown(Exception):
    """The database cannot be used right now; the worker must back off."""


@dataclass(frozen=True, slots=True)
class StateItem:
    state: DeviceState
    received_at: datetime


@dataclass(frozen=True, slots=True)
class HealthItem:
    heartbeat: Heartbeat
    received_at: datetime


Classified = Incoming | StateItem | HealthItem | DeadLetter


@dataclass(slots=True)
class _Pending:
    """A received message and what it turned out to be."""

    inbound: Inbound
    item: Classified

    @property
    def rows(self) -> int:
        item = self.item
        if isinstance(item, Incoming):
            return len(item.batch.windows) + len(item.batch.events)
        return 1


@dataclass(frozen=True, slots=True)
class _Task:
    """Work for the committer thread."""

    kind: Literal["batch", "no_data"]
    epoch: int
    pending: list[_Pending]


@dataclass(slots=True)
class _Stored:
    result: WriteResult | None = None
    alerts: list[AlertMessage] = field(default_factory=list)
    # id(item) -> the dead letter written for an item the database refused
    refused: dict[int, DeadLetter] = field(default_factory=dict)


def _dead(msg: Inbound, device: str | None, code: str, reason: str) -> DeadLetter:
    return DeadLetter(
        topic=msg.topic,
        device=device,
        code=code,
        reason=reason,
        content_type=msg.content_type,
        payload=msg.payload,
        received_at=msg.received_at,
    )


def classify(msg: Inbound, *, limits: Limits, now_ms: int) -> Classified:
    """Decode and validate one message; anything unusable becomes a dead letter."""
    try:
        topic = topics.parse_topic(msg.topic)
    except WireError as exc:
        return _dead(msg, None, "bad_topic", exc.reason)
    device = topic.device_id
    if topic.kind == "data":
        decoded = decode_batch(msg.payload, content_type=msg.content_type)
        if isinstance(decoded, Rejection):
            return _dead(msg, device, decoded.code, decoded.reason)
        problem = validate_batch(decoded, topic_device=device, now_ms=now_ms, limits=limits)
        if problem is not None:
            return _dead(msg, device, problem.code, problem.reason)
        return Incoming(decoded, msg.received_at)
    if topic.kind in ("state", "health"):
        try:
            parsed: DeviceState | Heartbeat = (
                DeviceState.from_json(msg.payload)
                if topic.kind == "state"
                else Heartbeat.from_json(msg.payload)
            )
        except WireError as exc:
            return _dead(msg, device, "invalid", exc.reason)
        if parsed.device != device:
            return _dead(
                msg,
                device,
                "identity_mismatch",
                f"payload device {parsed.device!r} published on the topic of {device!r}",
            )
        if isinstance(parsed, DeviceState):
            return StateItem(parsed, msg.received_at)
        return HealthItem(parsed, msg.received_at)
    return _dead(msg, device, "bad_topic", f"{topic.kind} messages are not ingested")


def _sqlstate_class(exc: psycopg.Error) -> str:
    return (exc.sqlstate or "")[:2]


def connect_db(dsn: str, *, application_name: str) -> psycopg.Connection[Any]:
    """An autocommit connection with keepalives, so a dead server is noticed in seconds."""
    return psycopg.connect(
        dsn,
        autocommit=True,
        application_name=application_name[:63],
        connect_timeout=DB_CONNECT_TIMEOUT_SECONDS,
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
        options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
    )


class Worker:
    """One ingest worker; `run()` blocks until `request_stop()` (SIGTERM) or a fatal error."""

    def __init__(
        self,
        config: IngestConfig,
        *,
        connect: Callable[[], psycopg.Connection[Any]] | None = None,
    ) -> None:
        self.config = config
        self.metrics = IngestMetrics()
        self._connect = connect or (
            lambda: connect_db(
                config.dsn, application_name=f"millrace-ingest {config.broker.client_id}"
            )
        )
        self._limits = Limits(
            max_age_s=config.validation.max_age_s,
            max_skew_s=config.validation.max_skew_s,
            allowed_periods_s=config.validation.allowed_periods_s,
        )
        self._inbox: queue.Queue[Inbound] = queue.Queue()
        self._batcher: Batcher[_Pending] = Batcher(
            max_rows=config.batch.max_rows, max_delay_s=config.batch.max_delay_ms / 1000
        )
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._consumer: Consumer | None = None
        self._writer = BatchWriter()
        self._engine: AlertEngine | None = None
        self._last_turn = time.monotonic()
        self._next_no_data = time.monotonic() + config.no_data_check_s
        self._http: HealthServer | None = None
        self._retention: RetentionScheduler | None = None
        # Closed batches go to the committer thread; one may wait while one is written,
        # so decoding the next batch overlaps the database's work on the previous one.
        self._handoff: queue.Queue[_Task | None] = queue.Queue(maxsize=1)
        self._committer: threading.Thread | None = None
        self._epoch = 0
        self._db_failed = threading.Event()
        self._db_failure = ""
        self.ready = threading.Event()

    # -- lifecycle --------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish the current batch, commit, ack, disconnect (safe from a signal handler)."""
        self._stop.set()

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http else None

    def health(self) -> Any:
        consumer = self._consumer
        return loop_health(
            db=self._conn is not None and not self._conn.closed,
            broker=consumer is not None and consumer.connected,
            last_turn_mono=self._last_turn,
        )

    def run(self) -> int:
        """The worker's life: connect, loop, drain on stop."""
        self._start_http()
        try:
            if not self._open_db():
                return 0
            self._committer = threading.Thread(
                target=self._commit_loop, name="millrace-ingest-commit", daemon=True
            )
            self._committer.start()
            self._start_consumer()
            self._start_retention()
            self.ready.set()
            while not self._stop.is_set():
                try:
                    self._turn()
                except DatabaseDown as exc:
                    self._recover(str(exc))
            self._drain_on_stop()
            return 0
        finally:
            self._stop_committer()
            if self._retention is not None:
                self._retention.stop()
            if self._consumer is not None:
                self._consumer.stop()
            if self._conn is not None:
                self._conn.close()
            if self._http is not None:
                self._http.stop()
            log.info("ingest worker stopped")

    def _start_http(self) -> None:
        http = self.config.http
        if http.port == 0:
            return
        try:
            self._http = HealthServer(self.metrics, self.health, host=http.host, port=http.port)
        except OSError as exc:
            raise IngestError(f"cannot serve metrics on {http.host}:{http.port}: {exc}") from exc
        self._http.start()

    def _start_retention(self) -> None:
        settings = self.config.retention
        if not settings.enabled:
            return
        if settings.dsn is None:
            log.warning(
                "retention.dsn_file is not set: retention logs in as the ingest role, which"
                " cannot drop chunks or delete rows; give it the schema owner's DSN"
            )
        dsn = settings.dsn or self.config.dsn
        self._retention = RetentionScheduler(
            lambda: psycopg.connect(dsn, connect_timeout=DB_CONNECT_TIMEOUT_SECONDS),
            RetentionPolicy.from_days(settings.days),
            interval_s=settings.interval_s,
        )
        self._retention.start()

    def _start_consumer(self) -> None:
        self._consumer = Consumer(self.config.broker, self._inbox)
        self._consumer.start()

    def _open_db(self) -> bool:
        """Connect with backoff until it works or a stop is requested; False if stopped."""
        delay = DB_BACKOFF_MIN_SECONDS
        while not self._stop.is_set():
            try:
                conn = self._connect()
                conn.execute("SELECT 1")
                self._conn = conn
                self._engine = AlertEngine.load(conn, reload_after_s=self.config.alert_refresh_s)
                self.metrics.db_up.set(1)
                log.info("database connected")
                return True
            except psycopg.Error as exc:
                self.metrics.db_up.set(0)
                self.metrics.db_errors.labels("connect").inc()
                log.warning("database unavailable (%s); retry in %.1f s", _short(exc), delay)
            self._stop.wait(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, DB_BACKOFF_MAX_SECONDS)
        return False

    def _recover(self, why: str) -> None:
        """Stop consuming, reconnect the database, then the broker (which redelivers)."""
        log.warning("database down (%s): pausing consumption", why)
        self.metrics.db_up.set(0)
        if self._consumer is not None:
            self._consumer.stop()
            self._consumer = None
        self.metrics.broker_up.set(0)
        # Batches already handed over belong to the old epoch: the committer skips them.
        self._epoch += 1
        dropped = len(self._batcher.take())
        while True:
            try:
                self._inbox.get_nowait()
                dropped += 1
            except queue.Empty:
                break
        self._handoff.join()  # the committer is idle from here on
        log.info(
            "released the batches in progress and %s queued messages: the broker redelivers them",
            dropped,
        )
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._open_db():
            self._db_failed.clear()
            self._start_consumer()

    # -- the loop ---------------------------------------------------------------------------

    def _turn(self) -> None:
        if self._db_failed.is_set():
            raise DatabaseDown(self._db_failure)
        now = time.monotonic()
        self._last_turn = now
        consumer = self._consumer
        self.metrics.broker_up.set(1 if consumer is not None and consumer.connected else 0)
        deadline = self._batcher.deadline()
        timeout = LOOP_WAKE_SECONDS if deadline is None else max(0.0, deadline - now)
        try:
            msg: Inbound | None = self._inbox.get(timeout=min(timeout, LOOP_WAKE_SECONDS))
        except queue.Empty:
            msg = None
        now_ms = int(time.time() * 1000)
        while msg is not None:
            self._add(msg, now_ms)
            if self._batcher.is_full():
                break
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                msg = None
        if self._batcher.is_due(time.monotonic()):
            self._hand_over(_Task("batch", self._epoch, self._batcher.take()))
        if time.monotonic() >= self._next_no_data:
            self._next_no_data = time.monotonic() + self.config.no_data_check_s
            self._hand_over(_Task("no_data", self._epoch, []))

    def _hand_over(self, task: _Task) -> None:
        """Queue work for the committer; blocks while it is behind (backpressure)."""
        while not self._db_failed.is_set():
            try:
                self._handoff.put(task, timeout=LOOP_WAKE_SECONDS)
                return
            except queue.Full:
                self._last_turn = time.monotonic()  # waiting on the database is not a stall

    def _commit_loop(self) -> None:
        """The committer thread: the only user of the database connection while running."""
        while True:
            task = self._handoff.get()
            try:
                if task is None:
                    return
                if task.epoch != self._epoch or self._db_failed.is_set():
                    continue  # from before a recovery: its messages are redelivered
                if task.kind == "batch":
                    self._flush(task.pending)
                else:
                    self._check_no_data()
            except DatabaseDown as exc:
                self._fail(str(exc))
            except Exception as exc:  # a bug: recover like an outage, nothing is acked
                log.exception("committer failed")
                self._fail(repr(exc))
            finally:
                self._handoff.task_done()

    def _fail(self, why: str) -> None:
        self._db_failure = why
        self._db_failed.set()

    def _stop_committer(self) -> None:
        committer, self._committer = self._committer, None
        if committer is None or not committer.is_alive():
            return
        self._handoff.put(None)
        committer.join()

    def _add(self, msg: Inbound, now_ms: int) -> None:
        if msg.dup:
            self.metrics.redeliveries.inc()
        item = classify(msg, limits=self._limits, now_ms=now_ms)
        pending = _Pending(msg, item)
        self._batcher.add(pending, rows=pending.rows, now=msg.received_mono)

    def _drain_on_stop(self) -> None:
        """SIGTERM: store what was received, commit, ack; then the caller disconnects."""
        now_ms = int(time.time() * 1000)
        while True:
            try:
                self._add(self._inbox.get_nowait(), now_ms)
            except queue.Empty:
                break
        pending = self._batcher.take()
        if pending and self._conn is not None:
            self._hand_over(_Task("batch", self._epoch, pending))
        self._stop_committer()
        if self._db_failed.is_set():
            log.warning("stopping without the last batch (redelivered later): %s", self._db_failure)
        elif pending:
            log.info("stopping: committed and acked the last %s messages", len(pending))

    # -- one batch --------------------------------------------------------------------------

    def _flush(self, pending: list[_Pending]) -> None:
        if not pending:
            return
        started = time.monotonic()
        stored = self._store([p.item for p in pending])
        commit_s = time.monotonic() - started
        consumer = self._consumer
        acked = consumer.ack([p.inbound for p in pending]) if consumer else 0
        self._account(pending, stored, commit_s, acked)
        if consumer is not None:
            for alert in stored.alerts:
                if consumer.publish(topics.alert_topic(alert.device), alert.to_json()):
                    self.metrics.alerts.inc()

    def _account(
        self, pending: list[_Pending], stored: _Stored, commit_s: float, acked: int
    ) -> None:
        m = self.metrics
        m.batches.inc()
        m.commit_seconds.observe(commit_s)
        m.last_commit.set(time.time())
        m.inbox.set(self._inbox.qsize())
        now_ms = time.time() * 1000
        for p in pending:
            item = stored.refused.get(id(p.item), p.item)
            kind = _kind_label(p.inbound.topic)
            if isinstance(item, DeadLetter):
                m.messages.labels(kind, "dead_letter").inc()
                m.dead_letters.labels(item.code).inc()
            else:
                m.messages.labels(kind, "stored").inc()
                if isinstance(item, Incoming):
                    m.lag_seconds.observe(max(0.0, (now_ms - item.batch.sent_at_ms) / 1000))
        result = stored.result
        if result is not None:
            m.rows.labels("readings").inc(result.readings)
            m.rows.labels("events").inc(result.events)
            m.duplicates.inc(result.duplicate_batches)
            m.gaps.inc(result.gaps_opened)
        if acked < len(pending):
            log.info(
                "committed %s messages, acked %s (the rest belong to a closed connection"
                " and will be redelivered, then skipped as duplicates)",
                len(pending),
                acked,
            )

    def _store(self, items: Sequence[Classified]) -> _Stored:
        """Write `items` in one transaction, retrying transient errors, isolating poison."""
        for attempt in range(TRANSIENT_RETRIES):
            try:
                return self._store_once(items)
            except psycopg.Error as exc:
                kind = self._classify_db_error(exc)
                self.metrics.db_errors.labels(kind).inc()
                if kind == "transient":
                    log.info("transient database error (%s); retry %s", _short(exc), attempt + 1)
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if kind == "poison":
                    log.warning("batch refused (%s); storing message by message", _short(exc))
                    return self._store_isolated(items)
                raise DatabaseDown(_short(exc)) from exc
            except Exception:
                log.exception("unexpected error writing a batch; storing message by message")
                return self._store_isolated(items)
        raise DatabaseDown("transient errors did not clear")

    def _classify_db_error(self, exc: psycopg.Error) -> str:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return "down"
        if isinstance(
            exc,
            psycopg.errors.TransactionRollback
            | psycopg.errors.QueryCanceled
            | psycopg.errors.LockNotAvailable,
        ):
            return "transient"
        if _sqlstate_class(exc) in POISON_SQLSTATE_CLASSES:
            return "poison"
        return "down"  # privileges, missing schema, disk full: not the message's fault

    def _store_isolated(self, items: Sequence[Classified]) -> _Stored:
        """One transaction per message; a message that still fails is dead-lettered."""
        total = _Stored()
        for item in items:
            try:
                one = self._store_once([item])
            except psycopg.Error as exc:
                kind = self._classify_db_error(exc)
                if kind == "down":
                    raise DatabaseDown(_short(exc)) from exc
                total.refused[id(item)] = self._refused(item, f"db_{kind}", _short(exc))
                continue
            except Exception as exc:
                log.exception("unexpected error storing one message")
                total.refused[id(item)] = self._refused(item, "internal_error", repr(exc))
                continue
            if one.result is not None:
                total.result = _merge(total.result, one.result)
            total.alerts.extend(one.alerts)
        return total

    def _refused(self, item: Classified, code: str, reason: str) -> DeadLetter:
        """Dead-letter a message the database refused, in a transaction of its own."""
        letter = _refusal_letter(item, code, reason)
        conn = self._require_conn()
        try:
            with conn.transaction(), conn.cursor() as cur:
                write_dead_letters(cur, [letter])
        except psycopg.Error as exc:
            raise DatabaseDown(_short(exc)) from exc
        return letter

    def _require_conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            raise DatabaseDown("not connected")
        return self._conn

    def _store_once(self, items: Sequence[Classified]) -> _Stored:
        conn = self._require_conn()
        incoming = [i for i in items if isinstance(i, Incoming)]
        dead = [i for i in items if isinstance(i, DeadLetter)]
        self._writer.prepare(conn, (i.batch for i in incoming))
        out = _Stored()
        with conn.transaction():
            if incoming:
                out.result = self._writer.write(conn, incoming, report=self._alert_metrics())
            if dead:
                with conn.cursor() as cur:
                    write_dead_letters(cur, dead)
            for item in items:
                if isinstance(item, StateItem):
                    registry.apply_state(conn, item.state, received_at=item.received_at)
                elif isinstance(item, HealthItem):
                    registry.apply_heartbeat(conn, item.heartbeat, received_at=item.received_at)
            if out.result is not None and out.result.windows and self._engine is not None:
                out.alerts = self._evaluate_alerts(conn, out.result)
        return out

    def _alert_metrics(self) -> Callable[[str], bool]:
        """Which metrics the alert rules look at (so only their windows are materialised)."""
        engine = self._engine
        watched = {loaded.rule.metric for loaded in engine.rules} if engine else set()
        if ANY_METRIC in watched:
            return lambda _metric: True
        return watched.__contains__

    def _evaluate_alerts(
        self, conn: psycopg.Connection[Any], result: WriteResult
    ) -> list[AlertMessage]:
        """Alert rules run in a savepoint: a failing rule must not cost the data."""
        assert self._engine is not None
        try:
            with conn.transaction():
                return self._engine.evaluate(conn, result.windows)
        except psycopg.Error as exc:
            if self._classify_db_error(exc) in ("down", "transient"):
                raise
            log.error("alert evaluation failed, batch stored without it: %s", _short(exc))
        except Exception:
            log.exception("alert evaluation failed, batch stored without it")
        self.metrics.db_errors.labels("alerts").inc()
        return []

    def _check_no_data(self) -> None:
        engine, conn, consumer = self._engine, self._conn, self._consumer
        if engine is None or conn is None or conn.closed:
            return
        try:
            with conn.transaction():
                messages = engine.check_no_data(conn, datetime.now(UTC))
        except psycopg.Error as exc:
            if self._classify_db_error(exc) == "down":
                raise DatabaseDown(_short(exc)) from exc
            log.error("no-data check failed: %s", _short(exc))
            return
        for alert in messages:
            if consumer is not None and consumer.publish(
                topics.alert_topic(alert.device), alert.to_json()
            ):
                self.metrics.alerts.inc()


def _refusal_letter(item: Classified, code: str, reason: str) -> DeadLetter:
    """A dead letter for a decoded message the database refused (payload re-encoded)."""
    if isinstance(item, DeadLetter):
        return DeadLetter(
            item.topic, item.device, code, reason, item.content_type, item.payload, item.received_at
        )
    if isinstance(item, Incoming):
        from millrace.wire import CONTENT_TYPE_MSGPACK, encode_batch

        b: Batch = item.batch
        return DeadLetter(
            topics.data_topic(b.device),
            b.device,
            code,
            reason,
            CONTENT_TYPE_MSGPACK,
            encode_batch(b),
            item.received_at,
        )
    if isinstance(item, StateItem):
        s = item.state
        return DeadLetter(
            topics.state_topic(s.device),
            s.device,
            code,
            reason,
            None,
            s.to_json(),
            item.received_at,
        )
    h = item.heartbeat
    return DeadLetter(
        topics.health_topic(h.device), h.device, code, reason, None, h.to_json(), item.received_at
    )


def _merge(a: WriteResult | None, b: WriteResult) -> WriteResult:
    if a is None:
        return b
    return WriteResult(
        stored_batches=a.stored_batches + b.stored_batches,
        duplicate_batches=a.duplicate_batches + b.duplicate_batches,
        readings=a.readings + b.readings,
        events=a.events + b.events,
        rollup_rows=a.rollup_rows + b.rollup_rows,
        gaps_opened=a.gaps_opened + b.gaps_opened,
        windows=a.windows + b.windows,
        stored_keys=a.stored_keys | b.stored_keys,
    )


def _kind_label(topic: str) -> str:
    parts = topic.split("/")
    return parts[4] if len(parts) == 5 and parts[4] in ("data", "state", "health") else "other"


def _short(exc: BaseException) -> str:
    """One line about a database error, without connection parameters."""
    if isinstance(exc, psycopg.Error):
        primary = exc.diag.message_primary if exc.diag else None
        text = primary or (str(exc).splitlines() or [type(exc).__name__])[0]
        code = f" {exc.sqlstate}" if exc.sqlstate else ""
        return f"{type(exc).__name__}{code}: {text}"
    return f"{type(exc).__name__}: {exc}"


def run_worker(config: IngestConfig) -> int:
    """`millrace ingest`: run one worker until SIGTERM/SIGINT."""
    worker = Worker(config)

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("signal %s: finishing the current batch", signal.Signals(signum).name)
        worker.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    # Every decoded window is a tracked object that lives until its batch commits; with the
    # start-up heap frozen and fewer young collections the collector costs ~0.5 us less
    # per window (bench/ingest.py). Only the worker process does this, not its importers.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD_OBJECTS, *gc.get_threshold()[1:])
    # The committer gives up the GIL at every database wait; the decoding thread should
    # hand it back sooner than CPython's 5 ms, or the committer's waits stretch.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    return worker.run()
