"""Helpers for the rollout tests: offline wheels, ansible-playbook runs, a running agent.

Imported by the test modules (fixtures included), not registered as a plugin: only the
rollout tests use them.

Agents are installed into fresh virtual environments the way a gateway does it
(`pip install --no-index --find-links`). Downloading wheels would make the suite depend
on the network, so `repack` zips each installed distribution of the edge closure back
into a wheel from its RECORD: the files pip unpacked, with a fresh RECORD.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import tomllib
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from millrace import topics
from millrace.errors import MillraceError
from millrace.ops import provision
from millrace.wire import Batch, decode_batch

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
VENV_BIN = Path(sys.executable).parent
PLAYBOOK_TIMEOUT_SECONDS = 300
AGENT_STOP_SECONDS = 15
BATCH_WAIT_SECONDS = 30.0
_RECAP = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$", re.MULTILINE)
_cache: dict[str, Path] = {}

# An agent config template for tests: the placeholders of millrace/ops/templates/bundle,
# one simulated signal and 1 s windows so a batch arrives within a couple of seconds.
TEST_AGENT_TEMPLATE = """\
device_id = "{{ device_id }}"

[broker]
host = "{{ broker_host }}"
port = {{ broker_port }}
ca = "{{ ca_file }}"
cert = "{{ cert_file }}"
key = "{{ key_file }}"
reconnect_min_s = 0.2
reconnect_max_s = 2.0

[windows]
period_s = 1
grace_s = 0.2

[outbox]
path = "{{ state_dir }}/outbox.sqlite"

[heartbeat]
interval_s = 5.0

[state]
dir = "{{ state_dir }}/state"

[[signals]]
metric = "test.sine"
driver = "sim"
wave = "sine"
center = 20.0
amplitude = 5.0
wave_period_s = 60.0
poll_s = 0.1
unit = "degC"
"""


# -- offline wheels -------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def _wheel_tag(dist: metadata.Distribution) -> str:
    text = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]
    if not tags:
        return "py3-none-any"
    parts = [sorted({tag.split("-")[i] for tag in tags}) for i in range(3)]
    return "-".join(".".join(part) for part in parts)


def repack(name: str, out_dir: Path) -> Path:
    """Write the installed distribution `name` as a wheel into `out_dir`; return its path."""
    dist = metadata.distribution(name)
    base = Path(str(dist.locate_file("")))
    stem = f"{dist.metadata['Name'].replace('-', '_').replace('.', '_')}-{dist.version}"
    info_dir = f"{stem}.dist-info"
    target = out_dir / f"{stem}-{_wheel_tag(dist)}.whl"
    rows: list[tuple[str, str, str]] = []
    skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for entry in dist.files or []:
            rel = entry.as_posix()
            if rel.startswith("..") or "__pycache__" in rel or rel.endswith(".pyc"):
                continue  # console scripts (pip writes them again) and bytecode
            parts = rel.split("/")
            if parts[0].endswith(".dist-info"):
                if parts[-1] in skip:
                    continue
                rel = "/".join([info_dir, *parts[1:]])
            data = (base / entry).read_bytes()
            zf.writestr(rel, data)
            rows.append((rel, _record_hash(data), str(len(data))))
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([*rows, (f"{info_dir}/RECORD", "", "")])
        zf.writestr(f"{info_dir}/RECORD", buffer.getvalue())
    return target


def edge_wheelhouse(out_dir: Path) -> Path:
    """Wheels of the edge extra's pinned closure, repacked from this venv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for pin in provision.edge_requirements():
        repack(pin.split("==")[0], out_dir)
    return out_dir


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The edge closure's wheels, built once per session (several modules share it)."""
    if "wheelhouse" not in _cache:
        _cache["wheelhouse"] = edge_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))
    return _cache["wheelhouse"]


# Files setuptools would package from the gateway tree (pyproject's package-data).
_PACKAGE_DATA = (".py", ".toml")


