"""The reconciliation rules on hand-made truth (no services): each kind of damage is caught."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.e2e.reconcile import (
    Life,
    Stored,
    TruthSeries,
    Unit,
    load_ground_truth,
    reconcile,
)

P = 5  # window period (s)
GRACE = 2.0
LIFE = Life(started_at=90.0, ready_at=91.0, stopped_at=130.0, exited_at=130.2, killed=False)


def _stored(metric: str, start_s: int, values: Sequence[float], **changes: object) -> Stored:
    window = Stored(
        "gw1",
        metric,
        start_s * 1000,
        len(values),
        math.fsum(values),
        min(values),
        max(values),
        values[0],
        values[-1],
        0,
    )
    return dataclasses.replace(window, **changes)  # type: ignore[arg-type]


def _series(kind: str, metric: str, values: dict[int, float]) -> TruthSeries:
    units = tuple(Unit(float(t), (v,)) for t, v in sorted(values.items()))
    return TruthSeries("gw1", metric, kind, units)  # type: ignore[arg-type]


PLC = _series("plc", "plc.t", {t: 20.0 + (t % 7) * 0.1 for t in range(100, 110)})


def _values(series: TruthSeries, start: int) -> list[float]:
    return [u.values[0] for u in series.units if start <= u.t < start + P]


def _verdicts(
    truth: Sequence[TruthSeries], stored: Sequence[Stored], life: Life = LIFE
) -> dict[int, str]:
    result = reconcile(truth, stored, lives={"gw1": [life]}, period_s=P, grace_s=GRACE)
    assert result.duplicates == []
    return {r.start_ms // 1000: r.verdict for r in result.results}


def test_exact_windows_match() -> None:
    stored = [_stored("plc.t", s, _values(PLC, s)) for s in (100, 105)]
    assert _verdicts([PLC], stored) == {100: "exact", 105: "exact"}


@pytest.mark.parametrize(
    ("change", "verdict"),
    [
        ({"count": 6, "sum": 999.0}, "doubled"),
        ({"count": 4}, "lost"),
        ({"sum": 101.0}, "mismatch"),
        ({"max": 25.0}, "mismatch"),
        ({"first": 20.5}, "mismatch"),
        ({"rejected": 1}, "mismatch"),
    ],
)
def test_damaged_window_is_caught(change: dict[str, object], verdict: str) -> None:
    stored = [_stored("plc.t", 100, _values(PLC, 100), **change)]
    stored.append(_stored("plc.t", 105, _values(PLC, 105)))
    assert _verdicts([PLC], stored) == {100: verdict, 105: "exact"}


def test_a_missing_window_is_lost_and_an_extra_one_doubled() -> None:
    stored = [_stored("plc.t", 105, _values(PLC, 105)), _stored("plc.t", 200, [1.0])]
    assert _verdicts([PLC], stored) == {100: "lost", 105: "exact", 200: "doubled"}


def test_the_same_window_stored_twice_is_a_duplicate() -> None:
    once = _stored("plc.t", 100, _values(PLC, 100))
    again = dataclasses.replace(once, source="dead_letters")
    result = reconcile([PLC], [once, again], lives={"gw1": [LIFE]}, period_s=P, grace_s=GRACE)
    assert len(result.duplicates) == 1
    assert result.figures()["doubled"] == 1


def test_one_wire_polls_may_read_the_previous_second() -> None:
    file_values = {t: 20.0 + 0.0625 * (t % 3) for t in range(99, 110)}
    units = tuple(Unit(float(t), (file_values[t], file_values[t - 1])) for t in range(100, 110))
    truth = TruthSeries("gw1", "w1.temperature", "w1", units)
    read = [
        file_values[100],
        file_values[100],
        file_values[102],
        file_values[102],
        file_values[104],
    ]
    assert _verdicts([truth], [_stored("w1.temperature", 100, read)])[100] == "exact"
    # The poll of second 101 cannot see the file of second 99.
    too_old = [read[0], file_values[99], *read[2:]]
    assert _verdicts([truth], [_stored("w1.temperature", 100, too_old)])[100] == "mismatch"


def test_sigkill_allows_losing_only_the_windows_not_yet_in_the_outbox() -> None:
    killed = dataclasses.replace(LIFE, stopped_at=108.5, exited_at=108.6, killed=True)
    # At 108.5 the window [100, 105) was closed at 107 and must be stored; [105, 110) is open.
    stored = [_stored("plc.t", 100, _values(PLC, 100))]
    assert _verdicts([PLC], stored, killed) == {100: "exact", 105: "allowed_loss"}
    assert _verdicts([PLC], [], killed) == {100: "lost", 105: "allowed_loss"}
    # Killed during [100, 105)'s grace: both windows were still open.
    early = dataclasses.replace(killed, stopped_at=106.0, exited_at=106.1)
    assert _verdicts([PLC], [], early) == {100: "allowed_loss", 105: "allowed_loss"}


def test_pushed_signals_at_a_lifes_edges_match_a_run_of_readings() -> None:
    node = _series("mqtt", "node.t", {t: float(t) for t in range(100, 115)})
    late_start = dataclasses.replace(LIFE, started_at=101.5, ready_at=103.0, stopped_at=112.2)
    stored = [
        _stored("node.t", 100, [102.0, 103.0, 104.0]),  # subscribed during 102
        _stored("node.t", 105, [105.0, 106.0, 107.0, 108.0, 109.0]),
        _stored("node.t", 110, [110.0, 111.0]),  # SIGTERM at 112.2
    ]
    assert _verdicts([node], stored, late_start) == {
        100: "matched",
        105: "exact",
        110: "matched",
    }
    missing_must = [stored[0], stored[1], _stored("node.t", 110, [110.0])]
    assert _verdicts([node], missing_must, late_start)[110] == "lost"
    not_contiguous = [_stored("node.t", 100, [102.0, 104.0]), *stored[1:]]
    assert _verdicts([node], not_contiguous, late_start)[100] == "mismatch"


def test_a_fast_clock_is_moved_back_by_its_offset() -> None:
    stored = [_stored("plc.t", s + 120, _values(PLC, s)) for s in (100, 105)]
    result = reconcile(
        [PLC],
        stored,
        lives={"gw1": [LIFE]},
        period_s=P,
        grace_s=GRACE,
        clock_offsets_s={"gw1": 120},
    )
    assert {r.verdict for r in result.results} == {"exact"}
    with pytest.raises(ValueError, match="whole number of periods"):
        reconcile(
            [PLC],
            stored,
            lives={"gw1": [LIFE]},
            period_s=P,
            grace_s=GRACE,
            clock_offsets_s={"gw1": 7},
        )


def test_ground_truth_csv_becomes_series(tmp_path: Path) -> None:
    manifest = {
        "devices": [
            {
                "id": "gw1-plc",
                "gateway": "gw1",
                "kind": "plc",
                "signals": [
                    {"name": "oven_temp", "kind": "analog"},
                    {"name": "running", "kind": "state"},
                ],
            },
            {"id": "gw1-w1", "gateway": "gw1", "kind": "w1", "signals": [{"name": "temperature"}]},
        ]
    }
    csv_path = tmp_path / "gt.csv"
    csv_path.write_text(
        "served_at,device,signal,ts,value,fault\n"
        "100.004,gw1-plc,oven_temp,100.000,180.5,\n"
        "100.004,gw1-plc,running,100.000,1,\n"
        "101.003,gw1-plc,oven_temp,101.000,820,out_of_range\n"
        "100.002,gw1-w1,temperature,100.000,20.5,\n"
        "101.002,gw1-w1,temperature,101.000,20.5625,\n"
        "103.002,gw1-w1,temperature,103.000,20.625,\n"
    )
    series = {s.metric: s for s in load_ground_truth(csv_path, manifest)}
    assert set(series) == {"plc.oven_temp", "w1.temperature"}
    assert series["plc.oven_temp"].units == (Unit(100.0, (180.5,)),)
    assert series["plc.oven_temp"].rejected_steps == (101.0,)
    # Second 102 was not rewritten: its poll reads the file of second 101 either way.
    assert series["w1.temperature"].units == (
        Unit(100.0, (20.5,)),
        Unit(101.0, (20.5625, 20.5)),
        Unit(102.0, (20.5625,)),
        Unit(103.0, (20.625, 20.5625)),
    )


def test_a_poll_stamped_just_before_a_boundary_counts_in_the_previous_window() -> None:
    early = [*_values(PLC, 100), _values(PLC, 105)[0]]
    late = _values(PLC, 105)[1:]
    stored = [_stored("plc.t", 100, early), _stored("plc.t", 105, late)]
    result = reconcile([PLC], stored, lives={"gw1": [LIFE]}, period_s=P, grace_s=GRACE)
    assert [(r.start_ms // 1000, r.verdict, r.moved_in) for r in result.results] == [
        (100, "exact", True),
        (105, "exact", False),
    ]
    assert result.figures()["moved_across_boundary"] == 1
    # Only the first poll of a window can move, and only when both windows then match.
    two = _values(PLC, 105)[2:]
    broken = [_stored("plc.t", 100, [*early, _values(PLC, 105)[1]]), _stored("plc.t", 105, two)]
    assert {
        r.verdict
        for r in reconcile([PLC], broken, lives={"gw1": [LIFE]}, period_s=P, grace_s=GRACE).failures
    } == {"doubled", "lost"}
