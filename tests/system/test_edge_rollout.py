"""edge.yml against three booted gateway containers (systemd as PID 1, sshd, sudo).

issue 14, item 2: canary, batches, max_fail_percentage, a health gate that proves the new
agent connected and had its own batches receipted since it started and has not restarted
since, rollback for every way a release fails (exits before READY, a refused config, a
crash loop 6 s in, a hang before READY, a broker name not on the broker's certificate),
recovery from a unit's start limit without manual steps, a second run with changed=0 and
a no-op run that costs little. The receipter stands in for the cloud: it receipts each
batch it gets, as the ingest worker does after its commit.

Broken releases are the good agent wheel with edge/cli.py's `_run` changed, so each has a
release id of its own. The first host of the inventory is the canary.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from millrace.ops import provision
from millrace.topics import receipt_topic
from millrace.wire import Batch, Receipt, decode_batch
from tests.ansible.rollout_support import (
    TEST_AGENT_TEMPLATE,
    PlaybookRun,
    agent_wheel,  # noqa: F401 - fixture
    run_playbook,
    wheelhouse,  # noqa: F401 - fixture
)
from tests.fixtures.fix_broker import SERVICE_ID, MosquittoServer, PKIFixture, connect_client
from tests.fixtures.fix_system import SSH_USER, Container, ContainerFactory, SSHKey

pytestmark = [pytest.mark.system, pytest.mark.ansible]

GATEWAYS = ("gw-roll-1", "gw-roll-2", "gw-roll-3")
CANARY = GATEWAYS[0]
UNIT = "millrace-edge.service"
INSTALL = "/opt/millrace"
# Test gate: a receipt comes within seconds (1 s windows); 15 s of uptime catch a crash at
# 6 s (systemd restarts it after RestartSec=5).
GATE = {"edge_agent_health_timeout_seconds": 45, "edge_agent_health_min_uptime_seconds": 15}


class Receipter:
    """Receipts every batch of every device, as the ingest worker does after its commit."""

    def __init__(self, server: MosquittoServer) -> None:
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.client = connect_client(
            server, "rollout-receipter", SERVICE_ID, on_message=self._on_message
        )
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe("millrace/v1/d/+/data", qos=1)
        assert done.wait(10), "receipter subscription not acknowledged"

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        ctype = getattr(msg.properties, "ContentType", None) if msg.properties else None
        batch = decode_batch(bytes(msg.payload), content_type=ctype)
        if isinstance(batch, Batch):
            receipt = Receipt(batch.device, batch.boot_id, -1, ((batch.seq, batch.seq),))
            client.publish(receipt_topic(batch.device), receipt.to_json(), qos=1)
            with self.lock:
                self.counts[batch.device] = self.counts.get(batch.device, 0) + 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def patched_wheel(wheel: Path, out_dir: Path, prologue: str) -> Path:
    """`wheel` with `prologue` run first in edge/cli.py's `_run` (RECORD rewritten)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel.name
    marker = "def _run(args: argparse.Namespace) -> int:\n"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        rows = []
        record_name = ""
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                record_name = info.filename
                continue
            if info.filename == "millrace/edge/cli.py":
                text = data.decode()
                assert marker in text, "edge/cli.py has no _run to patch"
                body = "".join(f"    {line}\n" for line in prologue.splitlines())
                data = text.replace(marker, marker + body, 1).encode()
            dst.writestr(info.filename, data)
            rows.append((info.filename, _record_hash(data), str(len(data))))
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([*rows, (record_name, "", "")])
        dst.writestr(record_name, buffer.getvalue())
    return target


BROKEN = {
    "exits_before_ready": "import sys\nprint('broken release', file=sys.stderr)\nreturn 3\n",
    "crash_loop_after_6s": "import os, threading\nthreading.Timer(6.0, os._exit, (1,)).start()\n",
    "hangs_before_ready": "import time\ntime.sleep(100000)\n",
}


