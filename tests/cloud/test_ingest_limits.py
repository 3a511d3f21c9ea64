"""Per-device bounds at ingest: the id cache, dead letters (issue "The guarantee must not
end at the broker", item 4)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from millrace.cloud.ingest.idcache import IdCache
from tests.cloud.ingest_support import IngestDb, ingest_db  # noqa: F401  (fixture)


@pytest.mark.integration
def test_the_id_cache_stays_within_its_bound_and_keeps_ids_exact(
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    cache = IdCache(limit=3)
    seen: dict[str, int] = {}
    with psycopg.connect(ingest_db.ingest_dsn) as conn:
        for i in range(0, 20, 2):
            names = {f"m{i}", f"m{i + 1}"}
            cache.ensure(conn, {"press-1"}, names | {"hot"})  # "hot" is in every batch
            assert len(cache.metrics) <= 3
            assert names | {"hot"} <= cache.metrics.keys()  # the batch in hand is all there
            for name in names | {"hot"}:
                assert seen.setdefault(name, cache.metrics[name]) == cache.metrics[name]
        assert cache.metrics.evicted == 18
        cache.ensure(conn, {"press-1"}, {"m0"})  # evicted long ago: looked up again, same id
        assert cache.metrics["m0"] == seen["m0"] and len(cache.metrics) == 3
        ids: dict[str, Any] = dict(conn.execute("SELECT name, id FROM metrics").fetchall())
    assert {name: ids[name] for name in seen} == seen
