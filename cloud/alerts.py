"""The alert engine: evaluates rules on stored windows, keeps the alert lifecycle.

The worker calls `AlertEngine.evaluate` inside the batch transaction after the
windows are written, and `check_no_data` on a timer; both return the
`AlertMessage`s to publish on the alerts topic *after* commit. Lifecycle:
active -> cleared (by the data) and, independently, unacknowledged ->
acknowledged (by an operator through `acknowledge`, which writes the audit log).

Exactly one active alert per (rule, device, metric) is enforced by a partial
unique index, so concurrent workers cannot raise it twice; windows of one
device stream are already serialised by the writer's row lock on its
`ingest_streams` row, so the engine sees the previous batch's alerts.

Windows are evaluated per (rule, device, metric) in time order; a window older
than the data that last raised or cleared that alert is ignored, so a late
backlog cannot undo a newer transition.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import psycopg
from psycopg.types.json import Jsonb

from millrace.cloud import alert_rules
from millrace.cloud.alert_rules import ANY_METRIC, AlertRule, Step, WindowValues
from millrace.errors import MillraceError
from millrace.wire import AlertMessage

logger = logging.getLogger(__name__)

# Rules change rarely (a file sync, an admin); re-reading them once a minute costs one
# tiny query and saves restarting workers after a change.
RULES_RELOAD_SECONDS: Final = 60.0
ACK_ACTION: Final = "alert.acknowledge"
MAX_USER_CHARS: Final = 200
MAX_COMMENT_CHARS: Final = 2000

__all__ = [
    "ACK_ACTION",
    "AlertEngine",
    "AlertError",
    "LoadedRule",
    "SyncResult",
    "acknowledge",
    "add_rule",
    "list_rules",
    "load_rules_file",
    "sync_rules",
]

load_rules_file = alert_rules.load_rules_file


class AlertError(MillraceError):
    """An alert operation cannot be done as asked (unknown alert, already acknowledged...)."""


class WindowLike(Protocol):
    """What the engine reads from a stored window (cloud.writer.StoredWindow fits)."""

    @property
    def device(self) -> str: ...
    @property
    def metric(self) -> str: ...
    @property
    def ts(self) -> datetime: ...
    @property
    def count(self) -> int: ...
    @property
    def sum(self) -> float: ...
    @property
    def min(self) -> float: ...
    @property
    def max(self) -> float: ...
    @property
    def last(self) -> float: ...


@dataclass(frozen=True, slots=True)
class LoadedRule:
    """A rule as stored, with its database id."""

    id: int
    rule: AlertRule


@dataclass(slots=True)
class _Latest:
    """The latest alert of a (rule, device, metric) group."""

    id: int
    active: bool
    mark: datetime | None  # data time of its last transition


_SELECT_ALL_RULES: Final = """
    SELECT id, name, metric, condition, devices, low, high, no_data_s, severity, hysteresis,
           aggregate, enabled, description
      FROM alert_rules ORDER BY id
"""
_SELECT_ENABLED_RULES: Final = """
    SELECT id, name, metric, condition, devices, low, high, no_data_s, severity, hysteresis,
           aggregate, enabled, description
      FROM alert_rules WHERE enabled ORDER BY id
