"""The ingest worker's configuration: one TOML file, one loader, one frozen result.

Every problem raises `ConfigError` naming the key (`batch.max_rows`). Relative
paths resolve against the config file's directory. The database password
never needs to be in this file: `database.dsn_file` (or the environment
variable MILLRACE_INGEST_DSN) supplies the DSN instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from millrace import configfile
from millrace.cloud.alerts.notify import NotifySettings, parse_notify
from millrace.cloud.dsn import check_writer_dsn, dsn_key
from millrace.cloud.ingest.limits import IngestLimits
from millrace.cloud.packing import DEFAULT_PACK_AFTER_DAYS
from millrace.cloud.retention import DEFAULT_AGES_DAYS, RETAINED_TABLES, RetentionPolicy
from millrace.configfile import BrokerConnection, Table, optional_dsn, read_dsn, read_toml
from millrace.errors import ConfigError
from millrace.ids import is_device_id
from millrace.wire.periods import SECONDS_PER_HOUR, STANDARD_PERIODS_S, divides_hour

DSN_ENV: Final = "MILLRACE_INGEST_DSN"
DEFAULT_BROKER_PORT: Final = configfile.DEFAULT_BROKER_PORT
# No fixed default group: omitted, it is derived from the CA certificate (SHARE_GROUP_PREFIX
# + a hash), the same for every worker of one plant. Not a secret: the broker refuses
# $share subscriptions to devices (docs/security.md).
SHARE_GROUP_PREFIX: Final = "ingest-"
SHARE_GROUP_HASH_CHARS: Final = 16
# A week: a worker may be down over a long weekend and still find its session and queue.
DEFAULT_SESSION_EXPIRY_SECONDS: Final = 7 * 24 * 3600
# Unacknowledged messages the broker may send us; bounds one commit's messages and memory.
DEFAULT_RECEIVE_MAXIMUM: Final = 1000
DEFAULT_KEEPALIVE_SECONDS: Final = configfile.DEFAULT_BROKER_KEEPALIVE_SECONDS
# A batch commits at whichever comes first; 200 ms keeps window-close-to-commit well under 1 s.
DEFAULT_BATCH_MAX_ROWS: Final = 20_000
DEFAULT_BATCH_MAX_DELAY_MS: Final = 200
# Rollups merge their commits' partials this often: the lag of rollups behind readings.
DEFAULT_ROLLUP_DRAIN_MS: Final = 1000
# Edge outboxes keep up to a week by default; older data is a broken clock or a lost cause.
DEFAULT_MAX_AGE_SECONDS: Final = 8 * 24 * 3600
DEFAULT_MAX_SKEW_SECONDS: Final = 300
# Every allowed period divides an hour, so a window always lies in one hourly bucket; the
# edge refuses the same periods (millrace.wire.periods, one rule for both sides).
DEFAULT_ALLOWED_PERIODS_S: Final = STANDARD_PERIODS_S
DEFAULT_HTTP_HOST: Final = "127.0.0.1"
DEFAULT_HTTP_PORT: Final = 9464
DEFAULT_STALE_AFTER_SECONDS: Final = 300
DEFAULT_ALERT_REFRESH_SECONDS: Final = 30
DEFAULT_NO_DATA_CHECK_SECONDS: Final = 15
DEFAULT_RETENTION_INTERVAL_SECONDS: Final = 3600


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerSettings(BrokerConnection):
    """Where the worker subscribes (mutual TLS), as whom, and its persistent session."""

    client_id: str
    share_group: str
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_SECONDS
    receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """A batch closes at `max_rows` rows or `max_delay_ms` after its first message."""

    max_rows: int = DEFAULT_BATCH_MAX_ROWS
    max_delay_ms: int = DEFAULT_BATCH_MAX_DELAY_MS
    # Rollups trail their readings by about this (cloud/ingest/rollup_drain.py).
    rollup_drain_ms: int = DEFAULT_ROLLUP_DRAIN_MS


@dataclass(frozen=True, slots=True)
class ValidationSettings:
    """What the worker accepts beyond the wire contract itself."""

    max_age_s: int = DEFAULT_MAX_AGE_SECONDS
    max_skew_s: int = DEFAULT_MAX_SKEW_SECONDS
    allowed_periods_s: frozenset[int] = frozenset(DEFAULT_ALLOWED_PERIODS_S)


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Prometheus /metrics and /healthz; port 0 turns the endpoint off."""

    host: str = DEFAULT_HTTP_HOST
    port: int = DEFAULT_HTTP_PORT


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """The retention schedule, with its own DSN: a login in millrace_retention (db upgrade)."""

    enabled: bool = True
    interval_s: int = DEFAULT_RETENTION_INTERVAL_SECONDS
    dsn: str | None = field(default=None, repr=False)
    days: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_AGES_DAYS))
    # Windows older than this are packed on the Apache edition (cloud/packing.py).
    pack_after_days: float = DEFAULT_PACK_AFTER_DAYS


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """Everything `millrace ingest` needs."""

    dsn: str = field(repr=False)  # may hold a password: never in logs or reprs
    broker: BrokerSettings
    batch: BatchSettings = BatchSettings()
    validation: ValidationSettings = ValidationSettings()
    http: HttpSettings = HttpSettings()
    stale_after_s: int = DEFAULT_STALE_AFTER_SECONDS
    alert_refresh_s: int = DEFAULT_ALERT_REFRESH_SECONDS
    no_data_check_s: int = DEFAULT_NO_DATA_CHECK_SECONDS
    retention: RetentionSettings = RetentionSettings()
    limits: IngestLimits = field(default_factory=IngestLimits)
    notify: NotifySettings = field(default_factory=NotifySettings)
    source: Path | None = None


