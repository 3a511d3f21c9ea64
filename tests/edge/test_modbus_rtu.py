"""Modbus RTU over a real serial line: the edge driver against fieldsim's RTU slave on a pty.

The slave (fieldsim.rtu.RtuBus) serves the simulated PLC model on several unit ids
of one bus, logging every served value to the ground truth; the driver opens the
pty's slave side with pyserial like /dev/ttyUSB0. Faults: a corrupted CRC and a
silent slave, on one unit, while the other unit on the bus reads on.
"""

from __future__ import annotations

import csv
import math
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from millrace.edge.check import run_check
from millrace.edge.config import AgentConfig, ModbusRtuBus, ModbusSpec, parse_config
from millrace.edge.drivers.modbus import ModbusError, decode_registers, encode_registers
from millrace.edge.drivers.modbus_rtu import RtuBusConnection, crc16, read_request
from millrace.edge.pipeline import Pipeline
from millrace.edge.sampler import build_poll_groups, poll_once
from millrace.errors import ConfigError
from millrace.fieldsim.faults import DeviceFaults, Fault
from millrace.fieldsim.feed import Feed
from millrace.fieldsim.groundtruth import GroundTruth
from millrace.fieldsim.plc import PlcDevice
from millrace.fieldsim.rtu import RegisterBank, RtuBus
from millrace.fieldsim.specs import load_plc_map
from tests.edge.agent_helpers import MILLRACE

PLC_MAP = load_plc_map()
UNITS = (1, 2)
TIMEOUT_S = 0.15

HEAD = """
device_id = "gw0042"
[broker]
host = "broker.plant.example"
ca = "pki/ca.crt"
cert = "pki/gw.crt"
key = "pki/gw.key"
[outbox]
path = "outbox.sqlite"
[state]
dir = "state"
"""


def device(unit: int) -> str:
    return f"gw0042-rtu{unit}"


def plc_signals(units: tuple[int, ...] = UNITS) -> str:
    """One [[signals]] entry per PLC map signal and unit, as the edge example reads TCP."""
    out = []
    for unit in units:
        for sig in PLC_MAP.signals:
            lines = [
                "[[signals]]",
                f'metric = "u{unit}_{sig.spec.name}"',
                'driver = "modbus_rtu"',
                'bus = "line1"',
                f"unit_id = {unit}",
                f'table = "{sig.table}"',
                f"address = {sig.address}",
            ]
            if sig.type != "bool":
                lines += [f'type = "{sig.type}"', f'word_order = "{sig.word_order}"']
            lines.append(f"scale = {sig.scale!r}")
            out.append("\n".join(lines))
    return "\n".join(out)


def rtu_config(
    path: str, body: str, *, baudrate: int = 115200, stopbits: int = 1, retries: int = 1
) -> AgentConfig:
    # parity stays "none": a pty refuses PARENB (a real RS-485 adapter takes it).
    text = (
        HEAD
        + f'[modbus_rtu.line1]\nport = "{path}"\nbaudrate = {baudrate}\nstopbits = {stopbits}\n'
        + f"timeout_s = {TIMEOUT_S}\nretries = {retries}\n"
        + body
    )
    return parse_config(text, base=Path("/tmp"), source="edge.toml")


@pytest.fixture
def plant(tmp_path: Path) -> Iterator[tuple[RtuBus, GroundTruth]]:
    """Two simulated PLCs (units 1 and 2) on one pty bus, with a ground truth file."""
    gt = GroundTruth(tmp_path / "truth.csv")
    bus = RtuBus(name="line1")
    for unit in UNITS:
        plc = PlcDevice(
            device_id=device(unit),
            gateway="gw0042",
            host="",
            port=0,
            plc_map=PLC_MAP,
            feed=Feed(seed=7),
            faults=DeviceFaults.pin([], device=device(unit), gateway="gw0042", started_at=0.0),
            ground_truth=gt,
        )
        bus.attach(unit, plc)
    with bus:
        yield bus, gt
    gt.close()


def last_served(gt: GroundTruth) -> dict[tuple[str, str], dict[str, str]]:
    gt.flush()
    with gt.path.open() as handle:
        return {(row["device"], row["signal"]): row for row in csv.DictReader(handle)}


def poll_all(config: AgentConfig) -> Pipeline:
    """Every group of the config once, into a real pipeline (which counts errors per signal)."""
    pipe = Pipeline(config.signals, periods_s=[10], grace_ms=1000)
    threads = build_poll_groups(config)
    assert list(threads) == ["modbus_rtu:line1"]  # one poller for the whole bus
    for group in threads["modbus_rtu:line1"]:
        poll_once(group, pipe)
        group.close()
    return pipe


