"""install.sh on a bare booted Debian gateway: what it must say when the system lacks a part.

Found by hand on a booted bookworm container: without /etc/hosts the broker's name did not
resolve, yet `edge check` passed and install.sh reported success (the agent then only
retried in its log); without python3-venv, venv printed a page of advice after install.sh
had already created the user and directories. Now both stop before anything is touched,
with one line that says what to fix.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from millrace.ops import provision
from tests.ansible.rollout_support import (
    agent_wheel,  # noqa: F401 - fixture
    wheelhouse,  # noqa: F401 - fixture
)
from tests.fixtures.fix_broker import MosquittoServer, PKIFixture
from tests.fixtures.fix_system import Container, ContainerFactory
from tests.system.flash_support import make_bundle

pytestmark = pytest.mark.system

DEVICE = "gw-bare"
INSTALL_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def bare_bundle(
    tmp_path_factory: pytest.TempPathFactory,
    test_pki: PKIFixture,
    broker: MosquittoServer,
    agent_wheel: Path,  # noqa: F811
    wheelhouse: Path,  # noqa: F811
) -> provision.Bundle:
    return make_bundle(
        DEVICE,
        tmp_path_factory.mktemp("bare"),
        test_pki=test_pki,
        broker=broker,
        agent_wheel=agent_wheel,
        wheelhouse=wheelhouse,
    )


@pytest.fixture
def bare_gateway(container_factory: ContainerFactory, bare_bundle: provision.Bundle) -> Container:
    """A booted container with the unpacked bundle in /root/bundle and the release key."""
    box = container_factory()
    with tarfile.open(bare_bundle.path) as tar:
        tar.extractall(box.path("/root"), filter="tar")
    box.path(f"/root/millrace-{DEVICE}").rename(box.path("/root/bundle"))
    shutil.copyfile(bare_bundle.release_pub, box.path("/root/release.pub"))
    return box


def _install(box: Container) -> tuple[int, list[str], str]:
    result = box.run(
        "sh", "/root/bundle/install.sh", "--release-key", "/root/release.pub",
        check=False, timeout=INSTALL_TIMEOUT_SECONDS,
    )  # fmt: skip
    return result.returncode, result.stderr.strip().splitlines(), result.stdout


def test_install_fails_in_one_line_when_the_broker_host_does_not_resolve(
    bare_gateway: Container,
) -> None:
    box = bare_gateway
    box.path("/etc/hosts").rename(box.path("/etc/hosts.off"))
    try:
        assert box.run("getent", "hosts", "localhost", check=False).returncode != 0
        status, errors, out = _install(box)
    finally:
        box.path("/etc/hosts.off").rename(box.path("/etc/hosts"))
    assert status == 1, out + "\n".join(errors)
    assert len(errors) == 1, errors
    assert "the broker host 'localhost' ([broker] host) does not resolve" in errors[0]
    assert "/etc/hosts" in errors[0]
    assert not box.path("/opt/millrace/releases").exists()  # nothing was touched
    assert box.run("id", "millrace", check=False).returncode != 0


def test_install_without_python3_venv_says_so_in_one_line(bare_gateway: Container) -> None:
    box = bare_gateway
    box.run("dpkg", "--remove", "python3-venv", "python3.11-venv")
    status, errors, out = _install(box)
    assert status == 1, out + "\n".join(errors)
    assert errors == [
        "install.sh: error: python3 cannot create virtual environments"
        " (Debian: apt-get install python3-venv)"
    ]
    assert "ensurepip is not" not in out  # venv's page of advice never ran
    assert not box.path("/opt/millrace/releases").exists()
    assert box.run("id", "millrace", check=False).returncode != 0
