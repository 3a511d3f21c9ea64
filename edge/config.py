"""The agent's configuration: one TOML file, one loader, one frozen typed result.

Every problem raises `ConfigError` naming the exact key (`signals[3].scale`)
so a bad file never starts a half-working agent. Relative paths are resolved
against the directory of the config file, so generated bundles can be moved.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, get_args

from millrace.errors import ConfigError
from millrace.ids import DEVICE_ID_RULE, METRIC_NAME_RULE, is_device_id, is_metric_name
from millrace.wire.batch import MAX_PERIOD_SECONDS

DriverName = Literal["modbus", "mqtt", "file", "command", "sim"]
SignalKind = Literal["numeric", "state", "enum"]
ModbusTable = Literal["holding", "input", "coil", "discrete"]
ModbusType = Literal["int16", "uint16", "int32", "uint32", "float32"]
ByteOrder = Literal["big", "little"]
FileFormat = Literal["number", "w1_slave"]
SimWave = Literal["sine", "ramp", "square", "noise", "constant", "steps"]
Encoding = Literal["msgpack", "json"]

DEFAULT_BROKER_PORT: Final = 8883
DEFAULT_MODBUS_PORT: Final = 502
DEFAULT_LOCAL_MQTT_PORT: Final = 1883
DEFAULT_PERIOD_SECONDS: Final = 10
DEFAULT_GRACE_SECONDS: Final = 2.0
# A week of 10 s windows for 100 metrics is ~40 MB; 100 MB leaves headroom on any SD card.
DEFAULT_OUTBOX_MAX_BYTES: Final = 100 * 1024 * 1024
DEFAULT_OUTBOX_MAX_AGE_SECONDS: Final = 7 * 24 * 3600
DEFAULT_HEARTBEAT_SECONDS: Final = 30.0
DEFAULT_POLL_SECONDS: Final = 1.0
MAX_OUTBOX_AGE_SECONDS: Final = 10 * 365 * 86400
MIN_POLL_SECONDS: Final = 0.001
MAX_POLL_SECONDS: Final = 86_400.0


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """The plant broker the agent publishes to (mutual TLS, always)."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    keepalive_s: int = 30
    encoding: Encoding = "msgpack"
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    backlog_batches_per_s: float = 20.0
    max_inflight: int = 20


@dataclass(frozen=True, slots=True)
class WindowsConfig:
    """Tumbling windows: the main period, optional extra periods, grace for late readings."""

    period_s: int = DEFAULT_PERIOD_SECONDS
    extra_periods_s: tuple[int, ...] = ()
    grace_s: float = DEFAULT_GRACE_SECONDS

    @property
    def periods_s(self) -> tuple[int, ...]:
        """Every period windows are kept for, main period first, no repeats."""
        return tuple(dict.fromkeys((self.period_s, *self.extra_periods_s)))


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    """The durable SQLite outbox and its caps."""

    path: Path
    max_bytes: int = DEFAULT_OUTBOX_MAX_BYTES
    max_age_s: int = DEFAULT_OUTBOX_MAX_AGE_SECONDS


@dataclass(frozen=True, slots=True)
class ModbusDevice:
    """A Modbus TCP server (PLC, gateway) that modbus signals read from."""

    name: str
    host: str
    port: int = DEFAULT_MODBUS_PORT
    unit_id: int = 1
    timeout_s: float = 1.0


@dataclass(frozen=True, slots=True)
class LocalMqtt:
    """A local MQTT broker field nodes (ESPHome, Tasmota) publish to."""

    name: str
    host: str
    port: int = DEFAULT_LOCAL_MQTT_PORT
    client_id: str = ""
    username: str = ""
    password_file: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class ModbusSpec:
    device: str
    table: ModbusTable
    address: int
    type: ModbusType = "uint16"
    byte_order: ByteOrder = "big"
    word_order: ByteOrder = "big"

    @property
    def width(self) -> int:
        """Registers (or coils) this value occupies."""
        if self.table in ("coil", "discrete"):
            return 1
        return 2 if self.type in ("int32", "uint32", "float32") else 1


