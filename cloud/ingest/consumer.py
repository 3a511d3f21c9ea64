"""The worker's MQTT side: a persistent session on shared subscriptions, manual acks.

paho's network thread only converts each message to an `Inbound` and puts it
on a queue; the worker thread decodes, stores, and acknowledges later with
`ack()`. Nothing is acknowledged on receipt (aiomqtt would, and a crash would
then lose data), and the broker's Receive Maximum bounds what is in flight.

Acks are fenced by connection generation: once a connection is gone, acks
for messages it delivered are dropped, because after a reconnect the
broker's session resends them (same packet ids) and a stale PUBACK could
acknowledge a different message that reused the id. Those messages come back,
the ledger recognises them, and they are acked then.

With several brokers (`broker.hosts`) the worker holds one `Consumer` per broker
(`Consumers`), each with its own persistent session, all feeding one queue: a
batch is stored whichever broker carried it, and its ack and receipt go back
through that broker (docs/cloud.md "Several brokers").
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from millrace import topics
from millrace.cloud.ingest.messages import INGESTED_KINDS, Inbound
from millrace.errors import IngestError
from millrace.mqtt import tls_client

if TYPE_CHECKING:
    import paho.mqtt.client as paho

    from millrace.cloud.config import BrokerSettings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS: Final = 15.0
DISCONNECT_TIMEOUT_SECONDS: Final = 5.0


class Consumer:
    """One paho client: connect, subscribe on every connect, enqueue, ack after commit."""

    def __init__(
        self, settings: BrokerSettings, inbox: queue.Queue[Inbound], *, index: int = 0
    ) -> None:
        self._settings = settings
        self._inbox = inbox
        self.index = index  # tags each Inbound with the broker that carried it
        self._lock = threading.Lock()
        self._generation = 0
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self._client: paho.Client | None = None
        self.session_present = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def where(self) -> str:
        """`host:port` of this consumer's broker (logs and the per-broker metric)."""
        return f"{self._settings.host}:{self._settings.port}"

    def filters(self) -> list[str]:
        """The shared-subscription filters of this worker's group."""
        group = self._settings.share_group
        return [topics.shared(group, topics.all_devices_filter(k)) for k in INGESTED_KINDS]

    def start(self, *, timeout_s: float = CONNECT_TIMEOUT_SECONDS) -> None:
        """Connect (resuming the session) and subscribe; raises IngestError if it fails."""
        settings = self._settings
        client = tls_client(
            settings.client_id,
            ca=settings.ca,
            cert=settings.cert,
            key=settings.key,
            clean_start=False,
            session_expiry_seconds=settings.session_expiry_s,
            receive_maximum=settings.receive_maximum,
            manual_ack=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._connected.clear()
        self._connect_error = None
        self._client = client
        try:
            client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s)
        except (OSError, ValueError) as exc:
            raise IngestError(f"broker {settings.host}:{settings.port}: {exc}") from exc
        client.loop_start()
        if not self._connected.wait(timeout_s):
            # paho keeps retrying in the background; the worker waits on `connected`.
            log.warning(
                "broker %s:%s not connected yet (%s); still trying",
                settings.host,
                settings.port,
                self._connect_error or "no answer",
            )

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def stop(self) -> None:
        """Disconnect cleanly (the session and its unacked messages stay with the broker)."""
        client, self._client = self._client, None
        if client is None:
            return
        with self._lock:
            self._generation += 1
        self._connected.clear()
        try:
            client.disconnect()
        except Exception:  # a broken socket is fine: we are leaving anyway
            log.debug("disconnect failed", exc_info=True)
        client.loop_stop()
        self._connected.clear()

    def ack(self, messages: list[Inbound]) -> int:
        """PUBACK the messages of the current connection; returns how many were acked."""
        client = self._client
        if client is None:
            return 0
        acked = 0
        with self._lock:
            generation = self._generation
            for msg in messages:
                if msg.generation == generation and msg.qos > 0:
                    client.ack(msg.mid, msg.qos)
                    acked += 1
        return acked

    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> bool:
        """Queue a publish (alerts); False when not connected."""
        client = self._client
        if client is None or not self.connected:
            return False
        info = client.publish(topic, payload, qos=qos)
        return info.rc == 0

    # -- paho callbacks (network thread): no I/O beyond the queue ----------------------

    def _on_connect(
        self, client: paho.Client, _userdata: Any, flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
            log.warning("broker %s refused the connection: %s", self.where, reason)
            return
        with self._lock:
            self._generation += 1
        self.session_present = bool(flags.session_present)
        from paho.mqtt.subscribeoptions import SubscribeOptions

        options = SubscribeOptions(qos=1)
        client.subscribe([(f, options) for f in self.filters()])
        log.info(
            "connected to %s:%s as %s (session resumed: %s)",
            self._settings.host,
            self._settings.port,
            self._settings.client_id,
            self.session_present,
        )

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, _mid: int, reasons: Any, _props: Any
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            self._connect_error = f"subscription refused: {failed}"
            log.error("broker %s refused subscriptions %s (check the ACL)", self.where, failed)
            return
        self._connected.set()

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        with self._lock:
            self._generation += 1
        if self._connected.is_set():
            log.warning("disconnected from the broker %s: %s", self.where, reason)
        self._connected.clear()

    def _on_message(self, _client: paho.Client, _userdata: Any, message: Any) -> None:
        props = message.properties
        content_type = getattr(props, "ContentType", None) if props is not None else None
        try:
            topic = message.topic
        except UnicodeDecodeError:  # impossible from a compliant broker; keep it visible
            topic = repr(message._topic)
        self._inbox.put(
            Inbound(
                topic=topic,
                payload=bytes(message.payload),
                qos=message.qos,
                mid=message.mid,
                content_type=content_type,
                dup=bool(message.dup),
                generation=self._generation,
                received_at=datetime.now(UTC),
                received_mono=time.monotonic(),
                broker=self.index,
            )
        )


class Consumers:
    """One `Consumer` per configured broker, one queue: the worker talks to all of them.

    Each keeps its own session and generation; acks and receipts are routed by the
    `Inbound.broker` index, so a broker only ever acks what it delivered.
    """

    def __init__(self, settings: BrokerSettings, inbox: queue.Queue[Inbound]) -> None:
        self.members = [
            Consumer(replace(settings, host=host, port=port, hosts=()), inbox, index=i)
            for i, (host, port) in enumerate(settings.endpoints)
        ]

    @property
    def connected(self) -> bool:
        """At least one broker is subscribed: the worker is consuming."""
        return any(c.connected for c in self.members)

    def start(self, *, timeout_s: float = CONNECT_TIMEOUT_SECONDS) -> None:
        """Connect every broker; one that does not answer yet keeps being retried."""
        for consumer in self.members:
            consumer.start(timeout_s=timeout_s / len(self.members))

    def wait_connected(self, timeout_s: float) -> bool:
        """Every broker subscribed within `timeout_s` (in total)."""
        deadline = time.monotonic() + timeout_s
        return all(c.wait_connected(max(0.0, deadline - time.monotonic())) for c in self.members)

    def stop(self) -> None:
        for consumer in self.members:
            consumer.stop()

    def ack(self, messages: list[Inbound]) -> int:
        """PUBACK each message through the broker that delivered it."""
        by_broker: dict[int, list[Inbound]] = defaultdict(list)
        for msg in messages:
            by_broker[msg.broker].append(msg)
        return sum(self.members[i].ack(msgs) for i, msgs in by_broker.items())

    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> bool:
        """Publish through every connected broker (alerts: a reader is on one of them)."""
        sent = [c.publish(topic, payload, qos=qos) for c in self.members]
        return any(sent)

    def publish_via(self, brokers: set[int], topic: str, payload: bytes) -> bool:
        """Publish through the brokers in `brokers` (a receipt: where its batches came)."""
        sent = [self.members[i].publish(topic, payload) for i in sorted(brokers)]
        return any(sent)
