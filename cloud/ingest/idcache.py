"""Device and metric ids by name, cached for the worker's life, up to a bound.

Ids never change once assigned, so the cache is never stale. Unknown names are
registered in a short transaction of their own before a commit batch (see
`BatchWriter.prepare`), so the batch itself never makes a round trip per row and
the cache never holds an id a rollback took back. Each map keeps at most `limit`
names, least recently used out first, so a client inventing names cannot grow the
worker's memory; a name evicted and seen again costs one SELECT.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Final

import psycopg

log = logging.getLogger(__name__)

# Names per map: a large plant's devices, or its metric names, fit many times over.
DEFAULT_ID_CACHE_NAMES: Final = 100_000


class BoundedIds(OrderedDict[str, int]):
    """Name -> id, least recently used first; `trim` evicts down to `limit`."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"an id cache needs room for at least one name, got {limit}")
        super().__init__()
        self.limit = limit
        self.evicted = 0

    def touch(self, names: set[str]) -> None:
        """Mark `names` used now (those cached)."""
        for name in names:
            if name in self:
                self.move_to_end(name)

    def trim(self, keep: set[str]) -> None:
        """Evict the least recently used names beyond `limit`, never one of `keep`."""
        while len(self) > self.limit:
            oldest = next(iter(self))
            if oldest in keep:  # the batch in hand holds more names than the limit
                break
            del self[oldest]
            self.evicted += 1


class IdCache:
    """Name -> id for devices and metrics; ids never change once assigned."""

    __slots__ = ("devices", "metrics")

    def __init__(self, limit: int = DEFAULT_ID_CACHE_NAMES) -> None:
        self.devices = BoundedIds(limit)
        self.metrics = BoundedIds(limit)

    def clear(self) -> None:
        self.devices.clear()
        self.metrics.clear()

    def ensure(self, conn: psycopg.Connection[Any], devices: set[str], metrics: set[str]) -> None:
        """Register unknown names (committed at once, so the cache never holds a rolled-back id).

        Every name of `devices` and `metrics` is cached afterwards, even if that takes
        the cache over its limit for the moment: the batch in hand needs them all.
        """
        self.devices.touch(devices)
        self.metrics.touch(metrics)
        new_devices = sorted(devices - self.devices.keys())
        new_metrics = sorted(metrics - self.metrics.keys())
        if new_devices or new_metrics:
            self._register(conn, new_devices, new_metrics)
        self.devices.trim(devices)
        self.metrics.trim(metrics)

    def _register(
        self, conn: psycopg.Connection[Any], new_devices: list[str], new_metrics: list[str]
    ) -> None:
        with conn.transaction(), conn.cursor() as cur:
            for table, names, cache in (
                ("devices", new_devices, self.devices),
                ("metrics", new_metrics, self.metrics),
            ):
                if not names:
                    continue
                ident = psycopg.sql.Identifier(table)
                cur.execute(
                    psycopg.sql.SQL(
                        "INSERT INTO {} (name) SELECT unnest(%b::text[]) ORDER BY 1"
                        " ON CONFLICT (name) DO NOTHING"
                    ).format(ident),
                    [names],
                )
                cur.execute(
                    psycopg.sql.SQL("SELECT name, id FROM {} WHERE name = ANY(%s)").format(ident),
                    [names],
                )
                cache.update(cur.fetchall())
        log.info("registered devices=%s metrics=%s", len(new_devices), len(new_metrics))
