#!/usr/bin/env python3
"""Benchmark: CPU share of one core used by a fleet of simulated gateways at 1 Hz per signal.

Starts a plain mosquitto and `python -m millrace.fieldsim` (200 gateways: PLC + MQTT
node + 1-wire sensor each, ground truth on) as subprocesses, polls every PLC
once a second per register table like an edge agent would, subscribes to the
nodes, and measures the simulator's CPU time over the window from /proc via
psutil. The load generator and broker run in other processes and are not
counted. Ends with one `name=value` line; target: under half a core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import psutil

REPO = Path(__file__).resolve().parents[1]
TARGET_SHARE_OF_CORE = 0.5
WARMUP_SECONDS = 5.0
# (function code, first address, count) per poll: the three tables of the PLC map.
POLLS = ((3, 0, 8), (4, 0, 12), (1, 0, 1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_range(count: int) -> int:
    for _ in range(50):
        base = free_port()
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range")


class Poller:
    """Reads every PLC's tables once per second over one connection each."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.ok = 0
        self.failed = 0
        self.counting = False

    async def _one(self, index: int, port: int, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        tid = 0
        # Spread the PLCs over the second, as independent edge agents would be.
        phase = index / len(self.ports)
        while not stop.is_set():
            now = time.time()
            await asyncio.sleep((int(now) + 1 + phase) - now)
            for function, address, count in POLLS:
                tid = (tid + 1) & 0xFFFF
                writer.write(struct.pack(">HHHBBHH", tid, 0, 6, 1, function, address, count))
                header = await reader.readexactly(7)
                body = await reader.readexactly(struct.unpack(">H", header[4:6])[0] - 1)
                if self.counting:
                    if body[0] == function:
                        self.ok += 1
                    else:
                        self.failed += 1
        writer.close()

    def run(self, stop_flag: threading.Event) -> None:
        async def main() -> None:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(self._one(i, p, stop)) for i, p in enumerate(self.ports)]
            while not stop_flag.is_set():
                await asyncio.sleep(0.2)
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(main())


def wait_manifest(path: Path, proc: subprocess.Popen[bytes]) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"fleet exited with {proc.returncode}")
        if path.exists():
            data = json.loads(path.read_text())
            if data["status"] == "running":
                return data
        time.sleep(0.2)
    raise SystemExit("fleet did not start")


def gt_rows_by_kind(path: Path) -> dict[str, int]:
    counts = {"plc": 0, "node": 0, "w1": 0}
    with path.open() as handle:
        next(handle)
        for line in handle:
            device = line.split(",", 2)[1]
            counts[device.rsplit("-", 1)[1]] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    mqtt_port = free_port()
    base_port = free_range(args.devices)
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    (workdir / "mosquitto.conf").write_text(
        f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "log_type error\nmax_queued_messages 1000\n"
    )
    broker = subprocess.Popen(
        [mosquitto, "-c", str(workdir / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    manifest_path, gt_path = workdir / "manifest.json", workdir / "gt.csv"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'firmware-sim'}:{REPO}"}
    fleet = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fieldsim",
            "--log-level",
            "WARNING",
            "--devices",
            str(args.devices),
            "--base-port",
            str(base_port),
            "--mqtt-port",
            str(mqtt_port),
            "--w1-dir",
            str(workdir / "w1"),
            "--manifest",
            str(manifest_path),
            "--ground-truth",
            str(gt_path),
        ],
        env=env,
    )
    received = 0
    stop_flag = threading.Event()
    try:
        manifest = wait_manifest(manifest_path, fleet)
        ports = [d["port"] for d in manifest["devices"] if d["kind"] == "plc"]
        counting = threading.Event()

        def on_message(_c: object, _u: object, _m: object) -> None:
            nonlocal received
            if counting.is_set():
                received += 1

        sub = paho.Client(paho.CallbackAPIVersion.VERSION2)
        sub.on_message = on_message
        sub.connect("127.0.0.1", mqtt_port)
        sub.subscribe("fieldsim/+/sensor")
        sub.loop_start()
        poller = Poller(ports)
        thread = threading.Thread(target=poller.run, args=(stop_flag,), daemon=True)
        thread.start()
        time.sleep(WARMUP_SECONDS)

        proc = psutil.Process(fleet.pid)
        gt_before = gt_rows_by_kind(gt_path)
        cpu_before = proc.cpu_times()
        wall_before = time.monotonic()
        poller.counting = True
        counting.set()
        time.sleep(args.seconds)
        cpu_after = proc.cpu_times()
        wall = time.monotonic() - wall_before
        counting.clear()
        poller.counting = False
        rss_mb = proc.memory_info().rss / 1e6
        gt_after = gt_rows_by_kind(gt_path)
        sub.loop_stop()
        sub.disconnect()
    finally:
        stop_flag.set()
        fleet.terminate()
        fleet.wait(30)
        broker.terminate()
        broker.wait(10)

    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    share = cpu / wall
    signals_per_gateway = 12 + 3 + 1
    rows = [
        ("gateways (PLC + MQTT node + 1-wire)", f"{args.devices}"),
        ("signals served per second (target)", f"{args.devices * signals_per_gateway}"),
        ("window (s)", f"{wall:.1f}"),
        ("simulator CPU (s)", f"{cpu:.2f}"),
        ("simulator CPU share of one core", f"{share:.3f}"),
        ("simulator RSS (MB)", f"{rss_mb:.0f}"),
        ("Modbus reads answered / s", f"{poller.ok / wall:.0f} (failed {poller.failed})"),
        ("MQTT messages received / s", f"{received / wall:.0f}"),
        ("ground truth rows / s  plc", f"{(gt_after['plc'] - gt_before['plc']) / wall:.0f}"),
        ("ground truth rows / s  node", f"{(gt_after['node'] - gt_before['node']) / wall:.0f}"),
        ("ground truth rows / s  w1", f"{(gt_after['w1'] - gt_before['w1']) / wall:.0f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'metric'.ljust(width)}  value")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    print(
        f"sim_devices={args.devices} cpu_share_of_core={share:.3f} target={TARGET_SHARE_OF_CORE} "
        f"modbus_reads_per_s={poller.ok / wall:.0f} mqtt_msgs_per_s={received / wall:.0f} "
        f"rss_mb={rss_mb:.0f}"
    )
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if share < TARGET_SHARE_OF_CORE else 1


if __name__ == "__main__":
    sys.exit(main())
