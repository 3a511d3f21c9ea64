"""`millrace broker config | sync`: write the broker's files; update a running broker's roles."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `broker config` and `broker sync` to the millrace CLI."""
    broker = subparsers.add_parser("broker", help="MQTT broker (mosquitto) configuration")
    sub = broker.add_subparsers(dest="broker_command", metavar="ACTION", required=True)

    config = sub.add_parser(
        "config",
        help="write OUT/mosquitto.conf and OUT/dynsec.json (roles of every valid identity)",
    )
    config.add_argument("--pki", type=Path, required=True, metavar="DIR")
    config.add_argument("--out", type=Path, required=True, metavar="DIR")
    config.add_argument("--port", type=int, default=8883, help="TLS listener port (8883)")
    config.add_argument("--bind", default=None, metavar="ADDR", help="listen address (all)")
    config.add_argument(
        "--persistence-dir", type=Path, default=None, metavar="DIR", help="default OUT/data"
    )
    config.add_argument(
        "--user", default=None, help="user mosquitto drops root to (default: current user)"
    )
    config.add_argument(
        "--log-file", type=Path, default=None, metavar="FILE", help="default: stdout"
    )
    config.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="ID",
        help="service identity allowed to change the roles (for `broker sync`); repeatable",
    )
    config.add_argument(
        "--any-clientid",
        action="store_true",
        help="do NOT force the client id to the certificate CN (tests only: allows takeovers)",
    )
    config.set_defaults(func=_config)

    sync = sub.add_parser(
        "sync",
        help="add new and delete revoked identities on the running broker (no restart)",
    )
    sync.add_argument("--pki", type=Path, required=True, metavar="DIR")
    sync.add_argument(
        "--host",
        action="append",
        default=None,
        metavar="HOST[:PORT]",
        help="a broker to update (localhost); repeat for each broker of the plant",
    )
    sync.add_argument("--port", type=int, default=8883, help="for a --host without a port")
    sync.add_argument(
        "--admin", required=True, metavar="ID", help="an identity passed to `config --admin`"
    )
    sync.add_argument(
        "--remember",
        action="store_true",
        help="record this broker in the PKI (broker-admin.json): `pki issue|revoke` and "
        "`provision` then apply their changes to it themselves",
    )
    sync.set_defaults(func=_sync)


def _config(args: argparse.Namespace) -> int:
    from millrace.ops.broker import write_broker_config

    files = write_broker_config(
        args.pki,
        args.out,
        port=args.port,
        bind_address=args.bind,
        persistence_dir=args.persistence_dir,
        user=args.user,
        log_file=args.log_file,
        clientid_from_certificate=not args.any_clientid,
        admin_ids=args.admin,
    )
    print(files.conf)
    print(files.dynsec)
    return 0


def _sync(args: argparse.Namespace) -> int:
    from millrace.ops import broker_live
    from millrace.ops.broker_sync import sync_running_broker

    targets = [
        broker_live.parse_admin_spec(f"{args.admin}@{host}", key="--host", default_port=args.port)
        for host in args.host or ["localhost"]
    ]
    for target in targets:
        result = sync_running_broker(
            args.pki, host=target.host, port=target.port, admin_id=target.admin
        )
        where = f"{target.host}:{target.port}: " if len(targets) > 1 else ""
        for word, names in (
            ("added", result.added),
            ("removed", result.removed),
            ("changed", result.changed),
        ):
            for name in names:
                print(f"{where}{word} {name}")
    if args.remember:
        print(f"remembered in {broker_live.remember(args.pki, *targets)}")
    return 0
