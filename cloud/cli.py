"""`millrace db upgrade`, `ingest`, `cmd` and `alerts`: the cloud's commands.

Heavy imports (SQLAlchemy, Alembic, paho, psycopg) happen inside the handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _db_upgrade(args: argparse.Namespace) -> int:
    from millrace.cloud.dbupgrade import upgrade

    report = upgrade(_dsn(args))
    print(
        f"schema at revision {report.revision_after} (was {report.revision_before or 'empty'});"
        f" hypertables created: {', '.join(report.hypertables_created) or 'none'};"
        f" roles created: {', '.join(report.roles_created) or 'none'}"
    )
    return 0


def _dsn(args: argparse.Namespace) -> str:
    from millrace.configfile import read_dsn_file
    from millrace.errors import ConfigError

    if args.dsn and args.dsn_file:
        raise ConfigError("--dsn", "give --dsn or --dsn-file, not both")
    if args.dsn_file:
        return read_dsn_file(Path(args.dsn_file), key="--dsn-file")
    if not args.dsn:
        raise ConfigError("--dsn", "is required (or --dsn-file)")
    return str(args.dsn)


def _ingest(args: argparse.Namespace) -> int:
    from millrace.cloud.config import load_config
    from millrace.cloud.ingest.worker import run_worker

    return run_worker(load_config(Path(args.config)))


def _cmd(args: argparse.Namespace) -> int:
    from millrace.cloud.commands import run_cmd

    return int(run_cmd(args))


def _rules_db(args: argparse.Namespace) -> Any:
    """A connection for rule administration, on the primary (a multi-host DSN reaches it as
    the worker's does, cloud/dsn.py); a dead database is exit 3, one line."""
    import psycopg

    from millrace.cloud.dsn import connect_writer
    from millrace.errors import UnreachableError

    try:
        return connect_writer(_dsn(args), connect_timeout=10)
    except psycopg.OperationalError as exc:
        first = (str(exc).strip().splitlines() or ["no answer"])[-1]
        raise UnreachableError(f"cannot reach the database: {first}") from None


def _rules_call(action: str, call: Any) -> Any:
    """Run `call()`; a database refusal becomes one line saying what to do."""
    import psycopg

    from millrace.errors import MillraceError

    try:
        return call()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise MillraceError(
            f"alerts {action}: the database user may not do this ({exc.diag.message_primary});"
            " rules are administered as the schema owner (the role that ran `db upgrade`)"
        ) from None
    except psycopg.errors.UndefinedTable:
        raise MillraceError(
            f"alerts {action}: no alert_rules table: run `millrace db upgrade` first"
        ) from None


def _alerts_apply(args: argparse.Namespace) -> int:
    from millrace.cloud.alerts.rules import load_rules_file, sync_rules

    rules = load_rules_file(Path(args.file))  # ConfigError names the key: exit 2
    if args.check:
        print(f"{args.file}: {len(rules)} rule(s), valid")
        return 0
    with _rules_db(args) as conn:
        result = _rules_call(
            "apply", lambda: sync_rules(conn, rules, disable_missing=args.disable_missing)
        )
        conn.commit()
    print(
        f"{args.file}: {len(result.added)} added, {len(result.updated)} updated,"
        f" {len(result.unchanged)} unchanged, {len(result.disabled)} disabled"
    )
    for label, names in (
        ("added", result.added),
        ("updated", result.updated),
        ("disabled", result.disabled),
    ):
        for name in names:
            print(f"  {label}: {name}")
    return 0


def _alerts_list(args: argparse.Namespace) -> int:
    import json

    from millrace.cloud.alerts.rules import list_rules

    with _rules_db(args) as conn:
        rules = _rules_call("list", lambda: list_rules(conn))
        active = dict(
            _rules_call(
                "list",
                lambda: conn.execute(
                    "SELECT rule_id, count(*) FROM alerts WHERE state = 'active' GROUP BY rule_id"
                ).fetchall(),
            )
        )
    if args.json:
        out = [
            {
                "name": r.rule.name,
                "metric": r.rule.metric,
                "devices": r.rule.devices,
                "condition": r.rule.describe(),
                "severity": r.rule.severity,
                "enabled": r.rule.enabled,
                "active_alerts": int(active.get(r.id, 0)),
            }
            for r in rules
        ]
        print(json.dumps(out, indent=2))
        return 0
    header = ("NAME", "DEVICES", "CONDITION", "SEVERITY", "ENABLED", "ACTIVE")
    rows = [
        (
            r.rule.name,
            r.rule.devices,
            r.rule.describe(),
            r.rule.severity,
            "yes" if r.rule.enabled else "no",
            str(active.get(r.id, 0)),
        )
        for r in rules
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _alerts_export(args: argparse.Namespace) -> int:
    from millrace.cloud.alerts.rules import dump_rules, list_rules

    with _rules_db(args) as conn:
        rules = _rules_call("export", lambda: list_rules(conn))
    text = dump_rules([r.rule for r in rules])
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


def _add_dsn_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="libpq connection string or URL of the schema owner")
    parser.add_argument("--dsn-file", help="read the DSN from this file (one line; keep it 0600)")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `db`, `ingest`, `cmd` and `alerts` subcommands."""
    db = subparsers.add_parser("db", help="database schema management")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = db_sub.add_parser(
        "upgrade",
        help="create or migrate the schema, hypertables and roles (idempotent)",
        description="Run the migrations to head, create hypertables and the "
        "millrace_ingest / millrace_dashboard / millrace_retention roles. Safe to re-run, also "
        "while workers run. Run it as the schema owner: a non-superuser needs CREATEROLE (or the "
        "three roles made beforehand by a superuser) and a superuser must have run CREATE "
        "EXTENSION timescaledb once; a missing privilege is named, with its fix, before "
        "anything changes (docs/deploy-by-hand.md).",
    )
    up.add_argument("--dsn", help="libpq connection string or URL of a schema owner")
    up.add_argument(
        "--dsn-file",
        help="read the DSN from this file: one line, a postgresql:// URL or key=value pairs; "
        "keep it 0600 (keeps passwords off argv)",
    )
    up.set_defaults(func=_db_upgrade)

    ingest = subparsers.add_parser(
        "ingest",
        help="run one cloud ingest worker",
        description="Consume device batches from the broker (shared subscription) and "
        "store them in TimescaleDB, acknowledging each message only after its commit.",
    )
    ingest.add_argument("--config", required=True, help="ingest TOML file (see docs/cloud.md)")
    ingest.set_defaults(func=_ingest)

    cmd = subparsers.add_parser(
        "cmd",
        help="send a command to a device and print its reply",
        description="Publish a command with an id to DEVICE and wait for the reply.",
    )
    cmd.add_argument("device", metavar="DEVICE")
    cmd.add_argument("name", metavar="NAME")
    cmd.add_argument("args", metavar="ARGS", nargs="*", help="key=value arguments")
    from millrace.cloud.commands import add_arguments  # light: argparse and the wire contract only

    add_arguments(cmd)
    cmd.set_defaults(func=_cmd)

    alerts = subparsers.add_parser(
        "alerts",
        help="alert rules: apply a rules file, list, export",
        description="Administer alert rules (docs/alerts.md). Writing rules needs the schema"
        " owner's login (the role that ran `db upgrade`), not the ingest role's.",
    )
    alerts_sub = alerts.add_subparsers(dest="alerts_command", metavar="ACTION", required=True)
    apply = alerts_sub.add_parser(
        "apply",
        help="install the rules of a TOML rules file (idempotent)",
        description="Add new rules and update changed ones; unchanged rules are not touched."
        " A mistake in the file names its key (exit 2) and changes nothing.",
    )
    apply.add_argument("file", metavar="FILE", help="rules file ([[rule]] tables)")
    apply.add_argument(
        "--disable-missing",
        action="store_true",
        help="disable stored rules the file does not name, and clear their active alerts",
    )
    apply.add_argument(
        "--check", action="store_true", help="validate the file only; no database needed"
    )
    _add_dsn_arguments(apply)
    apply.set_defaults(func=_alerts_apply)
    listing = alerts_sub.add_parser("list", help="the stored rules and their active alerts")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    _add_dsn_arguments(listing)
    listing.set_defaults(func=_alerts_list)
    export = alerts_sub.add_parser(
        "export",
        help="print the stored rules as a rules file (apply of it changes nothing)",
    )
    export.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    _add_dsn_arguments(export)
    export.set_defaults(func=_alerts_export)
