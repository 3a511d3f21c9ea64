"""The pipeline under faults: nothing lost, nothing doubled, every fault visible.

Two plants, so that one broken guarantee does not hide the others:

`test_broker_outage...`: the broker is stopped for 60 s. Meanwhile gw0002's agent is
SIGKILLed (its outbox holds batches nobody has received yet) and restarted.

`test_database_worker_agent_and_clock_faults...`: four gateways, faults one after another:
the database crashes for 30 s, the ingest worker is SIGKILLed, gw0002's agent is SIGKILLed
with everything else up (its last will must show), and all along

- gw0001's PLC serves an out-of-range oven temperature for a while (those readings must be
  counted as rejected, never aggregated);
- gw0003's clock runs 2 minutes ahead (inside the worker's 5 minute skew limit): stored,
  shifted, and flagged on the data-quality page;
- gw0004's clock runs an hour ahead: every batch is refused as in_future and kept in the
  dead-letter table, where the reconciliation finds all of it.

Only the window open at each SIGKILL of an agent may be missing (docs/guarantees.md).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from datetime import datetime

import pytest
from sqlalchemy import Connection

from millrace.dashboards import queries
from millrace.dashboards.config import DEFAULT_LATE_AFTER_SECONDS, DEFAULT_STALE_AFTER_SECONDS
from millrace.dashboards.resolution import Resolution
from tests.e2e.dashcheck import dashboard_connection, series_problems, utc
from tests.e2e.pipeline import (
    Pipeline,
    dead_letter_batches,
    ledger_batches,
    stored_readings,
    wait_until,
)
from tests.e2e.reconcile import Reconciliation, Stored, load_ground_truth

pytestmark = pytest.mark.faults

HEALTHY = "gw0001"
KILLED = "gw0002"
SKEWED = "gw0003"
REFUSED = "gw0004"
SKEW_SECONDS = 120  # inside the worker's default max_skew_s (300): stored
REFUSED_SKEW_SECONDS = 3600  # beyond it: dead-lettered as in_future
BROKER_OUTAGE_SECONDS = 60.0
DATABASE_OUTAGE_SECONDS = 30.0
WORKER_DOWN_SECONDS = 15.0
AGENT_DOWN_SECONDS = 8.0
BASELINE_SECONDS = 10.0
TAIL_SECONDS = 12.0
# paho's default reconnect backoff in the worker doubles up to 2 minutes.
WORKER_RECONNECT_TIMEOUT_SECONDS = 150.0
SIM_FAULTS = """
[[fault]]
target = "gw0001-plc"
kind = "out_of_range"
start_s = 5
duration_s = 13
signals = ["oven_temp"]
"""
SKEW_TOLERANCE_SECONDS = 2.0


def _at_window_offset(plant: Pipeline, *, not_before: float) -> None:
    """Sleep until halfway between the previous window's grace end and the next boundary.

    A SIGKILL then finds exactly one window open: the previous one is in the outbox.
    """
    offset = plant.grace_s + (plant.period_s - plant.grace_s) / 2
    now = max(time.time(), not_before)
    target = math.floor(now / plant.period_s) * plant.period_s + offset
    if target < now:
        target += plant.period_s
    time.sleep(target - time.time())


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def _settle(plant: Pipeline, notes: list[str]) -> dict[str, int]:
    """wait_quiescent, but a failure is noted and judged after the reconciliation."""
    try:
        return plant.wait_quiescent()
    except AssertionError as exc:
        notes.append(f"NOT QUIESCENT: {exc}")
        return {}


def _finish(plant: Pipeline, notes: list[str]) -> tuple[Reconciliation, dict[str, int], str]:
    """SIGTERM the agents, settle, stop the simulator, reconcile; returns the report too."""
    plant.stop_agents()
    written = _settle(plant, notes)
    plant.stop_sim()
    result = plant.reconcile()
    report = "\n".join([result.summary(), *notes, plant.describe_timeline()])
    print(report)
    return result, written, report


def _delivery(plant: Pipeline, start: float, end: float) -> dict[str, dict[str, float]]:
    with dashboard_connection(plant.dashboard_dsn) as conn:
        frame = queries.delivery_by_device(
            conn, start=utc(start), end=utc(end), late_after_s=DEFAULT_LATE_AFTER_SECONDS
        )
    return {row.device: row._asdict() for row in frame.itertuples(index=False)}


def _reported_status(plant: Pipeline, device: str) -> str:
    with dashboard_connection(plant.dashboard_dsn) as conn:
        fleet = queries.fleet(conn, stale_after_s=DEFAULT_STALE_AFTER_SECONDS).set_index("device")
    return str(fleet.loc[device, "reported_status"]) if device in fleet.index else ""


def _kill_at_window_middle(plant: Pipeline, *, not_before: float) -> None:
    _at_window_offset(plant, not_before=not_before)
    plant.kill_agent(KILLED)


def test_broker_outage_loses_nothing_and_shows_as_backlog_and_delay(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    plant = make_pipeline(gateways=2)
    worker = plant.worker
    assert worker is not None
    notes: list[str] = []
    time.sleep(BASELINE_SECONDS)

    broker_stop = plant.mark("broker stopped")
    plant.broker.stop()
    _kill_at_window_middle(plant, not_before=broker_stop + 20)
    waiting, _, _ = plant.agents[KILLED].outbox()
    assert waiting > 0, "the killed agent's outbox should hold batches the broker never saw"
    notes.append(f"{KILLED} SIGKILLed during the outage with {waiting} unsent batches")
    time.sleep(AGENT_DOWN_SECONDS)
    plant.start_agent(KILLED)
    _sleep_until(broker_stop + BROKER_OUTAGE_SECONDS)
    plant.broker.start()
    plant.mark("broker started")
    worker.wait_healthy(WORKER_RECONNECT_TIMEOUT_SECONDS)
    plant.mark("worker resubscribed")
    _settle(plant, notes)
    drained = plant.mark("backlog drained")
    time.sleep(TAIL_SECONDS)
    result, written, report = _finish(plant, notes)

    assert not [n for n in notes if n.startswith("NOT QUIESCENT")], report
    assert result.failures == [] and result.duplicates == [], report
    _assert_losses_only_at_kills(plant, result, kills=1)
    assert ledger_batches(plant.owner_dsn) == written
    with dashboard_connection(plant.dashboard_dsn) as conn:
        assert queries.open_sequence_gaps(conn).empty, plant.open_gaps()
        backlog = queries.backlog_history(
            conn, start=utc(broker_stop), end=utc(drained + 5), bucket_s=1
        )
    peak = backlog.groupby("device")["outbox_batches"].max().to_dict()
    # Heartbeats cannot pass a stopped broker; the first ones after it returns show backlog.
    assert all(peak.get(g, 0) > 0 for g in (HEALTHY, KILLED)), peak
    delay = _delivery(plant, broker_stop, drained + 1)
    for gateway in (HEALTHY, KILLED):
        assert delay[gateway]["max_delay_s"] >= BROKER_OUTAGE_SECONDS - plant.period_s, delay
    print(
        f"backlog peaks {peak}; worst delay "
        + ", ".join(f"{g}={delay[g]['max_delay_s']:.1f} s" for g in (HEALTHY, KILLED))
    )


def test_database_worker_agent_and_clock_faults_lose_nothing_and_show_on_the_dashboard(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    plant = make_pipeline(
        gateways=4,
        clock_offsets_s={SKEWED: SKEW_SECONDS, REFUSED: REFUSED_SKEW_SECONDS},
        sim_faults_toml=SIM_FAULTS,
    )
    worker = plant.worker
    assert worker is not None
    notes: list[str] = []
    time.sleep(BASELINE_SECONDS)

    # 1. The database crashes and stays down for 30 s.
    db_stop = plant.mark("database crashed (immediate stop)")
    plant.database.stop(mode="immediate")
    time.sleep(DATABASE_OUTAGE_SECONDS)
    plant.database.start()
    db_back = plant.mark("database started")
    worker.wait_healthy()
    _settle(plant, notes)
    after_db = plant.mark("database outage drained")

    # 2. The ingest worker is SIGKILLed and down for 15 s.
    worker_kill = plant.kill_worker()
    time.sleep(WORKER_DOWN_SECONDS)
    plant.start_worker()
    _settle(plant, notes)
    after_worker = plant.mark("worker restart drained")
    redeliveries = worker.metric("millrace_ingest_redeliveries_total")
    duplicates = worker.metric("millrace_ingest_duplicates_total")
    notes.append(f"restarted worker: {redeliveries:.0f} redeliveries, {duplicates:.0f} duplicates")

    # 3. gw0002's agent is SIGKILLed with the broker and the cloud up: its last will shows.
    _kill_at_window_middle(plant, not_before=time.time())
    wait_until(
        lambda: _reported_status(plant, KILLED) == "offline",
        timeout_s=15,
        what=f"the fleet page to show {KILLED} offline (last will)",
    )
    time.sleep(AGENT_DOWN_SECONDS)
    plant.start_agent(KILLED)
    wait_until(
        lambda: _reported_status(plant, KILLED) == "online",
        timeout_s=15,
        what=f"the fleet page to show {KILLED} online again",
    )
    time.sleep(TAIL_SECONDS)
    result, written, report = _finish(plant, notes)

    # Nothing lost, nothing doubled; only the window open at the SIGKILL is missing.
    assert not [n for n in notes if n.startswith("NOT QUIESCENT")], report
    assert result.failures == [] and result.duplicates == [], report
    _assert_losses_only_at_kills(plant, result, kills=1)
    ledger = ledger_batches(plant.owner_dsn)
    refused, repeats = dead_letter_batches(plant.owner_dsn)
    assert {g: ledger[g] for g in (HEALTHY, KILLED, SKEWED)} == {
        g: written[g] for g in (HEALTHY, KILLED, SKEWED)
    }
    assert ledger[REFUSED] == 0
    assert {b.device for b in refused} == {REFUSED}
    assert len(refused) == written[REFUSED]
    assert {r.verdict for r in result.results if r.gateway == REFUSED and r.stored} <= {
        "exact",
        "matched",
    }
    print(f"dead letters: {len(refused)} batches of {REFUSED} (+{repeats} redelivered copies)")

    start, end = utc(plant.timeline[0][0] - 3600), utc(time.time() + 2 * REFUSED_SKEW_SECONDS)
    stored = stored_readings(plant.owner_dsn, period_s=plant.period_s)
    with dashboard_connection(plant.dashboard_dsn) as conn:
        problems, points = series_problems(
            conn, stored, result, period_s=plant.period_s, start=start, end=end
        )
        assert problems == [], "\n".join(problems)
        _assert_quality_page(conn, start, end, stored, rejected_by_sim=_sim_rejected(plant))
        _assert_kill_hole(plant, conn, result)
        latency = queries.commit_latency(
            conn, start=utc(db_stop - 60), end=utc(db_back), bucket_s=60
        )
    print(f"dashboard: {points} window points equal the database and the ground truth")

    # Each cloud outage shows as delivery delay (received - sent) on the data-quality page
    # and the database outage as commit latency on the pipeline page.
    window_s = plant.period_s + plant.grace_s
    assert latency["latency_max_s"].max() >= DATABASE_OUTAGE_SECONDS - window_s, latency
    db = _delivery(plant, db_stop, after_db + 1)
    restart = _delivery(plant, worker_kill, after_worker + 1)
    for gateway in (HEALTHY, KILLED):
        assert db[gateway]["max_delay_s"] >= DATABASE_OUTAGE_SECONDS - window_s, db
        assert restart[gateway]["max_delay_s"] >= WORKER_DOWN_SECONDS - window_s, restart
    print(
        "worst delivery delay after the database / worker outage: "
        + ", ".join(
            f"{g}={db[g]['max_delay_s']:.1f}/{restart[g]['max_delay_s']:.1f} s"
            for g in (HEALTHY, KILLED)
        )
    )


def _assert_losses_only_at_kills(plant: Pipeline, result: Reconciliation, *, kills: int) -> None:
    """Allowed losses: only gw0002's, only in the one window open at each of its SIGKILLs."""
    killed = [life for life in plant.agents[KILLED].lives if life.killed]
    assert len(killed) == kills
    lossy = {r.gateway for r in result.results if r.verdict == "allowed_loss"}
    assert lossy <= {KILLED}, lossy
    starts = result.windows_with("allowed_loss", KILLED)
    period_ms = plant.period_s * 1000
    open_at_kill = {math.floor(life.stopped_at / plant.period_s) * period_ms for life in killed}
    assert starts == open_at_kill, (sorted(starts), sorted(open_at_kill))
    lost = result.allowed_loss_readings(KILLED)
    assert lost > 0
    print(f"allowed losses: {lost} readings in the {len(starts)} window(s) open at the SIGKILL(s)")