def errors_by_unit(config: AgentConfig, pipe: Pipeline) -> dict[int, set[int]]:
    found: dict[int, set[int]] = {unit: set() for unit in UNITS}
    for signal, errors in zip(config.signals, pipe.errors, strict=True):
        found[signal.spec.unit_id].add(errors)  # type: ignore[union-attr]
    return found


def test_rtu_values_match_the_simulators_ground_truth(plant: tuple[RtuBus, GroundTruth]) -> None:
    bus, gt = plant
    config = rtu_config(bus.path, plc_signals())
    report = run_check(config, mqtt_wait_s=0.0)  # `edge check` reads the bus
    assert report.failed == 0, report.to_text()
    served = last_served(gt)
    for result in report.signals:
        unit, name = result.metric[1:].split("_", 1)
        row = served[(device(int(unit)), name)]
        assert row["fault"] == ""
        assert result.value == pytest.approx(float(row["value"]), rel=1e-6, abs=1e-9), name
    assert bus.bad_requests == 0


def test_rtu_crc_error_fails_only_that_units_signals_and_recovers(
    plant: tuple[RtuBus, GroundTruth],
) -> None:
    bus, gt = plant
    config = rtu_config(bus.path, plc_signals())
    bus.set_fault(2, "bad_crc")
    pipe = poll_all(config)
    assert errors_by_unit(config, pipe) == {1: {0}, 2: {1}}  # one error per signal of unit 2
    for signal, reason in zip(config.signals, pipe.last_error, strict=True):
        if signal.spec.unit_id == 2:  # type: ignore[union-attr]
            assert reason == "garbled frame from unit 2: CRC error"
    assert last_served(gt)[(device(2), "oven_temp")]["fault"] == "bad_crc"
    bus.set_fault(2, None)
    pipe = poll_all(config)
    assert errors_by_unit(config, pipe) == {1: {0}, 2: {0}}


def test_rtu_silent_slave_times_out_and_the_other_unit_reads_on(
    plant: tuple[RtuBus, GroundTruth],
) -> None:
    bus, _ = plant
    config = rtu_config(bus.path, plc_signals(), retries=1)
    bus.set_fault(2, "silent")
    before = dict(bus.requests)
    pipe = poll_all(config)
    assert errors_by_unit(config, pipe) == {1: {0}, 2: {1}}
    reasons = {r for s, r in zip(config.signals, pipe.last_error, strict=True) if r}
    assert reasons == {f"no answer from unit 2 within {TIMEOUT_S:g} s"}
    # Three groups (input, holding, coil) for unit 2: the first asked once and retried once;
    # then the unit is known silent and the others are asked once, without retries; a
    # group's later spans are not tried after a timeout.
    assert bus.requests[2] - before.get(2, 0) == 2 + 1 + 1
    bus.set_fault(2, None)
    assert errors_by_unit(config, poll_all(config)) == {1: {0}, 2: {0}}


def test_rtu_silent_slave_is_not_retried_until_it_answers_again(
    plant: tuple[RtuBus, GroundTruth],
) -> None:
    bus, _ = plant
    conn = RtuBusConnection(ModbusRtuBus("line1", bus.path, 115200, timeout_s=TIMEOUT_S, retries=2))
    try:
        bus.set_fault(2, "silent")
        for expected in (3, 1, 1):  # 1 + 2 retries, then once per read while silent
            before = bus.requests.get(2, 0)
            with pytest.raises(ModbusError, match="no answer from unit 2"):
                conn.read("holding", 0, 2, 2)
            assert bus.requests[2] - before == expected
        bus.set_fault(2, "bad_crc")  # an answer, even a garbled one, is not silence...
        with pytest.raises(ModbusError, match="CRC error"):
            conn.read("holding", 0, 2, 2)
        assert 2 not in conn.silent
        bus.set_fault(2, "silent")
        with pytest.raises(ModbusError, match="no answer"):
            conn.read("holding", 0, 2, 2)
        bus.set_fault(2, None)
        assert len(conn.read("holding", 0, 2, 2)) == 2  # ...and a good one clears it
        assert 2 not in conn.silent
    finally:
        conn.close()


def test_rtu_keeps_three_and_a_half_characters_of_silence_between_frames(
    plant: tuple[RtuBus, GroundTruth],
) -> None:
    bus, _ = plant
    # 1200 baud 8N2: 11 bits a character, 3.5 characters = 32 ms of silence.
    config = rtu_config(bus.path, plc_signals(), baudrate=1200, stopbits=2)
    gap = config.modbus_rtu["line1"].frame_gap_s
    assert gap == pytest.approx(3.5 * 11 / 1200)
    poll_all(config)
    assert len(bus.gaps_s) >= 5  # six groups: five gaps after the first reply
    assert min(bus.gaps_s) >= gap