@dataclass
class Fleet:
    boxes: dict[str, Container]
    work: Path
    inventory: Path
    extra_vars: dict[str, Any]
    good_release: provision.Release
    receipter: Receipter
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, **overrides: Any) -> PlaybookRun:
        return run_playbook(
            "edge.yml", self.inventory, {**self.extra_vars, **overrides}, tmp_path=self.work
        )

    def current(self, host: str) -> str:
        return self.boxes[host].run("readlink", f"{INSTALL}/current").stdout.strip()

    def invocation(self, host: str) -> str:
        return self.boxes[host].unit_property(UNIT, "InvocationID")

    def active(self, host: str) -> str:
        return self.boxes[host].unit_property(UNIT, "ActiveState")

    def status(self, host: str) -> dict[str, Any]:
        text = self.boxes[host].run("cat", "/var/lib/millrace/state/status.json").stdout
        return dict(json.loads(text))

    def config(self, host: str) -> str:
        return self.boxes[host].run("cat", "/etc/millrace/agent.toml").stdout


SSH_ARGS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"


def _inventory(path: Path, boxes: dict[str, Container], key: SSHKey) -> Path:
    hosts = {
        name: {
            "ansible_host": "127.0.0.1",
            "ansible_port": box.ssh_port,
            "ansible_user": SSH_USER,
            "ansible_ssh_private_key_file": str(key.private),
            "ansible_ssh_common_args": SSH_ARGS,
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        for name, box in boxes.items()
    }
    path.write_text(json.dumps({"all": {"children": {"gateways": {"hosts": hosts}}}}))
    return path


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    module_container_factory: ContainerFactory,
    system_ssh_key: SSHKey,
    test_pki: PKIFixture,
    broker: MosquittoServer,
    agent_wheel: Path,  # noqa: F811
    wheelhouse: Path,  # noqa: F811
) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("rollout")
    for name in GATEWAYS:
        test_pki.issue(name)
    boxes = {}
    for name in GATEWAYS:
        box = module_container_factory(name=name)
        # A name that resolves but is not on the broker's certificate (after the boot:
        # booting writes the container's /etc/hosts afresh).
        with box.path("/etc/hosts").open("a") as hosts:
            hosts.write("127.0.0.1 wrong-broker.plant.example\n")
        boxes[name] = box
    template = work / "agent.toml.tmpl"
    template.write_text(TEST_AGENT_TEMPLATE)
    good = provision.prepare_release(work / "good", wheel=agent_wheel, wheelhouse=wheelhouse)
    extra_vars = {
        "ansible_become": True,
        "edge_agent_release_dir": str(good.dir),
        "edge_agent_pki_dir": str(test_pki.dir),
        "edge_agent_broker_host": broker.host,
        "edge_agent_broker_port": broker.port,
        "edge_agent_config_template": str(template),
        "edge_agent_install_packages": False,  # python3-venv is in the image; no network
        **GATE,
    }
    receipter = Receipter(broker)
    try:
        yield Fleet(
            boxes,
            work,
            _inventory(work / "hosts.json", boxes, system_ssh_key),
            extra_vars,
            good,
            receipter,
        )
    finally:
        receipter.close()


def _timed(fleet: Fleet, what: str, **overrides: Any) -> PlaybookRun:
    started = time.monotonic()
    outcome = fleet.run(**overrides)
    fleet.timings[what] = time.monotonic() - started
    print(f"{what}: {fleet.timings[what]:.1f} s")
    return outcome


def _failure_message(run: PlaybookRun) -> str:
    found = re.findall(r'"msg": "(release [^"]* failed on .*)"', run.output)
    assert found, run.output[-4000:]
    return str(found[-1])


@pytest.fixture(scope="module")
def installed(fleet: Fleet) -> Fleet:
    """A fresh install of the good release on all three gateways, then a second run."""
    first = _timed(fleet, "fresh install, 3 gateways")
    assert first.rc == 0, first.output[-6000:]
    fleet.first = first  # type: ignore[attr-defined]
    return fleet


