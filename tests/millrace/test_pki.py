"""Unit tests for the project CA: files and modes, certificate contents, revocation, CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from millrace.errors import PKIError
from millrace.ops import pki


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "millrace.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA for the read-only checks (key generation is cheap, but not free)."""
    pki_dir = tmp_path_factory.mktemp("pki") / "pki"
    pki.init_pki(pki_dir, hosts=["broker.plant.example", "127.0.0.3", "::ffff:127.0.0.3"])
    pki.issue(pki_dir, "dev-1", role="device")
    pki.issue(pki_dir, "svc-ingest", role="service")
    return pki_dir


def test_init_writes_the_layout_with_private_keys_0600(ca_dir: Path) -> None:
    paths = pki.pki_paths(ca_dir)
    for path in (paths.ca_cert, paths.broker_cert, paths.crl):
        assert path.is_file()
        assert _mode(path) == 0o644
    for key in (
        paths.ca_key,
        paths.broker_key,
        paths.key_for("dev-1"),
        paths.key_for("svc-ingest"),
    ):
        assert _mode(key) == 0o600, key
    assert _mode(paths.issued) == 0o700
    assert not list(ca_dir.rglob("*.tmp")), "no temp files left behind"


def test_keys_are_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        pki.init_pki(tmp_path / "pki")
        cert, key = pki.issue(tmp_path / "pki", "dev-umask")
    finally:
        os.umask(old)
    assert _mode(key) == 0o600
    assert _mode(tmp_path / "pki" / "ca.key") == 0o600
    assert _mode(cert) == 0o644


def test_ca_is_a_p256_signing_ca_valid_about_ten_years(ca_dir: Path) -> None:
    ca = _cert(ca_dir / "ca.crt")
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    years = (ca.not_valid_after_utc - ca.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    ca.verify_directly_issued_by(ca)


def test_broker_certificate_names_every_host_and_is_for_servers(ca_dir: Path) -> None:
    broker = _cert(ca_dir / "broker.crt")
    broker.verify_directly_issued_by(_cert(ca_dir / "ca.crt"))
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "broker.plant.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("127.0.0.3"),
        ipaddress.ip_address("::ffff:127.0.0.3"),
    }
    eku = broker.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not broker.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize(("ident", "role"), [("dev-1", "device"), ("svc-ingest", "service")])
