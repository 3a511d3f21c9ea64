"""The ingest worker: receive, classify, batch, store, commit, THEN acknowledge.

Two threads. The main thread takes messages from the consumer's queue, classifies
them (classify.py) and collects them into commit batches (batcher.py); the committer
thread stores each batch in one transaction (store.py) and only after COMMIT returns
acknowledges its messages, so a crash at any point leaves them unacknowledged in the
broker's session and they are delivered again; the ingest ledger makes the second
delivery a no-op. While one batch is written the next is decoded.

When the database is down or unusable the worker stops consuming (disconnect: the
session keeps the unacked messages), backs off, reconnects the database, then the
broker, which redelivers everything unacked (docs/cloud.md, docs/guarantees.md).
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import psycopg

from millrace import topics
from millrace.cloud import opsevents
from millrace.cloud.alerts.engine import AlertEngine
from millrace.cloud.alerts.notify import NotificationSender, enqueue
from millrace.cloud.config import IngestConfig
from millrace.cloud.dsn import connect_writer
from millrace.cloud.ingest.batcher import Batcher
from millrace.cloud.ingest.classify import Limits, classify, failed_too_often, kind_label
from millrace.cloud.ingest.consumer import Consumers
from millrace.cloud.ingest.deliveries import MAX_FAILED_DELIVERIES, FailedDeliveries
from millrace.cloud.ingest.messages import Classified, DeadLetter, Inbound, Incoming
from millrace.cloud.ingest.metrics import HealthServer, IngestMetrics, loop_health
from millrace.cloud.ingest.receipts import ReceiptReader, dead_letter_receipts, streams_of
from millrace.cloud.ingest.rollup_drain import RollupDrainer
from millrace.cloud.ingest.store import BatchStore, DatabaseDown, Stored, describe, error_kind
from millrace.cloud.ingest.writer import BatchWriter
from millrace.cloud.retention import RetentionPolicy, RetentionScheduler
from millrace.errors import IngestError

log = logging.getLogger(__name__)

LOOP_WAKE_SECONDS: Final = 0.5
DB_BACKOFF_MIN_SECONDS: Final = 0.5
DB_BACKOFF_MAX_SECONDS: Final = 10.0
DB_CONNECT_TIMEOUT_SECONDS: Final = 5
# Long enough for any sane batch, short enough that a wedged lock surfaces.
STATEMENT_TIMEOUT_MS: Final = 60_000
# Allocations between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD_OBJECTS: Final = 10_000
# bench/ingest.py: +0.02-0.04 of ratio_vs_floor over the default 0.005 s.
GIL_SWITCH_INTERVAL_SECONDS: Final = 0.001


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


def connect_db(dsn: str, *, application_name: str) -> psycopg.Connection[Any]:
    """An autocommit connection to the primary, with keepalives so a dead server is noticed
    in seconds; a multi-host DSN reaches whichever node is primary now (cloud/dsn.py)."""
    return connect_writer(
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
        self._consumer: Consumers | None = None
        self._store = BatchStore(
            lambda kind: self.metrics.db_errors.labels(kind).inc(),
            lambda outcome: self.metrics.transactions.labels(outcome).inc(),
        )
        # Per-device bounds from [limits]; dead letters over their rate are counted here.
        self._store.writer = BatchWriter(
            config.limits, on_suppressed=self.metrics.dead_letters_suppressed.inc
        )
        self._store.notify = config.notify
        self._store.brokers = tuple(f"{host}:{port}" for host, port in config.broker.endpoints)
        # Delivers notification intents after commit, on threads and connections of its own,
        # so a dead webhook or mail server never slows ingest (cloud/alerts/notify.py).
        self._sender = NotificationSender(
            config.notify,
            self._connect,
            on_outcome=lambda channel, outcome, n: self.metrics.notifications.labels(
                channel, outcome
            ).inc(n),
        )
        # Merges the commits' rollup partials on a connection of its own (rollup_drain.py).
        self._drainer = RollupDrainer(
            self._connect, interval_s=config.batch.rollup_drain_ms / 1000, metrics=self.metrics
        )
        self._failed = FailedDeliveries()
        self._receipts = ReceiptReader()
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
            self._sender.start()  # and sends what a previous run left pending
            self._drainer.start()
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
            self._drainer.stop()  # after the last commit: drains everything pending
            self._sender.stop()
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
            self._http = HealthServer(
                self.metrics.registry, self.health, host=http.host, port=http.port
            )
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
                " cannot drop chunks or delete rows; give it a login in millrace_retention"
            )
        dsn = settings.dsn or self.config.dsn
        self._retention = RetentionScheduler(
            lambda: connect_writer(dsn, connect_timeout=DB_CONNECT_TIMEOUT_SECONDS),
            RetentionPolicy.from_days(settings.days, pack_after_days=settings.pack_after_days),
            interval_s=settings.interval_s,
        )
        self._retention.start()

    def _start_consumer(self) -> None:
        self._consumer = Consumers(self.config.broker, self._inbox)
        self._consumer.start()

    def _open_db(self) -> bool:
        """Connect with backoff until it works or a stop is requested; False if stopped."""
        delay = DB_BACKOFF_MIN_SECONDS
        while not self._stop.is_set():
            try:
                conn = self._connect()
                conn.execute("SELECT 1")
                self._note_primary(conn)
                self._conn = conn
                self._engine = AlertEngine.load(conn, reload_after_s=self.config.alert_refresh_s)
                self.metrics.db_up.set(1)
                log.info("database connected")
                return True
            except psycopg.Error as exc:
                self.metrics.db_up.set(0)
                self.metrics.db_errors.labels("connect").inc()
                log.warning("database unavailable (%s); retry in %.1f s", describe(exc), delay)
            self._stop.wait(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, DB_BACKOFF_MAX_SECONDS)
        return False

    def _note_primary(self, conn: psycopg.Connection[Any]) -> None:
        """A database failover is an event operators see: the primary, if it changed."""
        try:
            opsevents.note_primary(conn)
        except psycopg.Error as exc:  # not worth refusing to ingest for
            log.warning("database primary not recorded (%s)", describe(exc))

    def _recover(self, why: str) -> None:
        """Stop consuming, reconnect the database, then the broker (which redelivers)."""
        log.warning("database down (%s): pausing consumption", why)
        self.metrics.db_up.set(0)
        if self._consumer is not None:
            self._consumer.stop()
            self._consumer = None
        self.metrics.broker_up.set(0)
        for host, port in self.config.broker.endpoints:
            self.metrics.broker_subscribed.labels(f"{host}:{port}").set(0)
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
        for member in consumer.members if consumer is not None else ():
            self.metrics.broker_subscribed.labels(member.where).set(1 if member.connected else 0)
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
                if not exc.outage:
                    self._charge(task, str(exc))
                self._fail(str(exc))
            except Exception as exc:  # a bug: recover like an outage, nothing is acked
                log.exception("committer failed")
                self._charge(task, repr(exc))
                self._fail(repr(exc))
            finally:
                self._handoff.task_done()

    def _charge(self, task: _Task | None, why: str) -> None:
        """An unexplained failure may be a message's fault: count it against each of them."""
        if task is None:
            return
        charged = self._failed.charge((p.inbound for p in task.pending), why)
        self.metrics.failed_deliveries.inc(charged)

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
        failures, last_failure = self._failed.failures(msg)
        if failures >= MAX_FAILED_DELIVERIES:
            log.warning("dead-lettering a message after %s failed deliveries", failures)
            item: Classified = failed_too_often(msg, failures, last_failure)
        else:
            item = classify(msg, limits=self._limits, now_ms=now_ms)
        pending = _Pending(msg, item)
        if failures:
            # Alone in its transaction: batch-mates of a culprit commit on their next
            # delivery, and only the culprit is charged again.
            if len(self._batcher):
                self._hand_over(_Task("batch", self._epoch, self._batcher.take()))
            self._hand_over(_Task("batch", self._epoch, [pending]))
            return
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
        stored = self._store.store(self._conn, [p.item for p in pending], self._engine)
        commit_s = time.monotonic() - started
        consumer = self._consumer
        acked = consumer.ack([p.inbound for p in pending]) if consumer else 0
        self._failed.clear(p.inbound for p in pending)
        self._account(pending, stored, commit_s, acked)
        if stored.alerts:
            self._sender.wake()
        if consumer is not None:
            for alert in stored.alerts:
                if consumer.publish(topics.alert_topic(alert.device), alert.to_json()):
                    self.metrics.alerts.inc()
            self._send_receipts(consumer, pending, stored)

    def _send_receipts(self, consumer: Consumers, pending: list[_Pending], stored: Stored) -> None:
        """Tell each device what is committed (after COMMIT; read from the ledger).

        Each receipt goes back through the broker(s) that carried the device's batches:
        that is where the device is. A receipt that is not sent (or sent where the device
        no longer is, after it moved brokers) is no loss: the edge sends the batch again
        and the duplicate is receipted then.
        """
        started = time.monotonic()
        batches = [
            p.item.batch
            for p in pending
            if isinstance(p.item, Incoming) and id(p.item) not in stored.refused
        ]
        letters = [p.item for p in pending if isinstance(p.item, DeadLetter)]
        letters += stored.refused.values()
        receipts = dead_letter_receipts(letters, now_ms=time.time_ns() // 1_000_000)
        if batches and self._conn is not None:
            try:
                receipts += self._receipts.receipts(self._conn, streams_of(batches))
            except psycopg.Error as exc:
                self.metrics.db_errors.labels(error_kind(self._conn, exc)).inc()
                log.warning("receipts not sent (edges will resend): %s", describe(exc))
        carried = _brokers_by_device(pending)
        everywhere = set(range(len(consumer.members)))
        for receipt in receipts:
            brokers = carried.get(receipt.device, everywhere)
            topic = topics.receipt_topic(receipt.device)
            if consumer.publish_via(brokers, topic, receipt.to_json()):
                self.metrics.receipts.inc()
            else:
                log.info("receipt for %s not sent: broker not connected", receipt.device)
        self.metrics.receipt_seconds.inc(time.monotonic() - started)

    def _account(
        self, pending: list[_Pending], stored: Stored, commit_s: float, acked: int
    ) -> None:
        m = self.metrics
        m.batches.inc()
        m.commit_seconds.observe(commit_s)
        m.last_commit.set(time.time())
        m.inbox.set(self._inbox.qsize())
        now_ms = time.time() * 1000
        for p in pending:
            item = stored.refused.get(id(p.item), p.item)
            kind = kind_label(p.inbound.topic)
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
            m.gaps_dropped.inc(result.gaps_dropped)
            m.metrics_refused.inc(result.metrics_refused)
        if acked < len(pending):
            log.info(
                "committed %s messages, acked %s (the rest belong to a closed connection"
                " and will be redelivered, then skipped as duplicates)",
                len(pending),
                acked,
            )

    def _check_no_data(self) -> None:
        engine, conn, consumer = self._engine, self._conn, self._consumer
        if engine is None or conn is None or conn.closed:
            return
        try:
            with conn.transaction():
                messages = engine.check_no_data(conn, datetime.now(UTC))
                enqueue(conn, self.config.notify, messages)
        except psycopg.Error as exc:
            if error_kind(conn, exc) == "down":
                raise DatabaseDown(describe(exc)) from exc
            log.error("no-data check failed: %s", describe(exc))
            return
        if messages:
            self._sender.wake()
        for alert in messages:
            if consumer is not None and consumer.publish(
                topics.alert_topic(alert.device), alert.to_json()
            ):
                self.metrics.alerts.inc()


def _brokers_by_device(pending: list[_Pending]) -> dict[str, set[int]]:
    """Which brokers carried each device's batches (and dead-lettered batches) in a commit."""
    out: dict[str, set[int]] = {}
    for p in pending:
        item = p.item
        if isinstance(item, Incoming):
            device = item.batch.device
        elif isinstance(item, DeadLetter) and item.batch_key is not None:
            device = item.batch_key[0]
        else:
            continue
        out.setdefault(device, set()).add(p.inbound.broker)
    return out


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
