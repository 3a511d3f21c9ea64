"""Status and health: birth and last will on the state topic, the heartbeat's numbers."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from millrace import __version__
from millrace.edge.certexpiry import cert_days_left
from millrace.errors import PKIError
from millrace.wire import DeviceState, Heartbeat

log = logging.getLogger(__name__)

# Certificates expire in years; re-reading the file hourly is plenty.
CERT_CHECK_INTERVAL_SECONDS = 3600.0
CLOCK_CHECK_INTERVAL_SECONDS = 60.0
# adjtimex(2): the kernel's estimated maximum error grows by 500 ppm of elapsed time until a
# time daemon (chrony, systemd-timesyncd, ntpd) resets it, and saturates at 16 s. Below
# that, the clock is being disciplined: the test systemd uses for timedatectl's
# "System clock synchronized" (NTPSynchronized). STA_UNSYNC alone is not used: chrony
# keeps it set, unless told `rtcsync`, to stop the kernel from writing the RTC.
NTP_MAXERROR_LIMIT_US = 16_000_000


class _Timex(ctypes.Structure):
    """The head of struct timex (C longs: 8 bytes on 64-bit, 4 on 32-bit ABIs), then room."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 448),  # larger than the rest of struct timex on every ABI
    ]


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def agent_version() -> str:
    return __version__


def birth_message(
    *,
    device: str,
    boot_id: str,
    config_hash: str,
    now_ms: int,
    units: Mapping[str, str] | None = None,
    started_ms: int = 0,
    prev_boot_id: str = "",
    prev_closed_ms: Mapping[str, int] | None = None,
    prev_metrics_omitted: int = 0,
) -> DeviceState:
    """Retained on the state topic while the agent is connected; carries the metrics' units.

    After an unclean end of the previous run it also carries that run's hole (`prev_*`).
    """
    return DeviceState(
        device,
        "online",
        now_ms,
        boot_id,
        agent_version(),
        config_hash,
        dict(units or {}),
        prev_boot_id=prev_boot_id,
        prev_closed_ms=dict(prev_closed_ms or {}),
        prev_metrics_omitted=prev_metrics_omitted,
        started_ms=started_ms,
    )


def will_message(*, device: str, boot_id: str, config_hash: str, now_ms: int) -> DeviceState:
    """What the broker publishes (retained) when the agent vanishes, and what it sends on exit."""
    return DeviceState(device, "offline", now_ms, boot_id, agent_version(), config_hash)


class ResourceMeter:
    """CPU share since the previous sample, and current RSS, of this process."""

    def __init__(self) -> None:
        self._cpu = self._cpu_seconds()
        self._wall = time.monotonic()

    @staticmethod
    def _cpu_seconds() -> float:
        t = os.times()
        return t.user + t.system

    def cpu_percent(self) -> float:
        cpu, wall = self._cpu_seconds(), time.monotonic()
        elapsed = wall - self._wall
        share = (cpu - self._cpu) / elapsed * 100 if elapsed > 0 else 0.0
        self._cpu, self._wall = cpu, wall
        return round(share, 3)

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * _PAGE_BYTES
        except (OSError, ValueError, IndexError):
            return 0


def disk_free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


class CertClock:
    """Days until the client certificate expires, re-read hourly."""

    def __init__(self, cert: Path) -> None:
        self.cert = cert
        self._days = 0.0
        self._read_at = -CERT_CHECK_INTERVAL_SECONDS

    def days_left(self) -> float:
        now = time.monotonic()
        if now - self._read_at >= CERT_CHECK_INTERVAL_SECONDS:
            try:
                self._days = round(cert_days_left(self.cert), 3)
            except PKIError as exc:
                log.warning("cannot read client certificate: %s", exc)
            self._read_at = now
        return self._days


class ClockState:
    """Whether a time daemon disciplines the kernel clock, re-checked every minute.

    adjtimex(2) read-only: synchronised while the kernel's estimated maximum error is
    under 16 s (NTP_MAXERROR_LIMIT_US), as timedatectl reports it. `adjtimex` can be
    replaced (tests); without it (not Linux) the clock is assumed synchronised.
    """

    def __init__(self, adjtimex: Callable[[Any], int] | None = None) -> None:
        self._synced = True
        self._checked_at = -CLOCK_CHECK_INTERVAL_SECONDS
        self._adjtimex: Callable[[Any], int] | None = adjtimex
        if adjtimex is None:
            try:
                self._adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
            except (OSError, AttributeError):
                log.debug("adjtimex unavailable; assuming the clock is synchronised")

    def synced(self) -> bool:
        now = time.monotonic()
        if self._adjtimex is not None and now - self._checked_at >= CLOCK_CHECK_INTERVAL_SECONDS:
            timex = _Timex()  # modes = 0: read only
            state = self._adjtimex(ctypes.byref(timex))
            self._synced = state >= 0 and 0 <= timex.maxerror < NTP_MAXERROR_LIMIT_US
            self._checked_at = now
        return self._synced


@dataclass(frozen=True, slots=True)
class HealthInputs:
    """Everything a heartbeat reports that the agent counts itself."""

    outbox_batches: int
    outbox_bytes: int
    outbox_oldest_age_s: float
    dropped_batches: int
    rejected_readings: int
    driver_errors: dict[str, int]


def heartbeat_message(
    *,
    device: str,
    boot_id: str,
    now_ms: int,
    inputs: HealthInputs,
    meter: ResourceMeter,
    cert: CertClock,
    clock: ClockState,
    disk_path: Path,
) -> Heartbeat:
    return Heartbeat(
        device=device,
        boot_id=boot_id,
        ts_ms=now_ms,
        outbox_batches=inputs.outbox_batches,
        outbox_bytes=inputs.outbox_bytes,
        outbox_oldest_age_s=round(inputs.outbox_oldest_age_s, 3),
        dropped_batches=inputs.dropped_batches,
        rejected_readings=inputs.rejected_readings,
        driver_errors=inputs.driver_errors,
        cpu_percent=meter.cpu_percent(),
        rss_bytes=meter.rss_bytes(),
        disk_free_bytes=disk_free_bytes(disk_path),
        cert_days_left=cert.days_left(),
        clock_synced=clock.synced(),
        agent_version=agent_version(),
    )
