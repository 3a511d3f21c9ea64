"""`millrace edge check`: ask the plant broker, read every signal once, report as text or JSON.

The exit code keeps the contract install.sh and the Ansible role rely on: 0 the broker
accepted the device and every signal was read, 1 the broker step or some signal failed
(the config itself is valid; the JSON's "checks" say which). A config error never gets
here; the CLI reports it with exit 2 (and, with --json, `config_failure_json`).
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass

from millrace.edge.brokercheck import BrokerResult, check_broker
from millrace.edge.config import AgentConfig, OpcUaSpec, SignalConfig
from millrace.edge.drivers.mqtt import LocalMqttSource
from millrace.edge.pipeline import MAX_ABS_VALUE, event_value
from millrace.edge.sampler import build_poll_groups, poll_once
from millrace.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError
from millrace.wire import EventValue


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


def _shown(signal: SignalConfig, raw: object) -> tuple[EventValue | None, str, str]:
    """(value, text, problem) of a raw reading, calibrated and range-checked like the pipeline."""
    if signal.kind != "numeric":
        value = event_value(signal, raw)
        if value is None:
            return None, "", f"not a {signal.kind} value: {raw!r}"
        return value, str(value), ""
    try:
        value_f = float(raw) * signal.scale + signal.offset  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, "", f"not a number: {raw!r}"
    low, high = max(signal.valid_min, -MAX_ABS_VALUE), min(signal.valid_max, MAX_ABS_VALUE)
    if math.isnan(value_f) or not low <= value_f <= high:
        problem = f"outside the valid range [{low:g}, {high:g}] (rejected)"
        return (value_f if math.isfinite(value_f) else None), f"{value_f:g}", problem
    return value_f, f"{value_f:g}", ""


def read_all_once(config: AgentConfig, *, mqtt_wait_s: float) -> list[tuple[object, str] | None]:
    """Read every signal once (mqtt signals: wait for one message each)."""
    sink = _Collector(len(config.signals))
    sources = []
    for name, source in config.local_mqtt.items():
        items = [
            (i, s)
            for i, s in enumerate(config.signals)
            if s.driver == "mqtt" and s.spec.source == name  # type: ignore[union-attr]
        ]
        if items:
            # A client id and session of its own: the running agent keeps its connection.
            src = LocalMqttSource(source, items, device_id=config.device_id, sink=sink, probe=True)
            src.start()
            sources.append((src, items))
    opcua: dict[str, list[tuple[int, SignalConfig]]] = {}
    for i, s in enumerate(config.signals):
        if isinstance(s.spec, OpcUaSpec):
            opcua.setdefault(s.spec.server, []).append((i, s))
    if opcua:
        from millrace.edge.drivers.opcua import OpcUaSource

        for name, items in opcua.items():
            OpcUaSource(
                config.opcua[name], items, device_id=config.device_id, sink=sink
            ).read_once()
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


@dataclass(frozen=True, slots=True)
class SignalResult:
    """One signal's reading in the check: its calibrated value, or why there is none."""

    metric: str
    driver: str
    kind: str
    unit: str
    value: EventValue | None
    text: str
    problem: str

    @property
    def ok(self) -> bool:
        return not self.problem


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What `edge check` found: the config passed; the broker step (None: skipped); signals."""

    device_id: str
    config: str
    broker: BrokerResult | None
    signals: tuple[SignalResult, ...]

    @property
    def failed(self) -> int:
        return sum(not s.ok for s in self.signals)

    @property
    def ok(self) -> bool:
        return not self.failed and (self.broker is None or self.broker.ok)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAILED

    def broker_text(self) -> str:
        """One line: which broker step ran, what it proved, or why it failed."""
        b = self.broker
        if b is None:
            return "broker skipped (--no-broker)"
        where = ", ".join(f"{e.host}:{e.port}" for e in b.endpoints)
        if not b.ok:
            return f"broker FAILED ({b.mode} check, {b.why}): {b.problem()}"
        line = f"broker ok ({b.mode} check, {b.why}): {b.proven} at {where}"
        if b.mode == "tls":
            line += f"; the running agent: {b.agent_text()}"
        return line

    def to_text(self) -> str:
        lines = [f"config ok: device {self.device_id}, {len(self.signals)} signal(s)"]
        lines.append(self.broker_text())
        width = max(len(s.metric) for s in self.signals)
        for s in self.signals:
            unit = f" {s.unit}" if s.unit and s.text else ""
            status = "ok" if s.ok else f"FAILED: {s.problem}"
            lines.append(f"{s.metric:<{width}}  {s.driver:<10}  {s.text}{unit}  {status}")
        if self.failed:
            lines.append(f"{self.failed} of {len(self.signals)} signal(s) could not be read")
        return "\n".join(lines)

    def to_json(self) -> str:
        signals = [
            {
                "metric": s.metric,
                "driver": s.driver,
                "kind": s.kind,
                "unit": s.unit,
                "value": s.value,
                "ok": s.ok,
                "problem": s.problem or None,
            }
            for s in self.signals
        ]
        checks = [
            {"check": "config", "ok": True, "problem": None},
            self._broker_json(),
            {
                "check": "signals",
                "ok": not self.failed,
                "problem": f"{self.failed} of {len(self.signals)} signal(s) could not be read"
                if self.failed
                else None,
            },
        ]
        document = {
            "ok": self.ok,
            "exit_code": self.exit_code,
            "device_id": self.device_id,
            "config": self.config,
            "checks": checks,
            "signals": signals,
        }
        return json.dumps(document, allow_nan=False)

    def _broker_json(self) -> dict[str, object]:
        b = self.broker
        if b is None:
            return {"check": "broker", "ok": True, "mode": "skipped", "problem": None}
        return {
            "check": "broker",
            "ok": b.ok,
            "mode": b.mode,
            "why": b.why,
            "proven": b.proven if b.ok else None,
            "problem": b.problem() or None,
            "brokers": [
                {"host": e.host, "port": e.port, "ok": not e.problem, "problem": e.problem or None}
                for e in b.endpoints
            ],
            "agent": b.agent,
        }


def run_check(config: AgentConfig, *, mqtt_wait_s: float, broker: bool = False) -> CheckReport:
    """Ask the broker (if `broker`), read every signal once, judge each as the pipeline would."""
    broker_result = check_broker(config) if broker else None
    results = read_all_once(config, mqtt_wait_s=mqtt_wait_s)
    signals = []
    for signal, result in zip(config.signals, results, strict=True):
        raw, reason = result if result is not None else (None, "not read")
        value: EventValue | None = None
        text = ""
        if not reason:
            value, text, reason = _shown(signal, raw)
        signals.append(
            SignalResult(
                metric=signal.metric,
                driver=signal.driver,
                kind=signal.kind,
                unit=signal.unit,
                value=value,
                text=text,
                problem=reason,
            )
        )
    return CheckReport(
        device_id=config.device_id,
        config=str(config.source) if config.source else "",
        broker=broker_result,
        signals=tuple(signals),
    )


def config_failure_json(exc: ConfigError) -> str:
    """The --json document for a config the check refused (exit 2)."""
    document = {
        "ok": False,
        "exit_code": EXIT_USAGE,
        "device_id": None,
        "config": exc.source,
        "checks": [{"check": "config", "ok": False, "key": exc.key, "problem": exc.problem}],
        "signals": [],
    }
    return json.dumps(document)
