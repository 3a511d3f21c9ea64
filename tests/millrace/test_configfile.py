"""The shared config reader: key paths, typed getters, did-you-mean, DSN and broker reads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from millrace.configfile import (
    BrokerConnection,
    Table,
    optional_dsn,
    parse_toml,
    read_dsn,
    read_dsn_file,
    read_text,
    read_toml,
    suggest,
)
from millrace.errors import ConfigError

BASE = Path("/etc/millrace")
DSN_ENV = "MILLRACE_TEST_DSN"


def table(text: str, *, base: Path = BASE) -> Table:
    return Table(parse_toml(text, source="x.toml"), base=base, source="x.toml")


def fails(call: Any, key: str, words: str) -> ConfigError:
    """Run `call`; it must raise a ConfigError for `key` whose problem contains `words`."""
    with pytest.raises(ConfigError) as caught:
        call()
    assert caught.value.key == key
    assert words in caught.value.problem, caught.value.problem
    assert str(caught.value) == f"x.toml: {key}: {caught.value.problem}"
    return caught.value


# -- key paths ------------------------------------------------------------------------------


def test_array_of_tables_names_entries_by_index() -> None:
    root = table('[[signals]]\nscale = 1\n[[signals]]\nscale = 2\n[[signals]]\nscale = "x"\n')
    signals = root.array_of_tables("signals", required=True)
    assert [t.location for t in signals] == ["signals[0]", "signals[1]", "signals[2]"]
    assert signals[1].number("scale") == 2.0
    fails(lambda: signals[2].number("scale"), "signals[2].scale", "expected a number")


def test_nested_tables_and_array_elements_name_the_full_path() -> None:
    root = table("[a.b]\nperiods = [10, 60, 0]\n[[a.b.c]]\nx = true\n")
    b = root.table("a").table("b")
    fails(lambda: b.integers("periods", low=1, high=3600), "a.b.periods[2]", "0 is outside")
    (c,) = b.array_of_tables("c")
    fails(lambda: c.integer("x", low=0, high=1), "a.b.c[0].x", "got true")


def test_array_of_tables_problems() -> None:
    fails(lambda: table("").array_of_tables("signals", required=True), "signals", "missing")
    assert table("").array_of_tables("signals") == []
    fails(
        lambda: table("signals = []").array_of_tables("signals", required=True),
        "signals",
        "at least one",
    )
    fails(lambda: table("signals = 3").array_of_tables("signals"), "signals", "got int 3")
    fails(lambda: table("signals = [1]").array_of_tables("signals"), "signals[0]", "got int 1")


def test_subtables_by_name() -> None:
    root = table('[modbus.plc1]\nhost = "a"\n[modbus.plc2]\nhost = "b"\n')
    devices = root.table("modbus").subtables()
    assert list(devices) == ["plc1", "plc2"]
    assert devices["plc2"].text("host") == "b"
    fails(lambda: table("[modbus]\nplc1 = 5\n").table("modbus").subtables(), "modbus.plc1", "")


def test_tables_missing_or_of_the_wrong_kind() -> None:
    assert table("").table("windows").data == {}
    fails(lambda: table("").table("broker", required=True), "broker", "missing table")
    fails(lambda: table("broker = [1]").table("broker"), "broker", "expected a table, got an array")


# -- unknown keys ---------------------------------------------------------------------------


def test_unknown_key_suggests_the_close_one() -> None:
    t = table("[heartbeat]\nintervl_s = 3\n").table("heartbeat")
    t.number("interval_s", 30.0)
    fails(t.check_unknown, "heartbeat.intervl_s", "unknown key (did you mean 'interval_s'?)")


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    t = table("port = 1\ncolour = 2\n")
    t.integer("port", low=1, high=2)
    fails(t.check_unknown, "colour", "unknown key (known keys: port)")


def test_unknown_keys_are_reported_in_file_order_against_an_explicit_set() -> None:
    t = table("zeta = 1\nalpha = 2\n")
    fails(lambda: t.check_unknown({"alfa"}), "zeta", "unknown key")
    t = table("alpha = 2\nzeta = 1\n")
    fails(lambda: t.check_unknown({"alfa"}), "alpha", "did you mean 'alfa'?")


def test_read_or_marked_keys_are_known() -> None:
    t = table('a = 1\nb = "x"\n')
    t.integer("a", low=0, high=1)
    t.mark_used("b")
    t.check_unknown()


def test_suggest() -> None:
    assert suggest("plc2", {"plc1"}) == " (did you mean 'plc1'?)"
    assert suggest("zzz", {"plc1"}) == ""


# -- typed getters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "read", "words"),
    [
        ('v = "1"', lambda t: t.integer("v", low=0, high=9), "expected an integer, got the string"),
        ("v = true", lambda t: t.integer("v", low=0, high=9), "expected an integer, got true"),
        ("v = 1.5", lambda t: t.integer("v", low=0, high=9), "got float 1.5"),
        ("v = 10", lambda t: t.integer("v", low=0, high=9), "10 is outside [0, 9]"),
        ("v = false", lambda t: t.number("v"), "expected a number, got false"),
        ("v = inf", lambda t: t.number("v"), "expected a finite number"),
        ("v = nan", lambda t: t.number("v"), "expected a finite number"),
        ("v = 0", lambda t: t.number("v", low=0.0, low_open=True, high=5.0), "outside (0, 5]"),
        ("v = -1", lambda t: t.number("v", low=0.0), "-1 must be >= 0"),
        ("v = 0", lambda t: t.number("v", low=0.0, low_open=True), "0 must be > 0"),
        ("v = 7", lambda t: t.number("v", high=5.0), "7 must be <= 5"),
        ("v = 1", lambda t: t.boolean("v"), "expected true or false, got int 1"),
        ("v = 1", lambda t: t.text("v"), "expected a string, got int 1"),
        ('v = "  "', lambda t: t.text("v"), "must not be empty"),
        ('v = "  "', lambda t: t.text("v", ""), "must not be empty"),
        ('v = "x"', lambda t: t.choice("v", Literal["a", "b"]), "'x' is not one of a, b"),
        ("v = 2", lambda t: t.choice("v", ("a", "b")), "expected one of a, b, got int 2"),
        ("v = 3", lambda t: t.integers("v", low=0, high=9), "expected an array of integers"),
        ("v = []", lambda t: t.integers("v", low=0, high=9, non_empty=True), "must not be empty"),
        ('v = [1, "2"]', lambda t: t.integers("v", low=0, high=9), "got the string '2'"),
        ("", lambda t: t.text("v"), "missing (expected a string)"),
        ("", lambda t: t.integer("v", low=0, high=1), "missing (expected an integer)"),
        ("", lambda t: t.path("v"), "missing (expected a string)"),
    ],
)
def test_type_and_range_errors_name_the_key_and_the_problem(
    text: str, read: Any, words: str
) -> None:
    t = table("[s]\n" + text).table("s")
    key = "s.v[1]" if "[1, " in text else "s.v"  # the one bad array element
    fails(lambda: read(t), key, words)


def test_getters_return_typed_values_and_defaults() -> None:
    t = table('i = 3\nf = 2\nb = true\ns = "x"\nc = "b"\nempty = ""\nints = [1, 2]\n')
    assert t.integer("i", low=0, high=9) == 3
    assert t.number("f") == 2.0 and isinstance(t.number("f"), float)
    assert t.boolean("b") is True
    assert t.text("s") == "x"
    assert t.choice("c", Literal["a", "b"]) == "b"
    assert t.text("empty", "") == ""  # "" means the default when the default is ""
    assert t.integers("ints", low=0, high=9) == (1, 2)
    assert t.integer("absent_i", 7, low=0, high=1) == 7  # defaults are not range-checked
    assert t.number("absent_f", -math.inf) == -math.inf
    assert t.boolean("absent_b", False) is False
    assert t.integers("absent_ints", (5,), low=0, high=1) == (5,)
    assert t.optional_path("absent_p") is None
    assert t.raw("absent_r") is None


def test_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "present.crt").write_text("x")
    t = table(
        'rel = "pki/ca.crt"\nabs = "/abs/x"\nhome = "~/x"\nok = "present.crt"\nno = "gone.crt"\n',
        base=tmp_path,
    )
    assert t.path("rel") == tmp_path / "pki" / "ca.crt"
    assert t.path("abs") == Path("/abs/x")
    assert t.path("home") == Path("~/x").expanduser()
    assert t.path("ok", must_exist=True) == tmp_path / "present.crt"
    fails(lambda: t.path("no", must_exist=True), "no", f"file not found: {tmp_path}/gone.crt")
    fails(lambda: t.optional_path("no", must_exist=True), "no", "file not found")


# -- files ----------------------------------------------------------------------------------


def test_config_files_missing_unreadable_not_utf8_or_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        read_text(tmp_path / "absent.toml", key="--config")
    assert (caught.value.key, caught.value.problem) == (
        "--config",
        f"file not found: {tmp_path / 'absent.toml'}",
    )
    with pytest.raises(ConfigError, match="cannot read"):
        read_toml(tmp_path)
    (tmp_path / "latin1.toml").write_bytes(b'title = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_toml(tmp_path / "latin1.toml")
    (tmp_path / "bad.toml").write_text("[broker\n")
    with pytest.raises(ConfigError) as caught:
        read_toml(tmp_path / "bad.toml")
    assert caught.value.key == "config" and "not valid TOML" in caught.value.problem
    assert caught.value.source == str(tmp_path / "bad.toml")
    assert "line 1" in caught.value.problem


# -- DSN ------------------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(DSN_ENV, raising=False)
    return monkeypatch


def db(text: str, base: Path = BASE) -> Table:
    return table("[database]\n" + text, base=base).table("database")


def test_dsn_inline_from_file_or_from_the_environment(
    tmp_path: Path, no_env: pytest.MonkeyPatch
) -> None:
    assert read_dsn(db('dsn = "postgresql://a@h/db"'), env=DSN_ENV) == "postgresql://a@h/db"
    (tmp_path / "db.dsn").write_text("  postgresql://u:pw@h/db\n")
    t = db('dsn_file = "db.dsn"', tmp_path)
    assert read_dsn(t, env=DSN_ENV) == "postgresql://u:pw@h/db"
    t.check_unknown()  # dsn and dsn_file count as read
    no_env.setenv(DSN_ENV, " postgresql://env/db ")
    assert read_dsn(db(""), env=DSN_ENV) == "postgresql://env/db"
    assert (
        read_dsn(db('dsn = "postgresql://inline-wins"'), env=DSN_ENV) == "postgresql://inline-wins"
    )


def test_dsn_missing_names_every_way_to_give_it(no_env: pytest.MonkeyPatch) -> None:
    fails(
        lambda: read_dsn(db(""), env=DSN_ENV),
        "database.dsn",
        f"is required (or dsn_file, or the {DSN_ENV} environment variable)",
    )
    fails(lambda: read_dsn(db("")), "database.dsn", "is required (or dsn_file)")
    assert optional_dsn(db("")) is None
    no_env.setenv(DSN_ENV, "postgresql://env/db")
    assert optional_dsn(db("")) is None, "no env fallback unless asked for"


def test_dsn_and_dsn_file_together(no_env: pytest.MonkeyPatch) -> None:
    fails(
        lambda: read_dsn(db('dsn = "postgresql://x"\ndsn_file = "f"')),
        "database.dsn",
        "give dsn or dsn_file, not both",
    )


def test_dsn_file_missing_empty_or_unreadable(tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    fails(
        lambda: read_dsn(db('dsn_file = "absent.dsn"', tmp_path)),
        "database.dsn_file",
        f"file not found: {tmp_path / 'absent.dsn'}",
    )
    (tmp_path / "empty.dsn").write_text(" \n")
    fails(
        lambda: read_dsn(db('dsn_file = "empty.dsn"', tmp_path)),
        "database.dsn_file",
        f"{tmp_path / 'empty.dsn'} is empty",
    )
    (tmp_path / "binary.dsn").write_bytes(b"\xff\xfe")
    fails(
        lambda: read_dsn(db('dsn_file = "binary.dsn"', tmp_path)),
        "database.dsn_file",
        "cannot read",
    )


def test_dsn_file_outside_a_config(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text("postgresql://x\n")
    assert read_dsn_file(tmp_path / "dsn", key="--dsn-file") == "postgresql://x"
    with pytest.raises(ConfigError) as caught:
        read_dsn_file(tmp_path / "absent", key="--dsn-file")
    assert caught.value.key == "--dsn-file" and "file not found" in caught.value.problem


def test_url_only_refuses_key_value_dsns(tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    assert read_dsn(db('dsn = "host=h dbname=d"')) == "host=h dbname=d"
    fails(
        lambda: read_dsn(db('dsn = "host=h dbname=d"'), url_only=True),
        "database.dsn",
        "expected a postgresql:// URL",
    )
    (tmp_path / "db.dsn").write_text("mysql://x\n")
    fails(
        lambda: read_dsn(db('dsn_file = "db.dsn"', tmp_path), url_only=True),
        "database.dsn_file",
        "postgresql://",
    )
    no_env.setenv(DSN_ENV, "host=h")
    with pytest.raises(ConfigError) as caught:
        read_dsn(db(""), env=DSN_ENV, url_only=True)
    assert caught.value.key == DSN_ENV and "postgresql://" in caught.value.problem


# -- broker connection ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscriber(BrokerConnection):
    client_id: str
    group: str = "g"


BROKER = '[broker]\nhost = "b"\nca = "ca.crt"\ncert = "w.crt"\nkey = "w.key"\n'


def test_broker_connection_defaults_and_extras() -> None:
    t = table(BROKER + 'client_id = "w1"\n').table("broker")
    broker = Subscriber.read(t, files_must_exist=False, client_id=t.text("client_id"))
    assert (broker.host, broker.port, broker.keepalive_s) == ("b", 8883, 30)
    assert broker.ca == BASE / "ca.crt" and broker.key == BASE / "w.key"
    assert (broker.client_id, broker.group) == ("w1", "g")
    t.check_unknown()


def test_broker_connection_errors(tmp_path: Path) -> None:
    t = table(BROKER + "port = 0\n").table("broker")
    fails(lambda: BrokerConnection.read(t, files_must_exist=False), "broker.port", "outside")
    t = table(BROKER + "keepalive_s = 1\n").table("broker")
    fails(lambda: BrokerConnection.read(t, files_must_exist=False), "broker.keepalive_s", "[5,")
    t = table(BROKER.replace('host = "b"\n', ""), base=tmp_path).table("broker")
    fails(lambda: BrokerConnection.read(t, files_must_exist=False), "broker.host", "missing")
    t = table(BROKER, base=tmp_path).table("broker")
    fails(lambda: BrokerConnection.read(t, files_must_exist=True), "broker.ca", "file not found")
