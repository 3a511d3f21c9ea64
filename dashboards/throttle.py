"""Login throttle: an attempt slot is reserved per user name and per source before
the password is hashed, so parallel guesses cannot outrun the limit.

A key (a user name, or a client address) may hold at most `limit` attempts in
flight plus recent failures. The check and the reservation happen under one
lock; the caller hashes only while holding a slot and then reports the outcome.
Tracked keys are bounded: when the table is full the least recently used key
that is neither locked nor busy is evicted. A locked key is kept until its
failures expire, so flooding the table with fresh names never unlocks anyone;
when every tracked key is locked or busy, untracked keys are refused (fail
closed) until one expires.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

# Online guessing: at most this many failures (plus attempts in flight) per user name.
MAX_FAILURES_PER_USER: Final = 5
# One address may try more names than one name may be tried, but not a dictionary.
MAX_FAILURES_PER_SOURCE: Final = 20
FAILURE_WINDOW_SECONDS: Final = 300.0
MAX_TRACKED_KEYS: Final = 10_000


@dataclass(slots=True)
class _Entry:
    failures: deque[float] = field(default_factory=deque)
    in_flight: int = 0


class _Limiter:
    """Failures and in-flight attempts per key in a sliding window, LRU-bounded."""

    def __init__(self, limit: int, *, window_s: float, max_keys: int) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def _expire(self, entry: _Entry, now: float) -> None:
        while entry.failures and entry.failures[0] <= now - self.window_s:
            entry.failures.popleft()

    def _used(self, entry: _Entry, now: float) -> int:
        self._expire(entry, now)
        return len(entry.failures) + entry.in_flight

    def _make_room(self, now: float) -> bool:
        """Evict the least recently used idle, unlocked key; False when none can go."""
        for key, entry in self._entries.items():
            if entry.in_flight == 0 and self._used(entry, now) < self.limit:
                del self._entries[key]
                return True
        return False

    def can_reserve(self, key: str, now: float) -> bool:
        entry = self._entries.get(key)
        if entry is not None:
            return self._used(entry, now) < self.limit
        return len(self._entries) < self.max_keys or self._make_room(now)

    def reserve(self, key: str) -> None:
        """Take a slot; the caller checked `can_reserve` under the same lock."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        self._entries.move_to_end(key)
        entry.in_flight += 1

    def release(self, key: str, *, failed: bool, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None:  # cannot happen: a busy key is never evicted
            return
        entry.in_flight -= 1
        if failed:
            entry.failures.append(now)

    def forget(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.in_flight == 0:
            del self._entries[key]
        elif entry is not None:
            entry.failures.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Slot:
    """A reserved attempt: report `failed()` or `succeeded()` exactly once."""

    def __init__(self, throttle: LoginThrottle, name: str, source: str) -> None:
        self._throttle = throttle
        self.name = name
        self.source = source
        self._done = False

    def failed(self) -> None:
        self._finish(ok=False)

    def succeeded(self) -> None:
        self._finish(ok=True)

    def _finish(self, *, ok: bool) -> None:
        if not self._done:
            self._done = True
            self._throttle._release(self, ok=ok)


class LoginThrottle:
    """Per-user and per-source attempt slots, shared by every session of the server."""

    def __init__(
        self,
        *,
        per_user: int = MAX_FAILURES_PER_USER,
        per_source: int = MAX_FAILURES_PER_SOURCE,
        window_s: float = FAILURE_WINDOW_SECONDS,
        max_keys: int = MAX_TRACKED_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._users = _Limiter(per_user, window_s=window_s, max_keys=max_keys)
        self._sources = _Limiter(per_source, window_s=window_s, max_keys=max_keys)

    def reserve(self, name: str, source: str) -> Slot | None:
        """A slot for one password check, or None when the user or the source is locked."""
        with self._lock:
            now = self._clock()
            if not (self._users.can_reserve(name, now) and self._sources.can_reserve(source, now)):
                return None
            self._users.reserve(name)
            self._sources.reserve(source)
            return Slot(self, name, source)

    def _release(self, slot: Slot, *, ok: bool) -> None:
        with self._lock:
            now = self._clock()
            self._users.release(slot.name, failed=not ok, now=now)
            self._sources.release(slot.source, failed=not ok, now=now)
            if ok:
                self._users.forget(slot.name)

    def tracked(self) -> tuple[int, int]:
        """How many user names and sources are tracked (for tests and diagnostics)."""
        with self._lock:
            return len(self._users), len(self._sources)
