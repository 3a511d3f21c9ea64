"""One error root for everything millrace raises on purpose.

A `MillraceError` is a user-facing problem: the CLI prints its message on one
line and exits non-zero, without a traceback. Anything else is a bug.
"""

from __future__ import annotations


class MillraceError(Exception):
    """Root of all errors a user can cause and fix."""


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
