"""Broker failover: two brokers with one authorization, gateways on both, a worker on both.

Real mosquitto brokers built by `millrace broker config` from one PKI (so one
authorization), real TimescaleDB, a real ingest worker subscribed to both brokers,
and real edge agents that know both (`[broker] hosts`). Ground truth is every batch
an agent wrote to its outbox; after each fault the database must hold each of their
windows exactly once (0 lost, 0 doubled) and the outboxes must be empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millrace import topics
from millrace.cloud.config import IngestConfig
from millrace.edge.brokers import preferred_index
from millrace.ops.broker import write_broker_config
from millrace.wire import Receipt
from tests.cloud.ingest_support import (
    IngestDb,
    Publisher,
    make_batches,
    make_config,
    prepare_database,
    running_worker,
)
from tests.cloud.ingest_support import wait_for as _wait_for
from tests.cloud.test_receipts import RecordingAgent, settle_and_check_exactly_once
from tests.edge.agent_helpers import SIM_SIGNALS
from tests.fixtures.fix_broker import (
    ADMIN_ID,
    BIND_ADDRESS,
    MosquittoServer,
    PKIFixture,
    _die_with_parent,
    _mosquitto_binary,
    connect_client,
    free_port,
)

WAIT_SECONDS = 90.0
# Short so the tests see resends and failbacks; production's defaults are 30 s and 60 s.
RECEIPT_WAIT_SECONDS = 1.0
FAILBACK_SECONDS = 1.0
AGENTS_PER_BROKER = 2


@pytest.fixture
def ingest_db(fresh_db: str) -> IngestDb:
    return prepare_database(fresh_db)


def wait_for(predicate: Any, what: str) -> None:
    _wait_for(predicate, timeout_s=WAIT_SECONDS, what=what)


def endpoint(server: Any) -> str:
    return f"{server.host}:{server.port}"


def worker_config(
    tmp_path: Path,
    servers: list[Any],
    dsn: str,
    name: str,
    *,
    group: str | None = None,
    hosts: tuple[tuple[str, int], ...] = (),
    keepalive_s: int = 30,
) -> IngestConfig:
    """A worker of group `group` (default `name`) on `hosts` (default every server's)."""
    config = make_config(tmp_path, server=servers[0], dsn=dsn, client_id=name, group=group or name)
    broker = dataclasses.replace(
        config.broker,
        hosts=hosts or tuple((s.host, s.port) for s in servers),
        keepalive_s=keepalive_s,
    )
    return dataclasses.replace(config, broker=broker)


def device_names(count_per_broker: int, brokers: int) -> list[str]:
    """Device ids whose preferred broker (crc32 spread) covers each broker equally."""
    wanted = {i: count_per_broker for i in range(brokers)}
    names: list[str] = []
    while any(wanted.values()):
        name = f"fo-{uuid.uuid4().hex[:8]}"
        index = preferred_index(name, brokers, spread=True)
        if wanted[index]:
            wanted[index] -= 1
            names.append(name)
    return names


def write_agent_config(path: Path, servers: list[Any], device: str) -> Path:
    cert, key = servers[0].pki.files(device)
    hosts = ", ".join(f'"{endpoint(s)}"' for s in servers)
    path.write_text(
        f"""
device_id = "{device}"
[broker]
hosts = [{hosts}]
ca = "{servers[0].ca}"
cert = "{cert}"
key = "{key}"
keepalive_s = 5
reconnect_min_s = 0.2
reconnect_max_s = 1.0
receipt_wait_s = {RECEIPT_WAIT_SECONDS}
failback_s = {FAILBACK_SECONDS}
[windows]
period_s = 1
grace_s = 0.2
[outbox]
path = "{path.parent / "outbox.sqlite"}"
[heartbeat]
interval_s = 1.0
[state]
dir = "{path.parent / "state"}"
{SIM_SIGNALS}
"""
    )
    return path


@contextlib.contextmanager
def fleet(servers: list[Any], test_pki: Any, tmp_path: Path) -> Iterator[list[RecordingAgent]]:
    started: list[RecordingAgent] = []
    try:
        for device in device_names(AGENTS_PER_BROKER, len(servers)):
            test_pki.issue(device)
            workdir = tmp_path / device
            workdir.mkdir()
            config = write_agent_config(workdir / "edge.toml", servers, device)
            started.append(RecordingAgent(config).start())
        yield started
    finally:
        for agent in started:
            agent.stop()


def on(agent: RecordingAgent, server: Any) -> bool:
    publisher = agent.agent.publisher
    return publisher.connected and publisher.broker == endpoint(server)


def status_broker(agent: RecordingAgent) -> str:
    """The broker the agent's status.json names (what an operator or a rollout reads)."""
    with contextlib.suppress(OSError, ValueError):
        return str(json.loads(agent.agent.status_file.path.read_text()).get("broker"))
    return ""


def receipted(agent: RecordingAgent) -> int:
    return agent.agent.publisher.stats.receipted_own


def test_a_receipt_goes_back_only_through_the_broker_that_carried_the_batch(
    broker_factory: Any, ingest_db: IngestDb, tmp_path: Path
) -> None:
    a, b = broker_factory(), broker_factory()
    config = worker_config(tmp_path, [a, b], ingest_db.ingest_dsn, "fo-route")
    device = f"fo-route-{uuid.uuid4().hex[:6]}"
    first, second = make_batches(device, batches=2, windows_per_batch=3, seed=19)
    got: dict[str, list[Receipt]] = {"a": [], "b": []}
    lock = threading.Lock()
    pubs = {name: Publisher(server, device) for name, server in (("a", a), ("b", b))}
    for name, pub in pubs.items():

        def on_message(_c: Any, _u: Any, msg: Any, name: str = name) -> None:
            with lock:
                got[name].append(Receipt.from_json(bytes(msg.payload)))

        pub.client.on_message = on_message
        pub.client.subscribe(topics.receipt_topic(device), qos=1)

    def covered(name: str, seq: int) -> bool:
        with lock:
            return any(r.covers(seq) for r in got[name])

    try:
        with running_worker(config):
            pubs["a"].publish([first])
            wait_for(lambda: covered("a", first.seq), "the receipt of the batch a carried")
            pubs["b"].publish([second])
            wait_for(lambda: covered("b", second.seq), "the receipt of the batch b carried")
    finally:
        for pub in pubs.values():
            pub.close()
    # In order on one broker: a receipt of the first batch on b would have come before.
    with lock:
        assert not any(r.covers(first.seq) and not r.covers(second.seq) for r in got["b"])
        assert not any(r.covers(second.seq) for r in got["a"])


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "millrace.cli", *args],
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
        check=False,
    )


