"""A Modbus RTU slave bus on a pseudo-terminal pair: the serial line of the simulated plant.

`RtuBus` opens a pty (os.openpty, raw mode) and serves, from one thread, the
units (slave ids) attached to it: a `PlcDevice` model (the same PLC map and
ground truth as Modbus TCP) or a fixed `RegisterBank`. A client opens
`bus.path` (the pty's slave side, /dev/pts/N) with pyserial like any serial port.

Requests are framed by length (read functions 1-4 are 8 bytes) and by the
silent interval; a request with a bad CRC is ignored, as a real slave does.
Faults per unit, forced (`set_fault`) or scheduled (the unit's DeviceFaults):

- "bad_crc": the reply's CRC is corrupted (the value is logged as NaN, fault bad_crc);
- "silent" (scheduled "dropout" or "refused"): no reply at all;
- "slow": the reply waits the fault's delay (the whole bus waits, as on a real line);
- "garbage": nonsense words with a good CRC.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import threading
import time
import tty
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from millrace.fieldsim.faults import DeviceFaults

RtuFault = Literal["bad_crc", "silent", "slow", "garbage"]
_SILENT_KINDS = frozenset({"dropout", "refused", "silent"})
_REQUEST_BYTES = 8  # unit, function, address (2), count (2), CRC (2)
_MAX_COUNT = {1: 2000, 2: 2000, 3: 125, 4: 125}
_POLL_SECONDS = 0.05


def crc16(data: bytes) -> int:
    """Modbus CRC-16 (poly 0xA001, init 0xFFFF), sent low byte first.

    Bit by bit, as the spec draws it: the device side keeps its own implementation, so
    the edge driver's table-driven CRC is checked against an independent one.
    """
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<H", crc16(body))


class RtuUnit(Protocol):
    """One slave on the bus: values for a read, or None for an illegal address."""

    def read_table(
        self, function_code: int, address: int, count: int, *, now: float, label: str = ""
    ) -> list[int] | None: ...


@dataclass
class RegisterBank:
    """A unit with fixed tables (tests put encoded values in them)."""

    holding: dict[int, int] = field(default_factory=dict)
    input: dict[int, int] = field(default_factory=dict)
    coils: dict[int, bool] = field(default_factory=dict)
    discrete: dict[int, bool] = field(default_factory=dict)

    def read_table(
        self, function_code: int, address: int, count: int, *, now: float, label: str = ""
    ) -> list[int] | None:
        tables: dict[int, Mapping[int, int] | Mapping[int, bool]] = {
            1: self.coils,
            2: self.discrete,
            3: self.holding,
            4: self.input,
        }
        table = tables[function_code]
        return [int(table.get(address + i, 0)) for i in range(count)]


@dataclass
class _Attached:
    unit: RtuUnit
    faults: DeviceFaults | None
    forced: RtuFault | None = None


class RtuBus:
    """A pty pair whose master side answers as the slaves of one RS-485 line."""

    def __init__(self, *, name: str = "rtu") -> None:
        self.name = name
        self._units: dict[int, _Attached] = {}
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line editing: a byte is a byte
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reply_end = 0.0
        self.requests: dict[int, int] = {}  # unit id -> requests seen (good CRC)
        self.bad_requests = 0
        # Silence the line kept before each request, measured from our last reply.
        self.gaps_s: list[float] = []

    def attach(self, unit_id: int, unit: RtuUnit, faults: DeviceFaults | None = None) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError(f"unit id {unit_id} is outside 1-247")
        self._units[unit_id] = _Attached(unit, faults)

    def set_fault(self, unit_id: int, fault: RtuFault | None) -> None:
        """Force a fault on one unit (None: back to its schedule)."""
        self._units[unit_id].forced = fault

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name=f"rtu-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> RtuBus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ serving

    def _serve(self) -> None:
        buffer = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], _POLL_SECONDS)
            if not ready:
                if buffer:  # the line went quiet in the middle of a frame: drop it
                    self.bad_requests += 1
                    buffer = b""
                continue
            try:
                data = os.read(self._master, 4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            if not buffer and self._last_reply_end:
                self.gaps_s.append(time.monotonic() - self._last_reply_end)
            buffer += data
            while len(buffer) >= _REQUEST_BYTES:
                request, buffer = buffer[:_REQUEST_BYTES], buffer[_REQUEST_BYTES:]
                if struct.unpack("<H", request[-2:])[0] != crc16(request[:-2]):
                    self.bad_requests += 1  # a slave ignores a frame it cannot trust
                    buffer = b""
                    break
                self._answer(request)

    def _answer(self, request: bytes) -> None:
        unit_id, function, address, count = struct.unpack(">BBHH", request[:6])
        attached = self._units.get(unit_id)
        if attached is None:
            return  # nobody at that address: silence
        self.requests[unit_id] = self.requests.get(unit_id, 0) + 1
        now = time.time()
        fault: str | None = attached.forced
        delay = 0.0
        if fault is None and attached.faults is not None and attached.faults.windows:
            active = attached.faults.transport_at(now)
            if active is not None:
                fault, delay = active.kind, active.delay_s
        if fault in _SILENT_KINDS:
            return
        if fault == "slow":
            time.sleep(delay or 0.2)
            now = time.time()
        label = fault if fault in ("bad_crc", "garbage") else ""
        if function not in _MAX_COUNT:
            reply = with_crc(bytes([unit_id, function | 0x80, 1]))
        elif not 1 <= count <= _MAX_COUNT[function]:
            reply = with_crc(bytes([unit_id, function | 0x80, 3]))
        else:
            values = attached.unit.read_table(function, address, count, now=now, label=label)
            if values is None:
                reply = with_crc(bytes([unit_id, function | 0x80, 2]))
            elif function in (1, 2):
                packed = bytearray((count + 7) // 8)
                for i, bit in enumerate(values):
                    if bit:
                        packed[i // 8] |= 1 << (i % 8)
                reply = with_crc(bytes([unit_id, function, len(packed)]) + bytes(packed))
            else:
                data = struct.pack(f">{count}H", *(v & 0xFFFF for v in values))
                reply = with_crc(bytes([unit_id, function, len(data)]) + data)
        if fault == "bad_crc":
            reply = reply[:-1] + bytes([reply[-1] ^ 0xFF])
        os.write(self._master, reply)
        self._last_reply_end = time.monotonic()