def test_client_certificate_identity_role_and_usage(ca_dir: Path, ident: str, role: str) -> None:
    cert = _cert(ca_dir / "issued" / f"{ident}.crt")
    cert.verify_directly_issued_by(_cert(ca_dir / "ca.crt"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ident
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:millrace:{role}:{ident}"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    key = serialization.load_pem_private_key(
        (ca_dir / "issued" / f"{ident}.key").read_bytes(), password=None
    )
    assert key.public_key() == cert.public_key()


def test_not_valid_before_is_backdated_about_ten_minutes(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    before = dt.datetime.now(dt.UTC)
    cert_path, _ = pki.issue(tmp_path, "dev-clock")
    for path in (cert_path, tmp_path / "broker.crt", tmp_path / "ca.crt"):
        lead = (before - _cert(path).not_valid_before_utc).total_seconds()
        assert 9 * 60 <= lead <= 11 * 60, (path, lead)
    assert 1090 < pki.cert_days_left(cert_path) <= 1095


def test_init_refuses_to_overwrite_a_ca_without_force(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    pki.issue(tmp_path, "dev-old")
    old_ca = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(PKIError, match="--force"):
        pki.init_pki(tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == old_ca

    pki.init_pki(tmp_path, force=True)
    assert (tmp_path / "ca.crt").read_bytes() != old_ca
    assert not (tmp_path / "issued" / "dev-old.crt").exists()
    (backup,) = tmp_path.glob("replaced-*")
    assert (backup / "ca.crt").read_bytes() == old_ca
    assert (backup / "issued" / "dev-old.key").exists()
    assert pki.issued_records(tmp_path) == []


@pytest.mark.parametrize(
    "bad", ["", "Dev-1", "-dev", ".dev", "dev/1", "dev+1", "dev#", "dev 1", "d" * 64, "dév"]
)
def test_invalid_ids_are_rejected_naming_the_rule(ca_dir: Path, bad: str) -> None:
    before = sorted(ca_dir.rglob("*"))
    with pytest.raises(PKIError, match=r"1-63 chars of a-z 0-9 \. _ -"):
        pki.issue(ca_dir, bad)
    assert sorted(ca_dir.rglob("*")) == before, "nothing written for a rejected id"


@pytest.mark.parametrize("good", ["a", "0", "d" * 63, "plant-1.line_2"])
def test_valid_ids_are_accepted(good: str) -> None:
    assert pki.validate_id(good) == good


def test_unknown_role_is_rejected(ca_dir: Path) -> None:
    with pytest.raises(PKIError, match="device, service"):
        pki.issue(ca_dir, "dev-role", role="admin")  # type: ignore[arg-type]
    with pytest.raises(PKIError, match="at least 1"):
        pki.issue(ca_dir, "dev-days", days=0)


def test_reissue_needs_force_and_keeps_the_old_key_until_then(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    _, key = pki.issue(tmp_path, "dev-x")
    old_key = key.read_bytes()
    with pytest.raises(PKIError, match="already has a valid certificate"):
        pki.issue(tmp_path, "dev-x")
    assert key.read_bytes() == old_key
    pki.issue(tmp_path, "dev-x", force=True)
    assert key.read_bytes() != old_key
    assert len(pki.issued_records(tmp_path)) == 2


def _files(pki_dir: Path, ident: str) -> tuple[bytes, bytes, bytes]:
    """An identity's certificate and key bytes, and the CA's index."""
    paths = pki.pki_paths(pki_dir)
    return (
        paths.cert_for(ident).read_bytes(),
        paths.key_for(ident).read_bytes(),
        paths.index.read_bytes(),
    )


@pytest.mark.parametrize(("held", "asked"), [("service", "device"), ("device", "service")])
def test_issue_refuses_to_change_the_role_of_an_identity(
    tmp_path: Path, held: pki.Role, asked: pki.Role
) -> None:
    pki.init_pki(tmp_path)
    pki.issue(tmp_path, "ingest", role=held)
    before = _files(tmp_path, "ingest")
    for force in (False, True):  # --force renews an identity of the same role only
        with pytest.raises(PKIError) as refused:
            pki.issue(tmp_path, "ingest", role=asked, force=force)
        message = str(refused.value)
        assert f"'ingest' holds a {held} certificate" in message
        assert "device and service ids are kept apart" in message
        assert f"millrace pki revoke --pki {tmp_path} ingest" in message
        assert _files(tmp_path, "ingest") == before, "nothing written for a refused request"
    assert [r.role for r in pki.issued_records(tmp_path)] == [held]

    pki.issue(tmp_path, "ingest", role=held, force=True)  # renewing the same role still works
    pki.revoke(tmp_path, "ingest")
    cert, _ = pki.issue(tmp_path, "ingest", role=asked)  # the fix the message names
    units = _cert(cert).subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [u.value for u in units] == [asked]


def test_csr_cannot_replace_a_service_identity(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    pki.issue(tmp_path, "ingest", role="service")
    before = _files(tmp_path, "ingest")
    csr = _csr("ingest", ec.generate_private_key(ec.SECP256R1()))
    for force in (False, True):
        with pytest.raises(PKIError, match="'ingest' holds a service certificate"):
            pki.sign_csr(tmp_path, csr, role="device", force=force)
        assert _files(tmp_path, "ingest") == before, "the service cert and key stay as they were"
    assert pki.service_ids(tmp_path) == ["ingest"], "the broker ACL keeps its service user"


def test_csr_cannot_turn_a_device_into_a_service(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    device_key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.sign_csr(tmp_path, _csr("press-1", device_key), role="device")
    before = cert.read_bytes()
    csr = _csr("press-1", ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(PKIError, match="'press-1' holds a device certificate"):
        pki.sign_csr(tmp_path, csr, role="service", force=True)
    assert cert.read_bytes() == before
    assert pki.service_ids(tmp_path) == []


def test_crl_next_update_is_in_the_future_and_renew_moves_it(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    assert 29.9 < pki.crl_days_left(tmp_path) <= 30
    pki.renew_crl(tmp_path, days=90)
    assert 89.9 < pki.crl_days_left(tmp_path) <= 90
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert crl.is_signature_valid(_cert(tmp_path / "ca.crt").public_key())  # type: ignore[arg-type]
    with pytest.raises(PKIError, match="at least 1"):
        pki.renew_crl(tmp_path, days=0)


def test_revoke_lists_the_serial_and_allows_a_fresh_issue(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    first, _ = pki.issue(tmp_path, "dev-r")
    serial = _cert(first).serial_number
    assert pki.revoke(tmp_path, "dev-r") == [serial]
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert 29.9 < pki.crl_days_left(tmp_path) <= 30

    with pytest.raises(PKIError, match="already revoked"):
        pki.revoke(tmp_path, "dev-r")
    with pytest.raises(PKIError, match="never issued"):
        pki.revoke(tmp_path, "dev-unknown")

    second, _ = pki.issue(tmp_path, "dev-r")  # a replacement device keeps its id
    new_serial = _cert(second).serial_number
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(new_serial) is None
    index = json.loads((tmp_path / "index.json").read_text())
    assert [c["revoked_at"] is not None for c in index["certs"]] == [True, False]
    renewed = pki.renew_crl(tmp_path)
    crl = x509.load_pem_x509_crl(renewed.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None, "renew keeps it"


def test_service_ids_lists_current_service_certificates_only(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    pki.issue(tmp_path, "svc-b", role="service")
    pki.issue(tmp_path, "svc-a", role="service")
    pki.issue(tmp_path, "svc-gone", role="service")
    pki.issue(tmp_path, "dev-1")
    pki.revoke(tmp_path, "svc-gone")
    assert pki.service_ids(tmp_path) == ["svc-a", "svc-b"]


def _csr(common_name: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_sign_csr_uses_only_the_cn_and_key(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    cert_path = pki.sign_csr(tmp_path, _csr("dev-csr", key), role="device")
    cert = _cert(cert_path)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-csr"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not (tmp_path / "issued" / "dev-csr.key").exists(), "the key stays on the device"

    with pytest.raises(PKIError, match="1-63 chars"):
        pki.sign_csr(tmp_path, _csr("Not Valid", key))
    with pytest.raises(PKIError, match="P-256"):
        pki.sign_csr(tmp_path, _csr("dev-rsa", rsa.generate_private_key(65537, 2048)))
    with pytest.raises(PKIError, match="not a PEM"):
        pki.sign_csr(tmp_path, b"garbage")


def test_operations_without_a_ca_say_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="millrace pki init"):
        pki.issue(tmp_path, "dev-1")
    with pytest.raises(PKIError, match="millrace pki init"):
        pki.revoke(tmp_path, "dev-1")


def test_bad_broker_host_is_rejected_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="broker host"):
        pki.init_pki(tmp_path / "pki", hosts=["two words"])
    assert not (tmp_path / "pki").exists()


def test_cli_prints_paths_never_keys_and_fails_in_one_line(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    init = _cli("pki", "init", "--pki", str(pki_dir), "--host", "gw.example")
    assert init.returncode == 0, init.stderr
    assert str(pki_dir / "ca.key") in init.stdout
    issue = _cli("pki", "issue", "--pki", str(pki_dir), "svc-x", "--role", "service")
    assert issue.returncode == 0, issue.stderr
    assert issue.stdout.split() == [
        str(pki_dir / "issued/svc-x.crt"),
        str(pki_dir / "issued/svc-x.key"),
    ]
    renew = _cli("pki", "renew-crl", "--pki", str(pki_dir), "--days", "45")
    assert renew.returncode == 0, renew.stderr
    assert "next update in 45.0 days" in renew.stdout
    revoke = _cli("pki", "revoke", "--pki", str(pki_dir), "svc-x")
    assert revoke.returncode == 0, revoke.stderr
    for result in (init, issue, renew, revoke):
        assert "PRIVATE KEY" not in result.stdout + result.stderr

    again = _cli("pki", "init", "--pki", str(pki_dir))
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0
    assert "--force" in again.stderr
    bad = _cli("pki", "issue", "--pki", str(pki_dir), "Bad_Id")
    assert bad.returncode == 2
    assert "invalid id 'Bad_Id'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_issue_refuses_to_change_the_role_of_an_identity_in_one_line(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    pki.issue(tmp_path, "ingest", role="service")
    before = _files(tmp_path, "ingest")
    result = _cli("pki", "issue", "--pki", str(tmp_path), "ingest", "--role", "device", "--force")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "'ingest' holds a service certificate" in result.stderr
    assert "millrace pki revoke" in result.stderr
    assert "Traceback" not in result.stderr
    assert _files(tmp_path, "ingest") == before


def test_renew_crl_if_below_renews_only_a_crl_running_short(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    before = (tmp_path / "crl.pem").read_bytes()
    assert pki.renew_crl_if_below(tmp_path) is False
    assert (tmp_path / "crl.pem").read_bytes() == before  # fresh: not even re-signed
    pki.renew_crl(tmp_path, days=2)
    assert pki.renew_crl_if_below(tmp_path) is True
    assert pki.CRL_VALIDITY_DAYS - 0.1 < pki.crl_days_left(tmp_path) <= pki.CRL_VALIDITY_DAYS
    with pytest.raises(PKIError, match="--if-below 30 must be less than --days 30"):
        pki.renew_crl_if_below(tmp_path, below_days=30)


def test_cli_crl_status_prints_days_left_and_fails_below_the_threshold(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    fresh = _cli("pki", "crl-status", "--pki", str(tmp_path))
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.startswith("crl_days_left=")
    assert 29.9 < float(fresh.stdout.strip().split("=")[1]) <= 30

    pki.renew_crl(tmp_path, days=2)
    short = _cli("pki", "crl-status", "--pki", str(tmp_path))
    assert short.returncode == 1
    assert 1.9 < float(short.stdout.strip().split("=")[1]) <= 2
    assert len(short.stderr.strip().splitlines()) == 1
    assert f"millrace pki renew-crl --pki {tmp_path}" in short.stderr
    assert _cli("pki", "crl-status", "--pki", str(tmp_path), "--warn-below", "1").returncode == 0
    prom = tmp_path / "crl.prom"
    _cli("pki", "crl-status", "--pki", str(tmp_path), "--textfile", str(prom))
    gauge = [line for line in prom.read_text().splitlines() if not line.startswith("#")]
    assert len(gauge) == 1 and gauge[0].startswith("millrace_crl_days_left ")
    assert 1.9 < float(gauge[0].split()[1]) <= 2

    missing = _cli("pki", "crl-status", "--pki", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"millrace: error: no CA in {tmp_path / 'nope'}: "
        f"run 'millrace pki init --pki {tmp_path / 'nope'}' first"
    ]


def test_cli_renew_crl_if_below_renews_only_when_short(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    kept = _cli("pki", "renew-crl", "--pki", str(tmp_path), "--if-below", "14")
    assert kept.returncode == 0, kept.stderr
    assert "not renewed" in kept.stdout

    pki.renew_crl(tmp_path, days=2)
    renewed = _cli("pki", "renew-crl", "--pki", str(tmp_path), "--if-below", "14")
    assert renewed.returncode == 0, renewed.stderr
    assert renewed.stdout.splitlines()[0] == str(tmp_path / "crl.pem")
    assert pki.crl_days_left(tmp_path) > 29.9

    bad = _cli("pki", "renew-crl", "--pki", str(tmp_path), "--if-below", "40")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "--if-below 40 must be less than --days 30" in bad.stderr
