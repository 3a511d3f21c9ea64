"""Dashboard fixtures: a TimescaleDB filled through the real ingest path, configs, users."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from millrace.cloud.dbupgrade import upgrade
from millrace.dashboards import auth
from millrace.dashboards.users import add_user
from tests.dashboards.plant import Truth, dashboard_dsn, fill_plant
from tests.fixtures.fix_postgres import PostgresServer, database_name_for

PASSWORDS = {
    "vera": ("viewer", "vera-viewer-pw"),
    "otto": ("operator", "otto-operator-pw"),
    "ada": ("admin", "ada-admin-pw"),
}


@dataclass(frozen=True)
class Plant:
    """A filled database: the superuser DSN, the dashboard role's DSN, the ground truth."""

    dsn: str
    dash_dsn: str
    truth: Truth


def _new_plant(server: PostgresServer, name: str, *, hours: float) -> Plant:
    dsn = server.create_database(database_name_for(name))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    upgrade(dsn)
    truth = fill_plant(dsn, hours=hours)
    return Plant(dsn=dsn, dash_dsn=dashboard_dsn(dsn), truth=truth)


@pytest.fixture(scope="session")
def plant(pg_server: PostgresServer) -> Plant:
    """Three hours of three devices, shared read-only by the query tests."""
    return _new_plant(pg_server, "dash_plant", hours=3.0)


@pytest.fixture
def plant_factory(pg_server: PostgresServer) -> Callable[..., Plant]:
    """A private filled database for tests that change it (acknowledgements)."""

    def make(hours: float = 1.0) -> Plant:
        return _new_plant(pg_server, "dash_private", hours=hours)

    return make


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dash-users") / "users.toml"
    for name, (role, password) in PASSWORDS.items():
        add_user(path, name, role=role, password=password)
    return path


@pytest.fixture(autouse=True)
def fresh_login_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no failed logins (the throttle is shared by the process)."""
    monkeypatch.setattr(auth, "_THROTTLE", type(auth._THROTTLE)())


def write_config(
    directory: Path, *, dsn: str, users: Path, refresh_s: int = 5, auth_extra: str = ""
) -> Path:
    """A dashboard config pointing at `dsn` through a 0600 DSN file; `auth_extra`: [auth] lines."""
    dsn_file = directory / "dashboard.dsn"
    dsn_file.write_text(dsn + "\n", encoding="utf-8")
    dsn_file.chmod(0o600)
    config = directory / "dashboard.toml"
    config.write_text(
        f"""
[dashboard]
title = "Millrace test plant"
timezone = "Europe/Berlin"
refresh_seconds = {refresh_s}

[database]
dsn_file = "dashboard.dsn"

[auth]
users_file = "{users}"
{auth_extra}
""",
        encoding="utf-8",
    )
    return config


@pytest.fixture
def dash_config(
    tmp_path: Path, plant: Plant, users_file: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """The shared plant's dashboard config, announced the way `millrace dash` does."""
    path = write_config(tmp_path, dsn=plant.dash_dsn, users=users_file)
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(path))
    yield path
