"""`bench/ingest.py --profile-committer`: the writer's steps with and without rollups.

The commits only COPY their rollup partials; the upsert into the rollup tables happens
in the drain, outside every commit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_SECONDS = 300  # generous: a tiny run takes ~15 s on a loaded machine


@pytest.mark.integration
def test_the_committer_profile_shows_no_rollup_upsert_inside_the_commits() -> None:
    args = ["--messages", "8", "--windows-per-message", "50", "--devices", "2", "--metrics", "5"]
    run = subprocess.run(
        [sys.executable, "bench/ingest.py", "--profile-committer", "1", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    (row,) = [line for line in lines if line.startswith("| 1 |")]
    # "copy_pending <with>/<without>": the second variant has no rollup step to time.
    assert row.split("copy_pending ")[1].split(",")[0].endswith("/0.00"), row
    result = dict(pair.split("=", 1) for pair in lines[-1].split())
    assert set(result) == {
        "committer_s",
        "committer_without_rollups_s",
        "floor_s",
        "serial_ratio_vs_floor",
        "serial_ratio_without_rollups",
        "drain_s",
        "rollup_upserts_in_commit",
    }
    # The rollup upsert is gone from the commits: the drain, after them, did it.
    assert result["rollup_upserts_in_commit"] == "0", lines[-1]
    assert float(result["drain_s"]) > 0, lines[-1]
