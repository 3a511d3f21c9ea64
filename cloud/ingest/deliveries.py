"""Failed deliveries per message, so a message that keeps failing is dead-lettered.

Which message: `(topic, sha256(payload))`, not the MQTT DUP flag nor the packet id,
because both change or repeat across reconnects and between workers of the share
group, while the content is what keeps failing. What counts: a delivery whose batch
ended in an *unexplained* failure (an unknown SQLSTATE, a bug) - never a database
outage, a broker reconnect or a message merely released from the inbox, which are
not the message's fault. The count lives in this worker's memory: a restarted worker,
or another worker of the group, starts again from zero, so at most
`MAX_FAILED_DELIVERIES` failures per worker life pass before the dead letter.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final

from millrace.cloud.ingest.messages import Inbound

# The delivery after this many failed ones is dead-lettered (code `redelivered`).
MAX_FAILED_DELIVERIES: Final = 5
# Bounds the memory when charged messages are never delivered here again (another
# worker of the share group took them); the oldest are forgotten first.
MAX_TRACKED_MESSAGES: Final = 100_000
# A message not seen again within this long went elsewhere (or its device gave up):
# forgotten, so stale entries do not make every later message pay for a digest.
FORGET_AFTER_SECONDS: Final = 3600.0

MessageKey = tuple[str, bytes]


def message_key(msg: Inbound) -> MessageKey:
    """The identity a redelivery keeps: topic and payload digest."""
    return msg.topic, hashlib.sha256(msg.payload).digest()


class FailedDeliveries:
    """Thread-safe counts: the committer charges and clears, the main thread reads."""

    def __init__(
        self,
        max_tracked: int = MAX_TRACKED_MESSAGES,
        *,
        forget_after_s: float = FORGET_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        # key -> (failed deliveries, last failure, monotonic time of the last charge);
        # in charge order, so the stalest entries are first.
        self._counts: OrderedDict[MessageKey, tuple[int, str, float]] = OrderedDict()
        self._max_tracked = max_tracked
        self._forget_after_s = forget_after_s
        self._clock = clock

    def charge(self, messages: Iterable[Inbound], why: str) -> int:
        """One more failed delivery for each message; returns how many were charged."""
        charged = 0
        now = self._clock()
        with self._lock:
            for msg in messages:
                key = message_key(msg)
                count, _, _ = self._counts.pop(key, (0, "", now))
                self._counts[key] = (count + 1, why, now)
                charged += 1
            while self._counts and (
                len(self._counts) > self._max_tracked
                or next(iter(self._counts.values()))[2] < now - self._forget_after_s
            ):
                self._counts.popitem(last=False)
        return charged

    def clear(self, messages: Iterable[Inbound]) -> None:
        """The messages were committed (or dead-lettered): forget them."""
        with self._lock:
            if not self._counts:
                return
            for msg in messages:
                self._counts.pop(message_key(msg), None)

    def failures(self, msg: Inbound) -> tuple[int, str]:
        """How many deliveries of `msg` failed so far, and the last failure's reason."""
        with self._lock:
            if not self._counts:
                return 0, ""
            stale = self._clock() - self._forget_after_s
            while self._counts and next(iter(self._counts.values()))[2] < stale:
                self._counts.popitem(last=False)
            if not self._counts:
                return 0, ""
            count, why, _ = self._counts.get(message_key(msg), (0, "", 0.0))
            return count, why
