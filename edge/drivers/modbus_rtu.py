"""Modbus RTU over a serial line (RS-485): several slaves (unit ids) on one bus.

One `RtuBusConnection` per bus, read by one poller thread, so requests never
overlap. Frames are built and checked here (function codes 1-4, CRC-16) over
pyserial: pymodbus's serial client does not keep the silent interval between
frames, and reports a CRC error as a plain timeout. Here:

- before every request the line stays silent for 3.5 character times after the
  last byte seen (1.75 ms above 19200 baud, as the Modbus serial line spec says);
- a reply must arrive whole within the bus's `timeout_s`; a failed request is
  sent again up to `retries` times;
- a reply with a bad CRC, from another unit or of the wrong length is a
  "garbled frame" failure; the line is drained before the next request.

A silent or garbling slave fails only its own unit's signals: the groups of the
other units on the bus are separate and read on.
"""

from __future__ import annotations

import contextlib
import struct
import termios
import threading
import time
from typing import Any

from millrace.edge.config import ModbusRtuBus
from millrace.edge.drivers.modbus import ModbusError

_FUNCTION = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
_PARITY = {"none": "N", "even": "E", "odd": "O"}
_EXCEPTIONS = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    6: "server device busy",
    11: "gateway target failed to respond",
}


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """Modbus CRC-16 (poly 0xA001, init 0xFFFF); sent low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def frame(body: bytes) -> bytes:
    """`body` (unit id, function code, data) with its CRC appended."""
    return body + struct.pack("<H", crc16(body))


def read_request(unit_id: int, table: str, start: int, count: int) -> bytes:
    return frame(struct.pack(">BBHH", unit_id, _FUNCTION[table], start, count))


class RtuBusConnection:
    """The serial port of one bus; `read` does one request/reply transaction on it."""

    def __init__(self, bus: ModbusRtuBus) -> None:
        self.bus = bus
        self.name = bus.name
        self.lock = threading.Lock()
        self.healthy: dict[int | None, bool] = {}
        self.frame_gap_s = bus.frame_gap_s
        self._serial: Any = None
        self._last_byte = 0.0  # monotonic time the line was last busy
        self.transactions = 0
        # Units whose last request went unanswered after every retry: asked once, not
        # retried, until they answer again, so a dead slave costs one timeout per group.
        self.silent: set[int] = set()

    def _port(self) -> Any:
        if self._serial is None:
            import serial  # pyserial, installed with the edge extra

            try:
                self._serial = serial.Serial(
                    self.bus.port,
                    baudrate=self.bus.baudrate,
                    bytesize=self.bus.bytesize,
                    parity=_PARITY[self.bus.parity],
                    stopbits=self.bus.stopbits,
                    timeout=self.bus.timeout_s,
                    exclusive=True,
                )
            except (OSError, ValueError, serial.SerialException) as exc:
                raise ModbusError(f"cannot open {self.bus.port}: {_short(exc)}") from exc
            except termios.error as exc:  # the port refused the line settings (a pty: parity)
                raise ModbusError(
                    f"cannot set {self.bus.port} to {self.bus.baudrate} baud, "
                    f"{self.bus.bytesize}{_PARITY[self.bus.parity]}{self.bus.stopbits}: {exc}"
                ) from exc
            self._last_byte = time.monotonic()
        return self._serial

    def _drop_port(self) -> None:
        port, self._serial = self._serial, None
        if port is not None:
            with contextlib.suppress(OSError):
                port.close()

    def read(
        self, table: str, start: int, count: int, unit_id: int | None = None
    ) -> list[int] | list[bool]:
        """Registers or bits from `unit_id`, or raise ModbusError (retried `retries` times)."""
        assert unit_id is not None, "an RTU signal always names its unit_id"
        request = read_request(unit_id, table, start, count)
        failure: ModbusError | None = None
        tries = 1 if unit_id in self.silent else self.bus.retries + 1
        for _ in range(tries):
            try:
                reply = self._transaction(request, table, unit_id, count)
            except ModbusError as exc:
                if exc.device_ok:
                    self.silent.discard(unit_id)
                    raise
                failure = exc
                continue
            self.silent.discard(unit_id)
            return reply
        assert failure is not None
        if failure.reason.startswith("no answer"):
            self.silent.add(unit_id)
        else:  # it answered, if garbled: retry it as usual
            self.silent.discard(unit_id)
        raise failure

    def _transaction(
        self, request: bytes, table: str, unit_id: int, count: int
    ) -> list[int] | list[bool]:
        import serial

        port = self._port()
        self.transactions += 1
        try:
            self._wait_silence(port)
            port.write(request)
            port.flush()  # tcdrain: returns once the request has left the UART
            self._last_byte = time.monotonic()
            reply = self._receive(port, unit_id, request[1], count, table)
        except (OSError, serial.SerialException) as exc:
            self._drop_port()
            raise ModbusError(f"serial port {self.bus.port}: {_short(exc)}") from exc
        return reply

    def _wait_silence(self, port: Any) -> None:
        """Keep the line quiet for one frame gap after the last byte, dropping stray bytes."""
        while True:
            quiet_until = self._last_byte + self.frame_gap_s
            now = time.monotonic()
            if now < quiet_until:
                time.sleep(quiet_until - now)
            if port.in_waiting:
                port.reset_input_buffer()  # a late reply or line noise: not ours
                self._last_byte = time.monotonic()
                continue
            return

    def _read_exactly(self, port: Any, size: int, deadline: float) -> bytes:
        data = b""
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            port.timeout = left
            chunk = port.read(size - len(data))
            if chunk:
                data += chunk
                self._last_byte = time.monotonic()
        return data

    def _garbled(self, port: Any, unit_id: int, what: str) -> ModbusError:
        # Let the rest of the bad frame arrive, then forget it.
        time.sleep(self.frame_gap_s)
        port.reset_input_buffer()
        self._last_byte = time.monotonic()
        return ModbusError(f"garbled frame from unit {unit_id}: {what}")

    def _receive(
        self, port: Any, unit_id: int, function: int, count: int, table: str
    ) -> list[int] | list[bool]:
        deadline = time.monotonic() + self.bus.timeout_s
        head = self._read_exactly(port, 3, deadline)
        if not head:
            raise ModbusError(f"no answer from unit {unit_id} within {self.bus.timeout_s:g} s")
        if len(head) < 3:
            raise self._garbled(port, unit_id, f"{len(head)} byte(s), then silence")
        size = 5 if head[1] == function | 0x80 else 5 + head[2]  # exception or data reply
        rest = self._read_exactly(port, size - 3, deadline)
        reply = head + rest
        if len(reply) < size:
            raise self._garbled(port, unit_id, f"{len(reply)} of {size} bytes, then silence")
        if struct.unpack("<H", reply[-2:])[0] != crc16(reply[:-2]):
            raise self._garbled(port, unit_id, "CRC error")
        if reply[0] != unit_id:
            raise self._garbled(port, unit_id, f"reply from unit {reply[0]}")
        if reply[1] == function | 0x80:
            code = reply[2]
            name = _EXCEPTIONS.get(code, "")
            shown = f"{code} ({name})" if name else str(code)
            raise ModbusError(
                f"unit {unit_id} answered with exception code {shown}", device_ok=True
            )
        if reply[1] != function:
            raise self._garbled(port, unit_id, f"function {reply[1]} in reply to {function}")
        data = reply[3:-2]
        if table in ("coil", "discrete"):
            if len(data) != (count + 7) // 8:
                raise ModbusError(f"asked for {count} bits, got {8 * len(data)}", device_ok=True)
            return [bool(data[i // 8] >> (i % 8) & 1) for i in range(count)]
        if len(data) != 2 * count:
            raise ModbusError(f"asked for {count} registers, got {len(data) // 2}", device_ok=True)
        return list(struct.unpack(f">{count}H", data))

    def close(self) -> None:
        self._drop_port()


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:120] + "..."
