"""Signals pushed by field nodes (ESPHome, Tasmota) to a local MQTT broker.

Every message on a signal's topic is one reading, timestamped on arrival.
The agent keeps a persistent MQTT 5 session on the local broker (clean_start
False, a session expiry interval, a client id stable across restarts:
`<device_id>-<source name>`) with QoS 1 subscriptions, so what a node publishes
at QoS 1 while the agent restarts is queued by the broker and delivered after.
paho's network thread runs the callback, which only parses and hands the
value to the pipeline; nothing here waits on the plant broker.
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import time
from collections.abc import Sequence
from typing import Any

from millrace.edge.config import LocalMqtt, MqttSpec, SignalConfig
from millrace.edge.drivers.base import ReadFailure, ReadResult, Sink, text_or_number
from millrace.errors import ConfigError

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
MAX_PAYLOAD_BYTES = 64 * 1024
RECONNECT_MIN_SECONDS = 1
RECONNECT_MAX_SECONDS = 30
KEEPALIVE_SECONDS = 30
SUBSCRIBE_QOS = 1


def compile_field(path: str) -> tuple[str | int, ...]:
    """'a.b[0].c' -> ('a', 'b', 0, 'c')."""
    return tuple(name if name else int(index) for name, index in _TOKEN.findall(path))


def extract(payload: bytes, path: tuple[str | int, ...], signal: SignalConfig) -> ReadResult:
    """The value at `path` in a JSON payload (or the whole payload when path is empty)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return ReadFailure(f"payload larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return ReadFailure("payload is not UTF-8")
    if not path:
        return text_or_number(signal, text)
    try:
        node: Any = json.loads(text)
    except ValueError:
        return ReadFailure("payload is not JSON")
    for step in path:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return ReadFailure(f"no field {signal.spec.field!r} in payload")  # type: ignore[union-attr]
    if isinstance(node, bool):
        return node
    if isinstance(node, (int, float)):
        return float(node) if signal.kind == "numeric" else node
    if isinstance(node, str):
        return text_or_number(signal, node)
    return ReadFailure(f"field {signal.spec.field!r} is not a value")  # type: ignore[union-attr]


def client_credentials(
    src: LocalMqtt, *, config_file: str | None = None
) -> tuple[str | None, ssl.SSLContext | None]:
    """The password and TLS context for `src`; ConfigError naming the key if a file is bad."""
    key = f"local_mqtt.{src.name}.password_file"
    password = None
    context = None
    try:
        if src.password_file is not None:
            lines = src.password_file.read_text(encoding="utf-8").splitlines()
            if not lines or not lines[0]:
                raise ConfigError(key, f"{src.password_file} is empty", source=config_file)
            password = lines[0]
        if src.ca is not None:
            key = f"local_mqtt.{src.name}.ca"
            context = ssl.create_default_context(cafile=str(src.ca))
            if src.cert is not None and src.key is not None:
                key = f"local_mqtt.{src.name}.cert"
                context.load_cert_chain(str(src.cert), str(src.key))
            context.check_hostname = True
    except (OSError, UnicodeDecodeError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(key, f"cannot use it: {exc}", source=config_file) from exc
    return password, context


class LocalMqttSource:
    """One connection to a local broker, feeding every signal that names it."""

    def __init__(
        self,
        source: LocalMqtt,
        items: Sequence[tuple[int, SignalConfig]],
        *,
        device_id: str,
        sink: Sink,
        probe: bool = False,
    ) -> None:
        """`probe` (edge check): a client id and a throw-away session of its own, so a check
        run beside the agent neither takes over the agent's connection (same client id) nor
        consumes the messages queued in the agent's session."""
        self.source = source
        self.sink = sink
        self.probe = probe
        self.errors = 0
        self._routes: dict[str, list[tuple[int, SignalConfig, tuple[str | int, ...]]]] = {}
        for index, signal in items:
            assert isinstance(signal.spec, MqttSpec)
            route = (index, signal, compile_field(signal.spec.field))
            self._routes.setdefault(signal.spec.topic, []).append(route)
        client_id = source.client_id or f"{device_id}-{source.name}"
        if probe:
            client_id = f"{client_id}-check-{os.getpid()}"
        self._client = self._make_client(client_id)
        self._connected = False
        self._stopping = False

    def _make_client(self, client_id: str) -> Any:
        import paho.mqtt.client as paho

        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTProtocolVersion.MQTTv5,
        )
        src = self.source
        password, context = client_credentials(src)
        if src.username:
            client.username_pw_set(src.username, password)
        if context is not None:
            client.tls_set_context(context)
        client.reconnect_delay_set(RECONNECT_MIN_SECONDS, RECONNECT_MAX_SECONDS)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        """Connect resuming our session: what nodes sent at QoS 1 meanwhile is delivered now."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0 if self.probe else self.source.session_expiry_s
        self._client.connect_async(
            self.source.host,
            self.source.port,
            KEEPALIVE_SECONDS,
            clean_start=self.probe,
            properties=properties,
        )
        self._client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.errors += 1
            log.warning("local broker %s refused us: %s", self.source.name, reason)
            return
        self._connected = True
        log.info("connected to local broker %s", self.source.name)
        # QoS 1: the local broker queues a node's QoS 1 readings in our session while we
        # are away (a QoS 0 subscription would downgrade them and drop them instead).
        client.subscribe([(topic, SUBSCRIBE_QOS) for topic in self._routes])

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self._stopping:
            log.info("disconnected from local broker %s", self.source.name)
        elif self._connected:
            self.errors += 1
            log.warning("lost local broker %s: %s", self.source.name, reason)
        self._connected = False

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self.errors += 1

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        ts_ms = time.time_ns() // 1_000_000
        for index, signal, path in self._routes.get(message.topic, ()):
            result = extract(message.payload, path, signal)
            if isinstance(result, ReadFailure):
                self.sink.failure(index, ts_ms, result.reason)
            else:
                self.sink.reading(index, ts_ms, result)