"""


def _rule_from_row(row: Sequence[Any]) -> LoadedRule:
    return LoadedRule(int(row[0]), AlertRule(*row[1:]))


def _rule_params(rule: AlertRule) -> dict[str, Any]:
    return {
        "name": rule.name,
        "metric": rule.metric,
        "condition": rule.condition,
        "devices": rule.devices,
        "low": rule.low,
        "high": rule.high,
        "no_data_s": rule.no_data_s,
        "severity": rule.severity,
        "hysteresis": rule.hysteresis,
        "aggregate": rule.aggregate,
        "enabled": rule.enabled,
        "description": rule.description,
    }


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


class AlertEngine:
    """Rules in memory plus the alert lifecycle in the database."""

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
        return cls(_enabled_rules(conn), reload_after_s=reload_after_s, clock=clock)

    @property
    def rules(self) -> tuple[LoadedRule, ...]:
        return self._rules

    def reload(self, conn: psycopg.Connection[Any]) -> None:
        """Re-read the enabled rules now."""
        self._set_rules(_enabled_rules(conn))

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
        self, conn: psycopg.Connection[Any], windows: Sequence[WindowLike]
    ) -> list[AlertMessage]:
        """Evaluate the windows just written; returns raised/cleared alerts to publish."""
        self._maybe_reload(conn)
        if not self._rules:
            return []
        groups: dict[tuple[int, str, str], list[WindowValues]] = defaultdict(list)
        fresh: dict[tuple[str, str], datetime] = {}
        for w in windows:
            if w.metric not in self._metrics and ANY_METRIC not in self._metrics:
                continue
            for loaded in self._matching(w.device, w.metric):
                metric = ANY_METRIC if loaded.rule.metric == ANY_METRIC else w.metric
                values = WindowValues(w.ts, w.count, w.sum, w.min, w.max, w.last)
                group = groups[(loaded.id, w.device, metric)]
                if loaded.rule.condition != "no_data":
                    group.append(values)
                    continue
                # Only the newest window matters to a no-data rule: it clears it or not.
                if not group or group[0].ts < w.ts:
                    group[:] = [values]
                pair = (w.device, metric)
                fresh[pair] = max(fresh.get(pair, w.ts), w.ts)
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
        windows: list[WindowValues],
    ) -> list[AlertMessage]:
        rule_id, device, metric = key
        loaded = self._by_id[rule_id]
        if state is not None and state.mark is not None:
            windows = [w for w in windows if w.ts > state.mark]
        active = state is not None and state.active
        out: list[AlertMessage] = []
        for window, result in alert_rules.run(loaded.rule, active=active, windows=windows):
            if result.transition == "raise":
                msg = _raise(conn, loaded, device, device_id, metric, result, window.ts)
                if msg is not None:
                    state = _Latest(msg.alert_id, True, window.ts)
                    out.append(msg)
            elif state is not None and state.active:
                msg = _clear(conn, loaded, device, state.id, metric, result.value, window.ts)
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
                if not alert_rules.no_data_due(rule, last_received=last_received, now=now):
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


def _enabled_rules(conn: psycopg.Connection[Any]) -> list[LoadedRule]:
    rows = conn.execute(_SELECT_ENABLED_RULES).fetchall()
    return [_rule_from_row(r) for r in rows]


def _device_ids(conn: psycopg.Connection[Any], names: set[str]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT name, id FROM devices WHERE name = ANY(%s)", (sorted(names),)
    ).fetchall()
    return {name: int(device_id) for name, device_id in rows}


def _touch_freshness(
    conn: psycopg.Connection[Any],
    device_ids: dict[str, int],
    fresh: dict[tuple[str, str], datetime],
) -> None:
    """Record that these (device, metric) pairs watched by no_data rules just had data."""
    rows = sorted(
        (device_ids[device], metric, ts)
        for (device, metric), ts in fresh.items()
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
    groups: dict[tuple[int, str, str], list[WindowValues]],
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


# --- acknowledgement ------------------------------------------------------------------


def acknowledge(
    conn: psycopg.Connection[Any], alert_id: int, *, user: str, comment: str = ""
) -> None:
    """Acknowledge an alert (active or cleared) and record who did it in the audit log.

    Raises AlertError when the alert does not exist or is already acknowledged.
    Runs in the caller's transaction; the dashboard commits it.
    """
    if not isinstance(user, str) or not user.strip() or len(user) > MAX_USER_CHARS:
        raise AlertError(f"acknowledge: user must be 1-{MAX_USER_CHARS} characters")
    if len(comment) > MAX_COMMENT_CHARS:
        raise AlertError(f"acknowledge: comment longer than {MAX_COMMENT_CHARS} characters")
    row = conn.execute(
        """
        UPDATE alerts SET acknowledged_at = now(), acknowledged_by = %s, ack_comment = %s
         WHERE id = %s AND acknowledged_at IS NULL
        RETURNING rule_name, metric, state, severity,
                  (SELECT name FROM devices WHERE id = alerts.device_id)
        """,
        (user, comment, alert_id),
    ).fetchone()
    if row is None:
        existing = conn.execute(
            "SELECT acknowledged_by, acknowledged_at FROM alerts WHERE id = %s", (alert_id,)
        ).fetchone()
        if existing is None:
            raise AlertError(f"alert {alert_id} does not exist")
        raise AlertError(
            f"alert {alert_id} was already acknowledged by {existing[0]} at {existing[1]:%c}"
        )
    rule_name, metric, state, severity, device = row
    conn.execute(
        "INSERT INTO audit_log (user_name, action, target, comment, details)"
        " VALUES (%s, %s, %s, %s, %s)",
        (
            user,
            ACK_ACTION,
            f"alert:{alert_id}",
            comment,
            Jsonb(
                {
                    "rule": rule_name,
                    "device": device,
                    "metric": metric,
                    "state": state,
                    "severity": severity,
                }
            ),
        ),
    )
    logger.info("alert acknowledged: id=%s user=%s", alert_id, user)


# --- rules management -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What `sync_rules` changed, by rule name."""

    added: tuple[str, ...]
    updated: tuple[str, ...]
    unchanged: tuple[str, ...]
    disabled: tuple[str, ...]


