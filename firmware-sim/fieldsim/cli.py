"""`millrace sim`: run a fleet of simulated field devices (also `python -m millrace.fieldsim`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from millrace.errors import ConfigError
from millrace.fieldsim.const import (
    DEFAULT_BASE_PORT,
    DEFAULT_GATEWAY_PREFIX,
    DEFAULT_HOST,
    DEFAULT_MQTT_PORT,
    DEFAULT_TOPIC_PREFIX,
)

if TYPE_CHECKING:
    from millrace.fieldsim.fleet import DeviceKind, FleetConfig

_EPILOG = """\
faults: --fault TARGET:KIND[@START_S][+DURATION_S] (repeatable), TARGET a device
(gw0002-plc), a gateway (gw0002) or *; KIND one of stuck, spike, nan,
out_of_range, dropout, slow, refused, garbage, bad_crc. --faults FILE takes a
TOML schedule of [[fault]] tables (target, kind, start_s, duration_s, delay_s,
signals). See firmware-sim/README.md.
"""


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=1, help="simulated gateways (default 1)")
    parser.add_argument("--kinds", default="plc,mqtt,w1", help="device kinds per gateway")
    parser.add_argument("--seed", type=int, default=0, help="model seed (default 0)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address the PLCs listen on")
    parser.add_argument(
        "--base-port", type=int, default=DEFAULT_BASE_PORT, help="first PLC's Modbus TCP port"
    )
    parser.add_argument("--mqtt-host", default=DEFAULT_HOST, help="gateway-local broker host")
    parser.add_argument("--mqtt-port", type=int, default=DEFAULT_MQTT_PORT, help="its port")
    parser.add_argument("--topic-prefix", default=DEFAULT_TOPIC_PREFIX, help="MQTT topic prefix")
    parser.add_argument(
        "--gateway-prefix", default=DEFAULT_GATEWAY_PREFIX, help="gateway ids: PREFIX0001, ..."
    )
    parser.add_argument("--w1-dir", type=Path, help="root of the 1-wire folders (default: temp)")
    parser.add_argument(
        "--manifest", type=Path, help="JSON manifest to write (default ./fieldsim-manifest.json)"
    )
    parser.add_argument("--ground-truth", type=Path, help="CSV log of every served value")
    parser.add_argument("--faults", type=Path, help="TOML fault schedule")
    parser.add_argument("--fault", action="append", default=[], help="one fault (repeatable)")
    parser.add_argument("--replay", type=Path, help="CSV (timestamp,signal,value[,device])")
    parser.add_argument("--replay-speed", type=float, default=1.0, help="replay speed factor")
    parser.add_argument(
        "--no-replay-loop", action="store_true", help="hold the last row at the end"
    )
    parser.add_argument(
        "--plc-map", type=Path, help="register map (default: packaged plc_map.toml)"
    )
    parser.add_argument("--sensors", type=Path, help="node/1-wire signals (default: sensors.toml)")
    parser.add_argument(
        "--rtu",
        type=int,
        default=0,
        metavar="N",
        help="the first N gateways also get a Modbus RTU PLC on a pseudo-terminal (default 0)",
    )
    parser.add_argument(
        "--opcua",
        type=int,
        default=0,
        metavar="N",
        help="the first N gateways also get a PLC on an OPC UA server (Basic256Sha256),"
        " on --opcua-base-port + i (default 0)",
    )
    parser.add_argument(
        "--opcua-base-port", type=int, default=14840, metavar="PORT", help="default 14840"
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `millrace sim`."""
    parser = subparsers.add_parser(
        "sim",
        help="simulated field devices (Modbus PLC, MQTT nodes, 1-wire)",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    """Build a FleetConfig from parsed arguments (errors name the flag)."""
    from millrace.fieldsim.faults import load_fault_file, parse_fault_flag
    from millrace.fieldsim.fleet import DEVICE_KINDS, FleetConfig

    kinds: list[DeviceKind] = []
    for text in str(args.kinds).split(","):
        kind = next((k for k in DEVICE_KINDS if k == text.strip()), None)
        if kind is None:
            raise ConfigError("--kinds", f"{text.strip()!r} is not one of {','.join(DEVICE_KINDS)}")
        kinds.append(kind)
    faults = [*load_fault_file(args.faults)] if args.faults else []
    faults.extend(parse_fault_flag(text) for text in args.fault)
    return FleetConfig(
        devices=args.devices,
        kinds=tuple(kinds),
        seed=args.seed,
        host=args.host,
        base_port=args.base_port,
        mqtt_host=args.mqtt_host,
        mqtt_port=args.mqtt_port,
        topic_prefix=args.topic_prefix,
        gateway_prefix=args.gateway_prefix,
        rtu_gateways=args.rtu,
        opcua_gateways=args.opcua,
        opcua_base_port=args.opcua_base_port,
        w1_dir=args.w1_dir,
        manifest=args.manifest,
        ground_truth=args.ground_truth,
        faults=tuple(faults),
        replay=args.replay,
        replay_speed=args.replay_speed,
        replay_loop=not args.no_replay_loop,
        plc_map=args.plc_map,
        sensors=args.sensors,
    )


def run(args: argparse.Namespace) -> int:
    """Run the fleet until SIGTERM or SIGINT; exit 0 after a clean stop."""
    import asyncio
    import signal

    from millrace.fieldsim.fleet import Fleet

    config = config_from_args(args)

    async def main() -> None:
        fleet = Fleet(config)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, fleet.request_stop)
        await fleet.run()

    asyncio.run(main())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (`python -m millrace.fieldsim`, firmware-sim/run.py)."""
    import logging
    import os

    from millrace.errors import MillraceError

    parser = argparse.ArgumentParser(
        prog="fieldsim",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default=os.environ.get("MILLRACE_LOG_LEVEL", "INFO"))
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(args)
    except MillraceError as exc:
        print(f"fieldsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
