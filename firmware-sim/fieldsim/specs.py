"""Signal specifications: what a simulated device serves and how its model behaves."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from millrace.errors import ConfigError
from millrace.fieldsim.const import DEFAULT_RESOLUTION_SECONDS

SignalKind = Literal["analog", "counter", "state"]
Derive = Literal["machine_state", "running"]
Table = Literal["holding", "input", "coil"]
RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32", "bool"]
WordOrder = Literal["big", "little"]

REGISTER_WORDS: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "bool": 1,
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Parameters of one signal's deterministic model (see plc_map.toml)."""

    level: float = 0.0
    level_spread: float = 0.0
    trend_per_day: float = 0.0
    trend_period_days: float = 7.0
    daily_amplitude: float = 0.0
    daily_peak_hour: float = 0.0
    noise: float = 0.0
    step: float = 0.0
    step_every_s: float = 3600.0
    idle_factor: float = 1.0
    minimum: float | None = None
    maximum: float | None = None
    rate: float = 0.0
    wrap: float | None = None
    derive: Derive | None = None


@dataclass(frozen=True, slots=True)
class SignalSpec:
    """One signal: its name, unit, valid range and model; protocol details live alongside."""

    name: str
    unit: str
    kind: SignalKind = "analog"
    valid_min: float = float("-inf")
    valid_max: float = float("inf")
    resolution_s: float = DEFAULT_RESOLUTION_SECONDS
    model: ModelSpec = field(default_factory=ModelSpec)

    @property
    def valid_span(self) -> float:
        """Width of the valid range, used to size spikes and out-of-range values."""
        span = self.valid_max - self.valid_min
        return span if span > 0 and span != float("inf") else 1.0


@dataclass(frozen=True, slots=True)
class RegisterSignal:
    """A PLC signal and where it sits in the Modbus register map."""

    spec: SignalSpec
    table: Table
    address: int
    type: RegisterType
    word_order: WordOrder = "big"
    scale: float = 1.0
    states: tuple[tuple[int, str], ...] = ()

    @property
    def words(self) -> int:
        """Registers (or coils) this value occupies."""
        return REGISTER_WORDS[self.type]


@dataclass(frozen=True, slots=True)
class JsonSignal:
    """An MQTT node field: `path` is its dotted JSON field path."""

    spec: SignalSpec
    path: str
    decimals: int = 2


@dataclass(frozen=True, slots=True)
class FileSignal:
    """A 1-wire reading: the file holds raw value (t=...) times `scale` in spec.unit."""

    spec: SignalSpec
    scale: float = 0.001


@dataclass(frozen=True, slots=True)
class PlcMap:
    """The whole PLC register map as loaded from plc_map.toml."""

    unit_id: int
    resolution_s: float
    signals: tuple[RegisterSignal, ...]


@dataclass(frozen=True, slots=True)
class SensorSpecs:
    """Signals of the MQTT sensor node and of the 1-wire sensor."""

    mqtt: tuple[JsonSignal, ...]
    w1: tuple[FileSignal, ...]


def spec_info(spec: SignalSpec) -> dict[str, Any]:
    """The reader-facing part of a spec, JSON-ready (an open range end is null)."""
    return {
        "name": spec.name,
        "unit": spec.unit,
        "kind": spec.kind,
        "valid_min": spec.valid_min if math.isfinite(spec.valid_min) else None,
        "valid_max": spec.valid_max if math.isfinite(spec.valid_max) else None,
        "resolution_s": spec.resolution_s,
    }


PLC_MAP_FILE = "plc_map.toml"
SENSORS_FILE = "sensors.toml"


def _read_toml(path: Path | None, default_name: str) -> tuple[dict[str, Any], str]:
    if path is None:
        text = (
            resources.files("millrace.fieldsim").joinpath(default_name).read_text(encoding="utf-8")
        )
        source = default_name
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("file", f"cannot read: {exc.strerror}", source=str(path)) from exc
        source = str(path)
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("file", f"not valid TOML: {exc}", source=source) from exc


def _model(raw: dict[str, Any], key: str, source: str, *, wrap: float | None) -> ModelSpec:
    known = set(ModelSpec.__slots__)
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(key, f"unknown model field(s) {sorted(unknown)}", source=source)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "derive":
            if value not in get_args(Derive):
                raise ConfigError(
                    f"{key}.derive", f"must be one of {get_args(Derive)}", source=source
                )
            values[name] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            values[name] = float(value)
        else:
            raise ConfigError(f"{key}.{name}", "must be a number", source=source)
    if wrap is not None and "wrap" not in values:
        values["wrap"] = wrap
    return ModelSpec(**values)


