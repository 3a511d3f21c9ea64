"""The publisher: drains the outbox to the plant broker over mutual TLS, QoS 1.

It runs on its own thread, so sampling never waits on the network. paho's
callbacks only enqueue (acks, receipts, commands). A PUBACK only says the broker
took a batch: it stays in the outbox until the cloud's receipt (committed in the
database) deletes it, and is sent again after a jittered wait if none comes
(edge/receipts.py; docs/guarantees.md). After a (re)connect, batches already stored are
backlog and drain at a bounded rate, oldest first; batches written while
connected are live and go out at once, so a long backlog never delays fresh
data. Each connection is a fresh paho client; reconnects use jittered
exponential backoff. With several brokers (`broker.hosts`) a lost or refused one
moves the agent to the next at once and it returns to its preferred one when that
answers again (edge/brokers.py); batches unreceipted on the old broker are resent
on the new one from the outbox, and the cloud's ledger keeps them exactly once.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from millrace.edge.brokers import BrokerChoice, answers
from millrace.edge.config import AgentConfig
from millrace.edge.health import will_message
from millrace.edge.outbox import Outbox, Row
from millrace.edge.pacing import Backoff, TokenBucket
from millrace.edge.receipts import Unreceipted
from millrace.errors import MillraceError, WireError
from millrace.mqtt import tls_client, tls_context
from millrace.topics import cmd_filter, data_topic, parse_topic, receipt_topic, state_topic
from millrace.wire import CONTENT_TYPE_JSON, Receipt, content_type_for

log = logging.getLogger(__name__)

CONNACK_TIMEOUT_SECONDS = 10.0
# Upper bound on one wait of the publish loop; acks and new batches wake it earlier.
IDLE_WAIT_SECONDS = 0.5
# MQTT v5 PUBACK reason "No matching subscribers": delivered to the broker, received by nobody.
NO_MATCHING_SUBSCRIBERS = 0x10
# How long to hold batches nobody subscribed to before sending them again (jittered, doubling).
UNROUTED_RETRY_MIN_SECONDS = 1.0
UNROUTED_RETRY_MAX_SECONDS = 30.0
OFFLINE_PUBLISH_TIMEOUT_SECONDS = 2.0

CommandCallback = Callable[[str, bytes], None]


@dataclass(slots=True)
class PublisherStats:
    connects: int = 0
    published: int = 0
    acked: int = 0
    refused: int = 0
    unrouted: int = 0  # PUBACKs saying nobody subscribes: the batch stays in the outbox
    receipted: int = 0  # batches deleted from the outbox on a cloud receipt
    receipted_own: int = 0  # of those, batches this process (this boot id) wrote
    resent: int = 0  # batches sent again because no receipt came in time
    failbacks: int = 0  # moves back to the preferred broker after it answered again


class Publisher:
    """Owns the broker connection; publishes batches, birth, health and replies."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        outbox: Outbox,
        boot_id: str,
        birth: Callable[[], bytes],
        on_command: CommandCallback,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.boot_id = boot_id
        self.birth = birth
        self.on_command = on_command
        self.stats = PublisherStats()
        broker = config.broker
        self._backoff = Backoff(min_s=broker.reconnect_min_s, max_s=broker.reconnect_max_s)
        self._brokers = BrokerChoice(broker.endpoints, config.device_id, spread=broker.spread)
        self._next_failback = 0.0
        self._data_topic = data_topic(config.device_id)
        self._state_topic = state_topic(config.device_id)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._final_deadline: float | None = None
        self._goodbye_said = False
        self._unthrottled = False
        # Live batches wait until this monotonic time (the per-device send offset).
        self._hold_until = 0.0
        self._acks: queue.SimpleQueue[tuple[int, bool, bool, str]] = queue.SimpleQueue()
        self._receipts: queue.SimpleQueue[Receipt] = queue.SimpleQueue()
        self._receipt_topic = receipt_topic(config.device_id)
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._connected = threading.Event()
        self._connack = threading.Event()
        self._connack_error = ""
        self._last_error = ""
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        # When the publish loop last turned (monotonic): the agent's watchdog checks it.
        self.beat = time.monotonic()
        # Wall clock (ms) of this process's first CONNACK, and of its first own receipt.
        self.first_connected_ms: int | None = None
        self.first_own_receipt_ms: int | None = None
        self._props: dict[str, Any] = {}

    # ---------------------------------------------------------------- public API

    def start(self) -> None:
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def alive(self) -> bool:
        """The publisher thread is running (False once it died, or after shutdown)."""
        return self._thread.is_alive()

    @property
    def broker(self) -> str:
        """`host:port` of the broker in use (or tried next while disconnected)."""
        host, port = self._brokers.current
        return f"{host}:{port}"

    @property
    def last_error(self) -> str:
        """Why the last connection attempt failed ("" once connected)."""
        return self._last_error

    def wake(self) -> None:
        """New batches are in the outbox."""
        self._wake.set()

    def hold_live(self, seconds: float) -> None:
        """Send batches written from now on no sooner than `seconds` from now.

        Call it before writing them, so the publish loop never sees them unheld. A hold
        already running is kept: batches written during it go out with it.
        """
        now = time.monotonic()
        if seconds > 0 and self._hold_until <= now:
            self._hold_until = now + seconds

    def flush(self) -> None:
        """Drain the current backlog without the rate limit or hold (the `flush` command)."""
        self._unthrottled = True
        self._hold_until = 0.0
        self._wake.set()

    def publish_message(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Publish a JSON message (health, reply, birth) with QoS 1 if connected."""
        with self._client_lock:
            client = self._client
            if client is None or not self.connected:
                return False
            info = client.publish(
                topic, payload, qos=1, retain=retain, properties=self._properties("json")
            )
        return bool(info.rc == 0)

    def shutdown(self, *, timeout_s: float) -> None:
        """Try to publish what is in the outbox for up to `timeout_s`, then disconnect cleanly."""
        self._final_deadline = time.monotonic() + timeout_s
        self._unthrottled = True
        self._hold_until = 0.0
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s + CONNACK_TIMEOUT_SECONDS + OFFLINE_PUBLISH_TIMEOUT_SECONDS)

    # ---------------------------------------------------------------- connection

    def _properties(self, encoding: str) -> Any:
        props = self._props.get(encoding)
        if props is None:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = (
                CONTENT_TYPE_JSON if encoding == "json" else content_type_for("msgpack")
            )
            self._props[encoding] = props
        return props

    def _run(self) -> None:
        final_attempts = 0
        while not self._goodbye_said:
            self.beat = time.monotonic()
            client = self._connect()
            moved = False
            if client is not None:
                self._backoff.reset()
                self._brokers.connected()
                try:
                    moved = self._serve(client)
                except Exception:  # e.g. the outbox's disk failing: never kill the thread
                    log.exception("publisher error; reconnecting")
                finally:
                    self._teardown(client, lost=not moved and not self._goodbye_said)
            if moved:
                self._brokers.back_to_preferred()
                backoff_due = False
            else:
                backoff_due = self._brokers.failed()
            if self._stop.is_set():
                # Shutting down: one immediate extra attempt to hand over the outbox, no more.
                deadline = self._final_deadline or 0.0
                if self._goodbye_said or final_attempts or time.monotonic() >= deadline:
                    break
                final_attempts += 1
                continue
            if not backoff_due:
                continue  # another broker to try, at once
            delay = self._backoff.next_delay()
            log.debug("reconnecting in %.1f s", delay)
            until = time.monotonic() + delay
            while not self._stop.is_set() and (left := until - time.monotonic()) > 0:
                self.beat = time.monotonic()  # waiting out a backoff is progress too
                self._stop.wait(min(left, IDLE_WAIT_SECONDS))

    def _connect(self) -> Any:
        broker = self.config.broker
        host, port = self._brokers.current
        try:
            client = tls_client(
                self.config.device_id,
                ca=broker.ca,
                cert=broker.cert,
                key=broker.key,
                clean_start=True,
                max_inflight_messages=broker.max_inflight,
            )
        except MillraceError as exc:
            self._note_error(f"TLS set-up failed: {exc}")
            return None
        will = will_message(
            device=self.config.device_id,
            boot_id=self.boot_id,
            config_hash=self.config.config_hash,
            now_ms=time.time_ns() // 1_000_000,
        )
        client.will_set(self._state_topic, will.to_json(), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._connack.clear()
        self._connack_error = "no CONNACK from the broker"
        try:
            client.connect(host, port, broker.keepalive_s)
        except ssl.SSLCertVerificationError as exc:
            self._note_error(f"broker certificate rejected: {exc.verify_message}")
            return None
        except (OSError, ssl.SSLError) as exc:
            self._note_error(f"cannot reach broker {host}:{port}: {exc}")
            return None
        client.loop_start()
        self._connack.wait(CONNACK_TIMEOUT_SECONDS)
        if self._connack_error:
            self._note_error(self._connack_error)
            client.loop_stop()
            client.disconnect()
            return None
        with self._client_lock:
            self._client = client
            self._connected.set()
        self.stats.connects += 1
        if self.first_connected_ms is None:
            self.first_connected_ms = time.time_ns() // 1_000_000
        self._last_error = ""
        self._next_failback = time.monotonic() + broker.failback_s
        log.info("connected to broker %s:%s", host, port)
        return client

    def _note_error(self, message: str) -> None:
        if message != self._last_error:
            log.warning("%s", message)
            self._last_error = message
        else:
            log.debug("%s", message)

    def _teardown(self, client: Any, *, lost: bool) -> None:
        """Drop the connection. A lost one is closed in the background, unheard.

        paho's network thread may be in its own 1 s reconnect wait, which loop_stop
        waits out; with a broker gone that second would delay the move to the next one.
        Its callbacks are detached first, so nothing it does can touch the next client.
        """
        with self._client_lock:
            self._client = None
            self._connected.clear()
        if not lost:
            self._close(client)
            return
        for callback in ("on_connect", "on_disconnect", "on_publish", "on_message", "on_subscribe"):
            setattr(client, callback, None)
        threading.Thread(
            target=self._close, args=(client,), name="publisher-close", daemon=True
        ).start()

    @staticmethod
    def _close(client: Any) -> None:
        try:
            # Before loop_stop, so a live broker gets the DISCONNECT (no last will: leaving
            # for the preferred broker is no going offline).
            client.disconnect()
        except Exception:  # the socket may already be gone
            log.debug("disconnect after loss failed", exc_info=True)
        client.loop_stop()

    def _failback_due(self) -> bool:
        """Away from the preferred broker and it answers again (checked every failback_s)."""
        if not self._brokers.away or self._final_deadline is not None:
            return False
        now = time.monotonic()
        if now < self._next_failback:
            return False
        broker = self.config.broker
        self._next_failback = now + broker.failback_s
        try:
            context = tls_context(ca=broker.ca, cert=broker.cert, key=broker.key)
        except MillraceError:
            return False
        return answers(self._brokers.preferred, context)

    # ---------------------------------------------------------------- paho callbacks (enqueue only)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._connack_error = f"broker refused the connection: {reason}"
        else:
            self._connack_error = ""
        self._connack.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._connected.clear()
        self._connack.set()
        self._wake.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        failed = bool(getattr(reason, "is_failure", False))
        unrouted = bool(getattr(reason, "value", 0) == NO_MATCHING_SUBSCRIBERS)
        self._acks.put((mid, failed, unrouted, str(reason)))
        self._wake.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, reasons: Any, props: Any) -> None:
        refused = [str(r) for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            log.error(
                "broker refused a subscription (%s): without %s no batch leaves the outbox;"
                " the broker ACL must let a device read its own receipt topic",
                ", ".join(refused),
                self._receipt_topic,
            )

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            topic = parse_topic(message.topic)
        except WireError:
            log.warning("ignoring message on unexpected topic %s", message.topic)
            return
        if topic.device_id != self.config.device_id:
            return
        if topic.kind == "cmd" and topic.command:
            self.on_command(topic.command, bytes(message.payload))
        elif topic.kind == "receipt":
            try:
                receipt = Receipt.from_json(bytes(message.payload))
            except WireError as exc:
                log.warning("ignoring an invalid receipt: %s", exc)
                return
            if receipt.device == self.config.device_id:
                self._receipts.put(receipt)
                self._wake.set()

    # ---------------------------------------------------------------- the publish loop

    def _serve(self, client: Any) -> bool:
        """Publish until the connection ends; True if it ends to move to the preferred broker."""
        birth = client.publish(
            self._state_topic, self.birth(), qos=1, retain=True, properties=self._properties("json")
        )
        if birth.rc != 0:
            return False
        client.subscribe([(cmd_filter(self.config.device_id), 1), (self._receipt_topic, 1)])
        broker = self.config.broker
        boundary = self.outbox.max_id()  # stored before this connection: backlog
        backlog_cursor, live_cursor = 0, boundary
        backlog_done = False
        inflight: dict[int, int] = {}
        bucket = TokenBucket(
            rate=broker.backlog_batches_per_s,
            burst=broker.backlog_batches_per_s,
            now=time.monotonic(),
        )
        unrouted_backoff = Backoff(
            min_s=UNROUTED_RETRY_MIN_SECONDS, max_s=UNROUTED_RETRY_MAX_SECONDS
        )
        resend_at: float | None = None
        waiting = Unreceipted(wait_s=broker.receipt_wait_s)
        while self.connected:
            self.beat = time.monotonic()
            if self._failback_due():
                host, port = self._brokers.preferred
                log.info("preferred broker %s:%s answers again; moving back to it", host, port)
                self.stats.failbacks += 1
                return True
            self._wake.clear()
            acked_before = self.stats.acked
            unrouted = self._take_acks(inflight, waiting, time.monotonic())
            self._take_receipts(waiting)
            if self.stats.acked > acked_before and not unrouted:
                unrouted_backoff.reset()
            if unrouted and resend_at is None:
                # The broker acknowledged but routed to nobody (the cloud's subscription is
                # missing, e.g. a broker restarted without its shared subscriptions): keep
                # the batches, pause, then send everything still in the outbox again.
                pause = unrouted_backoff.next_delay()
                resend_at = time.monotonic() + pause
                log.warning("broker has no subscriber for batches; resending in %.1f s", pause)
            if resend_at is not None:
                now = time.monotonic()
                if self._final_deadline is not None and now >= self._final_deadline:
                    self._say_goodbye(client)  # what was not routed stays for the next start
                    return False
                if now < resend_at or inflight:
                    self._wake.wait(min(IDLE_WAIT_SECONDS, max(0.001, resend_at - now)))
                    continue
                resend_at = None
                boundary = self.outbox.max_id()
                backlog_cursor, live_cursor, backlog_done = 0, boundary, False
                waiting.clear()  # all of the outbox goes again as backlog
            room = broker.max_inflight - len(inflight)
            held_s = self._hold_until - time.monotonic()
            if room > 0 and held_s <= 0:
                for row in self.outbox.rows_after(live_cursor, limit=room):
                    if not self._send(client, row, inflight):
                        return False
                    live_cursor = row.id
            wait = IDLE_WAIT_SECONDS if held_s <= 0 else min(IDLE_WAIT_SECONDS, held_s)
            while not backlog_done and len(inflight) < broker.max_inflight:
                now = time.monotonic()
                if not self._unthrottled and not bucket.take(now):
                    wait = min(wait, max(0.001, bucket.wait_s(now)))
                    break
                rows = self.outbox.rows_after(backlog_cursor, limit=1, upto_id=boundary)
                if not rows:
                    backlog_done = True
                    self._unthrottled = self._final_deadline is not None
                    log.info("backlog drained")
                    break
                if not self._send(client, rows[0], inflight):
                    return False
                backlog_cursor = rows[0].id
            if not self._resend_due(client, inflight, waiting, bucket):
                return False
            next_due = waiting.next_due()
            if next_due is not None:
                wait = min(wait, max(0.001, next_due - time.monotonic()))
            if self._final_deadline is not None:
                idle = backlog_done and not inflight and not waiting
                caught_up = not self.outbox.rows_after(live_cursor, limit=1)
                if (idle and caught_up) or time.monotonic() >= self._final_deadline:
                    self._say_goodbye(client)
                    return False
            self._wake.wait(wait)
        log.warning(
            "lost the broker connection to %s; %d batch(es) unacknowledged",
            self.broker,
            len(inflight),
        )
        return False

    def _send(self, client: Any, row: Row, inflight: dict[int, int]) -> bool:
        info = client.publish(
            self._data_topic, row.payload, qos=1, properties=self._properties(row.encoding)
        )
        if info.rc != 0:
            log.warning("publish failed (rc=%s); reconnecting", info.rc)
            return False
        inflight[info.mid] = row.id
        self.stats.published += 1
        return True

    def _resend_due(
        self, client: Any, inflight: dict[int, int], waiting: Unreceipted, bucket: TokenBucket
    ) -> bool:
        """Send again, paced like the backlog, the batches whose receipt is overdue.

        False if a publish failed (the caller reconnects).
        """
        broker = self.config.broker
        while len(inflight) < broker.max_inflight:
            now = time.monotonic()
            next_due = waiting.next_due()
            if next_due is None or next_due > now:
                return True
            if not self._unthrottled and not bucket.take(now):
                return True
            due = waiting.due(now, limit=1)
            for row in self.outbox.rows_by_ids(due):  # empty if receipted meanwhile
                log.info("no receipt for batch %s/%d yet; sending it again", row.boot_id, row.seq)
                if not self._send(client, row, inflight):
                    return False
                self.stats.resent += 1
        return True

    def _take_receipts(self, waiting: Unreceipted) -> None:
        """Delete the batches the cloud's receipts cover; only this deletes sent batches."""
        while True:
            try:
                receipt = self._receipts.get_nowait()
            except queue.Empty:
                return
            removed = self.outbox.apply_receipt(receipt.boot_id, receipt.watermark, receipt.ranges)
            waiting.forget(removed)
            self.stats.receipted += len(removed)
            if removed and receipt.boot_id == self.boot_id:
                self.stats.receipted_own += len(removed)
                if self.first_own_receipt_ms is None:
                    self.first_own_receipt_ms = time.time_ns() // 1_000_000

    def _take_acks(self, inflight: dict[int, int], waiting: Unreceipted, now: float) -> int:
        """Note what the broker took (kept until receipted); returns how many nobody received."""
        unrouted_batches = 0
        while True:
            try:
                mid, failed, unrouted, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            row_id = inflight.pop(mid, None)
            if row_id is None:
                continue  # a birth, health or reply message
            if unrouted:
                self.stats.unrouted += 1
                if self.config.broker.resend_unrouted:
                    unrouted_batches += 1
                    continue
            if failed:
                # Kept in the outbox: resent after the receipt wait, dropped by the age cap.
                self.stats.refused += 1
                log.error("broker refused batch %d: %s", row_id, reason)
            else:
                self.stats.acked += 1
            waiting.sent(row_id, now)
        return unrouted_batches

    def _say_goodbye(self, client: Any) -> None:
        offline = will_message(
            device=self.config.device_id,
            boot_id=self.boot_id,
            config_hash=self.config.config_hash,
            now_ms=time.time_ns() // 1_000_000,
        )
        info = client.publish(
            self._state_topic,
            offline.to_json(),
            qos=1,
            retain=True,
            properties=self._properties("json"),
        )
        if info.rc == 0:
            info.wait_for_publish(OFFLINE_PUBLISH_TIMEOUT_SECONDS)
        self._connected.clear()
        self._goodbye_said = True
        client.disconnect()
        log.info("disconnected cleanly")
