"""Alert evaluation at ingest: judge stored windows, raise and clear alerts.

The worker calls `AlertEngine.evaluate` inside the batch transaction after the
windows are written, and `check_no_data` on a timer; both return the
`AlertMessage`s to publish on the alerts topic *after* commit, so a rolled-back
batch never announces an alert. Acknowledgement is lifecycle.py; the rules
themselves are rules.py.

Exactly one active alert per (rule, device, metric) is enforced by a partial
unique index, so concurrent workers cannot raise it twice; windows of one
device stream are already serialised by the writer's row lock on its
`ingest_streams` row, so the engine sees the previous batch's alerts.

Windows are evaluated per (rule, device, metric) in time order; a window older
than the data that last raised or cleared that alert is ignored, so a late
backlog cannot undo a newer transition. The state machine (`step`, `run`) is
free of I/O so it is unit-tested alone.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import psycopg

from millrace.cloud.alerts.rules import ANY_METRIC, AlertRule, LoadedRule, list_rules
from millrace.wire import Aggregate, AlertMessage, Window

logger = logging.getLogger(__name__)

# Rules change rarely (a file sync, an admin); re-reading them once a minute costs one
# tiny query and saves restarting workers after a change.
RULES_RELOAD_SECONDS: Final = 60.0
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)

Transition = Literal["raise", "clear"]


# --- the state machine, pure --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """What one window did to an alert: the transition (or None) and the value seen."""

    transition: Transition | None
    value: float


def _values(rule: AlertRule, w: Aggregate) -> tuple[float, float]:
    """(value compared with `low`, value compared with `high`) per the rule's aggregate."""
    if rule.aggregate == "mean":
        mean = w.sum / w.count
        return mean, mean
    if rule.aggregate == "last":
        return w.last, w.last
    return w.min, w.max


def step(rule: AlertRule, *, active: bool, window: Aggregate) -> Step:
    """Feed one window to the rule's state machine; `active` is the alert's current state."""
    lo_value, hi_value = _values(rule, window)
    if rule.condition == "no_data":
        return Step("clear" if active else None, hi_value)
    h = rule.hysteresis
    if rule.condition == "above":
        assert rule.high is not None
        breached, recovered, value = hi_value > rule.high, hi_value <= rule.high - h, hi_value
    elif rule.condition == "below":
        assert rule.low is not None
        breached, recovered, value = lo_value < rule.low, lo_value >= rule.low + h, lo_value
    else:
        assert rule.low is not None and rule.high is not None
        breached = hi_value > rule.high or lo_value < rule.low
        recovered = hi_value <= rule.high - h and lo_value >= rule.low + h
        # Report the side that is further out (or, when recovering, the nearer edge).
        value = hi_value if hi_value - rule.high >= rule.low - lo_value else lo_value
    if not active and breached:
        return Step("raise", value)
    if active and recovered:
        return Step("clear", value)
    return Step(None, value)


def run(rule: AlertRule, *, active: bool, windows: Iterable[Window]) -> list[tuple[Window, Step]]:
    """Feed windows (sorted here by time) and return the transitions, in order."""
    out: list[tuple[Window, Step]] = []
    for window in sorted(windows, key=lambda w: w.start_ms):
        result = step(rule, active=active, window=window)
        if result.transition is not None:
            out.append((window, result))
            active = result.transition == "raise"
    return out


def no_data_due(rule: AlertRule, *, last_received: datetime, now: datetime) -> bool:
    """True when a no_data rule should raise: nothing received for `no_data_s` seconds."""
    assert rule.no_data_s is not None
    return (now - last_received).total_seconds() >= rule.no_data_s


# --- the engine: rules in memory, alerts in the database ----------------------------


@dataclass(slots=True)
class _Latest:
    """The latest alert of a (rule, device, metric) group."""

    id: int
    active: bool
    mark: datetime | None  # data time of its last transition


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def _datetime(ms: int) -> datetime:
    """Exact (float division would round), so it equals the stored `readings.ts`."""
    return _EPOCH + timedelta(milliseconds=ms)


def _floor_ms(ts: datetime) -> int:
    """Exact milliseconds; floored, so `ms > _floor_ms(ts)` iff `_datetime(ms) > ts`."""
    return (ts - _EPOCH) // _ONE_MS