def test_rtu_frame_gap_follows_the_line_settings() -> None:
    assert ModbusRtuBus("b", "/dev/x", baudrate=9600).frame_gap_s == pytest.approx(35 / 9600)
    assert ModbusRtuBus("b", "/dev/x", 9600, "odd", 2).frame_gap_s == pytest.approx(42 / 9600)
    assert ModbusRtuBus("b", "/dev/x", baudrate=115200).frame_gap_s == 0.00175


def test_rtu_request_frame_and_crc() -> None:
    # Read 2 holding registers at 0 from unit 1: the spec's example frame 01 03 00 00 00 02 C4 0B.
    assert read_request(1, "holding", 0, 2) == bytes.fromhex("010300000002c40b")
    assert crc16(b"123456789") == 0x4B37  # CRC-16/MODBUS check value


def test_rtu_unknown_unit_and_illegal_address(plant: tuple[RtuBus, GroundTruth]) -> None:
    bus, _ = plant
    conn = RtuBusConnection(ModbusRtuBus("line1", bus.path, 115200, timeout_s=TIMEOUT_S, retries=0))
    try:
        with pytest.raises(Exception, match="no answer from unit 9"):
            conn.read("holding", 0, 1, 9)
        with pytest.raises(Exception, match="exception code 2 \\(illegal data address\\)") as info:
            conn.read("holding", 500, 1, 1)
        assert info.value.device_ok  # type: ignore[attr-defined]
        assert conn.read("holding", 2, 1, 1)[0] in (0, 1, 2)  # machine_state
    finally:
        conn.close()


def test_rtu_missing_port_is_one_failure_per_signal_naming_the_port(tmp_path: Path) -> None:
    missing = tmp_path / "ttyUSB9"
    config = rtu_config(str(missing), plc_signals((1,)))
    report = run_check(config, mqtt_wait_s=0.0)
    assert report.failed == len(config.signals)
    assert all(f"cannot open {missing}" in s.problem for s in report.signals)


# ------------------------------------------------------- wider types, RTU and TCP alike

WIDE_SIGNALS = """
[[signals]]
metric = "energy_wh"
{where}
table = "holding"
address = 0
type = "uint64"
[[signals]]
metric = "offset_raw"
{where}
table = "holding"
address = 4
type = "int64"
word_order = "little"
[[signals]]
metric = "flow_precise"
{where}
table = "input"
address = 0
type = "float64"
[[signals]]
metric = "flow_swapped"
{where}
table = "input"
address = 4
type = "float64"
byte_order = "little"
word_order = "little"
[[signals]]
metric = "serial_no"
{where}
kind = "enum"
table = "holding"
address = 10
type = "string"
length = 5
[[signals]]
metric = "door_open"
{where}
table = "input"
address = 20
bit = 3
[[signals]]
metric = "pump_fault"
{where}
kind = "state"
table = "input"
address = 20
bit = 15
"""
WIDE_EXPECTED = {
    "energy_wh": float(2**53 + 2),
    "offset_raw": float(-(2**40) - 5),
    "flow_precise": 12.3456789012345,
    "flow_swapped": -0.000123456789,
    "serial_no": "AB-12345",
    "door_open": 1.0,
    "pump_fault": False,
}


def wide_registers() -> tuple[dict[int, int], dict[int, int]]:
    """The tables, packed with struct here (independently of the driver's codec)."""

    def words(data: bytes) -> list[int]:
        return list(struct.unpack(f">{len(data) // 2}H", data))

    holding: dict[int, int] = {}
    inputs: dict[int, int] = {}
    holding.update(enumerate(words(struct.pack(">Q", 2**53 + 2))))
    holding.update(enumerate(words(struct.pack(">q", -(2**40) - 5))[::-1], start=4))
    holding.update(enumerate(words(b"AB-12345\0\0"), start=10))
    inputs.update(enumerate(words(struct.pack(">d", 12.3456789012345))))
    swapped = struct.pack("<d", -0.000123456789)  # DCBA...: every byte reversed
    inputs.update(enumerate(words(swapped), start=4))
    inputs[20] = 0b0000_0000_0000_1000  # bit 3 set, bit 15 clear
    return holding, inputs


