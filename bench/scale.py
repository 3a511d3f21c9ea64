#!/usr/bin/env python3
"""Benchmark: how many gateways one box serves (one broker, one ingest worker, one TimescaleDB).

What runs (all real, all on this machine): mosquitto with the production configuration
(`millrace broker config`: TLS, client id from the certificate, dynamic security with one
role per gateway), one `millrace ingest` worker with its defaults (200 ms / 20,000 rows),
PostgreSQL + TimescaleDB with fsync on (bench/common.py's plant), and N simulated
gateways from bench/scale_gen.py: real MQTT v5 clients over mutual TLS, each with its
own certificate from the project's CA (cached, bench/scale_pki.py), each subscribed to
its command and receipt topics and publishing one QoS 1 batch of 50 windows every 10 s,
the fleet spread evenly over the period. N steps up (1,000, 2,500, 5,000, 10,000, ...)
and stops after the first step that does not hold.

Per step: connect N (the ramp), wait one period, then measure a steady interval:
- rows/s: windows of batches whose commit falls in the interval, per second;
- close -> commit: `pg_xact_commit_timestamp(xmin)` of the batch's ingest-ledger row
  minus its `sent_at`, which the gateway stamps when it closes and sends the batch
  (bench/latency.py's definition); p50/p99 over batches sent in the interval;
- close -> receipt: at the gateway, from writing the PUBLISH to reading the receipt
  that covers it (what an agent waits for before it deletes the batch);
- CPU (cores, from /proc/<pid>/stat deltas) and peak memory of broker, worker,
  database (all postgres processes) and generator (reported, not counted);
- exactly once: after the step every batch PUBACKed is in the ledger once and every
  window sent is one readings row with its own count (no lost or doubled window).
A step holds when every gateway connected, exactly-once held and p99 <= 2 s. The first
resource to saturate is the first to reach 90 %: a single-threaded process (mosquitto;
the worker, whose Python work holds one GIL) at 0.9 core, the database at 90 % of all
cores, the machine at 90 % (every process but the generator, which stands for gateways
that are elsewhere in a plant; other users of a shared box included, and reported as
"others"), memory at 90 % used, or p99 at the target. The cost per 1,000 gateways of
worker, broker and database (cores per stored rows, scaled) gives a linear projection of
where the first of them fills up (`scale_projected_devices`): an estimate, labelled so.

Ends with one line: max_devices=N (largest N that held) scale_break_at=... ...
Run: PYTHONPATH=. .venv/bin/python bench/scale.py [--steps 1000,2500,5000,10000,15000,20000]
     (or bench/run.py --only scale; not part of `make bench`: about 20 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import Plant, machine, percentile, postmaster_pid, print_table, wait_until
from scale_meter import Meter, loadavg
from scale_pki import cache_dir, ensure_pki, gateway_ids

from millrace.ops.stack import procs

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_STEPS = (1000, 2500, 5000, 10_000, 15_000, 20_000)
TARGET_P99_S = 2.0
SATURATED = 0.9
CPUS = os.cpu_count() or 1
SAMPLE_SECONDS = 2.0
# Give-up limits only (the machine is shared): nothing is judged by them.
READY_TIMEOUT_S = 900.0
DRAIN_TIMEOUT_S = 600.0
DONE_GRACE_S = 120.0
FD_HEADROOM = 4096
# Single-threaded processes saturate at one core; the database and machine at all cores.
CAPACITY = {"broker": 1.0, "worker": 1.0, "database": float(CPUS)}

_LATENCIES = """
SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - sent_at)
FROM ingest_ledger WHERE sent_at >= %s AND sent_at < %s
"""
_COMMITTED_WINDOWS = """
SELECT coalesce(sum(windows), 0) FROM ingest_ledger
WHERE received_at >= %s AND pg_xact_commit_timestamp(xmin) >= %s
  AND pg_xact_commit_timestamp(xmin) < %s
