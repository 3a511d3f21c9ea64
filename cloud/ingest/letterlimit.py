"""Dead letters rate-limited per device: a token bucket each, the overflow counted.

A dead letter keeps up to 64 KiB of payload for diagnosis; without a limit one
broken or hostile client could fill the database at line rate. Each device (the
topic's device id; "" when the topic named none) may store `burst` letters at
once and `per_minute` more every minute; letters beyond that are not stored but
counted per device (`dead_letter_overflow`, and the worker's
millrace_ingest_dead_letters_suppressed_total), so the data-quality view still
shows that a device is sending garbage, and how much.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from millrace.cloud.ingest.messages import DeadLetter

# A burst keeps a bad deploy's first rejects whole for diagnosis (1000 x 64 KiB at most);
# after that one a second per device tells the story without filling the disk.
DEFAULT_DEAD_LETTERS_PER_MINUTE: Final = 60.0
DEFAULT_DEAD_LETTER_BURST: Final = 1000
# Buckets kept; topic device ids are certificate names, so this is the fleet many times
# over. A bucket evicted comes back full, which costs at most one burst.
MAX_BUCKETS: Final = 100_000
SECONDS_PER_MINUTE: Final = 60.0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float  # monotonic seconds of the last refill


class DeadLetterLimiter:
    """Which dead letters to store; `suppressed` counts the rest per device."""

    def __init__(
        self,
        *,
        per_minute: float = DEFAULT_DEAD_LETTERS_PER_MINUTE,
        burst: int = DEFAULT_DEAD_LETTER_BURST,
        clock: Callable[[], float] = time.monotonic,
        on_suppressed: Callable[[int], object] | None = None,
    ) -> None:
        if per_minute <= 0 or burst < 1:
            raise ValueError(f"need per_minute > 0 and burst >= 1, got {per_minute}, {burst}")
        self.rate_per_s = per_minute / SECONDS_PER_MINUTE
        self.burst = burst
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.suppressed_total = 0
        self._on_suppressed = on_suppressed  # e.g. a Prometheus counter's inc

    def admit(self, letters: Sequence[DeadLetter]) -> tuple[list[DeadLetter], dict[str, int]]:
        """(letters to store, {device: letters suppressed}) for one write."""
        now = self._clock()
        kept: list[DeadLetter] = []
        suppressed: dict[str, int] = {}
        for letter in letters:
            device = letter.device or ""
            bucket = self._bucket(device, now)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                kept.append(letter)
            else:
                suppressed[device] = suppressed.get(device, 0) + 1
        count = sum(suppressed.values())
        self.suppressed_total += count
        if count and self._on_suppressed is not None:
            self._on_suppressed(count)
        return kept, suppressed

    def _bucket(self, device: str, now: float) -> _Bucket:
        bucket = self._buckets.get(device)
        if bucket is None:
            bucket = self._buckets[device] = _Bucket(float(self.burst), now)
            if len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(device)
            refill = (now - bucket.at) * self.rate_per_s
            bucket.tokens = min(float(self.burst), bucket.tokens + refill)
            bucket.at = now
        return bucket
