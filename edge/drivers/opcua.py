"""OPC UA client (asyncua): signals polled or subscribed on one session per server.

asyncua is asyncio-based: each [opcua.<name>] server gets one thread running one
event loop with one session. That thread keeps every schedule of the server's
signals: `mode = "poll"` signals are read together per poll_s (one Read request),
`mode = "subscribe"` signals are monitored items sampled every poll_s, delivered
by the subscription. Readings go straight to the pipeline from that thread, as
the mqtt driver's paho thread does; the agent's other threads are untouched.

Failures are per signal, like the Modbus driver's: a bad node id, a refused
monitored item or a bad status code fails only that signal, on its schedule.
While the session is down (server restart, session expiry, refused certificate)
every signal of the server fails once per poll_s with the reason, and the thread
reconnects with backoff (0.5 s doubling up to reconnect_max_s), creating a new
session and subscriptions. A probe read of the server state every second finds
a dead session even when only subscriptions are in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from millrace.edge.config import OpcUaServer, OpcUaSpec, SignalConfig
from millrace.edge.drivers.base import ReadFailure, ReadResult, Sink, text_or_number
from millrace.errors import ConfigError

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'millrace[opcua]'"
PROBE_SECONDS = 1.0
RECONNECT_MIN_SECONDS = 0.5
# A session that lasted this long resets the reconnect backoff.
SESSION_OK_SECONDS = 10.0
SERVER_STATE_NODE = "i=2259"  # Server.ServerStatus.State
_REFUSED_CERT = {
    "BadCertificateUntrusted",
    "BadSecurityChecksFailed",
    "BadCertificateInvalid",
    "BadCertificateUriInvalid",
    "BadCertificateTimeInvalid",
    "BadCertificateRevoked",
    "BadCertificateUseNotAllowed",
}
_REFUSED_USER = {"BadUserAccessDenied", "BadIdentityTokenRejected", "BadIdentityTokenInvalid"}


def asyncua_missing() -> str | None:
    """None when asyncua can be imported, else the one-line fix."""
    try:
        import asyncua  # noqa: F401
    except ImportError:
        return f"the OPC UA driver needs asyncua: {EXTRA_HINT}"
    return None


def _quiet_asyncua() -> None:
    # asyncua logs every refused request and certificate hint as a warning with a
    # traceback; our reasons reach the heartbeat and `edge check` instead.
    for name in ("asyncua", "asyncua.client", "asyncua.server", "asyncua.crypto"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.CRITICAL)


def _file_format(path: Path) -> str:
    """asyncua reads a certificate as PEM only when the name ends in .pem: look inside."""
    return "pem" if b"-----BEGIN" in path.read_bytes()[:4096] else "der"


def _cert_uri(path: Path) -> str:
    """The URI in a certificate's subjectAltName (an OPC UA application URI), or "".

    Parsed by asyncua's loader: the edge code itself never imports cryptography.
    """
    import ssl

    from asyncua.crypto.uacrypto import x509_from_der

    data = path.read_bytes()
    if b"-----BEGIN" in data:
        data = ssl.PEM_cert_to_DER_cert(data.decode("ascii"))
    cert = x509_from_der(data)
    for ext in cert.extensions:
        if ext.oid.dotted_string == "2.5.29.17":  # subjectAltName
            for name in ext.value:
                if type(name).__name__ == "UniformResourceIdentifier":
                    return str(name.value)
    return ""


def read_password(server: OpcUaServer, *, config_file: str | None = None) -> str | None:
    if server.password_file is None:
        return None
    key = f"opcua.{server.name}.password_file"
    try:
        lines = server.password_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(key, f"cannot use it: {exc}", source=config_file) from exc
    if not lines or not lines[0]:
        raise ConfigError(key, f"{server.password_file} is empty", source=config_file)
    return lines[0]


def describe(exc: BaseException, server: OpcUaServer) -> str:
    """One line saying why the session failed, with the fix when it is ours to make."""
    name = type(exc).__name__
    if name in _REFUSED_CERT:
        return (
            f"server {server.name} refused our certificate ({name}):"
            f" add {server.cert} to the server's trusted clients"
        )
    if name in _REFUSED_USER:
        return f"server {server.name} refused user {server.username!r} ({name})"
    if name in ("BadSessionIdInvalid", "BadSessionClosed", "BadSessionNotActivated"):
        return f"session on {server.name} ended ({name}); reconnecting"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"no answer from {server.endpoint} within {server.timeout_s:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {server.endpoint}: connection refused"
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = text if len(text) <= 120 else text[:120] + "..."
    return f"{server.name}: {name}" + (f": {text}" if text else "")


def convert(signal: SignalConfig, value: Any) -> ReadResult:
    """A Variant's value as a reading for `signal`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value) if signal.kind == "numeric" else value
    if isinstance(value, str):
        return text_or_number(signal, value)
    if value is None:
        return ReadFailure("node has no value")
    return ReadFailure(f"not a value: {type(value).__name__}")


