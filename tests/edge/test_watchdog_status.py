"""The watchdog covers the publisher and poller threads; status.json proves what this process did.

issue 14: the watchdog only proved that the main loop turns (a dead publisher thread kept
the agent "healthy"), and a rollout could not tell that the agent it just started had
reached the plant broker and had its own batches stored.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from millrace.edge.agent import Agent
from millrace.edge.config import load_config
from millrace.edge.status import STATUS_FILE
from millrace.edge.systemd import Notifier
from tests.edge.agent_helpers import SIM_SIGNALS, Collector, write_config

WAIT_SECONDS = 20.0


class RecordingNotifier(Notifier):
    """A notifier under a fake systemd: records each message, pings every 50 ms."""

    def __init__(self) -> None:
        super().__init__(environ={})
        self.watchdog_interval_s = 0.05
        self.messages: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def notify(self, message: str) -> bool:
        with self.lock:
            self.messages.append((time.monotonic(), message))
        return True

    def pings_after(self, since: float) -> int:
        with self.lock:
            return sum(1 for at, m in self.messages if m == "WATCHDOG=1" and at > since)


def _config(tmp_path: Path) -> Path:
    for name in ("ca.crt", "dev.crt", "dev.key"):
        (tmp_path / name).write_text("placeholder\n")
    path = tmp_path / "edge.toml"
    path.write_text(
        'device_id = "gw-watchdog"\n[broker]\nhost = "localhost"\nport = 1\n'
        'ca = "ca.crt"\ncert = "dev.crt"\nkey = "dev.key"\n'
        f'[outbox]\npath = "{tmp_path / "outbox.sqlite"}"\n[state]\ndir = "{tmp_path / "state"}"\n'
        '[[signals]]\nmetric = "a"\ndriver = "sim"\npoll_s = 0.1\n'
    )
    return path


def _wait(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_watchdog_stops_pinging_when_the_publisher_stalls(tmp_path: Path) -> None:
    notifier = RecordingNotifier()
    agent = Agent(load_config(_config(tmp_path)), notifier=notifier)
    agent.publisher_stall_s = 0.5
    release = threading.Event()
    # The publish loop wedges (a hung disk, a stuck socket): alive, but it never turns again.
    agent.publisher._thread = threading.Thread(target=lambda: release.wait(60), daemon=True)
    result: list[int] = []
    main = threading.Thread(target=lambda: result.append(agent.run()), daemon=True)
    main.start()
    try:
        _wait(lambda: notifier.pings_after(0) >= 2, "pings while the publisher is fresh")
        _wait(lambda: time.monotonic() - agent.publisher.beat > 1.0, "the stall")
        stalled_at = time.monotonic()
        time.sleep(0.5)  # ten ping intervals
        assert notifier.pings_after(stalled_at) == 0, "watchdog pinged for a stalled publisher"
        assert main.is_alive()
    finally:
        release.set()
        agent.request_stop()
        main.join(30)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_agent_exits_non_zero_when_the_publisher_thread_dies(tmp_path: Path) -> None:
    notifier = RecordingNotifier()
    agent = Agent(load_config(_config(tmp_path)), notifier=notifier)

    def die() -> None:
        raise SystemExit("publisher gone")  # ends the thread quietly, like a fatal bug

    agent.publisher._thread = threading.Thread(target=die, daemon=True)
    result: list[int] = []
    main = threading.Thread(target=lambda: result.append(agent.run()), daemon=True)
    main.start()
    main.join(WAIT_SECONDS)
    if main.is_alive():
        agent.request_stop()
        main.join(30)
        pytest.fail("the agent kept running (and pinging its watchdog) without a publisher")
    assert result == [1]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_agent_exits_non_zero_when_a_poller_thread_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def die(group: Any, sink: Any) -> None:
        raise SystemExit("poller gone")  # ends the poller thread, as a fatal bug would

    monkeypatch.setattr("millrace.edge.sampler.poll_once", die)
    agent = Agent(load_config(_config(tmp_path)), notifier=RecordingNotifier())
    result: list[int] = []
    main = threading.Thread(target=lambda: result.append(agent.run()), daemon=True)
    main.start()
    main.join(WAIT_SECONDS)
    if main.is_alive():
        agent.request_stop()
        main.join(30)
        pytest.fail("the agent kept running without its poller thread")
    assert result == [1]


@pytest.mark.integration
def test_status_file_proves_this_process_connected_and_had_its_batches_stored(
    broker: Any, test_pki: Any, mqtt_connect: Any, tmp_path: Path
) -> None:
    device = f"edge-status-{uuid.uuid4().hex[:6]}"
    test_pki.issue(device)
    collector = Collector(device)  # receipts every batch, as ingest does after its commit
    collector.attach(mqtt_connect, broker, f"svc-{device}")
    config = write_config(tmp_path / "edge.toml", server=broker, device=device, signals=SIM_SIGNALS)
    agent = Agent(load_config(config))
    status_path = tmp_path / "state" / STATUS_FILE
    main = threading.Thread(target=agent.run, daemon=True)
    main.start()
    try:

        def status() -> dict[str, Any]:
            return json.loads(status_path.read_text()) if status_path.exists() else {}

        _wait(lambda: status().get("receipted_ms") is not None, "an own receipt in status.json")
        seen = status()
        assert seen["boot_id"] == agent.boot_id
        assert seen["pid"] == agent.status_file.pid
        assert seen["started_ms"] <= seen["connected_ms"] <= seen["receipted_ms"]
        assert seen["connected"] is True and seen["last_error"] == ""
    finally:
        agent.request_stop()
        main.join(30)


def test_status_file_shows_no_connection_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    agent = Agent(load_config(_config(tmp_path)), notifier=RecordingNotifier())
    status_path = tmp_path / "state" / STATUS_FILE
    main = threading.Thread(target=agent.run, daemon=True)
    main.start()
    try:
        _wait(
            lambda: status_path.exists() and json.loads(status_path.read_text())["last_error"],
            "the connection error in status.json",
        )
        seen = json.loads(status_path.read_text())
        assert seen["connected_ms"] is None and seen["receipted_ms"] is None
        assert seen["boot_id"] == agent.boot_id
    finally:
        agent.request_stop()
        main.join(30)
