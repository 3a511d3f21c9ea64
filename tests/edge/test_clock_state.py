"""The heartbeat's clock flag: true while a time daemon disciplines the kernel clock, the
same test timedatectl uses ("System clock synchronized": maximum error under 16 s)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from millrace.edge.health import NTP_MAXERROR_LIMIT_US, ClockState

TIME_OK, TIME_ERROR = 0, 5
STA_PLL, STA_UNSYNC = 0x0001, 0x0040


def _kernel(*, state: int, maxerror_us: int, status: int) -> Callable[[Any], int]:
    """A stand-in for adjtimex(2) that reports the given clock."""

    def adjtimex(ref: Any) -> int:
        timex = ref._obj  # ctypes.byref(struct) -> the struct
        assert timex.modes == 0  # read-only: the agent never sets the clock
        timex.maxerror, timex.status = maxerror_us, status
        return state

    return adjtimex


@pytest.mark.parametrize(
    ("state", "maxerror_us", "status", "synced"),
    [
        # chrony, systemd-timesyncd, ntpd disciplining the clock
        (TIME_OK, 35_000, STA_PLL, True),
        # chrony without `rtcsync` keeps STA_UNSYNC set (adjtimex says TIME_ERROR): still
        # disciplined, as timedatectl says; the old flag called this clock unsynced.
        (TIME_ERROR, 120_000, STA_PLL | STA_UNSYNC, True),
        # no time daemon: the maximum error has run up to its 16 s ceiling
        (TIME_ERROR, NTP_MAXERROR_LIMIT_US, STA_UNSYNC, False),
        (TIME_OK, NTP_MAXERROR_LIMIT_US, 0, False),
        # adjtimex refused (a seccomp filter): not known to be disciplined
        (-1, 0, 0, False),
    ],
)
def test_clock_flag_means_a_time_daemon_disciplines_the_clock(
    state: int, maxerror_us: int, status: int, synced: bool
) -> None:
    clock = ClockState(adjtimex=_kernel(state=state, maxerror_us=maxerror_us, status=status))
    assert clock.synced() is synced


def test_clock_flag_reads_this_hosts_kernel() -> None:
    assert isinstance(ClockState().synced(), bool)  # the real adjtimex call, read-only
