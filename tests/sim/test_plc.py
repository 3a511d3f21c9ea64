"""The simulated PLC seen through plain Modbus TCP clients (pymodbus and raw sockets).

Registers are decoded here from the map file with struct, independently of
fieldsim's codec, and compared with the model for the instant of the read.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from millrace.fieldsim.codec import garbage
from millrace.fieldsim.faults import DeviceFaults, Fault, faulted_value
from millrace.fieldsim.feed import Feed
from millrace.fieldsim.groundtruth import GroundTruth
from millrace.fieldsim.models import value_at
from millrace.fieldsim.plc import PlcDevice
from millrace.fieldsim.replay import Replay
from millrace.fieldsim.specs import load_plc_map

MAP_FILE = Path(__file__).parents[2] / "firmware-sim/fieldsim/plc_map.toml"
RAW_MAP = tomllib.loads(MAP_FILE.read_text())
UNIT_ID = RAW_MAP["plc"]["unit_id"]
ENTRIES = {e["name"]: e for e in RAW_MAP["signal"]}
PLC_MAP = load_plc_map()
SPECS = {s.spec.name: s.spec for s in PLC_MAP.signals}
ANALOG = [n for n, e in ENTRIES.items() if e["kind"] == "analog"]
SEED = 7
DEVICE = "gw0042-plc"
WORDS = {"bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
FORMATS = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
SENTINELS = {"int16": -0x8000, "uint16": 0xFFFF, "int32": -0x80000000, "uint32": 0xFFFFFFFF}


def table_span(table: str) -> int:
    return max(e["address"] + WORDS[e["type"]] for e in RAW_MAP["signal"] if e["table"] == table)


def raw_value(entry: dict[str, Any], registers: list[int]) -> int | float:
    words = registers[entry["address"] : entry["address"] + WORDS[entry["type"]]]
    if entry["word_order"] == "little":
        words = words[::-1]
    return struct.unpack(FORMATS[entry["type"]], struct.pack(f">{len(words)}H", *words))[0]


def decode_all(tables: dict[str, Any]) -> dict[str, float]:
    values: dict[str, float] = {}
    for name, entry in ENTRIES.items():
        if entry["table"] == "coil":
            values[name] = float(tables["coil"][entry["address"]])
        else:
            values[name] = raw_value(entry, tables[entry["table"]]) * entry["scale"]
    return values


@contextlib.asynccontextmanager
async def running_plc(
    port: int,
    faults: list[Fault] | None = None,
    *,
    started_at: float | None = None,
    ground_truth: GroundTruth | None = None,
) -> AsyncIterator[PlcDevice]:
    started = time.time() if started_at is None else started_at
    plc = PlcDevice(
        device_id=DEVICE,
        gateway="gw0042",
        host="127.0.0.1",
        port=port,
        plc_map=PLC_MAP,
        feed=Feed(seed=SEED),
        faults=DeviceFaults.pin(faults or [], device=DEVICE, gateway="gw0042", started_at=started),
        ground_truth=ground_truth,
    )
    await plc.start()
    try:
        yield plc
    finally:
        await plc.stop()


async def read_tables(client: AsyncModbusTcpClient) -> dict[str, Any]:
    holding = await client.read_holding_registers(0, count=table_span("holding"), device_id=UNIT_ID)
    inputs = await client.read_input_registers(0, count=table_span("input"), device_id=UNIT_ID)
    coils = await client.read_coils(0, count=table_span("coil"), device_id=UNIT_ID)
    for response in (holding, inputs, coils):
        assert not response.isError(), response
    return {"holding": holding.registers, "input": inputs.registers, "coil": coils.bits}


async def read_within_one_step(client: AsyncModbusTcpClient) -> tuple[float, dict[str, Any]]:
    """Read all tables inside one 1 s period; return (a time in that period, tables)."""
    for _ in range(5):
        before = time.time()
        tables = await read_tables(client)
        if math.floor(before) == math.floor(time.time()):
            return before, tables
    raise AssertionError("reads kept straddling a second boundary")


async def connected_client(port: int, *, timeout: float = 2.0) -> AsyncModbusTcpClient:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=timeout, retries=0)
    assert await client.connect()
    return client


def assert_matches_model(values: dict[str, float], t: float, model: dict[str, float]) -> None:
    for name, entry in ENTRIES.items():
        got, want, scale = values[name], model[name], entry["scale"]
        if entry["type"] == "float32":
            assert got == pytest.approx(want, rel=1e-6, abs=1e-6), name
        elif entry["kind"] == "counter":
            assert 0 <= want - got < scale * 1.000001, name
        else:
            assert abs(got - want) <= scale / 2 * 1.000001, name


def test_every_register_reads_as_the_model_predicts(port: int) -> None:
    async def scenario() -> None:
        async with running_plc(port):
            client = await connected_client(port)
            try:
                for _ in range(2):
                    t, tables = await read_within_one_step(client)
                    model = {n: value_at(SEED, DEVICE, SPECS[n], t) for n in ENTRIES}
                    assert_matches_model(decode_all(tables), t, model)
                    await asyncio.sleep(1.0)
            finally:
                client.close()

    asyncio.run(scenario())


def test_block_reads_across_unused_addresses_and_single_registers(port: int) -> None:
    async def scenario() -> None:
        async with running_plc(port):
            client = await connected_client(port)
            try:
                unused = await client.read_holding_registers(3, count=1, device_id=UNIT_ID)
                assert unused.registers == [0]
                high = await client.read_input_registers(2, count=1, device_id=UNIT_ID)
                before = time.time()
                expected = struct.pack(
                    ">f", value_at(SEED, DEVICE, SPECS["hydraulic_pressure"], before)
                )
                if math.floor(before) == math.floor(time.time()):
                    assert high.registers == [struct.unpack(">HH", expected)[0]]
                beyond = await client.read_input_registers(
                    table_span("input"), count=1, device_id=UNIT_ID
                )
                assert beyond.isError()
                write = await client.write_register(0, 1, device_id=UNIT_ID)
                assert write.isError()
            finally:
                client.close()

    asyncio.run(scenario())


def test_ground_truth_logs_each_read_value(port: int, tmp_path: Path) -> None:
    log = GroundTruth(tmp_path / "gt.csv")

    async def scenario() -> tuple[float, dict[str, float]]:
        async with running_plc(port, ground_truth=log):
            client = await connected_client(port)
            try:
                t, tables = await read_within_one_step(client)
                return t, decode_all(tables)
            finally:
                client.close()

    t, values = asyncio.run(scenario())
    log.close()
    lines = (tmp_path / "gt.csv").read_text().splitlines()
    assert lines[0] == "served_at,device,signal,ts,value,fault"
    rows = [line.split(",") for line in lines[1:]]
    assert {r[2] for r in rows} == set(ENTRIES)
    for served_at, device, signal, ts, value, fault in rows:
        assert device == DEVICE and fault == ""
        assert float(ts) == math.floor(t) and float(served_at) - float(ts) < 1.0
        assert float(value) == pytest.approx(values[signal], rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------- faults


def test_stuck_serves_the_value_from_the_fault_start(port: int) -> None:
    started = time.time()

    async def scenario() -> list[dict[str, float]]:
        async with running_plc(port, [Fault("gw0042", "stuck")], started_at=started):
            client = await connected_client(port)
            try:
                first = decode_all((await read_within_one_step(client))[1])
                await asyncio.sleep(1.1)
                return [first, decode_all((await read_within_one_step(client))[1])]
            finally:
                client.close()

    first, second = asyncio.run(scenario())
    assert first == second
    frozen = {n: value_at(SEED, DEVICE, SPECS[n], started) for n in ENTRIES}
    assert_matches_model(first, started, frozen)


def test_spikes_jump_by_several_valid_spans(port: int) -> None:
    started = time.time()
    faults = [Fault(DEVICE, "spike")]

    async def scenario() -> tuple[float, dict[str, float]]:
        async with running_plc(port, faults, started_at=started):
            client = await connected_client(port)
            try:
                t, tables = await read_within_one_step(client)
                return t, decode_all(tables)
            finally:
                client.close()

    t, values = asyncio.run(scenario())
    window = DeviceFaults.pin(faults, device=DEVICE, gateway="", started_at=started).windows[0]
    spiked = 0
    for name in ANALOG:
        spec, entry = SPECS[name], ENTRIES[name]
        clean = value_at(SEED, DEVICE, spec, t)
        want = faulted_value(window, seed=SEED, device=DEVICE, spec=spec, t=t, clean=clean)
        if want == clean:
            assert abs(values[name] - clean) <= entry["scale"], name
            continue
        spiked += 1
        # Integers saturate, so a downward spike may stop at the type's lowest value.
        assert abs(values[name] - clean) > spec.valid_span or values[name] <= 0, name
    assert spiked >= 1


def test_nan_serves_float_nan_and_integer_sentinels(port: int) -> None:
    async def scenario() -> dict[str, Any]:
        async with running_plc(port, [Fault(DEVICE, "nan")]):
            client = await connected_client(port)
            try:
                return await read_tables(client)
            finally:
                client.close()

    tables = asyncio.run(scenario())
    for name in ANALOG:
        entry = ENTRIES[name]
        raw = raw_value(entry, tables[entry["table"]])
        if entry["type"] == "float32":
            assert math.isnan(raw), name
        else:
            assert raw == SENTINELS[entry["type"]], name


def test_out_of_range_serves_values_above_the_valid_range(port: int) -> None:
    async def scenario() -> dict[str, Any]:
        async with running_plc(port, [Fault(DEVICE, "out_of_range")]):
            client = await connected_client(port)
            try:
                return await read_tables(client)
            finally:
                client.close()

    values = decode_all(asyncio.run(scenario()))
    for name in ANALOG:
        assert values[name] > ENTRIES[name]["valid_max"], name


def test_garbage_serves_words_unrelated_to_the_model(port: int) -> None:
    async def scenario() -> tuple[float, dict[str, Any]]:
        async with running_plc(port, [Fault(DEVICE, "garbage")]):
            client = await connected_client(port)
            try:
                return await read_within_one_step(client)
            finally:
                client.close()

    t, tables = asyncio.run(scenario())
    for sig in PLC_MAP.signals:
        if sig.table == "coil":
            continue
        got = tables[sig.table][sig.address : sig.address + sig.words]
        assert got == garbage(SEED, DEVICE, sig, math.floor(t)), sig.spec.name
    values = decode_all(tables)
    model = {n: value_at(SEED, DEVICE, SPECS[n], t) for n in ENTRIES}
    far = [n for n in ANALOG if not abs(values[n] - model[n]) <= ENTRIES[n]["scale"]]
    assert len(far) >= len(ANALOG) - 1


def raw_request(function: int, address: int, count: int, tid: int = 1) -> bytes:
    return struct.pack(">HHHBBHH", tid, 0, 6, UNIT_ID, function, address, count)


def test_bad_crc_sends_frames_that_fail_their_length_check(port: int) -> None:
    async def scenario() -> tuple[bytes, bool]:
        async with running_plc(port, [Fault(DEVICE, "bad_crc")]):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw_request(4, 0, 12))
            frame = await asyncio.wait_for(reader.read(512), 3)
            writer.close()
            client = await connected_client(port, timeout=1.0)
            try:
                failed = False
                try:
                    response = await client.read_input_registers(0, count=12, device_id=UNIT_ID)
                    failed = response.isError()
                except ModbusException:
                    failed = True
            finally:
                client.close()
            return frame, failed

    frame, client_failed = asyncio.run(scenario())
    _tid, _pid, length = struct.unpack(">HHH", frame[:6])
    assert length == len(frame) - 6  # the MBAP header is intact ...
    assert frame[8] != len(frame) - 9  # ... but the PDU's byte count is not
    assert client_failed


def test_slow_answers_late_with_correct_values(port: int) -> None:
    delay = 0.6

    async def scenario() -> tuple[float, float, dict[str, Any]]:
        async with running_plc(port, [Fault(DEVICE, "slow", delay_s=delay)]):
            client = await connected_client(port, timeout=3.0)
            try:
                asked = time.time()
                response = await client.read_input_registers(0, count=12, device_id=UNIT_ID)
                answered = time.time()
                assert not response.isError()
                return asked, answered, {"input": response.registers}
            finally:
                client.close()

    asked, answered, tables = asyncio.run(scenario())
    assert answered - asked >= delay
    served_at = answered - 0.05  # values are computed after the delay, just before sending
    entry = ENTRIES["hydraulic_pressure"]
    got = raw_value(entry, tables["input"])
    candidates = {
        value_at(SEED, DEVICE, SPECS["hydraulic_pressure"], s) for s in (served_at, answered)
    }
    assert any(got == pytest.approx(c, rel=1e-6) for c in candidates)


def raw_exchange(port: int, timeout: float) -> bytes | None:
    """One read over a fresh socket: the response, b'' if closed, None on timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw_request(3, 0, 2))
        try:
            return sock.recv(512)
        except TimeoutError:
            return None


