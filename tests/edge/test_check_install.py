"""install.sh rolls back when `edge check` finds that the plant broker refuses the gateway.

issue 14: install.sh treated every exit 1 of the check as "a sensor is off" and reported
success; now the check's broker step fails it too, and install.sh reads the JSON to tell
the broker (roll back) from the signals (warn and keep).
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from millrace.ops import provision, provision_signing
from tests.ansible.rollout_support import (
    TEST_AGENT_TEMPLATE,
    agent_wheel,  # noqa: F401 - fixture
    wheelhouse,  # noqa: F401 - fixture
)
from tests.fixtures.fix_broker import MosquittoServer, PKIFixture, free_port

pytestmark = pytest.mark.integration

DEVICE = "dev-chk-install"


def test_install_rolls_back_when_the_plant_broker_cannot_be_reached(
    tmp_path: Path,
    test_pki: PKIFixture,
    broker: MosquittoServer,
    agent_wheel: Path,  # noqa: F811
    wheelhouse: Path,  # noqa: F811
) -> None:
    template = tmp_path / "agent.toml.tmpl"
    template.write_text(TEST_AGENT_TEMPLATE)
    bundle = provision.build_bundle(
        DEVICE,
        pki_dir=test_pki.dir,
        out=tmp_path / "bundle.tar.gz",
        config_template=template,
        broker_host=broker.host,
        broker_port=free_port(),  # a port of the broker's host that nobody listens on
        wheel=agent_wheel,
        wheelhouse=wheelhouse,
    )
    with tarfile.open(bundle.path) as tar:
        tar.extractall(tmp_path / "unpacked", filter="tar")
    root = tmp_path / "root"
    done = subprocess.run(
        [
            "sh", str(tmp_path / "unpacked" / f"millrace-{DEVICE}" / "install.sh"),
            "--root", str(root),
            "--release-key", str(provision_signing.release_pub_path(test_pki.dir)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert done.returncode == 4, done.stdout + done.stderr
    assert "millrace edge check failed: broker: " in done.stderr
    assert "cannot reach the broker" in done.stderr
    assert "device dev-chk-install: release" not in done.stdout  # no success reported
