"""Bring a running broker's dynamic-security roles in line with the PKI, without a restart.

Mosquitto 2.0.11 reads the dynsec JSON only when it starts; SIGHUP does not reload it.
A running broker is changed over its control topic instead: an admin identity (a service
certificate listed as admin in `millrace broker config --admin`) publishes dynsec
commands to $CONTROL/dynamic-security/v1 and reads the answers. Deleting a client makes
the broker refuse everything that identity does from then on, on open connections too,
and the broker writes the new state back to its dynsec file.
"""

from __future__ import annotations

import json
import logging
import queue
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from millrace.errors import MillraceError
from millrace.ops import pki
from millrace.ops.broker import render_dynsec_for

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
TIMEOUT_SECONDS = 10.0
ADMIN_ROLE = "broker-admin"
# Answers that mean "already as wanted" when re-applying the whole state.
HARMLESS_ERRORS = (
    "Role already exists",
    "Client already exists",
    "Client not found",
    "Role not found",
)


@dataclass(slots=True)
class SyncResult:
    """What `sync_running_broker` changed."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


def _role_names(client: dict[str, Any]) -> set[str]:
    return {r["rolename"] for r in client.get("roles", [])}


def plan_commands(
    desired: dict[str, Any], current_clients: Iterable[dict[str, Any]]
) -> tuple[list[dict[str, Any]], SyncResult]:
    """Dynsec commands turning `current_clients` (verbose listClients entries) into `desired`.

    A client whose roles differ (an id revoked and re-issued in the other role without a
    sync in between) is modified, which also disconnects it. Admin rights are only ever
    granted by `broker config --admin`, so a sync neither adds nor removes ADMIN_ROLE.
    """
    wanted = {c["username"]: c for c in desired["clients"]}
    current = {c["username"]: c for c in current_clients}
    result = SyncResult()
    commands: list[dict[str, Any]] = [
        {"command": "createRole", "rolename": r["rolename"], "acls": r["acls"]}
        for r in desired["roles"]
    ]
    for name in sorted(set(wanted) - set(current)):
        result.added.append(name)
        commands.append(
            {"command": "createClient", "username": name, "roles": wanted[name]["roles"]}
        )
    for name in sorted(set(wanted) & set(current)):
        have = _role_names(current[name])
        if _role_names(wanted[name]) - {ADMIN_ROLE} == have - {ADMIN_ROLE}:
            continue
        roles = [r for r in wanted[name]["roles"] if r["rolename"] != ADMIN_ROLE]
        if ADMIN_ROLE in have:
            roles.append({"rolename": ADMIN_ROLE, "priority": 0})
        result.changed.append(name)
        commands.append({"command": "modifyClient", "username": name, "roles": roles})
        if f"device-{name}" in have - _role_names(wanted[name]):
            commands.append({"command": "deleteRole", "rolename": f"device-{name}"})
    for name in sorted(set(current) - set(wanted)):
        result.removed.append(name)
        commands.append({"command": "deleteClient", "username": name})
        commands.append({"command": "deleteRole", "rolename": f"device-{name}"})
    return commands, result


class _Control:
    """One admin connection: send a list of commands, return the broker's responses."""

    def __init__(self, host: str, port: int, pki_dir: Path, admin_id: str) -> None:
        from millrace.mqtt import tls_client

        paths = pki.pki_path_checked(pki_dir)
        self._answers: queue.Queue[Any] = queue.Queue()
        # The client id is the admin's CN (the broker forces it anyway).
        self._client = tls_client(
            admin_id,
            ca=paths.ca_cert,
            cert=paths.cert_for(admin_id),
            key=paths.key_for(admin_id),
        )
        self._client.on_connect = lambda _c, _u, _f, reason, _p: self._answers.put(reason)
        self._client.on_subscribe = lambda _c, _u, _m, reasons, _p: self._answers.put(reasons[0])
        self._client.on_message = lambda _c, _u, msg: self._answers.put(msg.payload)
        self._client.connect(host, port)
        self._client.loop_start()
        self._expect_success("connect")
        self._client.subscribe(RESPONSE_TOPIC, qos=1)
        self._expect_success(f"subscribe to {RESPONSE_TOPIC} (is {admin_id} a broker admin?)")

    def _next(self, what: str) -> Any:
        try:
            return self._answers.get(timeout=TIMEOUT_SECONDS)
        except queue.Empty:
            raise MillraceError(
                f"broker did not answer {what} within {TIMEOUT_SECONDS} s"
            ) from None

    def _expect_success(self, what: str) -> None:
        reason = self._next(what)
        if getattr(reason, "is_failure", False):
            raise MillraceError(f"broker refused {what}: {reason}")

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self._client.publish(CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1)
        answer = json.loads(self._next("the dynsec commands"))
        responses: list[dict[str, Any]] = answer.get("responses", [])
        return responses

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def sync_running_broker(
    pki_dir: Path | str,
    *,
    host: str,
    port: int,
    admin_id: str,
    admin_ids: Iterable[str] | None = None,
) -> SyncResult:
    """Add every valid identity of the PKI to the running broker and delete revoked ones.

    `admin_ids` (default: just `admin_id`) must match what `broker config --admin` got,
    or the admins lose their rights. Raises MillraceError naming a refused command.
    """
    admins = list(admin_ids) if admin_ids is not None else [admin_id]
    desired = json.loads(render_dynsec_for(pki_dir, admins))
    control = _Control(host, port, Path(pki_dir), admin_id)
    try:
        listed = control.run([{"command": "listClients", "verbose": True, "count": -1}])
        current = listed[0].get("data", {}).get("clients", [])
        commands, result = plan_commands(desired, current)
        for response in control.run(commands):
            error = response.get("error")
            if error and error not in HARMLESS_ERRORS:
                raise MillraceError(f"broker refused {response.get('command')}: {error}")
    finally:
        control.close()
    log.info(
        "broker roles synced: added %s, removed %s, changed %s",
        result.added,
        result.removed,
        result.changed,
    )
    return result
