"""bench/storage.py runs on the real schema and packing code and prints its result line.

A tiny variant; the figures are not checked (no thresholds), only that both forms were
measured and the dashboard's answers were identical before and after packing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_SECONDS = 300  # the tiny run takes ~15 s
RESULT_KEYS = {
    "hot_bytes_per_window",
    "rest_bytes_per_window",
    "pack_wal_bytes_per_window",
    "answers_identical",
}


@pytest.mark.integration
def test_bench_storage_measures_both_forms_and_answers_identically() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "bench/storage.py",
            "--devices",
            "1",
            "--signals",
            "4",
            "--hours",
            "2",
            "--draws",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    pairs = dict(token.split("=", 1) for token in last.split() if "=" in token)
    assert pairs.keys() >= RESULT_KEYS, run.stdout[-2000:] + run.stderr[-2000:]
    assert pairs["answers_identical"] == "1"
    assert float(pairs["rest_bytes_per_window"]) < float(pairs["hot_bytes_per_window"])
