"""Alert rules and their state machine, free of I/O so they are unit-tested alone.

A rule watches one metric on the devices its selector matches. Threshold rules
look at each stored window; a window's value is its extreme by default (max for
`above`, min for `below`, both for `outside`) so a spike inside a window is not
averaged away. Hysteresis keeps a value hovering at the threshold from
flapping: an `above` alert raised at `high` clears only at `high - hysteresis`.
`no_data` rules raise when a (device, metric) pair has not been received for
`no_data_s` seconds and clear on the next window.
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

from millrace.errors import ConfigError
from millrace.ids import METRIC_NAME_RULE, is_metric_name

Condition = Literal["above", "below", "outside", "no_data"]
Aggregate = Literal["extreme", "mean", "last"]
Severity = Literal["info", "warning", "critical"]
Transition = Literal["raise", "clear"]

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


@dataclass(frozen=True, slots=True)
class WindowValues:
    """The parts of a stored window a threshold rule looks at."""

    ts: datetime
    count: int
    sum: float
    min: float
    max: float
    last: float


@dataclass(frozen=True, slots=True)
class Step:
    """What one window did to an alert: the transition (or None) and the value seen."""

    transition: Transition | None
    value: float


def _values(rule: AlertRule, w: WindowValues) -> tuple[float, float]:
    """(value compared with `low`, value compared with `high`) per the rule's aggregate."""
    if rule.aggregate == "mean":
        mean = w.sum / w.count
        return mean, mean
    if rule.aggregate == "last":
        return w.last, w.last
    return w.min, w.max


def step(rule: AlertRule, *, active: bool, window: WindowValues) -> Step:
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


def run(
    rule: AlertRule, *, active: bool, windows: list[WindowValues]
) -> list[tuple[WindowValues, Step]]:
    """Feed windows (sorted here by time) and return the transitions, in order."""
    out: list[tuple[WindowValues, Step]] = []
    for window in sorted(windows, key=lambda w: w.ts):
        result = step(rule, active=active, window=window)
        if result.transition is not None:
            out.append((window, result))
            active = result.transition == "raise"
    return out


def no_data_due(rule: AlertRule, *, last_received: datetime, now: datetime) -> bool:
    """True when a no_data rule should raise: nothing received for `no_data_s` seconds."""
    assert rule.no_data_s is not None
    return (now - last_received).total_seconds() >= rule.no_data_s


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
