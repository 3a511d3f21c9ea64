"""The agent's configuration: one TOML file, one loader, one frozen typed result.

Every problem raises `ConfigError` naming the exact key (`signals[3].scale`)
so a bad file never starts a half-working agent. Relative paths are resolved
against the directory of the config file, so generated bundles can be moved.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal

from millrace import configfile
from millrace.configfile import BrokerConnection, Table, parse_toml, read_text, suggest
from millrace.ids import DEVICE_ID_RULE, METRIC_NAME_RULE, is_device_id, is_metric_name
from millrace.wire.batch import MAX_PERIOD_SECONDS
from millrace.wire.periods import period_problem

DriverName = Literal["modbus", "modbus_rtu", "mqtt", "opcua", "file", "command", "sim"]
SignalKind = Literal["numeric", "state", "enum"]
ModbusTable = Literal["holding", "input", "coil", "discrete"]
ModbusType = Literal[
    "int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64", "string"
]
Parity = Literal["none", "even", "odd"]
ByteOrder = Literal["big", "little"]
FileFormat = Literal["number", "w1_slave"]
SimWave = Literal["sine", "ramp", "square", "noise", "constant", "steps"]
Encoding = Literal["msgpack", "json"]
OpcUaSecurity = Literal["sign_encrypt", "sign", "none"]
OpcUaMode = Literal["poll", "subscribe"]

DEFAULT_BROKER_PORT: Final = configfile.DEFAULT_BROKER_PORT
DEFAULT_MODBUS_PORT: Final = 502
DEFAULT_RTU_BAUDRATE: Final = 9600
# Registers one request can carry (functions 3/4): the longest string a signal can read.
MAX_MODBUS_STRING_REGISTERS: Final = 125
_MODBUS_WIDTHS: Final = {
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
DEFAULT_LOCAL_MQTT_PORT: Final = 1883
# How long the local broker keeps the agent's session (and queues QoS 1 readings for it)
# while the agent is away: a restart or upgrade takes seconds, a day covers a crash that
# needs a person. Capped at a week: readings queued longer are stale.
DEFAULT_LOCAL_MQTT_SESSION_EXPIRY_SECONDS: Final = 86_400
MAX_LOCAL_MQTT_SESSION_EXPIRY_SECONDS: Final = 7 * 86_400
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
class BrokerConfig(BrokerConnection):
    """The plant broker the agent publishes to (mutual TLS, always), and how it publishes."""

    encoding: Encoding = "msgpack"
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    backlog_batches_per_s: float = 20.0
    max_inflight: int = 20
    # A batch the broker took but the cloud has not receipted is sent again after a wait
    # drawn from [receipt_wait_s, 2 * receipt_wait_s] (30-60 s by default).
    receipt_wait_s: float = 30.0
    # PUBACK "no matching subscribers" pauses and resends at once (an optimisation: the
    # receipt wait alone keeps those batches too). Off only to test that.
    resend_unrouted: bool = True
    # With several `hosts`: prefer broker crc32(device id) % len(hosts) (spread the fleet)
    # or, if False, the first listed; check the preferred one every failback_s while away
    # (edge/brokers.py).
    spread: bool = True
    failback_s: float = 60.0


@dataclass(frozen=True, slots=True)
class WindowsConfig:
    """Tumbling windows: the main period, optional extra periods, grace for late readings."""

    period_s: int = DEFAULT_PERIOD_SECONDS
    extra_periods_s: tuple[int, ...] = ()
    grace_s: float = DEFAULT_GRACE_SECONDS
    # The range a closed batch's send is delayed in (per device, edge/pacing.py); 0 (the
    # default) sends at once: the design's close->commit p99 <= 1 s leaves no room for it.
    publish_spread_s: float = 0.0

    @property
    def periods_s(self) -> tuple[int, ...]:
        """Every period windows are kept for, main period first, no repeats."""
        return tuple(dict.fromkeys((self.period_s, *self.extra_periods_s)))

    @property
    def spread_s(self) -> float:
        """`publish_spread_s`: how far a closed batch's send may be delayed (0: not at all)."""
        return self.publish_spread_s


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
class ModbusRtuBus:
    """A serial RS-485 line with Modbus RTU slaves on it (each signal names its unit_id).

    One poller thread owns the bus, so requests never overlap.
    """

    name: str
    port: str
    baudrate: int = DEFAULT_RTU_BAUDRATE
    parity: Parity = "none"
    stopbits: int = 1
    bytesize: int = 8
    timeout_s: float = 0.5
    retries: int = 1

    @property
    def frame_gap_s(self) -> float:
        """The silent interval between frames: 3.5 character times, 1.75 ms above 19200 baud."""
        if self.baudrate > 19200:
            return 0.00175
        bits = 1 + self.bytesize + (self.parity != "none") + self.stopbits
        return 3.5 * bits / self.baudrate