def offline_agent_wheel(out_dir: Path) -> Path:
    """The gateway wheel zipped from the same pruned tree `pip wheel` would build.

    Only the fallback when `pip wheel` cannot build (its isolated build environment needs
    the package index); files and metadata are what setuptools would write.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        provision._copy_gateway_tree(REPO, tree)
        project = tomllib.loads((tree / "pyproject.toml").read_text())["project"]
        stem = f"millrace_edge-{project['version']}"
        info_dir = f"{stem}.dist-info"
        target = out_dir / f"{stem}-py3-none-any.whl"
        rows: list[tuple[str, str, str]] = []

        def add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
            zf.writestr(name, data)
            rows.append((name, _record_hash(data), str(len(data))))

        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted((tree / "millrace").rglob("*")):
                if path.is_file() and path.suffix in _PACKAGE_DATA:
                    add(zf, path.relative_to(tree).as_posix(), path.read_bytes())
            requires = "".join(f"Requires-Dist: {dep}\n" for dep in project["dependencies"])
            meta = (
                f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
            )
            add(zf, f"{info_dir}/METADATA", (meta + requires).encode())
            scripts = "".join(f"{k} = {v}\n" for k, v in project["scripts"].items())
            add(zf, f"{info_dir}/entry_points.txt", f"[console_scripts]\n{scripts}".encode())
            wheel_meta = "Wheel-Version: 1.0\nGenerator: millrace-tests\nRoot-Is-Purelib: true\n"
            add(zf, f"{info_dir}/WHEEL", (wheel_meta + "Tag: py3-none-any\n").encode())
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerows(
                [*rows, (f"{info_dir}/RECORD", "", "")]
            )
            zf.writestr(f"{info_dir}/RECORD", buffer.getvalue())
    return target


@pytest.fixture(scope="session")
def agent_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The millrace wheel built from this checkout with `pip wheel`, once per session.

    `pip wheel` fetches its build backend from the package index; without one the wheel is
    zipped from the checkout instead, with a warning, so the rollout tests stay offline-safe.
    """
    if "agent_wheel" not in _cache:
        out = tmp_path_factory.mktemp("wheel")
        try:
            _cache["agent_wheel"] = provision.build_agent_wheel(out)
        except MillraceError as exc:
            warnings.warn(f"pip wheel failed, zipping the checkout instead: {exc}", stacklevel=1)
            _cache["agent_wheel"] = offline_agent_wheel(out)
    return _cache["agent_wheel"]


# -- ansible-playbook ---------------------------------------------------------------------------


def local_inventory(path: Path, groups: Mapping[str, list[str]]) -> Path:
    """An inventory whose hosts are this machine (`-c local`, this venv's Python)."""
    host_vars = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    children = {
        group: {"hosts": {host: dict(host_vars) for host in hosts}}
        for group, hosts in groups.items()
    }
    path.write_text(json.dumps({"all": {"children": children}}, indent=2))
    return path


class PlaybookRun:
    """The outcome of one ansible-playbook run: exit status, output and the play recap."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.rc = result.returncode
        self.output = result.stdout + result.stderr
        self.recap: dict[str, dict[str, int]] = {}
        for match in _RECAP.finditer(result.stdout):
            counts = dict(pair.split("=") for pair in match["counts"].split())
            self.recap[match["host"]] = {key: int(value) for key, value in counts.items()}

    def count(self, host: str, what: str) -> int:
        assert host in self.recap, self.output[-4000:]
        return self.recap[host][what]


def run_playbook(
    playbook: str,
    inventory: Path,
    extra_vars: Mapping[str, Any],
    *,
    check: bool = False,
    tmp_path: Path,
    args: Sequence[str] = (),
) -> PlaybookRun:
    """ansible-playbook from ansible/ with `extra_vars` (become off: tests run as themselves)."""
    vars_file = tmp_path / f"vars-{os.getpid()}-{len(list(tmp_path.iterdir()))}.json"
    vars_file.write_text(json.dumps({"ansible_become": False, **extra_vars}))
    cmd = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), playbook]
    cmd += ["-e", f"@{vars_file}"]
    if check:
        cmd += ["--check", "--diff"]
    cmd += list(args)
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
        "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-remote"),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    result = subprocess.run(
        cmd,
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=PLAYBOOK_TIMEOUT_SECONDS,
        check=False,
    )
    return PlaybookRun(result)


# -- a running agent --------------------------------------------------------------------------


@contextlib.contextmanager
def running_agent(
    millrace_bin: Path, config: Path, log_file: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`millrace edge run --config` from an installed release; SIGTERM on exit."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [str(millrace_bin), "edge", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(AGENT_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class BatchInbox:
    """Decoded batches a subscriber receives on one device's data topic."""

    def __init__(self, client: paho.Client, device_id: str) -> None:
        self._batches: queue.Queue[Batch] = queue.Queue()
        client.on_message = self._on_message
        result, _ = client.subscribe(topics.data_topic(device_id), qos=1)
        assert result == paho.MQTT_ERR_SUCCESS

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        content_type = getattr(msg.properties, "ContentType", None) if msg.properties else None
        decoded = decode_batch(bytes(msg.payload), content_type=content_type)
        if isinstance(decoded, Batch):
            self._batches.put(decoded)

    def next_batch(self, proc: subprocess.Popen[bytes], log_file: Path) -> Batch:
        """The next batch with at least one window; fails if the agent exits first."""
        waited = 0.0
        while waited < BATCH_WAIT_SECONDS:
            assert proc.poll() is None, f"agent exited {proc.returncode}:\n{log_file.read_text()}"
            try:
                batch = self._batches.get(timeout=0.5)
            except queue.Empty:
                waited += 0.5
                continue
            if batch.windows:
                return batch
        raise AssertionError(f"no batch within {BATCH_WAIT_SECONDS} s:\n{log_file.read_text()}")
