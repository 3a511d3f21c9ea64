"""At most so many metric names per device: `device_metrics` rows, admitted once each.

The first time a worker sees a (device, metric) pair it asks the database, with the
device's row locked so two workers cannot both take its last free place: a pair
already in `device_metrics` is admitted, a new one only while the device has fewer
than `limit` metrics. The answers are cached (bounded, least recently used out), so
steady traffic costs no round trip. The writer dead-letters the windows and events
of a refused pair with code `too_many_metrics` and stores the rest of their batch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

import psycopg

log = logging.getLogger(__name__)

Pair = tuple[int, int]  # (device_id, metric_id)
# Metric names one device may use: a plant signal list is tens to hundreds; a client
# inventing names must not grow the metrics table (and every worker's cache) without end.
DEFAULT_MAX_METRICS_PER_DEVICE: Final = 1000
# Pairs cached: a large fleet's devices times their metrics, with room to spare.
DEFAULT_PAIR_CACHE: Final = 1_000_000

_LOCK_DEVICE: Final = "SELECT id FROM devices WHERE id = %s FOR UPDATE"
_KNOWN: Final = "SELECT metric_id FROM device_metrics WHERE device_id = %s AND metric_id = ANY(%s)"
_COUNT: Final = "SELECT count(*) FROM device_metrics WHERE device_id = %s"
_INSERT: Final = """
INSERT INTO device_metrics (device_id, metric_id)
SELECT %s, unnest(%b::int4[]) ORDER BY 2 ON CONFLICT DO NOTHING
"""


class MetricCap:
    """Which (device, metric) pairs may be stored; `refused_pairs` counts the refusals."""

    def __init__(self, limit: int, *, cache_pairs: int = DEFAULT_PAIR_CACHE) -> None:
        if limit < 1 or cache_pairs < 1:
            raise ValueError(f"need limit >= 1 and cache_pairs >= 1, got {limit}, {cache_pairs}")
        self.limit = limit
        self._cache_pairs = cache_pairs
        self._admitted: OrderedDict[Pair, bool] = OrderedDict()
        # Devices with a pair refused: the writer's per-window check runs only for these.
        self.refusing: set[int] = set()

    def admitted(self, pair: Pair) -> bool:
        """Whether `pair` may be stored; a pair never checked is (prepare checks them all)."""
        return self._admitted.get(pair, True)

    def check(self, conn: psycopg.Connection[Any], wanted: Mapping[int, set[int]]) -> None:
        """Decide every pair of `wanted` (device id -> metric ids), in one short transaction.

        Metric ids are assigned in name order at first sight, so when a device has room
        for only some new metrics the lower ids (earlier names) win: the same answer
        on every worker.
        """
        unknown: dict[int, list[int]] = {}
        for device_id, metric_ids in wanted.items():
            for metric_id in metric_ids:
                if (device_id, metric_id) in self._admitted:
                    self._admitted.move_to_end((device_id, metric_id))
                else:
                    unknown.setdefault(device_id, []).append(metric_id)
        if unknown:
            with conn.transaction(), conn.cursor() as cur:
                for device_id in sorted(unknown):
                    self._decide(cur, device_id, sorted(unknown[device_id]))
        keep = {(d, m) for d, ms in wanted.items() for m in ms}
        while len(self._admitted) > self._cache_pairs:
            oldest = next(iter(self._admitted))
            if oldest in keep:
                break
            del self._admitted[oldest]

    def _decide(self, cur: psycopg.Cursor[Any], device_id: int, metric_ids: list[int]) -> None:
        cur.execute(_LOCK_DEVICE, [device_id])
        cur.execute(_KNOWN, [device_id, metric_ids])
        known = {row[0] for row in cur.fetchall()}
        new = [m for m in metric_ids if m not in known]
        room = 0
        if new:
            row = cur.execute(_COUNT, [device_id]).fetchone()
            room = max(0, self.limit - (int(row[0]) if row else 0))
            if room:
                cur.execute(_INSERT, [device_id, new[:room]])
        for metric_id in metric_ids:
            self._admitted[(device_id, metric_id)] = metric_id in known or metric_id in new[:room]
        if len(new) > room:
            self.refusing.add(device_id)
            log.warning(
                "device id %s is at its cap of %s metrics: %s new metrics refused",
                device_id,
                self.limit,
                len(new) - room,
            )
