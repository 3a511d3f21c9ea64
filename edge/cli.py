"""`millrace edge run|check --config FILE`."""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from millrace.argtypes import number_in
from millrace.errors import ConfigError

if TYPE_CHECKING:
    from millrace.edge.config import AgentConfig, SignalConfig

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
    check = actions.add_parser("check", help="validate the config and read every signal once")
    check.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    check.add_argument(
        "--mqtt-wait",
        type=number_in(0.0, MAX_MQTT_WAIT_SECONDS),
        default=DEFAULT_MQTT_WAIT_SECONDS,
        metavar="SECONDS",
        help="how long to wait for a message on each mqtt signal (default %(default)s)",
    )
    check.set_defaults(func=_check)


def _run(args: argparse.Namespace) -> int:
    from millrace.edge.agent import Agent

    return Agent(_load(args)).run()


class _Collector:
    """A sink that keeps the first result per signal."""

    def __init__(self, count: int) -> None:
        self.results: list[tuple[object, str] | None] = [None] * count
        self.lock = threading.Lock()

    def reading(self, index: int, ts_ms: int, raw: object) -> None:
        with self.lock:
            if self.results[index] is None:
                self.results[index] = (raw, "")

    def failure(self, index: int, ts_ms: int, reason: str) -> None:
        with self.lock:
            if self.results[index] is None:
                self.results[index] = (None, reason)


def _shown(signal: SignalConfig, raw: object) -> tuple[str, str]:
    """(value text, problem) for a raw reading, calibrated and range-checked like the pipeline."""
    from millrace.edge.pipeline import MAX_ABS_VALUE, event_value

    if signal.kind != "numeric":
        value = event_value(signal, raw)
        return ("", f"not a {signal.kind} value: {raw!r}") if value is None else (str(value), "")
    try:
        value_f = float(raw) * signal.scale + signal.offset  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "", f"not a number: {raw!r}"
    low, high = max(signal.valid_min, -MAX_ABS_VALUE), min(signal.valid_max, MAX_ABS_VALUE)
    if math.isnan(value_f) or not low <= value_f <= high:
        return f"{value_f:g}", f"outside the valid range [{low:g}, {high:g}] (rejected)"
    return f"{value_f:g}", ""


def read_all_once(config: AgentConfig, *, mqtt_wait_s: float) -> list[tuple[object, str] | None]:
    """Read every signal once (mqtt signals: wait for one message each)."""
    from millrace.edge.drivers.mqtt import LocalMqttSource
    from millrace.edge.sampler import build_poll_groups, poll_once

    sink = _Collector(len(config.signals))
    sources = []
    for name, source in config.local_mqtt.items():
        items = [
            (i, s)
            for i, s in enumerate(config.signals)
            if s.driver == "mqtt" and s.spec.source == name  # type: ignore[union-attr]
        ]
        if items:
            src = LocalMqttSource(source, items, device_id=config.device_id, sink=sink)
            src.start()
            sources.append((src, items))
    for groups in build_poll_groups(config).values():
        for group in groups:
            poll_once(group, sink)
            group.close()
    deadline = time.monotonic() + mqtt_wait_s
    pushed = [i for src, items in sources for i, _ in items]
    while time.monotonic() < deadline and any(sink.results[i] is None for i in pushed):
        time.sleep(0.1)
    for src, items in sources:
        src.stop()
        for i, _ in items:
            if sink.results[i] is None:
                sink.results[i] = (None, f"no message within {mqtt_wait_s:g} s")
    return sink.results


def _check(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"config ok: device {config.device_id}, {len(config.signals)} signal(s)")
    results = read_all_once(config, mqtt_wait_s=args.mqtt_wait)
    width = max(len(s.metric) for s in config.signals)
    failed = 0
    for signal, result in zip(config.signals, results, strict=True):
        raw, reason = result if result is not None else (None, "not read")
        if not reason:
            value, reason = _shown(signal, raw)
        else:
            value = ""
        status = "ok" if not reason else f"FAILED: {reason}"
        failed += bool(reason)
        unit = f" {signal.unit}" if signal.unit and value else ""
        print(f"{signal.metric:<{width}}  {signal.driver:<7}  {value}{unit}  {status}")
    if failed:
        print(f"{failed} of {len(config.signals)} signal(s) could not be read")
    return 1 if failed else 0
