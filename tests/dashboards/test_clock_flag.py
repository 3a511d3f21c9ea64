"""The clock flag on the Fleet and Data quality pages: what it means is explained, and the
headline counts clocks that are measurably off, not hosts that merely run no time daemon
(a fresh plant on one host without NTP showed "unsynced clock" on every gateway)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pandas as pd
import psycopg
import pytest
from streamlit.testing.v1 import AppTest

from millrace.cloud import registry
from millrace.dashboards.ui import CLOCK_HELP, MISSING, clock_status
from millrace.wire import Heartbeat
from tests.dashboards.conftest import PASSWORDS, Plant, write_config
from tests.dashboards.plant import HOT_DEVICE, OFFLINE_DEVICE, UNSYNCED_DEVICE

APP = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"


@pytest.mark.parametrize(
    ("synced", "skew_s", "shown"),
    [
        (True, 0.015, "NTP"),
        (False, 0.015, "no NTP"),  # free-running, right for now
        (False, -4.2, "off by 4.2 s"),
        (True, 3.0, "off by 3.0 s"),  # disciplined, yet off from the cloud's clock
        (True, None, "NTP"),
        (None, None, MISSING),  # no heartbeat yet
        (pd.NA, float("nan"), MISSING),
    ],
)
def test_clock_status(synced: object, skew_s: object, shown: str) -> None:
    assert clock_status(synced, skew_s) == shown


def test_clock_help_says_what_each_word_means() -> None:
    for words in ("**NTP**", "**no NTP**", "**off by N s**", "timedatectl", "chrony"):
        assert words in CLOCK_HELP


def _login(at: AppTest) -> AppTest:
    at.run()
    at.text_input[0].set_value("vera")
    at.text_input[1].set_value(PASSWORDS["vera"][1])
    at.button[0].click().run()
    return at


@pytest.mark.integration
def test_clock_flag_counts_clocks_that_are_off_not_hosts_without_ntp(
    plant_factory: Callable[..., Plant],
    users_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    private = plant_factory(hours=0.25)
    # press-01's host loses its time daemon; its clock is still right (15 ms from ours).
    at_time = private.truth.end + timedelta(seconds=30)
    with psycopg.connect(private.dsn) as conn, conn.transaction():
        registry.apply_heartbeat(
            conn,
            Heartbeat(
                device=HOT_DEVICE,
                boot_id=private.truth.boot_ids[HOT_DEVICE],
                ts_ms=int(at_time.timestamp() * 1000) + 15,
                outbox_batches=0,
                outbox_bytes=0,
                outbox_oldest_age_s=0.0,
                dropped_batches=0,
                rejected_readings=0,
                cert_days_left=21.0,
                clock_synced=False,
                agent_version="0.1.0",
            ),
            received_at=at_time,
        )
    config = write_config(tmp_path, dsn=private.dash_dsn, users=users_file)
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(config))

    at = _login(AppTest.from_file(str(APP), default_timeout=30))
    at.switch_page("views/quality.py").run()
    assert not at.exception and not at.error
    tile = next(m for m in at.metric if m.label == "Clocks off")
    # Only oven-02 is off (4.2 s); press-01 runs without NTP but is right.
    assert tile.value == "1"
    assert tile.help == CLOCK_HELP
    assert any(c.value == "2 of 3 without NTP" for c in at.caption)

    at.switch_page("views/fleet.py").run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    clocks = dict(zip(table["device"], table["clock"], strict=True))
    assert clocks == {
        UNSYNCED_DEVICE: "off by 4.2 s",
        HOT_DEVICE: "no NTP",
        OFFLINE_DEVICE: "NTP",
    }
