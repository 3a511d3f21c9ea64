"""The broker step of `edge check`: prove the device's credentials against the plant broker.

A config can be valid and its files present while the gateway still cannot publish: the
key belongs to another certificate, the certificate is from another CA or revoked, the CA
file is not the broker's, or the broker's name is wrong or does not resolve. Only the
broker can say, so the check asks it, in one of two ways:

- "mqtt" (the agent is not running: install time, first boot): TLS handshake, then an
  MQTT CONNECT with the device's identity and its CONNACK, then DISCONNECT. The agent
  connects with a clean start and no session expiry (publisher.py), so the broker holds
  no session of it that the check could resume, drain or end. While the check runs it
  holds the agent's lock (shared), so an agent starting meanwhile is refused and
  restarted by systemd instead of being taken over.
- "tls" (the agent is running): the production broker forces the client id to the
  certificate's name, so a CONNECT would take over the agent's session. The check only
  does the TLS handshake and sends a CONNECT of an unsupported protocol version, which
  the broker answers with a refusing CONNACK before it looks at any client id: the
  broker accepted the certificate, and no session was touched. The agent's own last
  CONNACK comes from its status.json.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from millrace.edge.agent import LOCK_FILE
from millrace.edge.config import AgentConfig, BrokerConfig
from millrace.edge.status import STATUS_FILE
from millrace.errors import ConfigError
from millrace.mqtt import tls_client, tls_context

# Each step (resolve, TCP connect, TLS handshake, CONNACK) gives up after this long.
BROKER_TIMEOUT_SECONDS: Final = 5.0
# MQTT CONNECT with protocol level 0 (no such version): keepalive 60, empty client id.
# A broker answers CONNACK "unacceptable protocol version" and closes (MQTT 3.1.1 3.1.2.2).
_PROBE_CONNECT: Final = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([0, 2, 0, 60, 0, 0])
_CONNACK: Final = 0x20
# OpenSSL verify codes of a broker certificate not signed by the CA file.
_NOT_OUR_CA: Final = {2, 18, 19, 20, 21}
# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH: Final = {62, 64}
_EXPIRED: Final = 10

Mode = Literal["mqtt", "tls"]


@dataclass(frozen=True, slots=True)
class EndpointResult:
    """One broker of `[broker]`: "" when it accepted the device, else the problem and fix."""

    host: str
    port: int
    problem: str


@dataclass(frozen=True, slots=True)
class BrokerResult:
    """What the broker step did (`mode`), per broker, and the running agent's own view."""

    mode: Mode
    why: str  # why this mode
    endpoints: tuple[EndpointResult, ...]
    agent: dict[str, Any] | None  # the running agent's status.json ("tls" mode)

    @property
    def ok(self) -> bool:
        return all(not e.problem for e in self.endpoints)

    @property
    def proven(self) -> str:
        if self.mode == "mqtt":
            return "TLS handshake and CONNACK with the device's certificate"
        return "TLS handshake with the device's certificate (no MQTT session)"

    def problem(self) -> str:
        """One line: the first failing broker's problem (and how many more failed)."""
        failed = [e for e in self.endpoints if e.problem]
        if not failed:
            return ""
        more = f" (and {len(failed) - 1} more broker(s))" if len(failed) > 1 else ""
        first = failed[0]
        return f"{first.host}:{first.port}: {first.problem}{more}"

    def agent_text(self) -> str:
        """The running agent's last CONNACK as its status.json tells it."""
        if self.agent is None:
            return "its status.json cannot be read"
        if self.agent.get("connected") and self.agent.get("connected_ms"):
            since = dt.datetime.fromtimestamp(self.agent["connected_ms"] / 1000, dt.UTC)
            return f"connected, first CONNACK at {since:%Y-%m-%dT%H:%M:%SZ}"
        error = self.agent.get("last_error") or "no CONNACK yet"
        return f"not connected: {error}"


def check_broker(config: AgentConfig, *, timeout_s: float = BROKER_TIMEOUT_SECONDS) -> BrokerResult:
    """Ask every broker of `[broker]` whether it accepts this device's credentials."""
    broker = config.broker
    with _agent_lock(config.state_dir) as agent_running:
        mode: Mode = "tls" if agent_running else "mqtt"
        why = agent_running or "the agent is not running"
        try:
            context = tls_context(ca=broker.ca, cert=broker.cert, key=broker.key)
        except ConfigError as exc:
            problem = _files_problem(broker, exc)
            results = tuple(EndpointResult(h, p, problem) for h, p in broker.endpoints)
            return BrokerResult(mode, why, results, _agent_status(config, mode))
        results = tuple(
            EndpointResult(
                host, port, _ask(config, context, host, port, mode=mode, timeout_s=timeout_s)
            )
            for host, port in broker.endpoints
        )
    return BrokerResult(mode, why, results, _agent_status(config, mode))


