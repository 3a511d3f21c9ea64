"""Modbus TCP signals (pymodbus): registers and bits, 16/32/64-bit types, batched reads.

The register decoding here (16/32/64-bit integers and floats, strings, one bit of a
register, word and byte order) is shared with Modbus RTU (drivers/modbus_rtu.py).

Signals of one device, table and poll interval whose addresses lie close
together are read with one request. A device that refuses or times out costs
one failure per poll (the rest of the poll is skipped), never one per signal.
"""

from __future__ import annotations

import inspect
import logging
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from millrace.edge.config import ModbusDevice, ModbusSpec, SignalConfig
from millrace.edge.drivers.base import ReadFailure, ReadResult

log = logging.getLogger(__name__)

# Protocol limits per request (Modbus application protocol spec, functions 1-4).
MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000
# Reading a few unused registers is cheaper than another round trip.
MAX_GAP_REGISTERS = 16
MAX_GAP_BITS = 64
_FORMATS = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "float32": "f",
    "int64": "q",
    "uint64": "Q",
    "float64": "d",
}
_READERS = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}


def decode_registers(registers: Sequence[int], spec: ModbusSpec) -> float | int | bool | str:
    """The value of `spec` from its registers (len == spec.width).

    word_order little: the lowest word comes first (CDAB for 32 bits); byte_order
    little: the low byte of each register comes first (BADC). A string keeps two
    characters per register, first character in the high byte (byte_order big),
    and ends at the first NUL; trailing spaces are dropped.
    """
    if spec.bit is not None:
        return bool((registers[0] >> spec.bit) & 1)
    if spec.type == "string":
        word_format = ">H" if spec.byte_order == "big" else "<H"
        raw = b"".join(struct.pack(word_format, w & 0xFFFF) for w in registers)
        return raw.split(b"\0", 1)[0].decode("latin-1").rstrip(" ")
    words = list(registers)
    if spec.word_order == "little":
        words.reverse()
    word_format = ">H" if spec.byte_order == "big" else "<H"
    raw = b"".join(struct.pack(word_format, w & 0xFFFF) for w in words)
    value: float | int = struct.unpack(">" + _FORMATS[spec.type], raw)[0]
    return value


def encode_registers(value: float | int | str, spec: ModbusSpec) -> list[int]:
    """The inverse of decode_registers (used by tests and simulators)."""
    word_format = ">H" if spec.byte_order == "big" else "<H"
    if spec.type == "string":
        raw = str(value).encode("latin-1")[: 2 * spec.length].ljust(2 * spec.length, b"\0")
        return [struct.unpack(word_format, raw[i : i + 2])[0] for i in range(0, len(raw), 2)]
    raw = struct.pack(">" + _FORMATS[spec.type], value)
    words = [struct.unpack(word_format, raw[i : i + 2])[0] for i in range(0, len(raw), 2)]
    if spec.word_order == "little":
        words.reverse()
    return words


def decode_span(table: str, values: Sequence[int] | Sequence[bool], span: Span) -> list[ReadResult]:
    """One result per member of `span` from the span's registers or bits."""
    results: list[ReadResult] = []
    for _, spec in span.members:
        offset = spec.address - span.start
        if table in ("coil", "discrete"):
            results.append(bool(values[offset]))
        else:
            words = values[offset : offset + spec.width]
            results.append(decode_registers(words, spec))  # type: ignore[arg-type]
    return results


@dataclass(frozen=True, slots=True)
class Span:
    """One read request: `count` units from `start`, serving `members` (index, spec)."""

    start: int
    count: int
    members: tuple[tuple[int, ModbusSpec], ...]


def plan_spans(items: Sequence[tuple[int, ModbusSpec]]) -> list[Span]:
    """Merge signals of one table into as few requests as the protocol limits allow."""
    if not items:
        return []
    bits = items[0][1].table in ("coil", "discrete")
    limit = MAX_BITS_PER_READ if bits else MAX_REGISTERS_PER_READ
    gap = MAX_GAP_BITS if bits else MAX_GAP_REGISTERS
    ordered = sorted(items, key=lambda item: (item[1].address, item[0]))
    spans: list[Span] = []
    members: list[tuple[int, ModbusSpec]] = []
    start = end = 0
    for index, spec in ordered:
        item_end = spec.address + spec.width
        if members and spec.address - end <= gap and max(end, item_end) - start <= limit:
            members.append((index, spec))
            end = max(end, item_end)
            continue
        if members:
            spans.append(Span(start, end - start, tuple(members)))
        members, start, end = [(index, spec)], spec.address, item_end
    spans.append(Span(start, end - start, tuple(members)))
    return spans