@dataclass(frozen=True, slots=True)
class LocalMqtt:
    """A local MQTT broker field nodes (ESPHome, Tasmota) publish to."""

    name: str
    host: str
    port: int = DEFAULT_LOCAL_MQTT_PORT
    client_id: str = ""
    session_expiry_s: int = DEFAULT_LOCAL_MQTT_SESSION_EXPIRY_SECONDS
    username: str = ""
    password_file: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class OpcUaServer:
    """An OPC UA server (PLC, SCADA) that opcua signals read from: one session, one thread.

    security "sign_encrypt" and "sign" use the policy Basic256Sha256 with the client's
    certificate and key and the server's certificate (trusted as given, no discovery).
    """

    name: str
    endpoint: str
    security: OpcUaSecurity = "sign_encrypt"
    cert: Path | None = None
    key: Path | None = None
    server_cert: Path | None = None
    application_uri: str = ""
    username: str = ""
    password_file: Path | None = None
    timeout_s: float = 4.0
    session_timeout_s: float = 60.0
    reconnect_max_s: float = 30.0


@dataclass(frozen=True, slots=True)
class ModbusSpec:
    device: str
    table: ModbusTable
    address: int
    type: ModbusType = "uint16"
    byte_order: ByteOrder = "big"
    word_order: ByteOrder = "big"
    # One bit (0 = least significant) of a 16-bit register: the value is a bool.
    bit: int | None = None
    # Registers a string occupies (two characters each).
    length: int = 0
    # Modbus RTU: the slave on the bus; Modbus TCP: overrides the device's unit_id.
    unit_id: int | None = None

    @property
    def width(self) -> int:
        """Registers (or coils) this value occupies."""
        if self.table in ("coil", "discrete"):
            return 1
        if self.type == "string":
            return self.length
        return _MODBUS_WIDTHS.get(self.type, 1)


@dataclass(frozen=True, slots=True)
class MqttSpec:
    source: str
    topic: str
    field: str = ""


@dataclass(frozen=True, slots=True)
class OpcUaSpec:
    server: str
    node: str
    # poll: read every poll_s; subscribe: a monitored item sampled every poll_s.
    mode: OpcUaMode = "poll"


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


DriverSpec = ModbusSpec | MqttSpec | OpcUaSpec | FileSpec | CommandSpec | SimSpec


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
        """Polled by the agent's poller threads: not mqtt (pushed) nor opcua (its session's
        thread keeps the schedule, polls and subscriptions alike)."""
        return self.driver not in ("mqtt", "opcua")


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
    modbus_rtu: Mapping[str, ModbusRtuBus] = field(default_factory=dict)
    local_mqtt: Mapping[str, LocalMqtt] = field(default_factory=dict)
    opcua: Mapping[str, OpcUaServer] = field(default_factory=dict)
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
    "modbus": frozenset(
        {
            "device",
            "unit_id",
            "table",
            "address",
            "type",
            "byte_order",
            "word_order",
            "bit",
            "length",
        }
    ),
    "modbus_rtu": frozenset(
        {"bus", "unit_id", "table", "address", "type", "byte_order", "word_order", "bit", "length"}
    ),
    "mqtt": frozenset({"source", "topic", "field"}),
    "opcua": frozenset({"server", "node", "mode"}),
    "file": frozenset({"path", "format"}),
    "command": frozenset({"command", "timeout_s", "pattern"}),
    "sim": frozenset({"wave", "center", "amplitude", "wave_period_s", "noise", "seed"}),
}
_FIELD_PATH = re.compile(r"^[^.\[\]]+(\[\d+\])*(\.[^.\[\]]+(\[\d+\])*)*$")


