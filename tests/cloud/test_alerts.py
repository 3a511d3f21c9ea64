"""Alerts: state machine and rules file (unit); engine, acknowledging, rule admin (database)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql
from sqlalchemy import Engine, NullPool, create_engine, text

from millrace.cloud import dbupgrade
from millrace.cloud.alerts.engine import AlertEngine, no_data_due, run, step
from millrace.cloud.alerts.lifecycle import AlertError, acknowledge
from millrace.cloud.alerts.rules import AlertRule, add_rule, load_rules_file, sync_rules
from millrace.cloud.registry import apply_heartbeat, apply_state, ensure_device
from millrace.errors import ConfigError
from millrace.wire import AlertMessage, DeviceState, Heartbeat, Window

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def win(value: float, i: int = 0, *, lo: float | None = None, hi: float | None = None) -> Window:
    """A window whose readings span [lo, hi] (both `value` unless given), `value` last."""
    lo = value if lo is None else lo
    hi = value if hi is None else hi
    start_ms = int((T0 + timedelta(seconds=10 * i)).timestamp() * 1000)
    return Window("m", start_ms, 10, 2, lo + hi, lo, hi, lo, value, lo * lo + hi * hi)


ABOVE = AlertRule("hot", "temp", "above", high=80.0, hysteresis=5.0)
BELOW = AlertRule("cold", "temp", "below", low=10.0, hysteresis=2.0)
OUTSIDE = AlertRule("band", "pressure", "outside", low=1.0, high=3.0, hysteresis=0.5)


def transitions(rule: AlertRule, values: list[float], *, active: bool = False) -> list[str | None]:
    out = []
    for i, v in enumerate(values):
        result = step(rule, active=active, window=win(v, i))
        out.append(result.transition)
        if result.transition:
            active = result.transition == "raise"
    return out


def test_above_raises_once_and_clears_only_past_hysteresis() -> None:
    got = transitions(ABOVE, [70, 81, 90, 79, 76, 75, 74, 81])
    assert got == [None, "raise", None, None, None, "clear", None, "raise"]


def test_threshold_itself_is_not_a_breach_and_zero_hysteresis_clears_at_threshold() -> None:
    rule = AlertRule("hot", "temp", "above", high=80.0)
    assert transitions(rule, [80.0, 80.5, 80.0]) == [None, "raise", "clear"]


def test_below_uses_window_minimum_by_default() -> None:
    # Mean 20 but one reading at 5: the spike is the event.
    result = step(BELOW, active=False, window=win(20, lo=5, hi=35))
    assert result.transition == "raise"
    assert result.value == 5
    assert transitions(BELOW, [9, 11, 12, 9], active=False) == ["raise", None, "clear", "raise"]


def test_above_uses_window_maximum_unless_mean_is_asked_for() -> None:
    spiky = win(50, lo=20, hi=95)  # mean 57.5, max 95
    assert step(ABOVE, active=False, window=spiky).transition == "raise"
    mean_rule = AlertRule("hot", "temp", "above", high=80.0, aggregate="mean")
    assert step(mean_rule, active=False, window=spiky).transition is None
    last_rule = AlertRule("hot", "temp", "above", high=80.0, aggregate="last")
    assert step(last_rule, active=False, window=win(81, lo=20, hi=81)).transition == "raise"


def test_outside_range_both_sides_and_hysteresis_inside() -> None:
    assert transitions(OUTSIDE, [2.0, 3.2, 2.8, 2.4, 0.9, 1.2, 1.6]) == [
        None,
        "raise",
        None,
        "clear",
        "raise",
        None,
        "clear",
    ]


def test_outside_reports_the_side_that_breached() -> None:
    assert step(OUTSIDE, active=False, window=win(0.2)).value == 0.2
    assert step(OUTSIDE, active=False, window=win(7.0)).value == 7.0


def test_run_sorts_windows_by_time() -> None:
    windows = [win(90, 2), win(70, 1), win(60, 3)]
    got = run(ABOVE, active=False, windows=windows)
    assert [(w.start_ms, s.transition) for w, s in got] == [
        (windows[0].start_ms, "raise"),
        (windows[2].start_ms, "clear"),
    ]


def test_no_data_rule_clears_on_any_window_and_is_due_after_timeout() -> None:
    rule = AlertRule("silent", "*", "no_data", no_data_s=300)
    assert step(rule, active=True, window=win(1)).transition == "clear"
    assert step(rule, active=False, window=win(1)).transition is None
    assert not no_data_due(rule, last_received=T0, now=T0 + timedelta(seconds=299))
    assert no_data_due(rule, last_received=T0, now=T0 + timedelta(seconds=300))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"condition": "above"}, "high"),
        ({"condition": "above", "high": 1.0, "low": 0.0}, "low"),
        ({"condition": "outside", "low": 3.0, "high": 1.0}, "low"),
        ({"condition": "no_data"}, "no_data_s"),
        ({"condition": "above", "high": float("nan")}, "high"),
        ({"condition": "above", "high": 1.0, "hysteresis": -1.0}, "hysteresis"),
        ({"condition": "above", "high": 1.0, "severity": "fatal"}, "severity"),
        ({"condition": "sideways", "high": 1.0}, "condition"),
    ],
)
def test_invalid_rules_name_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        AlertRule("r", "temp", **kwargs)  # type: ignore[arg-type]
    assert key in info.value.key


def test_any_metric_only_for_no_data() -> None:
    with pytest.raises(ConfigError, match="only allowed in no_data"):
        AlertRule("r", "*", "above", high=1.0)
    assert AlertRule("r", "*", "no_data", no_data_s=60).matches("dev-a", "anything")


def test_device_selector_exact_and_glob() -> None:
    exact = AlertRule("r", "temp", "above", high=1.0, devices="press-1")
    glob = AlertRule("r", "temp", "above", high=1.0, devices="press-*")
    assert exact.matches("press-1", "temp")
    assert not exact.matches("press-10", "temp")
    assert glob.matches("press-10", "temp")
    assert not glob.matches("oven-1", "temp")
    assert not glob.matches("press-1", "humidity")


# --- properties --------------------------------------------------------------------------

values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(
    high=values,
    hysteresis=st.floats(min_value=0, max_value=1e3),
    series=st.lists(values, max_size=60),
)
def test_above_alternates_and_respects_thresholds(
    high: float, hysteresis: float, series: list[float]
) -> None:
    rule = AlertRule("p", "m", "above", high=high, hysteresis=hysteresis)
    active = False
    for i, v in enumerate(series):
        result = step(rule, active=active, window=win(v, i))
        if result.transition == "raise":
            assert not active and v > high  # only an inactive alert is raised, on a breach
            active = True
        elif result.transition == "clear":
            assert active and v <= high - hysteresis
            active = False
        else:  # staying put: either no breach while inactive, or not recovered while active
            assert (v > high - hysteresis) if active else (v <= high)


@given(
    low=values,
    width=st.floats(min_value=1e-3, max_value=1e4),
    hysteresis=st.floats(min_value=0, max_value=1e2),
    series=st.lists(st.tuples(values, values), max_size=40),
)
def test_outside_state_matches_a_simple_model(
    low: float, width: float, hysteresis: float, series: list[tuple[float, float]]
) -> None:
    high = low + width
    rule = AlertRule("p", "m", "outside", low=low, high=high, hysteresis=hysteresis)
    windows = [win(a, i, lo=min(a, b), hi=max(a, b)) for i, (a, b) in enumerate(series)]
    active = False
    expected: list[str] = []
    for w in windows:  # the model, written independently of step()
        if not active and (w.max > high or w.min < low):
            active = True
            expected.append("raise")
        elif active and w.max <= high - hysteresis and w.min >= low + hysteresis:
            active = False
            expected.append("clear")
    got = [s.transition for _, s in run(rule, active=False, windows=windows)]
    assert got == expected
    assert all(a != b for a, b in itertools.pairwise(got))  # never raised twice


# --- rules file --------------------------------------------------------------------------


def test_load_rules_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        """
[[rule]]
name = "press-hot"
metric = "temperature"
devices = "press-*"
above = 80
hysteresis = 2.5
severity = "critical"

