"""`millrace broker config`: write mosquitto.conf and the ACL for a PKI directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `broker config` to the millrace CLI."""
    broker = subparsers.add_parser("broker", help="MQTT broker (mosquitto) configuration")
    sub = broker.add_subparsers(dest="broker_command", metavar="ACTION", required=True)

    config = sub.add_parser(
        "config",
        help="write OUT/mosquitto.conf and OUT/acl (re-run after issuing a service cert)",
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
        "--clientid-from-cert",
        action="store_true",
        help="force the MQTT client id to the certificate CN (one cert per connection)",
    )
    config.set_defaults(func=_config)


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
        clientid_from_certificate=args.clientid_from_cert,
    )
    print(files.conf)
    print(files.acl)
    return 0
