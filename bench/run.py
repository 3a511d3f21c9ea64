"""Run every benchmark in bench/, one subprocess each, and print a summary of their results.

Each benchmark prints a table and ends with one line of `name=value` pairs; that line
is its result. The summary lists every benchmark with its status:

- ok: exit 0 and a result line;
- missed: a result line, but the benchmark exited non-zero (a target or a check missed);
  the figures are still reported, nothing is hidden;
- CRASHED: no result line (an exception, a signal, or the timeout);
- MISSING: an expected benchmark file does not exist.

Exit status: 1 if any benchmark crashed, else 0. Misses and missing files are reported
loudly but do not fail the run. At the end the plot docs/img/benchmarks.png is drawn
from this run's results (bench/plot.py).

Run: .venv/bin/python bench/run.py [--only NAME ...] [--timeout-s 1200] [--no-plot]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# The order they run in: cheap, isolated ones first, the whole pipeline last.
EXPECTED = ("sim_fleet", "edge", "storage", "ingest", "latency", "drain")
# Modules in bench/ that are not benchmarks.
HELPERS = frozenset(
    {"run", "common", "plot", "scale_gen", "scale_meter", "scale_pki", "scale_plot"}
)
# Run only when named with --only: bench/scale.py takes about 20 minutes (docs/scaling.md).
ON_DEMAND = frozenset({"scale"})
DEFAULT_TIMEOUT_SECONDS = 1200.0
INTERRUPT_GRACE_SECONDS = 60.0
_PAIR = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=\S+$")


@dataclass
class Outcome:
    name: str
    status: str = "MISSING"
    exit_code: int | None = None
    seconds: float = 0.0
    values: dict[str, str] = field(default_factory=dict)
    result_line: str = ""


def result_line(line: str) -> dict[str, str] | None:
    """The pairs of a `name=value name=value` line, or None if it is not one."""
    tokens = line.split()
    if not tokens or not all(_PAIR.match(t) for t in tokens):
        return None
    return dict(t.partition("=")[::2] for t in tokens)


def discover() -> list[str]:
    """Expected benchmarks first (in order), then any other bench/*.py."""
    found = {p.stem for p in BENCH_DIR.glob("*.py")} - HELPERS - ON_DEMAND
    return [*EXPECTED, *sorted(found - set(EXPECTED))]


def run_one(name: str, *, timeout_s: float) -> Outcome:
    """Run bench/NAME.py, echoing its output; its last result line is the result."""
    outcome = Outcome(name)
    path = BENCH_DIR / f"{name}.py"
    if not path.exists():
        print(f"!!! bench/{name}.py is MISSING: its figures are not part of this run", flush=True)
        return outcome
    print(f"\n=== bench/{name}.py", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(path)],
        cwd=ROOT,
        # Benchmarks reuse the test suite's service fixtures (tests.fixtures), as pytest does.
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    expired = threading.Event()

    def interrupt() -> None:
        # SIGINT first: the benchmark's clean-up (finally blocks) stops the services it
        # started in their own sessions; SIGKILL only if it does not finish.
        expired.set()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(INTERRUPT_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()

    # A benchmark that hangs silently is killed by the timer, which ends the read loop.
    timer = threading.Timer(timeout_s, interrupt)
    timer.start()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            pairs = result_line(line.strip())
            if pairs is not None:
                outcome.values, outcome.result_line = pairs, line.strip()
        outcome.exit_code = proc.wait()
    except KeyboardInterrupt:
        # The terminal sent SIGINT to the benchmark too; let it clean up.
        proc.wait()
        raise
    finally:
        timer.cancel()
    timed_out = expired.is_set()
    outcome.seconds = time.monotonic() - started
    if timed_out:
        outcome.status = f"CRASHED (timeout after {timeout_s:.0f} s)"
        outcome.values, outcome.result_line = {}, ""
    elif not outcome.values:
        outcome.status = f"CRASHED (exit {outcome.exit_code}, no result line)"
    elif outcome.exit_code != 0:
        outcome.status = f"missed (exit {outcome.exit_code})"
    else:
        outcome.status = "ok"
    return outcome


def summary(outcomes: list[Outcome]) -> str:
    """A Markdown table: one row per benchmark, then every result line verbatim."""
    lines = ["| benchmark | status | time | result |", "|---|---|---|---|"]
    for o in outcomes:
        shown = ", ".join(f"{k}={v}" for k, v in o.values.items()) or "-"
        lines.append(f"| bench/{o.name}.py | {o.status} | {o.seconds:.0f} s | {shown} |")
    lines += ["", "```", *[o.result_line for o in outcomes if o.result_line], "```"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (e.g. drain)")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_SECONDS)
    parser.add_argument("--no-plot", action="store_true", help="do not redraw the PNG")
    parser.add_argument("--plot-out", type=Path, default=ROOT / "docs" / "img" / "benchmarks.png")
    args = parser.parse_args()
    names = discover()
    if args.only:
        names += sorted(ON_DEMAND)
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(names)}")
        names = [n for n in names if n in args.only]
    outcomes = [run_one(name, timeout_s=args.timeout_s) for name in names]
    print("\n=== summary\n")
    from common import machine, today

    print(f"{today()}, {machine()}\n")
    print(summary(outcomes))
    from plot import verdicts

    fresh = {k: v for o in outcomes for k, v in o.values.items()}
    print("\n| target (docs/benchmarks.md) | measured | verdict |\n|---|---|---|")
    for what, measured, verdict in verdicts(fresh):
        print(f"| {what} | {measured} | {verdict} |")
    print()
    for o in outcomes:
        if o.status != "ok":
            print(f"!!! bench/{o.name}.py: {o.status}")
    for what, _measured, verdict in verdicts(fresh):
        if verdict == "MISSED":
            print(f"!!! target missed: {what}")
    if not args.no_plot:
        from plot import DOC, recorded_values, render

        # Benchmarks not run (or crashed) keep their figures recorded in the docs.
        values = {**recorded_values(DOC), **fresh}
        note = (
            "this run"
            if fresh.keys() >= recorded_values(DOC).keys()
            else (f"this run + figures recorded in {DOC.relative_to(ROOT)}")
        )
        render(values, args.plot_out, subtitle=f"{today()} ({note}); {machine()}")
        print(f"plot: {args.plot_out}")
    crashed = [o for o in outcomes if o.status.startswith("CRASHED")]
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
