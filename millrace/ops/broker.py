"""Render the broker's mosquitto.conf and dynamic-security roles from the one template set.

The templates (millrace/ops/templates/*.tmpl) are rendered by millrace.ops.templating,
with the options of Ansible's template lookup, so the broker role renders the very same
files to the very same bytes.
"""

from __future__ import annotations

import getpass
import glob
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from millrace.errors import ConfigError, PKIError
from millrace.ops import pki
from millrace.ops.templating import render_packaged
from millrace.wire import MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)

DEFAULT_PORT = 8883
# See the comment in mosquitto.conf.tmpl: bounds how many batches one ingest commit can ack.
MAX_INFLIGHT_MESSAGES = 1000
# About an hour of backlog for a worker that is down, at 20 devices x 1 batch per 2 s each.
MAX_QUEUED_MESSAGES = 50_000
# The ingest worker refuses payloads above MAX_PAYLOAD_BYTES; the rest is room for the
# fixed header, topic and MQTT v5 properties. A client sending more is disconnected.
PACKET_OVERHEAD_BYTES = 4 * 1024
MAX_PACKET_SIZE_BYTES = MAX_PAYLOAD_BYTES + PACKET_OVERHEAD_BYTES
AUTOSAVE_INTERVAL_SECONDS = 10
PERSISTENT_CLIENT_EXPIRATION = "14d"
CONF_TEMPLATE = "mosquitto.conf.tmpl"
DYNSEC_TEMPLATE = "dynsec.json.tmpl"
DYNSEC_PLUGIN_NAME = "mosquitto_dynamic_security.so"
# Where Debian and upstream builds install the plugin (multiarch first).
DYNSEC_PLUGIN_GLOBS = (
    "/usr/lib/*-linux-gnu/" + DYNSEC_PLUGIN_NAME,
    "/usr/lib/" + DYNSEC_PLUGIN_NAME,
)
# The replies a device may send: edge/commands.py COMMAND_NAMES (a test keeps them equal).
DEVICE_COMMAND_NAMES = ("ping", "set", "flush", "rebirth")


# -- broker configuration --------------------------------------------------------------


def _config_path(key: str, path: Path) -> str:
    """Absolute path as mosquitto reads it: one token, so no whitespace anywhere."""
    text = str(path.resolve())
    if any(c.isspace() for c in text):
        raise ConfigError(key, f"mosquitto cannot read paths containing whitespace: {text!r}")
    return text


def _check_token(key: str, value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ConfigError(key, f"must be a single word without whitespace, got {value!r}")
    return value


def render_mosquitto_conf(
    *,
    pki_dir: Path,
    dynsec_file: Path,
    persistence_dir: Path,
    port: int = DEFAULT_PORT,
    bind_address: str | None = None,
    user: str | None = None,
    log_file: Path | None = None,
    clientid_from_certificate: bool = True,
    dynsec_plugin: Path | None = None,
    max_inflight_messages: int = MAX_INFLIGHT_MESSAGES,
    max_queued_messages: int = MAX_QUEUED_MESSAGES,
    max_packet_size_bytes: int = MAX_PACKET_SIZE_BYTES,
    autosave_interval_seconds: int = AUTOSAVE_INTERVAL_SECONDS,
) -> str:
    """mosquitto.conf text: one TLS listener on `port`, the PKI in `pki_dir`, dynsec roles.

    `log_file` None logs to stdout (systemd's journal); `user` None leaves mosquitto's
    default (it drops root to the `mosquitto` user).
    """
    if not 1 <= port <= 65535:
        raise ConfigError("port", f"must be 1-65535, got {port}")
    paths = pki.pki_paths(pki_dir)
    context = {
        "dynsec_plugin": _config_path("dynsec_plugin", dynsec_plugin or find_dynsec_plugin()),
        "dynsec_file": _config_path("dynsec_file", dynsec_file),
        "user": _check_token("user", user) if user else "",
        "port": port,
        "bind_address": _check_token("bind", bind_address) if bind_address else "",
        "cafile": _config_path("cafile", paths.ca_cert),
        "certfile": _config_path("certfile", paths.broker_cert),
        "keyfile": _config_path("keyfile", paths.broker_key),
        "crlfile": _config_path("crlfile", paths.crl),
        "clientid_from_certificate": clientid_from_certificate,
        "max_inflight_messages": max_inflight_messages,
        "max_queued_messages": max_queued_messages,
        "max_packet_size_bytes": max_packet_size_bytes,
        "persistent_client_expiration": PERSISTENT_CLIENT_EXPIRATION,
        # mosquitto joins this with the file name, so it must end in a slash.
        "persistence_location": _config_path("persistence_dir", persistence_dir) + "/",
        "autosave_interval_seconds": autosave_interval_seconds,
        "log_dest": f"file {_config_path('log_file', log_file)}" if log_file else "stdout",
    }
    return render_packaged(CONF_TEMPLATE, context)


def find_dynsec_plugin() -> Path:
    """The installed dynamic security plugin (mosquitto 2.0 ships it in the mosquitto package)."""
    for pattern in DYNSEC_PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[0])
    raise ConfigError(
        "dynsec_plugin", f"{DYNSEC_PLUGIN_NAME} not found: install mosquitto 2.0 or pass its path"
    )


