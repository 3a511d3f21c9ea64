"""`millrace up | down | status`: run the whole plant on this machine."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from millrace.wire.periods import period_problem

if TYPE_CHECKING:
    from millrace.ops.stack.plant import Plant

DEFAULT_ROOT = Path(".millrace")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `up`, `down` and `status` to the millrace CLI."""
    from millrace.ops.stack.plant import PlantOptions

    defaults = PlantOptions(root=DEFAULT_ROOT)
    up = subparsers.add_parser("up", help="start the whole plant here (Ctrl-C stops it)")
    up.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="state directory (.millrace)")
    up.add_argument("--devices", type=int, default=defaults.devices, help="simulated gateways")
    up.add_argument("--detach", action="store_true", help="return once up; stop with down")
    up.add_argument(
        "--ha",
        action="store_true",
        help="two brokers, a Patroni pair with one etcd and two workers, to try failover",
    )
    for flag, value in (
        ("--broker-port", defaults.broker_port),
        ("--postgres-port", defaults.postgres_port),
        ("--dashboard-port", defaults.dashboard_port),
        ("--gateway-mqtt-port", defaults.gateway_mqtt_port),
        ("--modbus-base-port", defaults.modbus_base_port),
        ("--ingest-http-port", defaults.ingest_http_port),
    ):
        up.add_argument(flag, type=int, default=value, help=f"default {value}")
    up.add_argument("--period", type=int, default=defaults.period_s, help="window period, s")
    up.set_defaults(func=_up)

    down = subparsers.add_parser("down", help="stop a plant started with up")
    down.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    down.set_defaults(func=_down)

    status = subparsers.add_parser("status", help="what of the plant runs")
    status.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.set_defaults(func=_status)


def _up(args: argparse.Namespace) -> int:
    from millrace.errors import MillraceError
    from millrace.ops.stack.plant import (
        CRL_CHECK_INTERVAL_SECONDS,
        Plant,
        PlantOptions,
        read_state,
        running_services,
    )

    if args.devices < 1 or args.devices > 500:
        raise MillraceError("--devices: expected 1..500 simulated gateways")
    if problem := period_problem(args.period):
        raise MillraceError(f"--period: {problem}")
    state = read_state(args.root)
    if state and running_services(state):
        raise MillraceError(
            f"a plant already runs under {args.root} (millrace status); stop it with millrace down"
        )
    plant = Plant(
        PlantOptions(
            root=args.root,
            devices=args.devices,
            broker_port=args.broker_port,
            postgres_port=args.postgres_port,
            dashboard_port=args.dashboard_port,
            gateway_mqtt_port=args.gateway_mqtt_port,
            modbus_base_port=args.modbus_base_port,
            ingest_http_port=args.ingest_http_port,
            period_s=args.period,
            ha=args.ha,
        )
    )
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        password = plant.start(on_step=lambda label: print(f"  starting {label} ...", flush=True))
    except BaseException:
        print("  start-up failed; stopping what was started", file=sys.stderr, flush=True)
        plant.stop()
        raise
    summary = plant.summary("running")
    print(
        "\nmillrace plant is up\n"
        f"  dashboard  {summary['dashboard']}   login: {summary['login']['user']} / {password}\n"
        f"  broker     {' '.join(summary['brokers'])}\n"
        f"  database   {summary['dsn']}\n"
        f"  logs       {summary['logs']}\n",
        flush=True,
    )
    if args.detach:
        print(f"stop it with: millrace down --root {args.root}")
        return 0
    print("Ctrl-C stops the plant.", flush=True)
    try:
        next_crl_check = time.monotonic() + CRL_CHECK_INTERVAL_SECONDS
        while not stopping:
            time.sleep(1.0)
            if time.monotonic() >= next_crl_check:
                next_crl_check = time.monotonic() + CRL_CHECK_INTERVAL_SECONDS
                _keep_crl_fresh(plant)
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping the plant ...", flush=True)
        plant.stop()
        print("stopped.")
    return 0


def _keep_crl_fresh(plant: Plant) -> None:
    """Renew the CRL if it runs short; a failure is reported, the plant keeps running."""
    from millrace.errors import MillraceError

    try:
        if plant.keep_crl_fresh():
            print("  renewed the CRL and reloaded the broker", flush=True)
    except (MillraceError, OSError) as exc:
        print(f"millrace: warning: could not renew the CRL: {exc}", file=sys.stderr, flush=True)


def _down(args: argparse.Namespace) -> int:
    from millrace.ops.stack.plant import down

    stopped = down(args.root)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _status(args: argparse.Namespace) -> int:
    from millrace.ops.stack.plant import database_nodes, read_state, running_services

    state = read_state(args.root)
    if state is None:
        if args.json:
            print(json.dumps({"status": "absent", "dsn": None, "broker": None, "dashboard": None}))
        else:
            print(f"no plant under {args.root}; start one with millrace up")
        return 1
    alive = {s["name"] for s in running_services(state)}
    services = [{**s, "running": s["name"] in alive} for s in state.get("services", [])]
    state = {**state, "services": services}
    if state.get("database_nodes"):
        state["database_nodes"] = database_nodes(state)
    if state["status"] == "running" and len(alive) < len(services):
        state["status"] = "degraded"
    if args.json:
        print(json.dumps(state, indent=1))
    else:
        print(f"plant under {args.root}: {state['status']}")
        print(f"  {'dashboard':<10} {state['dashboard']}")
        for broker in state.get("brokers") or [state["broker"]]:
            print(f"  {'broker':<10} {broker}")
        for key in ("dsn", "logs"):
            print(f"  {key:<10} {state[key]}")
        for node in state.get("database_nodes", []):
            print(f"  database   {node['name']} port {node['port']}: {node['role'] or 'DOWN'}")
        for service in services:
            mark = "up  " if service["running"] else "DOWN"
            print(f"  {mark} {service['name']:<16} pid {service['pid']:<8} {service['log']}")
    return 0 if state["status"] == "running" else 1
