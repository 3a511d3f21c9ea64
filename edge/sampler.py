"""Poller threads: each field source polls on its own schedule, independent of the network.

A Modbus device gets one thread (its requests share one TCP connection), a
Modbus RTU bus one thread for every unit on it (requests never overlap); each
file and command signal gets its own (a 1-wire read or a command can block);
all sim signals share one. mqtt signals are pushed by their local broker's
paho thread. Readings go straight to the pipeline: no queue, no allocation
beyond the driver's own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from millrace.edge.config import AgentConfig, ModbusSpec, MqttSpec, OpcUaSpec, SignalConfig
from millrace.edge.drivers.base import PollGroup, ReadFailure, Sink

if TYPE_CHECKING:
    from millrace.edge.drivers.mqtt import LocalMqttSource
    from millrace.edge.drivers.opcua import OpcUaSource

log = logging.getLogger(__name__)

# A stuck driver call (a command at its timeout) delays stop by at most this.
JOIN_TIMEOUT_SECONDS = 10.0


def build_poll_groups(config: AgentConfig) -> dict[str, list[PollGroup]]:
    """Thread name -> the poll groups that thread serves."""
    threads: dict[str, list[PollGroup]] = defaultdict(list)
    modbus: dict[tuple[str, int | None, str, float], list[tuple[int, SignalConfig]]]
    modbus = defaultdict(list)
    rtu: dict[tuple[str, int | None, str, float], list[tuple[int, SignalConfig]]]
    rtu = defaultdict(list)
    sims: dict[float, list[tuple[int, SignalConfig]]] = defaultdict(list)
    for index, signal in enumerate(config.signals):
        if isinstance(signal.spec, ModbusSpec):
            spec = signal.spec
            key = (spec.device, spec.unit_id, spec.table, signal.poll_s)
            (rtu if signal.driver == "modbus_rtu" else modbus)[key].append((index, signal))
        elif signal.driver == "file":
            from millrace.edge.drivers.file import FileGroup

            threads[f"file:{signal.metric}"].append(
                FileGroup(index, signal, interval_s=signal.poll_s)
            )
        elif signal.driver == "command":
            from millrace.edge.drivers.command import CommandGroup

            threads[f"command:{signal.metric}"].append(
                CommandGroup(index, signal, interval_s=signal.poll_s)
            )
        elif signal.driver == "sim":
            sims[signal.poll_s].append((index, signal))
    if modbus:
        from millrace.edge.drivers.modbus import ModbusConnection, ModbusGroup

        connections: dict[str, ModbusConnection] = {}
        for (device, _unit, _table, poll_s), items in modbus.items():
            if device not in connections:
                connections[device] = ModbusConnection(config.modbus[device])
            threads[f"modbus:{device}"].append(
                ModbusGroup(connections[device], items, interval_s=poll_s)
            )
    if rtu:
        from millrace.edge.drivers.modbus import ModbusGroup
        from millrace.edge.drivers.modbus_rtu import RtuBusConnection

        buses: dict[str, RtuBusConnection] = {}
        # One thread per bus: its requests never overlap on the line.
        for (bus, _unit, _table, poll_s), items in rtu.items():
            if bus not in buses:
                buses[bus] = RtuBusConnection(config.modbus_rtu[bus])
            threads[f"modbus_rtu:{bus}"].append(ModbusGroup(buses[bus], items, interval_s=poll_s))
    if sims:
        from millrace.edge.drivers.sim import SimGroup

        for poll_s, items in sims.items():
            threads["sim"].append(SimGroup(items, interval_s=poll_s))
    return dict(threads)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def poll_once(group: PollGroup, sink: Sink) -> None:
    """Read a group once and hand every result to the sink."""
    ts = now_ms()
    try:
        results = group.read(ts)
    except Exception as exc:  # a driver bug must not kill the poller
        log.exception("driver error in %s", type(group).__name__)
        results = [ReadFailure(f"driver error: {type(exc).__name__}: {exc}")] * len(group.indexes)
    for index, result in zip(group.indexes, results, strict=True):
        if isinstance(result, ReadFailure):
            sink.failure(index, ts, result.reason)
        else:
            sink.reading(index, ts, result)


class PollerThread(threading.Thread):
    """Polls its groups, each at its interval, aligned to wall-clock multiples of it."""

    def __init__(self, name: str, groups: Sequence[PollGroup], sink: Sink) -> None:
        super().__init__(name=f"poll-{name}", daemon=True)
        self.groups = list(groups)
        self.sink = sink
        self.stopping = threading.Event()

    def run(self) -> None:
        mono, wall = time.monotonic(), time.time()
        due = [mono + g.interval_s - (wall % g.interval_s) for g in self.groups]
        while not self.stopping.is_set():
            i = min(range(len(due)), key=due.__getitem__)
            wait = due[i] - time.monotonic()
            if wait > 0:
                self.stopping.wait(wait)
                continue
            group = self.groups[i]
            poll_once(group, self.sink)
            due[i] += group.interval_s
            now = time.monotonic()
            if due[i] < now:  # fell behind (slow device): skip the missed polls
                missed = int((now - due[i]) // group.interval_s) + 1
                due[i] += missed * group.interval_s
        for group in self.groups:
            try:
                group.close()
            except Exception:
                log.exception("closing %s", type(group).__name__)


class Sampler:
    """Starts and stops every poller thread and local MQTT source of a config."""

    def __init__(self, config: AgentConfig, sink: Sink) -> None:
        self.config = config
        self.sink = sink
        self._threads: list[PollerThread] = []
        self._sources: list[LocalMqttSource] = []
        self._opcua: list[OpcUaSource] = []

    def start(self) -> None:
        self._start_pollers(self.config)
        pushed: dict[str, list[tuple[int, SignalConfig]]] = defaultdict(list)
        for index, signal in enumerate(self.config.signals):
            if isinstance(signal.spec, MqttSpec):
                pushed[signal.spec.source].append((index, signal))
        if pushed:
            from millrace.edge.drivers.mqtt import LocalMqttSource

            for name, items in pushed.items():
                source = LocalMqttSource(
                    self.config.local_mqtt[name],
                    items,
                    device_id=self.config.device_id,
                    sink=self.sink,
                )
                source.start()
                self._sources.append(source)
        self._start_opcua()

    def _start_opcua(self) -> None:
        """One thread (one asyncio loop, one session) per OPC UA server."""
        by_server: dict[str, list[tuple[int, SignalConfig]]] = defaultdict(list)
        for index, signal in enumerate(self.config.signals):
            if isinstance(signal.spec, OpcUaSpec):
                by_server[signal.spec.server].append((index, signal))
        if by_server:
            from millrace.edge.drivers.opcua import OpcUaSource

            for name, items in by_server.items():
                source = OpcUaSource(
                    self.config.opcua[name], items, device_id=self.config.device_id, sink=self.sink
                )
                source.start()
                self._opcua.append(source)

    def _start_pollers(self, config: AgentConfig) -> None:
        for name, groups in build_poll_groups(config).items():
            thread = PollerThread(name, groups, self.sink)
            thread.start()
            self._threads.append(thread)

    def _stop_pollers(self) -> None:
        for thread in self._threads:
            thread.stopping.set()
        deadline = time.monotonic() + JOIN_TIMEOUT_SECONDS
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def reconfigure(self, config: AgentConfig) -> None:
        """Apply new poll intervals: restart the pollers (mqtt sources stay connected)."""
        self._stop_pollers()
        self.config = config
        self._start_pollers(config)

    def stop(self) -> None:
        self._stop_pollers()
        for source in self._sources:
            source.stop()
        self._sources = []
        for opc in self._opcua:
            opc.stop()
        self._opcua = []

    def dead_threads(self) -> list[str]:
        """Names of poller threads that died while they should be polling."""
        dead = [t.name for t in self._threads if not t.is_alive() and not t.stopping.is_set()]
        return dead + [f"opcua-{s.server.name}" for s in self._opcua if not s.alive]

    def source_errors(self) -> dict[str, int]:
        """Connection failures of local MQTT sources, keyed `local_mqtt.<name>`."""
        errors = {f"local_mqtt.{s.source.name}": s.errors for s in self._sources if s.errors}
        errors.update({f"opcua.{s.server.name}": s.errors for s in self._opcua if s.errors})
        return errors