def test_an_identity_issued_once_is_let_in_by_every_recorded_broker(
    broker_factory: Any, tmp_path: Path
) -> None:
    """`broker sync --host A --host B --remember`, then `pki issue` updates both brokers."""
    own = PKIFixture(tmp_path / "pki")  # no other test's issue or revoke reaches it
    a, b = broker_factory(pki=own), broker_factory(pki=own)
    hosts = [arg for s in (a, b) for arg in ("--host", endpoint(s))]
    synced = cli("broker", "sync", "--pki", str(own.dir), "--admin", ADMIN_ID, *hosts, "--remember")
    assert synced.returncode == 0, synced.stderr
    device = f"fo-ops-{uuid.uuid4().hex[:6]}"
    issued = cli("pki", "issue", "--pki", str(own.dir), device)
    assert issued.returncode == 0, issued.stderr
    for server in (a, b):
        assert f"broker: {endpoint(server)} added {device}" in issued.stdout, issued.stdout
        client = connect_client(server, device, device)  # refused if its role were missing
        client.disconnect()
        client.loop_stop()
    b.stop()
    again = cli("pki", "issue", "--pki", str(own.dir), f"{device}-2")
    assert again.returncode == 3, "a broker that missed the change must fail the command"
    assert f"broker: {endpoint(a)} added {device}-2" in again.stderr
    assert f"broker: {endpoint(b)} NOT updated" in again.stderr


