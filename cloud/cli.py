"""`millrace db upgrade`, `millrace ingest` and `millrace cmd`: the cloud's commands.

Heavy imports (SQLAlchemy, Alembic, paho, psycopg) happen inside the handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path


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


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `db`, `ingest` and `cmd` subcommands."""
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
