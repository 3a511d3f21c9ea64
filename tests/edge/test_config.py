"""Config loading: the example is valid; every mistake names its key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from millrace.configfile import BrokerConnection
from millrace.edge.config import (
    FileSpec,
    ModbusSpec,
    MqttSpec,
    load_config,
    parse_config,
)
from millrace.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "edge" / "example.toml"

MINIMAL = """
device_id = "dev-a"
[broker]
host = "localhost"
ca = "pki/ca.crt"
cert = "pki/dev-a.crt"
key = "pki/dev-a.key"
[outbox]
path = "outbox.sqlite"
[state]
dir = "state"
[[signals]]
metric = "t1"
driver = "sim"
"""


def parse(text: str) -> object:
    return parse_config(text, base=Path("/etc/millrace"), source="edge.toml")


def test_example_config_is_valid_and_complete() -> None:
    config = load_config(EXAMPLE)
    assert config.device_id == "press-01"
    assert config.windows.periods_s == (10, 60)
    assert {s.driver for s in config.signals} == {"modbus", "mqtt", "file", "command", "sim"}
    assert {s.kind for s in config.signals} == {"numeric", "state", "enum"}
    pressure = config.signal("press.pressure")
    assert pressure is not None and isinstance(pressure.spec, ModbusSpec)
    assert pressure.spec.type == "float32" and pressure.spec.word_order == "little"
    assert pressure.deadband == 0.05
    power = config.signal("hall.power")
    assert power is not None and isinstance(power.spec, MqttSpec)
    assert power.spec.field == "ENERGY.Power" and not power.polled
    mode = config.signal("press.mode")
    assert mode is not None and mode.states["2"] == "run"
    assert len(config.config_hash) == 16


def test_defaults_and_relative_paths() -> None:
    config = parse_config(MINIMAL, base=Path("/etc/millrace"))
    assert config.broker.port == 8883
    assert config.broker.ca == Path("/etc/millrace/pki/ca.crt")
    assert isinstance(config.broker, BrokerConnection)  # the ingest worker's type too
    assert config.outbox.path == Path("/etc/millrace/outbox.sqlite")
    assert config.state_dir == Path("/etc/millrace/state")
    assert config.windows.period_s == 10 and config.windows.grace_s == 2.0
    signal = config.signals[0]
    assert signal.kind == "numeric" and signal.poll_s == 1.0
    assert signal.valid_min == -math.inf and signal.valid_max == math.inf


def test_config_hash_changes_with_content() -> None:
    a = parse_config(MINIMAL, base=Path("/"))
    b = parse_config(MINIMAL.replace('"t1"', '"t2"'), base=Path("/"))
    assert a.config_hash != b.config_hash


def _with_signal(extra: str, *, driver: str = "sim", head: str = "") -> str:
    return (
        MINIMAL
        + head
        + f"""
