"""The dashboard's configuration: one TOML file, one loader, one frozen result.

Every problem raises `ConfigError` naming the key (`dashboard.timezone`).
Relative paths resolve against the config file's directory. The database
password never needs to be in this file: `database.dsn_file` (or the
environment variable MILLRACE_DASH_DSN) supplies the DSN instead.

    [dashboard]
    title = "Millrace plant"
    timezone = "Europe/Berlin"     # IANA name; every time on screen is shown in it
    refresh_seconds = 15           # auto-refresh interval = query cache TTL

    [database]
    dsn_file = "dashboard.dsn"     # or dsn = "postgresql://millrace_dashboard@host/db"
    # a Patroni pair: "postgresql://u@db1.example:5432,db2.example:5432/db?target_session_attrs=read-write"

    [auth]
    users_file = "users.toml"      # local accounts (millrace dash add-user)
    oidc_allowed_emails = ["ada@example.com"]   # single sign-on: who may enter, besides
    oidc_allowed_domains = ["example.com"]      # the users file's password-less accounts
    client_address_header = "X-Real-IP"         # behind a proxy that sets it (login limits)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from millrace.cloud.dsn import check_writer_dsn, dsn_key
from millrace.configfile import Table, describe, read_dsn, read_toml

Role = Literal["viewer", "operator", "admin"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)

CONFIG_ENV: Final = "MILLRACE_DASH_CONFIG"
DSN_ENV: Final = "MILLRACE_DASH_DSN"
DEFAULT_TITLE: Final = "Millrace plant"
DEFAULT_TIMEZONE: Final = "UTC"
# Wall screens refresh on their own; 15 s keeps them current while ten screens cost the
# database one query per refresh (the query cache TTL equals this interval).
DEFAULT_REFRESH_SECONDS: Final = 15
MIN_REFRESH_SECONDS: Final = 2
MAX_REFRESH_SECONDS: Final = 3600
# Same default as the ingest worker's status.stale_after_s: connected but silent this long.
DEFAULT_STALE_AFTER_SECONDS: Final = 300
# A batch that reaches the cloud this long after it was sent counts as late.
DEFAULT_LATE_AFTER_SECONDS: Final = 60
DEFAULT_PORT: Final = 8501
DEFAULT_ADDRESS: Final = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Where `millrace dash` listens; TLS when both files are given."""

    port: int = DEFAULT_PORT
    address: str = DEFAULT_ADDRESS
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Local accounts, and optionally OIDC through Streamlit's own `[auth]` secrets."""

    users_file: Path
    oidc_secrets: Path | None = None  # a Streamlit secrets.toml holding an [auth] table
    oidc_default_role: Role = "viewer"
    # Single sign-on admits only verified emails listed here, in these domains, or in the
    # users file; an identity provider's other accounts are refused.
    oidc_allowed_emails: frozenset[str] = frozenset()
    oidc_allowed_domains: frozenset[str] = frozenset()
    # The header a trusted reverse proxy sets to the client's address; None = the socket peer.
    client_address_header: str | None = None


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    """Everything the dashboard needs."""

    dsn: str = field(repr=False)  # may hold a password: never in logs or reprs
    auth: AuthSettings
    title: str = DEFAULT_TITLE
    timezone: str = DEFAULT_TIMEZONE
    refresh_s: int = DEFAULT_REFRESH_SECONDS
    stale_after_s: int = DEFAULT_STALE_AFTER_SECONDS
    late_after_s: int = DEFAULT_LATE_AFTER_SECONDS
    server: ServerSettings = ServerSettings()
    source: Path | None = None

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def _timezone(t: Table) -> str:
    name = t.text("timezone", DEFAULT_TIMEZONE)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise t.error("timezone", f"unknown time zone {name!r} (e.g. Europe/Berlin)") from exc
    return name


