"""The project CA: broker, device and service certificates, and the revocation list.

Everything lives in one directory (docs/security.md)::

    ca.crt ca.key broker.crt broker.key crl.pem index.json issued/<id>.crt issued/<id>.key

`index.json` records every certificate the CA issued (serial, id, role,
expiry, revocation time) so revocation and the broker's ACL (service users)
can be derived from it. Issuing appends its record in place (`_append_index`)
instead of rewriting the document, so a fleet of N costs O(N) bytes, not O(N^2);
the document stays plain JSON for every reader. Private keys are written 0600
and atomically; nothing here logs key material.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from millrace.errors import PKIError
from millrace.ids import DEVICE_ID_PATTERN, DEVICE_ID_RULE

log = logging.getLogger(__name__)

Role = Literal["device", "service"]
ROLES: tuple[Role, ...] = ("device", "service")

CA_VALIDITY_DAYS = 3650
BROKER_VALIDITY_DAYS = 825
# Field devices are hard to reach; three years leaves room for a yearly renewal round.
CLIENT_VALIDITY_DAYS = 1095
# The broker refuses every client once the CRL is past nextUpdate; renew well before.
CRL_VALIDITY_DAYS = 30
# Renew (and alert) once fewer days than this are left: two weekly chances before lock-out.
CRL_RENEW_BELOW_DAYS = 14
# Tolerate gateways whose clocks run a few minutes behind the CA's.
BACKDATE_SECONDS = 600
DEFAULT_BROKER_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
ORGANIZATION = "millrace"
SAN_URI_PREFIX = "urn:millrace"

_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700


@dataclass(frozen=True, slots=True)
class PKIPaths:
    """Where each file of a PKI directory lives."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def broker_cert(self) -> Path:
        return self.dir / "broker.crt"

    @property
    def broker_key(self) -> Path:
        return self.dir / "broker.key"

    @property
    def crl(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def index(self) -> Path:
        return self.dir / "index.json"

    @property
    def index_undo(self) -> Path:
        """The tail an in-place append overwrites, kept until the append is on disk."""
        return self.dir / ".index.undo"

    @property
    def lock(self) -> Path:
        return self.dir / ".lock"

    @property
    def issued(self) -> Path:
        return self.dir / "issued"

    def cert_for(self, ident: str) -> Path:
        return self.issued / f"{ident}.crt"

    def key_for(self, ident: str) -> Path:
        return self.issued / f"{ident}.key"


class IssuedPaths(NamedTuple):
    """The certificate and key files of one issued identity."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class IssuedRecord:
    """One line of the CA's index: a certificate it signed."""

    ident: str
    role: Role
    serial: int
    not_after: dt.datetime
    revoked_at: dt.datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def pki_paths(pki_dir: Path | str) -> PKIPaths:
    """The file layout of the PKI directory `pki_dir`."""
    return PKIPaths(Path(pki_dir))


def validate_id(ident: str) -> str:
    """Return `ident` if it may be a certificate CN, else raise PKIError naming the rule."""
    if not isinstance(ident, str) or DEVICE_ID_PATTERN.fullmatch(ident) is None:
        raise PKIError(f"invalid id {ident!r}: must be {DEVICE_ID_RULE}")
    return ident


def _check_role(role: str) -> Role:
    if role not in ROLES:
        raise PKIError(f"invalid role {role!r}: must be one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


# -- files ------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write `data` to `path` via a same-directory temp file created with `mode`, then rename.

    The temp file is created with the final mode, so a key is never readable by
    others even for an instant, and readers never see a half-written file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; keys stay exactly 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _make_dir(path: Path) -> None:
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    path.chmod(_DIR_MODE)


@contextlib.contextmanager
def _locked(paths: PKIPaths) -> Iterator[None]:
    """Serialize changes to the index and CRL between concurrent `millrace pki` runs.

    An append interrupted by a crash is rolled back first, so every writer starts
    from a whole index.
    """
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _roll_back_append(paths)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _shared(paths: PKIPaths) -> Iterator[None]:
    """Keep writers out while a lock-free reader reads the index (never half an append)."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except OSError:  # no lock file yet, or a read-only copy: nobody writes here
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _require_ca(paths: PKIPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not paths.ca_cert.exists() or not paths.ca_key.exists():
        raise PKIError(f"no CA in {paths.dir}: run 'millrace pki init --pki {paths.dir}' first")
    try:
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"cannot read the CA in {paths.dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{paths.ca_key} is not an EC private key")
    return cert, key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


# -- index ------------------------------------------------------------------


def _load_index(paths: PKIPaths) -> dict[str, Any]:
    if not paths.index.exists():
        return {"crl_number": 0, "certs": []}
    raw = paths.index.read_bytes()
    try:
        data: dict[str, Any] = json.loads(raw)
    except ValueError as exc:
        undo = _read_undo(paths)
        if undo is None:
            raise PKIError(f"{paths.index} is not valid JSON: {exc}") from exc
        # A torn append nobody has rolled back yet: read the index as it was before it.
        data = json.loads(raw[: undo[0]] + undo[1])
    return data


def _save_index(paths: PKIPaths, data: dict[str, Any]) -> None:
    """Rewrite the whole index, `certs` last so later issues can append in place."""
    ordered = {k: v for k, v in data.items() if k != "certs"} | {"certs": data["certs"]}
    write_atomic(paths.index, json.dumps(ordered, indent=2).encode() + b"\n", mode=_KEY_MODE)


def _read_undo(paths: PKIPaths) -> tuple[int, bytes] | None:
    """The armed undo record, or None (none, disarmed, or torn while arming: unused then)."""
    try:
        data = json.loads(paths.index_undo.read_bytes() or b"null")
        return None if data is None else (int(data["offset"]), bytes.fromhex(data["tail"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        # Arming is synced before the index is touched, so a torn undo means an untouched index.
        return None


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _roll_back_append(paths: PKIPaths) -> None:
    """Undo an append a crash tore; caller holds the lock.

    Only a finished append leaves the index valid JSON (every prefix of the record
    breaks it), so a valid index just disarms the undo record and keeps its records.
    """
    undo = _read_undo(paths)
    if undo is None:
        return
    if paths.index.exists():
        try:
            json.loads(paths.index.read_bytes())
        except ValueError:
            offset, tail = undo
            _write_at(paths.index, tail, offset)
            log.warning("rolled back an interrupted append to %s", paths.index)
    _write_at(paths.index_undo, b"", 0)


def _write_at(path: Path, data: bytes, offset: int, *, sync: bool = True) -> None:
    """Write `data` at `offset` and end the file there (creating it 0600 if missing)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, _KEY_MODE)
    try:
        os.pwrite(fd, data, offset)
        os.ftruncate(fd, offset + len(data))
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


_TAIL_READ = 64  # bytes: the end of the index holds the closing brackets


def _append_index(paths: PKIPaths, index: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Add `entries` to `certs` in memory and on disk, writing bytes for them only.

    The records overwrite the closing `]}` in place. The old tail is first saved
    (and synced) to `.index.undo`, a file reused for every append so that costs one
    sync and no directory sync, and a crash mid-write is rolled back by the next
    writer and read around by readers. An index whose shape does not allow that
    (not written by this module) is rewritten whole once, with `certs` last.
    """
    index["certs"].extend(entries)
    place = _append_place(paths) if next(reversed(index)) == "certs" else None
    if place is None:
        _save_index(paths, index)
        return
    offset, old_tail, separator = place
    records = b",\n    ".join(json.dumps(e).encode() for e in entries)
    new_tail = separator + b"\n    " + records + b"\n  ]\n}\n"
    if not paths.index_undo.exists():
        _write_at(paths.index_undo, b"", 0)
        _fsync_dir(paths.dir)
    undo = {"offset": offset, "tail": old_tail.hex()}
    _write_at(paths.index_undo, json.dumps(undo).encode(), 0)
    _write_at(paths.index, new_tail, offset)
    # Disarmed unsynced: if that is lost, the next writer finds a valid index and keeps it.
    _write_at(paths.index_undo, b"", 0, sync=False)


def _append_place(paths: PKIPaths) -> tuple[int, bytes, bytes] | None:
    """Where a record goes: offset after the last record (or `[`), the tail there, the separator."""
    if not paths.index.exists():
        return None
    with paths.index.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        start = handle.seek(max(0, size - _TAIL_READ))
        tail = handle.read()
    match = re.search(rb"(\[|\})\s*\]\s*\}\s*$", tail)
    if match is None:
        return None
    separator = b"" if match.group(1) == b"[" else b","
    return start + match.end(1), tail[match.end(1) :], separator


def _record(entry: dict[str, Any]) -> IssuedRecord:
    revoked = entry.get("revoked_at")
    return IssuedRecord(
        ident=entry["id"],
        role=entry["role"],
        serial=int(entry["serial"], 16),
        not_after=dt.datetime.fromisoformat(entry["not_after"]),
        revoked_at=dt.datetime.fromisoformat(revoked) if revoked else None,
    )


def issued_records(pki_dir: Path | str) -> list[IssuedRecord]:
    """Every certificate the CA in `pki_dir` has issued, oldest first."""
    paths = pki_path_checked(pki_dir)
    with _shared(paths):
        index = _load_index(paths)
    return [_record(e) for e in index.get("certs", [])]


def pki_path_checked(pki_dir: Path | str) -> PKIPaths:
    """`pki_paths`, raising PKIError when the directory holds no CA."""
    paths = pki_paths(pki_dir)
    if not paths.ca_cert.exists():
        raise PKIError(f"no CA in {paths.dir}: run 'millrace pki init --pki {paths.dir}' first")
    return paths


def service_ids(pki_dir: Path | str) -> list[str]:
    """Ids holding a valid (unrevoked) service certificate, sorted; the broker ACL's users."""
    current: dict[str, IssuedRecord] = {}
    for record in issued_records(pki_dir):
        current[record.ident] = record  # the newest certificate of an id wins
    return sorted(i for i, r in current.items() if r.role == "service" and not r.revoked)


# -- building blocks ----------------------------------------------------------


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    label = host.rstrip(".").lower()
    if not label or any(not part for part in label.split(".")) or any(c.isspace() for c in label):
        raise PKIError(f"invalid broker host name {host!r}: give a DNS name or an IP address")
    return x509.DNSName(label)


def _leaf_builder(
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
) -> x509.CertificateBuilder:
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=BACKDATE_SECONDS))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )


