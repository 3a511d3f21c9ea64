"""The simulated PLC as an OPC UA server (asyncua), serving the same models as the Modbus PLC.

Each signal of the PLC map is a variable `ns=2;s=<device>.<signal>` holding the
engineering value (Double; bool signals Boolean). Values are written once per
resolution period, at its start, and each write is logged to the ground truth,
so a read and a subscription see exactly what the ground truth says was served.

Security: Basic256Sha256 with SignAndEncrypt only (plus None when `secure` is
False), the server's own certificate and key, and a set of trusted client
certificates: any other client certificate is refused (BadCertificateUntrusted)
when the session is created. An optional user name and password.

Faults (methods, called by tests or the fleet): `restart` (the server goes away
and comes back on the same port with fresh sessions), `expire_sessions` (every
session is closed as the server's session timeout would), `trust` / `distrust`
a client certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from millrace.fieldsim.faults import DeviceFaults
from millrace.fieldsim.feed import Feed
from millrace.fieldsim.groundtruth import GroundTruth
from millrace.fieldsim.specs import PlcMap, RegisterSignal, spec_info

logger = logging.getLogger(__name__)

NAMESPACE_URI = "urn:millrace:fieldsim"
APPLICATION_URI = "urn:millrace:fieldsim:opcua"


def node_id(device_id: str, signal: str) -> str:
    """The node id string a client puts in its config for one signal."""
    return f"ns=2;s={device_id}.{signal}"


def make_app_certificate(
    cert_path: Path, key_path: Path, *, common_name: str, uri: str, host: str = "localhost"
) -> None:
    """An RSA-2048 self-signed OPC UA application certificate (URI + DNS SAN), key 0600.

    Basic256Sha256 needs RSA keys (the project's PKI issues EC ones for MQTT).
    """
    import os

    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = generate_private_key()
    cert = generate_self_signed_app_certificate(
        key,
        common_name,
        {},
        [x509.UniformResourceIdentifier(uri), x509.DNSName(host)],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(dump_private_key_as_pem(key))
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))


def file_format(path: Path) -> str:
    """'pem' or 'der' by content (asyncua goes by the suffix: only .pem is PEM to it)."""
    return "pem" if b"-----BEGIN" in path.read_bytes()[:4096] else "der"


def _fingerprint_pem_or_der(path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    data = path.read_bytes()
    cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else None
    der = cert.public_bytes(Encoding.DER) if cert is not None else data
    return hashlib.sha256(der).hexdigest()


def _typed(sig: RegisterSignal, value: float) -> tuple[Any, Any]:
    """(value, VariantType): Boolean for coils, Int32 for machine states, Double otherwise."""
    from asyncua import ua

    if sig.type == "bool":
        return bool(value), ua.VariantType.Boolean
    if sig.spec.kind == "state":
        return int(value), ua.VariantType.Int32
    return float(value), ua.VariantType.Double


class OpcUaPlc:
    """One simulated PLC on its own OPC UA endpoint."""

    kind = "plc"

    def __init__(
        self,
        *,
        device_id: str,
        gateway: str,
        host: str,
        port: int,
        plc_map: PlcMap,
        feed: Feed,
        faults: DeviceFaults,
        cert: Path,
        key: Path,
        trusted_clients: tuple[Path, ...] = (),
        users: dict[str, str] | None = None,
        secure: bool = True,
        ground_truth: GroundTruth | None = None,
    ) -> None:
        self.device_id = device_id
        self.gateway = gateway
        self.host = host
        self.port = port
        self.plc_map = plc_map
        self._feed = feed
        self._faults = faults
        self._gt = ground_truth
        self.cert = cert
        self.key = key
        self.secure = secure
        self.users = dict(users or {})
        self._trusted = {_fingerprint_pem_or_der(p) for p in trusted_clients}
        self.refused = 0  # client certificates refused
        self._server: Any = None
        self._nodes: dict[str, tuple[RegisterSignal, Any]] = {}
        self._writer: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/millrace"

    def node_id(self, signal: str) -> str:
        return node_id(self.device_id, signal)

    def trust(self, cert: Path) -> None:
        self._trusted.add(_fingerprint_pem_or_der(cert))

    def distrust(self, cert: Path) -> None:
        self._trusted.discard(_fingerprint_pem_or_der(cert))

    async def _validate(self, cert: Any, app_description: Any) -> None:
        from asyncua import ua
        from asyncua.common.utils import ServiceError
        from cryptography.hazmat.primitives.serialization import Encoding

        if hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest() not in self._trusted:
            self.refused += 1
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    async def start(self) -> None:
        """Listen on the endpoint and start writing values."""
        from asyncua import Server, ua
        from asyncua.server.user_managers import UserManager

        users = self.users

        class _Users(UserManager):
            def get_user(
                self,
                iserver: Any,
                username: Any = None,
                password: Any = None,
                certificate: Any = None,
            ) -> Any:
                from asyncua.crypto.permission_rules import User, UserRole

                if not users:
                    return User(role=UserRole.User)
                if username in users and users[username] == password:
                    return User(role=UserRole.User, name=username)
                return None

        server = Server(user_manager=_Users())
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"millrace fieldsim {self.device_id}")
        await server.set_application_uri(APPLICATION_URI)
        policies = [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt]
        if not self.secure:
            policies.append(ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies)
        if self.users:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        await server.load_certificate(str(self.cert), format=file_format(self.cert))
        await server.load_private_key(str(self.key), format=file_format(self.key))
        server.set_certificate_validator(self._validate)
        ns = await server.register_namespace(NAMESPACE_URI)
        folder = await server.nodes.objects.add_folder(
            ua.NodeId.from_string(f"ns={ns};s={self.device_id}"), self.device_id
        )
        now = time.time()
        for sig in self.plc_map.signals:
            name = sig.spec.name
            initial, _ = self._sample(sig, now)
            value, variant = _typed(sig, initial)
            node = await folder.add_variable(
                ua.NodeId.from_string(f"ns={ns};s={self.device_id}.{name}"),
                name,
                value,
                varianttype=variant,
            )
            self._nodes[name] = (sig, node)
        await server.start()
        self._server = server
        await self._write_all(now)
        self._writer = asyncio.create_task(self._write_loop(), name=f"{self.device_id} values")

    def _sample(self, sig: RegisterSignal, now: float) -> tuple[float, float]:
        sample = self._feed.sample(self.device_id, sig.spec, now, self._faults)
        return sample.value, sample.ts

    async def _write_all(self, now: float) -> None:
        from asyncua import ua

        for name, (sig, node) in self._nodes.items():
            value, ts = self._sample(sig, now)
            served, variant = _typed(sig, value)
            stamp: Any = datetime.fromtimestamp(ts, UTC)
            await node.write_value(
                ua.DataValue(
                    ua.Variant(served, variant), SourceTimestamp=stamp, ServerTimestamp=stamp
                )
            )
            if self._gt is not None:
                self._gt.record(now, self.device_id, name, ts, float(served), "")

    async def _write_loop(self) -> None:
        resolution = min((s.spec.resolution_s for s in self.plc_map.signals), default=1.0)
        while True:
            now = time.time()
            next_start = (math.floor(now / resolution) + 1) * resolution
            await asyncio.sleep(max(0.0, next_start - now) + 0.001)
            try:
                await self._write_all(time.time())
            except Exception:  # a write during stop
                logger.debug("value write failed", exc_info=True)

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()
        self._nodes = {}

    async def restart(self, down_s: float) -> None:
        """Fault "server restart": stop, stay down `down_s`, start again on the same port."""
        await self.stop()
        await asyncio.sleep(down_s)
        await self.start()

    async def expire_sessions(self) -> int:
        """Fault "session expiry": close every client session (subscriptions deleted)."""
        iserver = self._server.iserver
        sessions = list(iserver._external_sessions.values())
        for session in sessions:
            await session.close_session(True)
        return len(sessions)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.device_id,
            "gateway": self.gateway,
            "kind": self.kind,
            "protocol": "opcua",
            "endpoint": self.endpoint,
            "signals": [
                {
                    **spec_info(s.spec),
                    "node": self.node_id(s.spec.name),
                    "type": s.type,
                    **({"states": {str(k): v for k, v in s.states}} if s.states else {}),
                }
                for s in self.plc_map.signals
            ],
        }