[[signals]]
metric = "bad"
driver = "{driver}"
{extra}
"""
    )


MODBUS_HEAD = """
[modbus.plc1]
host = "plc1.plant.example"
"""


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (MINIMAL.replace('device_id = "dev-a"', 'device_id = "Dev A"'), "device_id", "a-z"),
        (MINIMAL.replace('device_id = "dev-a"', ""), "device_id", "missing"),
        (MINIMAL.replace('host = "localhost"', "host = 5"), "broker.host", "expected a string"),
        (MINIMAL + "\n[windows]\nperiod_s = 0\n", "windows.period_s", "outside"),
        (MINIMAL + "\n[windows]\nperiod_s = 1\ngrace_s = 1\n", "windows.grace_s", "shorter"),
        (MINIMAL + "\n[windows]\nextra_periods_s = [60, 'x']\n", "windows.extra_periods_s[1]", ""),
        (MINIMAL.replace("[outbox]", "[outbox]\nmax_bytes = 10"), "outbox.max_bytes", "outside"),
        (
            MINIMAL.replace("[state]\n", "[heartbeat]\nintervl_s = 3\n[state]\n"),
            "heartbeat.intervl_s",
            "did you mean 'interval_s'",
        ),
        ("colour = 1\n" + MINIMAL, "colour", "unknown key"),
        (_with_signal('scale = "x"'), "signals[1].scale", "expected a number"),
        (_with_signal("scale = 0"), "signals[1].scale", "must not be 0"),
        (_with_signal("poll_s = 0"), "signals[1].poll_s", "outside"),
        (_with_signal("valid_min = 5\nvalid_max = 1"), "signals[1].valid_max", "below"),
        (_with_signal('kind = "enum"\ndeadband = 1'), "signals[1].deadband", "only numeric"),
        (_with_signal('states = { "0" = "a" }'), "signals[1].states", "only enum"),
        (_with_signal('kind = "gauge"'), "signals[1].kind", "numeric, state, enum"),
        (_with_signal('topic = "x"'), "signals[1].topic", "is a mqtt key"),
        (_with_signal("", driver="modem"), "signals[1].driver", "not one of"),
        (
            _with_signal('metric = "t1"').replace('metric = "bad"\n', ""),
            "signals[1].metric",
            "already used by signals[0]",
        ),
        (
            _with_signal(
                'device = "plc2"\ntable = "holding"\naddress = 0', driver="modbus", head=MODBUS_HEAD
            ),
            "signals[1].device",
            "did you mean 'plc1'",
        ),
        (
            _with_signal(
                'device = "plc1"\ntable = "holding"\naddress = 70000',
                driver="modbus",
                head=MODBUS_HEAD,
            ),
            "signals[1].address",
            "outside",
        ),
        (
            _with_signal(
                'device = "plc1"\ntable = "holding"\naddress = 65535\ntype = "float32"',
                driver="modbus",
                head=MODBUS_HEAD,
            ),
            "signals[1].address",
            "runs past",
        ),
        (
            _with_signal(
                'device = "plc1"\ntable = "coil"\naddress = 1\ntype = "int16"',
                driver="modbus",
                head=MODBUS_HEAD,
            ),
            "signals[1].type",
            "single bits",
        ),
        (
            _with_signal(
                'source = "x"\ntopic = "a/#"', driver="mqtt", head='[local_mqtt.x]\nhost = "h"\n'
            ),
            "signals[1].topic",
            "wildcards",
        ),
        (
            _with_signal(
                'source = "x"\ntopic = "a"\npoll_s = 1',
                driver="mqtt",
                head='[local_mqtt.x]\nhost = "h"\n',
            ),
            "signals[1].poll_s",
            "pushed",
        ),
        (_with_signal('command = "ls -l"', driver="command"), "signals[1].command", "argv"),
        (
            _with_signal('command = ["ls"]\npattern = "("', driver="command"),
            "signals[1].pattern",
            "regular expression",
        ),
        (_with_signal('path = "/x"\nformat = "csv"', driver="file"), "signals[1].format", ""),
        (MINIMAL.replace("[[signals]]", "[[nosignals]]"), "signals", "missing"),
        ("device_id = [", "config", "not valid TOML"),
    ],
)
def test_errors_name_the_key(text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert caught.value.key == key
    assert words in caught.value.problem
    assert str(caught.value).startswith(f"edge.toml: {key}: ")


def test_file_signal_paths_resolve_against_the_config(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(_with_signal('path = "w1/28-1/w1_slave"\nformat = "w1_slave"', driver="file"))
    config = load_config(path)
    spec = config.signals[1].spec
    assert isinstance(spec, FileSpec)
    assert spec.path == tmp_path / "w1" / "28-1" / "w1_slave"
    assert config.source == path


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_with_settings_applies_period_and_poll() -> None:
    config = parse_config(MINIMAL, base=Path("/"))
    changed = config.with_settings(period_s=5, poll_s={"t1": 0.25, "unknown": 3.0})
    assert changed.windows.period_s == 5
    assert changed.signals[0].poll_s == 0.25
    assert config.signals[0].poll_s == 1.0
