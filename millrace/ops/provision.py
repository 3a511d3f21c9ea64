"""Device bundles for flashing gateways, and agent releases for Ansible rollouts.

A *release* is the agent software every gateway of one rollout installs: the
gateway wheel (distribution `millrace-edge`: the contract and the edge agent, nothing
of cloud, dashboards, the simulator or operator tooling), requirements pinned to
exactly what this environment runs for the `edge` extra (never psycopg, SQLAlchemy,
Streamlit or cryptography), optionally the dependency wheels for offline installs,
and `release.json` naming it. For the cloud roles it also carries the full
`millrace` wheel and pinned requirements per target. Its id
changes whenever any of those bytes change, so a gateway can keep the previous
release next to the new one and switch back.

A *bundle* is one release plus everything one device needs (agent config, CA
chain, device certificate and key) plus a hardened systemd unit and an install
script. `MANIFEST.sha256` lists the sha256 of every other file and
`MANIFEST.sha256.sig` is its Ed25519 signature by the PKI's release key
(provision_signing); `install.sh` verifies that signature with the release public key
the gateway already trusts (or is given by `--release-key FILE`) before it reads any
other file, and refuses to install anything unless every file matches the manifest and
nothing else is present. The key is 0600 inside the tarball and the tarball itself is 0600.

Templates (millrace/ops/templates/bundle/) are rendered by millrace.ops.templating with
the options of Ansible's template lookup, so the edge_agent role renders the very same
files to the very same bytes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from millrace.errors import ConfigError, MillraceError, PKIError
from millrace.ops import pki, provision_signing, provision_wheels
from millrace.ops.broker import DEFAULT_PORT
from millrace.ops.templating import render_file, render_packaged

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
DIST_NAME = "millrace"
# The gateway's cut of the same source tree: the contract and the edge agent only.
GATEWAY_DIST_NAME = "millrace-edge"
EDGE_EXTRA = "edge"
# Installed on a gateway only when its agent config names OPC UA servers ([opcua.<name>]).
OPCUA_EXTRA = "opcua"
MANIFEST_NAME = "MANIFEST.sha256"
# The manifest's raw Ed25519 signature by the PKI's release key (provision_signing).
SIGNATURE_NAME = MANIFEST_NAME + ".sig"
# Where a gateway keeps the release public key it trusts (install.sh --release-key FILE).
TRUSTED_RELEASE_KEY = "/etc/millrace/release.pub"
RELEASE_JSON = "release.json"
REQUIREMENTS_NAME = "requirements.txt"
# Hex digits of the content hash in a release id: plenty to tell releases apart.
RELEASE_HASH_CHARS = 12
# Systemd kills and restarts an agent that has not pinged the watchdog for this long.
WATCHDOG_SECONDS = 60
# Cloud-side extras whose pins `--release-dir` writes for the ingest and dashboard roles.
CLOUD_TARGETS = ("cloud", "dashboard")
UNIT_NAME = "millrace-edge.service"
# Device files an agent config names (a serial field bus read by a `file` or `command`
# signal): the unit lets the agent open exactly these. The edge_agent role applies the
# same expression to the config it renders (vars/main.yml).
DEVICE_PATTERN = r"[\"'](/dev/[A-Za-z0-9._+/-]+)[\"']"
FIRSTBOOT_UNIT_NAME = "millrace-firstboot.service"
# The layout on a gateway; install.sh and the Ansible edge_agent role use the same one.
INSTALL_DIR = "/opt/millrace"
CONFIG_DIR = "/etc/millrace"
STATE_DIR = "/var/lib/millrace"
AGENT_USER = "millrace"

_KEY_MODE = 0o600
_FILE_MODE = 0o644
_EXEC_MODE = 0o755
_TEMPLATE_PACKAGE = ("ops", "templates", "bundle")
# What a source checkout needs to build a wheel; copied so the build never writes into it.
_SOURCE_ITEMS = ("pyproject.toml", "README.md", "LICENSE", "millrace")
# 1980-01-01, the earliest time a zip entry can hold.
REPRODUCIBLE_EPOCH_SECONDS = 315532800
# Parts of the millrace/ tree that never go to a gateway (the links to them and the tooling).
_NOT_ON_GATEWAY = ("cloud", "dashboards", "fieldsim", "ops")
_SOURCE_IGNORE = shutil.ignore_patterns(
    "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".*cache", "node_modules"
)
_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+$")


# -- templates ----------------------------------------------------------------------


def template_text(name: str) -> str:
    """Text of the packaged bundle file `name` (install.sh and the first-boot files ship as is)."""
    return resources.files(DIST_NAME).joinpath(*_TEMPLATE_PACKAGE, name).read_text()


def agent_config_context(
    device_id: str,
    *,
    broker_host: str,
    broker_port: int = DEFAULT_PORT,
    broker_hosts: Sequence[tuple[str, int]] = (),
    config_dir: str = CONFIG_DIR,
    state_dir: str = STATE_DIR,
) -> dict[str, Any]:
    """The placeholders an agent config template may use (docs/rollout.md lists them).

    `broker_hosts`: every broker of a plant with several; the first is also broker_host.
    """
    if broker_hosts:
        broker_host, broker_port = broker_hosts[0]
    return {
        "device_id": device_id,
        "broker_host": broker_host,
        "broker_port": broker_port,
        "broker_hosts": [_endpoint_text(host, port) for host, port in broker_hosts],
        "config_dir": config_dir,
        "ca_file": f"{config_dir}/pki/ca.crt",
        "cert_file": f"{config_dir}/pki/device.crt",
        "key_file": f"{config_dir}/pki/device.key",
        "state_dir": state_dir,
    }


def _endpoint_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unit_context(
    device_id: str,
    *,
    install_dir: str = INSTALL_DIR,
    config_dir: str = CONFIG_DIR,
    state_dir: str = STATE_DIR,
    user: str = AGENT_USER,
    watchdog_seconds: int = WATCHDOG_SECONDS,
    devices: Iterable[str] = (),
) -> dict[str, Any]:
    """The placeholders of the systemd unit templates (`devices`: see `config_devices`)."""
    return {
        "device_id": device_id,
        "install_dir": install_dir,
        "config_file": f"{config_dir}/agent.toml",
        "config_dir": config_dir,
        "state_dir": state_dir,
        "user": user,
        "group": user,
        "watchdog_seconds": watchdog_seconds,
        "devices": sorted(set(devices)),
    }


def config_devices(config_text: str) -> list[str]:
    """The /dev paths an agent config names (quoted strings), sorted, each once."""
    return sorted(set(re.findall(DEVICE_PATTERN, config_text)))


def render_unit(context: Mapping[str, Any]) -> str:
    """The agent's systemd unit, from the packaged template and `unit_context`."""
    return render_packaged(f"bundle/{UNIT_NAME}.tmpl", context)


