"""The dashboard config loader: typed result, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from millrace.dashboards.config import load_config
from millrace.errors import ConfigError

MINIMAL = """
[database]
dsn = "postgresql://millrace_dashboard@db.example/millrace"
[auth]
users_file = "users.toml"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dashboard.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MILLRACE_DASH_DSN", raising=False)
    config = load_config(_write(tmp_path, MINIMAL))
    assert config.timezone == "UTC"
    assert config.refresh_s == 15
    assert config.title == "Millrace plant"
    assert config.auth.users_file == tmp_path / "users.toml"
    assert config.auth.oidc_secrets is None
    assert (config.server.port, config.server.address) == (8501, "127.0.0.1")
    assert "millrace_dashboard" not in repr(config)  # the DSN may hold a password


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "db.dsn").write_text("postgresql://u:pw@h/db\n")
    for name in ("secrets.toml", "tls.crt", "tls.key"):
        (tmp_path / name).write_text("")
    config = load_config(
        _write(
            tmp_path,
            """
[dashboard]
title = "Mill 3"
timezone = "Europe/Berlin"
refresh_seconds = 30
stale_after_seconds = 120
late_after_seconds = 90
[database]
dsn_file = "db.dsn"
[auth]
users_file = "/etc/millrace/users.toml"
oidc_secrets = "secrets.toml"
oidc_default_role = "operator"
[server]
port = 9000
address = "0.0.0.0"
tls_cert = "tls.crt"
tls_key = "tls.key"
""",
        )
    )
    assert config.dsn == "postgresql://u:pw@h/db"
    assert (config.title, config.timezone, config.refresh_s) == ("Mill 3", "Europe/Berlin", 30)
    assert (config.stale_after_s, config.late_after_s) == (120, 90)
    assert config.auth.users_file == Path("/etc/millrace/users.toml")
    assert config.auth.oidc_secrets == tmp_path / "secrets.toml"
    assert config.auth.oidc_default_role == "operator"
    assert config.server.tls_cert == tmp_path / "tls.crt"
    assert config.tz.key == "Europe/Berlin"


def test_dsn_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILLRACE_DASH_DSN", "postgresql://from-env/db")
    config = load_config(_write(tmp_path, '[auth]\nusers_file = "u.toml"\n'))
    assert config.dsn == "postgresql://from-env/db"


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (
            '[dashboard]\ntimezone = "Mars/Olympus"\n' + MINIMAL,
            "dashboard.timezone",
            "unknown time zone",
        ),
        ("[dashboard]\nrefresh_seconds = 1\n" + MINIMAL, "dashboard.refresh_seconds", "outside"),
        (
            '[dashboard]\nrefresh_seconds = "15"\n' + MINIMAL,
            "dashboard.refresh_seconds",
            "expected an integer",
        ),
        ('[dashboard]\ntitel = "typo"\n' + MINIMAL, "dashboard.titel", "did you mean 'title'"),
        ("colour = 1\n" + MINIMAL, "colour", "unknown key"),
        ('[auth]\nusers_file = "u.toml"\n', "database.dsn", "MILLRACE_DASH_DSN"),
        (
            '[database]\ndsn = "mysql://x"\n[auth]\nusers_file = "u"\n',
            "database.dsn",
            "postgresql://",
        ),
        ('[database]\ndsn = "postgresql://x"\ndsn_file = "f"\n', "database.dsn", "not both"),
        (
            '[database]\ndsn_file = "absent.dsn"\n[auth]\nusers_file = "u"\n',
            "database.dsn_file",
            "file not found",
        ),
        ('[database]\ndsn = "postgresql://x"\n', "auth.users_file", "missing"),
        (MINIMAL + 'oidc_default_role = "root"\n', "auth.oidc_default_role", "not one of"),
        (MINIMAL + 'oidc_secrets = "absent.toml"\n', "auth.oidc_secrets", "file not found"),
        (MINIMAL + "[server]\nport = 70000\n", "server.port", "outside"),
        (MINIMAL + '[server]\ntls_cert = "dashboard.toml"\n', "server.tls_key", "give tls_cert"),
        ("database = 3\n", "database", "expected a table"),
    ],
)
def test_errors_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, key: str, words: str
) -> None:
    monkeypatch.delenv("MILLRACE_DASH_DSN", raising=False)
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert words in info.value.problem
    assert str(path) in str(info.value)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"file not found: .*absent\.toml"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[dashboard"))


def test_single_sign_on_allow_list_and_client_address_header(tmp_path: Path) -> None:
    config = load_config(
        _write(
            tmp_path,
            MINIMAL
            + 'oidc_allowed_emails = ["Ada@Example.com"]\n'
            + 'oidc_allowed_domains = ["plant.example"]\n'
            + 'client_address_header = "X-Real-IP"\n',
        )
    )
    assert config.auth.oidc_allowed_emails == frozenset({"ada@example.com"})
    assert config.auth.oidc_allowed_domains == frozenset({"plant.example"})
    assert config.auth.client_address_header == "X-Real-IP"
    defaults = load_config(_write(tmp_path, MINIMAL))
    assert defaults.auth.oidc_allowed_emails == defaults.auth.oidc_allowed_domains == frozenset()
    assert defaults.auth.client_address_header is None


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('oidc_allowed_emails = "ada@example.com"', "auth.oidc_allowed_emails"),
        ('oidc_allowed_emails = ["ada"]', "auth.oidc_allowed_emails[0]"),
        ('oidc_allowed_emails = ["a@b.c", "x@"]', "auth.oidc_allowed_emails[1]"),
        ('oidc_allowed_domains = ["@example.com"]', "auth.oidc_allowed_domains[0]"),
        ('oidc_allowed_domains = [""]', "auth.oidc_allowed_domains[0]"),
        ('client_address_header = "X Real IP"', "auth.client_address_header"),
    ],
)
def test_bad_single_sign_on_keys_are_named(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, MINIMAL + line + "\n"))
    assert err.value.key == key