class AlertEngine:
    """The enabled rules in memory; raises and clears their alerts in the database."""

    def __init__(
        self,
        rules: Iterable[LoadedRule],
        *,
        reload_after_s: float | None = RULES_RELOAD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._reload_after_s = reload_after_s
        self._set_rules(rules)

    @classmethod
    def load(
        cls,
        conn: psycopg.Connection[Any],
        *,
        reload_after_s: float | None = RULES_RELOAD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> AlertEngine:
        """An engine with the enabled rules from the database; reloads them every so often."""
        return cls(list_rules(conn, enabled_only=True), reload_after_s=reload_after_s, clock=clock)

    @property
    def rules(self) -> tuple[LoadedRule, ...]:
        return self._rules

    def reload(self, conn: psycopg.Connection[Any]) -> None:
        """Re-read the enabled rules now."""
        self._set_rules(list_rules(conn, enabled_only=True))

    def _set_rules(self, rules: Iterable[LoadedRule]) -> None:
        self._rules = tuple(r for r in rules if r.rule.enabled)
        self._by_id = {r.id: r for r in self._rules}
        self._metrics = {r.rule.metric for r in self._rules}
        self._match_cache: dict[tuple[str, str], tuple[LoadedRule, ...]] = {}
        self._loaded_at = self._clock()

    def _maybe_reload(self, conn: psycopg.Connection[Any]) -> None:
        if self._reload_after_s is not None and (
            self._clock() - self._loaded_at >= self._reload_after_s
        ):
            self.reload(conn)

    def _matching(self, device: str, metric: str) -> tuple[LoadedRule, ...]:
        key = (device, metric)
        found = self._match_cache.get(key)
        if found is None:
            found = tuple(r for r in self._rules if r.rule.matches(device, metric))
            if len(self._match_cache) > 100_000:  # bounded: fleets are far smaller
                self._match_cache.clear()
            self._match_cache[key] = found
        return found

    # --- ingest-time evaluation -------------------------------------------------------

    def evaluate(
        self, conn: psycopg.Connection[Any], windows: Sequence[tuple[str, Window]]
    ) -> list[AlertMessage]:
        """Evaluate the (device, window) pairs just written; returns alerts to publish."""
        self._maybe_reload(conn)
        if not self._rules:
            return []
        groups: dict[tuple[int, str, str], list[Window]] = defaultdict(list)
        fresh: dict[tuple[str, str], int] = {}  # newest start_ms per watched pair
        for device, w in windows:
            if w.metric not in self._metrics and ANY_METRIC not in self._metrics:
                continue
            for loaded in self._matching(device, w.metric):
                metric = ANY_METRIC if loaded.rule.metric == ANY_METRIC else w.metric
                group = groups[(loaded.id, device, metric)]
                if loaded.rule.condition != "no_data":
                    group.append(w)
                    continue
                # Only the newest window matters to a no-data rule: it clears it or not.
                if not group or group[0].start_ms < w.start_ms:
                    group[:] = [w]
                pair = (device, metric)
                fresh[pair] = max(fresh.get(pair, w.start_ms), w.start_ms)
        if not groups:
            return []
        device_ids = _device_ids(conn, {device for _, device, _ in groups})
        _touch_freshness(conn, device_ids, fresh)
        latest = _latest_alerts(conn, device_ids, groups)
        messages: list[AlertMessage] = []
        for key in sorted(groups):
            rule_id, device, metric = key
            if device not in device_ids:
                logger.warning("alert rules skipped for unregistered device=%s", device)
                continue
            state = latest.get((rule_id, device_ids[device], metric))
            messages.extend(self._apply_group(conn, key, device_ids[device], state, groups[key]))
        return messages

    def _apply_group(
        self,
        conn: psycopg.Connection[Any],
        key: tuple[int, str, str],
        device_id: int,
        state: _Latest | None,
        windows: list[Window],
    ) -> list[AlertMessage]:
        rule_id, device, metric = key
        loaded = self._by_id[rule_id]
        if state is not None and state.mark is not None:
            mark_ms = _floor_ms(state.mark)
            windows = [w for w in windows if w.start_ms > mark_ms]
        active = state is not None and state.active
        out: list[AlertMessage] = []
        for window, result in run(loaded.rule, active=active, windows=windows):
            ts = _datetime(window.start_ms)
            if result.transition == "raise":
                msg = _raise(conn, loaded, device, device_id, metric, result, ts)
                if msg is not None:
                    state = _Latest(msg.alert_id, True, ts)
                    out.append(msg)
            elif state is not None and state.active:
                msg = _clear(conn, loaded, device, state.id, metric, result.value, ts)
                if msg is not None:
                    state.active = False
                    out.append(msg)
        return out

    # --- the no-data timer ------------------------------------------------------------

    def check_no_data(self, conn: psycopg.Connection[Any], now: datetime) -> list[AlertMessage]:
        """Raise no_data alerts for watched (device, metric) pairs silent too long."""
        self._maybe_reload(conn)
        rules = [r for r in self._rules if r.rule.condition == "no_data"]
        if not rules:
            return []
        shortest_s = min(r.rule.no_data_s or 0 for r in rules)
        rows = conn.execute(
            """
            SELECT d.name, f.device_id, f.metric, f.last_received_at, f.last_data_ts
              FROM metric_freshness f JOIN devices d ON d.id = f.device_id
             WHERE f.metric = ANY(%s)
               AND f.last_received_at <= %s - make_interval(secs => %s)
            """,
            (sorted({r.rule.metric for r in rules}), now, float(shortest_s)),
        ).fetchall()
        messages: list[AlertMessage] = []
        for name, device_id, metric, last_received, last_data_ts in sorted(rows):
            for loaded in rules:
                rule = loaded.rule
                if rule.metric != metric or not rule.matches_device(name):
                    continue
                if not no_data_due(rule, last_received=last_received, now=now):
                    continue
                silent_s = (now - last_received).total_seconds()
                result = Step("raise", silent_s)
                msg = _raise(
                    conn,
                    loaded,
                    name,
                    device_id,
                    metric,
                    result,
                    last_data_ts,
                    message=f"{rule.describe()} (silent {silent_s:.0f} s)",
                    ts_ms=_ms(now),
                )
                if msg is not None:
                    messages.append(msg)
        return messages


def _device_ids(conn: psycopg.Connection[Any], names: set[str]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT name, id FROM devices WHERE name = ANY(%s)", (sorted(names),)
    ).fetchall()
    return {name: int(device_id) for name, device_id in rows}


def _touch_freshness(
    conn: psycopg.Connection[Any],
    device_ids: dict[str, int],
    fresh: dict[tuple[str, str], int],
) -> None:
    """Record that these (device, metric) pairs watched by no_data rules just had data."""
    rows = sorted(
        (device_ids[device], metric, _datetime(start_ms))
        for (device, metric), start_ms in fresh.items()
        if device in device_ids
    )
    if not rows:
        return
    conn.execute(
        """
        INSERT INTO metric_freshness (device_id, metric, last_received_at, last_data_ts)
        SELECT d, m, now(), t FROM unnest(%s::int[], %s::text[], %s::timestamptz[]) AS u(d, m, t)
        ON CONFLICT (device_id, metric) DO UPDATE
           SET last_received_at = GREATEST(metric_freshness.last_received_at, now()),
               last_data_ts = GREATEST(metric_freshness.last_data_ts, EXCLUDED.last_data_ts)
        """,
        ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]),
    )