def _broker(root: Table) -> BrokerConfig:
    t = root.table("broker", required=True)
    # Files are checked when the agent starts (agent.check_files), not here: bundles
    # are validated where they are rendered, before the device has its certificates.
    broker = BrokerConfig.read(
        t,
        files_must_exist=False,
        encoding=t.choice("encoding", Encoding, "msgpack"),
        reconnect_min_s=t.number("reconnect_min_s", 1.0, low=0.0, low_open=True, high=3600.0),
        reconnect_max_s=t.number("reconnect_max_s", 60.0, low=0.0, low_open=True, high=86400.0),
        backlog_batches_per_s=t.number(
            "backlog_batches_per_s", 20.0, low=0.0, low_open=True, high=100_000.0
        ),
        max_inflight=t.integer("max_inflight", 20, low=1, high=65535),
        receipt_wait_s=t.number("receipt_wait_s", 30.0, low=0.0, low_open=True, high=86400.0),
        resend_unrouted=t.boolean("resend_unrouted", True),
        spread=t.boolean("spread", True),
        failback_s=t.number("failback_s", 60.0, low=0.0, low_open=True, high=86400.0),
    )
    if broker.reconnect_max_s < broker.reconnect_min_s:
        raise t.error("reconnect_max_s", "must be >= reconnect_min_s")
    t.check_unknown()
    return broker


def _windows(root: Table) -> WindowsConfig:
    t = root.table("windows")
    period = t.integer("period_s", DEFAULT_PERIOD_SECONDS, low=1, high=MAX_PERIOD_SECONDS)
    if problem := period_problem(period):
        raise t.error("period_s", problem)
    extra = t.integers("extra_periods_s", (), low=1, high=MAX_PERIOD_SECONDS)
    for i, value in enumerate(extra):
        if problem := period_problem(value):
            raise t.error(f"extra_periods_s[{i}]", problem)
    grace = t.number("grace_s", DEFAULT_GRACE_SECONDS, low=0.0, high=3600.0)
    if grace >= min((period, *extra)):
        raise t.error("grace_s", f"{grace:g} must be shorter than the shortest period")
    spread = t.number("publish_spread_s", 0.0, low=0.0)
    if spread >= min((period, *extra)):
        raise t.error(
            "publish_spread_s", f"{spread:g} must be shorter than the shortest period (0 disables)"
        )
    t.check_unknown()
    return WindowsConfig(
        period_s=period, extra_periods_s=extra, grace_s=grace, publish_spread_s=spread
    )


def _outbox(root: Table) -> OutboxConfig:
    t = root.table("outbox", required=True)
    result = OutboxConfig(
        path=t.path("path"),
        max_bytes=t.integer("max_bytes", DEFAULT_OUTBOX_MAX_BYTES, low=64 * 1024, high=2**40),
        max_age_s=t.integer(
            "max_age_s", DEFAULT_OUTBOX_MAX_AGE_SECONDS, low=60, high=MAX_OUTBOX_AGE_SECONDS
        ),
    )
    t.check_unknown()
    return result


def _modbus_devices(root: Table) -> dict[str, ModbusDevice]:
    devices: dict[str, ModbusDevice] = {}
    for name, t in root.table("modbus").subtables().items():
        devices[name] = ModbusDevice(
            name=name,
            host=t.text("host"),
            port=t.integer("port", DEFAULT_MODBUS_PORT, low=1, high=65535),
            unit_id=t.integer("unit_id", 1, low=0, high=255),
            timeout_s=t.number("timeout_s", 1.0, low=0.0, low_open=True, high=60.0),
        )
        t.check_unknown()
    return devices


def _modbus_rtu_buses(root: Table) -> dict[str, ModbusRtuBus]:
    buses: dict[str, ModbusRtuBus] = {}
    ports: dict[str, str] = {}
    for name, t in root.table("modbus_rtu").subtables().items():
        bus = ModbusRtuBus(
            name=name,
            port=t.text("port"),
            baudrate=t.integer("baudrate", DEFAULT_RTU_BAUDRATE, low=300, high=4_000_000),
            parity=t.choice("parity", Parity, "none"),
            stopbits=t.integer("stopbits", 1, low=1, high=2),
            bytesize=t.integer("bytesize", 8, low=7, high=8),
            timeout_s=t.number("timeout_s", 0.5, low=0.0, low_open=True, high=60.0),
            retries=t.integer("retries", 1, low=0, high=5),
        )
        if not bus.port:
            raise t.error("port", "expected the serial device, like /dev/ttyUSB0")
        if bus.bytesize != 8:
            raise t.error("bytesize", "Modbus RTU frames carry 8 data bits (7 is Modbus ASCII)")
        if bus.port in ports:
            raise t.error(
                "port", f"{bus.port} is already [modbus_rtu.{ports[bus.port]}]: one bus, one table"
            )
        ports[bus.port] = name
        t.check_unknown()
        buses[name] = bus
    return buses


