"""Sequence streams and gaps: each (device, boot_id) stream's high-water mark and holes.

A gap is an inclusive range of seqs above which a later seq was already
committed. Batches may arrive out of order (two workers, redelivery after a
crash), so a late seq shrinks or splits an open gap instead of being an error.
`advance` is the pure bookkeeping; `record_streams` applies it to `ingest_streams`
and `sequence_gaps` inside the batch transaction, locking each stream's row so two
workers taking turns on one device see one high-water mark.

The work per late seq is constant: it looks up only the gap that holds it (an index
probe on `(device_id, boot_id, seq_from)`) and rewrites only that gap's rows, so a
stream with thousands of open gaps costs no more per late batch than one with a
single gap. A stream keeps at most `max_gaps` open gaps (`ingest_streams.open_gaps`
counts them); beyond the cap its oldest (lowest) gaps are forgotten and counted in
`ingest_streams.gaps_dropped`, so one device sending every other seq cannot make
its bookkeeping grow without end. `ingest_streams.gaps_floor` is the highest start
of a forgotten gap; every index lookup starts above it, so the deleted entries
below (not yet vacuumed) are never walked again, and a late seq at or below it
needs no lookup at all.
"""

from __future__ import annotations

import bisect
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg

from millrace.cloud.ingest.messages import Incoming

log = logging.getLogger(__name__)

Gap = tuple[int, int]
StreamKey = tuple[int, uuid.UUID]
# Sorts after every (seq, high) pair with the same seq; seqs are at most 2**63 - 1.
_ABOVE_ANY_SEQ = 2**64
# Open gaps kept per (device, boot): far above what a healthy agent shows (a gap is a
# lost batch), low enough that a hostile or broken one stays cheap.
DEFAULT_MAX_GAPS_PER_STREAM: Final = 1000
# `ingest_streams.gaps_floor` of a stream that has forgotten no gap yet.
NO_FLOOR: Final = -1


@dataclass(frozen=True, slots=True)
class StreamUpdate:
    """The stream's new high-water mark and open gaps after some new seqs."""

    max_seq: int
    gaps: tuple[Gap, ...]
    changed_gaps: bool
    opened: int  # gaps newly opened by seqs above the old high-water mark


@dataclass(frozen=True, slots=True)
class StreamsResult:
    """What `record_streams` did: gaps opened, and old gaps forgotten over the cap."""

    opened: int
    dropped: int


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


_STREAMS_INSERT: Final = """
INSERT INTO ingest_streams (
    device_id, boot_id, first_seq, max_seq, batches, first_at, last_at, open_gaps)
SELECT d, b, f, m, n, t, t, g FROM unnest(
    %b::int4[], %b::uuid[], %b::int8[], %b::int8[], %b::int8[], %b::timestamptz[], %b::int4[])
    AS u(d, b, f, m, n, t, g)
ON CONFLICT DO NOTHING
RETURNING device_id, boot_id
"""

_STREAMS_LOCK: Final = """
SELECT s.device_id, s.boot_id, s.max_seq, s.open_gaps, s.gaps_floor
FROM ingest_streams s
JOIN unnest(%b::int4[], %b::uuid[]) AS u(d, b) ON s.device_id = u.d AND s.boot_id = u.b
ORDER BY s.device_id, s.boot_id
FOR UPDATE OF s
"""

_STREAMS_UPDATE: Final = """
UPDATE ingest_streams s SET
    first_seq = least(s.first_seq, u.f), max_seq = u.m, batches = s.batches + u.n,
    last_at = greatest(s.last_at, u.t), open_gaps = u.g
FROM unnest(
    %b::int4[], %b::uuid[], %b::int8[], %b::int8[], %b::int8[], %b::timestamptz[], %b::int4[])
    AS u(d, b, f, m, n, t, g)
WHERE s.device_id = u.d AND s.boot_id = u.b
"""

