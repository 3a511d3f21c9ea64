"""Edge agent benchmark: hot-path throughput on one core, and cost at 1,000 readings/s.

1. Hot path: the real `Agent` objects (pipeline -> windows -> batches -> SQLite outbox ->
   publisher -> TLS mosquitto -> PUBACK -> outbox delete), with this process pinned to one
   CPU and mosquitto to the other. Readings are fed by a loop calling
   `agent.pipeline.reading()` (what a driver thread does) with synthetic timestamps that
   advance one window per 10,000 readings; every synthetic window end triggers
   `agent.flush_to_outbox()`. The clock stops when the last batch is acknowledged.
   Drivers (network reads) are not part of the hot path.
2. Steady state: `millrace edge run` as its own process with 100 sim signals polled every
   0.1 s (1,000 readings/s), 10 s windows, TLS to the same broker, for 60 s after a 5 s
   warm-up. CPU share from /proc (psutil), peak RSS from VmHWM; a service subscriber counts
   the readings that arrived in windows.

Run: .venv/bin/python bench/edge.py [--seconds 60] [--readings 2000000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from millrace.edge.agent import Agent
from millrace.edge.config import load_config
from millrace.mqtt import tls_client
from millrace.ops import pki
from millrace.ops.broker import write_broker_config
from millrace.topics import data_topic
from millrace.wire import Batch, decode_batch

TARGET_READINGS_PER_S = 100_000
TARGET_CPU_PERCENT = 3.0
TARGET_RSS_MB = 60.0
HOT_METRICS = 500
READINGS_PER_WINDOW = 10_000  # 20 per metric per 1 s window
STEADY_SIGNALS = 100
STEADY_POLL_S = 0.1
WARMUP_S = 5.0
BASE_MS = 1_699_999_980_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    """A TLS mosquitto with the project's config, pinned to the last CPU."""

    def __init__(self, workdir: Path) -> None:
        self.pki_dir = workdir / "pki"
        pki.init_pki(self.pki_dir)
        for device in ("bench-hot", "bench-steady"):
            pki.issue(self.pki_dir, device)
        pki.issue(self.pki_dir, "bench-svc", role="service")
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
            device="bench-hot",
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
    while agent.outbox.stats().batches:
        time.sleep(0.001)
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    acked = agent.publisher.stats.acked
    agent.publisher.shutdown(timeout_s=2)
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
        "cpu_share": cpu / elapsed,
    }


def _vm_hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def steady_state(broker: Broker, workdir: Path, seconds: float) -> dict[str, float]:
    """CPU share and peak RSS of `millrace edge run` at 1,000 readings/s."""
    import psutil

    workdir.mkdir()
    config = write_config(
        workdir / "edge.toml",
        broker,
        device="bench-steady",
        signals=sim_signals(STEADY_SIGNALS, STEADY_POLL_S),
        period_s=10,
    )
    counted = {"readings": 0, "windows": 0}
    lock = threading.Lock()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        batch = decode_batch(msg.payload)
        if isinstance(batch, Batch):
            with lock:
                counted["readings"] += sum(w.count for w in batch.windows)
                counted["windows"] += len(batch.windows)

    cert, key = broker.files("bench-svc")
    sub = tls_client("bench-sub", ca=broker.paths.ca_cert, cert=cert, key=key)
    sub.on_message = on_message
    sub.connect("localhost", broker.port)
    sub.loop_start()
    sub.subscribe(data_topic("bench-steady"), qos=1)
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
        sub.loop_stop()
        sub.disconnect()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "seconds": t1 - t0,
        "cpu_percent": 100 * cpu / (t1 - t0),
        "peak_rss_mb": peak / 2**20,
        "rss_mb": rss_now / 2**20,
        "readings_delivered": counted["readings"],
        "windows_delivered": counted["windows"],
        "exit_code": proc.returncode,
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
            hot = hot_path(broker, work / "hot", args.readings)
            steady = steady_state(broker, work / "steady", args.seconds)
        finally:
            broker.stop()
    expected = STEADY_SIGNALS / STEADY_POLL_S * steady["seconds"]
    rows = [
        ("hot path readings", f"{hot['readings']:,.0f}", f"{HOT_METRICS} metrics, 1 s windows"),
        ("hot path batches written / acked", f"{hot['batches']:.0f} / {hot['acked']:.0f}", ""),
        ("hot path wall time", f"{hot['seconds']:.2f} s", "until the last PUBACK"),
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
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
