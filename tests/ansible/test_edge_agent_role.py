"""The edge_agent role and edge.yml, converged against this machine into a temporary prefix.

The service manager and user creation are off (no systemd here); everything else is the
real playbook: the release is installed into its own virtual environment from offline
wheels, the config and unit are rendered from the millrace templates, the health check
runs `millrace edge check`, and a failed check rolls the gateway back.
"""

from __future__ import annotations

import json
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from millrace.ops import provision
from tests.ansible.rollout_support import (
    TEST_AGENT_TEMPLATE,
    BatchInbox,
    PlaybookRun,
    agent_wheel,  # noqa: F401 - fixture
    local_inventory,
    run_playbook,
    running_agent,
    wheelhouse,  # noqa: F401 - fixture
)
from tests.fixtures.fix_broker import MosquittoServer, PKIFixture

pytestmark = [pytest.mark.ansible, pytest.mark.integration]

DEVICE = "gw-ansible"


@dataclass
class Converged:
    root: Path
    work: Path
    inventory: Path
    extra_vars: dict[str, Any]
    first: PlaybookRun
    second: PlaybookRun

    @property
    def install_dir(self) -> Path:
        return self.root / "opt" / "millrace"

    @property
    def config_file(self) -> Path:
        return self.root / "etc" / "millrace" / "agent.toml"

    def run(self, *, check: bool = False, **overrides: Any) -> PlaybookRun:
        return run_playbook(
            "edge.yml",
            self.inventory,
            {**self.extra_vars, **overrides},
            check=check,
            tmp_path=self.work,
        )


@pytest.fixture(scope="module")
def converged(
    tmp_path_factory: pytest.TempPathFactory,
    test_pki: PKIFixture,
    broker: MosquittoServer,
    agent_wheel: Path,  # noqa: F811
    wheelhouse: Path,  # noqa: F811
) -> Converged:
    """edge.yml run twice against localhost into a temporary prefix."""
    work = tmp_path_factory.mktemp("edge-role")
    test_pki.issue(DEVICE)
    release = provision.prepare_release(work / "release", wheel=agent_wheel)
    template = work / "agent.toml.tmpl"
    template.write_text(TEST_AGENT_TEMPLATE)
    root = work / "root"
    extra_vars = {
        "edge_agent_root": str(root),
        "edge_agent_manage_user": False,
        "edge_agent_manage_service": False,
        "edge_agent_install_packages": False,
        "edge_agent_release_dir": str(release.dir),
        "edge_agent_pki_dir": str(test_pki.dir),
        "edge_agent_broker_host": broker.host,
        "edge_agent_broker_port": broker.port,
        "edge_agent_config_template": str(template),
        "edge_agent_pip_extra_args": ["--no-index", "--find-links", str(wheelhouse)],
    }
    inventory = local_inventory(work / "hosts.json", {"gateways": [DEVICE]})
    converged = Converged(root, work, inventory, extra_vars, None, None)  # type: ignore[arg-type]
    for path in _stale_backups(root):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("left by a failed run\n")
    converged.first = converged.run()
    converged.second = converged.run()
    return converged


def _stale_backups(root: Path) -> list[Path]:
    """Backup files as older versions of the role left them after failed runs."""
    return [
        root / "etc/millrace/agent.toml.4242.2026-12-01@10:00:00~",
        root / "etc/systemd/system/millrace-edge.service.4242.2026-12-01@10:00:00~",
    ]


def test_role_converges_and_a_second_run_changes_nothing(converged: Converged) -> None:
    assert converged.first.rc == 0, converged.first.output[-4000:]
    assert converged.first.count(DEVICE, "changed") > 0
    assert converged.second.rc == 0, converged.second.output[-4000:]
    assert converged.second.count(DEVICE, "changed") == 0
    assert converged.second.count(DEVICE, "failed") == 0


def test_check_diff_mode_runs_and_predicts_no_change(converged: Converged) -> None:
    checked = converged.run(check=True)
    assert checked.rc == 0, checked.output[-4000:]
    assert checked.count(DEVICE, "changed") == 0


@pytest.mark.security
def test_key_is_private_and_never_printed(converged: Converged, test_pki: PKIFixture) -> None:
    pki_dir = converged.root / "etc" / "millrace" / "pki"
    key = pki_dir / "device.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE(converged.config_file.stat().st_mode) == 0o640
    assert key.read_bytes() == test_pki.files(DEVICE)[1].read_bytes()
    secret = key.read_text().splitlines()[1]
    for run in (converged.first, converged.second):
        assert "PRIVATE KEY" not in run.output
        assert secret not in run.output


def test_config_and_unit_are_the_templates_provision_renders(
    converged: Converged, broker: MosquittoServer
) -> None:
    """One source of truth: the role renders millrace's own templates, byte for byte."""
    config_dir = str(converged.root / "etc" / "millrace")
    state_dir = str(converged.root / "var" / "lib" / "millrace")
    context = provision.agent_config_context(
        DEVICE,
        broker_host=broker.host,
        broker_port=broker.port,
        config_dir=config_dir,
        state_dir=state_dir,
    )
    expected = provision.render_agent_config(converged.work / "agent.toml.tmpl", context)
    assert converged.config_file.read_text() == expected
    unit = provision.unit_context(
        DEVICE, install_dir=str(converged.install_dir), config_dir=config_dir, state_dir=state_dir
    )
    expected_unit = provision.render_unit(unit)
    unit_file = converged.root / "etc" / "systemd" / "system" / "millrace-edge.service"
    assert unit_file.read_text() == expected_unit