@pytest.mark.faults
def test_gateways_move_to_the_surviving_broker_on_sigkill_and_spread_again_when_it_returns(
    broker_factory: Any, test_pki: Any, ingest_db: IngestDb, tmp_path: Path
) -> None:
    a, b = broker_factory(), broker_factory()
    config = worker_config(tmp_path, [a, b], ingest_db.ingest_dsn, "fo-kill")
    with running_worker(config), fleet([a, b], test_pki, tmp_path) as agents:
        wait_for(lambda: all(receipted(x) >= 2 for x in agents), "receipts on both brokers")
        on_a = [x for x in agents if on(x, a)]
        on_b = [x for x in agents if on(x, b)]
        assert len(on_a) == len(on_b) == AGENTS_PER_BROKER, "the fleet is not spread"

        before = {id(x): receipted(x) for x in on_b}
        killed = time.monotonic()
        b.kill()
        wait_for(lambda: all(on(x, a) for x in on_b), "the gateways of b to connect to a")
        moved_s = time.monotonic() - killed
        wait_for(lambda: all(receipted(x) > before[id(x)] for x in on_b), "receipts through a only")
        receipted_s = time.monotonic() - killed
        print(
            f"\nbroker SIGKILL: gateways on a after {moved_s:.2f} s, receipted {receipted_s:.2f} s"
        )
        assert all(on(x, a) for x in on_a), "a gateway of a moved"
        wait_for(lambda: all(status_broker(x) == endpoint(a) for x in on_b), "status.json to say a")

        b.start()
        restarted = time.monotonic()
        wait_for(lambda: all(on(x, b) for x in on_b), "the gateways of b to move back")
        back_s = time.monotonic() - restarted
        again = {id(x): receipted(x) for x in on_b}
        wait_for(lambda: all(receipted(x) > again[id(x)] for x in on_b), "receipts through b")
        print(f"broker back: gateways on b again after {back_s:.2f} s")
        assert all(on(x, a) for x in on_a) and all(on(x, b) for x in on_b), "not spread again"
        assert all(x.agent.publisher.stats.failbacks == 1 for x in on_b)
        checked = settle_and_check_exactly_once(ingest_db.owner_dsn, agents)
    print(f"reconciled {checked} batches: 0 lost, 0 doubled")


# -- a network partition ----------------------------------------------------------------------


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


class Netns:
    """A network namespace of the test's own, joined to this one by veth links it makes.

    No address is configured: each link has only the IPv6 link-local address the kernel
    gives it, read back here, so the test uses no address but those it created.
    """

    def __init__(self) -> None:
        self.name = f"mrfo{uuid.uuid4().hex[:6]}"
        self.links: list[str] = []
        ip("netns", "add", self.name)
        ip("-n", self.name, "link", "set", "lo", "up")

    def link(self, tag: str) -> tuple[str, str]:
        """A veth pair; returns (this side's interface, the far side's link-local address)."""
        near, far = f"{self.name}{tag}h", f"{self.name}{tag}n"
        ip("link", "add", near, "type", "veth", "peer", "name", far)
        self.links.append(near)
        ip("link", "set", far, "netns", self.name)
        Path(f"/proc/sys/net/ipv6/conf/{near}/accept_dad").write_text("0")
        self.run("sysctl", "-qw", f"net.ipv6.conf.{far}.accept_dad=0")
        ip("link", "set", near, "up")
        ip("-n", self.name, "link", "set", far, "up")
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            out = ip("-n", self.name, "-6", "-o", "addr", "show", "dev", far, "scope", "link")
            if "inet6 " in out and "tentative" not in out:
                return near, out.split("inet6 ", 1)[1].split("/", 1)[0]
            time.sleep(0.05)
        raise AssertionError(f"no link-local address on {far}")

    def run(self, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, *cmd], check=True)

    def close(self) -> None:
        for near in self.links:
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("link", "del", near)
        ip("netns", "del", self.name)


class Relay:
    """Plain TCP from this namespace's loopback to `target` (TLS stays end to end).

    Clients keep verifying the broker as `localhost`, which its certificate names.
    A target that cannot be reached closes the accepted connection; the relay goes on.
    """

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((BIND_ADDRESS, port))
        self.sock.listen(16)
        self.port = port
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            self._open += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
        for sock in self._open:
            sock.close()