def _server(t: Table) -> ServerSettings:
    cert = t.optional_path("tls_cert", must_exist=True)
    key = t.optional_path("tls_key", must_exist=True)
    if (cert is None) != (key is None):
        raise t.error("tls_cert" if cert is None else "tls_key", "give tls_cert and tls_key")
    return ServerSettings(
        port=t.integer("port", DEFAULT_PORT, low=1, high=65535),
        address=t.text("address", DEFAULT_ADDRESS),
        tls_cert=cert,
        tls_key=key,
    )


def _lowercase_strings(t: Table, name: str, *, domain: bool) -> frozenset[str]:
    """An array of emails (or domains), lower-cased; a malformed entry is named by index."""
    raw = t.raw(name)
    if raw is None:
        return frozenset()
    if not isinstance(raw, list):
        raise t.error(name, f"expected an array of strings, got {describe(raw)}")
    out: set[str] = set()
    for i, item in enumerate(raw):
        text = item.strip().lower() if isinstance(item, str) else ""
        parts = text.split("@")
        ok = len(parts) == 1 if domain else len(parts) == 2 and all(parts)
        if not text or not ok or any(c.isspace() for c in text):
            what = "a domain such as example.com" if domain else "an email such as ada@example.com"
            raise t.error(f"{name}[{i}]", f"expected {what}, got {describe(item)}")
        out.add(text)
    return frozenset(out)


def _header(t: Table) -> str | None:
    if not t.has("client_address_header"):
        t.mark_used("client_address_header")
        return None
    name = t.text("client_address_header")
    if not all(c.isalnum() or c == "-" for c in name):
        raise t.error("client_address_header", f"not an HTTP header name: {name!r}")
    return name


def parse_config(
    data: Mapping[str, Any], *, base: Path, source: str = "<config>"
) -> DashboardConfig:
    """Build a DashboardConfig from parsed TOML; paths are relative to `base`."""
    root = Table(data, base=base, source=source)
    dash = root.table("dashboard")
    database = root.table("database")
    auth = root.table("auth")
    server = root.table("server")
    config = DashboardConfig(
        # SQLAlchemy takes only URLs, not libpq's key=value strings. Acknowledging an
        # alert writes, so a multi-host URL must lead to the primary (cloud/dsn.py).
        dsn=check_writer_dsn(
            read_dsn(database, env=DSN_ENV, url_only=True),
            key=dsn_key(database, env=DSN_ENV),
            connects_here=False,
        ),
        auth=AuthSettings(
            users_file=auth.path("users_file"),
            oidc_secrets=auth.optional_path("oidc_secrets", must_exist=True),
            oidc_default_role=auth.choice("oidc_default_role", ROLES, "viewer"),
            oidc_allowed_emails=_lowercase_strings(auth, "oidc_allowed_emails", domain=False),
            oidc_allowed_domains=_lowercase_strings(auth, "oidc_allowed_domains", domain=True),
            client_address_header=_header(auth),
        ),
        title=dash.text("title", DEFAULT_TITLE),
        timezone=_timezone(dash),
        refresh_s=dash.integer(
            "refresh_seconds",
            DEFAULT_REFRESH_SECONDS,
            low=MIN_REFRESH_SECONDS,
            high=MAX_REFRESH_SECONDS,
        ),
        stale_after_s=dash.integer(
            "stale_after_seconds", DEFAULT_STALE_AFTER_SECONDS, low=1, high=30 * 86400
        ),
        late_after_s=dash.integer(
            "late_after_seconds", DEFAULT_LATE_AFTER_SECONDS, low=1, high=30 * 86400
        ),
        server=_server(server),
    )
    for table in (root, dash, database, auth, server):
        table.check_unknown()
    return config


def load_config(path: Path | str) -> DashboardConfig:
    """Read and validate a dashboard TOML file."""
    path = Path(path)
    data = read_toml(path)
    config = parse_config(data, base=path.resolve().parent, source=str(path))
    return replace(config, source=path.resolve())
