"""Sequence-gap bookkeeping for one (device, boot_id) stream; pure, no I/O.

A gap is an inclusive range of seqs above which a later seq was already
committed. Batches may arrive out of order (two workers, redelivery after a
crash), so a late seq shrinks or splits an open gap instead of being an error.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Gap = tuple[int, int]
# Sorts after every (seq, high) pair with the same seq; seqs are at most 2**63 - 1.
_ABOVE_ANY_SEQ = 2**64


@dataclass(frozen=True, slots=True)
class StreamUpdate:
    """The stream's new high-water mark and open gaps after some new seqs."""

    max_seq: int
    gaps: tuple[Gap, ...]
    changed_gaps: bool
    opened: int  # gaps newly opened by seqs above the old high-water mark


def _remove(gaps: list[Gap], seq: int) -> bool:
    """Take `seq` out of the sorted, disjoint `gaps`; True if it was in one."""
    index = bisect.bisect_right(gaps, (seq, _ABOVE_ANY_SEQ)) - 1
    if index < 0:
        return False
    low, high = gaps[index]
    if not low <= seq <= high:
        return False
    pieces = [(a, b) for a, b in ((low, seq - 1), (seq + 1, high)) if a <= b]
    gaps[index : index + 1] = pieces
    return True


def advance(prev_max: int | None, gaps: Sequence[Gap], new_seqs: Iterable[int]) -> StreamUpdate:
    """Apply newly committed seqs (never seen before) to a stream's state.

    `prev_max` None means a stream never seen: its first seq counts as its start,
    because an agent's earlier batches may have been dropped by its outbox cap
    (reported separately in its health), and a late lower seq is simply stored.
    """
    seqs = sorted(set(new_seqs))
    if not seqs:
        raise ValueError("advance() needs at least one seq")
    current = seqs[0] - 1 if prev_max is None else prev_max
    open_gaps = sorted(gaps)
    changed = False
    opened = 0
    for seq in seqs:
        if seq <= current:
            changed |= _remove(open_gaps, seq)
        else:
            if seq > current + 1:
                open_gaps.append((current + 1, seq - 1))
                opened += 1
            current = seq
    return StreamUpdate(
        max_seq=current, gaps=tuple(open_gaps), changed_gaps=changed or opened > 0, opened=opened
    )
