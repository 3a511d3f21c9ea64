"""Batches the broker took but the cloud has not receipted yet, and when to send them again.

A PUBACK only says the broker has a batch; a broker that dies before its autosave,
or a shared-subscription member that dies for good, can still lose it. So a batch
stays in the outbox until a receipt deletes it, and one the broker took is sent
again after a jittered wait (the cloud's ledger absorbs the copy). Pure: the
publisher passes the monotonic clock in, tests pass their own.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

# Each wait is drawn from [wait_s, JITTER_SPAN * wait_s] so a fleet does not resend in step.
JITTER_SPAN = 2.0


class Unreceipted:
    """Outbox row ids sent and PUBACKed but not receipted, each with its resend time."""

    def __init__(self, *, wait_s: float, rng: random.Random | None = None) -> None:
        if wait_s <= 0:
            raise ValueError("wait_s must be > 0 (broker.receipt_wait_s)")
        self.wait_s = wait_s
        self._rng = rng or random.Random()
        self._due: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._due)

    def sent(self, row_id: int, now: float) -> None:
        """The broker took `row_id` at `now`: resend it if no receipt comes in time."""
        self._due[row_id] = now + self._rng.uniform(self.wait_s, JITTER_SPAN * self.wait_s)

    def forget(self, row_ids: Iterable[int]) -> None:
        """Receipted (or gone from the outbox): never resend these."""
        for row_id in row_ids:
            self._due.pop(row_id, None)

    def clear(self) -> None:
        self._due.clear()

    def due(self, now: float, *, limit: int) -> list[int]:
        """Up to `limit` row ids whose wait is over, oldest row first; they leave the set.

        The caller resends them; their PUBACK puts them back with a fresh wait.
        """
        ready = sorted(row_id for row_id, at in self._due.items() if at <= now)[:limit]
        for row_id in ready:
            del self._due[row_id]
        return ready

    def next_due(self) -> float | None:
        """The earliest resend time, or None when nothing waits for a receipt."""
        return min(self._due.values(), default=None)
