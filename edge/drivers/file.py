"""Numbers from files: sysfs-style values and the Linux 1-wire DS18B20 `w1_slave` format."""

from __future__ import annotations

from millrace.edge.config import FileSpec, SignalConfig
from millrace.edge.drivers.base import ReadFailure, ReadResult, text_or_number

# The kernel's w1_therm file is two short lines; anything longer is not one.
MAX_FILE_BYTES = 4096
W1_SCRATCHPAD_BYTES = 9
# The DS18B20's power-on register value (85.0 C): read before any conversion finished, it is
# the classic bogus reading (brown-out, bus glitch) and far likelier than a real 85.000 C.
W1_POWER_ON_RESET = b"\x50\x05"


def dallas_crc8(data: bytes) -> int:
    """The 1-wire CRC (polynomial x^8 + x^5 + x^4 + 1, reflected 0x8C)."""
    crc = 0
    for byte in data:
        for _ in range(8):
            mix = (crc ^ byte) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            byte >>= 1
    return crc


def parse_w1_slave(text: str) -> float | ReadFailure:
    """Degrees C from a `w1_slave` file, checking the kernel's verdict and the CRC itself.

    Example::

        72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
        72 01 4b 46 7f ff 0e 10 57 t=23125
    """
    lines = text.strip().splitlines()
    if len(lines) != 2:
        return ReadFailure(f"w1_slave: expected 2 lines, got {len(lines)}")
    crc_line, value_line = lines
    if not crc_line.rstrip().endswith("YES"):
        return ReadFailure("w1_slave: CRC check failed (kernel says NO)")
    try:
        head = crc_line.split(":", 1)[0].split()
        scratchpad = bytes(int(part, 16) for part in head)
    except ValueError:
        return ReadFailure("w1_slave: unreadable scratchpad bytes")
    if len(scratchpad) != W1_SCRATCHPAD_BYTES:
        return ReadFailure(f"w1_slave: expected {W1_SCRATCHPAD_BYTES} scratchpad bytes")
    if not any(scratchpad):
        return ReadFailure("w1_slave: all-zero scratchpad (sensor disconnected?)")
    if dallas_crc8(scratchpad[:8]) != scratchpad[8]:
        return ReadFailure("w1_slave: CRC mismatch")
    if scratchpad[:2] == W1_POWER_ON_RESET:
        return ReadFailure("w1_slave: power-on reset value 85 C (no conversion done)")
    marker = value_line.rfind("t=")
    if marker < 0:
        return ReadFailure("w1_slave: no t= value")
    try:
        millidegrees = int(value_line[marker + 2 :].strip())
    except ValueError:
        return ReadFailure("w1_slave: t= is not an integer")
    return millidegrees / 1000.0


class FileGroup:
    """One file signal (each has its own thread: a 1-wire read blocks ~750 ms)."""

    def __init__(self, index: int, signal: SignalConfig, *, interval_s: float) -> None:
        assert isinstance(signal.spec, FileSpec)
        self.indexes = (index,)
        self.interval_s = interval_s
        self._signal = signal
        self._spec = signal.spec

    def read(self, ts_ms: int) -> list[ReadResult]:
        try:
            with open(self._spec.path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            return [ReadFailure(f"cannot read {self._spec.path}: {exc.strerror or exc}")]
        if len(raw) > MAX_FILE_BYTES:
            return [ReadFailure(f"{self._spec.path} is larger than {MAX_FILE_BYTES} bytes")]
        text = raw.decode("utf-8", errors="replace")
        if self._spec.format == "w1_slave":
            return [parse_w1_slave(text)]
        return [text_or_number(self._signal, text)]

    def close(self) -> None:
        pass
