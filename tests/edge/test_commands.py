"""Commands: validated, persisted atomically with their id, applied once, answered again."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from millrace.edge.commands import CommandProcessor
from millrace.edge.config import AgentConfig, parse_config
from millrace.edge.state import MAX_REMEMBERED_COMMANDS, AgentState, StateStore
from millrace.wire import Command

CONFIG = """
device_id = "dev-a"
[broker]
host = "localhost"
ca = "ca.crt"
cert = "c.crt"
key = "c.key"
[windows]
period_s = 10
grace_s = 2
[outbox]
path = "o.sqlite"
[state]
dir = "s"
[[signals]]
metric = "temp"
driver = "sim"
[[signals]]
metric = "power"
driver = "mqtt"
source = "nodes"
topic = "tele/x"
[local_mqtt.nodes]
host = "localhost"
"""


class FakeControl:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def set_period(self, period_s: int) -> None:
        self.calls.append(("period", period_s))

    def set_poll(self, metric: str, poll_s: float) -> None:
        self.calls.append(("poll", (metric, poll_s)))

    def flush(self) -> dict[str, Any]:
        self.calls.append(("flush", None))
        return {}

    def rebirth(self) -> None:
        self.calls.append(("rebirth", None))

    def status(self) -> dict[str, Any]:
        return {"boot_id": "x"}


@pytest.fixture
def config() -> AgentConfig:
    return parse_config(CONFIG, base=Path("/"))


def make(tmp_path: Path, config: AgentConfig) -> tuple[CommandProcessor, FakeControl, StateStore]:
    store = StateStore(tmp_path / "state")
    control = FakeControl()
    proc = CommandProcessor(config=config, store=store, state=store.load(), control=control)
    return proc, control, store


def cmd(id_: str, name: str, **args: Any) -> bytes:
    return Command(id=id_, name=name, args=args).to_json()


def test_set_is_applied_once_and_a_repeat_gets_the_same_answer(
    tmp_path: Path, config: AgentConfig
) -> None:
    proc, control, store = make(tmp_path, config)
    first = proc.handle("set", cmd("c1", "set", period_s=5))
    again = proc.handle("set", cmd("c1", "set", period_s=5))
    assert first.ok and first.result == {"period_s": 5} and not first.duplicate
    assert again.ok and again.result == first.result and again.duplicate
    assert control.calls == [("period", 5)]
    assert store.load().period_s == 5


def test_idempotency_survives_a_restart(tmp_path: Path, config: AgentConfig) -> None:
    proc, _control, _ = make(tmp_path, config)
    proc.handle("set", cmd("c1", "set", metric="temp", poll_s=0.5))
    proc2, control2, store = make(tmp_path, config)
    reply = proc2.handle("set", cmd("c1", "set", metric="temp", poll_s=0.5))
    assert reply.duplicate and reply.ok
    assert control2.calls == []
    assert store.load().poll_s == {"temp": 0.5}


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"period_s": 0}, "period_s"),
        ({"period_s": 2}, "longer than grace_s"),
        ({"period_s": "ten"}, "period_s"),
        ({"metric": "temp"}, "go together"),
        ({"metric": "nope", "poll_s": 1}, "no signal"),
        ({"metric": "power", "poll_s": 1}, "pushed"),
        ({"metric": "temp", "poll_s": 0}, "poll_s"),
        ({"metric": "temp", "poll_s": True}, "expected a number"),
        ({"colour": 1}, "unknown argument"),
        ({}, "nothing to set"),
    ],
)
def test_invalid_set_is_refused_and_not_applied(
    tmp_path: Path, config: AgentConfig, args: dict[str, Any], words: str
) -> None:
    proc, control, store = make(tmp_path, config)
    reply = proc.handle("set", cmd("c2", "set", **args))
    assert not reply.ok and words in reply.error
    assert control.calls == []
    assert store.load().period_s is None and store.load().poll_s == {}


def test_ping_flush_rebirth(tmp_path: Path, config: AgentConfig) -> None:
    proc, control, _ = make(tmp_path, config)
    ping = proc.handle("ping", cmd("p1", "ping"))
    assert ping.ok and ping.result["pong"] is True and ping.result["boot_id"] == "x"
    assert proc.handle("flush", cmd("f1", "flush")).ok
    assert proc.handle("flush", cmd("f1", "flush")).duplicate
    assert proc.handle("rebirth", cmd("r1", "rebirth")).ok
    assert control.calls == [("flush", None), ("rebirth", None)]


def test_malformed_and_mismatched_commands(tmp_path: Path, config: AgentConfig) -> None:
    proc, control, _ = make(tmp_path, config)
    bad = proc.handle("ping", b"{not json")
    assert not bad.ok and bad.id == "" and "malformed" in bad.error
    mismatch = proc.handle("ping", cmd("m1", "set", period_s=5))
    assert not mismatch.ok and "does not match" in mismatch.error
    unknown = proc.handle("reboot", cmd("u1", "reboot"))
    assert not unknown.ok and "unknown command" in unknown.error
    assert control.calls == []


def test_state_file_is_replaced_atomically_and_bounded(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    state = AgentState()
    for i in range(MAX_REMEMBERED_COMMANDS + 10):
        state = state.remember(f"id{i}", "ping", "{}")
    store.save(state)
    loaded = store.load()
    assert len(loaded.commands) == MAX_REMEMBERED_COMMANDS
    assert "id0" not in loaded.commands and f"id{MAX_REMEMBERED_COMMANDS + 9}" in loaded.commands
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["state.json"]
    assert (tmp_path / "state" / "state.json").stat().st_mode & 0o777 == 0o600


def remembered(count: int) -> AgentState:
    state = AgentState(period_s=30, poll_s={"temp": 2.0})
    for i in range(count):
        state = state.remember(f"id{i}", "set", json.dumps({"ok": True, "n": i}))
    return state


def test_state_file_is_written_whole_despite_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def short_write(fd: int, data: Any) -> int:  # legal: write(2) may write only part
        return real_write(fd, bytes(data[:100]))

    monkeypatch.setattr(os, "write", short_write)
    store = StateStore(tmp_path)
    state = remembered(50)
    store.save(state)
    monkeypatch.undo()
    assert store.load() == state


def test_a_failed_state_write_leaves_the_previous_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path)
    before = remembered(3)
    store.save(before)
    real_write = os.write
    calls = 0

    def full_disk(fd: int, data: Any) -> int:  # part of the file fits, then ENOSPC
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data[:100]))

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        store.save(remembered(50))
    monkeypatch.undo()
    assert store.load() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no partial temp file


def test_unreadable_state_falls_back_to_defaults(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{broken")
    assert StateStore(tmp_path).load() == AgentState()
    (tmp_path / "state.json").write_text(json.dumps({"version": 99}))
    assert StateStore(tmp_path).load() == AgentState()
