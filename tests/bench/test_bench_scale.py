"""bench/scale.py's machinery at a tiny N: hand-built MQTT v5 over TLS through the production
broker configuration into `millrace ingest`, and every window sent stored exactly once.

It runs one step of 20 gateways (two generator processes, 2 s periods) and checks what
the benchmark measured, never how fast (no thresholds: p99 may exceed the target on a
loaded machine, so `max_devices` is only checked to be reported).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GATEWAYS = 20
# A give-up limit for a run that takes ~30 s; nothing is judged by it.
RUN_TIMEOUT_SECONDS = 300
DROP_SYS_RESOURCE = ("setpriv", "--bounding-set=-sys_resource", "--inh-caps=-sys_resource")
RESULT_KEYS = {
    "max_devices",
    "scale_break_at",
    "scale_break_reason",
    "scale_first_saturated",
    "scale_exactly_once",
    "scale_worker_cores_per_1k",
    "scale_projected_devices",
}


@pytest.mark.integration
def test_bench_scale_stores_every_window_of_every_gateway_exactly_once(tmp_path: Path) -> None:
    steps_json = tmp_path / "steps.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "bench/scale.py",
            f"--steps={GATEWAYS}",
            "--period-s=2",
            "--steady-s=4",
            "--procs=2",
            f"--cache={tmp_path / 'cache'}",
            f"--json={steps_json}",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a hung run's broker and database go with it
    )
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"bench/scale.py did not finish in {RUN_TIMEOUT_SECONDS} s")
    assert proc.returncode == 0, stdout + stderr
    last = stdout.strip().splitlines()[-1]
    pairs = dict(token.split("=", 1) for token in last.split())
    assert pairs.keys() >= RESULT_KEYS, last
    assert pairs["scale_exactly_once"] == "yes"
    assert int(pairs["max_devices"]) in (0, GATEWAYS)
    (step,) = json.loads(steps_json.read_text())
    assert step["connected"] == GATEWAYS and not step["failed"] and not step["lost"]
    # Every batch sent was PUBACKed, is in the ledger once, and was receipted to its gateway.
    assert step["sent"] >= GATEWAYS
    assert step["acked"] == step["sent"] == step["ledger"] == step["receipted"]
    # Every window is one readings row holding exactly the readings sent (none doubled).
    assert step["windows_sent"] == step["sent"] * 50
    assert step["windows_stored"] == step["windows_sent"]
    assert step["readings_stored"] == step["readings_sent"]
    assert step["dead_letters"] == 0
    assert step["batches_measured"] > 0
    assert set(step["cores"]) == {"broker", "worker", "database", "generator"}


def test_bench_scale_skips_steps_the_open_files_hard_limit_cannot_hold() -> None:
    """Found on a fresh machine: with the hard limit at 20,000 and no CAP_SYS_RESOURCE, the
    bench died with `ValueError: not allowed to raise maximum limit` before any step; now
    it runs the steps that fit and names the limit for the rest."""
    hard = 6_000
    script = (
        "import resource, sys; sys.path.insert(0, 'bench');"
        f" resource.setrlimit(resource.RLIMIT_NOFILE, ({hard}, {hard}));"
        "import scale;"
        " print(scale.raise_fd_limit(10_000), resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    run = subprocess.run(
        # Without CAP_SYS_RESOURCE even root may not raise the hard limit it lowered.
        [*DROP_SYS_RESOURCE, sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    allowed, limits = run.stdout.split(" ", 1)
    assert int(allowed) == hard - 4096
    assert limits.strip() == f"({hard}, {hard})"