def _broker(t: Table) -> BrokerSettings:
    client_id = t.text("client_id")
    if len(client_id) > 64 or any(c in client_id for c in "/+#") or not client_id.isprintable():
        raise t.error("client_id", "1-64 printable characters without / + #")
    group = t.text("share_group", "")
    if group and not is_device_id(group):
        raise t.error("share_group", "a-z 0-9 . _ - only (it becomes a topic level)")
    settings = BrokerSettings.read(
        t,
        files_must_exist=True,
        client_id=client_id,
        share_group=group or SHARE_GROUP_PREFIX,
        session_expiry_s=t.integer(
            "session_expiry_s", DEFAULT_SESSION_EXPIRY_SECONDS, low=60, high=2**32 - 1
        ),
        receive_maximum=t.integer("receive_maximum", DEFAULT_RECEIVE_MAXIMUM, low=1, high=65535),
    )
    if group:
        return settings
    return replace(settings, share_group=derived_share_group(settings.ca))


def derived_share_group(ca: Path) -> str:
    """The group of workers whose config omits `broker.share_group`: one per CA (plant)."""
    try:
        digest = hashlib.sha256(ca.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError("broker.share_group", f"not set and {ca} is unreadable: {exc}") from exc
    return SHARE_GROUP_PREFIX + digest[:SHARE_GROUP_HASH_CHARS]


def _periods(t: Table) -> frozenset[int]:
    periods = t.integers(
        "allowed_periods_s", DEFAULT_ALLOWED_PERIODS_S, low=1, high=SECONDS_PER_HOUR, non_empty=True
    )
    for i, value in enumerate(periods):
        if not divides_hour(value):
            raise t.error(
                f"allowed_periods_s[{i}]",
                f"{value} does not divide 3600 (every window must fall in one hourly rollup)",
            )
    return frozenset(periods)


def _retention(t: Table) -> RetentionSettings:
    enabled = t.boolean("enabled", True)
    interval_s = t.integer("interval_s", DEFAULT_RETENTION_INTERVAL_SECONDS, low=60, high=7 * 86400)
    # Its own login (millrace_retention); without one the worker falls back to the ingest DSN.
    dsn = optional_dsn(t)
    if dsn is not None:
        check_writer_dsn(dsn, key=dsn_key(t, env=None))
    days_table = t.table("days")
    days_table.check_unknown(RETAINED_TABLES)
    days = dict(DEFAULT_AGES_DAYS)
    for name in days_table.data:
        days[name] = days_table.number(name, low=0.0, low_open=True)
    try:
        RetentionPolicy.from_days(days)
    except ConfigError as exc:
        raise t.error("days", exc.problem) from exc
    pack_after_days = t.number("pack_after_days", DEFAULT_PACK_AFTER_DAYS, low=0.0, low_open=True)
    t.check_unknown()
    return RetentionSettings(
        enabled=enabled,
        interval_s=interval_s,
        dsn=dsn,
        days=days,
        pack_after_days=pack_after_days,
    )


def _limits(t: Table) -> IngestLimits:
    """`[limits]`: the per-device bounds (docs/cloud.md "Bounds per device")."""
    d = IngestLimits()
    limits = IngestLimits(
        max_gaps_per_stream=t.integer(
            "max_gaps_per_stream", d.max_gaps_per_stream, low=1, high=1_000_000
        ),
        max_metrics_per_device=t.integer(
            "max_metrics_per_device", d.max_metrics_per_device, low=1, high=1_000_000
        ),
        id_cache_names=t.integer("id_cache_names", d.id_cache_names, low=1000, high=10_000_000),
        dead_letters_per_minute=t.number(
            "dead_letters_per_minute", d.dead_letters_per_minute, low=0.0, low_open=True
        ),
        dead_letter_burst=t.integer(
            "dead_letter_burst", d.dead_letter_burst, low=1, high=1_000_000
        ),
    )
    t.check_unknown()
    return limits


def parse_config(data: Mapping[str, Any], *, base: Path, source: str = "<config>") -> IngestConfig:
    """Build an IngestConfig from parsed TOML; paths are relative to `base`."""
    root = Table(data, base=base, source=source)
    database = root.table("database")
    dsn = check_writer_dsn(read_dsn(database, env=DSN_ENV), key=dsn_key(database, env=DSN_ENV))
    broker = root.table("broker")
    broker_settings = _broker(broker)
    batch = root.table("batch")
    batch_settings = BatchSettings(
        max_rows=batch.integer("max_rows", DEFAULT_BATCH_MAX_ROWS, low=1, high=1_000_000),
        max_delay_ms=batch.integer("max_delay_ms", DEFAULT_BATCH_MAX_DELAY_MS, low=1, high=60_000),
        rollup_drain_ms=batch.integer(
            "rollup_drain_ms", DEFAULT_ROLLUP_DRAIN_MS, low=10, high=60_000
        ),
    )
    validation = root.table("validation")
    validation_settings = ValidationSettings(
        max_age_s=validation.integer(
            "max_age_s", DEFAULT_MAX_AGE_SECONDS, low=60, high=10 * 365 * 86400
        ),
        max_skew_s=validation.integer("max_skew_s", DEFAULT_MAX_SKEW_SECONDS, low=0, high=86400),
        allowed_periods_s=_periods(validation),
    )
    http = root.table("http")
    http_settings = HttpSettings(
        host=http.text("host", DEFAULT_HTTP_HOST),
        port=http.integer("port", DEFAULT_HTTP_PORT, low=0, high=65535),
    )
    status = root.table("status")
    stale_after_s = status.integer(
        "stale_after_s", DEFAULT_STALE_AFTER_SECONDS, low=1, high=30 * 86400
    )
    alerts = root.table("alerts")
    alert_refresh_s = alerts.integer("refresh_s", DEFAULT_ALERT_REFRESH_SECONDS, low=1, high=86400)
    no_data_check_s = alerts.integer(
        "no_data_check_s", DEFAULT_NO_DATA_CHECK_SECONDS, low=1, high=86400
    )
    retention = _retention(root.table("retention"))
    limits = _limits(root.table("limits"))
    notify = parse_notify(root.table("notify"))
    for table in (root, database, broker, batch, validation, http, status, alerts):
        table.check_unknown()
    return IngestConfig(
        dsn=dsn,
        broker=broker_settings,
        batch=batch_settings,
        validation=validation_settings,
        http=http_settings,
        stale_after_s=stale_after_s,
        alert_refresh_s=alert_refresh_s,
        no_data_check_s=no_data_check_s,
        retention=retention,
        limits=limits,
        notify=notify,
        source=None,
    )


def load_config(path: Path) -> IngestConfig:
    """Read and validate an ingest TOML file."""
    path = Path(path)
    data = read_toml(path)
    config = parse_config(data, base=path.resolve().parent, source=str(path))
    return replace(config, source=path)
