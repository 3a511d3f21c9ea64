"""Ground truth: an append-only CSV of every value a simulated device served.

Columns: ``served_at,device,signal,ts,value,fault``

- served_at: Unix time the value left the device (Modbus: the read was
  answered; MQTT: the publish was handed to the client; 1-wire: the file was
  renamed into place).
- ts: start of the period the value is valid for (the model's resolution
  step, or the instant a replayed row became current).
- value: engineering units as a correct reader decodes them (after register
  scaling and rounding); ``nan`` when no meaningful value was served (NaN
  fault, garbage).
- fault: the fault that shaped the value (stuck, spike, nan, out_of_range,
  garbage, bad_crc, slow), or empty.

Rows are buffered and written every GROUND_TRUTH_FLUSH_SECONDS and on close,
so a reader may lag by that much but never sees a partial line after close.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TextIO

HEADER = "served_at,device,signal,ts,value,fault\n"

logger = logging.getLogger(__name__)


class GroundTruth:
    """Buffered append-only writer of served values."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: TextIO | None = path.open("a", encoding="utf-8", buffering=1 << 16)
        if self._handle.tell() == 0:
            self._handle.write(HEADER)
        self._lines: list[str] = []
        self.rows = 0
        # The Modbus RTU slave records from its own thread.
        self._lock = threading.Lock()

    def record(
        self, served_at: float, device: str, signal: str, ts: float, value: float, fault: str = ""
    ) -> None:
        """Queue one served value."""
        line = f"{served_at:.3f},{device},{signal},{ts:.3f},{value:.12g},{fault}\n"
        with self._lock:
            self._lines.append(line)

    def flush(self) -> None:
        """Write queued rows and hand them to the OS."""
        if self._handle is None:
            return
        with self._lock:
            lines, self._lines = self._lines, []
        if lines:
            self._handle.write("".join(lines))
            self.rows += len(lines)
        self._handle.flush()

    def close(self) -> None:
        """Flush, fsync and close; later records are dropped."""
        if self._handle is None:
            return
        self.flush()
        try:
            os.fsync(self._handle.fileno())
        except OSError as exc:
            logger.warning("ground truth %s: fsync failed: %s", self.path, exc)
        self._handle.close()
        self._handle = None