"""
_LEDGER_SINCE = "SELECT count(*) FROM ingest_ledger WHERE received_at >= %s"
_STORED = "SELECT count(*), coalesce(sum(count), 0) FROM readings WHERE ts >= %s AND ts < %s"


@dataclass
class ScalePlant(Plant):
    """bench/common.py's plant, with the gateway identities from the cached PKI."""

    cached_pki: Path = Path()
    broker_nofile: int = 0  # 0: the benchmark's own (raised) limit

    @property
    def pki_dir(self) -> Path:
        return self.cached_pki

    def spawn(self, name: str, argv: Sequence[str]) -> procs.Service:
        if name == "broker" and self.broker_nofile:
            # As a service manager would start it: prlimit sets the limit, then execs.
            argv = ["prlimit", f"--nofile={self.broker_nofile}", "--", *argv]
        return super().spawn(name, argv)

    def _identities(self) -> None:
        ensure_pki(self.cached_pki, len(self.devices))


@dataclass
class Step:
    """One step's measured figures (see the module docstring)."""

    gateways: int
    ramp_s: float = 0.0
    connected: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    offered_rows_per_s: float = 0.0
    rows_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    batches_measured: int = 0
    receipt_p50_ms: float = 0.0
    receipt_p99_ms: float = 0.0
    sent: int = 0
    acked: int = 0
    receipted: int = 0
    ledger: int = 0
    windows_sent: int = 0
    windows_stored: int = 0
    readings_sent: int = 0
    readings_stored: int = 0
    dead_letters: int = 0
    last_window_ms: int = 0
    cores: dict[str, float] = field(default_factory=dict)
    memory_mb: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0
    cpus: int = CPUS
    memory_used: float = 0.0
    loadavg: str = ""
    saturated: list[str] = field(default_factory=list)
    busiest: str = ""
    broke: str = ""

    @property
    def stack_cores(self) -> float:
        """Cores of what a deployment runs on this box: broker, worker, database."""
        return sum(self.cores.get(name, 0.0) for name in CAPACITY)

    @property
    def other_cores(self) -> float:
        """Cores busy with processes outside the benchmark (the box is shared)."""
        ours = self.stack_cores + self.cores.get("generator", 0.0)
        return max(0.0, self.machine_busy * self.cpus - ours)

    def cores_per_1k(self, name: str) -> float:
        """Cores `name` spends per 1,000 gateways, from the rows it actually stored."""
        per_1k_rows = self.offered_rows_per_s / self.gateways * 1000
        return self.cores.get(name, 0.0) * per_1k_rows / max(self.rows_per_s, 1e-9)

    def projected_devices(self) -> int:
        """Gateways at which the first of worker, broker (a core each) or stack (all cores) is full.

        Linear in the measured cost per gateway: an estimate, not a measurement.
        """
        worker, broker = self.cores_per_1k("worker"), self.cores_per_1k("broker")
        stack = worker + broker + self.cores_per_1k("database")
        return int(1000 * min(1 / max(worker, 1e-9), 1 / max(broker, 1e-9), self.cpus / stack))

    @property
    def exactly_once(self) -> bool:
        return (
            self.acked == self.sent == self.ledger
            and self.windows_stored == self.windows_sent
            and self.readings_stored == self.readings_sent
        )


class Generator:
    """One bench/scale_gen.py process and its JSON lines."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put({"event": "exit", "code": self.proc.wait()})

    def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        got = self.events.get(timeout=timeout_s)
        if got["event"] != event:
            raise RuntimeError(f"load generator: expected {event!r}, got {got}")
        return got

    def stop(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
        self.proc.wait()


def raise_fd_limit(gateways: int) -> int:
    """Room for every connection in the broker and generators (children inherit it).

    Returns how many gateways the limit allows: root may raise the hard limit only with
    CAP_SYS_RESOURCE (a container may lack it), so the hard limit can be what stops us.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = gateways + FD_HEADROOM
    if os.geteuid() == 0 and hard < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return gateways
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, want), hard), hard))
    return min(gateways, hard - FD_HEADROOM)


def ms(t: float) -> datetime:
    return datetime.fromtimestamp(t / 1000, UTC)


