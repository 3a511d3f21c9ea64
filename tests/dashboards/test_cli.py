"""`millrace dash`: add-user, and the streamlit command line it serves with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from millrace.cli import main
from millrace.dashboards.cli import streamlit_command
from millrace.dashboards.users import authenticate, load_users

MILLRACE = [sys.executable, "-m", "millrace.cli"]


def test_add_user_from_password_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-a-file-pw\n")
    users = tmp_path / "users.toml"
    argv = ["dash", "add-user", "otto", "--role", "operator", "--users-file", str(users)]
    assert main([*argv, "--password-file", str(secret)]) == 0
    assert "added otto (operator)" in capsys.readouterr().out
    record = authenticate(load_users(users), "otto", "from-a-file-pw")
    assert record is not None
    assert record.role == "operator"


def test_add_user_from_environment_and_via_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "dashboard.toml"
    config.write_text('[database]\ndsn = "postgresql://x/y"\n[auth]\nusers_file = "users.toml"\n')
    monkeypatch.setenv("MILLRACE_DASH_PASSWORD", "from-the-env-pw")
    assert main(["dash", "add-user", "ada", "--role", "admin", "--config", str(config)]) == 0
    assert authenticate(load_users(tmp_path / "users.toml"), "ada", "from-the-env-pw")
    assert main(["dash", "add-user", "ada", "--role", "viewer", "--config", str(config)]) == 0
    assert "updated ada (viewer)" in capsys.readouterr().out


def test_add_user_sso_identity_has_no_password(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    argv = ["dash", "add-user", "bo@example.com", "--role", "admin", "--users-file", str(users)]
    assert main([*argv, "--no-password"]) == 0
    assert load_users(users)["bo@example.com"].password_hash is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bad name", "--role", "viewer"], "user name"),
        (["carl", "--role", "viewer"], "no password given"),
    ],
)
def test_add_user_mistakes_print_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    users = tmp_path / "users.toml"
    done = subprocess.run(
        [*MILLRACE, "dash", "add-user", *args, "--users-file", str(users)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not users.exists()


def test_serve_without_config_is_a_one_line_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [*MILLRACE, "dash", "--config", str(tmp_path / "absent.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "absent.toml" in done.stderr and "file not found" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_streamlit_command_is_headless_and_hardened(tmp_path: Path) -> None:
    for name in ("tls.crt", "tls.key", "secrets.toml"):
        (tmp_path / name).write_text("")
    config = tmp_path / "dashboard.toml"
    config.write_text(
        '[database]\ndsn = "postgresql://x/y"\n'
        '[auth]\nusers_file = "u.toml"\noidc_secrets = "secrets.toml"\n'
        '[server]\ntls_cert = "tls.crt"\ntls_key = "tls.key"\n'
    )
    command = streamlit_command(config, port=8600, address="0.0.0.0")
    assert command[1:4] == ["-m", "streamlit", "run"]
    assert command[4].endswith("dashboards/app.py")
    for flag in (
        "--server.headless=true",
        "--server.port=8600",
        "--server.address=0.0.0.0",
        "--server.fileWatcherType=none",
        "--browser.gatherUsageStats=false",
        "--client.showErrorDetails=type",
        f"--server.sslCertFile={tmp_path / 'tls.crt'}",
        f"--server.sslKeyFile={tmp_path / 'tls.key'}",
        f"--secrets.files={tmp_path / 'secrets.toml'}",
    ):
        assert flag in command
