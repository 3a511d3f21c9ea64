"""Draw docs/img/scale.png from bench/scale.py's steps: throughput, latency and CPU vs fleet size.

bench/scale.py calls `render` with `--plot`; run alone it redraws from a saved `--json`:
.venv/bin/python bench/scale_plot.py STEPS.json [--out docs/img/scale.png] [--subtitle TEXT]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plot import save  # bench/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img" / "scale.png"
TARGET_P99_MS = 2000.0
GROUPS = (("broker", "mosquitto"), ("worker", "ingest worker"), ("database", "PostgreSQL"))


def render(steps: Sequence[dict[str, Any]], out: Path = OUT, *, subtitle: str = "") -> Path:
    """Three panels over the gateway count: rows/s, close -> commit p50/p99, cores per process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [s["gateways"] for s in steps]
    fig, (rate, lat, cpu) = plt.subplots(1, 3, figsize=(16, 5))
    rate.plot(n, [s["offered_rows_per_s"] for s in steps], "--", color="#9e9e9e", label="offered")
    rate.plot(n, [s["rows_per_s"] for s in steps], "o-", color="#2b7bba", label="stored")
    rate.set(title="rows/s (50 windows per gateway per 10 s)", xlabel="gateways", ylabel="rows/s")
    rate.legend()
    lat.plot(n, [s["p50_ms"] for s in steps], "o-", label="close -> commit p50")
    lat.plot(n, [s["p99_ms"] for s in steps], "o-", label="close -> commit p99")
    lat.plot(n, [s["receipt_p99_ms"] for s in steps], "x:", label="close -> receipt p99")
    lat.axhline(TARGET_P99_MS, color="#d95f02", lw=1, label="p99 target (2 s)")
    lat.set(title="latency", xlabel="gateways", ylabel="ms")
    lat.set_yscale("log")
    lat.legend()
    for key, label in GROUPS:
        cpu.plot(n, [s["cores"].get(key, 0.0) for s in steps], "o-", label=label)
    cpu.plot(
        n,
        [s["cores"].get("generator", 0.0) for s in steps],
        "x:",
        color="#9e9e9e",
        label="load generator (not counted)",
    )
    machine = [s["machine_busy"] * s["cpus"] for s in steps]
    cpu.plot(n, machine, "--", color="#555555", label="machine, all processes")
    others = [max(0.0, m - sum(s["cores"].values())) for m, s in zip(machine, steps, strict=True)]
    cpu.plot(n, others, "s:", color="#d95f02", label="other processes (shared box)")
    cpu.set(title="CPU (cores)", xlabel="gateways", ylabel="cores")
    cpu.legend()
    for ax in (rate, lat, cpu):
        ax.grid(alpha=0.3)
    broke = [s for s in steps if s["broke"]]
    title = "bench/scale.py: one broker, one ingest worker, one TimescaleDB"
    if broke:
        title += f" (broke at {broke[0]['gateways']:,}: {broke[0]['broke']})"
    return save(fig, out, title=title, subtitle=subtitle)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", type=Path, help="bench/scale.py --json output")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--subtitle", default="")
    args = parser.parse_args()
    print(render(json.loads(args.steps.read_text()), args.out, subtitle=args.subtitle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
