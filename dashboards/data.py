"""The dashboard's data access: the engine, cached query results, the one write.

The engine is a Streamlit resource (one pool per process). Query results are
cached with a TTL equal to the auto-refresh interval, and pages pass time
ranges ending at `refresh_now()` (now, rounded down to the interval), so every
open screen asks with the same arguments and ten screens cost the database
one query per refresh. Nothing here runs at import.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Concatenate, Final, Generic, ParamSpec, TypeVar, cast

import psycopg
import streamlit as st
from sqlalchemy import Engine, create_engine

from millrace.dashboards import queries, redundancy
from millrace.dashboards.auth import AuthUser, PermissionDenied, can_acknowledge
from millrace.dashboards.config import CONFIG_ENV, DashboardConfig, load_config
from millrace.dashboards.resolution import Resolution
from millrace.errors import ConfigError

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

APPLICATION_NAME: Final = "millrace-dashboard"
# A dashboard query that runs longer than this is a bug or an overloaded database; fail
# it so the page says so instead of hanging every screen's refresh behind it.
STATEMENT_TIMEOUT_MS: Final = 20_000
POOL_SIZE: Final = 4
POOL_MAX_OVERFLOW: Final = 4
POOL_RECYCLE_SECONDS: Final = 1800
# Distinct argument sets kept per query (devices x ranges); old refreshes age out by TTL.
CACHE_MAX_ENTRIES: Final = 512


@st.cache_resource(show_spinner=False)
def _load_settings(path: str) -> DashboardConfig:
    return load_config(path)


def settings() -> DashboardConfig:
    """The configuration named by MILLRACE_DASH_CONFIG (set by `millrace dash`)."""
    path = os.environ.get(CONFIG_ENV, "").strip()
    if not path:
        raise ConfigError(
            CONFIG_ENV, "not set; start the dashboard with millrace dash --config FILE"
        )
    return _load_settings(path)


@st.cache_resource(show_spinner=False)
def engine(dsn: str) -> Engine:
    """One connection pool per process and database, created on first use."""

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(
            dsn,
            application_name=APPLICATION_NAME,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c timezone=UTC",
            connect_timeout=5,
        )

    # A creator accepts both URL and key=value DSNs exactly as libpq does.
    return create_engine(
        "postgresql+psycopg://",
        creator=connect,
        pool_size=POOL_SIZE,
        max_overflow=POOL_MAX_OVERFLOW,
        pool_pre_ping=True,
        pool_recycle=POOL_RECYCLE_SECONDS,
    )


def refresh_now() -> datetime:
    """Now, rounded down to the refresh interval: the shared end of relative ranges."""
    step = settings().refresh_s
    now = datetime.now(UTC).timestamp()
    return datetime.fromtimestamp(now - now % step, tz=UTC)


class _CachedQuery(Generic[P, R]):
    """`fn(dsn, ...)` cached with the configured TTL; callers omit the dsn.

    The TTL comes from the config, which is only known at run time, so the
    st.cache_data wrapper is made on first call (one per TTL value).
    """

    def __init__(self, fn: Callable[Concatenate[str, P], R]) -> None:
        self._fn = fn
        self._made: dict[int, Any] = {}
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        config = settings()
        cached = self._made.get(config.refresh_s)
        if cached is None:
            cached = self._made[config.refresh_s] = st.cache_data(
                ttl=config.refresh_s, show_spinner=False, max_entries=CACHE_MAX_ENTRIES
            )(self._fn)
        return cast(R, cached(config.dsn, *args, **kwargs))

    def clear(self) -> None:
        """Drop every cached result, so the next call asks the database."""
        for cached in self._made.values():
            cached.clear()


def _cached(fn: Callable[Concatenate[str, P], R]) -> _CachedQuery[P, R]:
    return _CachedQuery(fn)


def _run(dsn: str, query: Callable[..., R], /, **kwargs: Any) -> R:
    with engine(dsn).connect() as conn:
        return query(conn, **kwargs)


# Each wrapper's first parameter is the DSN (hashed into the cache key, never shown).


@_cached
def fleet(dsn: str, *, stale_after_s: float) -> Any:
    return _run(dsn, queries.fleet, stale_after_s=stale_after_s)


@_cached
def active_alert_counts(dsn: str) -> Any:
    return _run(dsn, queries.active_alert_counts)


@_cached
def ingest_rate(dsn: str, *, start: datetime, end: datetime) -> queries.IngestRate:
    return _run(dsn, queries.ingest_rate, start=start, end=end)


@_cached
def device_names(dsn: str) -> list[str]:
    return _run(dsn, queries.device_names)


@_cached
def device_metrics(dsn: str, *, device: str) -> Any:
    return _run(dsn, queries.device_metrics, device=device)


@_cached
def series(
    dsn: str, *, device: str, metric: str, resolution: Resolution, start: datetime, end: datetime
) -> Any:
    return _run(
        dsn,
        queries.series,
        device=device,
        metric=metric,
        resolution=resolution,
        start=start,
        end=end,
    )


@_cached
def device_events(dsn: str, *, device: str, start: datetime, end: datetime) -> Any:
    return _run(dsn, queries.device_events, device=device, start=start, end=end)


@_cached
def active_alerts(dsn: str) -> Any:
    return _run(dsn, queries.active_alerts)


@_cached
def unacknowledged_alerts(dsn: str) -> Any:
    return _run(dsn, queries.unacknowledged_alerts)


@_cached
def alert_history(dsn: str, *, start: datetime, end: datetime) -> Any:
    return _run(dsn, queries.alert_history, start=start, end=end)


@_cached
def audit_entries(dsn: str, *, limit: int = 50) -> Any:
    return _run(dsn, queries.audit_entries, limit=limit)


@_cached
def dead_letter_counts(dsn: str, *, start: datetime, end: datetime) -> Any:
    return _run(dsn, queries.dead_letter_counts, start=start, end=end)


@_cached
def dead_letter_samples(dsn: str, *, start: datetime, end: datetime) -> Any:
    return _run(dsn, queries.dead_letter_samples, start=start, end=end)


@_cached
def open_sequence_gaps(dsn: str) -> Any:
    return _run(dsn, queries.open_sequence_gaps)


@_cached
def data_holes_in(dsn: str, *, start: datetime, end: datetime) -> Any:
    return _run(dsn, queries.data_holes_in, start=start, end=end)


@_cached
def rejected_readings(dsn: str, *, start: datetime, end: datetime) -> Any:
    return _run(dsn, queries.rejected_readings, start=start, end=end)


@_cached
def delivery_by_device(dsn: str, *, start: datetime, end: datetime, late_after_s: float) -> Any:
    return _run(dsn, queries.delivery_by_device, start=start, end=end, late_after_s=late_after_s)


@_cached
def backlog_history(dsn: str, *, start: datetime, end: datetime, bucket_s: int) -> Any:
    return _run(dsn, queries.backlog_history, start=start, end=end, bucket_s=bucket_s)


@_cached
def ingest_timeline(dsn: str, *, start: datetime, end: datetime, bucket_s: int) -> Any:
    return _run(dsn, queries.ingest_timeline, start=start, end=end, bucket_s=bucket_s)


@_cached
def commit_latency(dsn: str, *, start: datetime, end: datetime, bucket_s: int) -> Any:
    return _run(dsn, queries.commit_latency, start=start, end=end, bucket_s=bucket_s)


@_cached
def dead_letter_timeline(dsn: str, *, start: datetime, end: datetime, bucket_s: int) -> Any:
    return _run(dsn, queries.dead_letter_timeline, start=start, end=end, bucket_s=bucket_s)


@_cached
def database_state(dsn: str) -> redundancy.DatabaseState:
    return _run(dsn, redundancy.database_state)


@_cached
def ops_events_in(dsn: str, *, start: datetime, end: datetime) -> Any:
    return _run(dsn, redundancy.ops_events_in, start=start, end=end)


@_cached
def gateway_brokers(dsn: str) -> Any:
    return _run(dsn, redundancy.gateway_brokers)


_ALERT_VIEWS: Final = (active_alerts, unacknowledged_alerts, alert_history, active_alert_counts)


def acknowledge_alert(user: AuthUser, alert_id: int, *, comment: str) -> None:
    """Acknowledge as `user` (operator or admin only) and show it at once on every screen.

    Raises PermissionDenied for a viewer, cloud.alerts.lifecycle.AlertError
    when the alert is unknown or already acknowledged.
    """
    if not can_acknowledge(user):
        logger.warning(
            "acknowledge refused: user=%s role=%s alert=%s", user.name, user.role, alert_id
        )
        raise PermissionDenied(f"{user.name} ({user.role}) may not acknowledge alerts")
    config = settings()
    with engine(config.dsn).begin() as conn:
        queries.acknowledge_alert(conn, alert_id, user=user.name, comment=comment.strip())
    for view in (*_ALERT_VIEWS, audit_entries):
        view.clear()
    logger.info("alert acknowledged from dashboard: alert=%s user=%s", alert_id, user.name)