def run_step(stack: ScalePlant, args: argparse.Namespace, n: int, min_window_ms: int) -> Step:
    step = Step(gateways=n, offered_rows_per_s=n * args.windows / args.period_s)
    step_t0 = time.time()
    gens = [
        Generator(
            [
                sys.executable,
                str(BENCH_DIR / "scale_gen.py"),
                f"--pki={stack.cached_pki}",
                f"--port={stack.broker_port}",
                f"--gateways={n}",
                f"--procs={args.procs}",
                f"--index={i}",
                f"--period-s={args.period_s}",
                f"--windows={args.windows}",
                f"--min-window-ms={min_window_ms}",
                *(["--burst"] if args.burst else []),
            ]
        )
        for i in range(args.procs)
    ]
    try:
        for gen in gens:
            ready = gen.expect("ready", READY_TIMEOUT_S)
            step.connected += ready["connected"]
            for why, count in ready["failed"].items():
                step.failed[why] = step.failed.get(why, 0) + count
        step.ramp_s = time.time() - step_t0
        # One whole period on the complete fleet before measuring.
        time.sleep(args.period_s)
        steady_from = time.time()
        meter = Meter(
            {
                "broker": [s.pid for s in stack.services if s.name == "broker"],
                "worker": [s.pid for s in stack.services if s.name == "ingest"],
                "database": [postmaster_pid(stack.cluster)],  # type: ignore[arg-type]
                "generator": [g.proc.pid for g in gens],
            }
        )
        load_before = loadavg()
        steady_to = steady_from + args.steady_s
        while time.time() < steady_to:
            time.sleep(min(SAMPLE_SECONDS, max(0.0, steady_to - time.time())))
            meter.sample()
        use, step.machine_busy = meter.stop()
        step.loadavg = f"{load_before}-{loadavg()}"
        step.memory_used = 1.0 - meter.min_available
        step.cores = {name: round(u.cores, 3) for name, u in use.items()}
        step.memory_mb = {name: round(u.peak_mb, 1) for name, u in use.items()}
        for gen in gens:
            gen.stop()
        done = [gen.expect("done", args.settle_s + DONE_GRACE_S) for gen in gens]
    finally:
        for gen in gens:
            gen.kill()
    latency: list[tuple[int, int]] = []
    first_window, last_window = None, None
    for d in done:
        step.sent += d["sent"]
        step.acked += d["acked"]
        step.receipted += d["receipted"]
        step.windows_sent += d["sent_windows"]
        step.readings_sent += d["sent_windows"] * d["count_per_window"]
        for why, count in d["lost"].items():
            step.lost[why] = step.lost.get(why, 0) + count
        latency += d["receipt_latency"]
        if d["first_window_ms"] is not None:
            first_window = min(first_window or d["first_window_ms"], d["first_window_ms"])
            last_window = max(last_window or d["last_window_ms"], d["last_window_ms"])
    since = datetime.fromtimestamp(step_t0, UTC)

    def drained() -> bool:
        step.ledger = int(stack.query(_LEDGER_SINCE, (since,))[0][0])
        return step.ledger >= step.acked

    with contextlib.suppress(RuntimeError):  # judged below: a short ledger breaks the step
        wait_until(drained, timeout_s=DRAIN_TIMEOUT_S, what="the worker to store every batch")
    window = (datetime.fromtimestamp(steady_from, UTC), datetime.fromtimestamp(steady_to, UTC))
    close = [float(r[0]) for r in stack.query(_LATENCIES, window)]
    step.batches_measured = len(close)
    step.p50_ms = percentile(close, 50) * 1000
    step.p99_ms = percentile(close, 99) * 1000
    committed = stack.query(_COMMITTED_WINDOWS, (since, *window))[0][0]
    step.rows_per_s = float(committed) / args.steady_s
    steady = [lat for sent_ms, lat in latency if steady_from * 1000 <= sent_ms < steady_to * 1000]
    step.receipt_p50_ms = percentile(steady, 50)
    step.receipt_p99_ms = percentile(steady, 99)
    if first_window is not None and last_window is not None:
        step.last_window_ms = last_window
        bounds = (ms(first_window), ms(last_window + args.period_s * 1000))
        stored, readings = stack.query(_STORED, bounds)[0]
        step.windows_stored, step.readings_stored = int(stored), int(readings)
    step.dead_letters = int(stack.query("SELECT count(*) FROM dead_letters")[0][0])
    judge(step)
    return step


