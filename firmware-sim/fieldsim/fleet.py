"""The fleet: N simulated gateways' devices in one asyncio process.

A gateway ``gw0001`` owns up to three devices: the PLC ``gw0001-plc`` on
``base_port + index - 1``, the MQTT node ``gw0001-node`` publishing on
``<prefix>/gw0001-node/sensor``, and the 1-wire sensor ``gw0001-w1`` under
``<w1_dir>/gw0001/28-.../w1_slave``. One shared ticker drives every node and
sensor; PLCs compute values only when read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from millrace.errors import ConfigError
from millrace.fieldsim.clock import next_boundary
from millrace.fieldsim.const import (
    DEFAULT_BASE_PORT,
    DEFAULT_GATEWAY_PREFIX,
    DEFAULT_HOST,
    DEFAULT_MQTT_PORT,
    DEFAULT_TOPIC_PREFIX,
    GROUND_TRUTH_FLUSH_SECONDS,
    MANIFEST_VERSION,
)
from millrace.fieldsim.faults import DeviceFaults, Fault
from millrace.fieldsim.feed import Feed
from millrace.fieldsim.groundtruth import GroundTruth
from millrace.fieldsim.manifest import write_manifest
from millrace.fieldsim.mqttnode import MqttNode
from millrace.fieldsim.onewire import W1Sensor
from millrace.fieldsim.plc import PlcDevice, quiet_pymodbus
from millrace.fieldsim.replay import Replay
from millrace.fieldsim.rtu import RtuBus
from millrace.fieldsim.specs import load_plc_map, load_sensor_specs

logger = logging.getLogger(__name__)

DeviceKind = Literal["plc", "mqtt", "w1"]
DEVICE_KINDS: tuple[DeviceKind, ...] = ("plc", "mqtt", "w1")
_SUFFIX: dict[str, str] = {"plc": "plc", "mqtt": "node", "w1": "w1", "rtu": "rtu", "opcua": "opc"}
DEFAULT_OPCUA_BASE_PORT = 14840
# The RTU PLC's slave id on its gateway's bus, and the line speed written to the manifest.
RTU_UNIT_ID = 1
RTU_BAUDRATE = 115200
# Headroom per gateway: a listening socket, a client per PLC, an MQTT socket.
_FDS_PER_GATEWAY = 6


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """Everything `millrace sim` needs to start a fleet."""

    devices: int
    kinds: tuple[DeviceKind, ...] = DEVICE_KINDS
    seed: int = 0
    host: str = DEFAULT_HOST
    base_port: int = DEFAULT_BASE_PORT
    mqtt_host: str = DEFAULT_HOST
    mqtt_port: int = DEFAULT_MQTT_PORT
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    gateway_prefix: str = DEFAULT_GATEWAY_PREFIX
    w1_dir: Path | None = None
    manifest: Path | None = None
    ground_truth: Path | None = None
    faults: tuple[Fault, ...] = ()
    replay: Path | None = None
    replay_speed: float = 1.0
    replay_loop: bool = True
    plc_map: Path | None = None
    sensors: Path | None = None
    # The first `rtu_gateways` gateways also get a PLC on a Modbus RTU bus (a pty).
    rtu_gateways: int = 0
    # The first `opcua_gateways` gateways also get a PLC on an OPC UA server (Basic256Sha256
    # SignAndEncrypt) on opcua_base_port + i, certificates made in `opcua_dir`.
    opcua_gateways: int = 0
    opcua_base_port: int = DEFAULT_OPCUA_BASE_PORT
    opcua_dir: Path | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.opcua_gateways <= self.devices:
            raise ConfigError("--opcua", f"must be between 0 and --devices ({self.devices})")
        if not 0 <= self.rtu_gateways <= self.devices:
            raise ConfigError("--rtu", f"must be between 0 and --devices ({self.devices})")
        if self.devices < 1:
            raise ConfigError("--devices", "must be at least 1")
        if not self.kinds or any(k not in DEVICE_KINDS for k in self.kinds):
            raise ConfigError("--kinds", f"must be a comma list of {','.join(DEVICE_KINDS)}")
        if "plc" in self.kinds and not 1 <= self.base_port <= 65535 - self.devices + 1:
            raise ConfigError("--base-port", f"ports {self.base_port}+{self.devices} do not fit")


def gateway_id(prefix: str, index: int) -> str:
    """The id of the index-th gateway (1-based): gw0001, gw0002, ..."""
    return f"{prefix}{index:04d}"


def device_id(gateway: str, kind: str) -> str:
    """A device's id: its gateway plus a kind suffix (-plc, -node, -w1)."""
    return f"{gateway}-{_SUFFIX[kind]}"


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Fleet:
    """Builds, runs and stops the simulated devices; owns the manifest and ground truth."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.plc_map = load_plc_map(config.plc_map)
        self.sensor_specs = load_sensor_specs(config.sensors)
        replay = None
        if config.replay is not None:
            replay = Replay.from_csv(
                config.replay, speed=config.replay_speed, loop=config.replay_loop
            )
        self.feed = Feed(seed=config.seed, replay=replay)
        self.w1_dir = config.w1_dir
        if "w1" in config.kinds and self.w1_dir is None:
            self.w1_dir = Path(tempfile.mkdtemp(prefix="fieldsim-w1-"))
        self.manifest_path = config.manifest or Path("fieldsim-manifest.json")
        self.ground_truth: GroundTruth | None = None
        self.plcs: list[PlcDevice] = []
        self.rtu: list[tuple[RtuBus, PlcDevice]] = []
        self.opcua: list[tuple[Any, dict[str, str]]] = []  # (OpcUaPlc, client files)
        self.nodes: list[MqttNode] = []
        self.sensors: list[W1Sensor] = []
        self.started_at = 0.0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def request_stop(self) -> None:
        """Ask the fleet to stop (safe from a signal handler)."""
        self._stop.set()

    def _build(self) -> None:
        cfg = self.config
        for index in range(1, cfg.devices + 1):
            gateway = gateway_id(cfg.gateway_prefix, index)
            if index <= cfg.rtu_gateways:
                self._build_rtu(gateway)
            if index <= cfg.opcua_gateways:
                self._build_opcua(gateway, cfg.opcua_base_port + index - 1)
            for kind in cfg.kinds:
                dev = device_id(gateway, kind)
                faults = DeviceFaults.pin(
                    cfg.faults, device=dev, gateway=gateway, started_at=self.started_at
                )
                if kind == "plc":
                    self.plcs.append(
                        PlcDevice(
                            device_id=dev,
                            gateway=gateway,
                            host=cfg.host,
                            port=cfg.base_port + index - 1,
                            plc_map=self.plc_map,
                            feed=self.feed,
                            faults=faults,
                            ground_truth=self.ground_truth,
                        )
                    )
                elif kind == "mqtt":
                    self.nodes.append(
                        MqttNode(
                            device_id=dev,
                            gateway=gateway,
                            host=cfg.mqtt_host,
                            port=cfg.mqtt_port,
                            prefix=cfg.topic_prefix,
                            signals=self.sensor_specs.mqtt,
                            feed=self.feed,
                            faults=faults,
                            ground_truth=self.ground_truth,
                        )
                    )
                else:
                    assert self.w1_dir is not None
                    self.sensors.append(
                        W1Sensor(
                            device_id=dev,
                            gateway=gateway,
                            root=self.w1_dir,
                            signal=self.sensor_specs.w1[0],
                            feed=self.feed,
                            faults=faults,
                            ground_truth=self.ground_truth,
                        )
                    )

    def _build_rtu(self, gateway: str) -> None:
        """One PLC (the same map and model) as unit RTU_UNIT_ID on the gateway's own pty bus."""
        dev = device_id(gateway, "rtu")
        faults = DeviceFaults.pin(
            self.config.faults, device=dev, gateway=gateway, started_at=self.started_at
        )
        plc = PlcDevice(
            device_id=dev,
            gateway=gateway,
            host="",
            port=0,
            plc_map=self.plc_map,
            feed=self.feed,
            faults=faults,
            ground_truth=self.ground_truth,
        )
        bus = RtuBus(name=dev)
        bus.attach(RTU_UNIT_ID, plc, faults)
        self.rtu.append((bus, plc))

    def _build_opcua(self, gateway: str, port: int) -> None:
        """One PLC (same map and model) on its own OPC UA endpoint; a server certificate and
        the gateway's client certificate (key 0600), trusted by the server."""
        from millrace.fieldsim.opcua import APPLICATION_URI, OpcUaPlc, make_app_certificate

        dev = device_id(gateway, "opcua")
        pki = self.config.opcua_dir or self.manifest_path.resolve().parent / "opcua"
        pki.mkdir(parents=True, exist_ok=True)
        files = {
            "server_cert": str(pki / f"{dev}.crt"),
            "cert": str(pki / f"{gateway}-opcua-client.crt"),
            "key": str(pki / f"{gateway}-opcua-client.key"),
        }
        make_app_certificate(
            Path(files["server_cert"]), pki / f"{dev}.key", common_name=dev, uri=APPLICATION_URI
        )
        make_app_certificate(
            Path(files["cert"]),
            Path(files["key"]),
            common_name=gateway,
            uri=f"urn:millrace:edge:{gateway}",
        )
        plc = OpcUaPlc(
            device_id=dev,
            gateway=gateway,
            host=self.config.host,
            port=port,
            plc_map=self.plc_map,
            feed=self.feed,
            faults=DeviceFaults.pin(
                self.config.faults, device=dev, gateway=gateway, started_at=self.started_at
            ),
            cert=Path(files["server_cert"]),
            key=pki / f"{dev}.key",
            trusted_clients=(Path(files["cert"]),),
            ground_truth=self.ground_truth,
        )
        self.opcua.append((plc, files))

    @staticmethod
    def _describe_rtu(bus: RtuBus, plc: PlcDevice) -> dict[str, Any]:
        entry = plc.describe()
        del entry["host"]
        entry.update(
            kind="rtu",
            protocol="modbus-rtu",
            port=bus.path,
            baudrate=RTU_BAUDRATE,
            unit_id=RTU_UNIT_ID,
        )
        return entry

    def manifest(self, status: str, *, stopped_at: float | None = None) -> dict[str, Any]:
        """The manifest document for the current state."""
        cfg = self.config
        devices = [
            *(d.describe() for d in self.plcs),
            *(self._describe_rtu(bus, plc) for bus, plc in self.rtu),
            *({**plc.describe(), "kind": "opcua", **files} for plc, files in self.opcua),
            *(d.describe() for d in self.nodes),
            *(d.describe() for d in self.sensors),
        ]
        gateways: dict[str, list[str]] = {}
        for entry in devices:
            gateways.setdefault(entry["gateway"], []).append(entry["id"])
        return {
            "version": MANIFEST_VERSION,
            "status": status,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "stopped_at": stopped_at,
            "seed": cfg.seed,
            "kinds": list(cfg.kinds),
            "ground_truth": str(self.ground_truth.path) if self.ground_truth else None,
            "mqtt": (
                {"host": cfg.mqtt_host, "port": cfg.mqtt_port, "prefix": cfg.topic_prefix}
                if "mqtt" in cfg.kinds
                else None
            ),
            "w1_dir": str(self.w1_dir) if self.w1_dir else None,
            "replay": (
                {"file": str(cfg.replay), "speed": cfg.replay_speed, "loop": cfg.replay_loop}
                if cfg.replay
                else None
            ),
            "faults": [f.as_dict() for f in cfg.faults],
            "gateways": [{"id": gw, "devices": ids} for gw, ids in gateways.items()],
            "devices": devices,
        }

    async def start(self) -> None:
        """Open every endpoint, then write the manifest (status running)."""
        cfg = self.config
        self.started_at = time.time()
        if self.feed.replay is not None:
            self.feed.replay.bind(self.started_at)
        if cfg.ground_truth is not None:
            self.ground_truth = GroundTruth(cfg.ground_truth)
        _raise_fd_limit(cfg.devices * _FDS_PER_GATEWAY + 256)
        quiet_pymodbus()
        self._build()
        try:
            for plc in self.plcs:
                await plc.start()
        except BaseException:
            await self._close_plcs()
            raise
        for bus, _ in self.rtu:
            bus.start()
        try:
            for opc, _ in self.opcua:
                await opc.start()
        except BaseException:
            await self._close_plcs()
            raise
        for sensor in self.sensors:
            sensor.start()
        for node in self.nodes:
            node.start(self._stop)
        self._tasks.append(asyncio.create_task(self._ticker(), name="ticker"))
        if self.ground_truth is not None:
            self._tasks.append(asyncio.create_task(self._flusher(), name="ground truth"))
        write_manifest(self.manifest_path, self.manifest("running"))
        logger.info(
            "fleet up: %d gateways (%s), manifest %s",
            cfg.devices,
            ",".join(cfg.kinds),
            self.manifest_path,
        )

    async def run(self) -> None:
        """Start, serve until `request_stop`, stop."""
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Close every endpoint, flush the ground truth, mark the manifest stopped."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await asyncio.gather(*(node.wait_stopped() for node in self.nodes))
        await self._close_plcs()
        for bus, _ in self.rtu:
            bus.stop()
        for sensor in self.sensors:
            sensor.stop()
        if self.ground_truth is not None:
            self.ground_truth.close()
        if self.started_at:
            write_manifest(self.manifest_path, self.manifest("stopped", stopped_at=time.time()))
        logger.info("fleet stopped")

    async def _close_plcs(self) -> None:
        await asyncio.gather(*(plc.stop() for plc in self.plcs), return_exceptions=True)
        await asyncio.gather(*(opc.stop() for opc, _ in self.opcua), return_exceptions=True)

    async def _ticker(self) -> None:
        """One timer for all nodes and sensors, aligned on the resolution grid."""
        if not self.nodes and not self.sensors:
            return
        resolutions: Sequence[float] = [
            *(s.spec.resolution_s for s in self.sensor_specs.mqtt),
            *(s.spec.resolution_s for s in self.sensor_specs.w1),
        ]
        resolution = min(resolutions)
        while True:
            boundary = next_boundary(time.time(), resolution)
            await asyncio.sleep(boundary - time.time())
            # The loop's timers may fire a hair early; never tick the old step twice.
            now = max(time.time(), boundary)
            for sensor in self.sensors:
                sensor.tick(now)
            for node in self.nodes:
                node.tick(now)

    async def _flusher(self) -> None:
        assert self.ground_truth is not None
        while True:
            await asyncio.sleep(GROUND_TRUTH_FLUSH_SECONDS)
            self.ground_truth.flush()