# The one gap that may hold each late seq: the last gap starting at or below it (and
# above the stream's floor `f`, below which every gap was forgotten).
_GAPS_HOLDING: Final = """
SELECT DISTINCT g.device_id, g.boot_id, g.seq_from, g.seq_to, g.detected_at
FROM unnest(%b::int4[], %b::uuid[], %b::int8[], %b::int8[]) AS u(d, b, s, f)
CROSS JOIN LATERAL (
    SELECT * FROM sequence_gaps x
    WHERE x.device_id = u.d AND x.boot_id = u.b AND x.seq_from <= u.s AND x.seq_from > u.f
    ORDER BY x.seq_from DESC LIMIT 1
) g
WHERE u.s <= g.seq_to
ORDER BY g.device_id, g.boot_id, g.seq_from
"""

_GAPS_DELETE: Final = """
DELETE FROM sequence_gaps g
USING unnest(%b::int4[], %b::uuid[], %b::int8[]) AS u(d, b, f)
WHERE g.device_id = u.d AND g.boot_id = u.b AND g.seq_from = u.f
"""

# New gaps, and the pieces of split gaps; a piece keeping its gap's start updates it in place.
_GAPS_UPSERT: Final = """
INSERT INTO sequence_gaps (device_id, boot_id, seq_from, seq_to, detected_at)
SELECT * FROM unnest(%b::int4[], %b::uuid[], %b::int8[], %b::int8[], %b::timestamptz[])
ORDER BY 1, 2, 3
ON CONFLICT (device_id, boot_id, seq_from) DO UPDATE SET seq_to = excluded.seq_to
"""

# Forget each stream's oldest gaps beyond the cap (n per stream, lowest seqs first,
# searched from above its floor f); returns each stream's highest start forgotten. The
# victims are chosen first (MATERIALIZED): joined inside the DELETE, the planner ran
# the per-stream search once per gap of the stream (cap x n index scans per commit).
_GAPS_TRIM: Final = """
WITH doomed AS MATERIALIZED (
    SELECT u.d, u.b, o.seq_from
    FROM unnest(%b::int4[], %b::uuid[], %b::int4[], %b::int8[]) AS u(d, b, n, f)
    CROSS JOIN LATERAL (
        SELECT x.seq_from FROM sequence_gaps x
        WHERE x.device_id = u.d AND x.boot_id = u.b AND x.seq_from > u.f
        ORDER BY x.seq_from LIMIT u.n
    ) o
), gone AS (
    DELETE FROM sequence_gaps g USING doomed v
    WHERE g.device_id = v.d AND g.boot_id = v.b AND g.seq_from = v.seq_from
    RETURNING g.device_id, g.boot_id, g.seq_from
)
SELECT device_id, boot_id, max(seq_from) FROM gone GROUP BY device_id, boot_id
"""

_STREAMS_DROPPED: Final = """
UPDATE ingest_streams s
SET gaps_dropped = s.gaps_dropped + u.n, gaps_floor = greatest(s.gaps_floor, u.f)
FROM unnest(%b::int4[], %b::uuid[], %b::int4[], %b::int8[]) AS u(d, b, n, f)
WHERE s.device_id = u.d AND s.boot_id = u.b
"""


def _columns(rows: Sequence[Sequence[object]], width: int) -> list[list[object]]:
    """Row tuples as the column arrays an unnest() statement takes."""
    return [[r[i] for r in rows] for i in range(width)]


