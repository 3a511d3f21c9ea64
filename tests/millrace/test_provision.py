"""`millrace provision`: bundle contents, certificates, the manifest check, SD cards.

These tests use a stand-in wheel file: the install script refuses a bad bundle before it
touches pip. Installing a real bundle and running its agent is tests/ansible/test_bundle.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from millrace.errors import ConfigError, PKIError
from millrace.ops import pki, provision, provision_signing

DEVICE = "press-07"
FAKE_WHEEL_NAME = "millrace_edge-0.1.0-py3-none-any.whl"
FAKE_CLOUD_WHEEL_NAME = "millrace-0.1.0-py3-none-any.whl"
CLOUD_ONLY = ("psycopg", "sqlalchemy", "streamlit", "alembic", "pandas")


@pytest.fixture(scope="module")
def plant_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki_dir = tmp_path_factory.mktemp("plant") / "pki"
    pki.init_pki(pki_dir, hosts=["mqtt.plant.example", "127.0.0.5"])
    return pki_dir


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheel = tmp_path_factory.mktemp("wheel") / FAKE_WHEEL_NAME
    wheel.write_bytes(b"not really a wheel: install.sh must refuse before pip sees it")
    return wheel


def _stand_in_wheelhouse(fake_wheel: Path) -> Path:
    """A stand-in wheel for each edge pin beside `fake_wheel`: these tests download nothing."""
    house = fake_wheel.parent / "deps"
    if not house.is_dir():
        house.mkdir()
        for pin in provision.edge_requirements():
            name, version = pin.split("==")
            wheel = house / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            wheel.write_bytes(f"stand-in for {pin}: install.sh must refuse first".encode())
    return house


def _bundle(plant_pki: Path, fake_wheel: Path, out: Path, device: str = DEVICE, **kw: object):
    kw.setdefault("wheelhouse", _stand_in_wheelhouse(fake_wheel))
    return provision.build_bundle(device, pki_dir=plant_pki, out=out, wheel=fake_wheel, **kw)  # type: ignore[arg-type]


def _members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}


def _extract(path: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="tar")
    (top,) = into.iterdir()
    return top


def _install(bundle_dir: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(bundle_dir / "install.sh"), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _trust(plant_pki: Path) -> tuple[str, str]:
    """install.sh's first-install option: trust the PKI's release public key."""
    return ("--release-key", str(provision_signing.release_pub_path(plant_pki)))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "millrace.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# -- the bundle -----------------------------------------------------------------------------------


def test_bundle_holds_everything_a_gateway_needs_with_private_modes(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    bundle = _bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz")
    members = _members(bundle.path)
    assert set(members) >= {
        "install.sh",
        "firstboot.sh",
        "MANIFEST.sha256",
        "MANIFEST.sha256.sig",
        "bundle.json",
        f"agent/{FAKE_WHEEL_NAME}",
        "agent/requirements.txt",
        "agent/release.json",
        "config/agent.toml",
        "pki/ca.crt",
        "pki/device.crt",
        "pki/device.key",
        "systemd/millrace-edge.service",
        "systemd/millrace-firstboot.service",
    }
    assert stat.S_IMODE(members["pki/device.key"].mode) == 0o600
    assert stat.S_IMODE(members["install.sh"].mode) == 0o755
    assert stat.S_IMODE(bundle.path.stat().st_mode) == 0o600
    assert bundle.has_key
    assert bundle.sha256 == hashlib.sha256(bundle.path.read_bytes()).hexdigest()


def test_manifest_lists_the_sha256_of_every_other_file(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    top = _extract(_bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz").path, tmp_path / "x")
    listed = {}
    for line in (top / provision.MANIFEST_NAME).read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    files = {str(p.relative_to(top)) for p in top.rglob("*") if p.is_file()} - {
        provision.MANIFEST_NAME,
        provision.SIGNATURE_NAME,  # the manifest's signature, over the manifest
    }
    assert set(listed) == files
    for name, digest in listed.items():
        assert hashlib.sha256((top / name).read_bytes()).hexdigest() == digest, name


def test_requirements_pin_only_the_edge_closure(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    top = _extract(_bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz").path, tmp_path / "x")
    pins = [
        line
        for line in (top / "agent/requirements.txt").read_text().splitlines()
        if not line.startswith("#")
    ]
    names = {pin.split("==")[0] for pin in pins}
    assert {"paho-mqtt", "pymodbus", "msgpack"} <= names
    assert "cryptography" not in names  # the gateway reads its certificate's expiry itself
    assert not any(name.startswith(CLOUD_ONLY) for name in names), names
    assert all("==" in pin for pin in pins)


def test_config_is_rendered_for_the_device_and_the_broker_on_its_certificate(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    from millrace.edge.config import parse_config

    bundle = _bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz")
    top = _extract(bundle.path, tmp_path / "x")
    config = parse_config(
        (top / "config/agent.toml").read_text(), base=Path("/etc/millrace"), source="bundle"
    )
    assert config.device_id == DEVICE
    assert config.broker.host == "mqtt.plant.example"  # first non-loopback SAN
    assert config.broker.key == Path("/etc/millrace/pki/device.key")
    assert config.outbox.path.is_relative_to("/var/lib/millrace")
    cert = x509.load_pem_x509_certificate((top / "pki/device.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
    info = json.loads((top / "bundle.json").read_text())
    assert info["device_id"] == DEVICE
    assert info["release_id"] == bundle.release_id
    unit = (top / "systemd/millrace-edge.service").read_text()
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "User=millrace",
        "StateDirectory=millrace",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "After=network-online.target time-sync.target",
        "ExecStart=/opt/millrace/current/venv/bin/millrace edge run"
        " --config /etc/millrace/agent.toml",
    ):
        assert directive in unit, directive


def test_provisioning_twice_reuses_the_certificate_unless_forced(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    def serial() -> int:
        path = pki.pki_paths(plant_pki).cert_for("again-1")
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number

    first = _bundle(plant_pki, fake_wheel, tmp_path / "1.tar.gz", device="again-1")
    issued = serial()
    _bundle(plant_pki, fake_wheel, tmp_path / "2.tar.gz", device="again-1")
    assert serial() == issued
    _bundle(plant_pki, fake_wheel, tmp_path / "3.tar.gz", device="again-1", force=True)
    assert serial() != issued
    assert first.release_id.startswith("0.1.0-")


def test_csr_bundle_carries_no_key_and_the_certificate_matches_the_device_key(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    device_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "csr-gw")]))
        .sign(device_key, hashes.SHA256())
    )
    csr_pem = csr.public_bytes(serialization.Encoding.PEM)
    bundle = _bundle(plant_pki, fake_wheel, tmp_path / "c.tar.gz", device="csr-gw", csr_pem=csr_pem)
    assert not bundle.has_key
    members = _members(bundle.path)
    assert "pki/device.key" not in members
    top = _extract(bundle.path, tmp_path / "x")
    cert = x509.load_pem_x509_certificate((top / "pki/device.crt").read_bytes())
    raw = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert cert.public_key().public_bytes(*raw) == device_key.public_key().public_bytes(*raw)
    assert not pki.pki_paths(plant_pki).key_for("csr-gw").exists()

    # Without the device's own key in place the install script stops before installing.
    result = _install(top, tmp_path / "root", *_trust(plant_pki), "--skip-check")
    assert result.returncode == 1
    assert "carries no key" in result.stderr
    assert not (tmp_path / "root" / "opt").exists()

    with pytest.raises(PKIError, match="CN is 'csr-gw'"):
        _bundle(plant_pki, fake_wheel, tmp_path / "d.tar.gz", device="other", csr_pem=csr_pem)


def _device_csr(common_name: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _service_files(plant_pki: Path, ident: str) -> tuple[bytes, bytes]:
    paths = pki.pki_paths(plant_pki)
    return paths.cert_for(ident).read_bytes(), paths.key_for(ident).read_bytes()


def test_provision_csr_cannot_replace_a_service_identity(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    pki.issue(plant_pki, "ingest", role="service")
    before = _service_files(plant_pki, "ingest")
    csr_pem = _device_csr("ingest")
    for force in (False, True):
        out = tmp_path / f"force-{force}.tar.gz"
        with pytest.raises(PKIError, match="'ingest' holds a service certificate"):
            _bundle(plant_pki, fake_wheel, out, device="ingest", csr_pem=csr_pem, force=force)
        assert _service_files(plant_pki, "ingest") == before, "service cert and key untouched"
        assert not out.exists()
    assert "ingest" in pki.service_ids(plant_pki)


def test_provision_cannot_reissue_a_service_identity_as_a_device(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    pki.issue(plant_pki, "dashboard", role="service")
    before = _service_files(plant_pki, "dashboard")
    for force in (False, True):
        with pytest.raises(PKIError, match="device and service ids are kept apart"):
            _bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz", device="dashboard", force=force)
        assert _service_files(plant_pki, "dashboard") == before
    assert "dashboard" in pki.service_ids(plant_pki)


def test_config_template_mistakes_name_the_placeholder_and_issue_nothing(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    template = tmp_path / "t.toml"
    template.write_text('device_id = "{{ device_id }}"\n[broker]\nhost = "{{ brokr_host }}"\n')
    with pytest.raises(ConfigError, match="brokr_host"):
        _bundle(
            plant_pki, fake_wheel, tmp_path / "b.tar.gz", device="tmpl-1", config_template=template
        )
    template.write_text('device_id = "someone-else"\n')
    with pytest.raises(ConfigError, match="device_id"):
        _bundle(
            plant_pki, fake_wheel, tmp_path / "b.tar.gz", device="tmpl-1", config_template=template
        )
    assert not pki.pki_paths(plant_pki).cert_for("tmpl-1").exists()


def test_a_gateway_with_opcua_servers_gets_the_opcua_wheels_in_its_bundle(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    """OPC UA (asyncua, cryptography) is an extra: a bundle carries it only for a gateway
    whose config names OPC UA servers, which otherwise stopped at start asking for it.
    The wheels come from the cache scripts/bootstrap filled (the tests ask no index)."""
    template = tmp_path / "opcua.toml"
    template.write_text(
        'device_id = "{{ device_id }}"\n[broker]\nhost = "{{ broker_host }}"\n'
        '[opcua.plc1]\nurl = "opc.tcp://plc1.plant.example:4840"\n'
    )
    plain = _bundle(
        plant_pki, fake_wheel, tmp_path / "plain.tar.gz", device="ua-0", wheelhouse=None
    )
    with_ua = _bundle(
        plant_pki, fake_wheel, tmp_path / "ua.tar.gz", device="ua-1", wheelhouse=None,
        config_template=template,
    )  # fmt: skip

    def carried(bundle: Path) -> tuple[set[str], set[str]]:
        top = _extract(bundle, tmp_path / bundle.name.split(".")[0])
        pins = (top / "agent" / provision.REQUIREMENTS_NAME).read_text()
        names = {line.split("==")[0] for line in pins.splitlines() if "==" in line}
        return names, {w.name.split("-")[0].lower() for w in (top / "wheels").glob("*.whl")}

    plain_pins, plain_wheels = carried(plain.path)
    ua_pins, ua_wheels = carried(with_ua.path)
    assert "asyncua" not in plain_pins and "asyncua" not in plain_wheels
    assert {"asyncua", "cryptography"} <= ua_pins
    assert {"asyncua", "cryptography"} <= ua_wheels
    assert plain_pins < ua_pins


def test_a_wheelhouse_lacking_the_platforms_wheel_is_refused_naming_the_pin(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    """A bundle that would need an index on the gateway is refused when it is made."""
    house = tmp_path / "house"
    house.mkdir()
    for pin in provision.edge_requirements():
        name, version = pin.split("==")
        stem = f"{name.replace('-', '_')}-{version}"
        tag = "cp311-cp311-manylinux_2_17_x86_64" if name == "msgpack" else "py3-none-any"
        (house / f"{stem}-{tag}.whl").write_bytes(b"stand-in")
    msgpack = next(p for p in provision.edge_requirements() if p.startswith("msgpack=="))
    with pytest.raises(ConfigError, match=f"no aarch64 wheel for {msgpack}") as caught:
        _bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz", wheelhouse=house, platform="aarch64")
    assert caught.value.key == "--wheelhouse"
    assert not (tmp_path / "b.tar.gz").exists()
    bundle = _bundle(
        plant_pki, fake_wheel, tmp_path / "b.tar.gz", wheelhouse=house, platform="x86_64"
    )
    assert bundle.platform == "x86_64"
    with pytest.raises(ConfigError, match="choose one of aarch64, x86_64, armv7l"):
        _bundle(plant_pki, fake_wheel, tmp_path / "c.tar.gz", wheelhouse=house, platform="mips")


def test_release_dir_for_a_platform_carries_its_wheels(fake_wheel: Path, tmp_path: Path) -> None:
    release = provision.prepare_release(
        tmp_path / "release",
        wheel=fake_wheel,
        wheelhouse=_stand_in_wheelhouse(fake_wheel),
        targets=(),
        platform="aarch64",
    )
    info = json.loads((release.dir / provision.RELEASE_JSON).read_text())
    assert info["platform"] == "aarch64"
    assert len(info["wheels"]) == len(provision.edge_requirements())
    assert "--hash" not in release.requirements.read_text()  # the Ansible role's pins


# -- the install script's integrity check ---------------------------------------------------------


def _tamper_modify(top: Path) -> None:
    path = top / "config" / "agent.toml"
    path.write_text(path.read_text().replace("mqtt.plant.example", "evil.example"))


def _tamper_add(top: Path) -> None:
    (top / "agent" / "paho_mqtt-9.9.9-py3-none-any.whl").write_bytes(b"trojan")


def _tamper_remove(top: Path) -> None:
    (top / "pki" / "ca.crt").unlink()


def _tamper_symlink(top: Path) -> None:
    (top / "pki" / "ca.crt").unlink()
    (top / "pki" / "ca.crt").symlink_to("/etc/hostname")


def _tamper_script(top: Path) -> None:
    unit = top / "systemd" / "millrace-edge.service"
    unit.write_text(unit.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=no"))


@pytest.mark.security
@pytest.mark.ansible
@pytest.mark.parametrize(
    "tamper",
    [_tamper_modify, _tamper_add, _tamper_remove, _tamper_symlink, _tamper_script],
    ids=["modified", "added", "removed", "symlinked", "unit-weakened"],
)
def test_install_refuses_a_tampered_bundle_and_touches_nothing(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path, tamper: object
) -> None:
    top = _extract(_bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz").path, tmp_path / "x")
    tamper(top)  # type: ignore[operator]
    root = tmp_path / "root"
    result = _install(top, root, *_trust(plant_pki))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "refusing to install" in result.stderr
    assert not root.exists()


@pytest.mark.security
def test_untampered_bundle_passes_the_manifest_check(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    """The baseline for the refusals: the same bundle gets past the check (then pip fails)."""
    top = _extract(_bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz").path, tmp_path / "x")
    result = _install(top, tmp_path / "root", *_trust(plant_pki), "--skip-check")
    assert "signature verified" in result.stdout
    assert "manifest verified" in result.stdout
    assert result.returncode == 1  # the stand-in wheel is not installable
    assert "pip could not install" in result.stderr


# -- the install script's signature check -----------------------------------------------------


def _fix_manifest(top: Path) -> None:
    """Recompute the manifest for the files as they are now (what a tamperer would do)."""
    files = {
        str(p.relative_to(top)): p.read_bytes()
        for p in top.rglob("*")
        if p.is_file() and p.name not in (provision.MANIFEST_NAME, provision.SIGNATURE_NAME)
    }
    (top / provision.MANIFEST_NAME).write_bytes(provision._manifest(files))


def _sig_changed_manifest(top: Path) -> None:
    _tamper_modify(top)
    _fix_manifest(top)


def _sig_other_key(top: Path) -> None:
    _tamper_modify(top)
    _fix_manifest(top)
    stranger = ed25519.Ed25519PrivateKey.generate()
    manifest = (top / provision.MANIFEST_NAME).read_bytes()
    (top / provision.SIGNATURE_NAME).write_bytes(stranger.sign(manifest))


def _sig_missing(top: Path) -> None:
    (top / provision.SIGNATURE_NAME).unlink()


def _sig_garbled(top: Path) -> None:
    sig = bytearray((top / provision.SIGNATURE_NAME).read_bytes())
    sig[0] ^= 0x01
    (top / provision.SIGNATURE_NAME).write_bytes(bytes(sig))


@pytest.mark.security
@pytest.mark.parametrize(
    "tamper",
    [_tamper_modify, _sig_changed_manifest, _sig_other_key, _sig_missing, _sig_garbled],
    ids=["changed-file", "changed-manifest", "other-key", "missing-signature", "garbled"],
)
def test_bundle_signature_tamper_is_refused_and_nothing_installed(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path, tamper: object
) -> None:
    """The manifest alone gave integrity, not authenticity: a fixed-up manifest passed it."""
    top = _extract(_bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz").path, tmp_path / "x")
    tamper(top)  # type: ignore[operator]
    root = tmp_path / "root"
    result = _install(top, root, *_trust(plant_pki))
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: refusing to install: "), lines
    assert not root.exists()


@pytest.mark.security
def test_bundle_signature_by_another_release_key_is_refused(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    """An untouched bundle of another PKI: its own key is not the one this gateway trusts."""
    other = tmp_path / "other-pki"
    pki.init_pki(other, hosts=["mqtt.other.example"])
    top = _extract(_bundle(other, fake_wheel, tmp_path / "b.tar.gz").path, tmp_path / "x")
    root = tmp_path / "root"
    trusted = root / "etc" / "millrace" / "release.pub"
    trusted.parent.mkdir(parents=True)
    trusted.write_bytes(provision_signing.release_pub_path(plant_pki).read_bytes())
    result = _install(top, root)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "signature does not verify with " + str(trusted) in result.stderr
    assert sorted(p.name for p in root.rglob("*")) == ["etc", "millrace", "release.pub"]


@pytest.mark.security
def test_bundle_without_a_trusted_release_key_is_refused(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    top = _extract(_bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz").path, tmp_path / "x")
    result = _install(top, tmp_path / "root")
    assert result.returncode == 3
    assert "no trusted release key" in result.stderr
    assert "--release-key FILE" in result.stderr
    assert not (tmp_path / "root").exists()


@pytest.mark.security
def test_bundle_signature_is_checked_before_any_other_file_is_read(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    """With a bad signature the refusal names the signature, though other files are broken."""
    top = _extract(_bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz").path, tmp_path / "x")
    _sig_garbled(top)
    (top / "bundle.json").unlink()
    os.mkfifo(top / "bundle.json")  # reading it would block the install
    (top / "agent" / "release.json").write_text("{not json")
    result = _install(top, tmp_path / "root", *_trust(plant_pki))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "signature does not verify" in result.stderr
    assert "manifest verified" not in result.stdout


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("platform", "riscv64", "this bundle is for riscv64 gateways, this machine is "),
        ("python", "3.9", "this bundle's wheels are for Python 3.9, python3 here is "),
    ],
)
def test_a_bundle_for_another_platform_or_python_is_refused_in_one_line(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path, field: str, value: str, needle: str
) -> None:
    """Its wheels would not install: refused before anything is written."""
    top = _extract(_bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz").path, tmp_path / "x")
    info = json.loads((top / "bundle.json").read_text())
    assert info["platform"] == os.uname().machine
    assert info["python"] == "{}.{}".format(*sys.version_info[:2])
    info[field] = value
    (top / "bundle.json").write_text(json.dumps(info))
    _fix_manifest(top)
    manifest = (top / provision.MANIFEST_NAME).read_bytes()
    (top / provision.SIGNATURE_NAME).write_bytes(provision_signing.sign(plant_pki, manifest))
    result = _install(top, tmp_path / "root", *_trust(plant_pki))
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "root").exists()


def test_install_without_openssl_says_what_to_install_in_one_line(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    """openssl is not in a minbase Debian (Priority: optional); python3 cannot verify Ed25519."""
    top = _extract(_bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz").path, tmp_path / "x")
    tools = tmp_path / "bin"
    tools.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(folder).iterdir():
            if tool.name != "openssl" and not (tools / tool.name).exists():
                (tools / tool.name).symlink_to(tool)
    result = subprocess.run(
        ["sh", str(top / "install.sh"), "--root", str(tmp_path / "root"), *_trust(plant_pki)],
        env={**os.environ, "PATH": str(tools)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "install.sh: error: openssl is required to verify the bundle's signature "
        "(Debian: apt-get install openssl)"
    ]
    assert not (tmp_path / "root").exists()


@pytest.mark.security
def test_release_key_is_private_from_creation(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    pki.init_pki(pki_dir, hosts=["mqtt.plant.example"])
    old = os.umask(0)
    try:
        pub = provision_signing.ensure_release_key(pki_dir)
    finally:
        os.umask(old)
    key = provision_signing.release_key_path(pki_dir)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert b"PRIVATE" not in pub.read_bytes()
    assert provision_signing.ensure_release_key(pki_dir) == pub  # kept, not replaced
    assert key.read_bytes() == provision_signing.release_key_path(pki_dir).read_bytes()
    key.chmod(0o644)
    with pytest.raises(PKIError, match="chmod 600"):
        provision_signing.sign(pki_dir, b"manifest")


# -- SD cards -------------------------------------------------------------------------------------


def test_sd_boot_partition_stages_once_and_moves_the_key_off_fat(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    bundle = _bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz")
    boot = tmp_path / "bootfs"
    boot.mkdir()
    (boot / "cmdline.txt").write_text("console=tty1 root=PARTUUID=1234-02 rootwait\n")
    pub = bundle.release_pub
    assert provision.write_sd(bundle.path, boot, release_key=pub).kind == "boot"
    provision.write_sd(bundle.path, boot, release_key=pub)  # twice: still one hook
    cmdline = (boot / "cmdline.txt").read_text()
    assert cmdline.count("systemd.run=/boot/firmware/millrace/firstboot.sh") == 1
    assert cmdline.startswith("console=tty1 root=PARTUUID=1234-02 rootwait ")
    assert (boot / "millrace" / "bundle.tar.gz").read_bytes() == bundle.path.read_bytes()

    rootfs = tmp_path / "rootfs"
    result = subprocess.run(
        ["sh", str(boot / "millrace" / "firstboot.sh")],
        env={**os.environ, "MILLRACE_ROOT": str(rootfs)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    stage = rootfs / "var" / "lib" / "millrace-firstboot"
    assert stat.S_IMODE(stage.stat().st_mode) == 0o700
    assert (stage / "bundle.tar.gz").read_bytes() == bundle.path.read_bytes()
    units = rootfs / "etc" / "systemd" / "system"
    link = units / "multi-user.target.wants" / provision.FIRSTBOOT_UNIT_NAME
    assert os.readlink(link) == f"/etc/systemd/system/{provision.FIRSTBOOT_UNIT_NAME}"
    assert (units / provision.FIRSTBOOT_UNIT_NAME).is_file()
    assert (rootfs / "etc/millrace/release.pub").read_bytes() == pub.read_bytes()
    assert not (boot / "millrace").exists()
    assert (boot / "cmdline.txt").read_text() == "console=tty1 root=PARTUUID=1234-02 rootwait\n"


def test_sd_root_filesystem_gets_the_enabled_first_boot_unit(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    bundle = _bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz")
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc" / "systemd" / "system").mkdir(parents=True)
    result = provision.write_sd(bundle.path, rootfs, release_key=bundle.release_pub)
    assert result.kind == "rootfs"
    trusted = rootfs / "etc" / "millrace" / "release.pub"
    assert trusted.read_bytes() == bundle.release_pub.read_bytes()
    staged = rootfs / "var" / "lib" / "millrace-firstboot" / "bundle.tar.gz"
    assert stat.S_IMODE(staged.stat().st_mode) == 0o600
    unit = (rootfs / "etc/systemd/system" / provision.FIRSTBOOT_UNIT_NAME).read_text()
    assert "ExecStart=/var/lib/millrace-firstboot/firstboot.sh install" in unit
    assert "After=network-online.target time-sync.target" in unit
    wants = rootfs / "etc/systemd/system/multi-user.target.wants" / provision.FIRSTBOOT_UNIT_NAME
    assert wants.is_symlink()


def test_sd_refuses_a_directory_that_is_no_card(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    bundle = _bundle(plant_pki, fake_wheel, tmp_path / "b.tar.gz")
    with pytest.raises(ConfigError, match=r"cmdline\.txt"):
        provision.write_sd(bundle.path, tmp_path)


# -- the command line -----------------------------------------------------------------------------


def test_cli_writes_a_bundle_and_prints_no_secret(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli.tar.gz"
    result = _cli(
        "provision",
        "cli-gw",
        "--pki",
        str(plant_pki),
        "--out",
        str(out),
        "--wheel",
        str(fake_wheel),
        "--wheelhouse",
        str(_stand_in_wheelhouse(fake_wheel)),
        "--broker",
        "127.0.0.5:18883",
    )
    assert result.returncode == 0, result.stderr
    assert f"bundle {out}" in result.stdout
    assert "key included (0600)" in result.stdout
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    top = _extract(out, tmp_path / "x")
    assert 'host = "127.0.0.5"' in (top / "config/agent.toml").read_text()
    assert "port = 18883" in (top / "config/agent.toml").read_text()


def test_cli_rejects_mistakes_in_one_line_before_issuing(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        provision.template_text("agent.toml.tmpl").replace(
            "period_s = 10", "period_s = 10\nperiod = 5"
        )
    )
    for args, needle in (
        (["--pki", str(plant_pki), "--out", str(tmp_path / "x.tar.gz")], "ID"),
        (["BAD ID", "--pki", str(plant_pki), "--out", str(tmp_path / "x.tar.gz")], "invalid id"),
        (["cli-bad", "--pki", str(plant_pki), "--out", str(tmp_path / "x.zip")], ".tar.gz"),
        (
            [
                "cli-bad",
                "--pki",
                str(plant_pki),
                "--out",
                str(tmp_path / "x.tar.gz"),
                "--wheel",
                str(fake_wheel),
                "--config",
                str(bad),
            ],
            "windows.period",
        ),
    ):
        result = _cli("provision", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert needle in result.stderr, (needle, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not pki.pki_paths(plant_pki).cert_for("cli-bad").exists()


def test_cli_provision_csr_for_a_service_id_fails_in_one_line(
    plant_pki: Path, fake_wheel: Path, tmp_path: Path
) -> None:
    pki.issue(plant_pki, "svc-cli", role="service")
    before = _service_files(plant_pki, "svc-cli")
    csr = tmp_path / "svc-cli.csr"
    csr.write_bytes(_device_csr("svc-cli"))
    out = tmp_path / "svc.tar.gz"
    flags = ("--pki", str(plant_pki), "--out", str(out), "--wheel", str(fake_wheel))
    flags += ("--wheelhouse", str(_stand_in_wheelhouse(fake_wheel)))
    result = _cli("provision", "svc-cli", *flags, "--csr", str(csr), "--force")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "'svc-cli' holds a service certificate" in result.stderr
    assert "millrace pki revoke" in result.stderr
    assert "Traceback" not in result.stderr
    assert _service_files(plant_pki, "svc-cli") == before
    assert not out.exists()


def test_cli_release_dir_writes_what_the_ansible_roles_read(
    fake_wheel: Path, tmp_path: Path
) -> None:
    release_dir = tmp_path / "release"
    cloud_wheel = tmp_path / FAKE_CLOUD_WHEEL_NAME
    cloud_wheel.write_bytes(b"stand-in for the full millrace wheel")
    flags = ("--release-dir", str(release_dir), "--wheel", str(fake_wheel))
    flags += ("--cloud-wheel", str(cloud_wheel))
    result = _cli("provision", *flags)
    assert result.returncode == 0, result.stderr
    info = json.loads((release_dir / provision.RELEASE_JSON).read_text())
    assert info["wheel"] == FAKE_WHEEL_NAME
    assert (release_dir / FAKE_WHEEL_NAME).read_bytes() == fake_wheel.read_bytes()
    assert info["release_id"] in result.stdout
    assert set(info["targets"]) == {"cloud", "dashboard"}
    assert {t["wheel"] for t in info["targets"].values()} == {FAKE_CLOUD_WHEEL_NAME}
    assert (release_dir / FAKE_CLOUD_WHEEL_NAME).read_bytes() == cloud_wheel.read_bytes()
    cloud_pins = (release_dir / info["targets"]["cloud"]["requirements"]).read_text()
    assert "psycopg==" in cloud_pins
    assert "streamlit" not in cloud_pins
    edge_pins = (release_dir / provision.REQUIREMENTS_NAME).read_text()
    assert "paho-mqtt==" in edge_pins
    assert "cryptography" not in edge_pins
    again = _cli("provision", *flags)
    assert json.loads((release_dir / provision.RELEASE_JSON).read_text()) == info
    assert again.returncode == 0