def _spec(
    raw: dict[str, Any], key: str, source: str, *, resolution_s: float, wrap: float | None = None
) -> SignalSpec:
    try:
        name = str(raw["name"])
    except KeyError as exc:
        raise ConfigError(f"{key}.name", "is required", source=source) from exc
    kind = raw.get("kind", "analog")
    if kind not in get_args(SignalKind):
        raise ConfigError(f"{key}.kind", f"must be one of {get_args(SignalKind)}", source=source)
    model = _model(
        raw.get("model", {}), f"{key}.model", source, wrap=wrap if kind == "counter" else None
    )
    if kind == "state" and model.derive is None:
        raise ConfigError(f"{key}.model.derive", "is required for kind = state", source=source)
    return SignalSpec(
        name=name,
        unit=str(raw.get("unit", "")),
        kind=kind,
        valid_min=float(raw.get("valid_min", float("-inf"))),
        valid_max=float(raw.get("valid_max", float("inf"))),
        resolution_s=float(raw.get("resolution_s", resolution_s)),
        model=model,
    )


def _choice(
    raw: dict[str, Any],
    name: str,
    allowed: tuple[str, ...],
    key: str,
    source: str,
    default: str | None = None,
) -> Any:
    value = raw.get(name, default)
    if value not in allowed:
        raise ConfigError(f"{key}.{name}", f"must be one of {allowed}", source=source)
    return value


def load_plc_map(path: Path | None = None) -> PlcMap:
    """Load a PLC register map; None loads the packaged plc_map.toml."""
    data, source = _read_toml(path, PLC_MAP_FILE)
    plc = data.get("plc", {})
    resolution_s = float(plc.get("resolution_s", DEFAULT_RESOLUTION_SECONDS))
    signals: list[RegisterSignal] = []
    taken: dict[tuple[str, int], str] = {}
    for index, raw in enumerate(data.get("signal", [])):
        key = f"signal[{index}]"
        table = _choice(raw, "table", get_args(Table), key, source)
        reg_type = _choice(raw, "type", get_args(RegisterType), key, source)
        if (table == "coil") != (reg_type == "bool"):
            raise ConfigError(f"{key}.type", "bool is for coils and coils are bool", source=source)
        word_order = _choice(raw, "word_order", get_args(WordOrder), key, source, "big")
        scale = float(raw.get("scale", 1.0))
        if scale <= 0:
            raise ConfigError(f"{key}.scale", "must be > 0", source=source)
        address = int(raw.get("address", -1))
        if not 0 <= address <= 65535:
            raise ConfigError(f"{key}.address", "must be 0..65535", source=source)
        bits = 16 * REGISTER_WORDS[reg_type]
        wrap = float(2**bits) * scale if reg_type.startswith("uint") else None
        spec = _spec(raw, key, source, resolution_s=resolution_s, wrap=wrap)
        for offset in range(REGISTER_WORDS[reg_type]):
            slot = (table, address + offset)
            if slot in taken:
                raise ConfigError(
                    f"{key}.address", f"overlaps {taken[slot]} in table {table}", source=source
                )
            taken[slot] = spec.name
        states = tuple(sorted((int(k), str(v)) for k, v in raw.get("states", {}).items()))
        signals.append(RegisterSignal(spec, table, address, reg_type, word_order, scale, states))
    names = [s.spec.name for s in signals]
    if len(set(names)) != len(names):
        raise ConfigError("signal.name", "names must be unique", source=source)
    if not signals:
        raise ConfigError("signal", "the map has no signals", source=source)
    return PlcMap(int(plc.get("unit_id", 1)), resolution_s, tuple(signals))


def load_sensor_specs(path: Path | None = None) -> SensorSpecs:
    """Load the MQTT node and 1-wire signals; None loads the packaged sensors.toml."""
    data, source = _read_toml(path, SENSORS_FILE)
    mqtt_section = data.get("mqtt", {})
    mqtt_res = float(mqtt_section.get("resolution_s", DEFAULT_RESOLUTION_SECONDS))
    mqtt = tuple(
        JsonSignal(
            _spec(raw, f"mqtt.signal[{i}]", source, resolution_s=mqtt_res),
            path=str(raw.get("path", raw.get("name"))),
            decimals=int(raw.get("decimals", 2)),
        )
        for i, raw in enumerate(mqtt_section.get("signal", []))
    )
    w1_section = data.get("w1", {})
    w1_res = float(w1_section.get("resolution_s", DEFAULT_RESOLUTION_SECONDS))
    w1 = tuple(
        FileSignal(
            _spec(raw, f"w1.signal[{i}]", source, resolution_s=w1_res),
            scale=float(raw.get("scale", 0.001)),
        )
        for i, raw in enumerate(w1_section.get("signal", []))
    )
    if len(w1) != 1:
        raise ConfigError("w1.signal", "a DS18B20 serves exactly one signal", source=source)
    return SensorSpecs(mqtt, w1)
