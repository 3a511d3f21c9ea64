"""docs/deploy-by-hand.md, run block by block: the guide and this test cannot drift apart.

The guide's `sh deploy-vars` block is sourced before every `sh deploy-step` block,
each in a fresh `bash -euo pipefail`; only the variables are overridden (a temporary
base directory, free loopback ports, `localhost` for the broker). Afterwards the
`sh deploy-stop` block runs, then anything still alive whose command line names the
temporary base directory (only ours: the path is unique) is killed by pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from millrace.ops.stack.postgres import find_bindir
from tests.fixtures.fix_broker import free_port

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "deploy-by-hand.md"
STEP_TIMEOUT_SECONDS = 240
STOP_TIMEOUT_SECONDS = 90
EXIT_WAIT_SECONDS = 20.0
FENCE = re.compile(r"^```sh (deploy-vars|deploy-step|deploy-stop)\n(.*?)^```$", re.M | re.S)


@dataclass(frozen=True, slots=True)
class Block:
    kind: str
    code: str
    line: int  # where the block starts in the guide, for failure messages


def guide_blocks(text: str) -> list[Block]:
    """The guide's runnable blocks, in order."""
    return [
        Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(text)
    ]


def override_vars(code: str, values: dict[str, str]) -> str:
    """`code` with each `NAME=...` line of `values` replaced; every name must be there."""
    lines = code.splitlines()
    for name, value in values.items():
        hits = [i for i, line in enumerate(lines) if line.startswith(f"{name}=")]
        assert len(hits) == 1, f"the guide's variables block has no single {name}=..."
        lines[hits[0]] = f"{name}={shlex.quote(value)}"
    return "\n".join(lines) + "\n"


def test_the_guide_has_its_blocks_and_is_linked() -> None:
    blocks = guide_blocks(GUIDE.read_text())
    kinds = [b.kind for b in blocks]
    assert kinds[0] == "deploy-vars" and kinds[-1] == "deploy-stop"
    assert kinds.count("deploy-step") >= 8
    steps = "\n".join(b.code for b in blocks if b.kind == "deploy-step")
    for command in ("millrace pki init", "millrace db upgrade", "millrace ingest", "edge run"):
        assert command in steps
    for page in ("README.md", "docs/operations.md"):
        assert "deploy-by-hand.md" in (ROOT / page).read_text(), f"{page} does not link it"


def _base_dir() -> Path:
    # Not pytest's tmp_path: the postgres user must be able to traverse every parent.
    parent = os.environ.get("MILLRACE_PG_TMPDIR") or None
    return Path(tempfile.mkdtemp(prefix="millrace-byhand-", dir=parent))


def _environment() -> dict[str, str]:
    """This interpreter's `millrace` first on PATH; nothing of the caller's PG*/MILLRACE_*."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PG", "MILLRACE_")) and k != "PYTHONPATH"
    }
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", ""), "/usr/sbin", "/sbin"])
    return env


def _run(code: str, *, base: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=base,
        env=_environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        start_new_session=True,  # Ctrl-C on pytest does not reach the services directly
    )


def _our_processes(base: Path) -> list[int]:
    """Pids of processes whose command line names `base` (unique to this test)."""
    marker = str(base).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _kill_leftovers(base: Path) -> list[int]:
    """SIGKILL whatever of ours survived the guide's stop block; returns their pids."""
    pids = _our_processes(base)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + EXIT_WAIT_SECONDS
    while _our_processes(base) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


@pytest.mark.integration
@pytest.mark.e2e
def test_deploy_by_hand_guide_runs_and_a_window_is_stored() -> None:
    text = GUIDE.read_text()
    blocks = guide_blocks(text)
    (variables,) = [b for b in blocks if b.kind == "deploy-vars"]
    (stop,) = [b for b in blocks if b.kind == "deploy-stop"]
    base = _base_dir()
    values = {
        "BASE": str(base),
        "BROKER_HOST": "localhost",
        "BROKER_BIND": "127.0.0.1",
        "BROKER_PORT": str(free_port()),
        "PG_BIN": str(find_bindir()),
        "PG_PORT": str(free_port()),
        "INGEST_HTTP_PORT": str(free_port()),
        "PERIOD_S": "5",  # the shortest the default grace_s (2 s) allows
    }
    if os.geteuid() != 0:  # postgres runs as whoever runs the test
        values |= {"PG_USER": subprocess.getoutput("id -un"), "AS_PG": ""}
    prelude = override_vars(variables.code, values)
    outputs: list[str] = []
    leftovers: list[int] = []
    try:
        for block in (b for b in blocks if b.kind == "deploy-step"):
            done = _run(prelude + block.code, base=base, timeout=STEP_TIMEOUT_SECONDS)
            outputs.append(done.stdout)
            logs = "\n".join(
                f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                for p in sorted((base / "log").glob("*"))
            )
            assert done.returncode == 0, (
                f"docs/deploy-by-hand.md block at line {block.line} exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{logs}"
            )
            assert "Traceback" not in done.stderr, done.stderr

        assert "roles created: millrace_ingest" in "".join(outputs)
        secrets = sorted((base / "secrets").iterdir())
        assert secrets and all(p.stat().st_mode & 0o777 == 0o600 for p in secrets), [
            (p.name, oct(p.stat().st_mode)) for p in secrets
        ]
        assert (base / "edge" / "gw-press-07.key").stat().st_mode & 0o777 == 0o600
        assert "line.temp" in outputs[-1]  # the guide's own query shows the window
        owner_dsn = (base / "secrets" / "owner.dsn").read_text().strip()
        with psycopg.connect(owner_dsn) as conn:
            rows = conn.execute(
                "SELECT r.period_s, r.count, r.min, r.max, r.rejected,"
                " extract(epoch FROM r.ts)::numeric % r.period_s"
                " FROM readings r JOIN devices d ON d.id = r.device_id"
                " JOIN metrics m ON m.id = r.metric_id"
                " WHERE d.name = 'gw-press-07' AND m.name = 'line.temp'"
            ).fetchall()
            dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
        assert rows, "no window of the guide's agent was stored"
        for period_s, count, low, high, rejected, offset in rows:
            assert period_s == 5 and count >= 1 and rejected == 0
            assert low == high == 21.5  # the value the guide wrote to the sensor file
            assert offset == 0  # readings.ts is the window start, aligned to the period
        assert dead == (0,)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            _run(prelude + stop.code, base=base, timeout=STOP_TIMEOUT_SECONDS)
        leftovers = _kill_leftovers(base)
        postmaster = base / "pg" / "data" / "postmaster.pid"
        still_up = postmaster.exists()
        shutil.rmtree(base, ignore_errors=True)
    assert not still_up, "the guide's stop block left PostgreSQL running"
    assert leftovers == [], f"the guide's stop block left processes running: {leftovers}"
