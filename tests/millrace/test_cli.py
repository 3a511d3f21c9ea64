"""The `millrace` entry point: exit codes, --log-level anywhere, journald-friendly logging."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from millrace import logsetup
from millrace.cli import main
from millrace.errors import (
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    MillraceError,
    UnreachableError,
)

REPO = Path(__file__).resolve().parents[2]
MILLRACE = [sys.executable, "-m", "millrace.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MILLRACE, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


# ---------------------------------------------------------------------------- exit codes


def test_exit_codes_are_distinct_and_keep_the_install_contract() -> None:
    codes = [EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERNAL]
    assert len(set(codes)) == len(codes)
    # install.sh and the Ansible role read 1 as "a signal could not be read", 2 as "invalid".
    assert (EXIT_FAILED, EXIT_USAGE) == (1, 2)
    assert MillraceError("x").exit_code == EXIT_USAGE
    assert UnreachableError("x").exit_code == EXIT_UNREACHABLE


def test_exit_codes_table_in_help_and_docs() -> None:
    done = run("--help")
    assert done.returncode == 0
    for code in ("0", "1", "2", "3", "70"):
        assert any(line.split()[:1] == [code] for line in done.stdout.splitlines()), code
    doc = (REPO / "docs" / "cli.md").read_text()
    assert "| 3 |" in doc and "| 2 |" in doc and "| 1 |" in doc
    assert "docs/cli.md" in (REPO / "README.md").read_text()


def test_exit_code_unreachable_database_is_3() -> None:
    done = run("db", "upgrade", "--dsn", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert done.returncode == EXIT_UNREACHABLE, done.stderr
    assert done.stderr.startswith("millrace: error: cannot reach the database")


def test_exit_code_internal_error_is_not_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug must not exit 1, which install.sh reads as "a signal could not be read"."""
    import millrace.edge.cli as edge_cli

    def boom(args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(edge_cli, "_check", boom)
    assert main(["edge", "check", "--config", "x.toml"]) == EXIT_INTERNAL


# ---------------------------------------------------------------------------- --log-level


def test_log_level_after_the_subcommand(tmp_path: Path) -> None:
    done = run("edge", "check", "--config", str(tmp_path / "none.toml"), "--log-level", "debug")
    assert done.returncode == EXIT_USAGE
    assert "unrecognized arguments" not in done.stderr
    assert "--config: file not found" in done.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_bad_value_rejected(where: str, tmp_path: Path) -> None:
    config = ["edge", "check", "--config", str(tmp_path / "none.toml")]
    args = ["--log-level", "LOUD", *config] if where == "before" else [*config, "--log-level=LOUD"]
    done = run(*args)
    assert done.returncode == EXIT_USAGE
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "'LOUD' is not one of DEBUG, INFO, WARNING, ERROR" in errors[0]


def test_log_level_bad_environment_value_rejected(tmp_path: Path) -> None:
    done = run(
        "edge", "check", "--config", str(tmp_path / "x.toml"), env={"MILLRACE_LOG_LEVEL": "chatty"}
    )
    assert done.returncode == EXIT_USAGE
    assert done.stderr.strip() == (
        "millrace: error: MILLRACE_LOG_LEVEL: 'chatty' is not one of DEBUG, INFO, WARNING, ERROR"
    )


# ---------------------------------------------------------------------------- journald


def _record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("millrace.edge.agent", level, __file__, 1, msg, None, None)


def test_journald_format_has_priority_prefix_and_no_timestamp() -> None:
    fmt = logsetup.JournalFormatter()
    assert fmt.format(_record(logging.WARNING, "lost")) == "<4>millrace.edge.agent: lost"
    assert fmt.format(_record(logging.INFO, "up")) == "<6>millrace.edge.agent: up"
    assert fmt.format(_record(logging.ERROR, "a\nb")) == "<3>millrace.edge.agent: a\n<3>b"
    assert fmt.format(_record(logging.DEBUG, "d")).startswith("<7>")


def test_journald_detected_only_on_the_stream_journal_stream_names(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as stream:
        st = os.fstat(stream.fileno())
        assert logsetup.stream_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logsetup.stream_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:1"})
        assert not logsetup.stream_is_journal(stream, {})
    assert not logsetup.stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_journald_logging_end_to_end(tmp_path: Path) -> None:
    """A process whose stderr is the journal stream logs `<N>name: msg`, no timestamp."""
    log = tmp_path / "stderr"
    code = (
        "import logging, os, sys\n"
        "st = os.fstat(2)\n"
        "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "from millrace import logsetup\n"
        "logsetup.configure(logging.INFO, stream=sys.stderr)\n"
        "logging.getLogger('millrace.x').warning('careful %s', 1)\n"
        "logging.getLogger('millrace.x').debug('hidden')\n"
    )
    with open(log, "w") as err:
        subprocess.run([sys.executable, "-c", code], stderr=err, check=True, timeout=60)
    assert log.read_text() == "<4>millrace.x: careful 1\n"
    plain = subprocess.run(
        [sys.executable, "-c", code.replace("os.environ['JOURNAL_STREAM']", "_")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert plain.stderr.split()[2:] == ["WARNING", "millrace.x:", "careful", "1"]
