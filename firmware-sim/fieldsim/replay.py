"""Replay: serve recorded (timestamp, signal, value) rows instead of the model.

The CSV has a header with the columns ``timestamp,signal,value`` and
optionally ``device`` (rows without a device apply to every device that has
that signal). Timestamps are Unix seconds or ISO 8601 (naive means UTC). The
first row's time is mapped to the fleet's start; `speed` > 1 plays faster
than real time. At the end the recording loops (or holds its last values).
A value is valid from the wall-clock instant its row became current.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import math
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from millrace.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ReplayTrack:
    """Sorted rows of one (device, signal)."""

    times: tuple[float, ...]
    values: tuple[float, ...]


def _parse_time(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(
            where, f"timestamp {text!r} is neither Unix seconds nor ISO 8601"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


class Replay:
    """Recorded tracks mapped onto wall-clock time from the fleet's start."""

    def __init__(
        self,
        tracks: dict[tuple[str | None, str], ReplayTrack],
        *,
        speed: float = 1.0,
        loop: bool = True,
    ) -> None:
        if not tracks:
            raise ConfigError("--replay", "the recording has no rows")
        if speed <= 0:
            raise ConfigError("--replay-speed", "must be > 0")
        self._tracks = tracks
        self.speed = speed
        self.loop = loop
        all_times = sorted({t for track in tracks.values() for t in track.times})
        self.first = all_times[0]
        gaps = [b - a for a, b in itertools.pairwise(all_times)]
        # The loop lasts one typical row interval past the last row, so the
        # last row is served as long as the others.
        self.period = all_times[-1] - self.first + (statistics.median(gaps) if gaps else 1.0)
        self.started_at = 0.0

    @classmethod
    def from_csv(cls, path: Path, *, speed: float = 1.0, loop: bool = True) -> Replay:
        """Load a recording; errors name the file and line."""
        rows: dict[tuple[str | None, str], list[tuple[float, float]]] = {}
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                missing = {"timestamp", "signal", "value"} - set(reader.fieldnames or ())
                if missing:
                    raise ConfigError(
                        "header", f"missing column(s) {sorted(missing)}", source=str(path)
                    )
                for line, row in enumerate(reader, start=2):
                    where = f"{path}:{line}"
                    try:
                        value = float(row["value"])
                    except (TypeError, ValueError) as exc:
                        raise ConfigError(where, f"value {row['value']!r} is not a number") from exc
                    key = ((row.get("device") or None), str(row["signal"]))
                    rows.setdefault(key, []).append(
                        (_parse_time(str(row["timestamp"]), where), value)
                    )
        except OSError as exc:
            raise ConfigError("--replay", f"cannot read {path}: {exc.strerror}") from exc
        tracks = {}
        for key, pairs in rows.items():
            pairs.sort()
            tracks[key] = ReplayTrack(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
        return cls(tracks, speed=speed, loop=loop)

    def bind(self, started_at: float) -> None:
        """Map the recording's first row onto this wall-clock instant."""
        self.started_at = started_at

    def has(self, device: str, signal: str) -> bool:
        """True if the recording covers this device's signal."""
        return (device, signal) in self._tracks or (None, signal) in self._tracks

    def lookup(self, device: str, signal: str, t: float) -> tuple[float, float] | None:
        """(value, valid_from) served at wall time t, or None if the recording lacks the signal."""
        track = self._tracks.get((device, signal)) or self._tracks.get((None, signal))
        if track is None:
            return None
        elapsed = max(0.0, (t - self.started_at) * self.speed)
        if self.loop:
            loops, offset = divmod(elapsed, self.period)
        else:
            loops, offset = 0.0, elapsed
        index = bisect.bisect_right(track.times, self.first + offset) - 1
        if index < 0:
            if loops == 0:
                return track.values[0], self.started_at
            loops -= 1
            index = len(track.times) - 1
        row_elapsed = loops * self.period + track.times[index] - self.first
        valid_from = self.started_at + row_elapsed / self.speed
        return track.values[index], valid_from if math.isfinite(valid_from) else t
