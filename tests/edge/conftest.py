"""Edge-only fixtures: a Modbus TCP stub and a plain local MQTT broker (like a Pi's)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.edge.modbus_stub import ModbusStub


@pytest.fixture
def modbus_stub() -> Iterator[ModbusStub]:
    stub = ModbusStub()
    stub.start()
    try:
        yield stub
    finally:
        stub.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def local_mqtt(tmp_path: Path) -> Iterator[int]:
    """A plain mosquitto on 127.0.0.1 (the local broker field nodes publish to); its port."""
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
    assert binary, "mosquitto is not installed"
    port = _free_port()
    conf = tmp_path / "local-mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