def judge(step: Step) -> None:
    """Which resources reached 90 %, the busiest one, and why the step broke (if it did)."""
    use = {name: step.cores.get(name, 0.0) / cap for name, cap in CAPACITY.items()}
    # The machine's cores without the generator (gateways are elsewhere in a plant), but
    # with any other process: on a shared box they take the stack's CPU too.
    use["machine"] = max(0.0, step.machine_busy - step.cores.get("generator", 0.0) / CPUS)
    use["memory"] = step.memory_used
    use["latency"] = step.p99_ms / (TARGET_P99_S * 1000)
    step.busiest = max(use, key=lambda k: use[k])
    step.saturated = sorted((k for k, v in use.items() if v >= SATURATED), key=lambda k: -use[k])
    if step.failed or step.lost:
        kinds = "/".join(sorted({k.split(":")[0] for k in [*step.failed, *step.lost]}))
        step.broke = (
            f"connections:{sum(step.failed.values())}_refused,"
            f"{sum(step.lost.values())}_dropped_of_{step.gateways}({kinds})"
        )
    elif not step.exactly_once or step.dead_letters:
        step.broke = (
            f"exactly_once:acked{step.acked}/sent{step.sent}/ledger{step.ledger}"
            f"/windows{step.windows_stored}of{step.windows_sent}/dead{step.dead_letters}"
        )
    elif step.p99_ms > TARGET_P99_S * 1000:
        step.broke = f"p99_{step.p99_ms / 1000:.1f}s>{TARGET_P99_S:g}s"


def show(steps: list[Step]) -> None:
    print()
    print(
        "| gateways | ramp s | rows/s (offered) | commit p50/p99 ms | receipt p50/p99 ms"
        " | cores broker/worker/db/gen | MB broker/worker/db/gen | machine busy | load | busiest |"
        " exactly once | verdict |"
    )
    print("|---" * 12 + "|")
    for s in steps:
        c, m = s.cores, s.memory_mb
        up = s.connected - sum(s.lost.values())
        connected = f" ({up:,} connected)" if up != s.gateways else ""
        print(
            f"| {s.gateways:,}{connected} | {s.ramp_s:.0f}"
            f" | {s.rows_per_s:,.0f} ({s.offered_rows_per_s:,.0f})"
            f" | {s.p50_ms:,.0f} / {s.p99_ms:,.0f}"
            f" | {s.receipt_p50_ms:,.0f} / {s.receipt_p99_ms:,.0f}"
            f" | {c.get('broker', 0):.2f} / {c.get('worker', 0):.2f} / {c.get('database', 0):.2f}"
            f" / {c.get('generator', 0):.2f}"
            f" | {m.get('broker', 0):.0f} / {m.get('worker', 0):.0f} / {m.get('database', 0):.0f}"
            f" / {m.get('generator', 0):.0f}"
            f" | {s.machine_busy:.0%} ({s.other_cores:.2f} others) | {s.loadavg} | {s.busiest}"
            f" | {s.ledger}/{s.sent} batches, {s.windows_stored}/{s.windows_sent} windows"
            f" | {s.broke or 'held'} |"
        )
    sys.stdout.flush()


