"""Multi-host DSNs: writers are kept on the primary, and a DSN that would not be is refused
at load naming its key (cloud/dsn.py). The failover itself: test_db_failover.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from millrace.cloud.config import IngestConfig
from millrace.cloud.config import parse_config as parse_ingest
from millrace.cloud.dsn import writer_params
from millrace.dashboards.config import parse_config as parse_dashboard
from millrace.errors import ConfigError

PAIR = "host=db1.example,db2.example port=5432,5433 dbname=millrace user=ingest"


def _ingest(
    tmp_path: Path, database: dict[str, str], retention: dict[str, str] | None = None
) -> IngestConfig:
    for name in ("ca.crt", "svc.crt", "svc.key"):
        (tmp_path / name).write_text("x")
    broker = {
        "host": "broker.example",
        "ca": "ca.crt",
        "cert": "svc.crt",
        "key": "svc.key",
        "client_id": "w1",
        "share_group": "g1",
    }
    data = {"database": database, "broker": broker, "retention": retention or {}}
    return parse_ingest(data, base=tmp_path)


def test_writers_get_read_write_unless_the_dsn_says_how() -> None:
    assert writer_params(PAIR) == {"target_session_attrs": "read-write"}
    assert writer_params(f"{PAIR} target_session_attrs=primary") == {}
    url = "postgresql://u@db1.example:5432,db2.example:5432/db?target_session_attrs=read-write"
    assert writer_params(url) == {}


def test_a_multi_host_ingest_dsn_loads(tmp_path: Path) -> None:
    assert _ingest(tmp_path, {"dsn": PAIR}).dsn == PAIR


@pytest.mark.parametrize(
    ("dsn", "words"),
    [
        (f"{PAIR} target_session_attrs=prefer-standby", "may connect to a standby"),
        (f"{PAIR} target_session_attrs=read-mostly", "is not one of"),
        ("host=db1.example,db2.example port=1,2,3", "2 host(s) but 3 ports"),
        ("host=db1.example password=hunter2 nonsense", "cannot parse"),
    ],
)
def test_a_writer_dsn_that_could_miss_the_primary_is_refused_naming_the_key(
    tmp_path: Path, dsn: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _ingest(tmp_path, {"dsn": dsn})
    assert caught.value.key == "database.dsn"
    assert words in caught.value.problem
    assert "hunter2" not in str(caught.value)


def test_the_dsn_file_and_retention_dsn_are_named_when_they_are_wrong(tmp_path: Path) -> None:
    (tmp_path / "ingest.dsn").write_text(f"{PAIR} target_session_attrs=standby\n")
    with pytest.raises(ConfigError) as caught:
        _ingest(tmp_path, {"dsn_file": "ingest.dsn"})
    assert caught.value.key == "database.dsn_file"
    with pytest.raises(ConfigError) as caught:
        _ingest(tmp_path, {"dsn": PAIR}, {"dsn": f"{PAIR} target_session_attrs=read-only"})
    assert caught.value.key == "retention.dsn"


def test_the_dashboard_must_say_read_write_when_its_url_names_two_hosts(tmp_path: Path) -> None:
    url = "postgresql://dash@db1.example:5432,db2.example:5432/millrace"
    auth = {"users_file": "users.toml"}
    with pytest.raises(ConfigError) as caught:
        parse_dashboard({"database": {"dsn": url}, "auth": auth}, base=tmp_path)
    assert caught.value.key == "database.dsn"
    assert "target_session_attrs=read-write" in caught.value.problem
    fixed = f"{url}?target_session_attrs=read-write"
    assert parse_dashboard({"database": {"dsn": fixed}, "auth": auth}, base=tmp_path).dsn == fixed
