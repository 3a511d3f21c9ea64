"""The gateway's own notAfter reader agrees with cryptography's, without needing it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from millrace.edge.certexpiry import cert_days_left
from millrace.errors import PKIError
from millrace.ops import pki

NOW = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)


def _self_signed(path: Path, not_after: dt.datetime) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-1")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    return path


def test_days_left_matches_cryptography_for_a_pki_issued_device_cert(tmp_path: Path) -> None:
    pki.init_pki(tmp_path / "pki")
    pki.issue(tmp_path / "pki", "gw-1")
    cert = tmp_path / "pki" / "issued" / "gw-1.crt"
    assert cert_days_left(cert) == pytest.approx(pki.cert_days_left(cert), abs=1e-3)


@pytest.mark.parametrize(
    "not_after",
    [
        dt.datetime(2027, 1, 5, 12, 30, tzinfo=dt.UTC),  # UTCTime
        dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC),  # last UTCTime year
        dt.datetime(2051, 3, 1, tzinfo=dt.UTC),  # GeneralizedTime from 2050 on
    ],
)
def test_days_left_reads_utc_and_generalized_time(tmp_path: Path, not_after: dt.datetime) -> None:
    cert = _self_signed(tmp_path / "c.pem", not_after)
    expected = (not_after - NOW).total_seconds() / 86400
    assert cert_days_left(cert, now=NOW) == pytest.approx(expected)


def test_expired_certificate_is_negative(tmp_path: Path) -> None:
    cert = _self_signed(tmp_path / "c.pem", NOW - dt.timedelta(hours=12))
    assert cert_days_left(cert, now=NOW) == pytest.approx(-0.5)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "no PEM CERTIFICATE block"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "expected tag"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "bad length"),
    ],
)
def test_unreadable_certificate_is_a_pki_error(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(content)
    with pytest.raises(PKIError, match=problem):
        cert_days_left(path)


def test_missing_certificate_is_a_pki_error(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="cannot read certificate"):
        cert_days_left(tmp_path / "absent.pem")