def _build_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    name = _name("millrace CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=BACKDATE_SECONDS))
        .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _write_crl(
    paths: PKIPaths,
    index: dict[str, Any],
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    next_update: dt.datetime,
) -> None:
    now = _now()
    index["crl_number"] = int(index.get("crl_number", 0)) + 1
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(seconds=BACKDATE_SECONDS))
        .next_update(next_update)
        .add_extension(x509.CRLNumber(index["crl_number"]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )
    for entry in index.get("certs", []):
        if entry.get("revoked_at"):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"], 16))
                .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"]))
                .build()
            )
    crl = builder.sign(ca_key, hashes.SHA256())
    write_atomic(paths.crl, crl.public_bytes(serialization.Encoding.PEM), mode=_CERT_MODE)


# -- public operations ----------------------------------------------------------


def init_pki(pki_dir: Path | str, *, hosts: Iterable[str] = (), force: bool = False) -> PKIPaths:
    """Create the CA, the broker's server certificate and an empty CRL in `pki_dir`.

    The broker certificate names localhost, 127.0.0.1, ::1 and every `hosts`
    entry (IP literals become IP SANs, anything else a DNS SAN). An existing CA
    is never overwritten unless `force`; then the old files move to
    `replaced-<UTC time>/` because every certificate they signed stops working.
    """
    paths = pki_paths(pki_dir)
    names = list(dict.fromkeys([*DEFAULT_BROKER_HOSTS, *hosts]))
    general_names = [_general_name(h) for h in names]  # validate before touching disk
    if paths.ca_cert.exists() or paths.ca_key.exists():
        if not force:
            raise PKIError(
                f"a CA already exists in {paths.dir}; pass --force to replace it "
                "(every certificate it issued stops working)"
            )
        _move_aside(paths)
    _make_dir(paths.dir)
    _make_dir(paths.issued)
    with _locked(paths):
        ca_cert, ca_key = _build_ca()
        write_atomic(paths.ca_key, _key_pem(ca_key), mode=_KEY_MODE)
        write_atomic(paths.ca_cert, _cert_pem(ca_cert), mode=_CERT_MODE)

        broker_key = ec.generate_private_key(ec.SECP256R1())
        broker_cert = (
            _leaf_builder(
                subject=_name("millrace-broker", "broker"),
                public_key=broker_key.public_key(),
                ca_cert=ca_cert,
                ca_key=ca_key,
                days=BROKER_VALIDITY_DAYS,
            )
            .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_atomic(paths.broker_key, _key_pem(broker_key), mode=_KEY_MODE)
        write_atomic(paths.broker_cert, _cert_pem(broker_cert), mode=_CERT_MODE)

        index: dict[str, Any] = {"crl_number": 0, "certs": []}
        _write_crl(
            paths,
            index,
            ca_cert=ca_cert,
            ca_key=ca_key,
            next_update=_now() + dt.timedelta(days=CRL_VALIDITY_DAYS),
        )
        _save_index(paths, index)
    log.info("created CA and broker certificate in %s for hosts %s", paths.dir, names)
    return paths


def _move_aside(paths: PKIPaths) -> None:
    backup = paths.dir / f"replaced-{_now():%Y%m%dT%H%M%SZ}"
    _make_dir(backup)
    for path in (
        paths.ca_cert,
        paths.ca_key,
        paths.broker_cert,
        paths.broker_key,
        paths.crl,
        paths.index,
        paths.issued,
    ):
        if path.exists():
            shutil.move(str(path), backup / path.name)
    log.warning("moved the previous CA and its certificates to %s", backup)


def _role_conflict(paths: PKIPaths, index: dict[str, Any], ident: str, role: Role) -> None:
    """Refuse `role` for an id holding an unrevoked certificate of the other role.

    Not even `force` overrides this: the role decides the broker ACL (service users),
    so a device certificate named like a service (or the reverse) would take over or
    break that identity. Revoking the id first frees it for either role.
    """
    held = [e["role"] for e in index["certs"] if e["id"] == ident and not e.get("revoked_at")]
    other = next((r for r in reversed(held) if r != role), None)
    if other is not None:
        raise PKIError(
            f"{ident!r} holds a {other} certificate; device and service ids are kept apart, "
            f"so it gets no {role} certificate, not even with --force: choose another id, "
            f"or revoke it first with 'millrace pki revoke --pki {paths.dir} {ident}'"
        )


def check_role(pki_dir: Path | str, device_id: str, role: Role) -> None:
    """Raise PKIError unless `device_id` may hold a `role` certificate (see `issue`).

    For callers that want to fail before slow work; `issue` and `sign_csr` check
    again under the lock, so this is never the only guard.
    """
    ident = validate_id(device_id)
    paths = pki_path_checked(pki_dir)
    with _shared(paths):
        index = _load_index(paths)
    _role_conflict(paths, index, ident, _check_role(role))


def _check_can_issue(
    paths: PKIPaths, index: dict[str, Any], ident: str, *, role: Role, force: bool
) -> None:
    """Refuse a certificate `ident` may not get; called before any file is written.

    `force` renews an identity of the same role only.
    """
    _role_conflict(paths, index, ident, role)
    current = [e for e in index["certs"] if e["id"] == ident and not e.get("revoked_at")]
    if current and not force:
        raise PKIError(
            f"{ident!r} already has a valid certificate; revoke it first "
            "('millrace pki revoke') or pass --force to issue another"
        )


def _sign_client(
    paths: PKIPaths,
    ident: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    role: Role,
    days: int,
) -> dict[str, Any]:
    """Sign and write `ident`'s client certificate; its index record for the caller to append.

    The caller holds the lock and has checked `ident` may have it.
    """
    ca_cert, ca_key = ca
    cert = (
        _leaf_builder(
            subject=_name(ident, role),
            public_key=public_key,
            ca_cert=ca_cert,
            ca_key=ca_key,
            days=days,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"{SAN_URI_PREFIX}:{role}:{ident}")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _make_dir(paths.issued)
    write_atomic(paths.cert_for(ident), _cert_pem(cert), mode=_CERT_MODE)
    return {
        "id": ident,
        "role": role,
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "revoked_at": None,
    }


def issue(
    pki_dir: Path | str,
    device_id: str,
    *,
    role: Role = "device",
    days: int = CLIENT_VALIDITY_DAYS,
    force: bool = False,
) -> IssuedPaths:
    """Issue a client certificate and key for `device_id` into `issued/`.

    CN = the id (the broker's ACL username), OU = the role, a SAN URI
    `urn:millrace:<role>:<id>`, EKU clientAuth. Refuses an id that already
    holds an unrevoked certificate unless `force`, and an id holding an unrevoked
    certificate of the other role always (revoke it first).
    """
    return issue_many(pki_dir, [device_id], role=role, days=days, force=force)[0]


def issue_many(
    pki_dir: Path | str,
    device_ids: Iterable[str],
    *,
    role: Role = "device",
    days: int = CLIENT_VALIDITY_DAYS,
    force: bool = False,
) -> list[IssuedPaths]:
    """`issue` for each id under one lock, one read and one append of the index (a fleet at once).

    Every id is checked before any file is written, so a refused id issues nothing,
    and the records are appended together after the certificates: a crash midway
    records none of them, and the same command runs again without --force.
    """
    idents = [validate_id(i) for i in device_ids]
    repeated = sorted(i for i, n in Counter(idents).items() if n > 1)
    if repeated:
        raise PKIError(f"id {repeated[0]!r} is given more than once: name each id once")
    role = _check_role(role)
    if days < 1:
        raise PKIError(f"--days must be at least 1, got {days}")
    paths = pki_path_checked(pki_dir)
    issued = []
    entries: list[dict[str, Any]] = []
    with _locked(paths):
        ca = _require_ca(paths)
        index = _load_index(paths)
        for ident in idents:
            _check_can_issue(paths, index, ident, role=role, force=force)
        _make_dir(paths.issued)
        for ident in idents:
            key = ec.generate_private_key(ec.SECP256R1())
            # Key first: a crash between the two leaves an unused key, never a cert without one.
            write_atomic(paths.key_for(ident), _key_pem(key), mode=_KEY_MODE)
            entries.append(
                _sign_client(paths, ident, key.public_key(), ca=ca, role=role, days=days)
            )
            issued.append(IssuedPaths(paths.cert_for(ident), paths.key_for(ident)))
        _append_index(paths, index, entries)
    named = idents[0] if len(idents) == 1 else f"{len(idents)} ids, {idents[0]} to {idents[-1]}"
    log.info("issued %s certificate(s) for %s", role, named)
    return issued


def sign_csr(
    pki_dir: Path | str,
    csr_pem: bytes,
    *,
    role: Role = "device",
    days: int = CLIENT_VALIDITY_DAYS,
    force: bool = False,
) -> Path:
    """Sign a CSR whose CN is the id (the key never leaves the device); return the cert path.

    Only the CSR's CN and public key are used; extensions are ours, as in `issue`,
    and so are its refusals: an id of the other role is never signed for, and a
    refused CSR leaves the id's certificate and key untouched.
    """
    role = _check_role(role)
    paths = pki_path_checked(pki_dir)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PKIError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise PKIError("the CSR's signature does not match its public key")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise PKIError("the CSR must carry an EC P-256 public key")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise PKIError("the CSR must have exactly one CN: the device id")
    ident = validate_id(str(cns[0].value))
    if days < 1:
        raise PKIError(f"--days must be at least 1, got {days}")
    with _locked(paths):
        ca = _require_ca(paths)
        index = _load_index(paths)
        _check_can_issue(paths, index, ident, role=role, force=force)
        stale_key = paths.key_for(ident)
        entry = _sign_client(paths, ident, public_key, ca=ca, role=role, days=days)
        _append_index(paths, index, [entry])
        if stale_key.exists():
            stale_key.unlink()  # a key from an earlier `issue` no longer matches this cert
    log.info("signed CSR for %s certificate %s", role, ident)
    return paths.cert_for(ident)


def revoke(pki_dir: Path | str, device_id: str) -> list[int]:
    """Revoke every unrevoked certificate of `device_id` and rewrite crl.pem; return serials.

    The broker only sees the new CRL after a reload or restart (docs/security.md).
    """
    ident = validate_id(device_id)
    paths = pki_path_checked(pki_dir)
    with _locked(paths):
        ca_cert, ca_key = _require_ca(paths)
        index = _load_index(paths)
        now = _now()
        serials = []
        for entry in index["certs"]:
            if entry["id"] == ident and not entry.get("revoked_at"):
                entry["revoked_at"] = now.isoformat()
                serials.append(int(entry["serial"], 16))
        if not serials:
            known = any(e["id"] == ident for e in index["certs"])
            problem = "is already revoked" if known else "was never issued by this CA"
            raise PKIError(f"{ident!r} {problem}")
        _write_crl(
            paths,
            index,
            ca_cert=ca_cert,
            ca_key=ca_key,
            next_update=now + dt.timedelta(days=CRL_VALIDITY_DAYS),
        )
        _save_index(paths, index)
    log.info("revoked %s (%d certificate(s)); crl.pem rewritten", ident, len(serials))
    return serials


def renew_crl(pki_dir: Path | str, *, days: int = CRL_VALIDITY_DAYS) -> Path:
    """Re-sign crl.pem with nextUpdate `days` from now; run it well before the old one ends."""
    if days < 1:
        raise PKIError(f"--days must be at least 1, got {days}")
    paths = pki_path_checked(pki_dir)
    with _locked(paths):
        ca_cert, ca_key = _require_ca(paths)
        index = _load_index(paths)
        _write_crl(
            paths,
            index,
            ca_cert=ca_cert,
            ca_key=ca_key,
            next_update=_now() + dt.timedelta(days=days),
        )
        _save_index(paths, index)
    return paths.crl


def renew_crl_if_below(
    pki_dir: Path | str,
    *,
    below_days: float = CRL_RENEW_BELOW_DAYS,
    days: int = CRL_VALIDITY_DAYS,
) -> bool:
    """Renew crl.pem when fewer than `below_days` days are left; True when it was renewed.

    Safe to run as often as wanted (timers, `millrace up`'s supervision loop): a fresh
    CRL is left alone, so the broker is only reloaded when something changed.
    """
    if below_days >= days:
        raise PKIError(
            f"--if-below {below_days:g} must be less than --days {days}, "
            "or every run would renew again"
        )
    left = crl_days_left(pki_dir)
    if left >= below_days:
        return False
    renew_crl(pki_dir, days=days)
    log.info("renewed crl.pem in %s (%.1f days were left)", pki_dir, left)
    return True


def crl_days_left(pki_dir: Path | str) -> float:
    """Days until crl.pem's nextUpdate (negative once it has passed and clients are refused)."""
    paths = pki_path_checked(pki_dir)
    try:
        crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
    except (OSError, ValueError) as exc:
        raise PKIError(f"cannot read {paths.crl}: {exc}") from exc
    next_update = crl.next_update_utc
    if next_update is None:
        raise PKIError(f"{paths.crl} has no nextUpdate")
    return (next_update - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def cert_days_left(cert_path: Path | str) -> float:
    """Days until the certificate at `cert_path` expires (negative once expired)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise PKIError(f"cannot read certificate {cert_path}: {exc}") from exc
    return (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400