def list_rules(conn: psycopg.Connection[Any], *, enabled_only: bool = False) -> list[LoadedRule]:
    """Every stored rule (or only the enabled ones), by id."""
    if enabled_only:
        return _enabled_rules(conn)
    rows = conn.execute(_SELECT_ALL_RULES).fetchall()
    return [_rule_from_row(r) for r in rows]


_UPSERT_RULE: Final = """
    INSERT INTO alert_rules (name, metric, condition, devices, low, high, no_data_s, severity,
                             hysteresis, aggregate, enabled, description)
    VALUES (%(name)s, %(metric)s, %(condition)s, %(devices)s, %(low)s, %(high)s,
            %(no_data_s)s, %(severity)s, %(hysteresis)s, %(aggregate)s, %(enabled)s,
            %(description)s)
    ON CONFLICT (name) DO UPDATE SET
        metric = EXCLUDED.metric, condition = EXCLUDED.condition, devices = EXCLUDED.devices,
        low = EXCLUDED.low, high = EXCLUDED.high, no_data_s = EXCLUDED.no_data_s,
        severity = EXCLUDED.severity, hysteresis = EXCLUDED.hysteresis,
        aggregate = EXCLUDED.aggregate, enabled = EXCLUDED.enabled,
        description = EXCLUDED.description, updated_at = now()
    RETURNING id
"""


def add_rule(conn: psycopg.Connection[Any], rule: AlertRule, *, replace: bool = False) -> int:
    """Store a rule and return its id; a rule of the same name is an error unless `replace`."""
    if not replace:
        exists = conn.execute("SELECT 1 FROM alert_rules WHERE name = %s", (rule.name,))
        if exists.fetchone() is not None:
            raise AlertError(f"alert rule {rule.name!r} exists; pass replace=True to change it")
    row = conn.execute(_UPSERT_RULE, _rule_params(rule)).fetchone()
    assert row is not None
    return int(row[0])


def sync_rules(
    conn: psycopg.Connection[Any], rules: Sequence[AlertRule], *, disable_missing: bool = False
) -> SyncResult:
    """Make the stored rules match `rules` (e.g. a rules file); idempotent.

    With `disable_missing`, stored rules absent from `rules` are disabled and
    their active alerts cleared (a rule that no longer exists cannot clear them).
    """
    stored = {loaded.rule.name: loaded for loaded in list_rules(conn)}
    added: list[str] = []
    updated: list[str] = []
    unchanged: list[str] = []
    for rule in rules:
        before = stored.get(rule.name)
        if before is not None and before.rule == rule:
            unchanged.append(rule.name)
            continue
        conn.execute(_UPSERT_RULE, _rule_params(rule))
        (updated if before is not None else added).append(rule.name)
    disabled: list[str] = []
    if disable_missing:
        wanted = {rule.name for rule in rules}
        gone = [
            loaded for name, loaded in stored.items() if name not in wanted and loaded.rule.enabled
        ]
        for loaded in gone:
            conn.execute(
                "UPDATE alert_rules SET enabled = false, updated_at = now() WHERE id = %s",
                (loaded.id,),
            )
            conn.execute(
                "UPDATE alerts SET state = 'cleared', cleared_at = now(),"
                " message = message || ' (cleared: rule disabled)'"
                " WHERE rule_id = %s AND state = 'active'",
                (loaded.id,),
            )
            disabled.append(loaded.rule.name)
    result = SyncResult(tuple(added), tuple(updated), tuple(unchanged), tuple(disabled))
    logger.info(
        "alert rules synced: added=%s updated=%s disabled=%s",
        len(added),
        len(updated),
        len(disabled),
    )
    return result


def sync_rules_file(
    conn: psycopg.Connection[Any], path: str | Path, *, disable_missing: bool = False
) -> SyncResult:
    """`sync_rules` from a TOML rules file (see docs/alerts.md)."""
    return sync_rules(conn, load_rules_file(path), disable_missing=disable_missing)


def utcnow() -> datetime:
    """The current time, timezone-aware (what the worker passes to `check_no_data`)."""
    return datetime.now(UTC)
