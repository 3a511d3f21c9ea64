"""The edge_agent role and edge.yml, converged against this machine into a temporary prefix.

The service manager and user creation are off (no systemd here); everything else is the
real playbook: the release is installed into its own virtual environment from offline
wheels, the config and unit are rendered from the millrace templates, the health check
runs `millrace edge check`, and a failed check rolls the gateway back.
"""

from __future__ import annotations

import stat
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
    converged.first = converged.run()
    converged.second = converged.run()
    return converged


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
    assert (converged.install_dir / "previous").readlink() == good_release
    assert (converged.install_dir / "releases" / release.release_id / ".complete").exists()
    assert converged.config_file.read_text() == good_config

    again = converged.run()
    assert again.rc == 0, again.output[-4000:]
    assert again.count(DEVICE, "changed") == 0