def test_agent_installed_by_the_role_publishes_to_the_broker(
    converged: Converged, mqtt_connect: Callable[..., paho.Client]
) -> None:
    inbox = BatchInbox(mqtt_connect("role-watcher", "svc-test"), DEVICE)
    millrace_bin = converged.install_dir / "current" / "venv" / "bin" / "millrace"
    log_file = converged.work / "agent.log"
    with running_agent(millrace_bin, converged.config_file, log_file) as proc:
        batch = inbox.next_batch(proc, log_file)
    assert batch.device == DEVICE
    assert {w.metric for w in batch.windows} == {"test.sine"}
    assert all(w.count > 0 and 15.0 <= w.min <= w.max <= 25.0 for w in batch.windows)
    assert (converged.root / "var" / "lib" / "millrace" / "outbox.sqlite").exists()


def test_failed_health_check_restores_the_previous_release_and_config(
    converged: Converged,
    agent_wheel: Path,  # noqa: F811
    wheelhouse: Path,  # noqa: F811
) -> None:
    """A new release with a config the agent rejects: the gateway fails and rolls back."""
    good_release = (converged.install_dir / "current").readlink()
    good_config = converged.config_file.read_text()
    # Bundled wheels make it a different release; period_s = 0 passes TOML but not the agent.
    release = provision.prepare_release(
        converged.work / "release-2", wheel=agent_wheel, wheelhouse=wheelhouse
    )
    bad_template = converged.work / "bad.toml.tmpl"
    bad_template.write_text(TEST_AGENT_TEMPLATE.replace("period_s = 1", "period_s = 0"))

    outcome = converged.run(
        edge_agent_release_dir=str(release.dir),
        edge_agent_config_template=str(bad_template),
    )

    assert outcome.rc != 0
    assert outcome.count(DEVICE, "failed") == 1
    assert outcome.count(DEVICE, "rescued") == 1
    assert f"release {release.release_id} failed" in outcome.output
    assert (converged.install_dir / "current").readlink() == good_release
    assert (converged.install_dir / "good" / "release").read_text().strip() == str(good_release)
    assert (converged.install_dir / "releases" / release.release_id / ".complete").exists()
    assert converged.config_file.read_text() == good_config
    # issue 14: one clear line (it was "Unknown error" and ~9 KB of service_facts)
    message = _failure_message(outcome)
    assert "\\n" not in message and len(message) < 1000, message
    assert "windows.period_s" in message and "rollback: restored agent.toml" in message, message

    again = converged.run()
    assert again.rc == 0, again.output[-4000:]
    assert again.count(DEVICE, "changed") == 0


def _failure_message(run: PlaybookRun) -> str:
    """The msg of the role's final fail task, as ansible-playbook prints it."""
    found = re.findall(r'"msg": "(release [^"]* failed on .*)"', run.output)
    assert found, run.output[-4000:]
    return str(found[-1])


def test_backups_left_by_failed_runs_are_removed(converged: Converged) -> None:
    """issue 14: the backup files of failed runs were never removed."""
    assert [p for p in _stale_backups(converged.root) if p.exists()] == []


def test_small_fleet_rolls_out_canary_then_the_rest_together(
    tmp_path: Path, test_pki: PKIFixture, broker: MosquittoServer, converged: Converged
) -> None:
    """issue 14: with 3 hosts the serial batches (1, 10 %, 50 %, 100 %) ran one host at a time."""
    hosts = ["gw-batch-1", "gw-batch-2", "gw-batch-3"]
    for host in hosts:
        test_pki.issue(host)
    inventory = tmp_path / "hosts.json"
    host_vars = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "children": {
                        "gateways": {
                            "hosts": {
                                h: {**host_vars, "edge_agent_root": str(tmp_path / h)}
                                for h in hosts
                            }
                        }
                    }
                }
            }
        )
    )
    extra = {k: v for k, v in converged.extra_vars.items() if k != "edge_agent_root"}
    # No task is tagged so: each batch only gathers facts, which shows the batches.
    outcome = run_playbook(
        "edge.yml", inventory, extra, tmp_path=tmp_path, args=["--tags", "no-such-tag"]
    )
    assert outcome.rc == 0, outcome.output[-4000:]
    assert outcome.output.count("TASK [Gathering Facts]") == 2, outcome.output[-4000:]


def test_a_broken_release_left_current_never_becomes_previous(
    converged: Converged,
    agent_wheel: Path,  # noqa: F811
    wheelhouse: Path,  # noqa: F811
) -> None:
    """issue 14: after a failed run that was not rolled back, the next run recorded the
    broken release as `previous`, the one to roll back to."""
    install = converged.install_dir
    good = (install / "current").readlink()
    broken = install / "releases" / "broken-0"
    (broken / "venv").mkdir(parents=True, exist_ok=True)
    (install / "current").unlink()
    (install / "current").symlink_to("releases/broken-0")  # a run died after switching
    # The good release of the rollback test (same contents, same id: installed already).
    release = provision.prepare_release(
        converged.work / "release-2-again", wheel=agent_wheel, wheelhouse=wheelhouse
    )
    # Last test of the module: it leaves release-3 current.
    outcome = converged.run(edge_agent_release_dir=str(release.dir))
    assert outcome.rc == 0, outcome.output[-4000:]
    assert (install / "current").readlink() == Path("releases") / release.release_id
    assert (install / "previous").readlink() == good
