"""Groups incoming messages into commit batches; pure, the caller supplies the clock.

A batch closes when it holds `max_rows` rows or `max_delay_s` after its first
message arrived, whichever comes first: large batches when a backlog drains,
bounded latency when traffic is light.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """Collects items with a row weight; `take()` hands over and resets."""

    __slots__ = ("_items", "_max_delay_s", "_max_rows", "_opened_at", "_rows")

    def __init__(self, *, max_rows: int, max_delay_s: float) -> None:
        if max_rows < 1 or max_delay_s <= 0:
            raise ValueError("max_rows must be >= 1 and max_delay_s > 0")
        self._max_rows = max_rows
        self._max_delay_s = max_delay_s
        self._items: list[T] = []
        self._rows = 0
        self._opened_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def rows(self) -> int:
        return self._rows

    def add(self, item: T, *, rows: int, now: float) -> None:
        """Add `item`; a message without rows (state, dead letter) still weighs one."""
        if self._opened_at is None:
            self._opened_at = now
        self._items.append(item)
        self._rows += max(1, rows)

    def deadline(self) -> float | None:
        """When the open batch must close by time; None when empty."""
        return None if self._opened_at is None else self._opened_at + self._max_delay_s

    def is_full(self) -> bool:
        return self._rows >= self._max_rows

    def is_due(self, now: float) -> bool:
        """True when the batch should be written now (full, or its delay has passed)."""
        deadline = self.deadline()
        return deadline is not None and (self.is_full() or now >= deadline)

    def take(self) -> list[T]:
        """The collected items, oldest first; the batcher is empty afterwards."""
        items, self._items = self._items, []
        self._rows = 0
        self._opened_at = None
        return items
