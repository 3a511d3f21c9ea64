"""A tiny Modbus TCP server for tests, with switchable faults (timeout, garbage, down).

pymodbus's own server would do for the happy path, but faults need byte-level
control: answer nothing, answer junk, or vanish.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Literal

Mode = Literal["ok", "timeout", "garbage", "exception", "short"]


class ModbusStub:
    def __init__(self) -> None:
        self.registers = {"holding": [0] * 65536, "input": [0] * 65536}
        self.bits = {"coil": [False] * 65536, "discrete": [False] * 65536}
        self.mode: Mode = "ok"
        self.requests = 0
        self.units: list[int] = []  # unit id of every request
        self._sock: socket.socket | None = None
        self.port = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self, port: int = 0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(8)
        self._sock = sock
        self.port = sock.getsockname()[1]
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def stop(self) -> None:
        """Disappear: close the listener and every connection (clients get refused)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                tid, _proto, length = struct.unpack(">HHH", self._recv(conn, 6))
                body = self._recv(conn, length)
                unit, function = body[0], body[1]
                start, count = struct.unpack(">HH", body[2:6])
                self.requests += 1
                self.units.append(unit)
                mode = self.mode
                if mode == "timeout":
                    continue
                if mode == "garbage":
                    conn.sendall(b"\xde\xad\xbe\xef" * 3)
                    continue
                if mode == "exception":
                    pdu = bytes([function | 0x80, 2])
                elif function in (3, 4):
                    table = self.registers["holding" if function == 3 else "input"]
                    regs = table[start : start + count]
                    if mode == "short":
                        regs = regs[:-1]
                    pdu = bytes([function, 2 * len(regs)]) + struct.pack(f">{len(regs)}H", *regs)
                else:
                    table_b = self.bits["coil" if function == 1 else "discrete"]
                    bits = table_b[start : start + count]
                    packed = bytearray((len(bits) + 7) // 8)
                    for i, bit in enumerate(bits):
                        if bit:
                            packed[i // 8] |= 1 << (i % 8)
                    pdu = bytes([function, len(packed)]) + bytes(packed)
                conn.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)
