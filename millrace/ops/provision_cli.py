"""`millrace provision`: a device bundle for flashing, or an agent release for Ansible."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from millrace.errors import ConfigError
from millrace.ops import broker_live
from millrace.ops.provision_wheels import PLATFORMS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `provision` to the millrace CLI."""
    parser = subparsers.add_parser(
        "provision",
        help="a device bundle for flashing (or --release-dir: an agent release for Ansible)",
        description="Write a device bundle: agent wheel and pinned requirements, config, CA, "
        "device certificate and key (0600), systemd unit, install.sh and a sha256 manifest "
        "signed by the PKI's release key (made on first use: release.key 0600, release.pub). "
        "With --release-dir, write only the agent release that Ansible's edge_agent role ships.",
    )
    parser.add_argument("device_id", nargs="?", metavar="ID", help="the device id (cert CN)")
    parser.add_argument("--pki", type=Path, metavar="DIR", help="the PKI directory")
    parser.add_argument("--out", type=Path, metavar="FILE.tar.gz", help="the bundle to write")
    parser.add_argument(
        "--config", type=Path, metavar="TEMPLATE", help="agent config template (docs/rollout.md)"
    )
    parser.add_argument(
        "--csr", type=Path, metavar="FILE", help="sign this CSR from the device: no key in bundle"
    )
    parser.add_argument(
        "--sd", type=Path, metavar="PATH", help="also put the bundle on this mounted SD card"
    )
    parser.add_argument(
        "--broker",
        action="append",
        metavar="HOST[:PORT]",
        help="broker the agent connects to, repeated for every broker of a plant with several "
        "(default: the brokers `broker sync --remember` recorded when there are several, else "
        "the first non-loopback name on the broker certificate, else localhost; port 8883)",
    )
    parser.add_argument(
        "--wheel",
        type=Path,
        metavar="FILE",
        help="use this prebuilt gateway wheel (millrace_edge-VERSION-...whl)",
    )
    parser.add_argument(
        "--wheelhouse",
        type=Path,
        metavar="DIR",
        help="take the dependency wheels from DIR instead of downloading them for --platform",
    )
    parser.add_argument(
        "--platform",
        choices=PLATFORMS,
        help="the gateways' platform (uname -m) whose wheels the bundle carries "
        "(default: this machine's); with --release-dir: also bundle wheels for it",
    )
    parser.add_argument(
        "--force", action="store_true", help="issue a new certificate even if one is valid"
    )
    parser.add_argument(
        "--release-dir",
        type=Path,
        metavar="DIR",
        help="instead of a bundle: write wheel, requirements.txt and release.json into DIR",
    )
    parser.add_argument(
        "--cloud-wheel",
        type=Path,
        metavar="FILE",
        help="with --release-dir: the full millrace wheel for the cloud roles (default: built)",
    )
    broker_live.add_arguments(parser)
    parser.set_defaults(func=_provision)


def _broker(value: str | None) -> tuple[str | None, int]:
    """Split HOST, HOST:PORT or [IPv6]:PORT."""
    from millrace.ops.broker import DEFAULT_PORT

    if not value:
        return None, DEFAULT_PORT
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    if not host or (port and (not port.isdigit() or not 1 <= int(port) <= 65535)):
        raise ConfigError("--broker", f"{value!r}: expected HOST or HOST:PORT (port 1-65535)")
    return host, int(port) if port else DEFAULT_PORT


def _brokers(values: list[str], pki_dir: Path) -> tuple[str | None, int, list[tuple[str, int]]]:
    """(host, port) of the one broker, and every broker when the plant has several.

    Without --broker, a plant whose brokers were recorded (`millrace up --ha`, `broker sync
    --remember` with several --host) gets all of them, so its gateways can fail over.
    """
    if len(values) > 1:
        hosts = [_broker(value) for value in values]
        return None, 0, [(h, p) for h, p in hosts if h is not None]
    if values:
        host, port = _broker(values[0])
        return host, port, []
    recorded = broker_live.known_targets(pki_dir)
    if len(recorded) > 1:
        return None, 0, [(target.host, target.port) for target in recorded]
    host, port = _broker(None)
    return host, port, []


def _edge_validator() -> Callable[[str], None] | None:
    """The edge agent's own config loader when the edge package is installed here."""
    try:
        from millrace.edge.config import parse_config
    except ImportError:
        return None

    def validate(text: str) -> None:
        parse_config(text, base=Path("/etc/millrace"), source="rendered agent config")

    return validate


def _provision(args: argparse.Namespace) -> int:
    from millrace.ops import provision

    if args.cloud_wheel is not None and args.release_dir is None:
        raise ConfigError("--cloud-wheel", "only with --release-dir (bundles carry no cloud code)")
    if args.release_dir is not None:
        if args.device_id or args.out or args.csr or args.sd:
            raise ConfigError("--release-dir", "takes no ID, --out, --csr or --sd")
        release = provision.prepare_release(
            args.release_dir,
            wheel=args.wheel,
            wheelhouse=args.wheelhouse,
            cloud_wheel=args.cloud_wheel,
            platform=args.platform,
        )
        print(f"release {release.release_id} in {release.dir}")
        return 0
    for key, value in (("ID", args.device_id), ("--pki", args.pki), ("--out", args.out)):
        if not value:
            raise ConfigError(key, "required (or use --release-dir DIR)")
    csr_pem = None
    if args.csr is not None:
        try:
            csr_pem = args.csr.read_bytes()
        except OSError as exc:
            raise ConfigError("--csr", f"cannot read {args.csr}: {exc}") from exc
    host, port, hosts = _brokers(args.broker or [], args.pki)
    validator = _edge_validator()
    bundle = provision.build_bundle(
        args.device_id,
        pki_dir=args.pki,
        out=args.out,
        config_template=args.config,
        csr_pem=csr_pem,
        broker_host=host,
        broker_port=port,
        broker_hosts=hosts,
        wheel=args.wheel,
        wheelhouse=args.wheelhouse,
        force=args.force,
        validate_config=validator,
        platform=args.platform,
    )
    print(f"bundle {bundle.path}")
    print(f"sha256 {bundle.sha256}")
    print(f"release {bundle.release_id} for {bundle.platform}")
    print("key " + ("included (0600)" if bundle.has_key else "not included (signed from CSR)"))
    print(f"signed by release key {bundle.release_pub} (first install: --release-key FILE)")
    if args.sd is not None:
        result = provision.write_sd(bundle.path, args.sd, release_key=bundle.release_pub)
        print(f"sd {result.kind}: installs on first boot")
    # The device's roles on the running broker, so it can connect as soon as it is flashed.
    return broker_live.after_change(args, args.pki, revoked=False)