def assert_wide(config: AgentConfig) -> None:
    report = run_check(config, mqtt_wait_s=0.0)
    assert report.failed == 0, report.to_text()
    for result in report.signals:
        want = WIDE_EXPECTED[result.metric]
        if isinstance(want, float):
            assert isinstance(result.value, float)
            assert math.isclose(result.value, want, rel_tol=1e-15), result.metric
        else:
            assert result.value == want, result.metric


def test_rtu_wide_types_strings_and_bits() -> None:
    holding, inputs = wide_registers()
    with RtuBus(name="line1") as bus:
        bus.attach(5, RegisterBank(holding=holding, input=inputs))
        assert_wide(
            rtu_config(
                bus.path,
                WIDE_SIGNALS.format(where='driver = "modbus_rtu"\nbus = "line1"\nunit_id = 5'),
            )
        )


def test_tcp_wide_types_strings_and_bits(modbus_stub) -> None:  # type: ignore[no-untyped-def]
    holding, inputs = wide_registers()
    for address, word in holding.items():
        modbus_stub.registers["holding"][address] = word
    for address, word in inputs.items():
        modbus_stub.registers["input"][address] = word
    text = HEAD + f'[modbus.plc]\nhost = "127.0.0.1"\nport = {modbus_stub.port}\n'
    text += WIDE_SIGNALS.format(where='driver = "modbus"\ndevice = "plc"')
    assert_wide(parse_config(text, base=Path("/tmp"), source="edge.toml"))


def test_tcp_signal_unit_id_overrides_the_devices(modbus_stub) -> None:  # type: ignore[no-untyped-def]
    """A TCP-to-RTU gateway: signals of one [modbus.<name>] device address several slaves."""
    modbus_stub.registers["holding"][0] = 42
    text = HEAD + f'[modbus.gw]\nhost = "127.0.0.1"\nport = {modbus_stub.port}\nunit_id = 1\n'
    for metric, unit in (("a", ""), ("b", "unit_id = 7\n"), ("c", "unit_id = 9\n")):
        text += (
            f'[[signals]]\nmetric = "{metric}"\ndriver = "modbus"\ndevice = "gw"\n{unit}'
            'table = "holding"\naddress = 0\n'
        )
    report = run_check(parse_config(text, base=Path("/tmp"), source="e.toml"), mqtt_wait_s=0.0)
    assert report.failed == 0 and [s.value for s in report.signals] == [42.0] * 3
    assert sorted(modbus_stub.units) == [1, 7, 9]  # one request per unit, not one merged


def test_rtu_port_is_allowed_by_the_gateways_systemd_unit() -> None:
    """The bundle's unit lets the agent open the bus's serial port (and only named devices)."""
    from millrace.ops.provision import config_devices, render_unit, unit_context

    port = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10K1234-if00-port0"
    text = HEAD + f'[modbus_rtu.line1]\nport = "{port}"\n' + plc_signals((1,))
    parse_config(text, base=Path("/tmp"), source="edge.toml")  # a valid config
    assert config_devices(text) == [port]
    unit = render_unit(unit_context("gw0042", devices=config_devices(text)))
    assert f"DeviceAllow={port} rw" in unit
    assert "SupplementaryGroups=dialout" in unit


# ------------------------------------------------------------------- config errors

BUS = '[modbus_rtu.line1]\nport = "/dev/ttyUSB0"\n'
SIGNAL = (
    '[[signals]]\nmetric = "m"\ndriver = "modbus_rtu"\nbus = "line1"\nunit_id = 3\n'
    'table = "holding"\naddress = 0\n'
)


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        (BUS + 'parity = "mark"\n' + SIGNAL, "modbus_rtu.line1.parity", "none, even, odd"),
        (BUS + "bytesize = 7\n" + SIGNAL, "modbus_rtu.line1.bytesize", "Modbus ASCII"),
        (BUS + "stopbits = 3\n" + SIGNAL, "modbus_rtu.line1.stopbits", "[1, 2]"),
        (BUS + "baudrate = 9600.5\n" + SIGNAL, "modbus_rtu.line1.baudrate", "integer"),
        (BUS + "flow_control = 1\n" + SIGNAL, "modbus_rtu.line1.flow_control", ""),
        (
            BUS + '[modbus_rtu.line2]\nport = "/dev/ttyUSB0"\n' + SIGNAL,
            "modbus_rtu.line2.port",
            "already [modbus_rtu.line1]",
        ),
        (BUS + SIGNAL.replace('"line1"', '"line9"'), "signals[0].bus", "[modbus_rtu.<name>]"),
        (BUS + SIGNAL.replace("unit_id = 3\n", ""), "signals[0].unit_id", ""),
        (BUS + SIGNAL.replace("unit_id = 3", "unit_id = 0"), "signals[0].unit_id", "[1, 247]"),
        (BUS + SIGNAL + 'type = "string"\n', "signals[0].length", ""),
        (BUS + SIGNAL + 'type = "string"\nlength = 4\n', "signals[0].type", 'kind = "enum"'),
        (BUS + SIGNAL + "length = 4\n", "signals[0].length", "only string values"),
        (BUS + SIGNAL + 'type = "float32"\nbit = 2\n', "signals[0].bit", "16-bit register"),
        (BUS + SIGNAL + "bit = 16\n", "signals[0].bit", "[0, 15]"),
        (BUS + SIGNAL.replace("holding", "coil") + "bit = 1\n", "signals[0].bit", "single bits"),
        (BUS + SIGNAL + 'device = "plc"\n', "signals[0].device", "modbus key"),
        (BUS + SIGNAL + 'type = "int128"\n', "signals[0].type", "float64, string"),
    ],
)
def test_rtu_config_errors_name_the_key(body: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD + body, base=Path("/tmp"), source="edge.toml")
    assert info.value.key == key
    assert words in info.value.problem


