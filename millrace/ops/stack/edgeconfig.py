"""Edge agent configs for simulated gateways, generated from the fleet manifest.

The simulator's manifest (firmware-sim/README.md) says which PLC, MQTT node and
1-wire folder belong to a gateway; this turns one gateway into the TOML the
edge agent reads (docs/edge.md). The platform learns about simulated devices
only from that file, never by importing the simulator.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from millrace.errors import ConfigError

# The simulator changes values once a second; polling at that rate serves every value once.
POLL_SECONDS = 1.0
# Late readings are accepted this long after a window ends (at most half a period).
GRACE_SECONDS = 2.0
_EDGE_TYPES = frozenset({"int16", "uint16", "int32", "uint32", "float32"})


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    """The plant broker a gateway publishes to, and the gateway's TLS identity."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    # Every broker of a plant with several ("host:port"): the agent spreads over them.
    hosts: tuple[str, ...] = ()


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, Mapping):
        pairs = (f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _table(header: str, values: Mapping[str, object]) -> list[str]:
    lines = [f"[{header}]"]
    lines += [f"{key} = {_toml(value)}" for key, value in values.items() if value is not None]
    return [*lines, ""]


def _common(signal: Mapping[str, Any], metric: str) -> dict[str, object]:
    return {
        "metric": metric,
        "unit": signal.get("unit") or None,
        "poll_s": POLL_SECONDS,
        "valid_min": signal.get("valid_min"),
        "valid_max": signal.get("valid_max"),
    }


def _plc_signals(device: Mapping[str, Any], source: str) -> Iterable[dict[str, object]]:
    rtu = device["kind"] == "rtu"
    for signal in device["signals"]:
        entry = _common(signal, f"{device['kind']}.{signal['name']}")
        if rtu:
            entry.update(driver="modbus_rtu", bus=source, unit_id=device["unit_id"])
        else:
            entry.update(driver="modbus", device=source)
        entry["table"] = signal["table"]
        entry["address"] = signal["address"]
        if signal["table"] not in ("coil", "discrete"):
            if signal["type"] not in _EDGE_TYPES:
                raise ConfigError(f"{device['id']}.{signal['name']}.type", "not readable by edge")
            entry.update(type=signal["type"], word_order=signal["word_order"])
            entry["scale"] = signal.get("scale", 1.0)
        if signal.get("kind") == "state":
            kind = "state" if signal["table"] in ("coil", "discrete") else "enum"
            entry.update(kind=kind, valid_min=None, valid_max=None, unit=None)
            if kind == "enum":
                entry["states"] = dict(signal.get("states") or {})
        yield entry


def _opcua_signals(device: Mapping[str, Any], source: str) -> Iterable[dict[str, object]]:
    for signal in device["signals"]:
        entry = _common(signal, f"opcua.{signal['name']}")
        entry.update(driver="opcua", server=source, node=signal["node"])
        if signal.get("kind") == "state":
            kind = "state" if signal.get("type") == "bool" else "enum"
            entry.update(kind=kind, valid_min=None, valid_max=None, unit=None)
            if kind == "enum":
                entry["states"] = dict(signal.get("states") or {})
        yield entry


def _node_signals(device: Mapping[str, Any], source: str) -> Iterable[dict[str, object]]:
    for signal in device["signals"]:
        entry = _common(signal, f"node.{signal['name']}")
        entry.update(driver="mqtt", source=source, topic=device["topic"], field=signal["path"])
        entry["poll_s"] = None  # pushed by the node, not polled
        yield entry


def _w1_signals(device: Mapping[str, Any]) -> Iterable[dict[str, object]]:
    for signal in device["signals"]:
        entry = _common(signal, f"w1.{signal['name']}")
        entry.update(driver="file", path=device["path"], format="w1_slave")
        yield entry


def edge_config_toml(
    *,
    gateway_id: str,
    devices: Iterable[Mapping[str, Any]],
    broker: BrokerEndpoint,
    state_dir: Path,
    period_s: int = 10,
    heartbeat_s: float = 30.0,
) -> str:
    """The edge agent's TOML for one simulated gateway and its field devices."""
    lines = [
        f"# Generated by millrace for simulated gateway {gateway_id}; edits are overwritten.",
        f"device_id = {_toml(gateway_id)}",
        "",
    ]
    lines += _table(
        "broker",
        {
            "host": None if broker.hosts else broker.host,
            "port": None if broker.hosts else broker.port,
            "hosts": list(broker.hosts) or None,
            "ca": broker.ca,
            "cert": broker.cert,
            "key": broker.key,
        },
    )
    lines += _table("windows", {"period_s": period_s, "grace_s": min(GRACE_SECONDS, period_s / 2)})
    lines += _table("outbox", {"path": state_dir / "outbox.sqlite"})
    lines += _table("heartbeat", {"interval_s": heartbeat_s})
    lines += _table("state", {"dir": state_dir / "state"})
    signals: list[dict[str, object]] = []
    for device in devices:
        source = device["id"].replace(".", "_")
        if device["kind"] == "plc":
            lines += _table(
                f"modbus.{source}",
                {
                    "host": device["host"],
                    "port": device["port"],
                    "unit_id": device["unit_id"],
                    "timeout_s": 1.0,
                },
            )
            signals += _plc_signals(device, source)
        elif device["kind"] == "rtu":
            lines += _table(
                f"modbus_rtu.{source}",
                {"port": device["port"], "baudrate": device["baudrate"], "timeout_s": 0.5},
            )
            signals += _plc_signals(device, source)
        elif device["kind"] == "opcua":
            lines += _table(
                f"opcua.{source}",
                {
                    "endpoint": device["endpoint"],
                    "cert": device["cert"],
                    "key": device["key"],
                    "server_cert": device["server_cert"],
                },
            )
            signals += _opcua_signals(device, source)
        elif device["kind"] == "mqtt":
            endpoint = {"host": device["host"], "port": device["port"]}
            lines += _table(f"local_mqtt.{source}", endpoint)
            signals += _node_signals(device, source)
        elif device["kind"] == "w1":
            signals += _w1_signals(device)
    for signal in signals:
        lines += _table("[signals]", signal)
    return "\n".join(lines)


def gateways_from_manifest(manifest: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    """Gateway id -> its field devices, as the manifest lists them."""
    by_gateway: dict[str, list[Mapping[str, Any]]] = {}
    for device in manifest.get("devices", []):
        by_gateway.setdefault(device["gateway"], []).append(device)
    return by_gateway
