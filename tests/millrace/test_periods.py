"""One window-period rule for edge and cloud: the edge refuses what ingest would dead-letter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from millrace.cloud.config import DEFAULT_ALLOWED_PERIODS_S
from millrace.edge.commands import CommandProcessor
from millrace.edge.config import parse_config
from millrace.edge.state import AgentState, StateStore
from millrace.errors import ConfigError
from millrace.wire import Command
from millrace.wire.periods import divides_hour, period_problem

CONFIG = """
device_id = "dev-p"
[broker]
host = "broker.plant.example"
ca = "ca.crt"
cert = "c.crt"
key = "c.key"
[windows]
period_s = {period}
extra_periods_s = {extra}
grace_s = 0.5
[outbox]
path = "o.sqlite"
[state]
dir = "s"
[[signals]]
metric = "t"
driver = "sim"
"""


def test_edge_and_cloud_share_one_period_rule() -> None:
    """Every period the edge accepts is one the default cloud stores, and no other."""
    edge_ok = {p for p in range(1, 86_401) if period_problem(p) is None}
    assert edge_ok == set(DEFAULT_ALLOWED_PERIODS_S)
    assert all(divides_hour(p) for p in edge_ok)


@pytest.mark.parametrize(
    ("period", "extra", "key"),
    [
        (7, "[]", "windows.period_s"),
        (7200, "[]", "windows.period_s"),
        (86_400, "[]", "windows.period_s"),
        (10, "[60, 45]", "windows.extra_periods_s[1]"),
    ],
)
def test_period_the_cloud_would_refuse_is_rejected_by_config(
    period: int, extra: str, key: str
) -> None:
    text = CONFIG.format(period=period, extra=extra)
    with pytest.raises(ConfigError) as err:
        parse_config(text, base=Path("/"))
    assert err.value.key == key
    assert "not a window period the cloud stores" in str(err.value)


def test_standard_periods_pass_config() -> None:
    text = CONFIG.format(period=5, extra="[60, 3600]")
    assert parse_config(text, base=Path("/")).windows.periods_s == (5, 60, 3600)


def test_period_the_cloud_would_refuse_is_rejected_by_edge_check(tmp_path: Path) -> None:
    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("placeholder\n")
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG.format(period=7, extra="[]"))
    done = subprocess.run(
        [sys.executable, "-m", "millrace.cli", "edge", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == (
        f"millrace: error: {config}: windows.period_s: {period_problem(7)}"
    )


class _Control:
    def __init__(self) -> None:
        self.periods: list[int] = []

    def set_period(self, period_s: int) -> None:
        self.periods.append(period_s)

    def set_poll(self, metric: str, poll_s: float) -> None: ...

    def flush(self) -> dict[str, Any]:
        return {}

    def rebirth(self) -> None: ...

    def status(self) -> dict[str, Any]:
        return {}


@pytest.mark.parametrize(("period", "ok"), [(7, False), (45, False), (7200, False), (30, True)])
def test_period_the_cloud_would_refuse_is_rejected_by_set(
    tmp_path: Path, period: int, ok: bool
) -> None:
    config = parse_config(CONFIG.format(period=10, extra="[]"), base=tmp_path)
    store = StateStore(tmp_path / "state")
    (tmp_path / "state").mkdir()
    control = _Control()
    proc = CommandProcessor(config=config, store=store, state=AgentState(), control=control)
    command = Command(id="c1", name="set", args={"period_s": period})
    reply = proc.handle("set", command.to_json())
    assert reply.ok is ok, reply
    if ok:
        assert control.periods == [period]
    else:
        assert "not a window period the cloud stores" in (reply.error or "")
        assert control.periods == [] and store.load().period_s is None


def test_stack_up_refuses_a_period_the_cloud_would_refuse(tmp_path: Path) -> None:
    root = str(tmp_path / "p")
    done = subprocess.run(
        [sys.executable, "-m", "millrace.cli", "up", "--root", root, "--period", "7"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--period: 7 s is not a window period the cloud stores" in done.stderr
    assert not (tmp_path / "p").exists()