def result_line(steps: list[Step]) -> str:
    held = [s for s in steps if not s.broke]
    broke = next((s for s in steps if s.broke), None)
    best = held[-1] if held else None
    first_saturated = next((f"{s.saturated[0]}@{s.gateways}" for s in steps if s.saturated), None)
    if first_saturated is None and steps:
        last = steps[-1]
        first_saturated = f"none(busiest:{last.busiest}@{last.gateways})"
    basis = best or steps[0]
    pairs = {
        "max_devices": best.gateways if best else 0,
        "scale_break_at": broke.gateways if broke else f"none_up_to_{steps[-1].gateways}",
        "scale_break_reason": broke.broke if broke else "none",
        "scale_first_saturated": first_saturated,
        "scale_rows_per_s_at_max": round(best.rows_per_s) if best else 0,
        "scale_p99_ms_at_max": round(best.p99_ms) if best else 0,
        "scale_exactly_once": "yes" if all(s.exactly_once for s in steps) else "NO",
        "scale_machine_busy_at_break": f"{broke.machine_busy:.2f}" if broke else "-",
        "scale_other_cores_at_break": f"{broke.other_cores:.2f}" if broke else "-",
        "scale_cost_basis_gateways": basis.gateways,
        "scale_worker_cores_per_1k": f"{basis.cores_per_1k('worker'):.3f}",
        "scale_broker_cores_per_1k": f"{basis.cores_per_1k('broker'):.3f}",
        "scale_database_cores_per_1k": f"{basis.cores_per_1k('database'):.3f}",
        "scale_projected_devices": basis.projected_devices(),
        "scale_loadavg": steps[-1].loadavg if steps else "-",
    }
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", default=",".join(map(str, DEFAULT_STEPS)), help="gateway counts, ascending"
    )
    parser.add_argument("--steady-s", type=float, default=60.0, help="measured interval per step")
    parser.add_argument("--period-s", type=int, default=10, help="one batch per gateway per period")
    parser.add_argument("--windows", type=int, default=50, help="windows per batch")
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--settle-s", type=float, default=25.0, help="wait for acks and receipts")
    parser.add_argument(
        "--burst",
        action="store_true",
        help="every gateway sends at the period boundary + 2 s, as real agents do",
    )
    parser.add_argument("--cache", type=Path, default=None, help="PKI cache (scale_pki.py)")
    parser.add_argument(
        "--broker-nofile",
        type=int,
        default=0,
        help="the broker's open-file limit (1024: systemd's default soft limit); default: raised",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the steps as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="draw the figures (PNG)")
    args = parser.parse_args()
    steps_n = [int(s) for s in args.steps.split(",")]
    if steps_n != sorted(steps_n) or not steps_n or steps_n[0] < 1:
        parser.error(f"--steps: ascending positive gateway counts, got {args.steps!r}")
    allowed = raise_fd_limit(steps_n[-1])
    if allowed < steps_n[-1]:
        skipped = [n for n in steps_n if n > allowed]
        steps_n = [n for n in steps_n if n <= allowed]
        print(
            f"steps {', '.join(map(str, skipped))} skipped: the open-files hard limit"
            f" ({resource.getrlimit(resource.RLIMIT_NOFILE)[1]}) allows {allowed} gateways;"
            " raise it (`ulimit -Hn`, as root with CAP_SYS_RESOURCE) to run them",
            flush=True,
        )
        if not steps_n:
            raise SystemExit(f"bench/scale.py: no step fits the open-files limit ({allowed})")
    pki_dir = (args.cache or cache_dir()) / "pki"
    started = time.monotonic()
    ensure_pki(pki_dir, steps_n[-1])
    print(f"identities: {steps_n[-1]:,} gateways in {pki_dir} ({time.monotonic() - started:.0f} s)")
    print(f"machine: {machine()}; load average {loadavg()}", flush=True)
    print("sending: " + ("together (--burst)" if args.burst else "spread evenly"), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="millrace-bench-scale-"))
    stack = ScalePlant(
        workdir, gateway_ids(steps_n[-1]), cached_pki=pki_dir, broker_nofile=args.broker_nofile
    )
    steps: list[Step] = []
    try:
        stack.start()
        min_window_ms = 0
        for n in steps_n:
            print(f"step: {n:,} gateways", flush=True)
            step = run_step(stack, args, n, min_window_ms)
            steps.append(step)
            show([step])
            # The next step sends only later windows, so each step's rows are its own.
            min_window_ms = max(min_window_ms, step.last_window_ms + args.period_s * 1000)
            if step.broke:
                break
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    show(steps)
    print_table(
        [
            ("target", f"p99 close -> commit <= {TARGET_P99_S:g} s", "a step holds below it"),
            ("saturated at", f">= {SATURATED:.0%}", "of one core (broker, worker) or all"),
        ]
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in steps], indent=1) + "\n")
    if args.plot:
        from scale_plot import render

        render([asdict(s) for s in steps], args.plot, subtitle=f"{machine()}")
    print(result_line(steps))
    return 0 if steps and all(s.exactly_once for s in steps) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
