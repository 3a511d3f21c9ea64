"""Pure tests of the models, fault rules, replay, map loading and 1-wire format."""

from __future__ import annotations

import itertools
import math
import tomllib
from pathlib import Path

import pytest

from millrace.errors import ConfigError
from millrace.fieldsim.const import STATE_PERIOD_SLOTS, STATE_SLOT_SECONDS
from millrace.fieldsim.faults import (
    DeviceFaults,
    Fault,
    faulted_value,
    load_fault_file,
    parse_fault_flag,
)
from millrace.fieldsim.models import machine_state_at, running_seconds_at, value_at
from millrace.fieldsim.onewire import crc8, millidegrees, render
from millrace.fieldsim.replay import Replay
from millrace.fieldsim.specs import load_plc_map, load_sensor_specs

T0 = 1_750_000_000.0
PLC = load_plc_map()
SPECS = {s.spec.name: s.spec for s in PLC.signals}


def test_value_is_a_pure_function_of_seed_device_signal_and_time() -> None:
    spec = SPECS["oven_temp"]
    first = [value_at(3, "gw0001-plc", spec, T0 + i) for i in range(20)]
    again = [value_at(3, "gw0001-plc", spec, T0 + i) for i in range(20)]
    assert first == again
    assert first != [value_at(4, "gw0001-plc", spec, T0 + i) for i in range(20)]
    assert first != [value_at(3, "gw0002-plc", spec, T0 + i) for i in range(20)]
    assert len(set(first)) > 10  # noise moves it every step


def test_value_holds_for_one_resolution_period() -> None:
    spec = SPECS["hydraulic_pressure"]
    assert spec.resolution_s == 1.0
    base = value_at(1, "d", spec, T0)
    assert all(value_at(1, "d", spec, T0 + f) == base for f in (0.0, 0.25, 0.5, 0.999))
    assert value_at(1, "d", spec, T0 + 1.0) != base


def test_analog_values_stay_near_their_level_and_inside_the_valid_range() -> None:
    for name in ("oven_temp", "coolant_temp", "air_pressure", "vibration_rms"):
        spec = SPECS[name]
        values = [
            value_at(0, f"gw{d:04d}-plc", spec, T0 + 997 * i) for d in range(5) for i in range(200)
        ]
        assert spec.valid_min <= min(values) and max(values) <= spec.valid_max, name


def test_machine_state_changes_only_on_slot_boundaries_and_takes_all_three_states() -> None:
    slot0 = math.floor(T0 / STATE_SLOT_SECONDS) * STATE_SLOT_SECONDS
    states = []
    for slot in range(300):
        start = slot0 + slot * STATE_SLOT_SECONDS
        state = machine_state_at(5, "d", start)
        assert machine_state_at(5, "d", start + STATE_SLOT_SECONDS - 0.001) == state
        states.append(state)
    assert set(states) == {0, 1, 2}
    assert states.count(0) > states.count(1) > states.count(2)


def test_running_seconds_closed_form_matches_a_slot_by_slot_sum() -> None:
    # Start one slot before the end of a period so the sum crosses the period boundary.
    period = STATE_PERIOD_SLOTS * STATE_SLOT_SECONDS
    start = (math.floor(T0 / period) + 1) * period - 3 * STATE_SLOT_SECONDS + 17.0
    total = running_seconds_at(9, "d", start)
    t = start
    for _ in range(8):
        slot_end = (math.floor(t / STATE_SLOT_SECONDS) + 1) * STATE_SLOT_SECONDS
        if machine_state_at(9, "d", t) == 0:
            total += slot_end - t
        t = slot_end
        assert running_seconds_at(9, "d", t) == pytest.approx(total, abs=1e-6)


