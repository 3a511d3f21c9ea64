"""Offline bundles by default: `provision --platform` builds the wheelhouse itself.

The wheels come from the package index through pip's own configuration and are cached
outside the checkout (provision_wheels.cache_dir), so a second run downloads nothing.
The bundle for this machine's platform installs with no index and no network: install.sh
runs in a network namespace of its own (`unshare --net`: not even loopback is up) with
every proxy and index variable pointing at a closed port besides; a bundle for another
platform is refused by install.sh in one line before anything is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from millrace.ops import provision, provision_signing, provision_wheels
from tests.ansible.rollout_support import agent_wheel  # noqa: F401 - fixture
from tests.fixtures.fix_broker import PKIFixture

pytestmark = [pytest.mark.ansible, pytest.mark.integration]

TIMEOUT_SECONDS = 600
NATIVE = provision_wheels.this_platform()
FOREIGN = "x86_64" if NATIVE == "aarch64" else "aarch64"
# A closed loopback port: anything that tries the network fails at once.
NO_NETWORK = "http://127.0.0.1:9"
# Inside the namespace a connection anywhere fails at once (no route, no loopback).
_NO_ROUTE = """
import errno, socket, sys
try:
    socket.create_connection(("127.0.0.1", 9), timeout=2)
except OSError as exc:
    sys.exit(0 if exc.errno == errno.ENETUNREACH else f"not isolated: {exc}")
sys.exit("the namespace has a network")
"""


def _provision(
    pki_dir: Path, device: str, platform: str, out: Path, wheel: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "millrace.cli", "provision", device, "--pki", str(pki_dir),
            "--out", str(out), "--broker", "mqtt.plant.example:8883", "--platform", platform,
            "--wheel", str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )  # fmt: skip


def _unpack(bundle: Path, into: Path) -> Path:
    with tarfile.open(bundle) as tar:
        tar.extractall(into, filter="tar")
    (top,) = into.iterdir()
    return top


@pytest.fixture(scope="module")
def bundles(
    tmp_path_factory: pytest.TempPathFactory,
    test_pki: PKIFixture,
    agent_wheel: Path,  # noqa: F811
) -> dict[str, Path]:
    """An unpacked bundle for this machine's platform and one for the other, downloaded."""
    work = tmp_path_factory.mktemp("platforms")
    unpacked = {}
    for platform in (NATIVE, FOREIGN):
        out = work / f"{platform}.tar.gz"
        made = _provision(
            test_pki.dir, f"gw-{platform.replace('_', '-')}", platform, out, agent_wheel
        )
        assert made.returncode == 0, made.stdout + made.stderr
        assert f"for {platform}" in made.stdout
        unpacked[platform] = _unpack(out, work / platform)
    return unpacked


def test_provision_bundles_the_wheels_of_the_target_platform(bundles: dict[str, Path]) -> None:
    """The docs' one-tag `pip download` recipe found no wheels; provision needs none."""
    for platform, top in bundles.items():
        info = json.loads((top / "bundle.json").read_text())
        assert info["platform"] == platform
        names = sorted(p.name for p in (top / "wheels").glob("*.whl"))
        pins = provision.edge_requirements()
        assert len(names) == len(pins), names
        msgpack = next(n for n in names if n.startswith("msgpack-"))
        assert platform in msgpack, msgpack  # the compiled one is for the target
        other = FOREIGN if platform == NATIVE else NATIVE
        assert not any(other in n for n in names), names


def test_downloaded_wheels_are_cached_outside_the_checkout(bundles: dict[str, Path]) -> None:
    cache = provision_wheels.cache_dir()
    repo = Path(__file__).resolve().parents[2]
    assert not cache.resolve().is_relative_to(repo)
    for platform, top in bundles.items():
        cached = {p.name for p in cache.joinpath(platform).rglob("*.whl")}
        assert {p.name for p in (top / "wheels").glob("*.whl")} <= cached


def test_offline_bundle_installs_with_no_index_and_no_network(
    bundles: dict[str, Path], test_pki: PKIFixture, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    env = {
        **os.environ,
        "HTTP_PROXY": NO_NETWORK,
        "HTTPS_PROXY": NO_NETWORK,
        "http_proxy": NO_NETWORK,
        "https_proxy": NO_NETWORK,
        "PIP_INDEX_URL": NO_NETWORK + "/simple",
    }
    release_pub = str(provision_signing.release_pub_path(test_pki.dir))
    # A network namespace of its own: the install cannot reach anything, index or not.
    isolate = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--net", "-r"]
    probe = subprocess.run(
        [*isolate, sys.executable, "-c", _NO_ROUTE], capture_output=True, text=True, check=False
    )
    assert probe.returncode == 0, probe.stderr
    result = subprocess.run(
        [*isolate, "sh", str(bundles[NATIVE] / "install.sh"), "--root", str(root),
         "--release-key", release_pub, "--skip-check"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        env=env,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    python = root / "opt/millrace/current/venv/bin/python"
    imported = subprocess.run(
        [str(python), "-c", "import msgpack, paho.mqtt.client, pymodbus, millrace.edge.agent"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr


def test_a_bundle_for_another_platform_is_refused_in_one_line(
    bundles: dict[str, Path], test_pki: PKIFixture, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    release_pub = str(provision_signing.release_pub_path(test_pki.dir))
    result = subprocess.run(
        ["sh", str(bundles[FOREIGN] / "install.sh"), "--root", str(root),
         "--release-key", release_pub],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"install.sh: refusing to install: this bundle is for {FOREIGN} gateways, "
        f"this machine is {NATIVE} (uname -m): provision one with --platform {NATIVE}"
    ]
    assert not root.exists()


def test_a_platform_without_wheels_on_the_index_fails_in_one_line(
    test_pki: PKIFixture,
    tmp_path: Path,
    agent_wheel: Path,  # noqa: F811
) -> None:
    """armv7l: msgpack publishes no armv7l wheel, so provision says how to bring one."""
    out = tmp_path / "armv7l.tar.gz"
    result = _provision(test_pki.dir, "gw-armv7l", "armv7l", out, agent_wheel)
    assert result.returncode != 0, result.stdout
    lines = [ln for ln in result.stderr.strip().splitlines() if " INFO " not in ln]
    assert len(lines) == 1, lines
    assert "no armv7l wheel of msgpack==" in lines[0]
    assert "pass --wheelhouse DIR" in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()
