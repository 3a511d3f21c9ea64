"""Typed reads from TOML config files, with errors that name the exact key.

The edge agent's, the ingest worker's and the dashboard's loaders all read
through `Table`, so every config mistake reads the same way:
`agent.toml: signals[3].scale: expected a number, got the string 'x'`, and a
misspelt key is refused with a "did you mean" instead of being silently
ignored. The contract also owns the two things those loaders share beyond
the reader: the database DSN (`dsn` or `dsn_file`) and the broker connection.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self, get_args

from millrace.errors import ConfigError

DEFAULT_BROKER_PORT: Final = 8883
DEFAULT_BROKER_KEEPALIVE_SECONDS: Final = 30
# libpq URL prefixes; SQLAlchemy needs a URL, psycopg also takes "key=value" strings.
POSTGRES_URL_PREFIXES: Final = ("postgresql://", "postgres://", "postgresql+psycopg://")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


# Typed Any so that `default: str = REQUIRED` type-checks; compared by identity only.
REQUIRED: Any = _Required()


# ---------------------------------------------------------------------------- files


def read_text(path: Path, *, key: str = "config") -> str:
    """A config file's text; `key` names where the path came from (e.g. `--config`)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(key, f"file not found: {path}") from exc
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(key, f"not UTF-8 text: {exc}", source=str(path)) from exc


def parse_toml(text: str, *, source: str | None = None) -> dict[str, Any]:
    """Parse TOML text; a syntax error is a ConfigError with TOML's line and column."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"not valid TOML: {exc}", source=source) from exc


def read_toml(path: Path, *, key: str = "config") -> dict[str, Any]:
    """Read and parse a TOML config file (`read_text`, then `parse_toml`)."""
    return parse_toml(read_text(path, key=key), source=str(path))


# ---------------------------------------------------------------------------- messages


def describe(value: object) -> str:
    """A TOML value as a user would recognise it in their file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value!r}"


