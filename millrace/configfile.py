"""Typed reads from TOML config tables that name the key in every error.

Shared by the ingest worker's and the dashboard's config loaders: each builds
its frozen config object from `Section` reads, then calls `check_unknown` so
a misspelt key is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from millrace.errors import ConfigError

_T = TypeVar("_T")


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML config file; an unreadable or malformed file is a ConfigError."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc}") from exc
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"not valid TOML: {exc}", source=str(path)) from exc


class Section:
    """One TOML table; remembers which keys were read so the rest can be refused."""

    def __init__(self, data: Mapping[str, Any], prefix: str, source: str) -> None:
        self.data = data
        self.prefix = prefix
        self.source = source
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        """The dotted key as the user wrote it, e.g. `batch.max_rows`."""
        return f"{self.prefix}{name}"

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.key(name), problem, source=self.source)

    def _get(self, name: str, kind: type[_T], default: _T | None) -> _T:
        self.used.add(name)
        if name not in self.data:
            if default is None:
                raise self.error(name, "is required")
            return default
        value = self.data[name]
        if kind is int and type(value) is not int:
            raise self.error(name, f"expected an integer, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise self.error(name, f"expected a string, got {value!r}")
        return value  # type: ignore[no-any-return]

    def text(self, name: str, default: str | None = None) -> str:
        value = self._get(name, str, default)
        if not value.strip():
            raise self.error(name, "must not be empty")
        return value

    def integer(self, name: str, default: int | None, *, low: int, high: int) -> int:
        value = self._get(name, int, default)
        if not low <= value <= high:
            raise self.error(name, f"must be in [{low}, {high}], got {value}")
        return value

    def path(self, name: str, base: Path, *, must_exist: bool = True) -> Path:
        """A path relative to the config file's directory (`base`); `~` expands."""
        path = Path(self.text(name)).expanduser()
        path = path if path.is_absolute() else base / path
        if must_exist and not path.is_file():
            raise self.error(name, f"file not found: {path}")
        return path

    def optional_path(self, name: str, base: Path) -> Path | None:
        return self.path(name, base) if name in self.data else None

    def table(self, name: str) -> Section:
        """A sub-table (missing = empty), with its errors prefixed `name.`."""
        self.used.add(name)
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, "expected a table")
        return Section(value, f"{self.prefix}{name}.", self.source)

    def check_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key (misspelt?)")
