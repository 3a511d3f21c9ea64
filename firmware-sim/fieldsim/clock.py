"""Wall-clock helpers shared by the devices."""

from __future__ import annotations

import asyncio
import math
import time


async def sleep_until(when: float) -> None:
    """Sleep until Unix time `when` (returns at once if it has passed; never for inf)."""
    if math.isinf(when):
        await asyncio.Event().wait()
    delay = when - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def next_boundary(now: float, resolution_s: float) -> float:
    """The next multiple of resolution_s after now."""
    return (math.floor(now / resolution_s) + 1) * resolution_s
