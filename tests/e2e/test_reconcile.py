"""A clean run, end to end: simulated devices -> edge agents -> broker -> worker -> TimescaleDB.

Every window in the database must equal the simulator's ground truth (count, sum, min,
max, first, last), nothing lost, nothing doubled; the dashboard's query functions must
show the same numbers and a clean data-quality page.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import pytest

from millrace.dashboards import queries
from millrace.dashboards.config import DEFAULT_LATE_AFTER_SECONDS, DEFAULT_STALE_AFTER_SECONDS
from tests.e2e.dashcheck import (
    dashboard_connection,
    device_metric_problems,
    series_problems,
    utc,
)
from tests.e2e.pipeline import Pipeline, dead_letter_batches, ledger_batches, stored_readings
from tests.e2e.reconcile import (
    Reconciliation,
    Stored,
    WindowResult,
    load_ground_truth,
    reconcile,
)

pytestmark = pytest.mark.e2e

GATEWAYS = 3
RUN_SECONDS = 40.0
# 10 Modbus + 3 MQTT node + 1 one-wire numeric signals per simulated gateway.
NUMERIC_METRICS = 14
# Device clocks and ours are the same clock here; the data-quality page flags |skew| > 2 s.
SKEW_WARN_SECONDS = 2.0


def test_clean_run_matches_ground_truth_and_dashboard(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    plant = make_pipeline(gateways=GATEWAYS)
    time.sleep(RUN_SECONDS)
    with dashboard_connection(plant.dashboard_dsn) as conn:
        fleet = queries.fleet(conn, stale_after_s=DEFAULT_STALE_AFTER_SECONDS).set_index("device")
    assert sorted(fleet.index) == sorted(plant.agents)
    assert set(fleet["status"]) == {"online"}, fleet
    assert set(fleet["reported_status"]) == {"online"}, fleet
    assert (fleet["clock_skew_s"].abs() < SKEW_WARN_SECONDS).all(), fleet["clock_skew_s"]
    assert (fleet["dropped_batches"] == 0).all()

    plant.stop_agents()
    written = plant.wait_quiescent()
    plant.stop_sim()
    result = plant.reconcile()
    figures = result.figures()
    report = f"{result.summary()}\nbatches per gateway: {written}\n{plant.describe_timeline()}"
    print(report)

    assert result.failures == [] and result.duplicates == [], report
    # Every full window of every series is compared exactly; only each life's first and
    # last window of the pushed/file signals are partial (MAY readings at the edges).
    full_windows = int(RUN_SECONDS // plant.period_s) - 2
    assert figures["exact"] >= GATEWAYS * NUMERIC_METRICS * full_windows, report
    assert {r.metric for r in result.results if r.verdict == "exact"} >= {
        "plc.oven_temp",
        "plc.parts_count",
        "node.humidity",
        "w1.temperature",
    }
    _assert_partial_only_at_edges(plant, result)

    # Exactly once in the database: one ledger row per batch any outbox ever held.
    assert ledger_batches(plant.owner_dsn) == written
    assert dead_letter_batches(plant.owner_dsn) == ([], 0)

    stored = stored_readings(plant.owner_dsn, period_s=plant.period_s)
    _reconciler_catches_damage(plant, stored, [r for r in result.results if r.verdict == "exact"])

    start = utc(plant.timeline[0][0] - 3600)
    end = utc(time.time() + 3600)
    with dashboard_connection(plant.dashboard_dsn) as conn:
        problems, points = series_problems(
            conn, stored, result, period_s=plant.period_s, start=start, end=end
        )
        assert problems == [], "\n".join(problems)
        assert points == len(stored)
        assert device_metric_problems(conn, stored, period_s=plant.period_s) == []

        # The data-quality page of a clean run: nothing refused, missing, rejected or late.
        assert queries.dead_letter_counts(conn, start=start, end=end).empty
        assert queries.open_sequence_gaps(conn).empty
        assert queries.rejected_readings(conn, start=start, end=end).empty
        delivery = queries.delivery_by_device(
            conn, start=start, end=end, late_after_s=DEFAULT_LATE_AFTER_SECONDS
        ).set_index("device")
        assert delivery["batches"].to_dict() == dict(written)
        assert (delivery["late"] == 0).all()
        # The pipeline page counts the same windows.
        timeline = queries.ingest_timeline(conn, start=start, end=end, bucket_s=60)
        assert int(timeline["windows"].sum()) == len(stored)
        latency = queries.commit_latency(conn, start=start, end=end, bucket_s=60)
        assert int(latency["windows"].sum()) == len(stored)
    print(f"dashboard: {points} window points equal the database and the ground truth")


def _reconciler_catches_damage(
    plant: Pipeline, stored: list[Stored], exact: list[WindowResult]
) -> None:
    """The same truth against a damaged copy of the database: every kind of damage is found."""
    truth = load_ground_truth(plant.ground_truth_path, plant.manifest)
    lives = {gateway: agent.lives for gateway, agent in plant.agents.items()}
    keyed = {(w.gateway, w.metric, w.start_ms): w for w in stored}
    lost, doubled, changed = (keyed[(r.gateway, r.metric, r.start_ms)] for r in exact[:3])
    damaged = [w for w in stored if w not in (lost, doubled, changed)]
    damaged.append(dataclasses.replace(doubled, count=doubled.count * 2, sum=doubled.sum * 2))
    damaged.append(dataclasses.replace(changed, sum=changed.sum + 0.5))
    result = reconcile(truth, damaged, lives=lives, period_s=plant.period_s, grace_s=plant.grace_s)
    verdicts = {(r.gateway, r.metric, r.start_ms): r.verdict for r in result.failures}
    assert verdicts == {
        (lost.gateway, lost.metric, lost.start_ms): "lost",
        (doubled.gateway, doubled.metric, doubled.start_ms): "doubled",
        (changed.gateway, changed.metric, changed.start_ms): "mismatch",
    }, verdicts
    late = [dataclasses.replace(w, start_ms=w.start_ms + 1000 * plant.period_s) for w in stored]
    moved = reconcile(truth, late, lives=lives, period_s=plant.period_s, grace_s=plant.grace_s)
    assert len(moved.failures) > len(stored) // 2, "windows one period late must not match"


def _assert_partial_only_at_edges(plant: Pipeline, result: Reconciliation) -> None:
    """A window is only partly observable where the agent's (one) life starts or ends."""
    period_ms = plant.period_s * 1000
    for r in result.results:
        if r.verdict not in ("matched", "unobserved"):
            continue
        window = (r.start_ms / 1000, (r.start_ms + period_ms) / 1000)
        (life,) = plant.agents[r.gateway].lives
        edges = [(-math.inf, life.ready_at), (life.stopped_at - 1.0, math.inf)]
        assert any(window[0] < hi and window[1] > lo for lo, hi in edges), r
