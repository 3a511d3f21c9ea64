"""An arm64 gateway, emulated: an aarch64 bundle flashed onto an arm64 Debian disk, booted.

The root file system is `mmdebstrap --arch=arm64` (cached like the amd64 one; about 6 min
to build on a busy 2-core machine), booted by systemd-nspawn with every aarch64 binary run
through qemu-user-static (binfmt_misc). `millrace provision --platform aarch64 --sd` puts
a bundle carrying aarch64 wheels on it; the first boot installs it with the gateway's own
aarch64 Python and the agent publishes windows and heartbeats to the session broker on
the host's loopback. The heartbeat's RSS is printed (`-s`): under qemu-user it is the
emulator's resident set, an upper bound for a real Pi's.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from millrace import topics
from millrace.wire import Batch, decode_batch
from millrace.wire.messages import Heartbeat
from tests.ansible.rollout_support import agent_wheel  # noqa: F401 - fixture
from tests.fixtures.fix_broker import MosquittoServer, PKIFixture
from tests.fixtures.fix_system import ContainerFactory
from tests.system.flash_support import GATEWAY_TEMPLATE

pytestmark = [pytest.mark.system, pytest.mark.integration]

DEVICE = "gw-arm64"
UNIT = "millrace-edge.service"
# Under emulation the first boot builds a venv and pip-installs with an emulated Python.
FIRST_BOOT_TIMEOUT_SECONDS = 600.0
MESSAGE_TIMEOUT_SECONDS = 120.0
ELF_MACHINE_AARCH64 = 183  # e_machine of an aarch64 ELF


def _elf_machine(path: Path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", path
    return int.from_bytes(header[18:20], "little")


def test_arm64_gateway_installs_its_aarch64_bundle_and_publishes(
    container_factory: ContainerFactory,
    tmp_path: Path,
    test_pki: PKIFixture,
    broker: MosquittoServer,
    mqtt_connect: Callable[..., paho.Client],
    agent_wheel: Path,  # noqa: F811
) -> None:
    box = container_factory(arch="arm64", boot=False)
    template = tmp_path / "agent.toml.tmpl"
    template.write_text(GATEWAY_TEMPLATE)
    made = subprocess.run(
        [
            sys.executable, "-m", "millrace.cli", "provision", DEVICE,
            "--pki", str(test_pki.dir), "--out", str(tmp_path / f"{DEVICE}.tar.gz"),
            "--config", str(template), "--broker", f"{broker.host}:{broker.port}",
            "--wheel", str(agent_wheel), "--platform", "aarch64", "--sd", str(box.root),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    broker.sync()

    heartbeats: queue.Queue[Heartbeat] = queue.Queue()
    batches: queue.Queue[Batch] = queue.Queue()

    def on_message(_client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == topics.health_topic(DEVICE):
            heartbeats.put(Heartbeat.from_json(bytes(msg.payload)))
            return
        content_type = getattr(msg.properties, "ContentType", None) if msg.properties else None
        decoded = decode_batch(bytes(msg.payload), content_type=content_type)
        if isinstance(decoded, Batch) and decoded.windows:
            batches.put(decoded)

    watcher = mqtt_connect("arm64-watcher", "svc-test", on_message=on_message)
    watcher.subscribe([(topics.health_topic(DEVICE), 1), (topics.data_topic(DEVICE), 1)])

    started = time.monotonic()
    # Not waiting for `is-system-running`: it says "starting" until the first-boot install,
    # slow under emulation, is done.
    box.boot(wait=False)
    try:
        took = box.wait_for(
            f"{UNIT} active after the first boot",
            lambda: box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active",
            timeout=FIRST_BOOT_TIMEOUT_SECONDS,
        )
    except AssertionError:
        journal = box.run("journalctl", "--no-pager", "-b", "-n", "80", check=False).stdout
        raise AssertionError(f"first boot did not start the agent:\n{journal}") from None
    print(f"\narm64 first boot to active agent {took:.0f} s")
    assert box.run("uname", "-m").stdout.strip() == "aarch64"

    # The release's interpreter is the gateway's own aarch64 Python.
    python = box.run("readlink", "-f", "/opt/millrace/current/venv/bin/python").stdout.strip()
    assert _elf_machine(box.path(python)) == ELF_MACHINE_AARCH64
    msgpack_ext = list(
        box.path("/opt/millrace/current/venv/lib").glob("python3*/site-packages/msgpack/*.so")
    )
    assert msgpack_ext and all("aarch64" in so.name for so in msgpack_ext), msgpack_ext

    batch = batches.get(timeout=MESSAGE_TIMEOUT_SECONDS)
    assert batch.device == DEVICE
    assert [w.metric for w in batch.windows] == ["test.sine"]
    beat = heartbeats.get(timeout=MESSAGE_TIMEOUT_SECONDS)
    assert beat.device == DEVICE
    assert beat.rss_bytes > 0
    print(
        f"arm64 agent heartbeat: rss {beat.rss_bytes / 2**20:.1f} MiB (qemu-user), "
        f"cpu {beat.cpu_percent:.0f} %, {time.monotonic() - started:.0f} s after boot"
    )