def suggest(name: str, known: Collection[str]) -> str:
    """` (did you mean 'x'?)` when `name` looks like a typo of a known name, else ''."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(name: str, known: Collection[str]) -> str:
    hint = suggest(name, known)
    if not hint and known:
        hint = f" (known keys: {', '.join(sorted(known))})"
    return "unknown key" + hint


def _range(value: float, low: float, high: float, low_open: bool) -> str:
    """Why a finite `value` is out of range, without printing an infinite bound."""
    if math.isinf(high):
        return f"{value:g} must be {'>' if low_open else '>='} {low:g}"
    if math.isinf(low):
        return f"{value:g} must be <= {high:g}"
    return f"{value:g} is outside {'(' if low_open else '['}{low:g}, {high:g}]"


# ---------------------------------------------------------------------------- tables


class Table:
    """One TOML table being read: knows its key path and which of its keys were read.

    `location` is how the user finds the table in their file (`broker`,
    `signals[3]`, `modbus.plc1`; "" for the top level); every error names
    `location.key`. A getter's key is mandatory unless it is given a default.
    After reading, `check_unknown` refuses every key nobody asked for, so a
    typo is an error, not a silently used default. Relative paths resolve
    against `base`, the config file's directory, so a generated config keeps
    working when its folder is moved.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        location: str = "",
        *,
        base: Path,
        source: str | None = None,
    ) -> None:
        self.data = data
        self.location = location
        self.base = base
        self.source = source
        self.used: set[str] = set()

    # -- naming

    def key(self, name: str) -> str:
        """The full key path of `name` in this table, e.g. `signals[3].scale`."""
        return f"{self.location}.{name}" if self.location else name

    def error(self, name: str, problem: str) -> ConfigError:
        """A ConfigError for key `name` of this table (raise it)."""
        return ConfigError(self.key(name), problem, source=self.source)

    def has(self, name: str) -> bool:
        return name in self.data

    def mark_used(self, *names: str) -> None:
        """Accept these keys in `check_unknown` without reading them here."""
        self.used.update(names)

    # -- scalars

    def _get(self, name: str, kind: type | tuple[type, ...], what: str, default: Any) -> Any:
        self.used.add(name)
        if name not in self.data:
            if default is REQUIRED:
                raise self.error(name, f"missing (expected {what})")
            return default
        value = self.data[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.error(name, f"expected {what}, got {describe(value)}")
        return value

    def raw(self, name: str) -> Any:
        """The value as TOML gave it (None if absent), for shapes the getters don't cover."""
        self.used.add(name)
        return self.data.get(name)

    def text(self, name: str, default: str = REQUIRED) -> str:
        """A non-blank string. If the default is "", an explicit "" means that default."""
        value: str = self._get(name, str, "a string", default)
        if name in self.data and not value.strip() and not (value == default == ""):
            raise self.error(name, "must not be empty")
        return value

    def integer(self, name: str, default: int = REQUIRED, *, low: int, high: int) -> int:
        value: int = self._get(name, int, "an integer", default)
        if name in self.data and not low <= value <= high:
            raise self.error(name, f"{value} is outside [{low}, {high}]")
        return value

    def number(
        self,
        name: str,
        default: float = REQUIRED,
        *,
        low: float = -math.inf,
        high: float = math.inf,
        low_open: bool = False,
    ) -> float:
        """A finite int or float, as float; `low_open` excludes `low` itself."""
        value = self._get(name, (int, float), "a number", default)
        if name not in self.data:
            return float(value)
        value = float(value)
        if not math.isfinite(value):
            raise self.error(name, f"expected a finite number, got {value}")
        if value < low or value > high or (low_open and value == low):
            raise self.error(name, _range(value, low, high, low_open))
        return value

    def boolean(self, name: str, default: bool = REQUIRED) -> bool:
        value: bool = self._get(name, bool, "true or false", default)
        return value

    def choice(self, name: str, allowed: Any, default: str = REQUIRED) -> Any:
        """One of `allowed`: a `Literal[...]` alias or a sequence of strings."""
        options: tuple[str, ...] = get_args(allowed) or tuple(allowed)
        value: str = self._get(name, str, "one of " + ", ".join(options), default)
        if value not in options:
            raise self.error(name, f"{value!r} is not one of {', '.join(options)}")
        return value

    def path(self, name: str, *, must_exist: bool = False) -> Path:
        """A required file path; relative to `base`, `~` expands."""
        path = Path(self.text(name)).expanduser()
        path = path if path.is_absolute() else self.base / path
        if must_exist and not path.is_file():
            raise self.error(name, f"file not found: {path}")
        return path

    def optional_path(self, name: str, *, must_exist: bool = False) -> Path | None:
        self.used.add(name)
        return self.path(name, must_exist=must_exist) if name in self.data else None

    # -- arrays and tables

    def integers(
        self,
        name: str,
        default: tuple[int, ...] = REQUIRED,
        *,
        low: int,
        high: int,
        non_empty: bool = False,
    ) -> tuple[int, ...]:
        """An array of integers; a bad element is named by index (`name[2]`)."""
        raw = self._get(name, list, "an array of integers", default)
        if name not in self.data:
            return tuple(raw)
        if non_empty and not raw:
            raise self.error(name, "must not be empty")
        for i, value in enumerate(raw):
            if type(value) is not int:
                raise self.error(f"{name}[{i}]", f"expected an integer, got {describe(value)}")
            if not low <= value <= high:
                raise self.error(f"{name}[{i}]", f"{value} is outside [{low}, {high}]")
        return tuple(raw)

    def table(self, name: str, *, required: bool = False) -> Table:
        """A sub-table (absent = empty unless `required`), its keys prefixed `name.`."""
        self.used.add(name)
        if name not in self.data:
            if required:
                raise self.error(name, "missing table")
            return Table({}, self.key(name), base=self.base, source=self.source)
        value = self.data[name]
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {describe(value)}")
        return Table(value, self.key(name), base=self.base, source=self.source)

    def subtables(self) -> dict[str, Table]:
        """Every value of this table as a table, by name: `[modbus.<name>]` collections."""
        return {name: self.table(name) for name in self.data}

    def array_of_tables(self, name: str, *, required: bool = False) -> list[Table]:
        """`[[name]]` entries, each keyed `name[i]`; `required` means at least one."""
        self.used.add(name)
        value = self.data.get(name)
        if value is None:
            if required:
                raise self.error(name, f"missing: add at least one [[{name}]] entry")
            return []
        if not isinstance(value, list):
            raise self.error(name, f"expected [[{name}]] tables, got {describe(value)}")
        if required and not value:
            raise self.error(name, f"add at least one [[{name}]] entry")
        items: list[Table] = []
        for i, item in enumerate(value):
            key = f"{name}[{i}]"
            if not isinstance(item, dict):
                raise self.error(key, f"expected a [[{name}]] table, got {describe(item)}")
            items.append(Table(item, self.key(key), base=self.base, source=self.source))
        return items

    def check_unknown(self, allowed: Collection[str] | None = None) -> None:
        """Refuse the first key (in file order) not in `allowed` (default: the keys read)."""
        known = self.used if allowed is None else allowed
        for name in self.data:
            if name not in known:
                raise self.error(name, _unknown_key(name, known))


# ---------------------------------------------------------------------------- DSN


def read_dsn_file(path: Path, *, key: str, source: str | None = None) -> str:
    """The DSN in `path` (surrounding whitespace dropped); missing or empty is an error."""
    try:
        dsn = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError as exc:
        raise ConfigError(key, f"file not found: {path}", source=source) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(key, f"cannot read {path}: {exc}", source=source) from exc
    if not dsn:
        raise ConfigError(key, f"{path} is empty", source=source)
    return dsn


def optional_dsn(table: Table, *, env: str | None = None, url_only: bool = False) -> str | None:
    """The DSN from `dsn`, else `dsn_file`, else the `env` variable; None if none is set.

    `dsn_file` keeps the password out of the config file (and out of argv).
    `url_only` refuses libpq's `key=value` form, for SQLAlchemy, which needs a URL.
    """
    table.mark_used("dsn", "dsn_file")
    if table.has("dsn") and table.has("dsn_file"):
        raise table.error("dsn", "give dsn or dsn_file, not both")
    if table.has("dsn_file"):
        key = "dsn_file"
        path = table.path("dsn_file", must_exist=True)
        dsn = read_dsn_file(path, key=table.key(key), source=table.source)
    elif table.has("dsn"):
        key = "dsn"
        dsn = table.text("dsn")
    else:
        if env is None or not (from_env := os.environ.get(env, "").strip()):
            return None
        if url_only and not from_env.startswith(POSTGRES_URL_PREFIXES):
            raise ConfigError(env, "expected a postgresql:// URL in this environment variable")
        return from_env
    if url_only and not dsn.startswith(POSTGRES_URL_PREFIXES):
        raise table.error(key, "expected a postgresql:// URL")
    return dsn


def read_dsn(table: Table, *, env: str | None = None, url_only: bool = False) -> str:
    """`optional_dsn`, but one of `dsn`, `dsn_file` or the `env` variable must be set."""
    dsn = optional_dsn(table, env=env, url_only=url_only)
    if dsn is None:
        alternatives = "dsn_file" + (f", or the {env} environment variable" if env else "")
        raise table.error("dsn", f"is required (or {alternatives})")
    return dsn


# ---------------------------------------------------------------------------- broker


@dataclass(frozen=True, slots=True)
class BrokerConnection:
    """How to reach the plant broker: address, mutual-TLS files, keepalive.

    Edge agents and ingest workers both read it from their `[broker]` table
    with `read`. Each side extends it with what only its role has: the agent
    publishes (encoding, reconnect backoff, backlog pacing, in-flight cap;
    its client id is its device id), the worker subscribes (client id, shared
    subscription group, persistent session). Those differ in kind, not in
    spelling, so they stay in the subclasses.
    """

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    keepalive_s: int = DEFAULT_BROKER_KEEPALIVE_SECONDS
    # Every broker of the plant in configured order, `(host, port)` first; `hosts = [...]`
    # fills it, a single `host` leaves it empty (see `endpoints`).
    hosts: tuple[tuple[str, int], ...] = ()

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """The brokers to use, in configured order: `hosts`, or the one `host`:`port`."""
        return self.hosts or ((self.host, self.port),)

    @classmethod
    def read(cls, table: Table, *, files_must_exist: bool, **extra: Any) -> Self:
        """Read the connection keys from `table`; `extra` fills the subclass's fields.

        `files_must_exist=False` is for configs validated away from where they
        run (a bundle rendered before its device has certificates); such a
        caller must check the files itself before connecting.
        """
        hosts = _broker_hosts(table)
        return cls(
            host=hosts[0][0],
            port=hosts[0][1],
            hosts=hosts if table.has("hosts") else (),
            ca=table.path("ca", must_exist=files_must_exist),
            cert=table.path("cert", must_exist=files_must_exist),
            key=table.path("key", must_exist=files_must_exist),
            keepalive_s=table.integer(
                "keepalive_s", DEFAULT_BROKER_KEEPALIVE_SECONDS, low=5, high=3600
            ),
            **extra,
        )


def _broker_hosts(table: Table) -> tuple[tuple[str, int], ...]:
    """`host` + `port` (one broker) or `hosts = ["a.example:8883", ...]` (several), not both."""
    if not table.has("hosts"):
        return (
            (table.text("host"), table.integer("port", DEFAULT_BROKER_PORT, low=1, high=65535)),
        )
    for single in ("host", "port"):
        if table.has(single):
            raise table.error(single, "give either host (and port) or hosts, not both")
    raw = table._get("hosts", list, 'an array of "host:port" strings', REQUIRED)
    if not raw:
        raise table.error("hosts", "must not be empty")
    out: list[tuple[str, int]] = []
    for i, item in enumerate(raw):
        key = f"hosts[{i}]"
        if not isinstance(item, str):
            raise table.error(key, f'expected "host:port", got {describe(item)}')
        endpoint = parse_endpoint(item, default_port=DEFAULT_BROKER_PORT)
        if endpoint is None:
            raise table.error(key, f'{item!r} is not "host" or "host:port" (port 1-65535)')
        if endpoint in out:
            raise table.error(key, f"{item!r} is listed twice")
        out.append(endpoint)
    return tuple(out)


def parse_endpoint(text: str, *, default_port: int) -> tuple[str, int] | None:
    """`host`, `host:port`, `[v6]` or `[v6]:port` as (host, port); None if malformed."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        rest = ":" + port
    else:
        host, rest = text, ""
    if rest and not rest.startswith(":"):
        return None
    port = rest[1:] if rest else str(default_port)
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)
