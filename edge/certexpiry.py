"""When the gateway's client certificate expires, read with the standard library alone.

The heartbeat reports days left; pulling in `cryptography` for that one date was most of
the gateway's installed footprint (and has no 32-bit ARM wheels), so this walks just
enough DER (RFC 5280: Certificate -> TBSCertificate -> Validity) to find notAfter.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from pathlib import Path

from millrace.errors import PKIError

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
_SEQUENCE = 0x30
_EXPLICIT_VERSION = 0xA0
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_SECONDS_PER_DAY = 86400


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at offset `at`."""
    if at + 2 > len(der):
        raise ValueError("truncated element")
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        size = length & 0x7F
        if size == 0 or size > 4 or at + size > len(der):
            raise ValueError("bad length")
        length = int.from_bytes(der[at : at + size], "big")
        at += size
    if at + length > len(der):
        raise ValueError("truncated content")
    return tag, at, at + length


def _enter(der: bytes, at: int, tag: int) -> tuple[int, int]:
    found, start, end = _tlv(der, at)
    if found != tag:
        raise ValueError(f"expected tag {tag:#x}, found {found:#x}")
    return start, end


def _time(tag: int, text: str) -> dt.datetime:
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; years 50-99 are 19xx (RFC 5280 4.1.2.5.1)
        parsed = dt.datetime.strptime(text, "%y%m%d%H%M%SZ")
        if parsed.year >= 2050:
            parsed = parsed.replace(year=parsed.year - 100)
    elif tag == _GENERALIZED_TIME:  # YYYYMMDDHHMMSSZ
        parsed = dt.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    else:
        raise ValueError(f"validity time has tag {tag:#x}")
    return parsed.replace(tzinfo=dt.UTC)


def not_after(der: bytes) -> dt.datetime:
    """The notAfter instant of a DER-encoded X.509 certificate."""
    cert_start, _ = _enter(der, 0, _SEQUENCE)
    at, _ = _enter(der, cert_start, _SEQUENCE)  # tbsCertificate
    if der[at] == _EXPLICIT_VERSION:
        at = _tlv(der, at)[2]
    for _field in ("serialNumber", "signature", "issuer"):
        at = _tlv(der, at)[2]
    validity, _ = _enter(der, at, _SEQUENCE)
    after = _tlv(der, validity)[2]  # skip notBefore
    tag, start, end = _tlv(der, after)
    return _time(tag, der[start:end].decode("ascii"))


def cert_days_left(cert_path: Path | str, *, now: dt.datetime | None = None) -> float:
    """Days until the first certificate in the PEM file expires (negative once expired)."""
    try:
        pem = Path(cert_path).read_bytes()
    except OSError as exc:
        raise PKIError(f"cannot read certificate {cert_path}: {exc.strerror or exc}") from exc
    block = _PEM_BLOCK.search(pem)
    if block is None:
        raise PKIError(f"cannot read certificate {cert_path}: no PEM CERTIFICATE block")
    try:
        expiry = not_after(base64.b64decode(block.group(1), validate=False))
    except (ValueError, IndexError, UnicodeDecodeError, binascii.Error) as exc:
        raise PKIError(f"cannot read certificate {cert_path}: {exc}") from exc
    current = now or dt.datetime.now(dt.UTC)
    return (expiry - current).total_seconds() / _SECONDS_PER_DAY
