"""Draw docs/img/benchmarks.png: throughput, end-to-end latency and backlog drain vs targets.

`bench/run.py` calls `render` with the result lines of its run. Run alone, this draws
the figures recorded in docs/benchmarks.md (every fenced `name=value` line; a later
line overrides an earlier one, so the summary section at the end wins).

Run: .venv/bin/python bench/plot.py [--out docs/img/benchmarks.png]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
OUT = ROOT / "docs" / "img" / "benchmarks.png"
_PAIR = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=\S+$")

# Targets of docs/benchmarks.md (Targets).
EDGE_TARGET_READINGS_PER_S = 100_000
INGEST_TARGET_VS_FLOOR = 0.5
INGEST_TARGET_VS_NAIVE = 50.0
LATENCY_TARGET_MS = 1000.0
DRAIN_TARGET_X = 50.0
# (what, result key, comparison, threshold): the targets a result line can be judged on.
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("simulator: 200 gateways under half a core", "cpu_share_of_core", "<", 0.5),
    ("edge hot path >= 100k readings/s, one core", "edge_hot_path_readings_per_s", ">=", 1e5),
    ("edge at 1,000 readings/s <= 3 % of a core", "edge_cpu_percent_at_1k", "<=", 3.0),
    ("edge peak RSS <= 60 MB", "edge_peak_rss_mb", "<=", 60.0),
    ("ingest >= 50 % of the binary COPY floor", "ratio_vs_floor", ">=", INGEST_TARGET_VS_FLOOR),
    ("ingest >= 50x the typical bridge", "ratio_vs_naive", ">=", INGEST_TARGET_VS_NAIVE),
    ("latency close -> commit p99 <= 1 s", "latency_p99_ms", "<=", LATENCY_TARGET_MS),
    ("backlog drain >= 50x real time", "drain_x_realtime", ">=", DRAIN_TARGET_X),
    ("backlog drain stores exactly the outage", "drain_exact", "==", 1.0),
)
_COMPARE = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
}
OK_COLOUR = "#2b7bba"
MISS_COLOUR = "#d95f02"
PEER_COLOUR = "#9e9e9e"


def recorded_values(path: Path = DOC) -> dict[str, str]:
    """Every `name=value` pair on result lines inside fenced code blocks of `path`."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    fenced = False
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("```"):
            fenced = not fenced
            continue
        tokens = line.split()
        if fenced and tokens and all(_PAIR.match(t) for t in tokens):
            values.update(t.partition("=")[::2] for t in tokens)
    return values


def _num(values: Mapping[str, str], key: str) -> float | None:
    try:
        return float(values[key])
    except (KeyError, ValueError):
        return None