class ModbusConnection:
    """One pymodbus client per device, shared by that device's groups (one thread)."""

    def __init__(self, device: ModbusDevice) -> None:
        from pymodbus.client import ModbusTcpClient

        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # we count and report
        self.device = device
        self.name = device.name
        self.lock = threading.Lock()
        self.client = ModbusTcpClient(
            device.host, port=device.port, timeout=device.timeout_s, retries=0
        )
        params = inspect.signature(self.client.read_holding_registers).parameters
        # pymodbus renamed `slave` to `device_id` in 3.10.
        self._unit_kw = "device_id" if "device_id" in params else "slave"
        # Health per unit id (None: the device's own), for one log line per change.
        self.healthy: dict[int | None, bool] = {}

    def read(
        self, table: str, start: int, count: int, unit_id: int | None = None
    ) -> list[int] | list[bool]:
        """Registers or bits, or raise ModbusError with a short reason."""
        from pymodbus.exceptions import ModbusException

        if not self.client.connected and not self.client.connect():
            raise ModbusError(f"cannot connect to {self.device.host}:{self.device.port}")
        try:
            unit = self.device.unit_id if unit_id is None else unit_id
            kwargs: dict[str, Any] = {"count": count, self._unit_kw: unit}
            response = getattr(self.client, _READERS[table])(start, **kwargs)
        except ModbusException as exc:
            self.client.close()
            raise ModbusError(_short(exc)) from exc
        except (OSError, ValueError, struct.error) as exc:
            self.client.close()
            raise ModbusError(f"garbled response: {exc}") from exc
        if response.isError():
            code = getattr(response, "exception_code", "?")
            raise ModbusError(f"device answered with exception code {code}", device_ok=True)
        if table in ("coil", "discrete"):
            bits = list(response.bits)
            if len(bits) < count:
                raise ModbusError(f"asked for {count} bits, got {len(bits)}", device_ok=True)
            return bits[:count]
        registers = list(response.registers)
        if len(registers) != count:
            raise ModbusError(f"asked for {count} registers, got {len(registers)}", device_ok=True)
        return registers

    def close(self) -> None:
        self.client.close()


def _short(exc: Exception) -> str:
    text = str(exc).replace("Modbus Error: ", "")
    return text if len(text) <= 120 else text[:120] + "..."


class ModbusError(Exception):
    """A failed request; `device_ok` when the device answered (other spans may still work)."""

    def __init__(self, reason: str, *, device_ok: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.device_ok = device_ok


class Connection(Protocol):
    """A Modbus link (a TCP device, a serial bus) that groups read through, one at a time."""

    name: str
    lock: threading.Lock
    healthy: dict[int | None, bool]

    def read(
        self, table: str, start: int, count: int, unit_id: int | None = None
    ) -> list[int] | list[bool]: ...

    def close(self) -> None: ...


class ModbusGroup:
    """Signals of one device (unit), table and poll interval, read span by span.

    A failure that is not the device's answer (timeout, refused, CRC error) skips the
    rest of the group's spans: that unit costs one failure per poll, not one per span.
    """

    def __init__(
        self,
        connection: Connection,
        items: Sequence[tuple[int, SignalConfig]],
        *,
        interval_s: float,
    ) -> None:
        specs = []
        for index, signal in items:
            assert isinstance(signal.spec, ModbusSpec)
            specs.append((index, signal.spec))
        self.connection = connection
        self.interval_s = interval_s
        self.table = specs[0][1].table
        self.unit_id = specs[0][1].unit_id
        self.spans = plan_spans(specs)
        self.indexes = tuple(index for span in self.spans for index, _ in span.members)

    def read(self, ts_ms: int) -> list[ReadResult]:
        results: list[ReadResult] = []
        failure: ReadFailure | None = None
        conn = self.connection
        with conn.lock:
            for span in self.spans:
                if failure is not None:
                    results.extend(failure for _ in span.members)
                    continue
                try:
                    values = conn.read(self.table, span.start, span.count, self.unit_id)
                except ModbusError as exc:
                    span_failure = ReadFailure(exc.reason)
                    results.extend(span_failure for _ in span.members)
                    if not exc.device_ok:
                        failure = span_failure
                    continue
                results.extend(decode_span(self.table, values, span))
            self._log_health(failure)
        return results

    def _log_health(self, failure: ReadFailure | None) -> None:
        conn = self.connection
        healthy = conn.healthy.get(self.unit_id, True)
        who = conn.name if self.unit_id is None else f"{conn.name} unit {self.unit_id}"
        if failure is not None and healthy:
            log.warning("modbus device %s failing: %s", who, failure.reason)
        elif failure is None and not healthy:
            log.info("modbus device %s answering again", who)
        conn.healthy[self.unit_id] = failure is None

    def close(self) -> None:
        self.connection.close()
