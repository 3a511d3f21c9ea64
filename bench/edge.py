"""Edge agent benchmark: hot-path throughput on one core, and cost at 1,000 readings/s.

1. Hot path: the real `Agent` objects (pipeline -> windows -> batches -> SQLite outbox ->
   publisher -> TLS mosquitto -> a receipter -> receipt -> outbox delete), with this
   process pinned to one CPU and mosquitto and the receipter to the other. Readings are fed
   by a loop calling `agent.pipeline.reading()` (what a driver thread does) with synthetic
   timestamps that advance one window per 10,000 readings; every synthetic window end triggers
   `agent.flush_to_outbox()`. The clock stops when the last batch is receipted (the outbox
   is empty). Drivers (network reads) are not part of the hot path.
2. Steady state: `millrace edge run` as its own process with 100 sim signals polled every
   0.1 s (1,000 readings/s), 10 s windows, TLS to the same broker, for 60 s after a 5 s
   warm-up. CPU share from /proc (psutil), peak RSS from VmHWM; the receipter counts the
   readings that arrived in windows.

3. Modbus RTU polling cost: the real driver (one poller thread for the bus, pipeline as the
   sink) reading 10 slaves x 50 float32 values once a second (500 signals/s, one request per
   slave) over a pseudo-terminal from fieldsim's RTU slave in a child process. The figure is
   the poller thread's own CPU time (its per-thread clock) over the wall time: the share of a
   core the RTU driver costs. A pty has no wire time; on a real 115200 baud line each
   transaction also spends ~10 ms on the wire (waiting, not CPU).
4. OPC UA polling cost: the real OPC UA driver (its one thread, asyncio loop and session,
   pipeline as the sink) polling 500 signals once a second (one Read request of 500 nodes,
   spread over the simulated PLC's variables) from fieldsim's OPC UA server in a child
   process, over loopback with Basic256Sha256 SignAndEncrypt. The figure is that thread's
   own CPU time over the wall time, as for RTU.

The receipter stands in for the cloud: a service-certificate paho subscriber in its own
process (pinned with mosquitto) that decodes every batch and publishes a `Receipt` for it
at once, as an ingest worker does after its commit (tests/edge/agent_helpers.py Collector
does the same). A batch leaves the outbox only on a receipt (docs/guarantees.md), so
without it the agent resends forever. It is not the real `millrace ingest` + TimescaleDB
on purpose: this measures the agent, and a database commit on the same two cores would
measure the database instead (bench/ingest.py, latency.py and drain.py do the whole path).

Run: .venv/bin/python bench/edge.py [--seconds 60] [--readings 2000000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from millrace.edge.agent import Agent
from millrace.edge.config import load_config
from millrace.mqtt import tls_client
from millrace.ops import pki
from millrace.ops.broker import write_broker_config
from millrace.topics import data_topic, receipt_topic
from millrace.wire import Batch, Receipt, decode_batch

TARGET_READINGS_PER_S = 100_000
TARGET_CPU_PERCENT = 3.0
TARGET_RSS_MB = 60.0
HOT_METRICS = 500
READINGS_PER_WINDOW = 10_000  # 20 per metric per 1 s window
STEADY_SIGNALS = 100
STEADY_POLL_S = 0.1
WARMUP_S = 5.0
BASE_MS = 1_699_999_980_000
HOT_DEVICE = "bench-hot"
STEADY_DEVICE = "bench-steady"
SERVICE_ID = "bench-svc"
RECEIPTER_READY_TIMEOUT_S = 15.0
# The hot path's outbox must be empty by then, or the run fails instead of resending forever.
HOT_DRAIN_TIMEOUT_S = 120.0
RTU_UNITS = 10
RTU_VALUES_PER_UNIT = 50
RTU_POLL_S = 1.0
RTU_MAX_SECONDS = 20.0
OPCUA_SIGNALS = 500
OPCUA_POLL_S = 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    """A TLS mosquitto with the project's config, pinned to the last CPU."""

    def __init__(self, workdir: Path) -> None:
        self.pki_dir = workdir / "pki"
        pki.init_pki(self.pki_dir)
        for device in (HOT_DEVICE, STEADY_DEVICE):
            pki.issue(self.pki_dir, device)
        # Issued before the config is written, so the dynsec roles list it: no sync needed.
        pki.issue(self.pki_dir, SERVICE_ID, role="service")
        self.port = free_port()
        files = write_broker_config(
            self.pki_dir, workdir / "broker", port=self.port, bind_address="127.0.0.1"
        )
        binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
        assert binary, "mosquitto is not installed"
        self.proc = subprocess.Popen(
            [binary, "-c", str(files.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(self.proc.pid, {cpus[-1]})
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not start"
                time.sleep(0.05)
        self.paths = pki.pki_paths(self.pki_dir)

    def files(self, ident: str) -> tuple[Path, Path]:
        return self.paths.cert_for(ident), self.paths.key_for(ident)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Receipter:
    """Stands in for the cloud: receipts every batch of both bench devices at once.

    Its own process, pinned with mosquitto, so its decoding and publishing take neither
    the hot path's core nor its GIL. Counts the steady device's readings and windows.
    """

    def __init__(self, broker: Broker) -> None:
        ctx = multiprocessing.get_context("fork")  # before any thread of ours exists
        self.ready = ctx.Event()
        self.stop_event = ctx.Event()
        # receipts sent, steady readings, steady windows
        self.counts = ctx.Array("q", 3)
        self.proc = ctx.Process(target=self._run, args=(broker,), name="receipter", daemon=True)
        self.proc.start()
        assert self.proc.pid is not None
        os.sched_setaffinity(self.proc.pid, {sorted(os.sched_getaffinity(0))[-1]})
        if not self.ready.wait(RECEIPTER_READY_TIMEOUT_S):
            self.proc.kill()
            raise RuntimeError("receipter did not subscribe; is the broker up and the cert valid?")

    def _run(self, broker: Broker) -> None:
        counts = self.counts

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            props = msg.properties
            ctype = getattr(props, "ContentType", None) if props else None
            batch = decode_batch(bytes(msg.payload), content_type=ctype)
            if not isinstance(batch, Batch):
                return
            receipt = Receipt(batch.device, batch.boot_id, -1, ((batch.seq, batch.seq),))
            client.publish(receipt_topic(batch.device), receipt.to_json(), qos=1)
            with counts.get_lock():
                counts[0] += 1
                if batch.device == STEADY_DEVICE:
                    counts[1] += sum(w.count for w in batch.windows)
                    counts[2] += len(batch.windows)

        cert, key = broker.files(SERVICE_ID)
        # The broker takes the client id from the certificate: it must be the CN.
        sub = tls_client(SERVICE_ID, ca=broker.paths.ca_cert, cert=cert, key=key)
        sub.on_message = on_message
        sub.on_subscribe = lambda *args: self.ready.set()
        sub.connect("localhost", broker.port)
        sub.loop_start()
        sub.subscribe([(data_topic(HOT_DEVICE), 1), (data_topic(STEADY_DEVICE), 1)])
        self.stop_event.wait()
        sub.loop_stop()
        sub.disconnect()

    @property
    def receipts(self) -> int:
        return int(self.counts[0])

    @property
    def steady(self) -> tuple[int, int]:
        """(readings, windows) of the steady device received so far."""
        with self.counts.get_lock():
            return int(self.counts[1]), int(self.counts[2])

    def stop(self) -> None:
        self.stop_event.set()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def write_config(path: Path, broker: Broker, *, device: str, signals: str, period_s: int) -> Path:
    cert, key = broker.files(device)
    path.write_text(
        f"""
device_id = "{device}"
[broker]
host = "localhost"
port = {broker.port}
ca = "{broker.paths.ca_cert}"
cert = "{cert}"
key = "{key}"
max_inflight = 20
[windows]
period_s = {period_s}
grace_s = 0.5
[outbox]
path = "{path.parent / "outbox.sqlite"}"
[heartbeat]
interval_s = 30
[state]
dir = "{path.parent / "state"}"
{signals}
"""
    )
    return path


def sim_signals(count: int, poll_s: float) -> str:
    return "".join(
        f'\n[[signals]]\nmetric = "bench.m{i:04d}"\ndriver = "sim"\npoll_s = {poll_s}\n'
        f"seed = {i}\nnoise = 0.5\ncenter = 20\namplitude = 5\n"
        for i in range(count)
    )


def hot_path(broker: Broker, workdir: Path, total_readings: int) -> dict[str, float]:
    """Readings/s through aggregate + outbox + publish on one core."""
    workdir.mkdir()
    config = load_config(
        write_config(
            workdir / "edge.toml",
            broker,
            device=HOT_DEVICE,
            signals=sim_signals(HOT_METRICS, 1.0),
            period_s=1,
        )
    )
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    agent = Agent(config)
    agent.publisher.start()
    deadline = time.monotonic() + 10
    while not agent.publisher.connected:
        assert time.monotonic() < deadline, "no broker connection"
        time.sleep(0.05)
    values = [20.0 + (i % 97) * 0.01 for i in range(READINGS_PER_WINDOW)]
    slots = [i % HOT_METRICS for i in range(READINGS_PER_WINDOW)]
    offsets = [i * 1000 // READINGS_PER_WINDOW for i in range(READINGS_PER_WINDOW)]
    windows = total_readings // READINGS_PER_WINDOW
    reading = agent.pipeline.reading
    cpu0, t0 = os.times(), time.perf_counter()
    batches = 0
    for w in range(windows):
        start = BASE_MS + w * 1000
        for slot, offset, value in zip(slots, offsets, values, strict=True):
            reading(slot, start + offset, value)
        # Window w ends at start + 1000; with 0.5 s grace it is due at start + 1500.
        batches += agent.flush_to_outbox(wall_ms=start + 1000 + 500)
    batches += agent.flush_to_outbox(close_all=True, wall_ms=BASE_MS + windows * 1000 + 600)
    drain_deadline = time.monotonic() + HOT_DRAIN_TIMEOUT_S
    while agent.outbox.stats().batches:
        if time.monotonic() > drain_deadline:
            raise RuntimeError(
                f"{agent.outbox.stats().batches} batches not receipted after"
                f" {HOT_DRAIN_TIMEOUT_S:.0f} s; is the receipter running?"
            )
        time.sleep(0.001)
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    agent.publisher.shutdown(timeout_s=2)
    # After shutdown: the publish loop counts a PUBACK on its next turn, which may come
    # after the receipt that emptied the outbox.
    acked = agent.publisher.stats.acked
    receipted = agent.publisher.stats.receipted
    agent.outbox.close()
    agent.release()
    os.sched_setaffinity(0, set(cpus))
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "readings": windows * READINGS_PER_WINDOW,
        "seconds": elapsed,
        "readings_per_s": windows * READINGS_PER_WINDOW / elapsed,
        "batches": batches,
        "acked": acked,
        "receipted": receipted,
        "cpu_share": cpu / elapsed,
    }


def _vm_hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def steady_state(
    broker: Broker, receipter: Receipter, workdir: Path, seconds: float
) -> dict[str, float]:
    """CPU share and peak RSS of `millrace edge run` at 1,000 readings/s."""
    import psutil

    workdir.mkdir()
    config = write_config(
        workdir / "edge.toml",
        broker,
        device=STEADY_DEVICE,
        signals=sim_signals(STEADY_SIGNALS, STEADY_POLL_S),
        period_s=10,
    )
    millrace = Path(sys.executable).with_name("millrace")
    proc = subprocess.Popen(
        [str(millrace), "--log-level", "WARNING", "edge", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
    )
    try:
        agent = psutil.Process(proc.pid)
        time.sleep(WARMUP_S)
        cpu0, t0 = agent.cpu_times(), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = agent.cpu_times(), time.monotonic()
        peak = _vm_hwm_bytes(proc.pid)
        rss_now = agent.memory_info().rss
    finally:
        proc.terminate()
        proc.wait(30)
        time.sleep(0.5)
    readings, windows = receipter.steady
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "seconds": t1 - t0,
        "cpu_percent": 100 * cpu / (t1 - t0),
        "peak_rss_mb": peak / 2**20,
        "rss_mb": rss_now / 2**20,
        "readings_delivered": readings,
        "windows_delivered": windows,
        "exit_code": proc.returncode,
    }


def _rtu_slave(conn: Any) -> None:
    """Child process: an RTU bus of RTU_UNITS register banks; sends its pty path, serves."""
    import struct as _struct

    from millrace.fieldsim.rtu import RegisterBank, RtuBus

    bus = RtuBus(name="bench")
    for unit in range(1, RTU_UNITS + 1):
        words = _struct.unpack(
            f">{2 * RTU_VALUES_PER_UNIT}H",
            _struct.pack(
                f">{RTU_VALUES_PER_UNIT}f", *(unit + i / 8 for i in range(RTU_VALUES_PER_UNIT))
            ),
        )
        bus.attach(unit, RegisterBank(holding=dict(enumerate(words))))
    with bus:
        conn.send(bus.path)
        conn.recv()  # until the parent is done


def rtu_polling(seconds: float) -> dict[str, float]:
    """CPU share of one core of the Modbus RTU poller thread at 500 signals/s."""
    from millrace.edge.config import parse_config
    from millrace.edge.pipeline import Pipeline
    from millrace.edge.sampler import PollerThread, build_poll_groups

    parent, child = multiprocessing.Pipe()
    slave = multiprocessing.get_context("fork").Process(target=_rtu_slave, args=(child,))
    slave.start()
    try:
        path = parent.recv()
        signals = "".join(
            f'[[signals]]\nmetric = "u{u}_v{i}"\ndriver = "modbus_rtu"\nbus = "line"\n'
            f'unit_id = {u}\ntable = "holding"\naddress = {2 * i}\ntype = "float32"\n'
            f"poll_s = {RTU_POLL_S}\n"
            for u in range(1, RTU_UNITS + 1)
            for i in range(RTU_VALUES_PER_UNIT)
        )
        text = (
            'device_id = "bench-rtu"\n[broker]\nhost = "broker.bench.example"\n'
            'ca = "ca.crt"\ncert = "d.crt"\nkey = "d.key"\n[outbox]\npath = "o.sqlite"\n'
            f'[state]\ndir = "state"\n[modbus_rtu.line]\nport = "{path}"\nbaudrate = 115200\n'
            + signals
        )
        config = parse_config(text, base=Path("/tmp"), source="bench-rtu.toml")
        pipe = Pipeline(config.signals, periods_s=[10], grace_ms=2000)
        (name, groups), *others = build_poll_groups(config).items()
        assert not others, "one poller thread for the bus"
        thread = PollerThread(name, groups, pipe)
        thread.start()
        time.sleep(RTU_POLL_S)  # first poll done, port open
        assert thread.ident is not None
        clock = time.pthread_getcpuclockid(thread.ident)
        cpu0, errors0, t0 = time.clock_gettime(clock), sum(pipe.errors), time.monotonic()
        readings0 = pipe.readings_total
        time.sleep(seconds)
        cpu1, t1 = time.clock_gettime(clock), time.monotonic()
        readings = pipe.readings_total - readings0
        errors = sum(pipe.errors) - errors0
        thread.stopping.set()
        thread.join(10)
    finally:
        parent.send("stop")
        slave.join(10)
    return {
        "seconds": t1 - t0,
        "cpu_share": (cpu1 - cpu0) / (t1 - t0),
        "signals_per_s": readings / (t1 - t0),
        "errors": errors,
    }


def _opcua_server(conn: Any, pki_dir: str, port: int) -> None:
    """Child process: fieldsim's OPC UA PLC on 127.0.0.1:port; sends its endpoint, serves."""
    import asyncio

    from millrace.fieldsim.faults import DeviceFaults
    from millrace.fieldsim.feed import Feed
    from millrace.fieldsim.opcua import OpcUaPlc
    from millrace.fieldsim.specs import load_plc_map

    pki_path = Path(pki_dir)

    async def serve() -> None:
        plc = OpcUaPlc(
            device_id="bench-opc",
            gateway="bench",
            host="127.0.0.1",
            port=port,
            plc_map=load_plc_map(),
            feed=Feed(seed=1),
            faults=DeviceFaults.pin([], device="bench-opc", gateway="bench", started_at=0.0),
            cert=pki_path / "server.crt",
            key=pki_path / "server.key",
            trusted_clients=(pki_path / "client.crt",),
        )
        await plc.start()
        conn.send([plc.node_id(s.spec.name) for s in plc.plc_map.signals if s.type != "bool"])
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await plc.stop()

    asyncio.run(serve())


def opcua_polling(seconds: float, work: Path) -> dict[str, float]:
    """CPU share of one core of the OPC UA driver's thread polling 500 signals/s."""
    from millrace.edge.config import parse_config
    from millrace.edge.drivers.opcua import OpcUaSource
    from millrace.edge.pipeline import Pipeline
    from millrace.fieldsim.opcua import APPLICATION_URI, make_app_certificate

    pki_dir = work / "opcua-pki"
    pki_dir.mkdir()
    make_app_certificate(
        pki_dir / "server.crt", pki_dir / "server.key", common_name="sim", uri=APPLICATION_URI
    )
    make_app_certificate(
        pki_dir / "client.crt", pki_dir / "client.key", common_name="bench", uri="urn:bench"
    )
    port = free_port()
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("fork").Process(
        target=_opcua_server, args=(child, str(pki_dir), port)
    )
    server.start()
    try:
        nodes = parent.recv()
        signals = "".join(
            f'[[signals]]\nmetric = "v{i}"\ndriver = "opcua"\nserver = "plc"\n'
            f'node = "{nodes[i % len(nodes)]}"\npoll_s = {OPCUA_POLL_S}\n'
            for i in range(OPCUA_SIGNALS)
        )
        text = (
            'device_id = "bench-opcua"\n[broker]\nhost = "broker.bench.example"\n'
            'ca = "ca.crt"\ncert = "d.crt"\nkey = "d.key"\n[outbox]\npath = "o.sqlite"\n'
            f'[state]\ndir = "state"\n[opcua.plc]\nendpoint = "opc.tcp://127.0.0.1:{port}/millrace"\n'
            f'cert = "{pki_dir}/client.crt"\nkey = "{pki_dir}/client.key"\n'
            f'server_cert = "{pki_dir}/server.crt"\n' + signals
        )
        config = parse_config(text, base=Path("/tmp"), source="bench-opcua.toml")
        pipe = Pipeline(config.signals, periods_s=[10], grace_ms=2000)
        source = OpcUaSource(
            config.opcua["plc"], list(enumerate(config.signals)), device_id="bench", sink=pipe
        )
        source.start()
        deadline = time.monotonic() + 30
        while pipe.readings_total < OPCUA_SIGNALS and time.monotonic() < deadline:
            time.sleep(0.1)  # session open, first poll done
        assert source._thread is not None and source._thread.ident is not None
        clock = time.pthread_getcpuclockid(source._thread.ident)
        cpu0, errors0, t0 = time.clock_gettime(clock), sum(pipe.errors), time.monotonic()
        readings0 = pipe.readings_total
        time.sleep(seconds)
        cpu1, t1 = time.clock_gettime(clock), time.monotonic()
        readings = pipe.readings_total - readings0
        errors = sum(pipe.errors) - errors0
        source.stop()
    finally:
        parent.send("stop")
        server.join(15)
        if server.is_alive():
            server.kill()
    return {
        "seconds": t1 - t0,
        "cpu_share": (cpu1 - cpu0) / (t1 - t0),
        "signals_per_s": readings / (t1 - t0),
        "errors": errors,
    }


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="steady-state window")
    parser.add_argument("--readings", type=int, default=2_000_000, help="hot-path readings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="millrace-bench-edge-") as tmp:
        work = Path(tmp)
        broker = Broker(work)
        try:
            receipter = Receipter(broker)
            try:
                hot = hot_path(broker, work / "hot", args.readings)
                steady = steady_state(broker, receipter, work / "steady", args.seconds)
                rtu = rtu_polling(max(2.0, min(RTU_MAX_SECONDS, args.seconds)))
                opcua = opcua_polling(max(2.0, min(RTU_MAX_SECONDS, args.seconds)), work)
                receipts = receipter.receipts
            finally:
                receipter.stop()
        finally:
            broker.stop()
    expected = STEADY_SIGNALS / STEADY_POLL_S * steady["seconds"]
    rows = [
        ("hot path readings", f"{hot['readings']:,.0f}", f"{HOT_METRICS} metrics, 1 s windows"),
        (
            "hot path batches written / acked / receipted",
            f"{hot['batches']:.0f} / {hot['acked']:.0f} / {hot['receipted']:.0f}",
            "acked > written means resends",
        ),
        ("hot path wall time", f"{hot['seconds']:.2f} s", "until the last receipt"),
        (
            "hot path readings/s (one core)",
            f"{hot['readings_per_s']:,.0f}",
            f"target >= {TARGET_READINGS_PER_S:,}",
        ),
        ("hot path CPU share of its core", f"{hot['cpu_share']:.2f}", ""),
        ("agent at 1,000 readings/s: window", f"{steady['seconds']:.1f} s", ""),
        (
            "agent CPU share of one core",
            f"{steady['cpu_percent']:.2f} %",
            f"target <= {TARGET_CPU_PERCENT} %",
        ),
        (
            "agent peak RSS (VmHWM)",
            f"{steady['peak_rss_mb']:.1f} MB",
            f"target <= {TARGET_RSS_MB} MB",
        ),
        (
            "readings delivered in windows",
            f"{steady['readings_delivered']:,.0f}",
            f"~{expected:,.0f} sampled in the window (+ warm-up)",
        ),
        ("receipts sent (both phases)", f"{receipts:,}", "one per batch received"),
        (
            "Modbus RTU poller: signals/s read",
            f"{rtu['signals_per_s']:,.0f}",
            f"{RTU_UNITS} slaves x {RTU_VALUES_PER_UNIT} float32, {rtu['errors']:.0f} errors",
        ),
        (
            "Modbus RTU poller CPU share of one core",
            f"{100 * rtu['cpu_share']:.2f} %",
            f"{rtu['seconds']:.0f} s, pty (no wire time)",
        ),
        (
            "OPC UA poller: signals/s read",
            f"{opcua['signals_per_s']:,.0f}",
            f"{OPCUA_SIGNALS} nodes in one Read a second, {opcua['errors']:.0f} errors",
        ),
        (
            "OPC UA driver thread CPU share of one core",
            f"{100 * opcua['cpu_share']:.2f} %",
            f"{opcua['seconds']:.0f} s, Basic256Sha256 SignAndEncrypt, loopback",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"machine: {machine()}")
    print(f"{'metric':<{width}}  {'value':>{vwidth}}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>{vwidth}}  {note}")
    print(
        f"edge_hot_path_readings_per_s={hot['readings_per_s']:.0f}"
        f" edge_hot_path_vs_target={hot['readings_per_s'] / TARGET_READINGS_PER_S:.2f}"
        f" edge_cpu_percent_at_1k={steady['cpu_percent']:.2f}"
        f" edge_cpu_vs_target={steady['cpu_percent'] / TARGET_CPU_PERCENT:.2f}"
        f" edge_peak_rss_mb={steady['peak_rss_mb']:.1f}"
        f" edge_rss_vs_target={steady['peak_rss_mb'] / TARGET_RSS_MB:.2f}"
        f" edge_rtu_cpu_percent_at_500={100 * rtu['cpu_share']:.2f}"
        f" edge_opcua_cpu_percent_at_500={100 * opcua['cpu_share']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
