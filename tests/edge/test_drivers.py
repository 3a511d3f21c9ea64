"""Drivers: 1-wire files with CRC, numbers, commands, sim, Modbus decoding and batching."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from millrace.edge.config import (
    CommandSpec,
    FileSpec,
    ModbusDevice,
    ModbusSpec,
    MqttSpec,
    SignalConfig,
    SimSpec,
)
from millrace.edge.drivers.base import ReadFailure
from millrace.edge.drivers.command import CommandGroup
from millrace.edge.drivers.file import FileGroup, dallas_crc8, parse_w1_slave
from millrace.edge.drivers.modbus import (
    MAX_REGISTERS_PER_READ,
    ModbusConnection,
    ModbusGroup,
    decode_registers,
    encode_registers,
    plan_spans,
)
from millrace.edge.drivers.mqtt import compile_field, extract
from millrace.edge.drivers.sim import SimGroup, sim_value
from tests.edge.modbus_stub import ModbusStub

GOOD_W1 = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"


def w1_text(raw_c: float, *, verdict: str = "YES", corrupt: bool = False) -> str:
    value = round(raw_c * 16) & 0xFFFF
    pad = bytes([value & 0xFF, value >> 8, 0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10])
    crc = dallas_crc8(pad) ^ (1 if corrupt else 0)
    hexes = " ".join(f"{b:02x}" for b in pad + bytes([crc]))
    return f"{hexes} : crc={crc:02x} {verdict}\n{hexes} t={int(raw_c * 1000)}\n"


def signal(driver: str, spec: object, **kw: object) -> SignalConfig:
    return SignalConfig(metric="m", driver=driver, spec=spec, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- 1-wire and files


def test_w1_slave_good_reading() -> None:
    assert parse_w1_slave(GOOD_W1) == 23.125
    assert parse_w1_slave(w1_text(-10.5)) == -10.5


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (w1_text(21.0, verdict="NO"), "kernel says NO"),
        (w1_text(21.0, corrupt=True), "CRC mismatch"),
        (w1_text(85.0), "power-on reset"),
        ("00 00 00 00 00 00 00 00 00 : crc=00 YES\n00 00 00 00 00 00 00 00 00 t=0\n", "all-zero"),
        (GOOD_W1.replace(" t=23125", ""), "no t="),
        (GOOD_W1.splitlines()[0], "expected 2 lines"),
        ("zz 01 : crc=57 YES\nzz t=1\n", "unreadable"),
    ],
)
def test_w1_slave_faults(text: str, words: str) -> None:
    result = parse_w1_slave(text)
    assert isinstance(result, ReadFailure) and words in result.reason


def test_file_group_reads_numbers_w1_and_reports_missing(tmp_path: Path) -> None:
    number = tmp_path / "temp"
    number.write_text("48312\n")
    w1 = tmp_path / "w1_slave"
    w1.write_text(GOOD_W1)
    assert FileGroup(0, signal("file", FileSpec(number)), interval_s=1).read(0) == [48312.0]
    assert FileGroup(0, signal("file", FileSpec(w1, "w1_slave")), interval_s=1).read(0) == [23.125]
    number.write_text("n/a")
    (bad,) = FileGroup(0, signal("file", FileSpec(number)), interval_s=1).read(0)
    assert isinstance(bad, ReadFailure) and "not a number" in bad.reason
    (missing,) = FileGroup(0, signal("file", FileSpec(tmp_path / "gone")), interval_s=1).read(0)
    assert isinstance(missing, ReadFailure) and "cannot read" in missing.reason
    number.write_text("open\n")
    state = signal("file", FileSpec(number), kind="state")
    assert FileGroup(0, state, interval_s=1).read(0) == ["open"]


# ---------------------------------------------------------------- commands


def run_command(argv: list[str], **kw: object) -> object:
    spec = CommandSpec(tuple(argv), **kw)  # type: ignore[arg-type]
    (result,) = CommandGroup(0, signal("command", spec), interval_s=1).read(0)
    return result


def test_command_reads_first_number_or_pattern() -> None:
    assert run_command(["echo", "temp=48.3'C"]) == 48.3
    assert run_command(["echo", "a 1 b 2.5e1"], pattern=r"b (\S+)") == 25.0


@pytest.mark.parametrize(
    ("argv", "kw", "words"),
    [
        ([sys.executable, "-c", "import time; time.sleep(5)"], {"timeout_s": 0.3}, "timed out"),
        ([sys.executable, "-c", "raise SystemExit(3)"], {}, "exit status 3"),
        (["/nonexistent/tool"], {}, "cannot run"),
        (["echo", "no digits"], {}, "no number"),
        (["echo", "x"], {"pattern": "y(\\d)"}, "did not match"),
    ],
)
def test_command_faults(argv: list[str], kw: dict[str, object], words: str) -> None:
    started = time.monotonic()
    result = run_command(argv, **kw)
    assert isinstance(result, ReadFailure) and words in result.reason
    assert time.monotonic() - started < 4  # the timeout killed the sleeper


# ---------------------------------------------------------------- sim


def test_sim_is_deterministic_and_bounded() -> None:
    spec = SimSpec(wave="sine", center=20, amplitude=5, wave_period_s=60, noise=0.5, seed=3)
    values = [sim_value(spec, 1_700_000_000_000 + i * 137) for i in range(1000)]
    assert values == [sim_value(spec, 1_700_000_000_000 + i * 137) for i in range(1000)]
    assert all(14.5 <= v <= 25.5 for v in values)
    assert len(set(values)) > 900
    steps = SimSpec(wave="steps", wave_period_s=1)
    assert [sim_value(steps, i * 1000) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    group = SimGroup([(4, signal("sim", steps, kind="state"))], interval_s=1)
    assert group.indexes == (4,) and group.read(1000) == [True]


# ---------------------------------------------------------------- modbus (pure)

_RANGES = {
    "int16": st.integers(-(2**15), 2**15 - 1),
    "uint16": st.integers(0, 2**16 - 1),
    "int32": st.integers(-(2**31), 2**31 - 1),
    "uint32": st.integers(0, 2**32 - 1),
    "float32": st.floats(width=32, allow_nan=False),
}


@given(
    st.sampled_from(sorted(_RANGES)).flatmap(lambda t: st.tuples(st.just(t), _RANGES[t])),
    st.sampled_from(["big", "little"]),
    st.sampled_from(["big", "little"]),
)
def test_register_codec_roundtrip(
    typed: tuple[str, float], byte_order: str, word_order: str
) -> None:
    kind, value = typed
    spec = ModbusSpec("plc", "holding", 0, kind, byte_order, word_order)  # type: ignore[arg-type]
    registers = encode_registers(value, spec)
    assert len(registers) == spec.width
    assert decode_registers(registers, spec) == value


def test_register_orders_match_the_usual_names() -> None:
    # 1.0f = 0x3F800000: ABCD, CDAB (word swap), BADC (byte swap), DCBA.
    def regs(byte_order: str, word_order: str) -> list[int]:
        spec = ModbusSpec("p", "holding", 0, "float32", byte_order, word_order)  # type: ignore[arg-type]
        return encode_registers(1.0, spec)

    assert regs("big", "big") == [0x3F80, 0x0000]
    assert regs("big", "little") == [0x0000, 0x3F80]
    assert regs("little", "big") == [0x803F, 0x0000]
    assert regs("little", "little") == [0x0000, 0x803F]


def test_spans_merge_neighbours_and_respect_limits() -> None:
    def spec(address: int, kind: str = "uint16") -> ModbusSpec:
        return ModbusSpec("p", "holding", address, kind)  # type: ignore[arg-type]

    items = [(0, spec(0)), (1, spec(1, "float32")), (2, spec(10)), (3, spec(100)), (4, spec(200))]
    spans = plan_spans(items)
    assert [(s.start, s.count) for s in spans] == [(0, 11), (100, 1), (200, 1)]
    wide = [(i, spec(i * 10)) for i in range(20)]  # 0..190: gaps of 9, but > 125 long
    assert all(s.count <= MAX_REGISTERS_PER_READ for s in plan_spans(wide))
    assert sum(len(s.members) for s in plan_spans(wide)) == 20


# ---------------------------------------------------------------- modbus against a stub


def modbus_group(
    stub: ModbusStub, specs: list[ModbusSpec], *, timeout_s: float = 0.3
) -> ModbusGroup:
    conn = ModbusConnection(ModbusDevice("plc", "127.0.0.1", stub.port, 1, timeout_s))
    return ModbusGroup(conn, [(i, signal("modbus", s)) for i, s in enumerate(specs)], interval_s=1)


def test_modbus_reads_a_batched_span(modbus_stub: ModbusStub) -> None:
    temp = ModbusSpec("plc", "holding", 0, "int16")
    flow = ModbusSpec("plc", "holding", 2, "float32", "big", "little")
    count = ModbusSpec("plc", "holding", 4, "uint32")
    modbus_stub.registers["holding"][0] = (-123) & 0xFFFF
    modbus_stub.registers["holding"][2:4] = encode_registers(12.5, flow)
    modbus_stub.registers["holding"][4:6] = encode_registers(70_000, count)
    group = modbus_group(modbus_stub, [temp, flow, count])
    assert group.read(0) == [-123, 12.5, 70_000]
    assert modbus_stub.requests == 1  # one request for all three
    group.close()


def test_modbus_coils_and_inputs(modbus_stub: ModbusStub) -> None:
    modbus_stub.bits["coil"][3] = True
    modbus_stub.registers["input"][7] = 42
    coils = modbus_group(modbus_stub, [ModbusSpec("plc", "coil", 3), ModbusSpec("plc", "coil", 4)])
    inputs = modbus_group(modbus_stub, [ModbusSpec("plc", "input", 7)])
    assert coils.read(0) == [True, False]
    assert inputs.read(0) == [42]


@pytest.mark.parametrize(
    ("mode", "words"),
    [("timeout", ""), ("garbage", ""), ("exception", "exception code 2"), ("short", "asked for")],
)
def test_modbus_faults_fail_the_read_and_recover(
    modbus_stub: ModbusStub, mode: str, words: str
) -> None:
    specs = [ModbusSpec("plc", "holding", 0), ModbusSpec("plc", "holding", 1)]
    group = modbus_group(modbus_stub, specs)
    modbus_stub.registers["holding"][0:2] = [5, 6]
    assert group.read(0) == [5, 6]
    modbus_stub.mode = mode  # type: ignore[assignment]
    started = time.monotonic()
    results = group.read(0)
    assert all(isinstance(r, ReadFailure) and words in r.reason for r in results)
    assert time.monotonic() - started < 3
    modbus_stub.mode = "ok"
    deadline = time.monotonic() + 5
    while group.read(0) != [5, 6]:
        assert time.monotonic() < deadline, "did not recover"
        time.sleep(0.1)


def test_modbus_device_that_disappears_costs_one_failure_per_poll(
    modbus_stub: ModbusStub,
) -> None:
    specs = [ModbusSpec("plc", "holding", 0), ModbusSpec("plc", "holding", 500)]  # two spans
    group = modbus_group(modbus_stub, specs)
    assert len(group.spans) == 2
    assert group.read(0) == [0, 0]
    port = modbus_stub.port
    modbus_stub.stop()
    results = group.read(0)
    assert all(isinstance(r, ReadFailure) for r in results)
    modbus_stub.start(port)
    assert group.read(0) == [0, 0]


# ---------------------------------------------------------------- mqtt payloads


def test_mqtt_field_extraction() -> None:
    numeric = signal("mqtt", MqttSpec("n", "t", "ENERGY.Power"))
    assert compile_field("a.b[0].c") == ("a", "b", 0, "c")
    assert extract(b'{"ENERGY":{"Power":12}}', ("ENERGY", "Power"), numeric) == 12.0
    assert extract(b"21.5", (), numeric) == 21.5
    missing = extract(b'{"ENERGY":{}}', ("ENERGY", "Power"), numeric)
    assert isinstance(missing, ReadFailure) and "no field" in missing.reason
    assert isinstance(extract(b"{oops", ("a",), numeric), ReadFailure)
    assert isinstance(extract(b"\xff", (), numeric), ReadFailure)
    state = signal("mqtt", MqttSpec("n", "t", "POWER"), kind="state")
    assert extract(b'{"POWER":"ON"}', ("POWER",), state) == "ON"
