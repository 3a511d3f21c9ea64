"""Backoff grows, is jittered and capped; the token bucket bounds the backlog drain rate."""

from __future__ import annotations

import random

from millrace.edge.pacing import JITTER_LOW, Backoff, TokenBucket


def test_backoff_grows_exponentially_with_jitter_and_cap() -> None:
    backoff = Backoff(min_s=1.0, max_s=30.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(10)]
    ceilings = [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert JITTER_LOW * ceiling <= delay <= ceiling
    assert len({round(d, 6) for d in delays[5:]}) > 1  # jittered, not lockstep
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_token_bucket_limits_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=10.0, now=0.0)
    taken = sum(bucket.take(0.0) for _ in range(100))
    assert taken == 10
    assert not bucket.take(0.05)
    assert bucket.wait_s(0.05) > 0
    # Over 10 more seconds at most rate * 10 more.
    t, more = 0.05, 0
    while t < 10.05:
        t += 0.01
        more += bucket.take(t)
    assert 99 <= more <= 101
