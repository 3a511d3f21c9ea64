"""Apply an identity issued or revoked to the running broker, at once, without a restart.

`millrace pki issue|revoke` and `millrace provision` change the PKI; the broker only
learns of it through `millrace broker sync` (its dynamic-security roles, over $CONTROL)
and, for a revocation, by re-reading crl.pem (SIGHUP). This module does both right after
the PKI change when it knows the running broker:

- `--broker-admin ID@HOST[:PORT]` on the command line (repeated for each broker of a
  plant with several), or else
- PKI_DIR/broker-admin.json, written by `millrace up` for the local plant (with the
  broker's pid and config, so a revocation also reloads the CRL there) and by
  `millrace broker sync --remember` (every `--host` it was given).

Every broker named is updated: brokers that share one authorization must all learn
of a change, or a gateway that fails over is refused where it lands.

Without either it says in one line that `millrace broker sync` must be run. A broker
that is known but cannot be updated is reported in one line too; the PKI change stands.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from millrace.configfile import parse_endpoint
from millrace.errors import ConfigError, MillraceError
from millrace.ops import pki
from millrace.ops.broker import DEFAULT_PORT

log = logging.getLogger(__name__)

RECORD_NAME: Final = "broker-admin.json"
# Exit code when the PKI changed but the known broker could not be updated (errors.py:
# "a service it needs did not answer").
EXIT_NOT_APPLIED: Final = 3


@dataclass(frozen=True, slots=True)
class BrokerTarget:
    """A running broker and the admin identity (`broker config --admin`) that changes it."""

    host: str
    port: int
    admin: str
    # Only for a broker on this machine: its pid and config, so a revocation can make it
    # re-read crl.pem (SIGHUP). Without them the dynsec change alone applies at once.
    pid: int | None = None
    conf: str | None = None

    def sync_command(self, pki_dir: Path | str) -> str:
        return (
            f"millrace broker sync --pki {pki_dir} --host {self.host} --port {self.port}"
            f" --admin {self.admin}"
        )


def record_path(pki_dir: Path | str) -> Path:
    return pki.pki_paths(pki_dir).dir / RECORD_NAME


def remember(pki_dir: Path | str, *targets: BrokerTarget) -> Path:
    """Record `targets` as the brokers that take this PKI's changes (no secret: 0644).

    One broker is written as one object (the format before several brokers), several
    as `{"brokers": [...]}`.
    """
    path = record_path(pki_dir)
    items = [{k: v for k, v in asdict(t).items() if v is not None} for t in targets]
    data: Any = items[0] if len(items) == 1 else {"brokers": items}
    pki.write_atomic(path, (json.dumps(data, indent=1) + "\n").encode(), mode=0o644)
    return path


def forget(pki_dir: Path | str) -> None:
    record_path(pki_dir).unlink(missing_ok=True)


def parse_admin_spec(
    value: str, *, key: str = "--broker-admin", default_port: int = DEFAULT_PORT
) -> BrokerTarget:
    """`ID@HOST`, `ID@HOST:PORT` or `ID@[IPv6]:PORT`."""
    ident, at, address = value.partition("@")
    hint = "expected ID@HOST[:PORT], e.g. operator@broker.plant.example:8883"
    if not at or not ident or not address:
        raise ConfigError(key, f"{value!r}: {hint}")
    try:
        pki.validate_id(ident)
    except MillraceError as exc:
        raise ConfigError(key, f"{value!r}: {exc} ({hint})") from None
    endpoint = parse_endpoint(address, default_port=default_port)
    if endpoint is None:
        raise ConfigError(key, f"{value!r}: {hint} (port 1-65535)")
    return BrokerTarget(host=endpoint[0], port=endpoint[1], admin=ident)


def known_target(pki_dir: Path | str) -> BrokerTarget | None:
    """The (first) broker recorded in PKI_DIR/broker-admin.json, or None."""
    targets = known_targets(pki_dir)
    return targets[0] if targets else None


def known_targets(pki_dir: Path | str) -> list[BrokerTarget]:
    """Every broker recorded in PKI_DIR/broker-admin.json (none: empty)."""
    path = record_path(pki_dir)
    try:
        data: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), f"unreadable ({exc}); fix or delete it") from None
    try:
        items = data.get("brokers", [data])
        return [_target(item) for item in items]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(
            str(path), f"needs host, port and admin ({exc!r}); fix or delete it"
        ) from None


def _target(data: Any) -> BrokerTarget:
    pid, conf = data.get("pid"), data.get("conf")
    return BrokerTarget(
        host=str(data["host"]),
        port=int(data["port"]),
        admin=str(data["admin"]),
        pid=int(pid) if pid is not None else None,
        conf=str(conf) if conf is not None else None,
    )


def _local_broker_running(target: BrokerTarget) -> bool | None:
    """Whether the recorded local broker still runs (None: not a local record).

    The pid must still be a mosquitto started with the recorded config, so a reused
    pid is never signalled.
    """
    if target.pid is None:
        return None
    try:
        argv = Path(f"/proc/{target.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    names = [Path(a.decode(errors="replace")).name for a in argv[:1]]
    if names != ["mosquitto"]:
        return False
    return target.conf is None or target.conf.encode() in argv


@dataclass(frozen=True, slots=True)
class Applied:
    """What `apply_change` did: lines to print, and whether the broker has the change."""

    lines: tuple[str, ...]
    applied: bool
    known: bool


def apply_change(
    pki_dir: Path | str,
    *,
    option: str | Sequence[str] | None = None,
    revoked: bool = False,
    sync: Callable[..., Any] | None = None,
) -> Applied:
    """Sync every running broker's roles with the PKI; after a revocation reload their CRL.

    `option` is the command's --broker-admin value(s) (they win over the record). Never
    raises for an unreachable broker: the caller prints the lines and picks the exit code.
    Applied only if every broker took the change.
    """
    options = [option] if isinstance(option, str) else list(option or ())
    targets = [parse_admin_spec(o) for o in options] or known_targets(pki_dir)
    if not targets:
        return Applied(
            (
                f"broker: none known for {pki_dir}: run 'millrace broker sync --pki {pki_dir}"
                " --admin ID --host HOST --port PORT' to apply this to the running broker"
                " (or pass --broker-admin ID@HOST:PORT)",
            ),
            applied=False,
            known=False,
        )
    outcomes = [_apply_one(pki_dir, t, revoked=revoked, sync=sync) for t in targets]
    return Applied(
        tuple(line for o in outcomes for line in o.lines),
        applied=all(o.applied for o in outcomes),
        known=True,
    )


def _apply_one(
    pki_dir: Path | str,
    target: BrokerTarget,
    *,
    revoked: bool,
    sync: Callable[..., Any] | None,
) -> Applied:
    local = _local_broker_running(target)
    if local is False:
        return Applied(
            (
                f"broker: the local broker recorded in {record_path(pki_dir)} (pid"
                f" {target.pid}) is not running; it takes the PKI's identities when it starts",
            ),
            applied=True,
            known=True,
        )
    if sync is None:
        from millrace.ops.broker_sync import sync_running_broker

        sync = sync_running_broker
    where = f"{target.host}:{target.port}"
    try:
        result = sync(pki_dir, host=target.host, port=target.port, admin_id=target.admin)
    except (MillraceError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Applied(
            (
                f"broker: {where} NOT updated ({reason}): run"
                f" '{target.sync_command(pki_dir)}' to apply this",
            ),
            applied=False,
            known=True,
        )
    lines = [
        f"broker: {where} {word} {name}"
        for word, names in (
            ("added", result.added),
            ("removed", result.removed),
            ("changed", result.changed),
        )
        for name in names
    ]
    if not lines:
        lines.append(f"broker: {where} already up to date")
    if revoked:
        if local:
            assert target.pid is not None
            os.kill(target.pid, signal.SIGHUP)
            lines.append(
                f"broker: {where} (pid {target.pid}) reloaded: it re-reads crl.pem, so the"
                " revoked certificate's next connection is refused"
            )
        else:
            lines.append(
                f"broker: {where} refuses the revoked identity everything now; it refuses"
                " its connections once the broker has re-read crl.pem (copy it, reload)"
            )
    return Applied(tuple(lines), applied=True, known=True)


def add_arguments(parser: Any) -> None:
    """--broker-admin and --no-broker-sync, for commands that issue or revoke."""
    parser.add_argument(
        "--broker-admin",
        metavar="ID@HOST[:PORT]",
        action="append",
        default=None,
        help="apply the change to this running broker as admin ID; repeat for each broker "
        f"(default: the brokers recorded in the PKI's {RECORD_NAME}, e.g. by `millrace up`)",
    )
    parser.add_argument(
        "--no-broker-sync",
        action="store_true",
        help="change only the PKI; run `millrace broker sync` later",
    )


def after_change(args: Any, pki_dir: Path | str, *, revoked: bool) -> int:
    """Apply the PKI change to the running broker per the CLI options; print; exit code."""
    import sys

    if args.no_broker_sync:
        if args.broker_admin:
            raise ConfigError("--no-broker-sync", "not together with --broker-admin")
        print(f"broker: not updated (--no-broker-sync): run 'millrace broker sync --pki {pki_dir}'")
        return 0
    outcome = apply_change(pki_dir, option=args.broker_admin, revoked=revoked)
    stream = sys.stdout if outcome.applied else sys.stderr
    for line in outcome.lines:
        print(line, file=stream)
    return EXIT_NOT_APPLIED if outcome.known and not outcome.applied else 0