class NetnsMosquitto(MosquittoServer):
    """The project's broker run inside `netns`, listening on every address it has there.

    Reached from here through a `Relay` on the same port number, which also serves the
    base class's readiness check and `millrace broker sync`.
    """

    def __init__(self, test_pki: Any, workdir: Path, netns: Netns, *, port: int) -> None:
        self.netns = netns
        super().__init__(test_pki, workdir, port=port)

    def _write_config(self) -> Path:
        return write_broker_config(
            self.pki.dir,
            self.workdir,
            port=self.port,
            log_file=self.log_path,
            clientid_from_certificate=False,
            admin_ids=[ADMIN_ID],
        ).conf

    def start(self) -> None:
        if self.running:
            return
        self._write_config()
        with self.output_path.open("ab") as out:
            self._proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns.name,
                    _mosquitto_binary(),
                    "-c",
                    str(self.conf_path),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._wait_ready()


@pytest.fixture
def netns() -> Iterator[Netns]:
    namespace = Netns()
    try:
        yield namespace
    finally:
        namespace.close()


@pytest.mark.faults
def test_a_worker_cut_off_from_one_broker_loses_nothing_and_the_other_worker_keeps_storing(
    broker_factory: Any, test_pki: Any, ingest_db: IngestDb, tmp_path: Path, netns: Netns
) -> None:
    """Broker b lives in a namespace; worker 1 reaches it over a veth link the test cuts."""
    a = broker_factory()
    gateways_if, gateways_addr = netns.link("g")
    worker_if, worker_addr = netns.link("w")
    port = free_port()
    to_b = Relay(port, (f"{gateways_addr}%{gateways_if}", port))
    cut_path = Relay(free_port(), (f"{worker_addr}%{worker_if}", port))
    (tmp_path / "b").mkdir()
    b = NetnsMosquitto(test_pki, tmp_path / "b", netns, port=port)
    dsn = ingest_db.ingest_dsn
    via_cut = ((a.host, a.port), ("localhost", cut_path.port))
    cut_off = worker_config(
        tmp_path, [a, b], dsn, "fo-part-1", group="fo-part", hosts=via_cut, keepalive_s=5
    )
    other = worker_config(tmp_path, [a, b], dsn, "fo-part-2", group="fo-part", keepalive_s=5)
    try:
        b.start()
        with (
            running_worker(cut_off) as w1,
            running_worker(other),
            fleet([a, b], test_pki, tmp_path) as agents,
        ):
            wait_for(lambda: all(receipted(x) >= 2 for x in agents), "receipts on both brokers")
            on_b = [x for x in agents if on(x, b)]
            assert len(on_b) == AGENTS_PER_BROKER
            consumers = w1.worker._consumer
            assert consumers is not None
            to_a, to_b_cut = consumers.members

            ip("link", "set", worker_if, "down")
            cut_at = time.monotonic()
            wait_for(lambda: not to_b_cut.connected, "worker 1 to notice it lost b")
            noticed_s = time.monotonic() - cut_at
            gauge = "millrace_ingest_broker_subscribed"
            wait_for(
                lambda: (
                    w1.counter(gauge, broker=to_b_cut.where) == 0
                    and w1.counter(gauge, broker=to_a.where) == 1
                ),
                "the per-broker metric to show which broker worker 1 lost",
            )
            during = {id(x): receipted(x) for x in agents}
            stored = w1.counter("millrace_ingest_messages_total", kind="data", outcome="stored")
            wait_for(
                lambda: all(receipted(x) > during[id(x)] + 2 for x in agents),
                "every gateway receipted while worker 1 is cut off from b",
            )
            wait_for(
                lambda: (
                    w1.counter("millrace_ingest_messages_total", kind="data", outcome="stored")
                    > stored
                ),
                "worker 1 to keep storing what a carries",
            )
            assert to_a.connected and all(on(x, b) for x in on_b), "only the worker was cut off"

            ip("link", "set", worker_if, "up")
            healed_at = time.monotonic()
            wait_for(lambda: to_b_cut.connected, "worker 1 back on b")
            rejoined_s = time.monotonic() - healed_at
            print(
                f"\npartition: worker 1 noticed after {noticed_s:.2f} s (keepalive 5 s),"
                f" back on b {rejoined_s:.2f} s after the heal"
            )
            checked = settle_and_check_exactly_once(ingest_db.owner_dsn, agents)
    finally:
        b.stop()
        to_b.close()
        cut_path.close()
    print(f"reconciled {checked} batches: 0 lost, 0 doubled")