def test_fresh_install_starts_each_agent_once_and_proves_it(installed: Fleet) -> None:
    first = installed.first  # type: ignore[attr-defined]
    # Canary, then the other two together (not one host at a time).
    assert first.output.count("TASK [Gathering Facts]") == 2, first.output[-4000:]
    for host, box in installed.boxes.items():
        assert installed.current(host) == f"releases/{installed.good_release.release_id}"
        assert installed.active(host) == "active"
        assert box.unit_property(UNIT, "NRestarts") == "0"
        status = installed.status(host)
        assert status["receipted_ms"] and status["connected_ms"]
        assert status["pid"] == int(box.unit_property(UNIT, "MainPID"))
        # issue 14: a first install started the agent, then restarted it 0.4 s later.
        starts = box.journal(UNIT, "-o", "cat").count("starting: boot_id=")
        assert starts == 1, box.journal(UNIT, "-o", "cat")[-3000:]


def test_second_run_changes_nothing_and_costs_little(installed: Fleet) -> None:
    before = {h: installed.invocation(h) for h in GATEWAYS}
    second = _timed(installed, "no-op run, 3 gateways")
    assert second.rc == 0, second.output[-4000:]
    for host in GATEWAYS:
        assert second.count(host, "changed") == 0, second.output[-4000:]
        assert installed.invocation(host) == before[host], "a no-op run restarted the agent"
    ratio = (
        installed.timings["no-op run, 3 gateways"] / installed.timings["fresh install, 3 gateways"]
    )
    print(f"no_op_vs_fresh_install={ratio:.3f}")


def test_config_change_restarts_each_agent_once_through_the_gate(installed: Fleet) -> None:
    template = installed.work / "agent-heartbeat.toml.tmpl"
    template.write_text(TEST_AGENT_TEMPLATE.replace("interval_s = 5.0", "interval_s = 4.0"))
    before = {h: installed.invocation(h) for h in GATEWAYS}
    outcome = _timed(
        installed, "config change, 3 gateways", edge_agent_config_template=str(template)
    )
    assert outcome.rc == 0, outcome.output[-4000:]
    for host, box in installed.boxes.items():
        assert installed.invocation(host) != before[host]
        assert box.unit_property(UNIT, "NRestarts") == "0"
        assert "interval_s = 4.0" in installed.config(host)
    installed.extra_vars["edge_agent_config_template"] = str(template)


def _broken_case(installed: Fleet, case: str) -> dict[str, Any]:
    """Overrides that make the canary's rollout fail the way `case` names."""
    if case in BROKEN:
        wheel = patched_wheel(
            Path(installed.good_release.wheel), installed.work / f"wheel-{case}", BROKEN[case]
        )
        release = provision.prepare_release(
            installed.work / f"release-{case}",
            wheel=wheel,
            wheelhouse=installed.good_release.dir / "wheels",
        )
        return {"edge_agent_release_dir": str(release.dir)}
    if case == "refused_config":
        template = installed.work / "refused.toml.tmpl"
        template.write_text(TEST_AGENT_TEMPLATE.replace("period_s = 1", "period_s = 0"))
        return {"edge_agent_config_template": str(template)}
    assert case == "broker_name_not_on_its_certificate"
    return {"edge_agent_broker_host": "wrong-broker.plant.example"}


EXPECTED_CAUSE = {
    "exits_before_ready": "agent stopped",
    "crash_loop_after_6s": "agent stopped",
    "hangs_before_ready": "did not report READY",
    "refused_config": "windows.period_s",
    # `edge check` (new release, new config) asks the broker before the switch.
    "broker_name_not_on_its_certificate": (
        "the broker's certificate is not for 'wrong-broker.plant.example'"
    ),
}