def test_dropout_closes_connections_then_answers_nothing_then_recovers(port: int) -> None:
    started = time.time()

    async def scenario() -> dict[str, Any]:
        async with running_plc(port, [Fault(DEVICE, "dropout", 0.8, 1.6)], started_at=started):
            loop = asyncio.get_running_loop()
            seen: dict[str, Any] = {}
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw_request(3, 0, 2))
            seen["before"] = await asyncio.wait_for(reader.read(512), 2)
            seen["closed"] = await asyncio.wait_for(reader.read(512), 3)  # server closes at 0.8 s
            writer.close()
            seen["during"] = await loop.run_in_executor(None, raw_exchange, port, 0.5)
            await asyncio.sleep(max(0.0, started + 2.6 - time.time()))
            seen["after"] = await loop.run_in_executor(None, raw_exchange, port, 2.0)
            return seen

    seen = asyncio.run(scenario())
    assert len(seen["before"]) == 9 + 4
    assert seen["closed"] == b""
    assert seen["during"] is None
    assert seen["after"] is not None and len(seen["after"]) == 9 + 4


def test_refused_stops_listening_then_comes_back(port: int) -> None:
    started = time.time()

    def connect_result() -> str:
        try:
            response = raw_exchange(port, 2.0)
        except ConnectionRefusedError:
            return "refused"
        return "answered" if response else "silent"

    async def scenario() -> list[str]:
        async with running_plc(port, [Fault("gw0042", "refused", 0.6, 1.2)], started_at=started):
            loop = asyncio.get_running_loop()
            results = [await loop.run_in_executor(None, connect_result)]
            await asyncio.sleep(max(0.0, started + 1.0 - time.time()))
            results.append(await loop.run_in_executor(None, connect_result))
            await asyncio.sleep(max(0.0, started + 2.2 - time.time()))
            results.append(await loop.run_in_executor(None, connect_result))
            return results

    assert asyncio.run(scenario()) == ["answered", "refused", "answered"]


