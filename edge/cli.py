"""`millrace edge run|check --config FILE`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from millrace.argtypes import number_in
from millrace.edge.sandbox import DEFAULT_UNIT
from millrace.errors import ConfigError

if TYPE_CHECKING:
    from millrace.edge.config import AgentConfig

# ESPHome/Tasmota nodes publish every 10-60 s; check waits this long for each.
DEFAULT_MQTT_WAIT_SECONDS = 15.0
MAX_MQTT_WAIT_SECONDS = 3600.0


CONFIG_ENV = "MILLRACE_EDGE_CONFIG"
DEFAULT_CONFIG_PATH = Path("/etc/millrace/agent.toml")
CONFIG_HELP = f"agent TOML file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})"


def config_path(flag: Path | None) -> tuple[Path, str]:
    """The config file to use and where its name came from: --config, the env, the default."""
    if flag is not None:
        return flag, "--config"
    from_env = os.environ.get(CONFIG_ENV, "").strip()
    if from_env:
        return Path(from_env), CONFIG_ENV
    if not DEFAULT_CONFIG_PATH.exists():
        raise ConfigError(
            "--config",
            f"not given, ${CONFIG_ENV} is not set and {DEFAULT_CONFIG_PATH} does not exist: "
            "name the agent's TOML file with one of them",
        )
    return DEFAULT_CONFIG_PATH, "--config"


def _load(args: argparse.Namespace) -> AgentConfig:
    from millrace.edge.agent import check_files
    from millrace.edge.config import load_config

    path, key = config_path(args.config)
    config = load_config(path, key=key)
    check_files(config)
    return config


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "edge",
        help="the edge agent (gateway)",
        description=f"The config file is --config, else ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH}.",
    )
    actions = parser.add_subparsers(dest="edge_action", metavar="ACTION", required=True)
    run = actions.add_parser("run", help="run the agent until SIGTERM")
    run.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    run.set_defaults(func=_run)
    check = actions.add_parser(
        "check",
        help="validate the config, ask the plant broker, read every signal once",
        description="Exit 0: all passed; 1: the broker step or a signal failed; 2: bad config.",
    )
    check.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    check.add_argument(
        "--mqtt-wait",
        type=number_in(0.0, MAX_MQTT_WAIT_SECONDS),
        default=DEFAULT_MQTT_WAIT_SECONDS,
        metavar="SECONDS",
        help="how long to wait for a message on each mqtt signal (default %(default)s)",
    )
    check.add_argument(
        "--no-broker",
        dest="broker",
        action="store_false",
        help="skip the broker step (by default: TLS handshake and CONNACK with the device's"
        " credentials, or only the handshake while the agent runs)",
    )
    check.add_argument(
        "--sandbox",
        nargs="?",
        const=DEFAULT_UNIT,
        metavar="UNIT",
        help=f"run the check as the agent's unit runs (its user and hardening, via systemd-run;"
        f" as root): the way to run it on a gateway (UNIT default {DEFAULT_UNIT})",
    )
    check.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON object (per check and per signal) on stdout",
    )
    check.set_defaults(func=_check)


def _run(args: argparse.Namespace) -> int:
    from millrace.edge.agent import Agent

    return Agent(_load(args)).run()


def _check(args: argparse.Namespace) -> int:
    from millrace.edge.check import config_failure_json, run_check

    if args.sandbox:
        return _check_in_sandbox(args)
    try:
        config = _load(args)
    except ConfigError as exc:
        if args.json:
            print(config_failure_json(exc))
        raise
    report = run_check(config, mqtt_wait_s=args.mqtt_wait, broker=args.broker)
    print(report.to_json() if args.json else report.to_text())
    return report.exit_code


def _check_in_sandbox(args: argparse.Namespace) -> int:
    """The same check, re-run by this release's Python inside the unit's sandbox."""
    from millrace.edge.sandbox import run_in_unit_sandbox

    path, _ = config_path(args.config)
    command = [sys.executable, "-m", "millrace.cli", "edge", "check"]
    command += ["--config", str(path.resolve()), f"--mqtt-wait={args.mqtt_wait}"]
    command += [
        flag for flag, on in (("--no-broker", not args.broker), ("--json", args.json)) if on
    ]
    return run_in_unit_sandbox(args.sandbox, command)