@pytest.mark.parametrize("case", list(EXPECTED_CAUSE))
def test_broken_release_stops_at_the_canary_and_rolls_back(installed: Fleet, case: str) -> None:
    good_current = {h: installed.current(h) for h in GATEWAYS}
    good_config = {h: installed.config(h) for h in GATEWAYS}
    before = {h: installed.invocation(h) for h in GATEWAYS}
    overrides = _broken_case(installed, case)

    outcome = _timed(installed, f"broken: {case}", **overrides)

    assert outcome.rc != 0
    assert outcome.count(CANARY, "failed") == 1 and outcome.count(CANARY, "rescued") == 1
    message = _failure_message(outcome)
    assert EXPECTED_CAUSE[case] in message, message
    assert "\\n" not in message and len(message) < 1000, message
    # The canary is back on its good release and config, its agent running and proven.
    assert installed.current(CANARY) == good_current[CANARY]
    assert installed.config(CANARY) == good_config[CANARY]
    box = installed.boxes[CANARY]
    box.wait_for("the rolled-back agent", lambda: installed.active(CANARY) == "active", 60)
    box.wait_for(
        "the rolled-back agent's own receipt",
        lambda: bool(installed.status(CANARY).get("receipted_ms")),
        60,
    )
    assert installed.status(CANARY)["pid"] == int(box.unit_property(UNIT, "MainPID"))
    # The other gateways were never touched.
    for host in GATEWAYS[1:]:
        assert host not in outcome.recap, outcome.output[-4000:]
        assert installed.invocation(host) == before[host]
        assert installed.current(host) == good_current[host]


def test_start_limit_is_recovered_without_manual_steps(installed: Fleet) -> None:
    """issue 14: after the unit's start limit, the rollout failed until a manual reset-failed."""
    box = installed.boxes[CANARY]
    good = installed.current(CANARY)
    # A run died with `current` on a release that cannot start; systemd restarts it every
    # RestartSec=5 until StartLimitBurst=10 in StartLimitIntervalSec=600 makes it give up.
    box.run("systemctl", "stop", UNIT)
    box.run("ln", "-sfn", "releases/never-installed", f"{INSTALL}/current")
    box.run("systemctl", "start", UNIT, check=False, timeout=60)
    # systemd 252 leaves the unit failed after the tenth automatic restart and refuses the
    # next start ("Start request repeated too quickly") until reset-failed.
    box.wait_for("the unit to give up", lambda: installed.active(CANARY) == "failed", timeout=180)
    box.run("ln", "-sfn", good, f"{INSTALL}/current")
    refused = box.run("systemctl", "start", UNIT, check=False, timeout=60)
    assert refused.returncode != 0, "systemd still starts the unit: no start limit to recover"
    assert "Start request repeated too quickly" in box.journal(UNIT)

    outcome = _timed(installed, "start-limit recovery")

    assert outcome.rc == 0, outcome.output[-4000:]
    assert installed.active(CANARY) == "active"
    assert installed.status(CANARY)["receipted_ms"]


def test_good_release_rolls_out_after_the_failures(installed: Fleet) -> None:
    wheel = patched_wheel(
        Path(installed.good_release.wheel), installed.work / "wheel-good-2", "pass\n"
    )
    release = provision.prepare_release(
        installed.work / "release-good-2",
        wheel=wheel,
        wheelhouse=installed.good_release.dir / "wheels",
    )
    old = {h: installed.current(h) for h in GATEWAYS}
    outcome = _timed(installed, "good release, 3 gateways", edge_agent_release_dir=str(release.dir))
    assert outcome.rc == 0, outcome.output[-4000:]
    for host in GATEWAYS:
        assert installed.current(host) == f"releases/{release.release_id}"
        previous = installed.boxes[host].run("readlink", f"{INSTALL}/previous").stdout.strip()
        assert previous == old[host]
        assert installed.active(host) == "active"
    print("rollout timings: " + ", ".join(f"{k}={v:.1f}s" for k, v in installed.timings.items()))