@contextlib.contextmanager
def _agent_lock(state_dir: Path) -> Iterator[str]:
    """Yield "" while holding the agent's lock shared (no agent runs), else why not.

    The lock file is opened read-only and never created: root creating it would leave a
    file the agent's user cannot open.
    """
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield ""  # no agent ever ran with this state directory
        return
    except OSError as exc:
        yield f"cannot tell whether the agent runs ({exc.strerror}: {path}), so no MQTT session"
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            yield f"the agent is running (it holds {path})"
            return
        yield ""
    finally:
        os.close(fd)


def _agent_status(config: AgentConfig, mode: Mode) -> dict[str, Any] | None:
    if mode == "mqtt":
        return None
    try:
        status = json.loads((config.state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def _files_problem(broker: BrokerConfig, exc: ConfigError) -> str:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError) and cause.reason == "KEY_VALUES_MISMATCH":
        return (
            f"broker.key ({broker.key}) does not belong to broker.cert ({broker.cert}):"
            " install the key this certificate was issued for"
        )
    return f"cannot use the TLS files: {exc.problem}: install the files `millrace provision` made"


def _ask(
    config: AgentConfig,
    context: ssl.SSLContext,
    host: str,
    port: int,
    *,
    mode: Mode,
    timeout_s: float,
) -> str:
    problem = _tls_probe(config.broker, context, host, port, timeout_s)
    if problem or mode == "tls":
        return problem
    return _mqtt_connect(config, host, port, timeout_s)


def _tls_probe(
    broker: BrokerConfig, context: ssl.SSLContext, host: str, port: int, timeout_s: float
) -> str:
    """TLS handshake with the device's credentials, then the probe CONNECT; "" if answered."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        return (
            f"the broker host {host!r} ([broker] host) does not resolve ({reason}):"
            " fix the name, or add it to DNS or /etc/hosts"
        )
    handshake_done = False
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            handshake_done = True
            # TLS 1.3: the broker checks the device certificate after the client's side of
            # the handshake is done, so only its answer to the probe tells.
            tls.sendall(_PROBE_CONNECT)
            answer = tls.recv(4)
    except ssl.SSLCertVerificationError as exc:
        return _server_cert_problem(broker, host, exc)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        if not isinstance(exc, ssl.SSLError) and not handshake_done:
            return f"cannot reach the broker ({exc.strerror}): check [broker] host and port"
        why = exc.reason if isinstance(exc, ssl.SSLError) else None
        return (
            f"the broker refused the device certificate broker.cert ({broker.cert}) during the"
            f" TLS handshake ({why or 'it closed the connection'}): it must be issued by the"
            " broker's CA, not revoked nor expired; install this device's current certificate"
        )
    except TimeoutError:
        return (
            f"no answer within {timeout_s:g} s: check [broker] host and port, the network"
            " and the firewall"
        )
    except OSError as exc:
        return (
            f"cannot reach the broker ({exc.strerror or exc}): check [broker] host and port,"
            " the network, and that the broker runs"
        )
    if not answer or answer[0] != _CONNACK:
        return "accepted TLS but did not answer as an MQTT broker: check [broker] port"
    return ""


def _server_cert_problem(broker: BrokerConfig, host: str, exc: ssl.SSLCertVerificationError) -> str:
    if exc.verify_code in _NAME_MISMATCH:
        return (
            f"the broker's certificate is not for {host!r} ([broker] host): use a name the"
            " broker certificate carries, or reissue it with this name"
        )
    if exc.verify_code in _NOT_OUR_CA:
        return (
            f"the broker's certificate is not signed by the CA in broker.ca ({broker.ca}):"
            " install the plant CA's ca.crt there"
        )
    if exc.verify_code == _EXPIRED:
        return "the broker's certificate has expired: renew it on the broker"
    return f"the broker's certificate was rejected ({exc.verify_message})"


def _mqtt_connect(config: AgentConfig, host: str, port: int, timeout_s: float) -> str:
    """CONNECT as the agent does (clean start, no session kept), wait for CONNACK, leave."""
    broker = config.broker
    client = tls_client(
        config.device_id, ca=broker.ca, cert=broker.cert, key=broker.key, clean_start=True
    )
    client.connect_timeout = timeout_s
    answered = threading.Event()
    outcome: list[Any] = []

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        outcome.append(reason)
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, broker.keepalive_s)
    except (OSError, ssl.SSLError) as exc:
        return f"MQTT connection failed after a good TLS probe ({exc}): try again"
    client.loop_start()
    try:
        if not answered.wait(timeout_s):
            return f"no CONNACK within {timeout_s:g} s: look at the broker's log"
        if outcome[0].is_failure:
            return (
                f"the broker refused the MQTT connection ({outcome[0]}): give the device its"
                " broker role (millrace broker sync)"
            )
        return ""
    finally:
        client.disconnect()
        client.loop_stop()
