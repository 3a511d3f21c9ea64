"""Device and metric ids by name, cached for the worker's life.

Ids never change once assigned, so the cache is never stale. Unknown names are
registered in a short transaction of their own before a commit batch (see
`BatchWriter.prepare`), so the batch itself never makes a round trip per row and
the cache never holds an id a rollback took back.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

log = logging.getLogger(__name__)


class IdCache:
    """Name -> id for devices and metrics; ids never change once assigned."""

    __slots__ = ("devices", "metrics")

    def __init__(self) -> None:
        self.devices: dict[str, int] = {}
        self.metrics: dict[str, int] = {}

    def clear(self) -> None:
        self.devices.clear()
        self.metrics.clear()

    def ensure(self, conn: psycopg.Connection[Any], devices: set[str], metrics: set[str]) -> None:
        """Register unknown names (committed at once, so the cache never holds a rolled-back id)."""
        new_devices = sorted(devices - self.devices.keys())
        new_metrics = sorted(metrics - self.metrics.keys())
        if not new_devices and not new_metrics:
            return
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
        log.info("registered devices=%s metrics=%s", new_devices, new_metrics)