def test_replay_is_served_instead_of_the_model(port: int, tmp_path: Path) -> None:
    recording = tmp_path / "rec.csv"
    recording.write_text(
        "timestamp,signal,value\n0,oven_temp,123.4\n60,oven_temp,234.5\n0,air_pressure,4.25\n"
    )
    replay = Replay.from_csv(recording, speed=60.0)  # one recorded minute per second

    async def scenario() -> tuple[float, list[dict[str, float]]]:
        plc = PlcDevice(
            device_id=DEVICE,
            gateway="gw0042",
            host="127.0.0.1",
            port=port,
            plc_map=PLC_MAP,
            feed=Feed(seed=SEED, replay=replay),
            faults=DeviceFaults(),
        )
        started = time.time()
        replay.bind(started)
        await plc.start()
        client = await connected_client(port)
        try:
            first = decode_all(await read_tables(client))
            await asyncio.sleep(max(0.0, started + 1.2 - time.time()))
            t, tables = await read_within_one_step(client)
            return t, [first, decode_all(tables)]
        finally:
            client.close()
            await plc.stop()

    t, (first, second) = asyncio.run(scenario())
    assert first["oven_temp"] == pytest.approx(123.4)
    assert second["oven_temp"] == pytest.approx(234.5)
    assert first["air_pressure"] == second["air_pressure"] == 4.25
    model = value_at(SEED, DEVICE, SPECS["coolant_temp"], t)
    assert abs(second["coolant_temp"] - model) <= 0.05 + 1e-9  # not in the recording: the model
