"""bench/edge.py finishes by itself on the real path: every batch is receipted, not resent.

Batches leave the edge outbox only on the cloud's receipt, so a benchmark broker with
nobody receipting made the agent resend forever and `make bench` hit its 20-minute
timeout. This runs a tiny variant and checks the result, not the speed (no thresholds).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Generous: the tiny run takes ~10 s; the old benchmark never ended.
RUN_TIMEOUT_SECONDS = 180
BATCHES_ROW = re.compile(
    r"^hot path batches written / acked / receipted\s+(\d+) / (\d+) / (\d+)", re.MULTILINE
)
RESULT_KEYS = {
    "edge_hot_path_readings_per_s",
    "edge_cpu_percent_at_1k",
    "edge_peak_rss_mb",
}


@pytest.mark.integration
def test_bench_edge_finishes_with_every_hot_batch_receipted() -> None:
    # Its own session, so a hung run's mosquitto is killed with it, not orphaned.
    proc = subprocess.Popen(
        [sys.executable, "bench/edge.py", "--seconds", "1", "--readings", "30000"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"bench/edge.py did not finish in {RUN_TIMEOUT_SECONDS} s")
    assert proc.returncode == 0, stdout + stderr
    match = BATCHES_ROW.search(stdout)
    assert match, stdout
    written, _acked, receipted = (int(g) for g in match.groups())
    assert written == 3  # 30,000 readings at 10,000 per window
    assert receipted == written
    last = stdout.strip().splitlines()[-1]
    pairs = dict(token.split("=", 1) for token in last.split())
    assert pairs.keys() >= RESULT_KEYS, last