def _local_mqtt(root: Table) -> dict[str, LocalMqtt]:
    sources: dict[str, LocalMqtt] = {}
    for name, t in root.table("local_mqtt").subtables().items():
        source = LocalMqtt(
            name=name,
            host=t.text("host"),
            port=t.integer("port", DEFAULT_LOCAL_MQTT_PORT, low=1, high=65535),
            client_id=t.text("client_id", ""),
            session_expiry_s=t.integer(
                "session_expiry_s",
                DEFAULT_LOCAL_MQTT_SESSION_EXPIRY_SECONDS,
                low=0,
                high=MAX_LOCAL_MQTT_SESSION_EXPIRY_SECONDS,
            ),
            username=t.text("username", ""),
            password_file=t.optional_path("password_file"),
            ca=t.optional_path("ca"),
            cert=t.optional_path("cert"),
            key=t.optional_path("key"),
        )
        if (source.cert is None) != (source.key is None):
            raise t.error("key" if source.key is None else "cert", "cert and key go together")
        if source.cert is not None and source.ca is None:
            raise t.error("ca", "a client certificate needs the broker's ca")
        t.check_unknown()
        sources[name] = source
    return sources


_OPCUA_NODE = re.compile(r"^(ns=\d+;|nsu=[^;]+;)?[isgb]=.+$")


def _opcua_servers(root: Table) -> dict[str, OpcUaServer]:
    servers: dict[str, OpcUaServer] = {}
    for name, t in root.table("opcua").subtables().items():
        server = OpcUaServer(
            name=name,
            endpoint=t.text("endpoint"),
            security=t.choice("security", OpcUaSecurity, "sign_encrypt"),
            cert=t.optional_path("cert"),
            key=t.optional_path("key"),
            server_cert=t.optional_path("server_cert"),
            application_uri=t.text("application_uri", ""),
            username=t.text("username", ""),
            password_file=t.optional_path("password_file"),
            timeout_s=t.number("timeout_s", 4.0, low=0.0, low_open=True, high=600.0),
            session_timeout_s=t.number("session_timeout_s", 60.0, low=1.0, high=86_400.0),
            reconnect_max_s=t.number("reconnect_max_s", 30.0, low=0.1, high=3600.0),
        )
        if not server.endpoint.startswith("opc.tcp://"):
            raise t.error("endpoint", "expected opc.tcp://host:port[/path]")
        if server.security != "none":
            for key in ("cert", "key", "server_cert"):
                if getattr(server, key) is None:
                    raise t.error(
                        key,
                        f'security "{server.security}" (Basic256Sha256) needs cert, key and'
                        ' server_cert; or set security = "none"',
                    )
        if server.password_file is not None and not server.username:
            raise t.error("username", "password_file needs a username")
        t.check_unknown()
        servers[name] = server
    return servers


def _opcua_spec(t: Table, servers: Mapping[str, OpcUaServer]) -> OpcUaSpec:
    server = t.text("server")
    if server not in servers:
        raise t.error(
            "server", f"{server!r} is not an [opcua.<name>] table" + suggest(server, servers)
        )
    node = t.text("node")
    if not _OPCUA_NODE.fullmatch(node):
        raise t.error("node", f"{node!r} is not a node id like 'ns=2;s=Line1.Temp' or 'i=2258'")
    return OpcUaSpec(server=server, node=node, mode=t.choice("mode", OpcUaMode, "poll"))


