"""A real device bundle, installed with its own install.sh into a temporary root, runs.

The bundle carries the agent wheel built from this checkout and offline dependency
wheels, so the install needs no network; `--root` relocates it and turns user and
service management off. The agent started from the installed release with the installed
config must get its data to the test broker.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from millrace.ops import provision, provision_signing
from tests.ansible.rollout_support import (
    TEST_AGENT_TEMPLATE,
    BatchInbox,
    agent_wheel,  # noqa: F401 - fixture
    running_agent,
    wheelhouse,  # noqa: F401 - fixture
)
from tests.fixtures.fix_broker import MosquittoServer, PKIFixture

pytestmark = [pytest.mark.ansible, pytest.mark.integration]

DEVICE = "gw-bundle"
INSTALL_TIMEOUT_SECONDS = 180


@dataclass
class Installed:
    work: Path
    bundle: Path
    unpacked: Path
    root: Path
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    pki_dir: Path


def _install(
    bundle_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(bundle_dir / "install.sh"), *args],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_SECONDS,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def installed(
    tmp_path_factory: pytest.TempPathFactory,
    test_pki: PKIFixture,
    broker: MosquittoServer,
    agent_wheel: Path,  # noqa: F811
    wheelhouse: Path,  # noqa: F811
) -> Installed:
    """`millrace provision` for DEVICE, unpacked and installed twice into a temp root."""
    work = tmp_path_factory.mktemp("bundle")
    template = work / "agent.toml.tmpl"
    template.write_text(TEST_AGENT_TEMPLATE)
    bundle = work / f"{DEVICE}.tar.gz"
    made = subprocess.run(
        [
            sys.executable, "-m", "millrace.cli", "provision", DEVICE,
            "--pki", str(test_pki.dir), "--out", str(bundle), "--config", str(template),
            "--broker", f"{broker.host}:{broker.port}",
            "--wheel", str(agent_wheel), "--wheelhouse", str(wheelhouse),
        ],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_SECONDS,
        check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    broker.sync()  # the new identity's broker role (`millrace broker sync`)
    with tarfile.open(bundle) as tar:
        tar.extractall(work / "unpacked", filter="tar")
    unpacked = work / "unpacked" / f"millrace-{DEVICE}"
    root = work / "root"
    release_pub = provision_signing.release_pub_path(test_pki.dir)
    first = _install(unpacked, "--root", str(root), "--release-key", str(release_pub))
    second = _install(unpacked, "--root", str(root))  # trusts the key the first one installed
    return Installed(work, bundle, unpacked, root, first, second, test_pki.dir)


def test_install_script_installs_then_changes_nothing(installed: Installed) -> None:
    assert installed.first.returncode == 0, installed.first.stdout + installed.first.stderr
    assert installed.first.stdout.strip().endswith("changed=1")
    assert installed.second.returncode == 0, installed.second.stderr
    assert installed.second.stdout.strip().endswith("changed=0")
    assert "already installed, nothing changed" in installed.second.stdout
    trusted = installed.root / "etc" / "millrace" / "release.pub"
    assert (
        trusted.read_bytes() == provision_signing.release_pub_path(installed.pki_dir).read_bytes()
    )
    assert "signature verified (" + str(trusted) in installed.second.stdout


@pytest.mark.security
def test_installed_key_and_config_are_private(installed: Installed) -> None:
    etc = installed.root / "etc" / "millrace"
    assert stat.S_IMODE((etc / "pki" / "device.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((etc / "pki").stat().st_mode) == 0o750
    assert stat.S_IMODE((etc / "agent.toml").stat().st_mode) == 0o640
    assert stat.S_IMODE((installed.root / "var/lib/millrace").stat().st_mode) == 0o700
    output = installed.first.stdout + installed.first.stderr
    assert "PRIVATE KEY" not in output


def test_bundle_wheel_holds_only_the_contract_and_the_edge_agent(installed: Installed) -> None:
    """The gateway gets what it runs: no cloud, dashboard, simulator or tooling module."""
    wheels = sorted((installed.unpacked / "agent").glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["millrace_edge"]
    with zipfile.ZipFile(wheels[0]) as zf:
        modules = [n for n in zf.namelist() if n.endswith(".py")]
        metadata_text = next(
            zf.read(n).decode() for n in zf.namelist() if n.endswith("dist-info/METADATA")
        )
    assert "millrace/edge/agent.py" in modules
    assert "millrace/wire/codec.py" in modules
    for part in ("cloud", "dashboards", "fieldsim", "ops"):
        assert not [m for m in modules if m.startswith(f"millrace/{part}/")], part
    top_level = {m.split("/")[0] for m in modules}
    assert top_level == {"millrace"}
    pins = (installed.unpacked / "agent" / "requirements.txt").read_text().lower()
    requires = metadata_text.lower()
    for heavy in ("cryptography", "psycopg", "sqlalchemy", "streamlit", "jinja2"):
        assert f"{heavy}==" not in pins, heavy
        assert f"requires-dist: {heavy}" not in requires, heavy
    site = sorted((installed.root / "opt/millrace/current/venv/lib").glob("python3*/site-packages"))
    assert site and not (site[0] / "cryptography").exists()
    assert not (site[0] / "millrace" / "cloud").exists()


def test_installed_agent_publishes_to_the_broker(
    installed: Installed, mqtt_connect: Callable[..., paho.Client]
) -> None:
    config = installed.root / "etc" / "millrace" / "agent.toml"
    assert str(installed.root / "etc/millrace/pki/device.key") in config.read_text()
    inbox = BatchInbox(mqtt_connect("bundle-watcher", "svc-test"), DEVICE)
    millrace_bin = installed.root / "opt/millrace/current/venv/bin/millrace"
    log_file = installed.work / "agent.log"
    with running_agent(millrace_bin, config, log_file) as proc:
        batch = inbox.next_batch(proc, log_file)
    assert batch.device == DEVICE
    assert [w.metric for w in batch.windows] == ["test.sine"]


def test_first_boot_service_installs_the_staged_bundle_and_disables_itself(
    installed: Installed,
) -> None:
    """What millrace-firstboot.service runs, pointed at the already installed root."""
    card_root = installed.work / "card"
    (card_root / "etc" / "systemd" / "system").mkdir(parents=True)
    provision.write_sd(
        installed.bundle,
        card_root,
        release_key=provision_signing.release_pub_path(installed.pki_dir),
    )
    stage = card_root / "var" / "lib" / "millrace-firstboot"
    wants = card_root / "etc/systemd/system/multi-user.target.wants" / provision.FIRSTBOOT_UNIT_NAME
    assert wants.is_symlink()

    result = subprocess.run(
        ["sh", str(stage / "firstboot.sh"), "install", "--root", str(installed.root)],
        env={**os.environ, "MILLRACE_ROOT": str(card_root)},
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "manifest verified" in result.stdout
    assert "changed=0" in result.stdout  # the same release and files as the install above
    assert not stage.exists()
    assert not wants.is_symlink()


def test_rerun_after_a_local_change_repairs_it(installed: Installed) -> None:
    key = installed.root / "etc" / "millrace" / "pki" / "device.key"
    key.chmod(0o644)
    config = installed.root / "etc" / "millrace" / "agent.toml"
    original = config.read_text()
    config.write_text(original + "# edited by hand\n")
    result = _install(installed.unpacked, "--root", str(installed.root))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("changed=1")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert config.read_text() == original
    assert (config.parent / "agent.toml.previous").read_text().endswith("# edited by hand\n")


@pytest.mark.security
def test_a_replaced_device_key_leaves_no_previous_key_behind(installed: Installed) -> None:
    """install.sh kept the old private key as device.key.previous for good (0644 here)."""
    pki_dir = installed.root / "etc" / "millrace" / "pki"
    (pki_dir / "device.key").chmod(0o644)  # install.sh replaces it: its mode differs
    result = _install(installed.unpacked, "--root", str(installed.root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "installed " + str(pki_dir / "device.key") in result.stdout
    assert not (pki_dir / "device.key.previous").exists()
    assert (pki_dir / "device.crt").exists()


def test_a_bundle_whose_config_the_agent_rejects_is_rolled_back(
    installed: Installed,
    test_pki: PKIFixture,
    broker: MosquittoServer,
    agent_wheel: Path,  # noqa: F811
    wheelhouse: Path,  # noqa: F811
) -> None:
    """Same release, new config with period_s = 0: `edge check` fails, the old config returns."""
    config = installed.root / "etc" / "millrace" / "agent.toml"
    good = config.read_text()
    key = config.parent / "pki" / "device.key"
    key.chmod(0o644)  # so this run replaces the key too, and the rollback must restore it
    bad_bundle = provision.build_bundle(
        DEVICE,
        pki_dir=test_pki.dir,
        out=installed.work / "bad.tar.gz",
        config_template=_write(
            installed.work / "bad.toml.tmpl",
            TEST_AGENT_TEMPLATE.replace("period_s = 1", "period_s = 0"),
        ),
        broker_host=broker.host,
        broker_port=broker.port,
        wheel=agent_wheel,
        wheelhouse=wheelhouse,
    )
    with tarfile.open(bad_bundle.path) as tar:
        tar.extractall(installed.work / "bad", filter="tar")

    result = _install(installed.work / "bad" / f"millrace-{DEVICE}", "--root", str(installed.root))

    assert result.returncode == 4, result.stdout + result.stderr
    assert "millrace edge check failed" in result.stderr
    assert "windows.period_s" in result.stderr
    assert config.read_text() == good
    assert stat.S_IMODE(key.stat().st_mode) == 0o644  # the rolled-back key is the old one
    assert not (key.parent / "device.key.previous").exists()
    key.chmod(0o600)


@pytest.mark.security
def test_bundle_requirements_are_pinned_by_hash(installed: Installed) -> None:
    """Every requirement, the gateway wheel included, names the sha256 of the file it is."""
    carried = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in [*(installed.unpacked / "wheels").glob("*.whl"),
                  *(installed.unpacked / "agent").glob("*.whl")]
    }  # fmt: skip
    lines = [
        line
        for line in (installed.unpacked / "agent" / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    pinned = {line.split()[0].split("==")[0] for line in lines}
    assert {"msgpack", "paho-mqtt", "pymodbus", "millrace-edge"} <= pinned
    hashes = {part.removeprefix("--hash=sha256:") for ln in lines for part in ln.split()[1:]}
    assert all(len(ln.split()) >= 2 for ln in lines), lines
    assert hashes == set(carried.values())


def _resign(bundle: Path, pki_dir: Path) -> None:
    """Manifest and signature made again for the files as they are now."""
    files = {
        str(p.relative_to(bundle)): p.read_bytes()
        for p in bundle.rglob("*")
        if p.is_file() and p.name not in (provision.MANIFEST_NAME, provision.SIGNATURE_NAME)
    }
    manifest = provision._manifest(files)
    (bundle / provision.MANIFEST_NAME).write_bytes(manifest)
    (bundle / provision.SIGNATURE_NAME).write_bytes(provision_signing.sign(pki_dir, manifest))


@pytest.mark.security
def test_install_refuses_a_wheel_that_is_not_the_hash_pinned_one(
    installed: Installed, tmp_path: Path
) -> None:
    """A different build of a pinned version (signed by mistake) is refused by pip's hashes."""
    import shutil

    bundle = tmp_path / "rebuilt"
    shutil.copytree(installed.unpacked, bundle)
    (wheel,) = (bundle / "wheels").glob("pymodbus-*.whl")
    with zipfile.ZipFile(wheel, "a") as zf:
        zf.writestr("pymodbus/extra_module.py", "print('not the pinned build')\n")
    _resign(bundle, installed.pki_dir)
    root = tmp_path / "root"
    release_pub = str(provision_signing.release_pub_path(installed.pki_dir))
    result = _install(bundle, "--root", str(root), "--release-key", release_pub, "--skip-check")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pip could not install the release" in result.stderr
    assert "HASHES" in result.stderr.upper()
    assert not (root / "opt" / "millrace" / "current").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bundle_with_a_stranger_key(installed: Installed, bundle: Path) -> None:
    """A copy of the installed bundle whose key is not the certificate's (manifest fixed up
    and signed again with the release key: the operator's own mistake, not an attack)."""
    import shutil

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    shutil.copytree(installed.unpacked, bundle)
    stranger = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (bundle / "pki" / "device.key").write_bytes(stranger)
    manifest = bundle / provision.MANIFEST_NAME
    digest = hashlib.sha256(stranger).hexdigest()
    manifest.write_text(
        "".join(
            f"{digest}  pki/device.key\n" if line.endswith("  pki/device.key") else f"{line}\n"
            for line in manifest.read_text().splitlines()
        )
    )
    signature = provision_signing.sign(installed.pki_dir, manifest.read_bytes())
    (bundle / provision.SIGNATURE_NAME).write_bytes(signature)


@pytest.mark.security
def test_a_key_that_does_not_match_the_certificate_is_refused(
    installed: Installed, tmp_path: Path
) -> None:
    """install.sh checks key against certificate with the stdlib (no cryptography on gateways)."""
    bundle = tmp_path / "swapped"
    _bundle_with_a_stranger_key(installed, bundle)
    release_pub = str(provision_signing.release_pub_path(installed.pki_dir))
    result = _install(bundle, "--root", str(tmp_path / "root"), "--release-key", release_pub)
    assert result.returncode != 0, result.stdout
    assert "does not belong to the certificate in this bundle" in result.stderr


@pytest.mark.security
def test_a_refused_key_puts_the_old_one_back_and_keeps_no_copy(
    installed: Installed, tmp_path: Path
) -> None:
    """The mismatch used to exit 1 with the stranger key installed and the old one as .previous."""
    key = installed.root / "etc" / "millrace" / "pki" / "device.key"
    good = key.read_bytes()
    bundle = tmp_path / "swapped"
    _bundle_with_a_stranger_key(installed, bundle)
    result = _install(bundle, "--root", str(installed.root))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "does not belong to the certificate in this bundle" in result.stderr
    assert key.read_bytes() == good
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not (key.parent / "device.key.previous").exists()
