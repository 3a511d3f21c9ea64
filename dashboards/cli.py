"""`millrace dash`: serve the dashboard, and manage its local accounts.

    millrace dash --config FILE [--port N] [--address A]
    millrace dash add-user NAME --role viewer|operator|admin --users-file FILE
                  [--password-file F | --no-password]   (else MILLRACE_DASH_PASSWORD, else a prompt)

Serving replaces this process with `streamlit run` (so systemd's signals reach
it directly), headless and with the file watcher off; health is Streamlit's own
GET /_stcore/health.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Final

from millrace.errors import ConfigError, MillraceError

PASSWORD_ENV: Final = "MILLRACE_DASH_PASSWORD"
HEALTH_PATH: Final = "/_stcore/health"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `dash` and `dash add-user` to the millrace CLI."""
    from millrace.dashboards.config import ROLES

    dash = subparsers.add_parser(
        "dash",
        help="serve the Streamlit dashboard (dash add-user NAME --role R)",
        description="Serve the dashboard, or manage its local accounts.",
    )
    dash.add_argument("--config", type=Path, help="dashboard TOML file")
    dash.add_argument("--port", type=int, help="listen port (default from config, else 8501)")
    dash.add_argument("--address", help="listen address (default from config, else 127.0.0.1)")
    dash.set_defaults(func=_serve)
    commands = dash.add_subparsers(dest="dash_command", metavar="COMMAND")
    add = commands.add_parser("add-user", help="create or update a dashboard account")
    add.add_argument("name", help="user name (for single sign-on: the e-mail address)")
    add.add_argument("--role", required=True, choices=ROLES)
    where = add.add_mutually_exclusive_group(required=True)
    where.add_argument("--users-file", type=Path, help="the users file to change")
    where.add_argument("--config", dest="user_config", type=Path, help="take auth.users_file here")
    secret = add.add_mutually_exclusive_group()
    secret.add_argument("--password-file", type=Path, help="read the password from this file")
    secret.add_argument(
        "--no-password",
        action="store_true",
        help="a single sign-on identity: a role, no local password",
    )
    add.set_defaults(func=_add_user)


def _read_password(args: argparse.Namespace) -> str | None:
    if args.no_password:
        return None
    if args.password_file is not None:
        try:
            text = args.password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                "--password-file", f"cannot read {args.password_file}: {exc}"
            ) from exc
        return text.rstrip("\r\n")
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return from_env
    if not sys.stdin.isatty():
        raise MillraceError(
            f"no password given: use --password-file, {PASSWORD_ENV}, or run in a terminal"
        )
    first = getpass.getpass(f"Password for {args.name}: ")
    if getpass.getpass("Repeat it: ") != first:
        raise MillraceError("the passwords differ; nothing changed")
    return first


def _add_user(args: argparse.Namespace) -> int:
    from millrace.dashboards.users import add_user, check_user_name

    check_user_name(args.name)  # before asking for a password
    if args.users_file is not None:
        path = args.users_file
    else:
        from millrace.dashboards.config import load_config

        path = load_config(args.user_config).auth.users_file
    created = add_user(path, args.name, role=args.role, password=_read_password(args))
    print(f"{'added' if created else 'updated'} {args.name} ({args.role}) in {path}")
    return 0


def streamlit_command(config_path: Path, *, port: int, address: str) -> list[str]:
    """The `streamlit run` command line for a validated config."""
    from millrace.dashboards import app
    from millrace.dashboards.config import load_config

    config = load_config(config_path)
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        app.__file__,
        "--server.headless=true",
        f"--server.port={port}",
        f"--server.address={address}",
        "--server.fileWatcherType=none",
        "--server.runOnSave=false",
        "--browser.gatherUsageStats=false",
        "--global.developmentMode=false",
        "--client.toolbarMode=viewer",
        # Uncaught errors show their type, never a traceback with paths and code.
        "--client.showErrorDetails=type",
        "--theme.base=light",
        # Blue, not Streamlit's red: on a plant screen red means an alarm.
        "--theme.primaryColor=#1565c0",
    ]
    if config.server.tls_cert and config.server.tls_key:
        command += [
            f"--server.sslCertFile={config.server.tls_cert}",
            f"--server.sslKeyFile={config.server.tls_key}",
        ]
    if config.auth.oidc_secrets:
        command.append(f"--secrets.files={config.auth.oidc_secrets}")
    return command


def _serve(args: argparse.Namespace) -> int:
    if getattr(args, "dash_command", None):
        return 2
    if args.config is None:
        raise ConfigError(
            "--config", "is required to serve the dashboard (millrace dash --config FILE)"
        )
    from millrace.dashboards.config import CONFIG_ENV, load_config

    config_path = args.config.resolve()
    config = load_config(config_path)
    port = args.port if args.port is not None else config.server.port
    address = args.address or config.server.address
    if not 1 <= port <= 65535:
        raise ConfigError("--port", f"must be in [1, 65535], got {port}")
    command = streamlit_command(config_path, port=port, address=address)
    env = {**os.environ, CONFIG_ENV: str(config_path)}
    scheme = "https" if config.server.tls_cert else "http"
    print(f"dashboard on {scheme}://{address}:{port}/ (health {HEALTH_PATH})", flush=True)
    os.execve(sys.executable, command, env)
    return 0  # not reached