[[rule]]
name = "line-pressure"
metric = "pressure"
outside = [1.0, 3.5]

[[rule]]
name = "silent"
metric = "*"
no_data_minutes = 5
severity = "info"
"""
    )
    hot, band, silent = load_rules_file(path)
    assert hot == AlertRule(
        "press-hot",
        "temperature",
        "above",
        devices="press-*",
        high=80.0,
        hysteresis=2.5,
        severity="critical",
    )
    assert (band.condition, band.low, band.high, band.devices) == ("outside", 1.0, 3.5, "*")
    assert (silent.condition, silent.no_data_s, silent.severity) == ("no_data", 300, "info")


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('[[rule]]\nname = "a"\nmetric = "t"\n', "rule[0].above"),
        ('[[rule]]\nname = "a"\nmetric = "t"\nabove = 1\nbelow = 0\n', "rule[0].above"),
        ('[[rule]]\nname = "a"\nmetric = "t"\nabove = 1\ncolour = "red"\n', "rule[0].colour"),
        ('[[rule]]\nname = "a"\nmetric = "t"\noutside = [1]\n', "rule[0].outside"),
        ('[[rule]]\nname = "a"\nmetric = "t"\nabove = 1\nseverity = "x"\n', "severity"),
        ('[[rule]]\nname = "a"\nmetric = "t"\nabove = 1\n' * 2, "rule[1].name"),
        ("[rules]\nx = 1\n", "rules"),
        ("not toml = = =", "rules file"),
    ],
)
def test_rules_file_errors_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_rules_file(path)
    assert key in str(info.value)
    assert str(path) in str(info.value)


# --- the engine against a real database -------------------------------------------------


@pytest.fixture
def conn(fresh_db: str) -> Iterator[psycopg.Connection]:
    dbupgrade.upgrade(fresh_db)  # the real schema: hypertables and roles
    with psycopg.connect(fresh_db) as connection:
        yield connection


@pytest.fixture
def dash(fresh_db: str) -> Iterator[Engine]:
    """SQLAlchemy on its own connections, as the dashboard acknowledges."""
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(fresh_db), poolclass=NullPool
    )
    yield engine
    engine.dispose()


def ack(dash: Engine, alert_id: int, *, user: str, comment: str = "", role: str = "") -> None:
    """`acknowledge` in its own committed transaction, as `role` when given."""
    with dash.begin() as sa_conn:
        if role:
            sa_conn.execute(text(f'SET LOCAL ROLE "{role}"'))
            assert sa_conn.execute(text("SELECT current_user")).scalar() == role
        acknowledge(sa_conn, alert_id, user=user, comment=comment)


def sw(
    device: str, metric: str, i: int, value: float, *, hi: float | None = None
) -> tuple[str, Window]:
    """A stored window as the writer hands it to the engine: readings `value`, then `hi`."""
    hi = value if hi is None else hi
    return device, Window(
        metric=metric,
        start_ms=int((T0 + timedelta(seconds=10 * i)).timestamp() * 1000),
        period_s=10,
        count=2,
        sum=value + hi,
        min=value,
        max=hi,
        first=value,
        last=hi,
        sumsq=value * value + hi * hi,
    )


def alert_rows(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT a.id, r.name, d.name, a.metric, a.state, a.value, a.clear_value,"
        " a.acknowledged_by FROM alerts a JOIN devices d ON d.id = a.device_id"
        " LEFT JOIN alert_rules r ON r.id = a.rule_id ORDER BY a.id"
    ).fetchall()


@pytest.mark.integration
def test_raise_once_clear_with_hysteresis_and_publishable_messages(
    conn: psycopg.Connection,
) -> None:
    for name in ("press-1", "press-2", "oven-1"):
        ensure_device(conn, name)
    add_rule(
        conn, AlertRule("press-hot", "temp", "above", devices="press-*", high=80, hysteresis=5)
    )
    engine = AlertEngine.load(conn)

    raised = engine.evaluate(
        conn,
        [
            sw("press-1", "temp", 0, 70),
            sw("press-1", "temp", 1, 60, hi=85),  # the max crosses: raise
            sw("press-1", "temp", 2, 90),  # still above: not raised again
            sw("oven-1", "temp", 0, 500),  # not selected by the rule
            sw("press-2", "humidity", 0, 500),  # another metric
        ],
    )
    assert [(m.device, m.state, m.value, m.severity) for m in raised] == [
        ("press-1", "active", 85.0, "warning")
    ]
    assert isinstance(raised[0], AlertMessage)
    assert AlertMessage.from_json(raised[0].to_json()) == raised[0]
    assert raised[0].ts_ms == int((T0 + timedelta(seconds=10)).timestamp() * 1000)
    conn.commit()

    # A later batch: inside the hysteresis band nothing happens; below it the alert clears.
    assert engine.evaluate(conn, [sw("press-1", "temp", 3, 78)]) == []
    assert engine.evaluate(conn, [sw("press-1", "temp", 1, 10)]) == []  # older than the raise
    cleared = engine.evaluate(conn, [sw("press-1", "temp", 4, 74)])
    assert [(m.alert_id, m.state, m.value) for m in cleared] == [
        (raised[0].alert_id, "cleared", 74.0)
    ]
    conn.commit()

    # A fresh engine (another worker) sees the same state: a new crossing is a new alert.
    again = AlertEngine.load(conn).evaluate(conn, [sw("press-1", "temp", 5, 99)])
    assert [m.state for m in again] == ["active"]
    assert again[0].alert_id != raised[0].alert_id
    rows = alert_rows(conn)
    assert [(r[2], r[4], r[5], r[6]) for r in rows] == [
        ("press-1", "cleared", 85.0, 74.0),
        ("press-1", "active", 99.0, None),
    ]


@pytest.mark.integration
def test_two_engines_never_raise_the_same_alert_twice(conn: psycopg.Connection) -> None:
    ensure_device(conn, "press-1")
    add_rule(conn, AlertRule("hot", "temp", "above", high=80))
    first, second = AlertEngine.load(conn), AlertEngine.load(conn)
    conn.commit()
    assert len(first.evaluate(conn, [sw("press-1", "temp", 0, 90)])) == 1
    assert second.evaluate(conn, [sw("press-1", "temp", 1, 95)]) == []
    assert conn.execute("SELECT count(*) FROM alerts WHERE state = 'active'").fetchone() == (1,)


@pytest.mark.integration
def test_acknowledge_writes_audit_log_and_refuses_twice(
    conn: psycopg.Connection, dash: Engine
) -> None:
    ensure_device(conn, "press-1")
    add_rule(conn, AlertRule("hot", "temp", "above", high=80, severity="critical"))
    engine = AlertEngine.load(conn)
    (msg,) = engine.evaluate(conn, [sw("press-1", "temp", 0, 90)])
    conn.commit()

    ack(dash, msg.alert_id, user="alice", comment="valve stuck, fitter called")
    state, by, comment, acked_at = conn.execute(
        "SELECT state, acknowledged_by, ack_comment, acknowledged_at FROM alerts WHERE id = %s",
        (msg.alert_id,),
    ).fetchone()
    assert (state, by, comment) == ("active", "alice", "valve stuck, fitter called")
    assert acked_at is not None
    audit = conn.execute(
        "SELECT user_name, action, target, comment, details FROM audit_log"
    ).fetchall()
    assert audit == [
        (
            "alice",
            "alert.acknowledge",
            f"alert:{msg.alert_id}",
            "valve stuck, fitter called",
            {
                "rule": "hot",
                "device": "press-1",
                "metric": "temp",
                "state": "active",
                "severity": "critical",
            },
        )
    ]
    # Acknowledged is independent of active: the alert still clears with the data.
    (cleared,) = engine.evaluate(conn, [sw("press-1", "temp", 1, 10)])
    assert cleared.state == "cleared"
    conn.commit()
    with pytest.raises(AlertError, match="already acknowledged by alice"):
        ack(dash, msg.alert_id, user="bob", comment="")
    with pytest.raises(AlertError, match="does not exist"):
        ack(dash, 999_999, user="bob")
    with pytest.raises(AlertError, match="user"):
        ack(dash, msg.alert_id, user=" ")
    assert conn.execute("SELECT count(*) FROM audit_log").fetchone() == (1,)


@pytest.mark.integration
def test_no_data_alert_raises_after_timeout_and_clears_on_data(conn: psycopg.Connection) -> None:
    ensure_device(conn, "press-1")
    ensure_device(conn, "oven-1")
    add_rule(conn, AlertRule("silent-temp", "temp", "no_data", devices="press-*", no_data_s=300))
    add_rule(conn, AlertRule("silent", "*", "no_data", no_data_s=600, severity="info"))
    engine = AlertEngine.load(conn)
    assert engine.evaluate(conn, [sw("press-1", "temp", 0, 1), sw("oven-1", "flow", 0, 1)]) == []
    conn.commit()
    (received,) = conn.execute("SELECT max(last_received_at) FROM metric_freshness").fetchone()

    assert engine.check_no_data(conn, received + timedelta(seconds=299)) == []
    due = engine.check_no_data(conn, received + timedelta(seconds=301))
    assert [(m.device, m.metric, m.rule, m.state) for m in due] == [
        ("press-1", "temp", "silent-temp", "active")
    ]
    assert due[0].value is not None and due[0].value >= 300
    # Still silent later: the temp alert is not raised again; the any-metric rule joins in.
    later = engine.check_no_data(conn, received + timedelta(seconds=700))
    assert sorted((m.device, m.metric, m.rule) for m in later) == [
        ("oven-1", "*", "silent"),
        ("press-1", "*", "silent"),
    ]
    conn.commit()

    back = engine.evaluate(conn, [sw("press-1", "temp", 1, 2)])
    assert sorted((m.device, m.metric, m.rule, m.state) for m in back) == [
        ("press-1", "*", "silent", "cleared"),
        ("press-1", "temp", "silent-temp", "cleared"),
    ]
    states = conn.execute("SELECT rule_name, metric, state FROM alerts ORDER BY id").fetchall()
    assert states == [
        ("silent-temp", "temp", "cleared"),
        ("silent", "*", "active"),  # oven-1 is still silent
        ("silent", "*", "cleared"),
    ]


@pytest.mark.integration
def test_rules_sync_from_file_and_engine_reload(conn: psycopg.Connection, tmp_path: Path) -> None:
    ensure_device(conn, "press-1")
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\nname = "hot"\nmetric = "temp"\nabove = 80\n')
    first = sync_rules(conn, load_rules_file(path))
    assert (first.added, first.updated) == (("hot",), ())
    assert sync_rules(conn, load_rules_file(path)).unchanged == ("hot",)

    clock = [0.0]
    engine = AlertEngine.load(conn, reload_after_s=60, clock=lambda: clock[0])
    (msg,) = engine.evaluate(conn, [sw("press-1", "temp", 0, 85)])
    conn.commit()

    path.write_text('[[rule]]\nname = "cold"\nmetric = "temp"\nbelow = 5\n')
    result = sync_rules(conn, load_rules_file(path), disable_missing=True)
    assert (result.added, result.disabled) == (("cold",), ("hot",))
    assert conn.execute("SELECT state FROM alerts WHERE id = %s", (msg.alert_id,)).fetchone() == (
        "cleared",
    )
    conn.commit()
    assert [r.rule.name for r in engine.rules] == ["hot"]  # not yet reloaded
    clock[0] = 61.0
    assert [m.rule for m in engine.evaluate(conn, [sw("press-1", "temp", 1, 1)])] == ["cold"]
    assert [r.rule.name for r in engine.rules] == ["cold"]
    with pytest.raises(AlertError, match="exists"):
        add_rule(conn, AlertRule("cold", "temp", "below", low=0))


@pytest.mark.integration
@pytest.mark.security
def test_least_privilege_roles_suffice(conn: psycopg.Connection, dash: Engine) -> None:
    """The worker's role runs registry and engine; the dashboard's role only acknowledges."""
    add_rule(conn, AlertRule("hot", "temp", "above", high=80))
    add_rule(conn, AlertRule("silent", "*", "no_data", no_data_s=60))
    conn.commit()

    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(dbupgrade.INGEST_ROLE)))
    apply_state(conn, DeviceState("press-1", "online", 1, boot_id="a" * 32), received_at=T0)
    heartbeat = Heartbeat("press-1", "a" * 32, 1, 0, 0, 0.0, 0, 0)
    apply_heartbeat(conn, heartbeat, received_at=T0)
    engine = AlertEngine.load(conn)
    (raised,) = engine.evaluate(conn, [sw("press-1", "temp", 0, 90)])
    (silent,) = engine.check_no_data(conn, datetime.now(UTC) + timedelta(seconds=61))
    assert silent.rule == "silent"
    conn.commit()

    ack(dash, raised.alert_id, user="alice", comment="seen", role=dbupgrade.DASHBOARD_ROLE)
    by = conn.execute("SELECT acknowledged_by FROM alerts WHERE id = %s", (raised.alert_id,))
    assert by.fetchone() == ("alice",)
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(dbupgrade.DASHBOARD_ROLE)))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("UPDATE alerts SET state = 'cleared' WHERE id = %s", (raised.alert_id,))
    conn.rollback()
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(dbupgrade.INGEST_ROLE)))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        sync_rules(conn, [AlertRule("cold", "temp", "below", low=0)])