def test_counters_never_decrease_and_follow_the_running_time() -> None:
    spec = SPECS["parts_count"]
    values = [value_at(2, "d", spec, T0 + 60 * i) for i in range(500)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    run = running_seconds_at(2, "d", T0 + 60 * 499) - running_seconds_at(2, "d", T0)
    assert values[-1] - values[0] == pytest.approx(run * spec.model.rate)


def test_running_coil_follows_the_machine_state() -> None:
    coil, state = SPECS["running"], SPECS["machine_state"]
    for i in range(0, 100_000, 301):
        s = value_at(1, "d", state, T0 + i)
        assert value_at(1, "d", coil, T0 + i) == (1.0 if s == 0 else 0.0)


def test_value_faults() -> None:
    spec = SPECS["coolant_temp"]
    faults = DeviceFaults.pin(
        [
            Fault("d", "stuck", 0, 10),
            Fault("d", "nan", 10, 10),
            Fault("gw", "out_of_range", 20, 10),
        ],
        device="d",
        gateway="gw",
        started_at=T0,
    )

    def served(t: float) -> float:
        return faulted_value(
            faults.value_fault(t, spec.name),
            seed=1,
            device="d",
            spec=spec,
            t=t,
            clean=value_at(1, "d", spec, t),
        )

    assert {served(T0 + i) for i in range(10)} == {value_at(1, "d", spec, T0)}
    assert all(math.isnan(served(T0 + i)) for i in range(10, 20))
    assert all(served(T0 + i) > spec.valid_max for i in range(20, 30))
    assert served(T0 + 31) == value_at(1, "d", spec, T0 + 31)


def test_spikes_hit_about_half_of_the_steps_by_several_valid_spans() -> None:
    spec = SPECS["oven_temp"]
    faults = DeviceFaults.pin([Fault("*", "spike")], device="d", gateway="g", started_at=T0)
    window = faults.value_fault(T0, spec.name)
    jumps = [
        faulted_value(window, seed=0, device="d", spec=spec, t=T0 + i, clean=0.0)
        for i in range(200)
    ]
    spiked = [j for j in jumps if j != 0.0]
    assert 60 < len(spiked) < 140
    assert all(abs(j) >= 2 * spec.valid_span for j in spiked)


def test_fault_flags_and_files(tmp_path: Path) -> None:
    assert parse_fault_flag("gw0002-plc:slow@10+30") == Fault("gw0002-plc", "slow", 10.0, 30.0)
    assert parse_fault_flag("*:dropout") == Fault("*", "dropout", 0.0, None)
    with pytest.raises(ConfigError, match="unknown fault kind"):
        parse_fault_flag("gw1:melt")
    with pytest.raises(ConfigError):
        parse_fault_flag("no-kind")
    schedule = tmp_path / "faults.toml"
    schedule.write_text(
        '[[fault]]\ntarget = "gw0001"\nkind = "slow"\nstart_s = 5\nduration_s = 10\ndelay_s = 1.5\n'
        '[[fault]]\ntarget = "gw0002-w1"\nkind = "bad_crc"\nsignals = ["temperature"]\n'
    )
    loaded = load_fault_file(schedule)
    assert loaded[0] == Fault("gw0001", "slow", 5.0, 10.0, 1.5)
    assert loaded[1].signals == ("temperature",) and loaded[1].duration_s is None
    schedule.write_text('[[fault]]\ntarget = "x"\nkind = "stuck"\nstart = 5\n')
    with pytest.raises(ConfigError, match="unknown field"):
        load_fault_file(schedule)


def test_faults_target_device_gateway_or_everything() -> None:
    faults = [Fault("gw0001", "stuck"), Fault("gw0002-plc", "nan"), Fault("*", "slow", 100)]
    pinned = DeviceFaults.pin(faults, device="gw0001-w1", gateway="gw0001", started_at=T0)
    assert [w.kind for w in pinned.windows] == ["stuck", "slow"]
    assert pinned.transport_at(T0 + 1) is None
    assert pinned.transport_at(T0 + 100).kind == "slow"  # type: ignore[union-attr]


def test_replay_serves_rows_at_real_and_accelerated_speed(tmp_path: Path) -> None:
    recording = tmp_path / "rec.csv"
    recording.write_text(
        "timestamp,signal,value\n"
        "2024-05-01T00:00:00,oven_temp,100\n"
        "2024-05-01T00:00:10,oven_temp,110\n"
        "2024-05-01T00:00:20,oven_temp,120\n"
    )
    real = Replay.from_csv(recording)
    real.bind(T0)
    assert real.lookup("d", "oven_temp", T0 + 5) == (100.0, T0)
    assert real.lookup("d", "oven_temp", T0 + 15) == (110.0, T0 + 10)
    assert real.lookup("d", "oven_temp", T0 + 35) == (100.0, T0 + 30)  # looped
    assert real.lookup("d", "coolant_temp", T0 + 5) is None
    fast = Replay.from_csv(recording, speed=10.0, loop=False)
    fast.bind(T0)
    assert fast.lookup("d", "oven_temp", T0 + 1.5) == (110.0, T0 + 1.0)
    assert fast.lookup("d", "oven_temp", T0 + 100) == (120.0, T0 + 2.0)


def test_replay_rows_can_name_a_device(tmp_path: Path) -> None:
    recording = tmp_path / "rec.csv"
    recording.write_text(
        "timestamp,signal,value,device\n0,flow,1,gw0001-plc\n0,flow,2,\n1,flow,3,gw0001-plc\n"
    )
    replay = Replay.from_csv(recording)
    replay.bind(T0)
    assert replay.lookup("gw0001-plc", "flow", T0 + 1.2)[0] == 3.0  # type: ignore[index]
    assert replay.lookup("gw0002-plc", "flow", T0 + 1.2)[0] == 2.0  # type: ignore[index]
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,signal,value\n0,flow,high\n")
    with pytest.raises(ConfigError, match=r"bad\.csv:2"):
        Replay.from_csv(bad)


def test_the_map_file_is_self_describing_and_covers_every_type_and_word_order() -> None:
    raw = tomllib.loads(
        (Path(__file__).parents[2] / "firmware-sim/fieldsim/plc_map.toml").read_text()
    )
    required = {"name", "table", "address", "type", "word_order", "scale", "unit"}
    for entry in raw["signal"]:
        assert required <= set(entry), entry["name"]
    combos = {
        (e["type"], e["word_order"])
        for e in raw["signal"]
        if e["type"] in ("int32", "uint32", "float32")
    }
    assert combos == {(t, o) for t in ("int32", "uint32", "float32") for o in ("big", "little")}
    assert {e["type"] for e in raw["signal"]} >= {"int16", "uint16", "bool"}
    assert {e["table"] for e in raw["signal"]} == {"holding", "input", "coil"}


def test_a_map_with_overlapping_registers_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "map.toml"
    bad.write_text(
        '[[signal]]\nname = "a"\ntable = "input"\naddress = 0\ntype = "float32"\n'
        '[[signal]]\nname = "b"\ntable = "input"\naddress = 1\ntype = "int16"\n'
    )
    with pytest.raises(ConfigError, match=r"signal\[1\]\.address"):
        load_plc_map(bad)


def test_sensor_specs_have_a_nested_json_field() -> None:
    specs = load_sensor_specs()
    assert "battery.voltage" in {s.path for s in specs.mqtt}
    assert specs.w1[0].spec.unit == "degC"


def test_w1_slave_text_matches_a_real_ds18b20() -> None:
    # A reading captured from a real sensor: 0x0172 = 23.125 degC.
    assert render(0x0172) == (
        "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
    )
    assert crc8(bytes.fromhex("7201 4b46 7fff 0e10")) == 0x57
    assert millidegrees(0xFF5E) == -10125  # -10.125 degC
    bad = render(0x0172, crc_ok=False).splitlines()[0]
    assert bad.endswith("NO") and "crc=57" not in bad