def render_dynsec(
    *, device_ids: Iterable[str], service_ids: Iterable[str], admin_ids: Iterable[str] = ()
) -> str:
    """The plugin's JSON: one role per device (its own topics), one shared service role.

    Mosquitto 2.0's dynamic security has no %u patterns, hence a role per device.
    `admin_ids` (service identities) may also change the roles over $CONTROL.
    """
    devices = sorted({pki.validate_id(d) for d in device_ids})
    services = sorted({pki.validate_id(s) for s in service_ids})
    admins = sorted({pki.validate_id(a) for a in admin_ids})
    for admin in admins:
        if admin not in services:
            raise ConfigError("admin", f"{admin!r} holds no valid service certificate: issue one")
    context = {
        "device_ids": devices,
        "service_ids": services,
        "admin_ids": admins,
        "command_names": list(DEVICE_COMMAND_NAMES),
    }
    return render_packaged(DYNSEC_TEMPLATE, context)


def device_ids(pki_dir: Path | str) -> list[str]:
    """Ids whose newest certificate is a valid device certificate, sorted."""
    current: dict[str, pki.IssuedRecord] = {}
    for record in pki.issued_records(pki_dir):
        current[record.ident] = record  # the newest certificate of an id wins
    return sorted(i for i, r in current.items() if r.role == "device" and not r.revoked)


def render_dynsec_for(pki_dir: Path | str, admin_ids: Iterable[str] = ()) -> str:
    """`render_dynsec` for every valid identity of the PKI in `pki_dir`."""
    return render_dynsec(
        device_ids=device_ids(pki_dir), service_ids=pki.service_ids(pki_dir), admin_ids=admin_ids
    )


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """What `write_broker_config` wrote."""

    conf: Path
    dynsec: Path
    persistence_dir: Path


def write_broker_config(
    pki_dir: Path | str,
    out_dir: Path | str,
    *,
    port: int = DEFAULT_PORT,
    bind_address: str | None = None,
    persistence_dir: Path | str | None = None,
    user: str | None = None,
    log_file: Path | str | None = None,
    clientid_from_certificate: bool = True,
    admin_ids: Iterable[str] = (),
) -> BrokerFiles:
    """Write OUT/mosquitto.conf and OUT/dynsec.json for the PKI in `pki_dir`.

    The roles list the identities issued so far. Mosquitto reads dynsec.json only at
    start (not on SIGHUP), so a running broker is updated with `sync_running_broker`
    (`millrace broker sync`). `user` defaults to the current user, which suits a local
    stack; deployments pass `mosquitto`.
    """
    paths = pki.pki_path_checked(pki_dir)
    for needed in (paths.broker_cert, paths.broker_key, paths.crl):
        if not needed.exists():
            raise PKIError(f"{needed} is missing: run 'millrace pki init --pki {paths.dir}'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(persistence_dir) if persistence_dir else out / "data"
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = BrokerFiles(
        conf=out / "mosquitto.conf", dynsec=out / "dynsec.json", persistence_dir=data_dir
    )
    dynsec_text = render_dynsec_for(paths.dir, admin_ids)
    conf_text = render_mosquitto_conf(
        pki_dir=paths.dir,
        dynsec_file=files.dynsec,
        persistence_dir=data_dir,
        port=port,
        bind_address=bind_address,
        user=user or getpass.getuser(),
        log_file=Path(log_file) if log_file else None,
        clientid_from_certificate=clientid_from_certificate,
    )
    # The roles first: a broker starting in between finds the file its config names.
    # 0600: mosquitto rewrites it and it names every identity.
    pki.write_atomic(files.dynsec, dynsec_text.encode(), mode=0o600)
    pki.write_atomic(files.conf, conf_text.encode(), mode=0o644)
    log.info("wrote %s and %s", files.conf, files.dynsec)
    return files
