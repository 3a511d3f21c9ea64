"""Render the broker's mosquitto.conf and ACL from the project's one template set.

The templates (millrace/ops/templates/*.tmpl) are rendered by millrace.ops.templating,
with the options of Ansible's template lookup, so the broker role renders the very same
files to the very same bytes.
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from millrace.errors import ConfigError, PKIError
from millrace.ops import pki
from millrace.ops.templating import render_packaged

log = logging.getLogger(__name__)

DEFAULT_PORT = 8883
# See the comment in mosquitto.conf.tmpl: bounds how many batches one ingest commit can ack.
MAX_INFLIGHT_MESSAGES = 1000
# About an hour of backlog for a worker that is down, at 20 devices x 1 batch per 2 s each.
MAX_QUEUED_MESSAGES = 50_000
# Far above any sensible batch; a client sending more is disconnected.
MAX_PACKET_SIZE_BYTES = 8 * 1024 * 1024
AUTOSAVE_INTERVAL_SECONDS = 10
PERSISTENT_CLIENT_EXPIRATION = "14d"
CONF_TEMPLATE = "mosquitto.conf.tmpl"
ACL_TEMPLATE = "acl.tmpl"


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
    acl_file: Path,
    persistence_dir: Path,
    port: int = DEFAULT_PORT,
    bind_address: str | None = None,
    user: str | None = None,
    log_file: Path | None = None,
    clientid_from_certificate: bool = False,
    max_inflight_messages: int = MAX_INFLIGHT_MESSAGES,
    max_queued_messages: int = MAX_QUEUED_MESSAGES,
    max_packet_size_bytes: int = MAX_PACKET_SIZE_BYTES,
    autosave_interval_seconds: int = AUTOSAVE_INTERVAL_SECONDS,
) -> str:
    """mosquitto.conf text: one TLS listener on `port`, the PKI in `pki_dir`, the ACL file.

    `log_file` None logs to stdout (systemd's journal); `user` None leaves mosquitto's
    default (it drops root to the `mosquitto` user).
    """
    if not 1 <= port <= 65535:
        raise ConfigError("port", f"must be 1-65535, got {port}")
    paths = pki.pki_paths(pki_dir)
    context = {
        "acl_file": _config_path("acl_file", acl_file),
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


def render_acl(*, service_ids: Iterable[str]) -> str:
    """ACL text: %u patterns for every client, one `user` block per service identity."""
    services = [pki.validate_id(s) for s in service_ids]
    return render_packaged(ACL_TEMPLATE, {"service_ids": services})


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """What `write_broker_config` wrote."""

    conf: Path
    acl: Path
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
    clientid_from_certificate: bool = False,
) -> BrokerFiles:
    """Write OUT/mosquitto.conf and OUT/acl for the PKI in `pki_dir`.

    The ACL lists the service identities issued so far, so run this again (and
    reload the broker) after issuing a service certificate. `user` defaults to
    the current user, which suits a local stack; deployments pass `mosquitto`.
    """
    paths = pki.pki_path_checked(pki_dir)
    for needed in (paths.broker_cert, paths.broker_key, paths.crl):
        if not needed.exists():
            raise PKIError(f"{needed} is missing: run 'millrace pki init --pki {paths.dir}'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(persistence_dir) if persistence_dir else out / "data"
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = BrokerFiles(conf=out / "mosquitto.conf", acl=out / "acl", persistence_dir=data_dir)
    acl_text = render_acl(service_ids=pki.service_ids(paths.dir))
    conf_text = render_mosquitto_conf(
        pki_dir=paths.dir,
        acl_file=files.acl,
        persistence_dir=data_dir,
        port=port,
        bind_address=bind_address,
        user=user or getpass.getuser(),
        log_file=Path(log_file) if log_file else None,
        clientid_from_certificate=clientid_from_certificate,
    )
    # The ACL first: a broker reloading in between sees the new users with the old config.
    pki.write_atomic(files.acl, acl_text.encode(), mode=0o644)
    pki.write_atomic(files.conf, conf_text.encode(), mode=0o644)
    log.info("wrote %s and %s", files.conf, files.acl)
    return files
