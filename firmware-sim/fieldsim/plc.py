"""The simulated PLC: a pymodbus Modbus TCP server whose registers are computed on read.

Nothing is updated on a timer. pymodbus calls `_action` before answering a
read; it fills the requested registers from the feed for that instant and
logs each served signal to the ground truth, so an idle PLC costs nothing.
Transport faults are applied around the server: "slow" delays the answer,
"dropout" closes open connections and leaves requests unanswered, "refused"
closes the listening socket, "garbage" serves nonsense words, "bad_crc"
corrupts the response frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from millrace.errors import MillraceError
from millrace.fieldsim.clock import sleep_until
from millrace.fieldsim.codec import encode, garbage
from millrace.fieldsim.faults import DeviceFaults
from millrace.fieldsim.feed import Feed
from millrace.fieldsim.groundtruth import GroundTruth
from millrace.fieldsim.specs import PlcMap, RegisterSignal, spec_info

logger = logging.getLogger(__name__)

FC_READ_COILS = 1
FC_READ_HOLDING = 3
FC_READ_INPUT = 4
_TABLE_FC = {"coil": FC_READ_COILS, "holding": FC_READ_HOLDING, "input": FC_READ_INPUT}
# Offset of the PDU byte count in a Modbus TCP read response (MBAP is 7 bytes + function code).
_BYTE_COUNT_OFFSET = 8


class _QuietDisconnects(logging.Filter):
    """Drop pymodbus's error for answering a client that already hung up (routine for a sim)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Cancel send, because not connected", "Repeating"))


def quiet_pymodbus() -> None:
    """Keep pymodbus to warnings and drop its noise about clients that left mid-request."""
    pymodbus_logger = logging.getLogger("pymodbus")
    pymodbus_logger.setLevel(logging.WARNING)
    for name in ("pymodbus", "pymodbus.logging"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _QuietDisconnects) for f in target.filters):
            target.addFilter(_QuietDisconnects())


def _register_block(signals: list[RegisterSignal]) -> list[SimData]:
    """One contiguous read-only block spanning the table (unused addresses read as 0)."""
    if not signals:
        return [SimData(0, datatype=DataType.INVALID)]
    start = min(s.address for s in signals)
    end = max(s.address + s.words for s in signals)
    return [SimData(start, count=end - start, values=0, datatype=DataType.UINT16, readonly=True)]


def _coil_block(signals: list[RegisterSignal]) -> list[SimData]:
    start = min((s.address for s in signals), default=0)
    end = max((s.address + 1 for s in signals), default=1)
    return [SimData(start, count=end - start, values=False, datatype=DataType.BITS, readonly=True)]