class _Handler:
    """Subscription callbacks (run on the source's loop)."""

    def __init__(self, source: OpcUaSource) -> None:
        self.source = source

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        ts_ms = time.time_ns() // 1_000_000
        status = data.monitored_item.Value.StatusCode
        for index in self.source.by_node.get(node.nodeid.to_string(), ()):
            signal = self.source.signals[index]
            if not status.is_good():
                self.source.sink.failure(index, ts_ms, f"status {status.name}")
                continue
            result = convert(signal, val)
            if isinstance(result, ReadFailure):
                self.source.sink.failure(index, ts_ms, result.reason)
            else:
                self.source.sink.reading(index, ts_ms, result)

    def status_change_notification(self, status: Any) -> None:
        self.source.lost = f"subscription status {status}"


class OpcUaSource:
    """One session on one OPC UA server, feeding every signal that names it."""

    def __init__(
        self,
        server: OpcUaServer,
        items: Sequence[tuple[int, SignalConfig]],
        *,
        device_id: str,
        sink: Sink,
    ) -> None:
        self.server = server
        self.sink = sink
        self.device_id = device_id
        self.signals = dict(items)
        self.by_node: dict[str, list[int]] = defaultdict(list)
        self.errors = 0  # session failures: refused connects, lost sessions
        self.sessions = 0  # sessions opened (1 + reconnects)
        self.subscribed = 0  # monitored items created on the current session
        self.connected = False
        self.last_error = ""
        self.lost = ""
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._dead: dict[int, str] = {}  # signals that cannot work on this session
        _quiet_asyncua()

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"opcua-{self.server.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(wake.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:  # a bug here must not pass silently
            log.exception("opcua source %s stopped", self.server.name)

    def read_once(self) -> None:
        """Connect, read every signal once (subscribed ones too), disconnect: `edge check`."""
        asyncio.run(self._read_once())

    # ------------------------------------------------------------ session

    async def _connect(self) -> Any:
        from asyncua import Client, ua
        from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
        from asyncua.crypto.uacrypto import CertProperties

        srv = self.server
        client = Client(srv.endpoint, timeout=srv.timeout_s)
        client.session_timeout = int(srv.session_timeout_s * 1000)
        client.name = f"millrace edge {self.device_id}"
        client.application_uri = srv.application_uri or f"urn:millrace:edge:{self.device_id}"
        if srv.security != "none":
            assert srv.cert and srv.key and srv.server_cert  # the config ensures it
            if not srv.application_uri:
                client.application_uri = _cert_uri(srv.cert) or client.application_uri
            mode = (
                ua.MessageSecurityMode.SignAndEncrypt
                if srv.security == "sign_encrypt"
                else ua.MessageSecurityMode.Sign
            )
            await client.set_security(
                SecurityPolicyBasic256Sha256,
                CertProperties(str(srv.cert), _file_format(srv.cert)),
                CertProperties(str(srv.key), _file_format(srv.key)),
                server_certificate=CertProperties(
                    str(srv.server_cert), _file_format(srv.server_cert)
                ),
                mode=mode,
            )
        if srv.username:
            client.set_user(srv.username)
            password = read_password(srv)
            if password is not None:
                client.set_password(password)
        try:
            await asyncio.wait_for(client.connect(), srv.timeout_s * 2)
        except BaseException:
            await self._close(client)
            raise
        self.sessions += 1
        return client

    async def _close(self, client: Any) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), self.server.timeout_s)

    def _nodes(self, client: Any) -> dict[int, Any]:
        """Node objects per signal; a node id the library cannot parse fails that signal."""
        nodes = {}
        self.by_node.clear()
        for index, signal in self.signals.items():
            spec = signal.spec
            assert isinstance(spec, OpcUaSpec)
            try:
                node = client.get_node(spec.node)
            except Exception as exc:
                self._dead[index] = f"bad node id {spec.node!r}: {exc}"
                continue
            nodes[index] = node
            self.by_node[node.nodeid.to_string()].append(index)
        return nodes

    async def _read(self, client: Any, nodes: dict[int, Any], indexes: Sequence[int]) -> None:
        """One Read request for `indexes`; a bad status fails only its signal."""
        wanted = [i for i in indexes if i in nodes and i not in self._dead]
        ts_ms = time.time_ns() // 1_000_000
        for i in indexes:
            if i not in wanted:
                self.sink.failure(i, ts_ms, self._dead.get(i, "no node"))
        if not wanted:
            return
        values = await client.read_attributes([nodes[i] for i in wanted])
        ts_ms = time.time_ns() // 1_000_000
        for i, dv in zip(wanted, values, strict=True):
            if not dv.StatusCode.is_good():
                self.sink.failure(i, ts_ms, f"{self.signals[i].spec.node}: {dv.StatusCode.name}")  # type: ignore[union-attr]
                continue
            result = convert(self.signals[i], dv.Value.Value if dv.Value is not None else None)
            if isinstance(result, ReadFailure):
                self.sink.failure(i, ts_ms, result.reason)
            else:
                self.sink.reading(i, ts_ms, result)

    async def _subscribe(self, client: Any, nodes: dict[int, Any]) -> list[Any]:
        from asyncua import ua

        groups: dict[float, list[int]] = defaultdict(list)
        for i, signal in self.signals.items():
            if signal.spec.mode == "subscribe" and i in nodes:  # type: ignore[union-attr]
                groups[signal.poll_s].append(i)
        subscriptions = []
        self.subscribed = 0
        for poll_s, indexes in groups.items():
            sub = await client.create_subscription(poll_s * 1000, _Handler(self))
            subscriptions.append(sub)
            results = await sub.subscribe_data_change(
                [nodes[i] for i in indexes], sampling_interval=poll_s * 1000
            )
            for i, result in zip(indexes, results, strict=True):
                if isinstance(result, ua.StatusCode):
                    self._dead[i] = f"{self.signals[i].spec.node}: {result.name}"  # type: ignore[union-attr]
                else:
                    self.subscribed += 1
        return subscriptions

    # ------------------------------------------------------------ schedules

    def _schedule(self) -> dict[float, list[int]]:
        groups: dict[float, list[int]] = defaultdict(list)
        for i, signal in self.signals.items():
            groups[signal.poll_s].append(i)
        return groups

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, seconds))

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        schedule = self._schedule()
        mono, wall = time.monotonic(), time.time()
        due = {p: mono + p - (wall % p) for p in schedule}
        backoff = RECONNECT_MIN_SECONDS
        retry_at = mono
        while not self._stopping.is_set():
            now = time.monotonic()
            if now < retry_at:  # down: fail every signal on its schedule until the retry
                await self._fail_due(schedule, due, min(retry_at, min(due.values())))
                continue
            try:
                client = await self._connect()
            except Exception as exc:
                self._session_failed(exc)
                retry_at = time.monotonic() + backoff
                backoff = min(backoff * 2, self.server.reconnect_max_s)
                continue
            opened = time.monotonic()
            try:
                await self._serve(client, schedule, due)
            except Exception as exc:
                self._session_failed(exc)
                if time.monotonic() - opened >= SESSION_OK_SECONDS:
                    backoff = RECONNECT_MIN_SECONDS  # it worked for a while: retry soon
                retry_at = time.monotonic() + backoff
                # A session that fails at once (a refused subscription, say) backs off too.
                backoff = min(backoff * 2, self.server.reconnect_max_s)
            finally:
                self.connected = False
                await self._close(client)

    def _session_failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.connected = False
        reason = describe(exc, self.server)
        if reason != self.last_error:
            log.warning("opcua %s: %s", self.server.name, reason)
        self.last_error = reason

    async def _fail_due(
        self, schedule: dict[float, list[int]], due: dict[float, float], until: float
    ) -> None:
        await self._sleep(until - time.monotonic())
        now = time.monotonic()
        ts_ms = time.time_ns() // 1_000_000
        for poll_s, indexes in schedule.items():
            if due[poll_s] <= now:
                for i in indexes:
                    self.sink.failure(i, ts_ms, self.last_error or "not connected")
                due[poll_s] += max(1, int((now - due[poll_s]) // poll_s) + 1) * poll_s

    async def _serve(
        self, client: Any, schedule: dict[float, list[int]], due: dict[float, float]
    ) -> None:
        """Poll and probe until stopped; raise when the session is lost."""
        self._dead = {}
        self.lost = ""
        nodes = self._nodes(client)
        await self._subscribe(client, nodes)
        probe = client.get_node(SERVER_STATE_NODE)
        self.connected = True
        log.info("opcua %s: session open, %d monitored item(s)", self.server.name, self.subscribed)
        next_probe = time.monotonic() + PROBE_SECONDS
        while not self._stopping.is_set():
            now = time.monotonic()
            for poll_s, indexes in schedule.items():
                if due[poll_s] > now:
                    continue
                polled = [i for i in indexes if self.signals[i].spec.mode == "poll"]  # type: ignore[union-attr]
                dead = [i for i in indexes if i not in polled and i in self._dead]
                if polled:
                    await self._read(client, nodes, polled)
                ts_ms = time.time_ns() // 1_000_000
                for i in dead:  # a subscribed signal without its monitored item
                    self.sink.failure(i, ts_ms, self._dead[i])
                due[poll_s] += max(1, int((now - due[poll_s]) // poll_s) + 1) * poll_s
            if now >= next_probe:
                await client.read_attributes([probe])  # raises once the session is gone
                next_probe = time.monotonic() + PROBE_SECONDS
            if self.lost:
                raise ConnectionError(self.lost)
            await self._sleep(min(min(due.values()), next_probe) - time.monotonic())

    async def _read_once(self) -> None:
        ts_ms = time.time_ns() // 1_000_000
        try:
            client = await self._connect()
        except Exception as exc:
            reason = describe(exc, self.server)
            for i in self.signals:
                self.sink.failure(i, ts_ms, reason)
            return
        try:
            nodes = self._nodes(client)
            await self._read(client, nodes, list(self.signals))
        except Exception as exc:
            reason = describe(exc, self.server)
            for i in self.signals:
                self.sink.failure(i, ts_ms, reason)
        finally:
            await self._close(client)