def record_streams(
    cur: psycopg.Cursor[Any],
    device_ids: Mapping[str, int],
    fresh: Sequence[Incoming],
    *,
    max_gaps: int = DEFAULT_MAX_GAPS_PER_STREAM,
) -> StreamsResult:
    """Advance each (device, boot_id) high-water mark and record gaps, at most `max_gaps` each."""
    if max_gaps < 1:
        raise ValueError(f"max_gaps must be >= 1, got {max_gaps}")
    seqs: dict[StreamKey, list[int]] = defaultdict(list)
    last_at: dict[StreamKey, datetime] = {}
    for item in fresh:
        b = item.batch
        key = (device_ids[b.device], uuid.UUID(hex=b.boot_id))
        seqs[key].append(b.seq)
        last_at[key] = max(last_at.get(key, item.received_at), item.received_at)
    keys = sorted(seqs)
    now = max(last_at.values())
    # The stream's open gaps after this batch, before the cap is applied.
    counts: dict[StreamKey, int] = {}
    upserts: list[tuple[int, uuid.UUID, int, int, datetime]] = []
    deletes: list[tuple[int, uuid.UUID, int]] = []
    opened = 0

    def stream_rows(ks: list[StreamKey], maxes: Mapping[StreamKey, int]) -> list[list[object]]:
        rows = [
            (k[0], k[1], min(seqs[k]), maxes[k], len(seqs[k]), last_at[k], min(counts[k], max_gaps))
            for k in ks
        ]
        return _columns(rows, 7)

    first = {k: advance(None, (), seqs[k]) for k in keys}
    for k, update in first.items():
        counts[k] = update.opened
    cur.execute(_STREAMS_INSERT, stream_rows(keys, {k: u.max_seq for k, u in first.items()}))
    inserted = {(d, b) for d, b in cur.fetchall()}
    for k in inserted:
        opened += first[k].opened
        upserts.extend((k[0], k[1], low, high, now) for low, high in first[k].gaps)
    existing = [k for k in keys if k not in inserted]
    maxes = {k: first[k].max_seq for k in inserted}
    floors: dict[StreamKey, int] = dict.fromkeys(inserted, NO_FLOOR)
    if existing:
        cur.execute(_STREAMS_LOCK, _columns(existing, 2))
        prev: dict[StreamKey, tuple[int, int]] = {}
        for d, b, prev_max, open_gaps, floor in cur.fetchall():
            prev[(d, b)] = (prev_max, open_gaps)
            floors[(d, b)] = floor
        # A late seq at or below the floor fell in a forgotten gap: nothing to look up.
        late = [(k, s) for k in existing for s in seqs[k] if floors[k] < s <= prev[k][0]]
        holding: dict[StreamKey, list[tuple[int, int, datetime]]] = defaultdict(list)
        if late:
            late.sort()
            cur.execute(_GAPS_HOLDING, _columns([(k[0], k[1], s, floors[k]) for k, s in late], 4))
            for d, b, low, high, detected in cur.fetchall():
                holding[(d, b)].append((low, high, detected))
        for k in existing:
            prev_max, prev_count = prev[k]
            held = holding.get(k, [])
            update = advance(prev_max, [(low, high) for low, high, _ in held], seqs[k])
            maxes[k] = update.max_seq
            opened += update.opened
            # Pieces of the gaps held keep their gap's detection time; new gaps get now.
            pieces = sorted(update.gaps)
            starts = {low for low, _ in pieces}
            unchanged = {(low, high) for low, high, _ in held}
            for low, high in pieces:
                if (low, high) in unchanged:
                    continue
                i = bisect.bisect_right(held, (low, _ABOVE_ANY_SEQ)) - 1
                detected = held[i][2] if i >= 0 and held[i][1] >= low else now
                upserts.append((k[0], k[1], low, high, detected))
            deletes.extend((k[0], k[1], low) for low, _, _ in held if low not in starts)
            counts[k] = prev_count - len(held) + len(pieces)
        cur.execute(_STREAMS_UPDATE, stream_rows(existing, maxes))
    if deletes:
        cur.execute(_GAPS_DELETE, _columns(sorted(deletes), 3))
    if upserts:
        cur.execute(_GAPS_UPSERT, _columns(sorted(upserts), 5))
    over = [(k[0], k[1], counts[k] - max_gaps, floors[k]) for k in keys if counts[k] > max_gaps]
    dropped = sum(n for _, _, n, _ in over)
    if over:
        cur.execute(_GAPS_TRIM, _columns(over, 4))
        new_floors = {(d, b): f for d, b, f in cur.fetchall()}
        cur.execute(
            _STREAMS_DROPPED,
            _columns([(d, b, n, new_floors.get((d, b), f)) for d, b, n, f in over], 4),
        )
        log.warning(
            "sequence gaps over the cap of %s per stream: forgot the %s oldest", max_gaps, dropped
        )
    if opened:
        log.warning("sequence gaps opened=%s", opened)
    return StreamsResult(opened=opened, dropped=dropped)