def verdicts(values: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(target, measured, "met" | "MISSED" | "no result") for every target."""
    out = []
    for what, key, op, threshold in TARGETS:
        measured = _num(values, key)
        if measured is None:
            out.append((what, "-", "no result"))
        else:
            met = _COMPARE[op](measured, threshold)
            out.append((what, f"{key}={values[key]}", "met" if met else "MISSED"))
    return out


def _no_data(ax: Axes, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no result", ha="center", va="center")
    ax.set_axis_off()


def _throughput(ax: Axes, values: Mapping[str, str]) -> None:
    """Horizontal log-scale bars, each with its target as a tick mark."""
    bars: list[tuple[str, float, float | None, bool]] = []  # label, value, target, is a peer
    edge = _num(values, "edge_hot_path_readings_per_s")
    if edge is not None:
        bars.append(
            ("edge hot path\nreadings/s, one core", edge, EDGE_TARGET_READINGS_PER_S, False)
        )
    floor = _num(values, "floor_rows_per_s")
    naive = _num(values, "naive_rows_per_s")
    ingest = _num(values, "ingest_rows_per_s")
    if floor is not None:
        bars.append(("floor: binary COPY\nrows/s", floor, None, True))
    if ingest is not None:
        targets = [t for t in (
            floor * INGEST_TARGET_VS_FLOOR if floor else None,
            naive * INGEST_TARGET_VS_NAIVE if naive else None,
        ) if t is not None]  # fmt: skip
        bars.append(("ingest worker\nrows/s", ingest, max(targets) if targets else None, False))
    if naive is not None:
        bars.append(("typical bridge: INSERT\n+ commit per row, rows/s", naive, None, True))
    drain = _num(values, "drain_windows_per_s")
    if drain is not None:
        bars.append(("backlog drain, pacing lifted\nwindows/s end to end", drain, None, False))
    title = "Throughput (log scale; | = target)"
    if not bars:
        _no_data(ax, title)
        return
    labels = [b[0] for b in bars][::-1]
    numbers = [b[1] for b in bars][::-1]
    colours = [
        PEER_COLOUR if b[3] else (MISS_COLOUR if b[2] and b[1] < b[2] else OK_COLOUR) for b in bars
    ][::-1]
    ys = range(len(bars))
    ax.barh(ys, numbers, color=colours)
    ax.set_xscale("log")
    ax.set_yticks(list(ys), labels, fontsize=8)
    for y, b in zip(ys, bars[::-1], strict=True):
        ax.text(max(b[1], b[2] or 0), y, f" {b[1]:,.0f}", va="center", fontsize=8)
        if b[2]:
            ax.plot([b[2], b[2]], [y - 0.4, y + 0.4], color="black", lw=2)
    ax.set_xlim(right=max(numbers) * 8)
    ax.set_title(title)


def _latency(ax: Axes, values: Mapping[str, str]) -> None:
    title = "End-to-end latency, ms"
    bars = [
        (label, v)
        for label, key in (
            ("close -> commit\np50", "latency_p50_ms"),
            ("close -> commit\np99", "latency_p99_ms"),
            ("window end -> commit\np99 (incl. 2 s grace)", "latency_window_end_p99_ms"),
        )
        if (v := _num(values, key)) is not None
    ]
    if not bars:
        _no_data(ax, title)
        return
    gateways = values.get("e2e_gateways", "?")
    signals = values.get("e2e_signals", "?")
    colours = [
        MISS_COLOUR if "close" in label and v > LATENCY_TARGET_MS else OK_COLOUR
        for label, v in bars
    ]
    colours = [
        PEER_COLOUR if "window end" in b[0] else c for b, c in zip(bars, colours, strict=True)
    ]
    xs = range(len(bars))
    ax.bar(xs, [v for _, v in bars], color=colours)
    ax.set_xticks(list(xs), [label for label, _ in bars], fontsize=8)
    for x, (_, v) in zip(xs, bars, strict=True):
        ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(LATENCY_TARGET_MS, color="black", ls="--", lw=1)
    ax.text(-0.4, LATENCY_TARGET_MS, " p99 target", va="bottom", fontsize=8)
    ax.set_title(f"{title}\n{gateways} gateways x {signals} signals")


def _drain(ax: Axes, values: Mapping[str, str]) -> None:
    title = "Backlog drain, 1 h outage\nx real time"
    bars = [
        (label, v)
        for label, key in (
            ("agent defaults\n(backlog paced)", "drain_x_realtime"),
            ("pacing lifted", "drain_unpaced_x_realtime"),
        )
        if (v := _num(values, key)) is not None
    ]
    if not bars:
        _no_data(ax, title)
        return
    xs = range(len(bars))
    colours = [MISS_COLOUR if v < DRAIN_TARGET_X else OK_COLOUR for _, v in bars]
    ax.bar(xs, [v for _, v in bars], color=colours)
    ax.set_xticks(list(xs), [label for label, _ in bars], fontsize=8)
    for x, (_, v) in zip(xs, bars, strict=True):
        ax.text(x, v, f"{v:,.0f}x", ha="center", va="bottom", fontsize=8)
    ax.axhline(DRAIN_TARGET_X, color="black", ls="--", lw=1)
    ax.text(-0.4, DRAIN_TARGET_X, " target", va="bottom", fontsize=8)
    gateways = values.get("drain_gateways", "?")
    ax.set_title(f"{title}, {gateways} gateways")


def render(values: Mapping[str, str], out: Path = OUT, *, subtitle: str = "") -> Path:
    """Draw the three panels from result pairs into `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), gridspec_kw={"width_ratios": [1.5, 1, 0.8]})
    _throughput(axes[0], values)
    _latency(axes[1], values)
    _drain(axes[2], values)
    title = "millrace benchmarks (blue: target met, orange: missed, grey: peer)"
    return save(fig, out, title=title, subtitle=subtitle)


def save(fig: Figure, out: Path, *, title: str, subtitle: str = "") -> Path:
    """Title, the machine line at the foot, and the PNG every bench figure is written as."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=11)
    if subtitle:
        fig.text(0.5, 0.005, subtitle, ha="center", va="bottom", fontsize=8, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--from", dest="source", type=Path, default=DOC, help="a Markdown file")
    args = parser.parse_args()
    values = recorded_values(args.source)
    if not values:
        print(f"no result lines in {args.source}", file=sys.stderr)
        return 1
    print(
        render(
            values,
            args.out,
            subtitle=f"figures recorded in {args.source.name} (date and machine: its summary)",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