def _latest_alerts(
    conn: psycopg.Connection[Any],
    device_ids: dict[str, int],
    groups: dict[tuple[int, str, str], list[Window]],
) -> dict[tuple[int, int, str], _Latest]:
    """The newest alert of each group (active or not); absent when there never was one."""
    keys = sorted({(rule_id, device_ids[d], m) for rule_id, d, m in groups if d in device_ids})
    if not keys:
        return {}
    rows = conn.execute(
        """
        SELECT DISTINCT ON (a.rule_id, a.device_id, a.metric)
               a.rule_id, a.device_id, a.metric, a.id, a.state = 'active',
               CASE WHEN a.state = 'active' THEN a.data_ts ELSE a.clear_data_ts END
          FROM alerts a
          JOIN unnest(%s::int[], %s::int[], %s::text[]) AS k(rule_id, device_id, metric)
            ON a.rule_id = k.rule_id AND a.device_id = k.device_id AND a.metric = k.metric
         ORDER BY a.rule_id, a.device_id, a.metric, a.id DESC
        """,
        ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]),
    ).fetchall()
    return {(r[0], r[1], r[2]): _Latest(int(r[3]), bool(r[4]), r[5]) for r in rows}


def _raise(
    conn: psycopg.Connection[Any],
    loaded: LoadedRule,
    device: str,
    device_id: int,
    metric: str,
    result: Step,
    data_ts: datetime,
    *,
    message: str | None = None,
    ts_ms: int | None = None,
) -> AlertMessage | None:
    """Insert an active alert unless one is active already (then None: never re-raised)."""
    rule = loaded.rule
    text = message or f"{rule.describe()}: {result.value:g}"
    row = conn.execute(
        """
        INSERT INTO alerts (rule_id, rule_name, device_id, metric, severity, state,
                            message, value, data_ts)
        VALUES (%s, %s, %s, %s, %s, 'active', %s, %s, %s)
        ON CONFLICT (rule_id, device_id, metric) WHERE state = 'active' DO NOTHING
        RETURNING id
        """,
        (loaded.id, rule.name, device_id, metric, rule.severity, text, result.value, data_ts),
    ).fetchone()
    if row is None:
        return None
    logger.info("alert raised: id=%s rule=%s device=%s %s", row[0], rule.name, device, text)
    return AlertMessage(
        alert_id=int(row[0]),
        device=device,
        metric=metric,
        rule=rule.name,
        severity=rule.severity,
        state="active",
        value=result.value,
        ts_ms=_ms(data_ts) if ts_ms is None else ts_ms,
        message=text,
    )


def _clear(
    conn: psycopg.Connection[Any],
    loaded: LoadedRule,
    device: str,
    alert_id: int,
    metric: str,
    value: float,
    data_ts: datetime,
) -> AlertMessage | None:
    rule = loaded.rule
    text = f"cleared: {rule.describe()} (now {value:g})"
    row = conn.execute(
        """
        UPDATE alerts SET state = 'cleared', cleared_at = now(), clear_value = %s,
                          clear_data_ts = %s
         WHERE id = %s AND state = 'active'
        RETURNING id
        """,
        (value, data_ts, alert_id),
    ).fetchone()
    if row is None:
        return None
    logger.info("alert cleared: id=%s rule=%s device=%s", alert_id, rule.name, device)
    return AlertMessage(
        alert_id=alert_id,
        device=device,
        metric=metric,
        rule=rule.name,
        severity=rule.severity,
        state="cleared",
        value=value,
        ts_ms=_ms(data_ts),
        message=text,
    )
