"""The simulated MQTT sensor node: JSON readings to a gateway-local broker, ESPHome style.

Each node is one aiomqtt client, so hundreds share one event loop. The node
announces itself with a retained ``online`` on its status topic and leaves
``offline`` as its last will; on a clean stop it publishes ``offline`` itself
(as ESPHome does on shutdown). The fleet's shared ticker calls `tick` once per
resolution step; a node publishes one JSON object per step.

Faults: value faults shape the JSON values (``nan`` is the JSON token NaN,
which Python's json accepts); "garbage" publishes bytes that are not JSON;
"slow" publishes each reading `delay_s` late; "dropout" and "refused" cut the
TCP connection without DISCONNECT, so the broker publishes the will, and the
node stays away until the fault ends; "bad_crc" does not apply to MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
from typing import Any

import aiomqtt

from millrace.fieldsim.const import MQTT_KEEPALIVE_SECONDS, MQTT_RECONNECT_SECONDS
from millrace.fieldsim.faults import ActiveFault, DeviceFaults
from millrace.fieldsim.feed import Feed
from millrace.fieldsim.groundtruth import GroundTruth
from millrace.fieldsim.models import mix, stream_key
from millrace.fieldsim.specs import JsonSignal, spec_info

logger = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
_OUTAGE_KINDS = ("dropout", "refused")
# How long to wait for the client to notice a connection we cut ourselves.
_SEVER_WAIT_SECONDS = 5.0


class MqttNode:
    """One ESPHome/Tasmota-like sensor node."""

    kind = "mqtt"

    def __init__(
        self,
        *,
        device_id: str,
        gateway: str,
        host: str,
        port: int,
        prefix: str,
        signals: tuple[JsonSignal, ...],
        feed: Feed,
        faults: DeviceFaults,
        ground_truth: GroundTruth | None = None,
    ) -> None:
        self.device_id = device_id
        self.gateway = gateway
        self.host = host
        self.port = port
        self.topic = f"{prefix}/{device_id}/sensor"
        self.status_topic = f"{prefix}/{device_id}/status"
        self.signals = signals
        self._paths = [(sig, tuple(sig.path.split("."))) for sig in signals]
        self._feed = feed
        self._faults = faults
        self._gt = ground_truth
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self._warned = False

    def start(self, stop: asyncio.Event) -> None:
        """Start connecting; the node runs until `stop` is set."""
        self._task = asyncio.create_task(self._run(stop), name=f"{self.device_id} mqtt")

    async def wait_stopped(self) -> None:
        """Wait for the node to publish offline and disconnect."""
        for task in list(self._inflight):
            task.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def tick(self, now: float) -> None:
        """Publish the reading of the step holding `now`, if connected."""
        client = self._client
        if client is None:
            return
        transport = self._faults.transport_at(now) if self._faults.windows else None
        kind = transport.kind if transport is not None else ""
        if kind in _OUTAGE_KINDS:
            return
        payload, rows = self._payload(now, kind)
        delay = transport.delay_s if transport is not None and kind == "slow" else 0.0
        task = asyncio.create_task(self._publish(client, payload, rows, delay))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _payload(
        self, now: float, transport: str
    ) -> tuple[bytes, list[tuple[str, float, float, str]]]:
        rows: list[tuple[str, float, float, str]] = []
        doc: dict[str, Any] = {}
        for sig, parts in self._paths:
            sample = self._feed.sample(self.device_id, sig.spec, now, self._faults)
            served = (
                round(sample.value, sig.decimals) if math.isfinite(sample.value) else sample.value
            )
            node = doc
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = served
            rows.append((sig.spec.name, sample.ts, served, sample.fault or transport))
        if transport == "garbage":
            key = stream_key(self._feed.seed, self.device_id, "", "garbage")
            step = math.floor(now / self.signals[0].spec.resolution_s)
            junk = b"".join(mix(key, step * 4 + i).to_bytes(8, "big") for i in range(4))
            return b"\xff\xfe" + junk, [(name, ts, math.nan, "garbage") for name, ts, _, _ in rows]
        return json.dumps(doc, separators=(",", ":")).encode(), rows

    async def _publish(
        self,
        client: aiomqtt.Client,
        payload: bytes,
        rows: list[tuple[str, float, float, str]],
        delay: float,
    ) -> None:
        if delay:
            await asyncio.sleep(delay)
        try:
            await client.publish(self.topic, payload, qos=0)
        except aiomqtt.MqttError as exc:
            logger.debug("%s: publish failed: %s", self.device_id, exc)
            return
        if self._gt is not None:
            served_at = time.time()
            for name, ts, value, fault in rows:
                self._gt.record(served_at, self.device_id, name, ts, value, fault)

    def _outage(self, now: float) -> ActiveFault | None:
        """The connection fault on at `now`, or the next one to come."""
        for window in self._faults.edges(_OUTAGE_KINDS):
            if window.end > now:
                return window
        return None

    async def _run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            outage = self._outage(time.time())
            if outage is not None and outage.start <= time.time():
                await _wait_until(stop, outage.end)
                continue
            try:
                await self._session(stop, outage)
            except aiomqtt.MqttError as exc:
                # Say it once per node at warning level; a fleet retries hundreds of nodes.
                log = logger.debug if self._warned else logger.warning
                log("%s: broker %s:%s: %s; retrying", self.device_id, self.host, self.port, exc)
                self._warned = True
                self.connected.clear()
                await _wait_until(stop, time.time() + MQTT_RECONNECT_SECONDS)

    async def _session(self, stop: asyncio.Event, outage: ActiveFault | None) -> None:
        will = aiomqtt.Will(self.status_topic, OFFLINE, qos=1, retain=True)
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.device_id,
            will=will,
            keepalive=MQTT_KEEPALIVE_SECONDS,
            clean_session=True,
        ) as client:
            await client.publish(self.status_topic, ONLINE, qos=1, retain=True)
            self._client = client
            self.connected.set()
            try:
                severed = await self._connected(client, stop, outage)
            finally:
                self._client = None
                self.connected.clear()
            if not severed:
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish(self.status_topic, OFFLINE, qos=1, retain=True)

    async def _connected(
        self, client: aiomqtt.Client, stop: asyncio.Event, outage: ActiveFault | None
    ) -> bool:
        """Stay connected until stop (False) or an outage starts (True); raise if the link drops."""
        stop_task = asyncio.create_task(stop.wait())
        lost_task = asyncio.create_task(_until_lost(client))
        timeout = None if outage is None else max(0.0, outage.start - time.time())
        done, _ = await asyncio.wait(
            {stop_task, lost_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        stop_task.cancel()
        if stop_task in done:
            lost_task.cancel()
            return False
        if lost_task in done:
            lost_task.result()
            return False
        logger.info("%s: fault %s: cutting the connection", self.device_id, outage and outage.kind)
        _sever(client)
        with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
            await asyncio.wait_for(lost_task, _SEVER_WAIT_SECONDS)
        return True

    def describe(self) -> dict[str, Any]:
        """This device's entry in the fleet manifest."""
        return {
            "id": self.device_id,
            "gateway": self.gateway,
            "kind": self.kind,
            "protocol": "mqtt",
            "host": self.host,
            "port": self.port,
            "topic": self.topic,
            "status_topic": self.status_topic,
            "payload": "json",
            "signals": [
                {**spec_info(sig.spec), "path": sig.path, "decimals": sig.decimals}
                for sig in self.signals
            ],
        }


async def _until_lost(client: aiomqtt.Client) -> None:
    """Return only by raising MqttError when the connection is gone (nodes subscribe to nothing)."""
    async for _ in client.messages:
        pass


def _sever(client: aiomqtt.Client) -> None:
    """Cut the TCP connection without DISCONNECT, like a node losing Wi-Fi, so the will fires.

    aiomqtt has no public way to do this; its paho client owns the socket.
    """
    sock = client._client.socket()
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


async def _wait_until(stop: asyncio.Event, when: float) -> None:
    """Sleep until `when` or until stop is set, whichever comes first."""
    timeout = when - time.time()
    if math.isinf(timeout):
        await stop.wait()
        return
    if timeout > 0:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout)