def _sim_rejected(plant: Pipeline) -> int:
    """Readings of gw0001's oven the simulator served out of range (all must be rejected)."""
    truth = load_ground_truth(plant.ground_truth_path, plant.manifest)
    (oven,) = [s for s in truth if (s.gateway, s.metric) == (HEALTHY, "plc.oven_temp")]
    return len(oven.rejected_steps)


def _assert_quality_page(
    conn: Connection,
    start: datetime,
    end: datetime,
    stored: list[Stored],
    *,
    rejected_by_sim: int,
) -> None:
    dead = queries.dead_letter_counts(conn, start=start, end=end).set_index("code")
    assert list(dead.index) == ["in_future"], dead
    assert dead.loc["in_future", "devices"] == 1
    samples = queries.dead_letter_samples(conn, start=start, end=end)
    assert set(samples["device"]) == {REFUSED}
    assert queries.open_sequence_gaps(conn).empty, "no batch may be missing, even across kills"
    fleet = queries.fleet(conn, stale_after_s=DEFAULT_STALE_AFTER_SECONDS).set_index("device")
    skew = fleet["clock_skew_s"].to_dict()
    assert abs(skew[SKEWED] - SKEW_SECONDS) < SKEW_TOLERANCE_SECONDS, skew
    assert abs(skew[REFUSED] - REFUSED_SKEW_SECONDS) < SKEW_TOLERANCE_SECONDS, skew
    assert abs(skew[HEALTHY]) < SKEW_TOLERANCE_SECONDS, skew
    rejected = queries.rejected_readings(conn, start=start, end=end)
    rows = {(r.device, r.metric): r.rejected for r in rejected.itertuples(index=False)}
    in_windows = sum(
        w.rejected for w in stored if (w.gateway, w.metric) == (HEALTHY, "plc.oven_temp")
    )
    assert rows == {(HEALTHY, "plc.oven_temp"): in_windows}, rows
    assert in_windows > 0
    # Every out-of-range reading reached the cloud as rejected: in its window, or, where no
    # reading of a window was valid (no window is sent), in the heartbeat's running total.
    assert fleet.loc[HEALTHY, "rejected_readings"] == rejected_by_sim >= in_windows
    print(
        f"data quality: {int(dead['count'].sum())} in_future dead letters from {REFUSED}; "
        f"clock skew {skew[SKEWED]:.1f} s and {skew[REFUSED]:.1f} s; "
        f"{in_windows} of {rejected_by_sim} rejected oven readings in stored windows (quality"
        f" page), all {rejected_by_sim} in the fleet page's heartbeat total"
    )


