"""The Sparkplug B primary host application: STATE, subscriptions, rebirths, and the store loop.

One MQTT session on every configured broker (clean start, as the spec asks of a host;
nodes may be on any of them), each with the host's STATE will registered at connect:
`spBv1.0/STATE/<host_id>` `{"online": false, "timestamp": T}`, retained; once subscribed
it publishes `{"online": true, "timestamp": T}` retained, the same T, on that broker.
paho's network threads only queue messages, tagged with their broker; the host's thread
judges them in arrival order (sessions.py; a node's session belongs to the broker that
carried its NBIRTH, and a rebirth is asked through the broker that carried the message),
windows numbers (windows.py), and every `flush_ms` stores what closed,
the events, registry changes and dead letters through the ingest store
(cloud/ingest/store.py) in one transaction. A failed transaction keeps the items and is
retried with the same batch keys, so the ingest ledger stores each batch once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import psycopg

from millrace.cloud.alerts.engine import AlertEngine
from millrace.cloud.ingest.messages import Classified, DeadLetter, Incoming, StateItem
from millrace.cloud.ingest.store import BatchStore, DatabaseDown, describe
from millrace.cloud.ingest.worker import connect_db
from millrace.cloud.sparkplug import topic as sptopic
from millrace.cloud.sparkplug.claims import ID_COLLISION
from millrace.cloud.sparkplug.config import SparkplugConfig
from millrace.cloud.sparkplug.metrics import serve
from millrace.cloud.sparkplug.schema import Payload
from millrace.cloud.sparkplug.sessions import Accepted, Duplicate, Refused, Sessions
from millrace.cloud.sparkplug.windows import Windows
from millrace.mqtt import tls_client
from millrace.wire import Batch, DeviceState, Event, Window
from millrace.wire.batch import MAX_EVENTS_PER_BATCH, MAX_WINDOWS_PER_BATCH

log = logging.getLogger(__name__)

REBIRTH_METRIC: Final = "Node Control/Rebirth"
BOOLEAN: Final = 11
DB_BACKOFF_MAX_SECONDS: Final = 10.0
QUEUE_MAX: Final = 100_000
# Judged whatever the backlog: they open and close sessions (seq restarts at NBIRTH).
_SESSION_KINDS: Final = frozenset({"NBIRTH", "NDEATH"})


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    """The STATE message of Sparkplug 3.0 (JSON, not protobuf)."""
    return json.dumps({"online": online, "timestamp": timestamp_ms}).encode()


def rebirth_payload(timestamp_ms: int) -> bytes:
    """An NCMD asking an edge node to publish its births again."""
    payload = Payload()
    payload.timestamp = timestamp_ms
    metric = payload.metrics.add()
    metric.name = REBIRTH_METRIC
    metric.timestamp = timestamp_ms
    metric.datatype = BOOLEAN
    metric.boolean_value = True
    return payload.SerializeToString()


@dataclass(slots=True)
class Counters:
    """What the host did since it started (logged, and read by the tests)."""

    messages: int = 0
    duplicates: int = 0
    refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rebirths_asked: int = 0
    batches: int = 0
    transactions: int = 0
    # Data messages not judged because `max_pending` was reached while storing failed.
    dropped: int = 0


class Host:
    """One primary host application; `run` until `request_stop`."""

    def __init__(self, config: SparkplugConfig) -> None:
        self.config = config
        self.sessions = Sessions(config.bounds)
        self.windows = Windows(config.periods_s, grace_ms=config.grace_ms)
        self.counters = Counters()
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._inbox: queue.Queue[tuple[str, bytes, datetime, int]] = queue.Queue(QUEUE_MAX)
        self._boot_id = uuid.uuid4().hex  # the host's batch stream; keys (device, boot, seq)
        self._seq: dict[str, int] = defaultdict(int)
        self._events: dict[str, list[Event]] = defaultdict(list)
        self._items: list[Classified] = []
        self._last_rebirth: dict[tuple[str, str, int], float] = {}
        self._born_on: dict[tuple[str, str], int] = {}  # node -> broker of its NBIRTH
        self._pending = 0  # items and readings judged since the last stored transaction
        self.db_up = False  # the last store (or probe) reached the database
        self.last_turn_mono = time.monotonic()
        self._store = BatchStore(count_error=lambda _kind: None)
        self._conn: psycopg.Connection[Any] | None = None
        self._engine: AlertEngine | None = None
        self._state_ts = now_ms()
        self.brokers = self.config.broker.endpoints
        self._online: set[int] = set()
        self._clients = [self._mqtt(i) for i in range(len(self.brokers))]

    # -- MQTT ------------------------------------------------------------------------------

    def _mqtt(self, index: int) -> Any:
        b = self.config.broker
        client = tls_client(self.config.host_id, ca=b.ca, cert=b.cert, key=b.key, userdata=index)
        client.will_set(
            sptopic.state_topic(self.config.host_id),
            state_payload(False, self._state_ts),
            qos=1,
            retain=True,
        )
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        return client

    def _on_connect(self, client: Any, index: int, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("broker %s:%s refused the host: %s", *self.brokers[index], reason)
            return
        for topic in sptopic.subscriptions(self.config.groups):
            client.subscribe(topic, qos=1)
        # After the SUBSCRIBEs on the same connection: nodes that see it online find us listening.
        client.publish(
            sptopic.state_topic(self.config.host_id),
            state_payload(True, self._state_ts),
            qos=1,
            retain=True,
        )
        log.info("sparkplug host %s online on %s:%s", self.config.host_id, *self.brokers[index])
        self._online.add(index)
        if len(self._online) == len(self._clients):
            self.ready.set()

    def online_brokers(self) -> frozenset[int]:
        """Indexes into `brokers` of the sessions subscribed now."""
        return frozenset(self._online)

    @property
    def pending(self) -> int:
        """Items and readings held until the next stored transaction (`max_pending` bounds)."""
        return self._pending

    def _on_disconnect(self, _c: Any, index: int, _f: Any, _reason: Any, _p: Any) -> None:
        self._online.discard(index)

    def _on_message(self, _client: Any, index: int, msg: Any) -> None:
        self._inbox.put((msg.topic, bytes(msg.payload), datetime.now(UTC), index))

    def ask_rebirth(self, group: str, node: str, broker: int = 0) -> bool:
        """Publish NCMD Node Control/Rebirth through `broker` (the one that carried the node's
        message), at most once per `rebirth_interval_s` per node and broker."""
        key = (group, node, broker)
        mono = time.monotonic()
        last = self._last_rebirth.get(key)
        if last is not None and mono - last < self.config.rebirth_interval_s:
            return False
        self._last_rebirth[key] = mono
        self._clients[broker].publish(
            sptopic.node_topic(group, "NCMD", node), rebirth_payload(now_ms()), qos=0
        )
        self.counters.rebirths_asked += 1
        log.info("asked %s/%s for a rebirth via %s:%s", group, node, *self.brokers[broker])
        return True

    # -- judging -------------------------------------------------------------------------

    def judge(self, topic: str, payload: bytes, received_at: datetime, broker: int = 0) -> None:
        """One message from `broker`, in arrival order: into the windows and items, or a
        dead letter."""
        self.counters.messages += 1
        sp: sptopic.SpTopic | None = None
        with contextlib.suppress(sptopic.TopicError):
            sp = sptopic.parse(topic)
        if sp is not None:
            if self._over_cap(sp.kind):
                return
            born_on = self._born_on.get(sp.node_key)
            if born_on is not None and born_on != broker and sp.kind not in _SESSION_KINDS:
                self._refuse(topic, sp, broker, payload, received_at, _other_broker(self, born_on))
                return
        received = int(received_at.timestamp() * 1000)
        outcome = self.sessions.handle(topic, payload, received)
        if isinstance(outcome, Duplicate):
            self.counters.duplicates += 1
            return
        # An NBIRTH refused only for its id still opened the node's session (sessions.py).
        opened = not isinstance(outcome, Refused) or outcome.code == ID_COLLISION
        if sp is not None and sp.kind == "NBIRTH" and opened:
            self._born_on[sp.node_key] = broker
        if isinstance(outcome, Refused):
            self._refuse(topic, sp, broker, payload, received_at, outcome)
            return
        self._accept(outcome, received, received_at)

    def _over_cap(self, kind: str) -> bool:
        """True (and counted) for a data message judged past `max_pending`: dropped unjudged,
        so the node's next message after the outage is a seq gap, dead-lettered and answered
        by a rebirth; NBIRTH and NDEATH are always judged (the registry stays right)."""
        if self._pending < self.config.max_pending or kind in _SESSION_KINDS:
            return False
        if self.counters.dropped % 10_000 == 0:
            log.warning("%s items wait for the database: dropping data messages", self._pending)
        self.counters.dropped += 1
        return True

    def _refuse(
        self,
        topic: str,
        sp: sptopic.SpTopic | None,
        broker: int,
        payload: bytes,
        received_at: datetime,
        outcome: Refused,
    ) -> None:
        self.counters.refused[outcome.code] += 1
        self._pending += 1
        self._items.append(
            DeadLetter(
                topic, outcome.device, outcome.code, outcome.reason, None, payload, received_at
            )
        )
        if outcome.rebirth and sp is not None:
            self.ask_rebirth(sp.group, sp.node, broker)

    def _accept(self, accepted: Accepted, received: int, received_at: datetime) -> None:
        self._pending += len(accepted.readings) + len(accepted.online) + len(accepted.offline)
        for device, units in accepted.online.items():
            self._items.append(
                StateItem(DeviceState(device, "online", received, units=units), received_at)
            )
        for reading in accepted.readings:
            value = reading.value
            if value.number is not None:
                self.windows.add(reading.device, reading.metric, reading.ts_ms, value.number)
            elif value.other is not None:
                self._events[reading.device].append(
                    Event(reading.metric, reading.ts_ms, value.other)
                )
        for device in accepted.offline:
            self._items.append(StateItem(DeviceState(device, "offline", received), received_at))

    # -- storing -------------------------------------------------------------------------

    def _batches(self, closed: dict[str, list[Window]], sent_at: int, at: datetime) -> None:
        devices = sorted(set(closed) | set(self._events))
        for device in devices:
            windows, events = closed.get(device, []), self._events.pop(device, [])
            while windows or events:
                part_w, windows = windows[:MAX_WINDOWS_PER_BATCH], windows[MAX_WINDOWS_PER_BATCH:]
                part_e, events = events[:MAX_EVENTS_PER_BATCH], events[MAX_EVENTS_PER_BATCH:]
                seq = self._seq[device]
                self._seq[device] = seq + 1
                batch = Batch(device, self._boot_id, seq, sent_at, tuple(part_w), tuple(part_e))
                self._items.append(Incoming(batch, at))
                self.counters.batches += 1

    def flush(self, *, everything: bool = False) -> bool:
        """Store what is due (all open windows too when `everything`); False if the DB is down."""
        now = now_ms()
        closed = self.windows.close(None if everything else now)
        self._batches(closed, now, datetime.now(UTC))
        if not self._items and self.db_up:
            return True
        try:
            conn = self._connection()
            if self._items:
                self._store.store(conn, self._items, self._engine)
        except (DatabaseDown, psycopg.Error) as exc:
            self.db_up = False
            # Kept in memory, retried with the same batch keys (the ledger stores each once);
            # lost only if the host dies before the database is back (docs/sparkplug.md).
            log.warning("storing failed, kept for the next try: %s", describe(exc))
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            return False
        self.db_up = True
        if not self._items:
            return True
        self.counters.transactions += 1
        self._items = []
        self._pending = len(self.windows) + sum(map(len, self._events.values()))
        return True

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect_db(self.config.dsn, application_name="millrace-sparkplug")
            self._engine = AlertEngine.load(self._conn)
        return self._conn

    def _say_offline(self) -> None:
        """A clean stop sends no will: publish the offline STATE ourselves, then leave."""
        sent = [
            client.publish(
                sptopic.state_topic(self.config.host_id),
                state_payload(False, self._state_ts),
                qos=1,
                retain=True,
            )
            for client in self._clients
        ]
        for info in sent:
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(5)
        for client in self._clients:
            client.disconnect()

    # -- life ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def run(self, on_turn: Callable[[], None] | None = None) -> int:
        """Connect, judge and store until stopped; then close every window and store it."""
        http = serve(self, self.config.http) if self.config.http.port else None
        for client, (host, port) in zip(self._clients, self.brokers, strict=True):
            client.connect_async(host, port, keepalive=self.config.broker.keepalive_s)
            client.loop_start()
        backoff = self.config.flush_ms / 1000
        next_flush = time.monotonic() + self.config.flush_ms / 1000
        try:
            while not self._stop.is_set():
                self.last_turn_mono = time.monotonic()
                timeout = max(0.0, next_flush - time.monotonic())
                with contextlib.suppress(queue.Empty):
                    self.judge(*self._inbox.get(timeout=timeout))
                if time.monotonic() < next_flush:
                    continue
                stored = self.flush()
                backoff = (
                    self.config.flush_ms / 1000
                    if stored
                    else min(backoff * 2, DB_BACKOFF_MAX_SECONDS)
                )
                next_flush = time.monotonic() + backoff
                if on_turn is not None:
                    on_turn()
            self._say_offline()
            while not self._inbox.empty():
                self.judge(*self._inbox.get_nowait())
            if not self.flush(everything=True):
                log.error(
                    "stopping with %s items not stored: the database is down", len(self._items)
                )
            return 0
        finally:
            for client in self._clients:
                client.loop_stop()
            if http is not None:
                http.stop()
            if self._conn is not None:
                self._conn.close()
            log.info("sparkplug host stopped: %s", self.counters)


def _other_broker(host: Host, born_on: int) -> Refused:
    """A node's message through a broker other than its NBIRTH's: not its current session."""
    where = "{}:{}".format(*host.brokers[born_on])
    return Refused(
        "other_broker", f"the node's session was born on {where}; rebirth asked", rebirth=True
    )


def run_host(config: SparkplugConfig) -> int:
    """`millrace sparkplug`: run the host until SIGTERM or SIGINT."""
    import signal

    host = Host(config)

    def _on_signal(_signum: int, _frame: object) -> None:
        host.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return host.run()
