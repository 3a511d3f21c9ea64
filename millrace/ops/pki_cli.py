"""`millrace pki ...`: create the CA, issue and revoke certificates, renew the CRL.

Prints file paths only, never key material.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pki init|issue|revoke|renew-crl` to the millrace CLI."""
    pki = subparsers.add_parser(
        "pki", help="project CA: certificates for broker, devices, services"
    )
    sub = pki.add_subparsers(dest="pki_command", metavar="ACTION", required=True)

    init = sub.add_parser("init", help="create CA, broker certificate and CRL")
    init.add_argument("--pki", type=Path, required=True, metavar="DIR")
    init.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name or IP the broker is reached by (repeatable)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(func=_init)

    issue = sub.add_parser("issue", help="issue a client certificate: issued/ID.crt, ID.key")
    issue.add_argument("--pki", type=Path, required=True, metavar="DIR")
    issue.add_argument("id", metavar="ID")
    issue.add_argument("--role", choices=("device", "service"), default="device")
    issue.add_argument("--days", type=int, default=None, help="validity (default 1095)")
    issue.add_argument(
        "--force", action="store_true", help="issue even if ID holds a valid certificate"
    )
    issue.set_defaults(func=_issue)

    revoke = sub.add_parser("revoke", help="revoke ID's certificates and rewrite crl.pem")
    revoke.add_argument("--pki", type=Path, required=True, metavar="DIR")
    revoke.add_argument("id", metavar="ID")
    revoke.set_defaults(func=_revoke)

    renew = sub.add_parser("renew-crl", help="re-sign crl.pem with a new nextUpdate")
    renew.add_argument("--pki", type=Path, required=True, metavar="DIR")
    renew.add_argument("--days", type=int, default=None, help="validity (default 30)")
    renew.set_defaults(func=_renew_crl)


def _init(args: argparse.Namespace) -> int:
    from millrace.ops import pki

    paths = pki.init_pki(args.pki, hosts=args.host, force=args.force)
    for path in (paths.ca_cert, paths.ca_key, paths.broker_cert, paths.broker_key, paths.crl):
        print(path)
    return 0


def _issue(args: argparse.Namespace) -> int:
    from millrace.ops import pki

    days = pki.CLIENT_VALIDITY_DAYS if args.days is None else args.days
    issued = pki.issue(args.pki, args.id, role=args.role, days=days, force=args.force)
    print(issued.cert)
    print(issued.key)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from millrace.ops import pki

    serials = pki.revoke(args.pki, args.id)
    paths = pki.pki_paths(args.pki)
    print(f"revoked {args.id}: serial(s) {', '.join(format(s, 'x') for s in serials)}")
    print(paths.crl)
    print("reload the broker to apply (see docs/security.md)")
    return 0


def _renew_crl(args: argparse.Namespace) -> int:
    from millrace.ops import pki

    days = pki.CRL_VALIDITY_DAYS if args.days is None else args.days
    crl = pki.renew_crl(args.pki, days=days)
    print(crl)
    print(f"next update in {pki.crl_days_left(args.pki):.1f} days")
    return 0