def _modbus_spec(
    t: Table, devices: Mapping[str, ModbusDevice] | Mapping[str, ModbusRtuBus], *, rtu: bool
) -> ModbusSpec:
    key, section = ("bus", "modbus_rtu") if rtu else ("device", "modbus")
    device = t.text(key)
    if device not in devices:
        raise t.error(
            key, f"{device!r} is not a [{section}.<name>] table" + suggest(device, devices)
        )
    if rtu:
        # 0 is broadcast (no answer) and 248-255 are reserved on a serial line.
        unit_id: int | None = t.integer("unit_id", low=1, high=247)
    else:
        unit_id = t.integer("unit_id", low=0, high=255) if t.has("unit_id") else None
    table = t.choice("table", ModbusTable)
    kind = t.choice("kind", SignalKind, "numeric")
    type_ = t.choice("type", ModbusType, "uint16")
    if table in ("coil", "discrete"):
        for single in ("type", "bit", "length", "byte_order", "word_order"):
            if t.has(single):
                raise t.error(single, f"{table} values are single bits; remove {single}")
    bit = t.integer("bit", low=0, high=15) if t.has("bit") else None
    if bit is not None and type_ not in ("uint16", "int16"):
        raise t.error("bit", f"bit picks one bit of a 16-bit register; type {type_} is wider")
    length = 0
    if type_ == "string":
        length = t.integer("length", low=1, high=MAX_MODBUS_STRING_REGISTERS)
        if kind == "numeric":
            raise t.error("type", 'a string is text: set kind = "enum" (or "state")')
    elif t.has("length"):
        raise t.error("length", f"only string values take a length (registers); type is {type_}")
    spec = ModbusSpec(
        device=device,
        table=table,
        address=t.integer("address", low=0, high=65535),
        type=type_,
        byte_order=t.choice("byte_order", ByteOrder, "big"),
        word_order=t.choice("word_order", ByteOrder, "big"),
        bit=bit,
        length=length,
        unit_id=unit_id,
    )
    if spec.address + spec.width > 65536:
        raise t.error("address", f"{spec.type} at {spec.address} runs past register 65535")
    return spec


def _mqtt_spec(t: Table, sources: Mapping[str, LocalMqtt]) -> MqttSpec:
    source = t.text("source")
    if source not in sources:
        raise t.error(
            "source", f"{source!r} is not a [local_mqtt.<name>] table" + suggest(source, sources)
        )
    topic = t.text("topic")
    if "#" in topic or "+" in topic:
        raise t.error("topic", "one exact topic per signal; wildcards are not allowed")
    path = t.text("field", "")
    if path and not _FIELD_PATH.fullmatch(path):
        raise t.error("field", f"{path!r} is not a field path like 'ENERGY.Power' or 'a.b[0].c'")
    return MqttSpec(source=source, topic=topic, field=path)


def _command_spec(t: Table) -> CommandSpec:
    argv = t.raw("command")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
        raise t.error("command", "expected a non-empty array of strings (argv, no shell)")
    pattern = t.text("pattern", "")
    if pattern:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise t.error("pattern", f"not a regular expression: {exc}") from exc
        if compiled.groups > 1:
            raise t.error("pattern", "at most one capture group (the number)")
    return CommandSpec(
        command=tuple(argv),
        timeout_s=t.number("timeout_s", 5.0, low=0.0, low_open=True, high=600.0),
        pattern=pattern,
    )


def _sim_spec(t: Table) -> SimSpec:
    return SimSpec(
        wave=t.choice("wave", SimWave, "sine"),
        center=t.number("center", 0.0),
        amplitude=t.number("amplitude", 1.0, low=0.0),
        wave_period_s=t.number("wave_period_s", 60.0, low=0.0, low_open=True),
        noise=t.number("noise", 0.0, low=0.0),
        seed=t.integer("seed", 0, low=0, high=2**31 - 1),
    )


