"""`millrace pki ...`: create the CA, issue and revoke certificates, renew the CRL.

Prints file paths only, never key material.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from millrace.ops import broker_live


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pki init|issue|revoke|renew-crl|crl-status` to the millrace CLI."""
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

    issue = sub.add_parser(
        "issue", help="issue client certificates: issued/ID.crt, ID.key (several IDs: one run)"
    )
    issue.add_argument("--pki", type=Path, required=True, metavar="DIR")
    issue.add_argument(
        "ids", nargs="+", metavar="ID", help="one or more ids; many sync the broker once"
    )
    issue.add_argument("--role", choices=("device", "service"), default="device")
    issue.add_argument("--days", type=int, default=None, help="validity (default 1095)")
    issue.add_argument(
        "--force", action="store_true", help="issue even if ID holds a valid certificate"
    )
    broker_live.add_arguments(issue)
    issue.set_defaults(func=_issue)

    revoke = sub.add_parser("revoke", help="revoke ID's certificates and rewrite crl.pem")
    revoke.add_argument("--pki", type=Path, required=True, metavar="DIR")
    revoke.add_argument("id", metavar="ID")
    broker_live.add_arguments(revoke)
    revoke.set_defaults(func=_revoke)

    renew = sub.add_parser("renew-crl", help="re-sign crl.pem with a new nextUpdate")
    renew.add_argument("--pki", type=Path, required=True, metavar="DIR")
    renew.add_argument("--days", type=int, default=None, help="validity (default 30)")
    renew.add_argument(
        "--if-below",
        type=float,
        default=None,
        metavar="DAYS",
        help="renew only when fewer than DAYS days are left (for timers; e.g. 14)",
    )
    renew.set_defaults(func=_renew_crl)

    status = sub.add_parser(
        "crl-status", help="days until crl.pem's nextUpdate; exit 1 when below --warn-below"
    )
    status.add_argument("--pki", type=Path, required=True, metavar="DIR")
    status.add_argument(
        "--warn-below",
        type=float,
        default=None,
        metavar="DAYS",
        help="exit 1 when fewer days are left (default 14)",
    )
    status.add_argument(
        "--textfile",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the gauge millrace_crl_days_left to FILE (*.prom, for "
        "node_exporter's textfile collector)",
    )
    status.set_defaults(func=_crl_status)


def _init(args: argparse.Namespace) -> int:
    from millrace.ops import pki

    paths = pki.init_pki(args.pki, hosts=args.host, force=args.force)
    for path in (paths.ca_cert, paths.ca_key, paths.broker_cert, paths.broker_key, paths.crl):
        print(path)
    return 0


def _issue(args: argparse.Namespace) -> int:
    from millrace.ops import pki

    days = pki.CLIENT_VALIDITY_DAYS if args.days is None else args.days
    for issued in pki.issue_many(args.pki, args.ids, role=args.role, days=days, force=args.force):
        print(issued.cert)
        print(issued.key)
    return broker_live.after_change(args, args.pki, revoked=False)


def _revoke(args: argparse.Namespace) -> int:
    from millrace.ops import pki

    serials = pki.revoke(args.pki, args.id)
    paths = pki.pki_paths(args.pki)
    print(f"revoked {args.id}: serial(s) {', '.join(format(s, 'x') for s in serials)}")
    print(paths.crl)
    return broker_live.after_change(args, args.pki, revoked=True)


def _renew_crl(args: argparse.Namespace) -> int:
    from millrace.ops import pki

    days = pki.CRL_VALIDITY_DAYS if args.days is None else args.days
    if args.if_below is None:
        print(pki.renew_crl(args.pki, days=days))
    elif pki.renew_crl_if_below(args.pki, below_days=args.if_below, days=days):
        print(pki.pki_paths(args.pki).crl)
    else:
        print(f"not renewed: at least {args.if_below:g} days left")
    print(f"next update in {pki.crl_days_left(args.pki):.1f} days")
    return 0


def _crl_status(args: argparse.Namespace) -> int:
    """One line `crl_days_left=<days>` (a monitoring hook can parse it); 1 when too few."""
    from millrace.ops import pki

    warn_below = pki.CRL_RENEW_BELOW_DAYS if args.warn_below is None else args.warn_below
    left = pki.crl_days_left(args.pki)
    print(f"crl_days_left={left:.2f}")
    if args.textfile is not None:
        _write_textfile(args.textfile, left)
    if left < warn_below:
        print(
            f"millrace: crl.pem has {left:.1f} days left (< {warn_below:g}): run "
            f"'millrace pki renew-crl --pki {args.pki}' and reload the broker",
            file=sys.stderr,
        )
        return 1
    return 0


CRL_METRIC = "millrace_crl_days_left"


def _write_textfile(path: Path, days_left: float) -> None:
    """The gauge in Prometheus text format, written whole (the collector may read any time)."""
    from millrace.errors import PKIError
    from millrace.ops import pki

    text = (
        f"# HELP {CRL_METRIC} Days until crl.pem's nextUpdate; the broker refuses every "
        "client below 0.\n"
        f"# TYPE {CRL_METRIC} gauge\n"
        f"{CRL_METRIC} {days_left:.3f}\n"
    )
    try:
        pki.write_atomic(path, text.encode(), mode=0o644)
    except OSError as exc:
        raise PKIError(f"cannot write {path}: {exc.strerror}; check --textfile") from exc
