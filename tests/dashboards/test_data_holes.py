"""The data-quality page's list of holes agents reported after an unclean end.

Holes are written by the real ingest path (`registry.apply_state` of a birth that names
the ended run) into a migrated TimescaleDB and read as the dashboard's role.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from millrace.cloud import registry
from millrace.cloud.dbupgrade import upgrade
from millrace.dashboards import queries
from millrace.wire import DeviceState
from tests.dashboards.conftest import write_config
from tests.dashboards.plant import dashboard_dsn

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 6, 5, 0, tzinfo=UTC)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _birth(
    device: str, boot: str, prev: str, started: datetime, ends: dict[str, datetime]
) -> DeviceState:
    return DeviceState(
        device,
        "online",
        _ms(started),
        boot,
        prev_boot_id=prev,
        prev_closed_ms={m: _ms(e) for m, e in ends.items()},
        started_ms=_ms(started),
    )


def test_loss_is_visible_data_holes_listed_on_the_quality_page(fresh_db: str) -> None:
    upgrade(fresh_db)
    recent = NOW - timedelta(minutes=10)
    old = NOW - timedelta(days=3)
    births = [
        _birth(
            "gw-a",
            "a1" * 16,
            "a0" * 16,
            recent,
            {"temp": recent - timedelta(seconds=65), "flow": recent - timedelta(seconds=5)},
        ),
        _birth("gw-b", "b1" * 16, "b0" * 16, old, {"temp": old - timedelta(seconds=30)}),
    ]
    with psycopg.connect(fresh_db) as conn:
        for birth in [*births, births[0]]:  # a repeated birth (reconnect) adds nothing
            with conn.transaction():
                registry.apply_state(conn, birth, received_at=NOW)
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dashboard_dsn(fresh_db)),
        poolclass=NullPool,
    )
    with engine.connect() as conn:
        day = queries.data_holes_in(conn, start=NOW - timedelta(hours=24), end=NOW)
        week = queries.data_holes_in(conn, start=NOW - timedelta(days=7), end=NOW)
    assert list(day.columns) == list(queries.HOLE_COLUMNS)
    rows = day[["device", "metric", "duration_s", "cause", "boot_id"]].values.tolist()
    assert rows == [
        ["gw-a", "flow", 5.0, "unclean end", "a0" * 16],
        ["gw-a", "temp", 65.0, "unclean end", "a0" * 16],
    ]
    assert list(day["from_ts"]) == [recent - timedelta(seconds=5), recent - timedelta(seconds=65)]
    assert list(day["to_ts"]) == [recent, recent]
    # Newest first; the older hole shows in a range that covers it.
    assert week[["device", "metric"]].values.tolist() == [
        ["gw-a", "flow"],
        ["gw-a", "temp"],
        ["gw-b", "temp"],
    ]


def test_loss_is_visible_quality_page_shows_the_hole_table(
    fresh_db: str, users_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamlit.testing.v1 import AppTest

    from tests.dashboards.conftest import PASSWORDS

    upgrade(fresh_db)
    now = datetime.now(UTC).replace(microsecond=0)
    with psycopg.connect(fresh_db) as conn, conn.transaction():
        registry.apply_state(
            conn,
            _birth("gw-q", "c1" * 16, "c0" * 16, now, {"temp": now - timedelta(seconds=42)}),
            received_at=now,
        )
    config = write_config(tmp_path, dsn=dashboard_dsn(fresh_db), users=users_file)
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(config))
    app = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=30)
    at.run()
    at.text_input[0].set_value("vera")
    at.text_input[1].set_value(PASSWORDS["vera"][1])
    at.button[0].click().run()
    at.switch_page("views/quality.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Lost at unclean ends" in [h.value for h in at.subheader]
    tables = [t.value for t in at.dataframe if "duration_s" in t.value.columns]
    assert len(tables) == 1
    assert tables[0][["device", "metric", "duration_s", "cause"]].values.tolist() == [
        ["gw-q", "temp", 42.0, "unclean end"]
    ]