def render_agent_config(template: Path | str | None, context: Mapping[str, Any]) -> str:
    """Render the agent config template (None: the packaged default) and check the result.

    The result must be TOML for this device: a template naming another device would
    silently give a gateway someone else's identity.
    """
    if template is None:
        source = "agent.toml.tmpl"
        text = render_packaged(f"bundle/{source}", context)
    else:
        source = str(template)
        text = render_file(template, context)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"renders to invalid TOML: {exc}") from exc
    if data.get("device_id") != context["device_id"]:
        raise ConfigError(
            f"{source}: device_id",
            f"renders to {data.get('device_id')!r}, expected {context['device_id']!r}; "
            'use device_id = "{{ device_id }}"',
        )
    return text


# -- releases -------------------------------------------------------------------------


def _marker_env_holds(requirement: Any, extras: Iterable[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in (*extras, ""))


def edge_requirements() -> list[str]:
    """`name==version` for the closure of millrace's base + edge dependencies, as installed here."""
    return pinned_requirements(EDGE_EXTRA)


def gateway_requirements(config_text: str | None = None) -> list[str]:
    """The pins a gateway with `config_text` needs: the edge closure, plus the opcua
    extra's when the config names OPC UA servers (asyncua and cryptography are heavy)."""
    pins = set(edge_requirements())
    if config_text is not None and _uses_opcua(config_text):
        pins |= set(pinned_requirements(OPCUA_EXTRA))
    return sorted(pins)


def _uses_opcua(config_text: str) -> bool:
    try:
        servers = tomllib.loads(config_text).get(OPCUA_EXTRA)
    except tomllib.TOMLDecodeError:
        return False  # the agent's own loader reports it (validate_config)
    return isinstance(servers, dict) and bool(servers)


def pinned_requirements(extra: str) -> list[str]:
    """`name==version` for the closure of millrace's base + `extra` dependencies, as installed.

    Markers are evaluated for this interpreter; targets run the same Python minor version.
    """
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError as exc:  # pragma: no cover - packaging ships with pip/setuptools envs
        raise MillraceError(
            "provisioning needs the 'packaging' library: pip install packaging"
        ) from exc
    root = metadata.distribution(DIST_NAME)
    pins: dict[str, str] = {}
    queue: list[tuple[Requirement, tuple[str, ...]]] = [
        (Requirement(r), (extra,)) for r in root.requires or []
    ]
    while queue:
        requirement, extras = queue.pop()
        if not _marker_env_holds(requirement, extras):
            continue
        name = canonicalize_name(requirement.name)
        if name == DIST_NAME:
            continue
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError as exc:
            raise MillraceError(
                f"{requirement.name} is not installed here; pins come from this environment: "
                f"pip install '{DIST_NAME}[{extra}]'"
            ) from exc
        if not requirement.specifier.contains(dist.version, prereleases=True):
            raise MillraceError(f"installed {name} {dist.version} does not satisfy {requirement}")
        first_visit = name not in pins
        pins[name] = f"{name}=={dist.version}"
        if first_visit or requirement.extras:
            queue.extend((Requirement(r), tuple(requirement.extras)) for r in dist.requires or [])
    return sorted(pins.values())


def source_dir() -> Path:
    """The source checkout this millrace runs from; a wheel can be built only from there."""
    candidate = Path(__file__).resolve().parents[2]
    if not (candidate / "pyproject.toml").is_file():
        raise MillraceError(
            "millrace is not running from a source checkout; pass --wheel FILE "
            "(build it with 'millrace provision --release-dir DIR' on a checkout)"
        )
    return candidate


def gateway_pyproject(root_pyproject: str) -> str:
    """pyproject.toml of the gateway distribution, derived from the checkout's own.

    Same version, the contract's dependencies plus the edge extra, the `millrace` command,
    and only the packages a gateway runs: setuptools finds no others in the pruned copy.
    """
    project = tomllib.loads(root_pyproject)["project"]
    deps = [*project.get("dependencies", []), *project["optional-dependencies"][EDGE_EXTRA]]
    return "\n".join(
        [
            "[build-system]",
            'requires = ["setuptools>=77", "wheel"]',
            'build-backend = "setuptools.build_meta"',
            "",
            "[project]",
            f"name = {json.dumps(GATEWAY_DIST_NAME)}",
            f"version = {json.dumps(project['version'])}",
            f"description = {json.dumps('millrace edge agent for gateways (contract + agent)')}",
            f"requires-python = {json.dumps(project['requires-python'])}",
            f"license = {json.dumps(project['license'])}",
            f"dependencies = {json.dumps(deps)}",
            "",
            "[project.scripts]",
            f"millrace = {json.dumps(project['scripts']['millrace'])}",
            "",
            "[tool.setuptools.packages.find]",
            'include = ["millrace*"]',
            "",
            "[tool.setuptools.package-data]",
            '"*" = ["*.toml"]',
            "",
        ]
    )


def _copy_gateway_tree(src: Path, dest: Path) -> None:
    """The millrace/ tree with the edge agent and without anything a gateway must not get."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = set(_SOURCE_IGNORE(directory, names))
        if Path(directory).resolve() == (src / "millrace").resolve():
            skipped |= set(_NOT_ON_GATEWAY)
        return skipped

    shutil.copytree(src / "millrace", dest / "millrace", ignore=ignore)
    (dest / "pyproject.toml").write_text(gateway_pyproject((src / "pyproject.toml").read_text()))


def _pip_wheel(tree: Path, out_dir: Path, dist: str) -> Path:
    built = tree.parent / "wheels"
    # No build isolation: the build backend comes from this environment (the ops extra),
    # so building a bundle asks no package index for setuptools.
    cmd = [
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-input", "-q",
        "--no-build-isolation",
    ]  # fmt: skip
    result = subprocess.run(
        [*cmd, "--disable-pip-version-check", "-w", str(built), str(tree)],
        capture_output=True,
        text=True,
        check=False,
        # Fixed zip timestamps: the same source gives the same bytes, so the same release id.
        env={**os.environ, "SOURCE_DATE_EPOCH": str(REPRODUCIBLE_EPOCH_SECONDS)},
    )
    if result.returncode != 0:
        raise MillraceError(f"building the {dist} wheel failed: {result.stderr.strip()[-800:]}")
    stem = dist.replace("-", "_")
    wheels = sorted(built.glob(f"{stem}-*.whl"))
    if len(wheels) != 1:
        raise MillraceError(f"expected one {dist} wheel from pip, got {wheels}")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheels[0].name
    shutil.copy2(wheels[0], target)
    log.info("built %s", target.name)
    return target


def build_agent_wheel(out_dir: Path, *, source: Path | None = None) -> Path:
    """Build the gateway wheel (`millrace-edge`: contract + edge agent) from the checkout."""
    src = source or source_dir()
    with tempfile.TemporaryDirectory(prefix="millrace-wheel-") as tmp:
        tree = Path(tmp) / "src"
        tree.mkdir()
        _copy_gateway_tree(src, tree)
        return _pip_wheel(tree, out_dir, GATEWAY_DIST_NAME)


def build_full_wheel(out_dir: Path, *, source: Path | None = None) -> Path:
    """Build the whole `millrace` wheel (what the cloud roles install) from the checkout."""
    src = source or source_dir()
    with tempfile.TemporaryDirectory(prefix="millrace-wheel-") as tmp:
        tree = Path(tmp) / "src"
        tree.mkdir()
        for item in _SOURCE_ITEMS:
            path = src / item
            if path.is_dir():
                shutil.copytree(path, tree / item, ignore=_SOURCE_IGNORE)
            elif path.is_file():
                shutil.copy2(path, tree / item)
        return _pip_wheel(tree, out_dir, DIST_NAME)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel_version(wheel: Path, dist: str = GATEWAY_DIST_NAME) -> str:
    parts = wheel.name.split("-")
    stem = dist.replace("-", "_")
    if len(parts) < 5 or parts[0] != stem or not wheel.name.endswith(".whl"):
        raise ConfigError("--wheel", f"{wheel.name} is not a {dist} wheel ({stem}-VERSION-...whl)")
    return parts[1]


@dataclass(frozen=True, slots=True)
class Release:
    """The agent software one rollout installs, as written into a directory."""

    dir: Path
    version: str
    release_id: str
    wheel: Path
    requirements: Path
    wheels: tuple[Path, ...]
    platform: str | None = None


def prepare_release(
    out_dir: Path | str,
    *,
    wheel: Path | str | None = None,
    wheelhouse: Path | str | None = None,
    requirements: Iterable[str] | None = None,
    targets: Iterable[str] = CLOUD_TARGETS,
    cloud_wheel: Path | str | None = None,
    platform: str | None = None,
    hashes: bool = False,
) -> Release:
    """Write the gateway wheel, pinned requirements, optional dependency wheels, release.json.

    With `platform` (what `uname -m` prints on the gateways) the release carries one
    wheel per pin for it, taken from `wheelhouse` or else downloaded (provision_wheels),
    and installs with no package index. Without it, every wheel of `wheelhouse` is
    copied as is. `hashes` pins every requirement, the gateway wheel included, to the
    sha256 of the wheels carried (`pip install --require-hashes`). Each of `targets`
    (extras installed here, e.g. cloud) gets its own pinned requirements-<extra>.txt,
    the full `millrace` wheel (`cloud_wheel`, else built from the checkout) and a
    release id in release.json for the Ansible roles of the cloud side.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for dist in (DIST_NAME, GATEWAY_DIST_NAME):
        for stale in out.glob(f"{dist.replace('-', '_')}-*.whl"):
            stale.unlink()
    agent_wheel = _provided_wheel(wheel, out, "--wheel", GATEWAY_DIST_NAME) or build_agent_wheel(
        out
    )
    targets = tuple(targets)
    full_wheel: Path | None = None
    if targets:
        full_wheel = _provided_wheel(cloud_wheel, out, "--cloud-wheel", DIST_NAME)
        full_wheel = full_wheel or build_full_wheel(out)
    pins = sorted(requirements) if requirements is not None else edge_requirements()
    for pin in pins:
        if not _PIN.fullmatch(pin):
            raise ConfigError("requirements", f"{pin!r} is not an exact name==version pin")
    wheels_dir = out / "wheels"
    if wheels_dir.exists():
        shutil.rmtree(wheels_dir)
    dep_wheels: list[Path] = []
    if platform is not None:
        provision_wheels.check_platform(platform)
        if wheelhouse is not None:
            house = Path(wheelhouse)
            dep_wheels = provision_wheels.select_wheelhouse(pins, platform, house, wheels_dir)
        else:
            dep_wheels = provision_wheels.build_wheelhouse(pins, platform, wheels_dir)
    elif wheelhouse is not None:
        house = Path(wheelhouse)
        if not house.is_dir():
            raise ConfigError("--wheelhouse", f"not a directory: {house}")
        wheels_dir.mkdir()
        for found in sorted(house.glob("*.whl")):
            if found.name.split("-")[0].lower() != DIST_NAME:
                dep_wheels.append(wheels_dir / found.name)
                shutil.copyfile(found, dep_wheels[-1])
    lines = list(pins)
    if hashes:
        if platform is None:
            raise ConfigError("--platform", "hash-pinned requirements need the target platform")
        lines = _hashed_pins(pins, platform, wheels_dir, agent_wheel)
    req_path = out / REQUIREMENTS_NAME
    req_path.write_text(
        "# The edge extra's closure, pinned to what the provisioning environment runs.\n"
        + "".join(f"{line}\n" for line in lines)
    )
    digest = hashlib.sha256()
    for path in (agent_wheel, req_path, *dep_wheels):
        digest.update(f"{path.name}\0{_sha256(path)}\n".encode())
    version = _wheel_version(agent_wheel)
    release_id = f"{version}-{digest.hexdigest()[:RELEASE_HASH_CHARS]}"
    info: dict[str, Any] = {
        "version": version,
        "release_id": release_id,
        "wheel": agent_wheel.name,
        "requirements": REQUIREMENTS_NAME,
        "wheels": [p.name for p in dep_wheels],
        "targets": _write_targets(out, full_wheel, targets) if full_wheel else {},
    }
    if platform is not None:
        info["platform"] = platform
    (out / RELEASE_JSON).write_text(json.dumps(info, indent=2) + "\n")
    log.info("release %s in %s", release_id, out)
    return Release(out, version, release_id, agent_wheel, req_path, tuple(dep_wheels), platform)


def _hashed_pins(pins: list[str], platform: str, wheels_dir: Path, agent_wheel: Path) -> list[str]:
    """`name==version --hash=sha256:...` for every pin and for the gateway wheel itself.

    pip then installs only these very files (`--require-hashes`), whatever else an index
    or a find-links directory offers.
    """
    found = provision_wheels.matching_wheels(pins, platform, wheels_dir)
    lines = []
    for pin in pins:
        if not found[pin]:
            raise MillraceError(f"no {platform} wheel for {pin} to hash")
        lines.append(" ".join([pin, *(f"--hash=sha256:{_sha256(w)}" for w in found[pin])]))
    agent = f"{GATEWAY_DIST_NAME}=={_wheel_version(agent_wheel)}"
    lines.append(f"{agent} --hash=sha256:{_sha256(agent_wheel)}")
    return lines


def _provided_wheel(wheel: Path | str | None, out: Path, flag: str, dist: str) -> Path | None:
    """A prebuilt wheel given by flag, checked by name and copied into the release."""
    if wheel is None:
        return None
    source = Path(wheel)
    if not source.is_file():
        raise ConfigError(flag, f"file not found: {source}")
    try:
        _wheel_version(source, dist)
    except ConfigError as exc:
        raise ConfigError(flag, exc.problem) from exc
    target = out / source.name
    shutil.copyfile(source, target)
    return target


def _write_targets(out: Path, wheel: Path, targets: Iterable[str]) -> dict[str, dict[str, str]]:
    """requirements-<extra>.txt, the wheel and a release id per cloud-side target."""
    version = _wheel_version(wheel, DIST_NAME)
    written: dict[str, dict[str, str]] = {}
    for stale in out.glob("requirements-*.txt"):
        stale.unlink()
    for extra in targets:
        try:
            pins = pinned_requirements(extra)
        except MillraceError as exc:
            log.warning("no %s requirements in this release: %s", extra, exc)
            continue
        path = out / f"requirements-{extra}.txt"
        path.write_text(
            f"# The {extra} extra's closure, pinned to what the provisioning environment runs.\n"
            + "".join(f"{pin}\n" for pin in pins)
        )
        digest = hashlib.sha256(f"{_sha256(wheel)}\0{_sha256(path)}".encode()).hexdigest()
        written[extra] = {
            "release_id": f"{version}-{digest[:RELEASE_HASH_CHARS]}",
            "requirements": path.name,
            "wheel": wheel.name,
        }
    return written


# -- certificates -----------------------------------------------------------------------


def _current_record(pki_dir: Path, device_id: str) -> pki.IssuedRecord | None:
    records = [r for r in pki.issued_records(pki_dir) if r.ident == device_id]
    return records[-1] if records else None


def _csr_common_name(csr_pem: bytes) -> str:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PKIError(f"--csr is not a PEM certificate signing request: {exc}") from exc
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else ""


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """Where the device's certificate (and key, unless it came from a CSR) are."""

    cert: Path
    key: Path | None
    newly_issued: bool


def device_credentials(
    pki_dir: Path | str,
    device_id: str,
    *,
    csr_pem: bytes | None = None,
    force: bool = False,
) -> DeviceCredentials:
    """Reuse the device's valid certificate and key, or issue them (or sign its CSR).

    Reuse makes provisioning repeatable: a second bundle for the same device has
    the same identity. A CSR always yields a new certificate (the device made a new key).
    An id holding a service certificate is refused by the PKI, with or without `force`,
    before its certificate or key is touched.
    """
    ident = pki.validate_id(device_id)
    paths = pki.pki_path_checked(pki_dir)
    current = _current_record(paths.dir, ident)
    valid = (
        current is not None
        and not current.revoked
        and pki.cert_days_left(paths.cert_for(ident)) > 0
    )
    if csr_pem is not None:
        common_name = _csr_common_name(csr_pem)
        if common_name != ident:
            raise PKIError(f"the CSR's CN is {common_name!r}, not the device id {ident!r}")
        cert = pki.sign_csr(paths.dir, csr_pem, role="device", force=force or valid)
        return DeviceCredentials(cert, None, newly_issued=True)
    if valid and not force and current is not None and current.role == "device":
        key = paths.key_for(ident)
        if not key.is_file():
            raise PKIError(
                f"{ident!r} was certified from a CSR, so its key is on the device only: "
                "provision with --csr FILE, or --force to issue a new key"
            )
        return DeviceCredentials(paths.cert_for(ident), key, newly_issued=False)
    issued = pki.issue(paths.dir, ident, role="device", force=current is not None)
    return DeviceCredentials(issued.cert, issued.key, newly_issued=True)


def default_broker_host(pki_dir: Path | str) -> str:
    """The first name the broker certificate was issued for that is not a loopback name."""
    cert = x509.load_pem_x509_certificate(pki.pki_paths(pki_dir).broker_cert.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "localhost"
    loopback = {"localhost", "127.0.0.1", "::1"}
    names = [str(n.value) for n in sans if isinstance(n, x509.DNSName | x509.IPAddress)]
    return next((n for n in names if n not in loopback), "localhost")


# -- bundles --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bundle:
    """A written device bundle."""

    path: Path
    sha256: str
    device_id: str
    release_id: str
    has_key: bool
    release_pub: Path
    platform: str


def _manifest(files: Mapping[str, bytes]) -> bytes:
    lines = [
        f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items())
    ]
    return "".join(lines).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = mtime
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = _EXEC_MODE
    info.mtime = mtime
    info.uname = info.gname = "root"
    tar.addfile(info)


def _write_tarball(
    out: Path, top: str, files: Mapping[str, bytes], modes: Mapping[str, int]
) -> None:
    mtime = int(dt.datetime.now(dt.UTC).timestamp())
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, _KEY_MODE)
    try:
        os.fchmod(fd, _KEY_MODE)  # the tarball holds a private key
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            _add_dir(tar, top, mtime)
            dirs = sorted({str(Path(n).parent) for n in files} - {"."})
            for directory in dirs:
                _add_dir(tar, f"{top}/{directory}", mtime)
            for name in sorted(files):
                _add(tar, f"{top}/{name}", files[name], modes.get(name, _FILE_MODE), mtime)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def build_bundle(
    device_id: str,
    *,
    pki_dir: Path | str,
    out: Path | str,
    config_template: Path | str | None = None,
    csr_pem: bytes | None = None,
    broker_host: str | None = None,
    broker_port: int = DEFAULT_PORT,
    broker_hosts: Sequence[tuple[str, int]] = (),
    wheel: Path | str | None = None,
    wheelhouse: Path | str | None = None,
    force: bool = False,
    validate_config: Callable[[str], None] | None = None,
    platform: str | None = None,
) -> Bundle:
    """Write the device bundle tarball `out` for `device_id` (see the module docstring).

    The bundle is for gateways of `platform` (`uname -m`; default: this machine's) and
    carries one wheel per requirement for it, from `wheelhouse` or else downloaded, so
    install.sh needs no package index; requirements are pinned by hash.

    `validate_config` gets the rendered agent config text (the CLI passes the edge
    agent's own loader when it is installed) and raises ConfigError when it is wrong.
    """
    ident = pki.validate_id(device_id)
    machine = provision_wheels.check_platform(platform or provision_wheels.this_platform())
    pki_path = pki.pki_path_checked(pki_dir).dir
    pki.check_role(pki_path, ident, "device")  # a service id fails before the release is built
    out_path = Path(out)
    if not out_path.name.endswith((".tar.gz", ".tgz")):
        raise ConfigError("--out", f"{out_path.name}: the bundle is a .tar.gz file")
    host = broker_host or default_broker_host(pki_path)
    context = agent_config_context(
        ident, broker_host=host, broker_port=broker_port, broker_hosts=broker_hosts
    )
    config = render_agent_config(config_template, context)
    if validate_config is not None:
        validate_config(config)
    with tempfile.TemporaryDirectory(prefix="millrace-release-") as tmp:
        release = prepare_release(
            Path(tmp),
            wheel=wheel,
            wheelhouse=wheelhouse,
            requirements=gateway_requirements(config),
            targets=(),
            platform=machine,
            hashes=True,
        )
        files: dict[str, bytes] = {
            f"agent/{release.wheel.name}": release.wheel.read_bytes(),
            f"agent/{REQUIREMENTS_NAME}": release.requirements.read_bytes(),
            f"agent/{RELEASE_JSON}": (release.dir / RELEASE_JSON).read_bytes(),
        }
        for dep in release.wheels:
            files[f"wheels/{dep.name}"] = dep.read_bytes()
    # Only now, with config and software in hand, is a certificate issued (or reused).
    credentials = device_credentials(pki_path, ident, csr_pem=csr_pem, force=force)
    files["config/agent.toml"] = config.encode()
    files["pki/ca.crt"] = pki.pki_paths(pki_path).ca_cert.read_bytes()
    files["pki/device.crt"] = credentials.cert.read_bytes()
    if credentials.key is not None:
        files["pki/device.key"] = credentials.key.read_bytes()
    unit = unit_context(ident, devices=config_devices(config))
    files[f"systemd/{UNIT_NAME}"] = render_unit(unit).encode()
    files[f"systemd/{FIRSTBOOT_UNIT_NAME}"] = template_text(FIRSTBOOT_UNIT_NAME).encode()
    files["install.sh"] = template_text("install.sh").encode()
    files["firstboot.sh"] = template_text("firstboot.sh").encode()
    files["bundle.json"] = (
        json.dumps(
            {
                "format": BUNDLE_FORMAT,
                "device_id": ident,
                "release_id": release.release_id,
                "version": release.version,
                "platform": machine,
                "python": "{}.{}".format(*sys.version_info[:2]),
                "broker": f"{host}:{broker_port}",
                "has_key": credentials.key is not None,
                "created_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            },
            indent=2,
        )
        + "\n"
    ).encode()
    files[MANIFEST_NAME] = _manifest(files)
    # Signed last: install.sh checks this signature before it reads any other file.
    release_pub = provision_signing.ensure_release_key(pki_path)
    files[SIGNATURE_NAME] = provision_signing.sign(pki_path, files[MANIFEST_NAME])
    modes = {"install.sh": _EXEC_MODE, "firstboot.sh": _EXEC_MODE, "pki/device.key": _KEY_MODE}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_tarball(out_path, f"millrace-{ident}", files, modes)
    log.info("wrote bundle %s for %s (release %s)", out_path, ident, release.release_id)
    return Bundle(
        out_path,
        _sha256(out_path),
        ident,
        release.release_id,
        credentials.key is not None,
        release_pub,
        machine,
    )


# -- SD cards ---------------------------------------------------------------------------------

# The kernel command line hook Raspberry Pi OS runs once (as its own imager does).
_CMDLINE_HOOK = (
    "systemd.run={script} systemd.run_success_action=reboot systemd.unit=kernel-command-line.target"
)


@dataclass(frozen=True, slots=True)
class SdResult:
    """What `write_sd` wrote and how the first boot will find it."""

    kind: str  # "rootfs" or "boot"
    files: tuple[Path, ...]


def write_sd(
    bundle: Path | str,
    target: Path | str,
    *,
    release_key: Path | str | None = None,
    boot_mount: str = "/boot/firmware",
) -> SdResult:
    """Put `bundle` on a mounted SD card with a first-boot service that installs it.

    `target` is either the card's root filesystem (it has etc/systemd/system: the
    unit is installed and enabled directly) or its FAT boot partition (it has
    cmdline.txt: a one-shot kernel command line hook moves the bundle off the
    world-readable FAT partition, enables the unit and reboots). `boot_mount` is
    where the gateway mounts the boot partition. `release_key` (the PKI's release.pub)
    becomes the key the gateway trusts, at /etc/millrace/release.pub, unless the card
    already has one; without it the card must already have one.
    """
    source = Path(bundle)
    root = Path(target)
    if not root.is_dir():
        raise ConfigError("--sd", f"not a mounted directory: {root}")
    script = template_text("firstboot.sh").encode()
    unit = template_text(FIRSTBOOT_UNIT_NAME).encode()
    pub = Path(release_key).read_bytes() if release_key is not None else None
    written: list[Path] = []
    systemd_dir = root / "etc" / "systemd" / "system"
    if systemd_dir.is_dir():
        trusted = root / TRUSTED_RELEASE_KEY.lstrip("/")
        if pub is not None and not trusted.is_file():
            trusted.parent.mkdir(mode=_EXEC_MODE, parents=True, exist_ok=True)
            pki.write_atomic(trusted, pub, mode=_FILE_MODE)
            written.append(trusted)
        elif not trusted.is_file():
            raise ConfigError("--sd", f"{trusted} is missing: pass the PKI's release.pub")
        stage = root / "var" / "lib" / "millrace-firstboot"
        stage.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, data, mode in (
            ("bundle.tar.gz", source.read_bytes(), _KEY_MODE),
            ("firstboot.sh", script, _EXEC_MODE),
        ):
            pki.write_atomic(stage / name, data, mode=mode)
            written.append(stage / name)
        pki.write_atomic(systemd_dir / FIRSTBOOT_UNIT_NAME, unit, mode=_FILE_MODE)
        wants = systemd_dir / "multi-user.target.wants"
        wants.mkdir(exist_ok=True)
        link = wants / FIRSTBOOT_UNIT_NAME
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{FIRSTBOOT_UNIT_NAME}")
        written += [systemd_dir / FIRSTBOOT_UNIT_NAME, link]
        return SdResult("rootfs", tuple(written))
    cmdline = root / "cmdline.txt"
    if not cmdline.is_file():
        raise ConfigError(
            "--sd", f"{root} has neither etc/systemd/system (a root fs) nor cmdline.txt (a boot fs)"
        )
    folder = root / "millrace"
    folder.mkdir(exist_ok=True)
    if pub is not None:  # firstboot.sh moves it to /etc/millrace/release.pub
        pki.write_atomic(folder / "release.pub", pub, mode=_FILE_MODE)
        written.append(folder / "release.pub")
    for name, data, mode in (
        ("bundle.tar.gz", source.read_bytes(), _KEY_MODE),
        ("firstboot.sh", script, _EXEC_MODE),
        (FIRSTBOOT_UNIT_NAME, unit, _FILE_MODE),
    ):
        pki.write_atomic(folder / name, data, mode=mode)
        written.append(folder / name)
    hook = _CMDLINE_HOOK.format(script=f"{boot_mount}/millrace/firstboot.sh")
    line = cmdline.read_text().strip()
    if "millrace/firstboot.sh" not in line:
        cmdline.write_text(f"{line} {hook}\n")
    written.append(cmdline)
    return SdResult("boot", tuple(written))
