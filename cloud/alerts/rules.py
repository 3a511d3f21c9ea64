"""Alert rules: what a rule is, the rules file, and storing rules in `alert_rules`.

A rule watches one metric on the devices its selector matches. Threshold rules
look at each stored window; a window's value is its extreme by default (max for
`above`, min for `below`, both for `outside`) so a spike inside a window is not
averaged away. Hysteresis keeps a value hovering at the threshold from
flapping: an `above` alert raised at `high` clears only at `high - hysteresis`.
`no_data` rules raise when a (device, metric) pair has not been received for
`no_data_s` seconds and clear on the next window. How windows are judged is
engine.py; docs/alerts.md is the reference.

Writing rules needs INSERT/UPDATE on `alert_rules`, which neither the ingest
nor the dashboard role has: administration runs as the schema owner.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import psycopg

from millrace.cloud.alerts.lifecycle import AlertError
from millrace.errors import ConfigError
from millrace.ids import METRIC_NAME_RULE, is_metric_name

logger = logging.getLogger(__name__)

Condition = Literal["above", "below", "outside", "no_data"]
Aggregate = Literal["extreme", "mean", "last"]
Severity = Literal["info", "warning", "critical"]

CONDITIONS: Final = ("above", "below", "outside", "no_data")
AGGREGATES: Final = ("extreme", "mean", "last")
SEVERITIES: Final = ("info", "warning", "critical")
# The metric name a no_data rule uses to mean "any metric of the device".
ANY_METRIC: Final = "*"
MAX_RULE_NAME_CHARS: Final = 100
MAX_SELECTOR_CHARS: Final = 200
MIN_NO_DATA_SECONDS: Final = 1


@dataclass(frozen=True, slots=True)
class AlertRule:
    """One alert rule; `low`/`high` are the thresholds its condition uses."""

    name: str
    metric: str
    condition: Condition
    devices: str = "*"
    low: float | None = None
    high: float | None = None
    no_data_s: int | None = None
    severity: Severity = "warning"
    hysteresis: float = 0.0
    aggregate: Aggregate = "extreme"
    enabled: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        problem = _rule_problem(self)
        if problem:
            key, text = problem
            raise ConfigError(f"rule {self.name!r}.{key}" if self.name else key, text)

    def matches(self, device: str, metric: str) -> bool:
        """True when this rule watches `metric` on `device`."""
        if self.metric not in (metric, ANY_METRIC):
            return False
        return fnmatch.fnmatchcase(device, self.devices)

    def matches_device(self, device: str) -> bool:
        """True when the device selector (exact id or glob) matches `device`."""
        return fnmatch.fnmatchcase(device, self.devices)

    def describe(self) -> str:
        """A short human phrase for alert messages, e.g. `temp above 80`."""
        if self.condition == "above":
            return f"{self.metric} above {self.high:g}"
        if self.condition == "below":
            return f"{self.metric} below {self.low:g}"
        if self.condition == "outside":
            return f"{self.metric} outside [{self.low:g}, {self.high:g}]"
        what = "data" if self.metric == ANY_METRIC else f"{self.metric} data"
        return f"no {what} for {self.no_data_s} s"


def _finite(value: float | None) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _rule_problem(rule: AlertRule) -> tuple[str, str] | None:
    """The first thing wrong with `rule` as (key, problem), or None."""
    if not isinstance(rule.name, str) or not 1 <= len(rule.name) <= MAX_RULE_NAME_CHARS:
        return "name", f"expected 1-{MAX_RULE_NAME_CHARS} characters"
    if rule.metric != ANY_METRIC and not is_metric_name(rule.metric):
        return "metric", f"{rule.metric!r}: {METRIC_NAME_RULE}"
    if rule.metric == ANY_METRIC and rule.condition != "no_data":
        return "metric", "'*' (any metric) is only allowed in no_data rules"
    if not isinstance(rule.devices, str) or not 1 <= len(rule.devices) <= MAX_SELECTOR_CHARS:
        return "devices", f"expected a device id or glob of 1-{MAX_SELECTOR_CHARS} characters"
    if rule.condition not in CONDITIONS:
        return "condition", f"{rule.condition!r} is not one of {', '.join(CONDITIONS)}"
    if rule.severity not in SEVERITIES:
        return "severity", f"{rule.severity!r} is not one of {', '.join(SEVERITIES)}"
    if rule.aggregate not in AGGREGATES:
        return "aggregate", f"{rule.aggregate!r} is not one of {', '.join(AGGREGATES)}"
    if not _finite(rule.hysteresis) or rule.hysteresis < 0:
        return "hysteresis", "expected a finite number >= 0"
    needs = {
        "above": ("high",),
        "below": ("low",),
        "outside": ("low", "high"),
        "no_data": (),
    }[rule.condition]
    for key in ("low", "high"):
        value = getattr(rule, key)
        if key in needs and not _finite(value):
            return key, f"a {rule.condition} rule needs a finite {key} threshold"
        if key not in needs and value is not None:
            return key, f"not used by a {rule.condition} rule"
    if rule.condition == "outside" and not rule.low < rule.high:  # type: ignore[operator]
        return "low", "must be below high"
    if rule.condition == "no_data":
        if type(rule.no_data_s) is not int or rule.no_data_s < MIN_NO_DATA_SECONDS:
            return "no_data_s", f"a no_data rule needs whole seconds >= {MIN_NO_DATA_SECONDS}"
    elif rule.no_data_s is not None:
        return "no_data_s", f"not used by a {rule.condition} rule"
    return None


# --- the rules file -------------------------------------------------------------------

_FILE_KEYS: Final = frozenset(
    {
        "name",
        "metric",
        "devices",
        "above",
        "below",
        "outside",
        "no_data_minutes",
        "no_data_seconds",
        "severity",
        "hysteresis",
        "aggregate",
        "enabled",
        "description",
    }
)
_CONDITION_KEYS: Final = ("above", "below", "outside", "no_data_minutes", "no_data_seconds")


def rule_from_mapping(raw: dict[str, Any], *, where: str, source: str | None = None) -> AlertRule:
    """Build a rule from one `[[rule]]` table of a rules file (see docs/alerts.md)."""

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{where}.{key}", problem, source=source)

    unknown = sorted(set(raw) - _FILE_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key (known: {', '.join(sorted(_FILE_KEYS))})")
    for key in ("name", "metric"):
        if not isinstance(raw.get(key), str):
            raise fail(key, "required, a string")
    given = [k for k in _CONDITION_KEYS if k in raw]
    if len(given) != 1:
        raise fail("above", f"exactly one of {', '.join(_CONDITION_KEYS)} is required")
    key = given[0]
    value = raw[key]
    low: float | None = None
    high: float | None = None
    no_data_s: int | None = None
    condition: Condition
    if key in ("above", "below"):
        if not _finite(value):
            raise fail(key, "expected a finite number")
        condition = key  # type: ignore[assignment]
        low, high = (None, float(value)) if key == "above" else (float(value), None)
    elif key == "outside":
        if not (isinstance(value, list) and len(value) == 2 and all(map(_finite, value))):
            raise fail(key, "expected [low, high], two finite numbers")
        condition, low, high = "outside", float(value[0]), float(value[1])
    else:
        scale = 60 if key == "no_data_minutes" else 1
        if not _finite(value) or value <= 0:
            raise fail(key, "expected a number > 0")
        condition, no_data_s = "no_data", max(MIN_NO_DATA_SECONDS, round(value * scale))
    hysteresis = raw.get("hysteresis", 0.0)
    if not _finite(hysteresis):
        raise fail("hysteresis", "expected a finite number >= 0")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise fail("enabled", "expected true or false")
    for text_key in ("devices", "severity", "aggregate", "description"):
        if text_key in raw and not isinstance(raw[text_key], str):
            raise fail(text_key, "expected a string")
    try:
        return AlertRule(
            name=raw["name"],
            metric=raw["metric"],
            condition=condition,
            devices=raw.get("devices", "*"),
            low=low,
            high=high,
            no_data_s=no_data_s,
            severity=raw.get("severity", "warning"),
            hysteresis=float(hysteresis),
            aggregate=raw.get("aggregate", "extreme"),
            enabled=enabled,
            description=raw.get("description", ""),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.key}", exc.problem, source=source) from exc


def load_rules_file(path: str | Path) -> list[AlertRule]:
    """Read `[[rule]]` tables from a TOML file; ConfigError names the bad key."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError("rules file", f"cannot read: {exc.strerror}", source=source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("rules file", f"not valid TOML: {exc}", source=source) from exc
    unknown = sorted(set(data) - {"rule"})
    if unknown:
        raise ConfigError(unknown[0], "unknown top-level key (expected [[rule]])", source=source)
    tables = data.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("rule", "expected [[rule]] tables", source=source)
    rules = [rule_from_mapping(t, where=f"rule[{i}]", source=source) for i, t in enumerate(tables)]
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.name in seen:
            raise ConfigError(f"rule[{i}].name", f"duplicate name {rule.name!r}", source=source)
        seen.add(rule.name)
    return rules


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except DEL, which TOML wants escaped."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def dump_rules(rules: Sequence[AlertRule]) -> str:
    """The rules as a rules file; `load_rules_file` of it gives the same rules back.

    Keys at their default are left out, so an exported file reads like a written one.
    """
    chunks: list[str] = []
    for rule in rules:
        lines = [
            "[[rule]]",
            f"name = {_toml_string(rule.name)}",
            f"metric = {_toml_string(rule.metric)}",
        ]
        if rule.devices != "*":
            lines.append(f"devices = {_toml_string(rule.devices)}")
        if rule.condition == "above":
            lines.append(f"above = {rule.high!r}")
        elif rule.condition == "below":
            lines.append(f"below = {rule.low!r}")
        elif rule.condition == "outside":
            lines.append(f"outside = [{rule.low!r}, {rule.high!r}]")
        else:
            lines.append(f"no_data_seconds = {rule.no_data_s}")
        if rule.severity != "warning":
            lines.append(f"severity = {_toml_string(rule.severity)}")
        if rule.hysteresis != 0.0:
            lines.append(f"hysteresis = {rule.hysteresis!r}")
        if rule.aggregate != "extreme":
            lines.append(f"aggregate = {_toml_string(rule.aggregate)}")
        if not rule.enabled:
            lines.append("enabled = false")
        if rule.description:
            lines.append(f"description = {_toml_string(rule.description)}")
        chunks.append("\n".join(lines) + "\n")
    return "\n".join(chunks)


# --- administration: the `alert_rules` table ------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedRule:
    """A rule as stored, with its database id."""

    id: int
    rule: AlertRule


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What `sync_rules` changed, by rule name."""

    added: tuple[str, ...]
    updated: tuple[str, ...]
    unchanged: tuple[str, ...]
    disabled: tuple[str, ...]


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


def list_rules(conn: psycopg.Connection[Any], *, enabled_only: bool = False) -> list[LoadedRule]:
    """Every stored rule (or only the enabled ones, what the engine runs), by id."""
    rows = conn.execute(_SELECT_ENABLED_RULES if enabled_only else _SELECT_ALL_RULES).fetchall()
    return [_rule_from_row(r) for r in rows]


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
