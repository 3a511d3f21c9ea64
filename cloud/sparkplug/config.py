"""`millrace sparkplug --config FILE`: the Sparkplug B host's TOML, read into one frozen result.

Every problem raises `ConfigError` naming the key. The DSN comes from `database.dsn`,
`database.dsn_file` or MILLRACE_SPARKPLUG_DSN (never logged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from millrace.cloud.config import DEFAULT_HTTP_HOST, HttpSettings
from millrace.cloud.sparkplug.sessions import (
    DEFAULT_MAX_METRICS,
    DEFAULT_MAX_PAYLOAD_BYTES,
    Bounds,
)
from millrace.cloud.sparkplug.windows import DEFAULT_GRACE_MS
from millrace.configfile import BrokerConnection, Table, read_dsn, read_toml
from millrace.wire.periods import period_problem

DSN_ENV: Final = "MILLRACE_SPARKPLUG_DSN"
DEFAULT_PERIODS_S: Final = (10,)
DEFAULT_FLUSH_MS: Final = 500
DEFAULT_REBIRTH_INTERVAL_S: Final = 5.0
# Readings, states and dead letters held while storing fails (~200 B each: ~200 MB).
DEFAULT_MAX_PENDING: Final = 1_000_000
_ID_FORBIDDEN: Final = frozenset("/+#")


@dataclass(frozen=True, slots=True)
class SparkplugConfig:
    """Everything `millrace sparkplug` needs."""

    dsn: str = field(repr=False)
    broker: BrokerConnection
    host_id: str
    groups: tuple[str, ...] = ()  # empty: every group
    periods_s: tuple[int, ...] = DEFAULT_PERIODS_S
    grace_ms: int = DEFAULT_GRACE_MS
    flush_ms: int = DEFAULT_FLUSH_MS
    rebirth_interval_s: float = DEFAULT_REBIRTH_INTERVAL_S
    bounds: Bounds = field(default_factory=Bounds)
    max_pending: int = DEFAULT_MAX_PENDING
    # /metrics and /healthz; port 0 (the default): off.
    http: HttpSettings = field(default_factory=lambda: HttpSettings(port=0))


def _sparkplug_id(t: Table, key: str, value: str) -> str:
    if not value or any(c in _ID_FORBIDDEN for c in value) or not value.isprintable():
        raise t.error(key, f"{value!r}: non-empty, printable, without / + #")
    return value


def parse_config(data: dict[str, Any], *, base: Path, source: str = "<config>") -> SparkplugConfig:
    """A SparkplugConfig from parsed TOML; paths are relative to `base`."""
    root = Table(data, base=base, source=source)
    database = root.table("database")
    dsn = read_dsn(database, env=DSN_ENV)
    broker_table = root.table("broker", required=True)
    broker = BrokerConnection.read(broker_table, files_must_exist=True)
    sp = root.table("sparkplug", required=True)
    http = root.table("http")
    http_settings = HttpSettings(
        host=http.text("host", DEFAULT_HTTP_HOST),
        port=http.integer("port", 0, low=0, high=65535),
    )
    host_id = _sparkplug_id(sp, "host_id", sp.text("host_id"))
    raw_groups = sp.raw("groups") or []
    if not isinstance(raw_groups, list):
        raise sp.error("groups", "expected an array of group ids")
    groups = tuple(
        _sparkplug_id(sp, f"groups[{i}]", g if isinstance(g, str) else "")
        for i, g in enumerate(raw_groups)
    )
    periods = sp.integers("periods_s", DEFAULT_PERIODS_S, low=1, high=3600, non_empty=True)
    for i, period in enumerate(periods):
        problem = period_problem(period)
        if problem:
            raise sp.error(f"periods_s[{i}]", problem)
    config = SparkplugConfig(
        dsn=dsn,
        broker=broker,
        host_id=host_id,
        groups=groups,
        periods_s=tuple(sorted(set(periods))),
        grace_ms=sp.integer("grace_ms", DEFAULT_GRACE_MS, low=0, high=600_000),
        flush_ms=sp.integer("flush_ms", DEFAULT_FLUSH_MS, low=10, high=60_000),
        rebirth_interval_s=sp.number(
            "rebirth_interval_s", DEFAULT_REBIRTH_INTERVAL_S, low=0.0, high=3600.0
        ),
        bounds=Bounds(
            max_payload_bytes=sp.integer(
                "max_payload_bytes", DEFAULT_MAX_PAYLOAD_BYTES, low=1024, high=16 * 1024 * 1024
            ),
            max_metrics=sp.integer("max_metrics", DEFAULT_MAX_METRICS, low=1, high=1_000_000),
        ),
        http=http_settings,
        max_pending=sp.integer("max_pending", DEFAULT_MAX_PENDING, low=1, high=100_000_000),
    )
    for table in (root, database, broker_table, sp, http):
        table.check_unknown()
    return config


def load_config(path: Path) -> SparkplugConfig:
    """Read and check the config file at `path`."""
    return parse_config(read_toml(path), base=path.parent, source=str(path))
