"""The ingest worker's configuration: one TOML file, one loader, one frozen result.

Every problem raises `ConfigError` naming the key (`batch.max_rows`). Relative
paths resolve against the config file's directory. The database password
never needs to be in this file: `database.dsn_file` (or the environment
variable MILLRACE_INGEST_DSN) supplies the DSN instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from millrace.cloud.retention import DEFAULT_AGES_DAYS, RetentionPolicy
from millrace.configfile import Section, read_toml
from millrace.errors import ConfigError
from millrace.ids import is_device_id

DSN_ENV: Final = "MILLRACE_INGEST_DSN"
DEFAULT_BROKER_PORT: Final = 8883
DEFAULT_SHARE_GROUP: Final = "ingest"
# A week: a worker may be down over a long weekend and still find its session and queue.
DEFAULT_SESSION_EXPIRY_SECONDS: Final = 7 * 24 * 3600
# Unacknowledged messages the broker may send us; bounds one commit's messages and memory.
DEFAULT_RECEIVE_MAXIMUM: Final = 1000
DEFAULT_KEEPALIVE_SECONDS: Final = 30
# A batch commits at whichever comes first; 200 ms keeps window-close-to-commit well under 1 s.
DEFAULT_BATCH_MAX_ROWS: Final = 20_000
DEFAULT_BATCH_MAX_DELAY_MS: Final = 200
# Edge outboxes keep up to a week by default; older data is a broken clock or a lost cause.
DEFAULT_MAX_AGE_SECONDS: Final = 8 * 24 * 3600
DEFAULT_MAX_SKEW_SECONDS: Final = 300
# Every allowed period divides an hour, so a window always lies in one hourly bucket.
DEFAULT_ALLOWED_PERIODS_S: Final = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600)
SECONDS_PER_HOUR: Final = 3600
DEFAULT_HTTP_HOST: Final = "127.0.0.1"
DEFAULT_HTTP_PORT: Final = 9464
DEFAULT_STALE_AFTER_SECONDS: Final = 300
DEFAULT_ALERT_REFRESH_SECONDS: Final = 30
DEFAULT_NO_DATA_CHECK_SECONDS: Final = 15
DEFAULT_RETENTION_INTERVAL_SECONDS: Final = 3600


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where the worker subscribes, and as whom (mutual TLS)."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    client_id: str
    share_group: str = DEFAULT_SHARE_GROUP
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_SECONDS
    receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM
    keepalive_s: int = DEFAULT_KEEPALIVE_SECONDS


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """A batch closes at `max_rows` rows or `max_delay_ms` after its first message."""

    max_rows: int = DEFAULT_BATCH_MAX_ROWS
    max_delay_ms: int = DEFAULT_BATCH_MAX_DELAY_MS


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
    """The retention schedule; drop_chunks needs the tables' owner, hence its own DSN."""

    enabled: bool = True
    interval_s: int = DEFAULT_RETENTION_INTERVAL_SECONDS
    dsn: str | None = field(default=None, repr=False)
    days: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_AGES_DAYS))


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
    source: Path | None = None


def _read_dsn(section: Section, base: Path) -> str:
    has_dsn = "dsn" in section.data
    has_file = "dsn_file" in section.data
    if has_dsn and has_file:
        raise section.error("dsn", "give dsn or dsn_file, not both")
    if has_file:
        path = section.path("dsn_file", base)
        try:
            dsn = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise section.error("dsn_file", f"cannot read {path}: {exc}") from exc
        if not dsn:
            raise section.error("dsn_file", f"{path} is empty")
        return dsn
    if has_dsn:
        return section.text("dsn")
    from_env = os.environ.get(DSN_ENV, "").strip()
    if from_env:
        return from_env
    raise section.error("dsn", f"is required (or dsn_file, or the {DSN_ENV} environment variable)")