@dataclass(frozen=True, slots=True)
class MqttSpec:
    source: str
    topic: str
    field: str = ""


@dataclass(frozen=True, slots=True)
class FileSpec:
    path: Path
    format: FileFormat = "number"


@dataclass(frozen=True, slots=True)
class CommandSpec:
    command: tuple[str, ...]
    timeout_s: float = 5.0
    pattern: str = ""


@dataclass(frozen=True, slots=True)
class SimSpec:
    wave: SimWave = "sine"
    center: float = 0.0
    amplitude: float = 1.0
    wave_period_s: float = 60.0
    noise: float = 0.0
    seed: int = 0


DriverSpec = ModbusSpec | MqttSpec | FileSpec | CommandSpec | SimSpec


@dataclass(frozen=True, slots=True)
class SignalConfig:
    """One signal: where to read it, how often, how to calibrate and check it."""

    metric: str
    driver: DriverName
    spec: DriverSpec
    kind: SignalKind = "numeric"
    poll_s: float = DEFAULT_POLL_SECONDS
    unit: str = ""
    scale: float = 1.0
    offset: float = 0.0
    valid_min: float = -math.inf
    valid_max: float = math.inf
    deadband: float = 0.0
    states: Mapping[str, str] = field(default_factory=dict)

    @property
    def polled(self) -> bool:
        """mqtt signals are pushed by their source; every other driver is polled."""
        return self.driver != "mqtt"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything `millrace edge run` needs, validated."""

    device_id: str
    broker: BrokerConfig
    windows: WindowsConfig
    outbox: OutboxConfig
    heartbeat_s: float
    state_dir: Path
    signals: tuple[SignalConfig, ...]
    modbus: Mapping[str, ModbusDevice] = field(default_factory=dict)
    local_mqtt: Mapping[str, LocalMqtt] = field(default_factory=dict)
    source: Path | None = None
    config_hash: str = ""

    def signal(self, metric: str) -> SignalConfig | None:
        """The signal publishing `metric`, if any."""
        return next((s for s in self.signals if s.metric == metric), None)

    def with_settings(
        self, *, period_s: int | None = None, poll_s: Mapping[str, float] | None = None
    ) -> AgentConfig:
        """A copy with runtime settings (from the `set` command) applied."""
        windows = self.windows if period_s is None else replace(self.windows, period_s=period_s)
        polls = poll_s or {}
        signals = tuple(
            replace(s, poll_s=polls[s.metric]) if s.metric in polls and s.polled else s
            for s in self.signals
        )
        return replace(self, windows=windows, signals=signals)


# ---------------------------------------------------------------------------- loading

_T = TypeVar("_T")

_SIGNAL_COMMON_KEYS: Final = frozenset(
    {
        "metric",
        "driver",
        "kind",
        "poll_s",
        "unit",
        "scale",
        "offset",
        "valid_min",
        "valid_max",
        "deadband",
        "states",
    }
)
_DRIVER_KEYS: Final[dict[str, frozenset[str]]] = {
    "modbus": frozenset({"device", "table", "address", "type", "byte_order", "word_order"}),
    "mqtt": frozenset({"source", "topic", "field"}),
    "file": frozenset({"path", "format"}),
    "command": frozenset({"command", "timeout_s", "pattern"}),
    "sim": frozenset({"wave", "center", "amplitude", "wave_period_s", "noise", "seed"}),
}
_FIELD_PATH = re.compile(r"^[^.\[\]]+(\[\d+\])*(\.[^.\[\]]+(\[\d+\])*)*$")


class _Table:
    """A TOML table being read: tracks its dotted path and which keys were used."""

    def __init__(self, data: Mapping[str, Any], path: str, base: Path, source: str) -> None:
        self.data = data
        self.path = path
        self.base = base
        self.source = source
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.key(name), problem, source=self.source)

    def _get(self, name: str, kind: type[_T] | tuple[type, ...], what: str, default: Any) -> Any:
        self.used.add(name)
        if name not in self.data:
            if default is _REQUIRED:
                raise self.fail(name, f"missing (expected {what})")
            return default
        value = self.data[name]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if not ok:
            raise self.fail(name, f"expected {what}, got {_describe(value)}")
        return value

    def get_str(self, name: str, default: Any = None) -> Any:
        value = self._get(name, str, "a string", default)
        if value is not None and value is not default and not value.strip():
            raise self.fail(name, "must not be empty")
        return value

    def get_int(self, name: str, default: Any = None, *, low: int, high: int) -> Any:
        value = self._get(name, int, "an integer", default)
        if value is not None and value is not default and not low <= value <= high:
            raise self.fail(name, f"{value} is outside [{low}, {high}]")
        return value

    def get_float(
        self,
        name: str,
        default: Any = None,
        *,
        low: float = -math.inf,
        high: float = math.inf,
        low_open: bool = False,
    ) -> Any:
        value = self._get(name, (int, float), "a number", default)
        if value is None or value is default:
            return value
        value = float(value)
        if not math.isfinite(value):
            raise self.fail(name, f"expected a finite number, got {value}")
        if value < low or value > high or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise self.fail(name, f"{value:g} is outside {bracket}{low:g}, {high:g}]")
        return value

    def get_bool(self, name: str, default: Any = None) -> Any:
        return self._get(name, bool, "true or false", default)

    def choice(self, name: str, allowed: Any, default: Any = None) -> Any:
        options: tuple[str, ...] = get_args(allowed)
        value = self._get(name, str, "one of " + ", ".join(options), default)
        if value is not None and value not in options:
            raise self.fail(name, f"{value!r} is not one of {', '.join(options)}")
        return value

    def path_value(self, name: str, default: Any = None) -> Any:
        value = self.get_str(name, default)
        if value is None or value is default:
            return value
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base / path)

    def table(self, name: str, *, required: bool = False) -> _Table:
        self.used.add(name)
        value = self.data.get(name, _REQUIRED if required else {})
        if value is _REQUIRED:
            raise self.fail(name, "missing table")
        if not isinstance(value, dict):
            raise self.fail(name, f"expected a table, got {_describe(value)}")
        return _Table(value, self.key(name), self.base, self.source)

    def raw(self, name: str) -> Any:
        self.used.add(name)
        return self.data.get(name)

    def check_unknown(self, allowed: frozenset[str] | None = None) -> None:
        known = self.used if allowed is None else allowed
        for name in self.data:
            if name not in known:
                raise self.fail(name, "unknown key" + _suggest(name, known))


_REQUIRED: Any = object()


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value!r}"


def _suggest(name: str, known: set[str] | frozenset[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _broker(root: _Table) -> BrokerConfig:
    t = root.table("broker", required=True)
    broker = BrokerConfig(
        host=t.get_str("host", _REQUIRED),
        port=t.get_int("port", DEFAULT_BROKER_PORT, low=1, high=65535),
        ca=t.path_value("ca", _REQUIRED),
        cert=t.path_value("cert", _REQUIRED),
        key=t.path_value("key", _REQUIRED),
        keepalive_s=t.get_int("keepalive_s", 30, low=5, high=3600),
        encoding=t.choice("encoding", Encoding, "msgpack"),
        reconnect_min_s=t.get_float("reconnect_min_s", 1.0, low=0.0, low_open=True, high=3600.0),
        reconnect_max_s=t.get_float("reconnect_max_s", 60.0, low=0.0, low_open=True, high=86400.0),
        backlog_batches_per_s=t.get_float(
            "backlog_batches_per_s", 20.0, low=0.0, low_open=True, high=100_000.0
        ),
        max_inflight=t.get_int("max_inflight", 20, low=1, high=65535),
    )
    if broker.reconnect_max_s < broker.reconnect_min_s:
        raise t.fail("reconnect_max_s", "must be >= reconnect_min_s")
    t.check_unknown()
    return broker


def _windows(root: _Table) -> WindowsConfig:
    t = root.table("windows")
    period = t.get_int("period_s", DEFAULT_PERIOD_SECONDS, low=1, high=MAX_PERIOD_SECONDS)
    extra = t.raw("extra_periods_s") or []
    if not isinstance(extra, list):
        raise t.fail("extra_periods_s", f"expected an array of integers, got {_describe(extra)}")
    for i, value in enumerate(extra):
        if type(value) is not int or not 1 <= value <= MAX_PERIOD_SECONDS:
            raise ConfigError(
                t.key(f"extra_periods_s[{i}]"),
                f"expected an integer in [1, {MAX_PERIOD_SECONDS}], got {_describe(value)}",
                source=t.source,
            )
    grace = t.get_float("grace_s", DEFAULT_GRACE_SECONDS, low=0.0, high=3600.0)
    if grace >= min((period, *extra)):
        raise t.fail("grace_s", f"{grace:g} must be shorter than the shortest period")
    t.check_unknown()
    return WindowsConfig(period_s=period, extra_periods_s=tuple(extra), grace_s=grace)


def _outbox(root: _Table) -> OutboxConfig:
    t = root.table("outbox", required=True)
    result = OutboxConfig(
        path=t.path_value("path", _REQUIRED),
        max_bytes=t.get_int("max_bytes", DEFAULT_OUTBOX_MAX_BYTES, low=64 * 1024, high=2**40),
        max_age_s=t.get_int(
            "max_age_s", DEFAULT_OUTBOX_MAX_AGE_SECONDS, low=60, high=10 * 365 * 86400
        ),
    )
    t.check_unknown()
    return result


def _modbus_devices(root: _Table) -> dict[str, ModbusDevice]:
    devices: dict[str, ModbusDevice] = {}
    top = root.table("modbus")
    for name in top.data:
        t = top.table(name)
        devices[name] = ModbusDevice(
            name=name,
            host=t.get_str("host", _REQUIRED),
            port=t.get_int("port", DEFAULT_MODBUS_PORT, low=1, high=65535),
            unit_id=t.get_int("unit_id", 1, low=0, high=255),
            timeout_s=t.get_float("timeout_s", 1.0, low=0.0, low_open=True, high=60.0),
        )
        t.check_unknown()
    return devices


def _local_mqtt(root: _Table) -> dict[str, LocalMqtt]:
    sources: dict[str, LocalMqtt] = {}
    top = root.table("local_mqtt")
    for name in top.data:
        t = top.table(name)
        source = LocalMqtt(
            name=name,
            host=t.get_str("host", _REQUIRED),
            port=t.get_int("port", DEFAULT_LOCAL_MQTT_PORT, low=1, high=65535),
            client_id=t.get_str("client_id", ""),
            username=t.get_str("username", ""),
            password_file=t.path_value("password_file"),
            ca=t.path_value("ca"),
            cert=t.path_value("cert"),
            key=t.path_value("key"),
        )
        if (source.cert is None) != (source.key is None):
            raise t.fail("key" if source.key is None else "cert", "cert and key go together")
        if source.cert is not None and source.ca is None:
            raise t.fail("ca", "a client certificate needs the broker's ca")
        t.check_unknown()
        sources[name] = source
    return sources


def _modbus_spec(t: _Table, devices: Mapping[str, ModbusDevice]) -> ModbusSpec:
    device = t.get_str("device", _REQUIRED)
    if device not in devices:
        raise t.fail(
            "device", f"{device!r} is not a [modbus.<name>] table" + _suggest(device, set(devices))
        )
    table = t.choice("table", ModbusTable, _REQUIRED)
    spec = ModbusSpec(
        device=device,
        table=table,
        address=t.get_int("address", _REQUIRED, low=0, high=65535),
        type=t.choice("type", ModbusType, "uint16"),
        byte_order=t.choice("byte_order", ByteOrder, "big"),
        word_order=t.choice("word_order", ByteOrder, "big"),
    )
    if table in ("coil", "discrete") and "type" in t.data:
        raise t.fail("type", f"{table} values are single bits; remove type")
    if spec.address + spec.width > 65536:
        raise t.fail("address", f"{spec.type} at {spec.address} runs past register 65535")
    return spec


def _mqtt_spec(t: _Table, sources: Mapping[str, LocalMqtt]) -> MqttSpec:
    source = t.get_str("source", _REQUIRED)
    if source not in sources:
        raise t.fail(
            "source",
            f"{source!r} is not a [local_mqtt.<name>] table" + _suggest(source, set(sources)),
        )
    topic = t.get_str("topic", _REQUIRED)
    if "#" in topic or "+" in topic:
        raise t.fail("topic", "one exact topic per signal; wildcards are not allowed")
    path = t.get_str("field", "")
    if path and not _FIELD_PATH.fullmatch(path):
        raise t.fail("field", f"{path!r} is not a field path like 'ENERGY.Power' or 'a.b[0].c'")
    return MqttSpec(source=source, topic=topic, field=path)


def _command_spec(t: _Table) -> CommandSpec:
    argv = t.raw("command")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
        raise t.fail("command", "expected a non-empty array of strings (argv, no shell)")
    pattern = t.get_str("pattern", "")
    if pattern:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise t.fail("pattern", f"not a regular expression: {exc}") from exc
        if compiled.groups > 1:
            raise t.fail("pattern", "at most one capture group (the number)")
    return CommandSpec(
        command=tuple(argv),
        timeout_s=t.get_float("timeout_s", 5.0, low=0.0, low_open=True, high=600.0),
        pattern=pattern,
    )


def _sim_spec(t: _Table) -> SimSpec:
    return SimSpec(
        wave=t.choice("wave", SimWave, "sine"),
        center=t.get_float("center", 0.0),
        amplitude=t.get_float("amplitude", 1.0, low=0.0),
        wave_period_s=t.get_float("wave_period_s", 60.0, low=0.0, low_open=True),
        noise=t.get_float("noise", 0.0, low=0.0),
        seed=t.get_int("seed", 0, low=0, high=2**31 - 1),
    )


def _signal(t: _Table, config: _Partial) -> SignalConfig:
    metric = t.get_str("metric", _REQUIRED)
    if not is_metric_name(metric):
        raise t.fail("metric", f"{metric!r}: {METRIC_NAME_RULE}")
    driver = t.choice("driver", DriverName, _REQUIRED)
    allowed = _SIGNAL_COMMON_KEYS | _DRIVER_KEYS[driver]
    for name in t.data:
        if name not in allowed:
            owner = next((d for d, keys in _DRIVER_KEYS.items() if name in keys), None)
            if owner:
                raise t.fail(name, f"is a {owner} key; this signal's driver is {driver}")
            raise t.fail(name, "unknown key" + _suggest(name, allowed))
    kind = t.choice("kind", SignalKind, "numeric")
    spec: DriverSpec
    if driver == "modbus":
        spec = _modbus_spec(t, config.modbus)
    elif driver == "mqtt":
        spec = _mqtt_spec(t, config.local_mqtt)
    elif driver == "file":
        spec = FileSpec(
            path=t.path_value("path", _REQUIRED), format=t.choice("format", FileFormat, "number")
        )
    elif driver == "command":
        spec = _command_spec(t)
    else:
        spec = _sim_spec(t)
    if driver == "mqtt" and "poll_s" in t.data:
        raise t.fail("poll_s", "mqtt signals are pushed by their source; remove poll_s")
    poll = t.get_float("poll_s", DEFAULT_POLL_SECONDS, low=MIN_POLL_SECONDS, high=MAX_POLL_SECONDS)
    low = t.get_float("valid_min", -math.inf)
    high = t.get_float("valid_max", math.inf)
    if low > high:
        raise t.fail("valid_max", f"{high:g} is below valid_min {low:g}")
    deadband = t.get_float("deadband", 0.0, low=0.0)
    if deadband and kind != "numeric":
        raise t.fail("deadband", f"only numeric signals take a deadband, this one is {kind}")
    states = t.raw("states") or {}
    if states and kind != "enum":
        raise t.fail("states", f"only enum signals map states, this one is {kind}")
    if not isinstance(states, dict) or not all(isinstance(v, str) for v in states.values()):
        raise t.fail("states", 'expected a table of raw value = "label" strings')
    scale = t.get_float("scale", 1.0)
    if scale == 0.0:
        raise t.fail("scale", "must not be 0")
    return SignalConfig(
        metric=metric,
        driver=driver,
        spec=spec,
        kind=kind,
        poll_s=poll,
        unit=t.get_str("unit", "") or "",
        scale=scale,
        offset=t.get_float("offset", 0.0),
        valid_min=low,
        valid_max=high,
        deadband=deadband,
        states=dict(states),
    )


@dataclass(slots=True)
class _Partial:
    modbus: dict[str, ModbusDevice]
    local_mqtt: dict[str, LocalMqtt]


def _signals(root: _Table, partial: _Partial) -> tuple[SignalConfig, ...]:
    raw = root.raw("signals")
    if raw is None:
        raise ConfigError(
            "signals", "missing: add at least one [[signals]] entry", source=root.source
        )
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError("signals", "expected [[signals]] tables", source=root.source)
    if not raw:
        raise ConfigError("signals", "add at least one [[signals]] entry", source=root.source)
    signals: list[SignalConfig] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        t = _Table(item, f"signals[{i}]", root.base, root.source)
        signal = _signal(t, partial)
        if signal.metric in seen:
            raise t.fail(
                "metric", f"{signal.metric!r} is already used by signals[{seen[signal.metric]}]"
            )
        seen[signal.metric] = i
        signals.append(signal)
    return tuple(signals)


def parse_config(text: str, *, base: Path, source: str = "<config>") -> AgentConfig:
    """Validate TOML text into an `AgentConfig`; raise ConfigError naming the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("toml", f"not valid TOML: {exc}", source=source) from exc
    root = _Table(data, "", base, source)
    device_id = root.get_str("device_id", _REQUIRED)
    if not is_device_id(device_id):
        raise root.fail("device_id", f"{device_id!r}: {DEVICE_ID_RULE}")
    broker = _broker(root)
    windows = _windows(root)
    outbox = _outbox(root)
    heartbeat = root.table("heartbeat")
    heartbeat_s = heartbeat.get_float(
        "interval_s", DEFAULT_HEARTBEAT_SECONDS, low=1.0, high=86400.0
    )
    heartbeat.check_unknown()
    state = root.table("state", required=True)
    state_dir = state.path_value("dir", _REQUIRED)
    state.check_unknown()
    partial = _Partial(modbus=_modbus_devices(root), local_mqtt=_local_mqtt(root))
    signals = _signals(root, partial)
    root.check_unknown()
    return AgentConfig(
        device_id=device_id,
        broker=broker,
        windows=windows,
        outbox=outbox,
        heartbeat_s=heartbeat_s,
        state_dir=state_dir,
        signals=signals,
        modbus=partial.modbus,
        local_mqtt=partial.local_mqtt,
        config_hash=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate the agent's TOML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("--config", f"file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc}") from exc
    config = parse_config(text, base=path.resolve().parent, source=str(path))
    return replace(config, source=path)
