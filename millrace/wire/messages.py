"""Small JSON messages beside the batches: birth/state, heartbeat, commands, alerts.

They are rare and read by people (mosquitto_sub), so they are JSON. Each has
`to_json()` and a strict `from_json()` that raises WireError with a reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from millrace.errors import WireError
from millrace.ids import DEVICE_ID_RULE, is_device_id, is_metric_name

MAX_MESSAGE_BYTES = 64 * 1024
MAX_UNIT_CHARS = 32
# Births and heartbeats reach the database: every text is capped and printable, every
# number finite and in a range a real agent can report (docs/cloud.md, "Births").
MAX_VERSION_CHARS = 64
MAX_CONFIG_HASH_CHARS = 128
# Counts: generous (the 64 KiB payload cap binds first); a gateway keys driver errors
# by metric name (<= 100 chars) or `local_mqtt.<source>`.
MAX_UNITS = 4096
MAX_DRIVER_ERROR_KEYS = 4096
MAX_DRIVER_NAME_CHARS = 128
MAX_COUNTER = 2**63 - 1  # BIGINT: what the database stores counters in
# 0 is allowed: a gateway whose clock reset to 1970 must still be able to say so.
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01
MAX_AGE_SECONDS = 100 * 365 * 86_400.0
MAX_CPU_PERCENT = 100_000.0  # 1000 cores at 100 %
# X.509 times run from 1950 to 9999-12-31: any certificate an operator can issue fits.
MAX_CERT_DAYS = 3_000_000.0
BOOT_ID_HEX_CHARS = 32
# A birth after an unclean end names at most this many metrics of the hole (the rest are
# counted in `prev_metrics_omitted`): 256 names of <= 100 chars stay well inside 64 KiB.
MAX_HOLE_METRICS = 256
MAX_HOLE_OMITTED = 1_000_000
DeviceStatus = Literal["online", "offline"]
AlertState = Literal["active", "cleared"]
Severity = Literal["info", "warning", "critical"]

_T = TypeVar("_T")


def _loads(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise WireError(f"{what}: payload larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        value = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"{what}: not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise WireError(f"{what}: expected a JSON object")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def _dumps(obj: object) -> bytes:
    return json.dumps(asdict(obj), separators=(",", ":"), allow_nan=False).encode()  # type: ignore[call-overload]


def _build(cls: type[_T], data: dict[str, Any], what: str) -> _T:
    try:
        return cls(**data)
    except TypeError as exc:
        raise WireError(f"{what}: {exc}") from exc


def _need(what: str, name: str, value: object, kind: type | tuple[type, ...]) -> None:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise WireError(f"{what}.{name}: wrong type {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise WireError(f"{what}.{name}: not finite")


def _need_text(what: str, name: str, value: object, max_chars: int) -> None:
    """A string PostgreSQL can store and a person can read: no NUL, control or surrogate."""
    _need(what, name, value, str)
    assert isinstance(value, str)
    if len(value) > max_chars:
        raise WireError(f"{what}.{name}: longer than {max_chars} chars")
    if not value.isprintable():
        raise WireError(f"{what}.{name}: holds non-printable characters (NUL, control, surrogate)")


def _need_number(what: str, name: str, value: object, low: float, high: float) -> None:
    """An int or float (never a bool), finite, within [low, high]."""
    _need(what, name, value, (int, float))
    assert isinstance(value, int | float)
    if not low <= value <= high:
        raise WireError(f"{what}.{name}: {value!r} is outside [{low:g}, {high:g}]")


def _need_boot_id(what: str, value: object, *, allow_empty: bool, name: str = "boot_id") -> None:
    _need(what, name, value, str)
    if allow_empty and value == "":
        return
    if not (
        isinstance(value, str)
        and len(value) == BOOT_ID_HEX_CHARS
        and all(c in "0123456789abcdef" for c in value)
    ):
        raise WireError(f"{what}.{name}: expected {BOOT_ID_HEX_CHARS} lowercase hex characters")


def _need_device(what: str, value: object) -> None:
    if not is_device_id(value):
        raise WireError(f"{what}.device: {value!r} is not a device id ({DEVICE_ID_RULE})")


_HOLE_FIELDS = ("prev_boot_id", "prev_closed_ms", "prev_metrics_omitted", "started_ms")


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Retained on the state topic: the birth message, or the last will (offline)."""

    device: str
    status: DeviceStatus
    ts_ms: int
    boot_id: str = ""
    agent_version: str = ""
    config_hash: str = ""
    # metric -> unit of every signal the agent samples, so the cloud can label charts.
    units: dict[str, str] = field(default_factory=dict)
    # Set in the births of a boot that follows an unclean end (power cut, watchdog kill,
    # SIGKILL): the boot that ended so, the end of the last window it (or an earlier boot)
    # durably closed per metric, and when this boot started. The hole of each metric is
    # [prev_closed_ms[metric], started_ms) (docs/guarantees.md, "Loss is visible").
    prev_boot_id: str = ""
    prev_closed_ms: dict[str, int] = field(default_factory=dict)
    prev_metrics_omitted: int = 0
    started_ms: int = 0

    def __post_init__(self) -> None:
        _need_device("state", self.device)
        self._check_hole()
        _need("state", "units", self.units, dict)
        if len(self.units) > MAX_UNITS:
            raise WireError(f"state.units: more than {MAX_UNITS} metrics")
        for metric, unit in self.units.items():
            if not is_metric_name(metric):
                raise WireError(f"state.units: {metric!r} is not a metric name")
            _need_text("state", f"units[{metric!r}]", unit, MAX_UNIT_CHARS)
        if self.status not in ("online", "offline"):
            raise WireError(f"state.status: {self.status!r} is not online or offline")
        _need("state", "ts_ms", self.ts_ms, int)
        _need_number("state", "ts_ms", self.ts_ms, 0, MAX_TS_MS)
        # Empty: a will or birth from an agent that has no boot yet (older agents, tools).
        _need_boot_id("state", self.boot_id, allow_empty=True)
        _need_text("state", "agent_version", self.agent_version, MAX_VERSION_CHARS)
        _need_text("state", "config_hash", self.config_hash, MAX_CONFIG_HASH_CHARS)

    def _check_hole(self) -> None:
        _need("state", "prev_boot_id", self.prev_boot_id, str)
        _need("state", "prev_closed_ms", self.prev_closed_ms, dict)
        _need("state", "prev_metrics_omitted", self.prev_metrics_omitted, int)
        _need_number(
            "state", "prev_metrics_omitted", self.prev_metrics_omitted, 0, MAX_HOLE_OMITTED
        )
        _need("state", "started_ms", self.started_ms, int)
        _need_number("state", "started_ms", self.started_ms, 0, MAX_TS_MS)
        if not self.prev_boot_id:
            if self.prev_closed_ms or self.prev_metrics_omitted:
                raise WireError("state.prev_closed_ms: given without prev_boot_id")
            return
        _need_boot_id("state", self.prev_boot_id, allow_empty=False, name="prev_boot_id")
        if self.status != "online":
            raise WireError("state.prev_boot_id: only a birth (online) reports an unclean end")
        if not self.boot_id:
            raise WireError("state.boot_id: required with prev_boot_id")
        if self.prev_boot_id == self.boot_id:
            raise WireError("state.prev_boot_id: the same as boot_id")
        if self.started_ms <= 0:
            raise WireError("state.started_ms: required with prev_boot_id")
        if len(self.prev_closed_ms) > MAX_HOLE_METRICS:
            raise WireError(f"state.prev_closed_ms: more than {MAX_HOLE_METRICS} metrics")
        for metric, end_ms in self.prev_closed_ms.items():
            if not is_metric_name(metric):
                raise WireError(f"state.prev_closed_ms: {metric!r} is not a metric name")
            _need("state", f"prev_closed_ms[{metric!r}]", end_ms, int)
            _need_number("state", f"prev_closed_ms[{metric!r}]", end_ms, 0, self.started_ms)

    def to_json(self) -> bytes:
        """Without a hole, the hole's fields are left out: a cloud older than them (which
        refuses unknown fields) still takes the births of a newer agent."""
        body = asdict(self)
        if not self.prev_boot_id:
            for name in _HOLE_FIELDS:
                del body[name]
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> DeviceState:
        return _build(cls, _loads(payload, "state"), "state")


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Periodic health of an agent: backlog, losses, resources, certificate life."""

    device: str
    boot_id: str
    ts_ms: int
    outbox_batches: int
    outbox_bytes: int
    outbox_oldest_age_s: float
    dropped_batches: int
    rejected_readings: int
    driver_errors: dict[str, int] = field(default_factory=dict)
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    disk_free_bytes: int = 0
    cert_days_left: float = 0.0
    clock_synced: bool = True
    agent_version: str = ""

    def __post_init__(self) -> None:
        _need_device("health", self.device)
        for name in (
            "ts_ms",
            "outbox_batches",
            "outbox_bytes",
            "dropped_batches",
            "rejected_readings",
            "rss_bytes",
            "disk_free_bytes",
        ):
            _need("health", name, getattr(self, name), int)
            high = MAX_TS_MS if name == "ts_ms" else MAX_COUNTER
            _need_number("health", name, getattr(self, name), 0, high)
        _need_number("health", "outbox_oldest_age_s", self.outbox_oldest_age_s, 0, MAX_AGE_SECONDS)
        _need_number("health", "cpu_percent", self.cpu_percent, 0, MAX_CPU_PERCENT)
        _need_number("health", "cert_days_left", self.cert_days_left, -MAX_CERT_DAYS, MAX_CERT_DAYS)
        _need_boot_id("health", self.boot_id, allow_empty=False)
        _need("health", "clock_synced", self.clock_synced, bool)
        _need_text("health", "agent_version", self.agent_version, MAX_VERSION_CHARS)
        _need("health", "driver_errors", self.driver_errors, dict)
        if len(self.driver_errors) > MAX_DRIVER_ERROR_KEYS:
            raise WireError(f"health.driver_errors: more than {MAX_DRIVER_ERROR_KEYS} drivers")
        for key, count in self.driver_errors.items():
            _need_text("health", "driver_errors key", key, MAX_DRIVER_NAME_CHARS)
            _need("health", f"driver_errors[{key!r}]", count, int)
            _need_number("health", f"driver_errors[{key!r}]", count, 0, MAX_COUNTER)

    def to_json(self) -> bytes:
        return _dumps(self)

    @classmethod
    def from_json(cls, payload: bytes) -> Heartbeat:
        return _build(cls, _loads(payload, "health"), "health")


@dataclass(frozen=True, slots=True)
class Command:
    """A command to a device; `id` makes a retried command apply once."""

    id: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    ts_ms: int = 0

    def __post_init__(self) -> None:
        _need("cmd", "id", self.id, str)
        if not 1 <= len(self.id) <= 64:
            raise WireError("cmd.id: expected 1-64 characters")
        _need("cmd", "name", self.name, str)
        _need("cmd", "args", self.args, dict)
        _need("cmd", "ts_ms", self.ts_ms, int)

    def to_json(self) -> bytes:
        return _dumps(self)

    @classmethod
    def from_json(cls, payload: bytes) -> Command:
        return _build(cls, _loads(payload, "cmd"), "cmd")


@dataclass(frozen=True, slots=True)
class CommandReply:
    """A device's answer to a command, on the command's reply topic."""

    id: str
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    duplicate: bool = False

    def __post_init__(self) -> None:
        _need("reply", "id", self.id, str)
        _need("reply", "ok", self.ok, bool)
        _need("reply", "result", self.result, dict)
        _need("reply", "error", self.error, str)
        _need("reply", "duplicate", self.duplicate, bool)

    def to_json(self) -> bytes:
        return _dumps(self)

    @classmethod
    def from_json(cls, payload: bytes) -> CommandReply:
        return _build(cls, _loads(payload, "reply"), "reply")


@dataclass(frozen=True, slots=True)
class AlertMessage:
    """An alert raised or cleared by the cloud, published on the alerts topic."""

    alert_id: int
    device: str
    metric: str
    rule: str
    severity: Severity
    state: AlertState
    value: float | None
    ts_ms: int
    message: str = ""

    def __post_init__(self) -> None:
        _need_device("alert", self.device)
        _need("alert", "alert_id", self.alert_id, int)
        if self.severity not in ("info", "warning", "critical"):
            raise WireError(f"alert.severity: {self.severity!r} unknown")
        if self.state not in ("active", "cleared"):
            raise WireError(f"alert.state: {self.state!r} unknown")
        if self.value is not None:
            _need("alert", "value", self.value, (int, float))

    def to_json(self) -> bytes:
        return _dumps(self)

    @classmethod
    def from_json(cls, payload: bytes) -> AlertMessage:
        return _build(cls, _loads(payload, "alert"), "alert")
