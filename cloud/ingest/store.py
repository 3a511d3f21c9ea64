"""One commit batch, one transaction: retry what is transient, isolate what is poison.

`BatchStore.store` writes a commit batch's items (batches, dead letters, device
state, heartbeats) and evaluates alert rules on the stored windows, all in one
transaction. Database errors are sorted by what they blame:
- the data of one message (SQLSTATE class 22/23/54) -> the batch is retried one
  message per transaction, and only the offending message is dead-lettered;
- contention (deadlock, serialization, lock or statement timeout) -> retried;
- the database itself (down, privileges, schema missing) -> `DatabaseDown`: the
  worker stops consuming and recovers, and the broker redelivers (docs/cloud.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import psycopg

from millrace import topics
from millrace.cloud import registry
from millrace.cloud.alerts.engine import AlertEngine
from millrace.cloud.alerts.rules import ANY_METRIC
from millrace.cloud.ingest.messages import (
    Classified,
    DeadLetter,
    HealthItem,
    Incoming,
    StateItem,
    WriteResult,
)
from millrace.cloud.ingest.writer import BatchWriter, write_dead_letters
from millrace.wire import CONTENT_TYPE_MSGPACK, AlertMessage, encode_batch

log = logging.getLogger(__name__)

TRANSIENT_RETRIES: Final = 5
# SQLSTATE classes that blame the data of one message, not the database.
POISON_SQLSTATE_CLASSES: Final = frozenset({"22", "23", "54"})

ErrorKind = Literal["down", "transient", "poison"]


class DatabaseDown(Exception):
    """The database cannot be used right now; the worker must back off."""


@dataclass(slots=True)
class Stored:
    """What storing one commit batch did."""

    result: WriteResult | None = None
    alerts: list[AlertMessage] = field(default_factory=list)
    # id(item) -> the dead letter written for an item the database refused
    refused: dict[int, DeadLetter] = field(default_factory=dict)


def error_kind(conn: psycopg.Connection[Any] | None, exc: psycopg.Error) -> ErrorKind:
    """What a database error blames: the connection, contention, or one message's data."""
    if conn is None or conn.closed or conn.broken:
        return "down"
    if isinstance(
        exc,
        psycopg.errors.TransactionRollback
        | psycopg.errors.QueryCanceled
        | psycopg.errors.LockNotAvailable,
    ):
        return "transient"
    if (exc.sqlstate or "")[:2] in POISON_SQLSTATE_CLASSES:
        return "poison"
    return "down"  # privileges, missing schema, disk full: not the message's fault


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
        return DeadLetter(
            item.topic, item.device, code, reason, item.content_type, item.payload, item.received_at
        )
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


class BatchStore:
    """Stores commit batches for one worker; `count_error(kind)` counts each database error."""

    def __init__(self, count_error: Callable[[str], None]) -> None:
        self.writer = BatchWriter()
        self._count_error = count_error

    def store(
        self,
        conn: psycopg.Connection[Any] | None,
        items: Sequence[Classified],
        engine: AlertEngine | None,
    ) -> Stored:
        """Write `items` in one transaction, retrying transient errors, isolating poison."""
        for attempt in range(TRANSIENT_RETRIES):
            try:
                return self._once(conn, items, engine)
            except psycopg.Error as exc:
                kind = error_kind(conn, exc)
                self._count_error(kind)
                if kind == "transient":
                    log.info("transient database error (%s); retry %s", describe(exc), attempt + 1)
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if kind == "poison":
                    log.warning("batch refused (%s); storing message by message", describe(exc))
                    return self._isolated(conn, items, engine)
                raise DatabaseDown(describe(exc)) from exc
            except Exception:
                log.exception("unexpected error writing a batch; storing message by message")
                return self._isolated(conn, items, engine)
        raise DatabaseDown("transient errors did not clear")

    def _isolated(
        self,
        conn: psycopg.Connection[Any] | None,
        items: Sequence[Classified],
        engine: AlertEngine | None,
    ) -> Stored:
        """One transaction per message; a message that still fails is dead-lettered."""
        total = Stored()
        for item in items:
            try:
                one = self._once(conn, [item], engine)
            except psycopg.Error as exc:
                kind = error_kind(conn, exc)
                if kind == "down":
                    raise DatabaseDown(describe(exc)) from exc
                total.refused[id(item)] = self._refused(conn, item, f"db_{kind}", describe(exc))
                continue
            except Exception as exc:
                log.exception("unexpected error storing one message")
                total.refused[id(item)] = self._refused(conn, item, "internal_error", repr(exc))
                continue
            if one.result is not None:
                total.result = one.result if total.result is None else total.result + one.result
            total.alerts.extend(one.alerts)
        return total

    def _refused(
        self, conn: psycopg.Connection[Any] | None, item: Classified, code: str, reason: str
    ) -> DeadLetter:
        """Dead-letter a message the database refused, in a transaction of its own."""
        letter = refusal_letter(item, code, reason)
        conn = _require(conn)
        try:
            with conn.transaction(), conn.cursor() as cur:
                write_dead_letters(cur, [letter])
        except psycopg.Error as exc:
            raise DatabaseDown(describe(exc)) from exc
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
        with conn.transaction():
            if incoming:
                out.result = self.writer.write(conn, incoming, report=_watched(engine))
            if dead:
                with conn.cursor() as cur:
                    self.writer.write_dead_letters(cur, dead)
            for item in items:
                if isinstance(item, StateItem):
                    registry.apply_state(conn, item.state, received_at=item.received_at)
                elif isinstance(item, HealthItem):
                    registry.apply_heartbeat(conn, item.heartbeat, received_at=item.received_at)
            if out.result is not None and out.result.windows and engine is not None:
                out.alerts = self._evaluate_alerts(conn, engine, out.result)
        return out

    def _evaluate_alerts(
        self, conn: psycopg.Connection[Any], engine: AlertEngine, result: WriteResult
    ) -> list[AlertMessage]:
        """Alert rules run in a savepoint: a failing rule must not cost the data."""
        try:
            with conn.transaction():
                return engine.evaluate(conn, result.windows)
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
