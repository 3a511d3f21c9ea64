"""A number from a command's stdout (argv, no shell), killed after a timeout."""

from __future__ import annotations

import re
import subprocess

from millrace.edge.config import CommandSpec, SignalConfig
from millrace.edge.drivers.base import ReadFailure, ReadResult, text_or_number

FIRST_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
MAX_OUTPUT_CHARS = 64 * 1024


class CommandGroup:
    """One command signal, on its own thread (a command may take up to its timeout)."""

    def __init__(self, index: int, signal: SignalConfig, *, interval_s: float) -> None:
        assert isinstance(signal.spec, CommandSpec)
        self.indexes = (index,)
        self.interval_s = interval_s
        self._signal = signal
        self._spec = signal.spec
        self._pattern = re.compile(self._spec.pattern) if self._spec.pattern else None

    def read(self, ts_ms: int) -> list[ReadResult]:
        return [self._run()]

    def _run(self) -> ReadResult:
        spec = self._spec
        try:
            done = subprocess.run(
                spec.command,
                capture_output=True,
                timeout=spec.timeout_s,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return ReadFailure(f"timed out after {spec.timeout_s:g} s")
        except OSError as exc:
            return ReadFailure(f"cannot run {spec.command[0]}: {exc.strerror or exc}")
        if done.returncode != 0:
            return ReadFailure(f"exit status {done.returncode}")
        out = done.stdout[:MAX_OUTPUT_CHARS].decode("utf-8", errors="replace")
        if self._pattern is not None:
            match = self._pattern.search(out)
            if match is None:
                return ReadFailure("pattern did not match the output")
            return text_or_number(self._signal, match.group((match.re.groups and 1) or 0))
        if self._signal.kind != "numeric":
            return text_or_number(self._signal, out.strip().splitlines()[0] if out.strip() else "")
        match = FIRST_NUMBER.search(out)
        if match is None:
            return ReadFailure("no number in the output")
        return float(match.group(0))

    def close(self) -> None:
        pass