def _signal(t: Table, config: _Partial) -> SignalConfig:
    metric = t.text("metric")
    if not is_metric_name(metric):
        raise t.error("metric", f"{metric!r}: {METRIC_NAME_RULE}")
    driver = t.choice("driver", DriverName)
    allowed = _SIGNAL_COMMON_KEYS | _DRIVER_KEYS[driver]
    stray = [name for name in t.data if name not in allowed]
    if stray:
        owner = next((d for d, keys in _DRIVER_KEYS.items() if stray[0] in keys), None)
        if owner:
            raise t.error(stray[0], f"is a {owner} key; this signal's driver is {driver}")
        t.check_unknown(allowed)
    kind = t.choice("kind", SignalKind, "numeric")
    spec: DriverSpec
    if driver == "modbus":
        spec = _modbus_spec(t, config.modbus, rtu=False)
    elif driver == "modbus_rtu":
        spec = _modbus_spec(t, config.modbus_rtu, rtu=True)
    elif driver == "mqtt":
        spec = _mqtt_spec(t, config.local_mqtt)
    elif driver == "opcua":
        spec = _opcua_spec(t, config.opcua)
    elif driver == "file":
        spec = FileSpec(path=t.path("path"), format=t.choice("format", FileFormat, "number"))
    elif driver == "command":
        spec = _command_spec(t)
    else:
        spec = _sim_spec(t)
    if driver == "mqtt" and t.has("poll_s"):
        raise t.error("poll_s", "mqtt signals are pushed by their source; remove poll_s")
    poll = t.number("poll_s", DEFAULT_POLL_SECONDS, low=MIN_POLL_SECONDS, high=MAX_POLL_SECONDS)
    low = t.number("valid_min", -math.inf)
    high = t.number("valid_max", math.inf)
    if low > high:
        raise t.error("valid_max", f"{high:g} is below valid_min {low:g}")
    deadband = t.number("deadband", 0.0, low=0.0)
    if deadband and kind != "numeric":
        raise t.error("deadband", f"only numeric signals take a deadband, this one is {kind}")
    states = t.raw("states") or {}
    if states and kind != "enum":
        raise t.error("states", f"only enum signals map states, this one is {kind}")
    if not isinstance(states, dict) or not all(isinstance(v, str) for v in states.values()):
        raise t.error("states", 'expected a table of raw value = "label" strings')
    scale = t.number("scale", 1.0)
    if scale == 0.0:
        raise t.error("scale", "must not be 0")
    return SignalConfig(
        metric=metric,
        driver=driver,
        spec=spec,
        kind=kind,
        poll_s=poll,
        unit=t.text("unit", ""),
        scale=scale,
        offset=t.number("offset", 0.0),
        valid_min=low,
        valid_max=high,
        deadband=deadband,
        states=dict(states),
    )


@dataclass(slots=True)
class _Partial:
    modbus: dict[str, ModbusDevice]
    modbus_rtu: dict[str, ModbusRtuBus]
    local_mqtt: dict[str, LocalMqtt]
    opcua: dict[str, OpcUaServer] = field(default_factory=dict)


def _signals(root: Table, partial: _Partial) -> tuple[SignalConfig, ...]:
    signals: list[SignalConfig] = []
    seen: dict[str, int] = {}
    for i, t in enumerate(root.array_of_tables("signals", required=True)):
        signal = _signal(t, partial)
        if signal.metric in seen:
            raise t.error(
                "metric", f"{signal.metric!r} is already used by signals[{seen[signal.metric]}]"
            )
        seen[signal.metric] = i
        signals.append(signal)
    return tuple(signals)


def parse_config(text: str, *, base: Path, source: str = "<config>") -> AgentConfig:
    """Validate TOML text into an `AgentConfig`; raise ConfigError naming the key."""
    root = Table(parse_toml(text, source=source), base=base, source=source)
    device_id = root.text("device_id")
    if not is_device_id(device_id):
        raise root.error("device_id", f"{device_id!r}: {DEVICE_ID_RULE}")
    broker = _broker(root)
    windows = _windows(root)
    outbox = _outbox(root)
    heartbeat = root.table("heartbeat")
    heartbeat_s = heartbeat.number("interval_s", DEFAULT_HEARTBEAT_SECONDS, low=1.0, high=86400.0)
    heartbeat.check_unknown()
    state = root.table("state", required=True)
    state_dir = state.path("dir")
    state.check_unknown()
    partial = _Partial(
        modbus=_modbus_devices(root),
        modbus_rtu=_modbus_rtu_buses(root),
        local_mqtt=_local_mqtt(root),
        opcua=_opcua_servers(root),
    )
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
        modbus_rtu=partial.modbus_rtu,
        local_mqtt=partial.local_mqtt,
        opcua=partial.opcua,
        config_hash=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


def load_config(path: Path | str, *, key: str = "--config") -> AgentConfig:
    """Read and validate the agent's TOML file; `key` names where its path came from."""
    path = Path(path)
    text = read_text(path, key=key)
    config = parse_config(text, base=path.resolve().parent, source=str(path))
    return replace(config, source=path)