def test_edge_check_cli_reads_an_rtu_bus_and_names_the_driver(
    plant: tuple[RtuBus, GroundTruth], tmp_path: Path
) -> None:
    bus, _ = plant
    (tmp_path / "pki").mkdir()
    for name in ("ca.crt", "gw.crt", "gw.key"):  # checked for existence only
        (tmp_path / "pki" / name).write_text("placeholder\n")
    config = tmp_path / "edge.toml"
    config.write_text(
        HEAD
        + f'[modbus_rtu.line1]\nport = "{bus.path}"\nbaudrate = 19200\ntimeout_s = {TIMEOUT_S}\n'
        + plc_signals((1,))
    )
    bus.set_fault(2, "silent")  # not configured: no effect on unit 1
    done = subprocess.run(
        [str(MILLRACE), "edge", "check", "--config", str(config), "--no-broker"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("u1_")]
    assert len(lines) == len(PLC_MAP.signals)
    assert all("modbus_rtu" in line and line.endswith("ok") for line in lines)


def test_rtu_scheduled_fault_window_garbles_then_recovers(tmp_path: Path) -> None:
    """A fault from the fleet's schedule (not forced): bad_crc for the unit's device only."""
    gt = GroundTruth(tmp_path / "truth.csv")
    bus = RtuBus(name="line1")
    now = time.time()
    schedule = [Fault(target=device(2), kind="bad_crc", start_s=0.0, duration_s=None)]
    for unit in UNITS:
        faults = DeviceFaults.pin(schedule, device=device(unit), gateway="gw0042", started_at=now)
        plc = PlcDevice(
            device_id=device(unit),
            gateway="gw0042",
            host="",
            port=0,
            plc_map=PLC_MAP,
            feed=Feed(seed=7),
            faults=faults,
            ground_truth=gt,
        )
        bus.attach(unit, plc, faults)
    with bus:
        config = rtu_config(bus.path, plc_signals())
        pipe = poll_all(config)
    gt.close()
    assert errors_by_unit(config, pipe) == {1: {0}, 2: {1}}
    faults_logged = {(row["device"], row["fault"]) for row in csv.DictReader(gt.path.open())}
    assert (device(2), "bad_crc") in faults_logged
    assert all(fault == "" for dev, fault in faults_logged if dev == device(1))


@given(
    st.sampled_from(["int64", "uint64", "float64"]),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.sampled_from(["big", "little"]),
    st.sampled_from(["big", "little"]),
)
def test_wide_register_codec_roundtrip(
    kind: str, bits: int, byte_order: str, word_order: str
) -> None:
    spec = ModbusSpec("p", "holding", 0, kind, byte_order, word_order)  # type: ignore[arg-type]
    raw = bits.to_bytes(8, "big")
    value = struct.unpack({"int64": ">q", "uint64": ">Q", "float64": ">d"}[kind], raw)[0]
    registers = encode_registers(value, spec)
    assert len(registers) == spec.width == 4
    decoded = decode_registers(registers, spec)
    if kind == "float64" and math.isnan(value):
        assert isinstance(decoded, float) and math.isnan(decoded)
    else:
        assert decoded == value


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=12))
def test_string_codec_roundtrip(text: str) -> None:
    for byte_order in ("big", "little"):
        spec = ModbusSpec("p", "holding", 0, "string", byte_order, length=6)  # type: ignore[arg-type]
        assert decode_registers(encode_registers(text, spec), spec) == text
