"""One error root for everything millrace raises on purpose.

A `MillraceError` is a user-facing problem: the CLI prints its message on one
line and exits with the error's `exit_code`, without a traceback. Anything
else is a bug (exit 70, with the traceback).

Exit codes of `millrace` (docs/cli.md; install.sh and Ansible rely on 0, 1, 2):

    0   success
    1   the command ran and found a failure: `edge check` could not read a
        signal or the plant broker refused the device's credentials, `cmd` got
        an error reply from the device
    2   usage or configuration error: fix the command line or the config file
    3   a service it needs did not answer (database, broker, the device for
        `cmd`): retrying later may succeed
    70  internal error (a bug): the traceback is printed
    130 interrupted (Ctrl-C)
"""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_INTERNAL: Final = 70
EXIT_INTERRUPTED: Final = 130


class MillraceError(Exception):
    """Root of all errors a user can cause and fix."""

    exit_code: int = EXIT_USAGE


class UnreachableError(MillraceError):
    """A service the command needs (database, broker, device) did not answer."""

    exit_code = EXIT_UNREACHABLE


class ConfigError(MillraceError):
    """A configuration file or option is wrong; `key` names where."""

    def __init__(self, key: str, problem: str, *, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}")


class WireError(MillraceError):
    """A payload or topic does not follow the wire contract; `reason` says how."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class PKIError(MillraceError):
    """A certificate operation cannot be done as asked."""


class IngestError(MillraceError):
    """The cloud ingest path cannot proceed (configuration, database, broker)."""