class PlcDevice:
    """One simulated PLC on its own TCP port."""

    kind = "plc"

    def __init__(
        self,
        *,
        device_id: str,
        gateway: str,
        host: str,
        port: int,
        plc_map: PlcMap,
        feed: Feed,
        faults: DeviceFaults,
        ground_truth: GroundTruth | None = None,
    ) -> None:
        self.device_id = device_id
        self.gateway = gateway
        self.host = host
        self.port = port
        self.plc_map = plc_map
        self._feed = feed
        self._faults = faults
        self._gt = ground_truth
        self._tables: dict[int, tuple[RegisterSignal, ...]] = {
            fc: tuple(s for s in plc_map.signals if s.table == table)
            for table, fc in _TABLE_FC.items()
        }
        self._simdevice = SimDevice(
            id=plc_map.unit_id,
            simdata=(
                _coil_block(list(self._tables[FC_READ_COILS])),
                _coil_block([]),
                _register_block(list(self._tables[FC_READ_HOLDING])),
                _register_block(list(self._tables[FC_READ_INPUT])),
            ),
            action=self._action,
        )
        self._server: ModbusTcpServer | None = None
        self._edge_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen, and arm the schedule of connection faults."""
        await self._listen()
        if self._faults.edges(("refused", "dropout")):
            self._edge_task = asyncio.create_task(
                self._fault_edges(), name=f"{self.device_id} faults"
            )

    async def stop(self) -> None:
        """Close the listener and every client connection."""
        if self._edge_task is not None:
            self._edge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._edge_task
        await self._close()

    async def _listen(self) -> None:
        server = ModbusTcpServer(
            self._simdevice, address=(self.host, self.port), trace_packet=self._trace_packet
        )
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            raise MillraceError(
                f"{self.device_id}: cannot listen on {self.host}:{self.port} (port in use?); "
                "pick another --base-port"
            ) from exc
        self._server = server

    async def _close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.shutdown()

    def _drop_connections(self) -> None:
        if self._server is None:
            return
        for connection in list(self._server.active_connections.values()):
            connection.close()

    async def _fault_edges(self) -> None:
        for window in self._faults.edges(("refused", "dropout")):
            await sleep_until(window.start)
            logger.info("%s: fault %s starts", self.device_id, window.kind)
            if window.kind == "refused":
                await self._close()
            else:
                self._drop_connections()
            if math.isinf(window.end):
                return
            await sleep_until(window.end)
            logger.info("%s: fault %s ends", self.device_id, window.kind)
            if window.kind == "refused" and self._server is None:
                await self._listen()

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending or not self._faults.windows:
            return data
        fault = self._faults.transport_at(time.time())
        if fault is None:
            return data
        if fault.kind == "dropout":
            return b""
        if fault.kind == "bad_crc" and len(data) > _BYTE_COUNT_OFFSET:
            # The PDU claims more data than the frame carries: a frame that
            # fails its integrity check, the TCP analogue of a bad RTU CRC.
            corrupted = bytearray(data)
            corrupted[_BYTE_COUNT_OFFSET] = (corrupted[_BYTE_COUNT_OFFSET] + 2) & 0xFF
            return bytes(corrupted)
        return data

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: Any,
    ) -> ExcCodes | None:
        """Fill the registers a read asks for, at the instant it is answered."""
        signals = self._tables.get(function_code)
        if set_values is not None or not signals:
            return None
        now = time.time()
        transport = self._faults.transport_at(now) if self._faults.windows else None
        label = ""
        if transport is not None:
            if transport.kind == "dropout":
                return None
            if transport.kind == "slow":
                await asyncio.sleep(transport.delay_s)
                now = time.time()
            label = transport.kind
        if function_code == FC_READ_COILS:
            first = (address // 16) * 16
            self._fill_coils(
                signals, first, first + 16 * count, start_address, registers, now, label
            )
        else:
            self._fill_registers(
                signals, address, address + count, start_address, registers, now, label
            )
        return None

    def read_table(
        self, function_code: int, address: int, count: int, *, now: float, label: str = ""
    ) -> list[int] | None:
        """Registers (functions 3, 4) or bits (1) for a read served at `now`, logged to the
        ground truth like a TCP read; None when the range is outside the map (illegal address).

        The Modbus RTU slave (fieldsim.rtu) serves the same model through this.
        """
        signals = self._tables.get(function_code)
        if not signals:
            return None
        words = 1 if function_code == FC_READ_COILS else 0
        low = min(s.address for s in signals)
        high = max(s.address + (words or s.words) for s in signals)
        if address < low or address + count > high:
            return None
        values = [0] * count
        if function_code != FC_READ_COILS:
            self._fill_registers(signals, address, address + count, address, values, now, label)
            return values
        for sig in signals:
            if not address <= sig.address < address + count:
                continue
            served_words, served, ts, fault = self._value(sig, now, label)
            values[sig.address - address] = served_words[0]
            if self._gt is not None:
                self._gt.record(now, self.device_id, sig.spec.name, ts, served, fault)
        return values

    def _value(
        self, sig: RegisterSignal, now: float, label: str
    ) -> tuple[list[int], float, float, str]:
        """(words, served value, valid_from, fault label) for one signal."""
        sample = self._feed.sample(self.device_id, sig.spec, now, self._faults)
        if label == "garbage":
            step = math.floor(now / sig.spec.resolution_s)
            return garbage(self._feed.seed, self.device_id, sig, step), math.nan, sample.ts, label
        words, served = encode(sig, sample.value)
        if label == "bad_crc":
            return words, math.nan, sample.ts, label
        return words, served, sample.ts, sample.fault or label

    def _fill_registers(
        self,
        signals: tuple[RegisterSignal, ...],
        low: int,
        high: int,
        start_address: int,
        registers: list[int],
        now: float,
        label: str,
    ) -> None:
        gt = self._gt
        for sig in signals:
            if sig.address >= high or sig.address + sig.words <= low:
                continue
            words, served, ts, fault = self._value(sig, now, label)
            offset = sig.address - start_address
            registers[offset : offset + len(words)] = words
            if gt is not None:
                gt.record(now, self.device_id, sig.spec.name, ts, served, fault)

    def _fill_coils(
        self,
        signals: tuple[RegisterSignal, ...],
        low: int,
        high: int,
        start_address: int,
        registers: list[int],
        now: float,
        label: str,
    ) -> None:
        gt = self._gt
        for sig in signals:
            if not low <= sig.address < high:
                continue
            words, served, ts, fault = self._value(sig, now, label)
            index, bit = divmod(sig.address, 16)
            index -= start_address
            if words[0]:
                registers[index] |= 1 << bit
            else:
                registers[index] &= ~(1 << bit)
            if gt is not None:
                gt.record(now, self.device_id, sig.spec.name, ts, served, fault)

    def describe(self) -> dict[str, Any]:
        """This device's entry in the fleet manifest."""
        return {
            "id": self.device_id,
            "gateway": self.gateway,
            "kind": self.kind,
            "protocol": "modbus-tcp",
            "host": self.host,
            "port": self.port,
            "unit_id": self.plc_map.unit_id,
            "signals": [
                {
                    **spec_info(s.spec),
                    "table": s.table,
                    "address": s.address,
                    "type": s.type,
                    "word_order": s.word_order,
                    "scale": s.scale,
                    **({"states": {str(k): v for k, v in s.states}} if s.states else {}),
                }
                for s in self.plc_map.signals
            ],
        }
