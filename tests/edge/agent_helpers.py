"""Helpers for agent tests: configs for a broker, a service-cert collector, agent runners."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from millrace.edge.agent import Agent
from millrace.edge.config import AgentConfig, load_config
from millrace.topics import data_topic, health_topic, receipt_topic, state_topic
from millrace.wire import Batch, CommandReply, DeviceState, Heartbeat, Receipt, decode_batch

MILLRACE = Path(sys.executable).with_name("millrace")
SERVICE_CERT = "svc-test"


def write_config(
    path: Path,
    *,
    server: Any,
    device: str,
    signals: str,
    period_s: int = 1,
    grace_s: float = 0.2,
    heartbeat_s: float = 1.0,
    max_bytes: int = 10 * 1024 * 1024,
    broker_extra: str = "",
    host: str | None = None,
    port: int | None = None,
    cert_id: str | None = None,
) -> Path:
    cert, key = server.pki.files(cert_id or device)
    path.write_text(
        f"""
device_id = "{device}"
[broker]
host = "{host or server.host}"
port = {port or server.port}
ca = "{server.ca}"
cert = "{cert}"
key = "{key}"
reconnect_min_s = 0.2
reconnect_max_s = 1.0
{broker_extra}
[windows]
period_s = {period_s}
grace_s = {grace_s}
[outbox]
path = "{path.parent / "outbox.sqlite"}"
max_bytes = {max_bytes}
[heartbeat]
interval_s = {heartbeat_s}
[state]
dir = "{path.parent / "state"}"
{signals}
"""
    )
    return path


SIM_SIGNALS = """
[[signals]]
metric = "sim.temp"
driver = "sim"
unit = "degC"
poll_s = 0.1
center = 20.0
amplitude = 5.0
"""


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    content_type: str | None
    retain: bool
    at: float


class Collector:
    """Everything a service identity sees of one device (data, state, health, replies).

    Stands in for the cloud: with `receipts` it receipts every batch it receives, as an
    ingest worker does after its commit, so the agent empties its outbox.
    """

    def __init__(self, device: str, *, receipts: bool = True) -> None:
        self.device = device
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self.receipts = receipts

    @property
    def filters(self) -> list[tuple[str, int]]:
        d = self.device
        return [
            (data_topic(d), 1),
            (state_topic(d), 1),
            (health_topic(d), 1),
            (f"millrace/v1/d/{d}/cmd/+/reply", 1),
        ]

    def on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        ctype = getattr(msg.properties, "ContentType", None) if msg.properties else None
        item = Received(msg.topic, bytes(msg.payload), ctype, bool(msg.retain), time.monotonic())
        with self._cond:
            self.messages.append(item)
            self._cond.notify_all()
        if self.receipts and msg.topic.endswith("/data"):
            batch = decode_batch(item.payload, content_type=ctype)
            if isinstance(batch, Batch):
                receipt = Receipt(batch.device, batch.boot_id, -1, ((batch.seq, batch.seq),))
                client.publish(receipt_topic(batch.device), receipt.to_json(), qos=1)

    def attach(self, mqtt_connect: Callable[..., Any], server: Any, client_id: str) -> Any:
        """Connect with a persistent session (so nothing is missed across broker restarts)."""
        client = mqtt_connect(
            client_id, SERVICE_CERT, server=server, on_message=self.on_message, clean_start=False
        )
        done = threading.Event()
        client.on_subscribe = lambda *args: done.set()
        client.subscribe(self.filters)
        assert done.wait(10), "subscription not acknowledged"
        return client

    def wait(self, predicate: Callable[[Collector], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}"
                self._cond.wait(min(left, 0.2))

    def of(self, suffix: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def batches(self) -> list[Batch]:
        out = []
        for m in self.of("/data"):
            batch = decode_batch(m.payload, content_type=m.content_type)
            assert isinstance(batch, Batch), batch
            out.append(batch)
        return out

    def heartbeats(self) -> list[Heartbeat]:
        return [Heartbeat.from_json(m.payload) for m in self.of("/health")]

    def states(self) -> list[DeviceState]:
        return [DeviceState.from_json(m.payload) for m in self.of("/state")]

    def replies(self) -> list[CommandReply]:
        return [CommandReply.from_json(m.payload) for m in self.of("/reply")]


@contextlib.contextmanager
def agent_thread(config: AgentConfig | Path) -> Iterator[Agent]:
    """Run an agent in this process (poller, publisher threads and all) for white-box tests."""
    agent = Agent(load_config(config) if isinstance(config, Path) else config)
    thread = threading.Thread(target=agent.run, name="agent-main", daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        agent.request_stop()
        thread.join(30)
        assert not thread.is_alive(), "agent did not stop"


class AgentProcess:
    """`millrace edge run --config FILE` as a real process (for signals and kill -9)."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = config.with_suffix(".log")
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(MILLRACE), "edge", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Forwarder:
    """A TCP forwarder: lets a test reach the broker under an address its certificate lacks."""

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((listen_host, 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection(self.target)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
