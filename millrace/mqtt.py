"""One way to build an MQTT client: paho 2.x, MQTT v5, mutual TLS with hostname checks.

Edge agents and cloud workers both call `tls_client`; paho is imported only
here, inside the function, so the millrace base install does not need it.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from millrace.errors import ConfigError

if TYPE_CHECKING:
    import paho.mqtt.client as paho

# A session resumed with clean_start=False must outlive short outages and restarts.
SESSION_EXPIRY_SECONDS = 7 * 24 * 3600
RECONNECT_MIN_DELAY_SECONDS = 1
RECONNECT_MAX_DELAY_SECONDS = 30
_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class _ConnectDefaults:
    clean_start: bool
    session_expiry_seconds: int
    receive_maximum: int | None


def tls_context(*, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A client TLS context: trusts only the project CA, checks the host name, TLS >= 1.2."""
    for what, path in (("ca", ca), ("cert", cert), ("key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"tls {what}", f"file not found: {path}")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("tls", f"cannot load {cert} / {key} / {ca}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@functools.cache
def _client_class() -> type[paho.Client]:
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    class MillraceClient(paho.Client):
        """paho Client whose connect() defaults come from `tls_client`'s options."""

        millrace_defaults = _ConnectDefaults(True, 0, None)

        def _millrace_properties(self) -> Properties:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.millrace_defaults.session_expiry_seconds
            if self.millrace_defaults.receive_maximum is not None:
                props.ReceiveMaximum = self.millrace_defaults.receive_maximum
            return props

        def connect_async(  # type: ignore[override]
            self,
            host: str,
            port: int = 8883,
            keepalive: int = 60,
            bind_address: str = "",
            bind_port: int = 0,
            clean_start: Any = _UNSET,
            properties: Properties | None = None,
        ) -> None:
            super().connect_async(
                host,
                port,
                keepalive,
                bind_address,
                bind_port,
                self.millrace_defaults.clean_start if clean_start is _UNSET else clean_start,
                self._millrace_properties() if properties is None else properties,
            )

        def connect(  # type: ignore[override]
            self,
            host: str,
            port: int = 8883,
            keepalive: int = 60,
            bind_address: str = "",
            bind_port: int = 0,
            clean_start: Any = _UNSET,
            properties: Properties | None = None,
        ) -> paho.MQTTErrorCode:
            self.connect_async(
                host, port, keepalive, bind_address, bind_port, clean_start, properties
            )
            return self.reconnect()

    return MillraceClient


def tls_client(
    client_id: str,
    *,
    ca: Path,
    cert: Path,
    key: Path,
    clean_start: bool = True,
    session_expiry_seconds: int | None = None,
    receive_maximum: int | None = None,
    max_inflight_messages: int | None = None,
    manual_ack: bool = False,
    userdata: Any = None,
) -> paho.Client:
    """A paho MQTT v5 client with mutual TLS, not yet connected.

    `connect(host, port)` then uses `clean_start` and a session expiry of
    `session_expiry_seconds` (default: 0 for a clean start, SESSION_EXPIRY_SECONDS
    to resume one). `receive_maximum` caps how many unacknowledged QoS 1
    messages the broker sends us; `manual_ack` lets a worker ack after commit.
    Host names are always verified against the broker certificate.
    """
    context = tls_context(ca=ca, cert=cert, key=key)
    from paho.mqtt.client import CallbackAPIVersion, MQTTProtocolVersion

    client = _client_class()(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        userdata=userdata,
        manual_ack=manual_ack,
    )
    if session_expiry_seconds is None:
        session_expiry_seconds = 0 if clean_start else SESSION_EXPIRY_SECONDS
    client.millrace_defaults = _ConnectDefaults(  # type: ignore[attr-defined]
        clean_start, session_expiry_seconds, receive_maximum
    )
    client.tls_set_context(context)
    client.tls_insecure_set(False)
    client.reconnect_delay_set(RECONNECT_MIN_DELAY_SECONDS, RECONNECT_MAX_DELAY_SECONDS)
    if max_inflight_messages is not None:
        client.max_inflight_messages_set(max_inflight_messages)
    return client