def _assert_kill_hole(plant: Pipeline, conn: Connection, result: Reconciliation) -> None:
    """The device page shows no points while the SIGKILLed agent was down."""
    lives = plant.agents[KILLED].lives
    resolution = Resolution("windows", plant.period_s, plant.period_s)
    holes = 0
    for before, after in itertools.pairwise(lives):
        if not before.killed:
            continue
        down_from = math.ceil((before.stopped_at + 1) / plant.period_s) * plant.period_s
        down_to = math.floor(after.started_at / plant.period_s) * plant.period_s
        if down_to <= down_from:
            continue
        frame = queries.series(
            conn,
            device=KILLED,
            metric="node.temperature",
            resolution=resolution,
            start=utc(down_from),
            end=utc(down_to),
        )
        assert frame.empty, frame
        served = [
            r
            for r in result.results
            if r.gateway == KILLED
            and r.metric == "node.temperature"
            and down_from * 1000 <= r.start_ms < down_to * 1000
        ]
        assert served and all(r.verdict == "unobserved" for r in served), served
        holes += 1
    assert holes, "the agent was down for at least one whole window"
    # Loss is visible: each restart after a kill reported its hole, and every window lost at
    # a kill (open then, or while the agent was down) starts inside its metric's hole.
    reported = queries.data_holes_in(
        conn, start=utc(lives[0].started_at - 3600), end=utc(time.time() + 3600)
    )
    reported = reported[reported["device"] == KILLED]
    kills = sum(1 for life in lives[:-1] if life.killed)
    assert reported["boot_id"].nunique() == kills, reported
    assert set(reported["cause"]) == {"unclean end"}
    spans: dict[str, list[tuple[float, float]]] = {}
    for metric, from_ts, to_ts in zip(
        reported["metric"], reported["from_ts"], reported["to_ts"], strict=True
    ):
        spans.setdefault(metric, []).append((from_ts.timestamp() * 1000, to_ts.timestamp() * 1000))
    first_kill = min(life.stopped_at for life in lives if life.killed)
    lost = [
        r
        for r in result.results
        if r.gateway == KILLED
        and (
            r.verdict == "allowed_loss"
            or (r.verdict == "unobserved" and first_kill * 1000 <= r.start_ms)
        )
        and r.start_ms < lives[-1].started_at * 1000
    ]
    assert any(r.verdict == "allowed_loss" for r in lost), "a window was open at the kill"
    uncovered = [
        r
        for r in lost
        if not any(low <= r.start_ms < high for low, high in spans.get(r.metric, ()))
    ]
    assert uncovered == [], (uncovered, reported)
    print(f"loss is visible: {len(reported)} hole row(s) cover the {len(lost)} lost window(s)")
