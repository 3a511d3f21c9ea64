"""`millrace alerts apply | list | export` against a real database; the rules file dump."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from millrace.cli import main
from millrace.cloud.alerts.rules import AlertRule, dump_rules, load_rules_file
from tests.cloud.ingest_support import prepare_database, query
from tests.fixtures.fix_broker import free_port

RULES = """
[[rule]]
name = "press-oil-hot"
metric = "oil_temp"
devices = "press-*"
above = 80.0
hysteresis = 3.0
severity = "critical"
description = "oil \\"too\\" hot\\nsee SOP-7 \u00e9"

[[rule]]
name = "line-pressure-band"
metric = "pressure"
outside = [1.0, 3.5]
hysteresis = 0.2
aggregate = "mean"

[[rule]]
name = "cold"
metric = "temp"
below = -5
enabled = false

[[rule]]
name = "gateway-silent"
metric = "*"
no_data_minutes = 5
severity = "info"
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_dump_rules_round_trips_every_kind(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(RULES, encoding="utf-8")
    rules = load_rules_file(path)
    again = tmp_path / "again.toml"
    again.write_text(dump_rules(rules), encoding="utf-8")
    assert load_rules_file(again) == rules


@settings(max_examples=60, deadline=None)
@given(
    name=st.text(min_size=1, max_size=30),
    description=st.text(max_size=40),
    devices=st.text(min_size=1, max_size=20),
    high=st.floats(allow_nan=False, allow_infinity=False),
    hysteresis=st.floats(min_value=0, allow_nan=False, allow_infinity=False),
)
def test_dump_rules_round_trips_any_text_and_number(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    description: str,
    devices: str,
    high: float,
    hysteresis: float,
) -> None:
    rule = AlertRule(
        name, "temp", "above", devices=devices, high=high, hysteresis=hysteresis,
        description=description,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("dump") / "r.toml"
    path.write_text(dump_rules([rule]), encoding="utf-8")
    assert load_rules_file(path) == [rule]


@pytest.mark.integration
def test_alerts_cli_apply_list_export_and_apply_of_export_is_identity(
    fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = prepare_database(fresh_db)
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES, encoding="utf-8")
    dsn_file = tmp_path / "owner.dsn"
    dsn_file.touch(mode=0o600)
    dsn_file.write_text(db.owner_dsn)

    code, out, err = run(capsys, "alerts", "apply", str(rules), "--dsn-file", str(dsn_file))
    assert code == 0, err
    assert "4 added, 0 updated, 0 unchanged, 0 disabled" in out

    code, out, _ = run(capsys, "alerts", "list", "--dsn", db.owner_dsn)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "DEVICES", "CONDITION", "SEVERITY", "ENABLED", "ACTIVE"]
    assert any(line.startswith("press-oil-hot") and "oil_temp above 80" in line for line in lines)
    assert any(line.startswith("cold") and " no " in line for line in lines)
    code, out, _ = run(capsys, "alerts", "list", "--json", "--dsn", db.owner_dsn)
    listed = json.loads(out)
    assert [r["name"] for r in listed] == [
        "press-oil-hot", "line-pressure-band", "cold", "gateway-silent",
    ]  # fmt: skip

    code, exported, _ = run(capsys, "alerts", "export", "--dsn", db.owner_dsn)
    assert code == 0
    assert load_rules_file(rules) == load_rules_file(_write(tmp_path / "e.toml", exported))
    # apply(export) changes nothing, and exporting again gives the same text.
    code, out, _ = run(capsys, "alerts", "apply", str(tmp_path / "e.toml"), "--dsn", db.owner_dsn)
    assert code == 0 and "0 added, 0 updated, 4 unchanged, 0 disabled" in out
    code, again, _ = run(capsys, "alerts", "export", "--dsn", db.owner_dsn)
    assert again == exported

    # A changed file updates one rule; --disable-missing disables what it no longer names.
    one = _write(tmp_path / "one.toml", RULES.split("[[rule]]")[1].replace("80.0", "85.0"))
    one.write_text("[[rule]]" + one.read_text())
    code, out, _ = run(
        capsys, "alerts", "apply", str(one), "--disable-missing", "--dsn", db.owner_dsn
    )
    assert code == 0
    assert "0 added, 1 updated, 0 unchanged, 2 disabled" in out, out
    enabled = query(db.owner_dsn, "SELECT name FROM alert_rules WHERE enabled ORDER BY name")
    assert enabled == [("press-oil-hot",)]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.integration
def test_alerts_cli_bad_key_exits_2_naming_it_and_stores_nothing(
    fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = prepare_database(fresh_db)
    bad = _write(
        tmp_path / "bad.toml",
        '[[rule]]\nname = "a"\nmetric = "temp"\nabove = 1.0\n\n'
        '[[rule]]\nname = "b"\nmetric = "temp"\nabove = 2.0\ntreshold = 3\n',
    )
    code, out, err = run(capsys, "alerts", "apply", str(bad), "--dsn", db.owner_dsn)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "rule[1].treshold: unknown key" in err
    assert query(db.owner_dsn, "SELECT count(*) FROM alert_rules") == [(0,)]
    outside = _write(tmp_path / "o.toml", '[[rule]]\nname = "a"\nmetric = "p"\noutside = [3.0]\n')
    code, _, err = run(capsys, "alerts", "apply", str(outside), "--check")
    assert code == 2 and "rule[0].outside: expected [low, high]" in err


def test_alerts_cli_check_needs_no_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "alerts", "apply", str(_write(tmp_path / "r.toml", RULES)), "--check"
    )
    assert code == 0 and "4 rule(s), valid" in out, err


def test_alerts_cli_dead_database_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = f"host=127.0.0.1 port={free_port()} dbname=x user=x connect_timeout=3"
    code, _, err = run(capsys, "alerts", "list", "--dsn", dsn)
    assert code == 3 and err.startswith("millrace: error: cannot reach the database")
    assert err.count("\n") == 1


@pytest.mark.integration
def test_alerts_cli_as_the_ingest_role_is_refused_in_one_line(
    fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = prepare_database(fresh_db)
    code, _, err = run(
        capsys, "alerts", "apply", str(_write(tmp_path / "r.toml", RULES)), "--dsn", db.ingest_dsn
    )
    assert code == 2 and "schema owner" in err and err.count("\n") == 1, err
    code, out, _ = run(capsys, "alerts", "export", "--dsn", db.ingest_dsn)
    assert code == 0 and out == ""  # reading is allowed: nothing stored
