"""The simulated DS18B20 seen by reading its w1_slave file, as the edge's 1-wire driver does."""

from __future__ import annotations

import asyncio
import math
import re
import time
from pathlib import Path

from millrace.fieldsim.faults import DeviceFaults, Fault
from millrace.fieldsim.feed import Feed
from millrace.fieldsim.groundtruth import GroundTruth
from millrace.fieldsim.models import value_at
from millrace.fieldsim.onewire import W1Sensor, crc8
from millrace.fieldsim.specs import load_sensor_specs

SEED = 11
DEVICE = "gw0007-w1"
SIGNAL = load_sensor_specs().w1[0]
T0 = 1_760_000_000.0
LINE1 = re.compile(r"^((?:[0-9a-f]{2} ){9}): crc=([0-9a-f]{2}) (YES|NO)$")
LINE2 = re.compile(r"^((?:[0-9a-f]{2} ){9})t=(-?\d+)$")


def sensor(
    root: Path,
    faults: list[Fault] | None = None,
    gt: GroundTruth | None = None,
    started_at: float = T0,
) -> W1Sensor:
    return W1Sensor(
        device_id=DEVICE,
        gateway="gw0007",
        root=root,
        signal=SIGNAL,
        feed=Feed(seed=SEED),
        faults=DeviceFaults.pin(
            faults or [], device=DEVICE, gateway="gw0007", started_at=started_at
        ),
        ground_truth=gt,
    )


def read_w1(root: Path) -> tuple[bool, float]:
    """(crc ok, degC) the way a careful reader parses the kernel's file."""
    folders = list((root / "gw0007").glob("28-*"))
    assert len(folders) == 1
    first, second = (folders[0] / "w1_slave").read_text().splitlines()
    head, tail = LINE1.match(first), LINE2.match(second)
    assert head and tail, (first, second)
    data = bytes.fromhex(head[1].replace(" ", ""))
    crc_ok = head[3] == "YES" and crc8(data[:8]) == data[8] == int(head[2], 16)
    return crc_ok, int(tail[2]) / 1000


def test_file_holds_the_model_value_in_ds18b20_format(tmp_path: Path) -> None:
    w1 = sensor(tmp_path)
    for step in range(3):
        w1.tick(T0 + step + 0.01)
        ok, degrees = read_w1(tmp_path)
        assert ok
        want = value_at(SEED, DEVICE, SIGNAL.spec, T0 + step)
        assert abs(degrees - want) <= 1 / 16
        # 1/16 degC steps, printed in millidegrees truncated toward zero (as the kernel does).
        assert abs(degrees * 16 - round(degrees * 16)) < 0.016
    assert not list((tmp_path / "gw0007").rglob("*.tmp"))


def test_ground_truth_logs_each_write(tmp_path: Path) -> None:
    gt = GroundTruth(tmp_path / "gt.csv")
    w1 = sensor(tmp_path / "bus", gt=gt)
    w1.tick(T0 + 0.5)
    _, degrees = read_w1(tmp_path / "bus")
    gt.close()
    (row,) = [r.split(",") for r in (tmp_path / "gt.csv").read_text().splitlines()[1:]]
    assert row[1:4] == [DEVICE, "temperature", f"{T0:.3f}"]
    assert float(row[4]) == degrees


def test_bad_crc_says_no(tmp_path: Path) -> None:
    w1 = sensor(tmp_path, [Fault(DEVICE, "bad_crc", 5, 5)])
    w1.tick(T0 + 1)
    assert read_w1(tmp_path)[0]
    w1.tick(T0 + 6)
    text = next((tmp_path / "gw0007").glob("28-*/w1_slave")).read_text()
    assert text.splitlines()[0].endswith(" NO")
    assert not read_w1(tmp_path)[0]


def test_nan_serves_the_power_on_reset_reading(tmp_path: Path) -> None:
    w1 = sensor(tmp_path, [Fault("gw0007", "nan")])
    w1.tick(T0 + 1)
    assert read_w1(tmp_path) == (True, 85.0)


def test_out_of_range_spike_and_stuck_values(tmp_path: Path) -> None:
    spec = SIGNAL.spec
    w1 = sensor(
        tmp_path,
        [
            Fault(DEVICE, "out_of_range", 0, 10),
            Fault(DEVICE, "stuck", 10, 10),
            Fault(DEVICE, "spike", 20, 40),
        ],
    )
    w1.tick(T0 + 1)
    assert read_w1(tmp_path)[1] > spec.valid_max
    stuck = set()
    for i in range(10, 20):
        w1.tick(T0 + i)
        stuck.add(read_w1(tmp_path)[1])
    assert len(stuck) == 1
    assert abs(stuck.pop() - value_at(SEED, DEVICE, spec, T0 + 10)) <= 1 / 16
    far = 0
    for i in range(20, 60):
        w1.tick(T0 + i)
        far += abs(read_w1(tmp_path)[1] - value_at(SEED, DEVICE, spec, T0 + i)) > spec.valid_span
    assert 5 < far < 35


def test_garbage_is_unparseable(tmp_path: Path) -> None:
    w1 = sensor(tmp_path, [Fault(DEVICE, "garbage")])
    w1.tick(T0 + 1)
    text = next((tmp_path / "gw0007").glob("28-*/w1_slave")).read_text()
    assert not any(LINE1.match(line) or LINE2.match(line) for line in text.splitlines())


def test_dropout_and_refused_remove_the_device_folder_until_the_fault_ends(tmp_path: Path) -> None:
    w1 = sensor(tmp_path, [Fault(DEVICE, "dropout", 2, 2), Fault(DEVICE, "refused", 6, 2)])
    present = []
    for i in range(9):
        w1.tick(T0 + i + 0.5)
        present.append(bool(list((tmp_path / "gw0007").glob("28-*/w1_slave"))))
    assert present == [True, True, False, False, True, True, False, False, True]


def test_slow_writes_each_update_late(tmp_path: Path) -> None:
    delay = 0.4

    async def scenario() -> tuple[float, float]:
        now = time.time()
        w1 = sensor(tmp_path, [Fault(DEVICE, "slow", delay_s=delay)], started_at=now)
        w1.tick(now)
        assert not list((tmp_path / "gw0007").glob("28-*/w1_slave"))  # nothing yet
        while not list((tmp_path / "gw0007").glob("28-*/w1_slave")):
            await asyncio.sleep(0.02)
        return now, time.time()

    ticked, written = asyncio.run(scenario())
    assert written - ticked >= delay
    assert math.isfinite(read_w1(tmp_path)[1])
