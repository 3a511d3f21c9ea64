"""One commit batch, one transaction: retry what is transient, isolate what is poison.

`BatchStore.store` writes a commit batch's items (batches, dead letters, device
state, heartbeats) and evaluates alert rules on the stored windows, all in one
transaction. Database errors are sorted by what they blame (`error_kind`):
- the data of one message (SQLSTATE class 22/23/54, or a client-side `DataError`
  such as a NUL in a text, which has no SQLSTATE) -> the batch is bisected: each
  half is tried in its own transaction, so one refused message among n costs
  about log2(n) rolled-back and log2(n) committed transactions, and only the
  offending message is dead-lettered (`db_poison`);
- contention (deadlock, serialization, lock or statement timeout) -> retried;
- the connection or the server (connection lost, class 08/53/57P/58, or the
  database unusable for everyone: privileges, schema missing, class 28/3D/3F/42;
  a standby's read-only refusal, 25006)
  -> `DatabaseDown(outage=True)`: the worker stops consuming and recovers, and
  the broker redelivers (docs/cloud.md);
- anything else (an unknown SQLSTATE, a bug) -> `DatabaseDown(outage=False)`:
  recovered like an outage, but the messages of the batch are charged a failed
  delivery, and one that keeps failing is dead-lettered (worker.py, deliveries.py).
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import psycopg

from millrace import topics
from millrace.cloud import registry
from millrace.cloud.alerts.engine import AlertEngine
from millrace.cloud.alerts.notify import NotifySettings, enqueue
from millrace.cloud.alerts.rules import ANY_METRIC
from millrace.cloud.ingest.messages import (
    Classified,
    DeadLetter,
    HealthItem,
    Incoming,
    StateItem,
    WriteResult,
)
from millrace.cloud.ingest.writer import BatchWriter
from millrace.wire import CONTENT_TYPE_MSGPACK, AlertMessage, encode_batch

log = logging.getLogger(__name__)

TRANSIENT_RETRIES: Final = 5
# SQLSTATE classes that blame the data of one message, not the database.
POISON_SQLSTATE_CLASSES: Final = frozenset({"22", "23", "54"})
# Connection exception, insufficient resources, operator intervention (57P: admin or
# crash shutdown), system error; and a database nobody can use (authorization, catalog,
# schema, privileges): the message is not to blame, everyone waits.
DOWN_SQLSTATE_CLASSES: Final = frozenset({"08", "53", "57", "58", "28", "3D", "3F", "42"})
# A read-only transaction: this server is a standby now (demoted, or the DSN reached a
# replica); reconnecting finds the primary (cloud/dsn.py). Not the message's fault.
DOWN_SQLSTATES: Final = frozenset({"25006"})
# Python errors raised while adapting one message's values (encoding, overflow; the
# writer's own binary COPY rows raise struct.error for a value out of its column's range).
POISON_PYTHON_ERRORS: Final = (UnicodeError, OverflowError, ValueError, struct.error)
# Contention: transaction rollback (deadlock, serialization; psycopg files 40001 under
# OperationalError, not TransactionRollback), statement timeout, lock not available.
TRANSIENT_SQLSTATE_CLASSES: Final = frozenset({"40"})
TRANSIENT_SQLSTATES: Final = frozenset({"57014", "55P03"})

ErrorKind = Literal["down", "transient", "poison", "unexplained"]


class DatabaseDown(Exception):
    """The database cannot be used right now; the worker must back off.

    `outage` is True when the connection or the server is to blame; False when the
    failure is unexplained and the batch's messages may be (they are charged).
    """

    def __init__(self, reason: str, *, outage: bool = True) -> None:
        super().__init__(reason)
        self.outage = outage


@dataclass(slots=True)
class Stored:
    """What storing one commit batch did."""

    result: WriteResult | None = None
    alerts: list[AlertMessage] = field(default_factory=list)
    # id(item) -> the dead letter written for an item the database refused
    refused: dict[int, DeadLetter] = field(default_factory=dict)


def error_kind(conn: psycopg.Connection[Any] | None, exc: BaseException) -> ErrorKind:
    """What an error while storing blames: the connection, contention, one message, or unknown."""
    if conn is None or conn.closed or conn.broken:
        return "down"
    if not isinstance(exc, psycopg.Error):
        return "poison" if isinstance(exc, POISON_PYTHON_ERRORS) else "unexplained"
    if isinstance(
        exc,
        psycopg.errors.TransactionRollback
        | psycopg.errors.QueryCanceled
        | psycopg.errors.LockNotAvailable,
    ):
        return "transient"
    state = exc.sqlstate
    if state is not None and (
        state[:2] in TRANSIENT_SQLSTATE_CLASSES or state in TRANSIENT_SQLSTATES
    ):
        return "transient"
    if state is None:
        # Raised by psycopg itself: a value it cannot send (NUL in a text, an unencodable
        # string) is the message's fault; a lost connection is not.
        if isinstance(exc, psycopg.DataError):
            return "poison"
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return "down"
        return "unexplained"
    if state[:2] in POISON_SQLSTATE_CLASSES:
        return "poison"
    if state[:2] in DOWN_SQLSTATE_CLASSES or state in DOWN_SQLSTATES:
        return "down"
    return "unexplained"


def describe(exc: BaseException) -> str:
    """One line about a database error, without connection parameters."""
    if isinstance(exc, psycopg.Error):
        primary = exc.diag.message_primary if exc.diag else None
        text = primary or (str(exc).splitlines() or [type(exc).__name__])[0]
        code = f" {exc.sqlstate}" if exc.sqlstate else ""
        return f"{type(exc).__name__}{code}: {text}"
    return f"{type(exc).__name__}: {exc}"


def refusal_letter(item: Classified, code: str, reason: str) -> DeadLetter:
    """A dead letter for a decoded message the database refused (payload re-encoded)."""
    if isinstance(item, DeadLetter):
        return dataclasses.replace(item, code=code, reason=reason)
    if isinstance(item, Incoming):
        b = item.batch
        return DeadLetter(
            topics.data_topic(b.device),
            b.device,
            code,
            reason,
            CONTENT_TYPE_MSGPACK,
            encode_batch(b),
            item.received_at,
            batch_key=(b.device, b.boot_id, b.seq),
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


def _require(conn: psycopg.Connection[Any] | None) -> psycopg.Connection[Any]:
    if conn is None or conn.closed:
        raise DatabaseDown("not connected")
    return conn


class _Refused(Exception):
    """One attempt failed for the data of its messages: bisect."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BatchStore:
    """Stores commit batches for one worker.

    `count_error(kind)` counts each database error; `count_transaction(outcome)` each
    transaction, "committed" or "rolled_back" (the poison tests read it).
    """

    def __init__(
        self,
        count_error: Callable[[str], None],
        count_transaction: Callable[[str], None] | None = None,
    ) -> None:
        self.writer = BatchWriter()
        # Where alert transitions are notified; the intents join the batch's transaction.
        self.notify = NotifySettings()
        # host:port per configured broker: a birth or heartbeat records which one it came by.
        self.brokers: tuple[str, ...] = ()
        self._count_error = count_error
        self._count_transaction = count_transaction or (lambda _outcome: None)

    def _broker(self, index: int | None) -> str | None:
        return None if index is None or index >= len(self.brokers) else self.brokers[index]

    def store(
        self,
        conn: psycopg.Connection[Any] | None,
        items: Sequence[Classified],
        engine: AlertEngine | None,
    ) -> Stored:
        """Write `items` in one transaction; if the data is refused, bisect to isolate it."""
        total = Stored()
        self._bisect(conn, list(items), engine, total)
        return total

    def _bisect(
        self,
        conn: psycopg.Connection[Any] | None,
        items: list[Classified],
        engine: AlertEngine | None,
        total: Stored,
    ) -> None:
        """Store `items`; on refusal store each half alone, down to the one refused message."""
        try:
            one = self._attempt(conn, items, engine)
        except _Refused as refused:
            if len(items) == 1:
                total.refused[id(items[0])] = self._refused(
                    conn, items[0], "db_poison", refused.reason
                )
                return
            log.warning("%s messages refused (%s); bisecting", len(items), refused.reason)
            middle = len(items) // 2
            self._bisect(conn, items[:middle], engine, total)
            self._bisect(conn, items[middle:], engine, total)
            return
        if one.result is not None:
            total.result = one.result if total.result is None else total.result + one.result
        total.alerts.extend(one.alerts)

    def _attempt(
        self,
        conn: psycopg.Connection[Any] | None,
        items: Sequence[Classified],
        engine: AlertEngine | None,
    ) -> Stored:
        """One transaction, retried while the error is contention; `_Refused` on poison."""
        for attempt in range(TRANSIENT_RETRIES):
            try:
                return self._once(conn, items, engine)
            except Exception as exc:
                kind = error_kind(conn, exc)
                self._count_error(kind)
                if kind == "transient":
                    log.info("transient database error (%s); retry %s", describe(exc), attempt + 1)
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if kind == "poison":
                    raise _Refused(describe(exc)) from exc
                if kind == "unexplained":
                    log.error("unexplained error storing a batch", exc_info=exc)
                raise DatabaseDown(describe(exc), outage=kind == "down") from exc
        raise DatabaseDown("transient errors did not clear")

    def _refused(
        self, conn: psycopg.Connection[Any] | None, item: Classified, code: str, reason: str
    ) -> DeadLetter:
        """Dead-letter a message the database refused, in a transaction of its own."""
        letter = refusal_letter(item, code, reason)
        conn = _require(conn)
        try:
            with conn.transaction(), conn.cursor() as cur:
                self.writer.write_dead_letters(cur, [letter])
        except psycopg.Error as exc:
            self._count_transaction("rolled_back")
            raise DatabaseDown(describe(exc), outage=error_kind(conn, exc) == "down") from exc
        self._count_transaction("committed")
        return letter

    def _once(
        self,
        conn: psycopg.Connection[Any] | None,
        items: Sequence[Classified],
        engine: AlertEngine | None,
    ) -> Stored:
        conn = _require(conn)
        incoming = [i for i in items if isinstance(i, Incoming)]
        dead = [i for i in items if isinstance(i, DeadLetter)]
        self.writer.prepare(conn, (i.batch for i in incoming))
        out = Stored()
        try:
            self._transaction(conn, items, incoming, dead, engine, out)
        except BaseException:
            self._count_transaction("rolled_back")
            raise
        self._count_transaction("committed")
        return out

    def _transaction(
        self,
        conn: psycopg.Connection[Any],
        items: Sequence[Classified],
        incoming: list[Incoming],
        dead: list[DeadLetter],
        engine: AlertEngine | None,
        out: Stored,
    ) -> None:
        with conn.transaction():
            if incoming:
                out.result = self.writer.write(conn, incoming, report=_watched(engine))
            if dead:
                with conn.cursor() as cur:
                    self.writer.write_dead_letters(cur, dead)
            for item in items:
                if isinstance(item, StateItem):
                    registry.apply_state(
                        conn,
                        item.state,
                        received_at=item.received_at,
                        broker=self._broker(item.broker),
                    )
                elif isinstance(item, HealthItem):
                    registry.apply_heartbeat(
                        conn,
                        item.heartbeat,
                        received_at=item.received_at,
                        broker=self._broker(item.broker),
                    )
            if out.result is not None and out.result.windows and engine is not None:
                out.alerts = self._evaluate_alerts(conn, engine, out.result)

    def _evaluate_alerts(
        self, conn: psycopg.Connection[Any], engine: AlertEngine, result: WriteResult
    ) -> list[AlertMessage]:
        """Alert rules run in a savepoint: a failing rule must not cost the data."""
        try:
            with conn.transaction():
                messages = engine.evaluate(conn, result.windows)
                # The notification intents commit with the transitions or not at all.
                enqueue(conn, self.notify, messages)
                return messages
        except psycopg.Error as exc:
            if error_kind(conn, exc) in ("down", "transient"):
                raise
            log.error("alert evaluation failed, batch stored without it: %s", describe(exc))
        except Exception:
            log.exception("alert evaluation failed, batch stored without it")
        self._count_error("alerts")
        return []


def _watched(engine: AlertEngine | None) -> Callable[[str], bool]:
    """Which metrics the alert rules look at (so only their windows are handed over)."""
    watched = {loaded.rule.metric for loaded in engine.rules} if engine else set()
    if ANY_METRIC in watched:
        return lambda _metric: True
    return watched.__contains__
