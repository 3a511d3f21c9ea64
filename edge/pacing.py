"""Pacing for the publisher: jittered backoff, a token bucket, the send offset (pure)."""

from __future__ import annotations

import hashlib
import random

# Each delay is drawn from [JITTER_LOW * d, d] so a fleet that lost the broker
# together does not come back in lockstep.
JITTER_LOW = 0.5


class Backoff:
    """Exponential reconnect delays between `min_s` and `max_s`, jittered."""

    def __init__(self, *, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; grows until `max_s`."""
        ceiling = min(self.max_s, self.min_s * (2**self._attempt))
        if ceiling < self.max_s:
            self._attempt += 1
        return self._rng.uniform(JITTER_LOW * ceiling, ceiling)

    def reset(self) -> None:
        """A connection succeeded: start from `min_s` again."""
        self._attempt = 0


class TokenBucket:
    """At most `rate` events per second on average, bursts up to `burst`."""

    def __init__(self, *, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = self.burst
        self._at = now

    def take(self, now: float) -> bool:
        """Spend one token if available."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_s(self, now: float) -> float:
        """Seconds until a token is available."""
        tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        return max(0.0, (1.0 - tokens) / self.rate)


def publish_offset_s(device_id: str, spread_s: float) -> float:
    """How long after a window close this device sends the batch: in [0, spread_s), stable.

    Every agent closes its windows on the same wall-clock edges; without an offset a
    fleet publishes at once and the broker and ingest see a burst each period. The
    offset is a hash of the device id, so it survives restarts and needs no
    per-device setting. BLAKE2b rather than the crc32 of edge/brokers.py: crc32 is
    linear, and sequential ids (gw-00001, gw-00002, ...) bunch up under it (1,000
    of them filled the fifths of the range 136 to 240 times instead of 200).
    """
    if spread_s <= 0:
        return 0.0
    digest = hashlib.blake2b(device_id.encode(), digest_size=4).digest()
    return spread_s * int.from_bytes(digest, "big") / 2**32
