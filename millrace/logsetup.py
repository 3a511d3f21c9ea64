"""Log format for the `millrace` command: plain on a terminal, syslog-prefixed for journald.

journald stamps every line with its own time and reads a leading `<N>` as the line's
syslog priority, so under systemd (stderr is the stream `$JOURNAL_STREAM` names) a
line is `<6>millrace.edge.agent: message`: no second timestamp, and `journalctl -p
warning` shows exactly the warnings. Elsewhere a line starts with the time and level.
"""

from __future__ import annotations

import logging
import os
from typing import Final, TextIO

LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
PLAIN_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT: Final = "<%(syslog_priority)d>%(name)s: %(message)s"
# syslog(3) priorities: 3 err, 4 warning, 6 info, 7 debug (2 crit for CRITICAL).
_SYSLOG_PRIORITY: Final = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
_OURS: Final = "_millrace_handler"


def parse_level(text: str) -> int:
    """The logging level named by `text` (any case); ValueError for anything else."""
    name = text.strip().upper()
    if name not in LEVELS:
        raise ValueError(f"{text!r} is not one of {', '.join(LEVELS)}")
    level: int = getattr(logging, name)
    return level


def stream_is_journal(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """True when `stream` is the journald stream systemd connected ($JOURNAL_STREAM=dev:inode)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, inode = value.partition(":")
    if not (dev.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(inode))


class JournalFormatter(logging.Formatter):
    """`<priority>logger: message`; continuation lines (tracebacks) keep the priority."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 4 if record.levelno > 20 else 6)
        record.syslog_priority = priority
        text = super().format(record)
        # journald splits on newlines; each line would otherwise default to info.
        return text.replace("\n", f"\n<{priority}>")


def configure(level: int, *, stream: TextIO, environ: dict[str, str] | None = None) -> None:
    """Send the root logger to `stream` at `level`, in the journal's format when it is one.

    Like `logging.basicConfig`, it leaves a root logger that has someone else's handlers
    (pytest's capture, an embedding program) alone.
    """
    root = logging.getLogger()
    if any(not getattr(h, _OURS, False) for h in root.handlers):
        return
    handler = logging.StreamHandler(stream)
    setattr(handler, _OURS, True)
    if stream_is_journal(stream, environ):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
