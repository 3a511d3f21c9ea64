"""The simulated DS18B20 1-wire sensor: a sysfs-like w1_slave file kept up to date.

The file looks like the Linux w1_therm driver's::

    72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
    72 01 4b 46 7f ff 0e 10 57 t=23125

It is rewritten once per resolution step by writing a temporary file next to
it and renaming it into place, so a reader never sees a torn file.
Faults: "bad_crc" writes a wrong CRC and NO; "nan" serves the power-on reset
scratchpad (t=85000, the classic bogus DS18B20 reading); "garbage" writes
unparseable text; "dropout"/"refused" remove the device folder (the sensor
left the bus); "slow" writes each update late.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from millrace.fieldsim.faults import DeviceFaults
from millrace.fieldsim.feed import Feed
from millrace.fieldsim.groundtruth import GroundTruth
from millrace.fieldsim.models import mix, stream_key
from millrace.fieldsim.specs import FileSignal, spec_info

logger = logging.getLogger(__name__)

FAMILY_DS18B20 = "28"
# Scratchpad bytes 2..7 of a DS18B20 in 12-bit mode (TH, TL, config, reserved).
_TH, _TL, _CONFIG = 0x4B, 0x46, 0x7F
# The register value a DS18B20 holds after power-on: 85 degC.
POWER_ON_RESET_RAW = 0x0550
_RAW_PER_DEGREE = 16


def crc8(data: bytes) -> int:
    """Dallas/Maxim 1-wire CRC-8 (polynomial x^8 + x^5 + x^4 + 1, reflected)."""
    crc = 0
    for byte in data:
        for _ in range(8):
            mixbit = (crc ^ byte) & 1
            crc >>= 1
            if mixbit:
                crc ^= 0x8C
            byte >>= 1
    return crc


def scratchpad(raw: int) -> bytes:
    """The 8 data bytes for a temperature register value (1/16 degC steps)."""
    raw &= 0xFFFF
    count_remain = (0x10 - (raw & 0x0F)) & 0xFF
    return bytes([raw & 0xFF, raw >> 8, _TH, _TL, _CONFIG, 0xFF, count_remain, 0x10])


def raw_for(value: float) -> int:
    """Temperature register value for degC, saturated to the signed 16-bit range."""
    return max(-0x8000, min(0x7FFF, round(value * _RAW_PER_DEGREE)))


def millidegrees(raw: int) -> int:
    """What the kernel prints as t=: raw * 1000 / 16, truncated toward zero as C does."""
    signed = raw - 0x10000 if raw & 0x8000 else raw
    return int(signed * 1000 / _RAW_PER_DEGREE)


def render(raw: int, *, crc_ok: bool = True) -> str:
    """The w1_slave text for a register value; a bad CRC flips the CRC byte and says NO."""
    pad = scratchpad(raw)
    crc = crc8(pad)
    if not crc_ok:
        crc ^= 0xFF
    hexbytes = " ".join(f"{b:02x}" for b in (*pad, crc))
    verdict = "YES" if crc_ok else "NO"
    return f"{hexbytes} : crc={crc:02x} {verdict}\n{hexbytes} t={millidegrees(raw)}\n"


def rom_serial(seed: int, device: str) -> str:
    """12 hex digits of a stable 48-bit ROM serial for the device's folder name."""
    return f"{mix(stream_key(seed, device, '', 'rom'), 0) & 0xFFFFFFFFFFFF:012x}"


class W1Sensor:
    """One DS18B20 under <root>/<gateway>/28-<serial>/w1_slave."""

    kind = "w1"

    def __init__(
        self,
        *,
        device_id: str,
        gateway: str,
        root: Path,
        signal: FileSignal,
        feed: Feed,
        faults: DeviceFaults,
        ground_truth: GroundTruth | None = None,
    ) -> None:
        self.device_id = device_id
        self.gateway = gateway
        self.signal = signal
        self.devices_dir = root / gateway
        self.folder = self.devices_dir / f"{FAMILY_DS18B20}-{rom_serial(feed.seed, device_id)}"
        self.path = self.folder / "w1_slave"
        self._tmp = self.folder / ".w1_slave.tmp"
        self._feed = feed
        self._faults = faults
        self._gt = ground_truth
        self._present = False

    def start(self) -> None:
        """Create the device folder and write the first reading."""
        self.tick(time.time())

    def stop(self) -> None:
        """Leave the last file in place (a stopped simulator is a frozen bus)."""

    def tick(self, now: float) -> None:
        """Write the reading for the step holding `now` (called once per step)."""
        transport = self._faults.transport_at(now) if self._faults.windows else None
        if transport is not None and transport.kind in ("dropout", "refused"):
            self._remove()
            return
        text, served, ts, fault = self._reading(now, transport.kind if transport else "")
        if transport is not None and transport.kind == "slow":
            asyncio.get_running_loop().call_later(
                transport.delay_s, self._write, text, served, ts, "slow"
            )
            return
        self._write(text, served, ts, fault)

    def _reading(self, now: float, transport: str) -> tuple[str, float, float, str]:
        spec = self.signal.spec
        sample = self._feed.sample(self.device_id, spec, now, self._faults)
        if transport == "garbage":
            key = stream_key(self._feed.seed, self.device_id, spec.name, "garbage")
            noise = mix(key, math.floor(now / spec.resolution_s))
            return f"{noise:016x} ?? crc=?? t=\n", math.nan, sample.ts, "garbage"
        raw = POWER_ON_RESET_RAW if math.isnan(sample.value) else raw_for(sample.value)
        served = millidegrees(raw) * self.signal.scale
        if transport == "bad_crc":
            return render(raw, crc_ok=False), served, sample.ts, "bad_crc"
        return render(raw), served, sample.ts, sample.fault

    def _write(self, text: str, served: float, ts: float, fault: str) -> None:
        try:
            if not self._present:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._present = True
            with open(self._tmp, "w", encoding="ascii") as handle:
                handle.write(text)
            os.replace(self._tmp, self.path)
        except OSError as exc:
            logger.warning("%s: cannot write %s: %s", self.device_id, self.path, exc)
            self._present = False
            return
        if self._gt is not None:
            self._gt.record(time.time(), self.device_id, self.signal.spec.name, ts, served, fault)

    def _remove(self) -> None:
        if self._present or self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)
            self._present = False

    def describe(self) -> dict[str, Any]:
        """This device's entry in the fleet manifest."""
        return {
            "id": self.device_id,
            "gateway": self.gateway,
            "kind": self.kind,
            "protocol": "w1-sysfs",
            "devices_dir": str(self.devices_dir),
            "path": str(self.path),
            "rom": self.folder.name,
            "signals": [
                {**spec_info(self.signal.spec), "scale": self.signal.scale, "format": "ds18b20"}
            ],
        }