def _broker(section: Section, base: Path) -> BrokerSettings:
    client_id = section.text("client_id")
    if len(client_id) > 64 or any(c in client_id for c in "/+#") or not client_id.isprintable():
        raise section.error("client_id", "1-64 printable characters without / + #")
    group = section.text("share_group", DEFAULT_SHARE_GROUP)
    if not is_device_id(group):
        raise section.error("share_group", "a-z 0-9 . _ - only (it becomes a topic level)")
    return BrokerSettings(
        host=section.text("host"),
        port=section.integer("port", DEFAULT_BROKER_PORT, low=1, high=65535),
        ca=section.path("ca", base),
        cert=section.path("cert", base),
        key=section.path("key", base),
        client_id=client_id,
        share_group=group,
        session_expiry_s=section.integer(
            "session_expiry_s", DEFAULT_SESSION_EXPIRY_SECONDS, low=60, high=2**32 - 1
        ),
        receive_maximum=section.integer(
            "receive_maximum", DEFAULT_RECEIVE_MAXIMUM, low=1, high=65535
        ),
        keepalive_s=section.integer("keepalive_s", DEFAULT_KEEPALIVE_SECONDS, low=5, high=3600),
    )


def _periods(section: Section) -> frozenset[int]:
    section.used.add("allowed_periods_s")
    raw = section.data.get("allowed_periods_s", list(DEFAULT_ALLOWED_PERIODS_S))
    if not isinstance(raw, list) or not raw:
        raise section.error("allowed_periods_s", "expected a non-empty list of seconds")
    for value in raw:
        if type(value) is not int or value <= 0 or SECONDS_PER_HOUR % value:
            raise section.error(
                "allowed_periods_s",
                f"{value!r} must be a whole number of seconds that divides 3600 "
                "(so every window falls in one hourly rollup)",
            )
    return frozenset(raw)


def _retention(section: Section, base: Path) -> RetentionSettings:
    section.used.add("enabled")
    enabled = section.data.get("enabled", True)
    if type(enabled) is not bool:
        raise section.error("enabled", f"expected true or false, got {enabled!r}")
    interval_s = section.integer(
        "interval_s", DEFAULT_RETENTION_INTERVAL_SECONDS, low=60, high=7 * 86400
    )
    dsn = None
    if "dsn" in section.data or "dsn_file" in section.data:
        dsn = _read_dsn(section, base)
    section.used.update({"dsn", "dsn_file"})
    days_section = section.table("days")
    days = dict(DEFAULT_AGES_DAYS)
    for name, value in days_section.data.items():
        days_section.used.add(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise days_section.error(name, f"expected a number of days > 0, got {value!r}")
        days[name] = float(value)
    try:
        RetentionPolicy.from_days(days)
    except ConfigError as exc:
        raise section.error("days", exc.problem) from exc
    section.check_unknown()
    return RetentionSettings(enabled=enabled, interval_s=interval_s, dsn=dsn, days=days)


def parse_config(data: Mapping[str, Any], *, base: Path, source: str = "<config>") -> IngestConfig:
    """Build an IngestConfig from parsed TOML; paths are relative to `base`."""
    root = Section(data, "", source)
    database = root.table("database")
    dsn = _read_dsn(database, base)
    database.used.update({"dsn", "dsn_file"})
    broker = root.table("broker")
    broker_settings = _broker(broker, base)
    batch = root.table("batch")
    batch_settings = BatchSettings(
        max_rows=batch.integer("max_rows", DEFAULT_BATCH_MAX_ROWS, low=1, high=1_000_000),
        max_delay_ms=batch.integer("max_delay_ms", DEFAULT_BATCH_MAX_DELAY_MS, low=1, high=60_000),
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
    retention = _retention(root.table("retention"), base)
    for section in (root, database, broker, batch, validation, http, status, alerts):
        section.check_unknown()
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
        source=None,
    )


def load_config(path: Path) -> IngestConfig:
    """Read and validate an ingest TOML file."""
    path = Path(path)
    data = read_toml(path)
    config = parse_config(data, base=path.resolve().parent, source=str(path))
    return replace(config, source=path)
