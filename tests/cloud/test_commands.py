"""`millrace cmd` against the real TLS broker, with a tiny responder acting as the device."""

from __future__ import annotations

import argparse
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from millrace import topics
from millrace.cloud.commands import (
    EXIT_DEVICE_ERROR,
    EXIT_OK,
    EXIT_TIMEOUT,
    CommandError,
    add_arguments,
    broker_targets,
    parse_command_args,
    run_cmd,
)
from millrace.errors import ConfigError, MillraceError
from millrace.wire import Command, CommandReply

SERVICE = "svc-test"
WAIT_SECONDS = 10.0


def parse(argv: list[str]) -> argparse.Namespace:
    """The same shape cloud/cli.py builds: DEVICE NAME ARGS plus add_arguments()."""
    parser = argparse.ArgumentParser()
    parser.add_argument("device")
    parser.add_argument("name")
    parser.add_argument("args", nargs="*")
    add_arguments(parser)
    return parser.parse_args(argv)


def tls_flags(broker: Any) -> list[str]:
    cert, key = broker.pki.files(SERVICE)
    return [
        "--broker-host",
        broker.host,
        "--port",
        str(broker.port),
        "--ca",
        str(broker.ca),
        "--cert",
        str(cert),
        "--key",
        str(key),
    ]


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_cmd(parse(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def start_responder(
    mqtt_connect: Callable[..., paho.Client], device: str, seen: list[Command]
) -> paho.Client:
    """A device that replies ok (echoing its args), or an error when asked to `lockout`.

    Only real command names (edge/commands.py) have reply topics the broker lets a device
    publish on, so the failure is an argument, not an invented command.
    """
    client = mqtt_connect(f"{device}-responder", device)
    subscribed = threading.Event()

    def on_message(c: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        command = Command.from_json(msg.payload)
        seen.append(command)
        if command.args.get("lockout"):
            reply = CommandReply(id=command.id, ok=False, error="valve is locked out")
        else:
            reply = CommandReply(id=command.id, ok=True, result={"echo": command.args})
        c.publish(topics.reply_topic(device, command.name), reply.to_json(), qos=1)

    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.subscribe(topics.cmd_filter(device), qos=1)
    assert subscribed.wait(WAIT_SECONDS)
    return client


def test_args_are_json_where_they_parse() -> None:
    assert parse_command_args(["n=3", "on=true", "name=pump 2", "x=[1,2]", "s=", "f=NaN"]) == {
        "n": 3,
        "on": True,
        "name": "pump 2",
        "x": [1, 2],
        "s": "",
        "f": "NaN",
    }
    with pytest.raises(ConfigError, match="not key=value"):
        parse_command_args(["oops"])
    with pytest.raises(ConfigError, match="twice"):
        parse_command_args(["a=1", "a=2"])


def test_missing_broker_settings_and_bad_names_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--broker-host"):
        run(["dev-a", "ping"])
    with pytest.raises(MillraceError, match="invalid device id"):
        run(["Not A Device", "ping", "--broker-host", "x"])
    with pytest.raises(MillraceError, match="invalid command name"):
        run(["dev-a", "no/slash", "--broker-host", "x"])
    with pytest.raises(ConfigError, match="--timeout"):
        run(["dev-a", "ping", "--timeout", "0"])


def test_broker_target_reads_the_ingest_config_like_ingest_does(tmp_path: Path) -> None:
    config = tmp_path / "ingest.toml"
    config.write_text('[broker]\nhost = "b"\nca = "pki/ca.crt"\ncert = "c.crt"\nkey = "c.key"\n')
    [target] = broker_targets(parse(["dev-a", "ping", "--config", str(config), "--port", "1884"]))
    assert (target.host, target.port) == ("b", 1884)
    assert target.ca == tmp_path / "pki" / "ca.crt" and target.key == tmp_path / "c.key"
    config.write_text('[broker]\nhost = "b"\nport = 0\n')
    with pytest.raises(ConfigError) as caught:
        broker_targets(parse(["dev-a", "ping", "--config", str(config)]))
    assert (caught.value.key, caught.value.problem) == ("broker.port", "0 is outside [1, 65535]")
    config.write_text('[database]\ndsn = "postgresql://x"\n')
    with pytest.raises(ConfigError) as caught:
        broker_targets(parse(["dev-a", "ping", "--config", str(config)]))
    assert (caught.value.key, caught.value.problem) == ("broker", "missing table")


@pytest.mark.integration
def test_reply_ok_and_device_error(broker: Any, mqtt_connect: Callable[..., paho.Client]) -> None:
    seen: list[Command] = []
    start_responder(mqtt_connect, "dev-a", seen)

    code, out, err = run(["dev-a", "set", "setpoint=42.5", "mode=auto", *tls_flags(broker)])
    assert (code, err) == (EXIT_OK, "")
    reply = CommandReply.from_json(out.strip().encode())
    assert reply.ok
    assert reply.result == {"echo": {"setpoint": 42.5, "mode": "auto"}}
    assert [c.name for c in seen] == ["set"]
    assert reply.id == seen[0].id and len(seen[0].id) == 32

    code, out, _ = run(["dev-a", "set", "lockout=true", *tls_flags(broker)])
    assert code == EXIT_DEVICE_ERROR
    assert json.loads(out)["error"] == "valve is locked out"
    assert seen[1].id != seen[0].id  # a fresh id per invocation


@pytest.mark.integration
def test_no_reply_is_a_clear_timeout(broker: Any) -> None:
    # dev-b has nobody listening for its commands.
    code, out, err = run(["dev-b", "ping", "--timeout", "1", *tls_flags(broker)])
    assert code == EXIT_TIMEOUT
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "no reply from dev-b to 'ping'" in err and "within 1 s" in err


@pytest.mark.integration
def test_broker_settings_from_the_ingest_config(
    broker: Any, mqtt_connect: Callable[..., paho.Client], tmp_path: Path
) -> None:
    start_responder(mqtt_connect, "dev-a", [])
    cert, key = broker.pki.files(SERVICE)
    config = tmp_path / "ingest.toml"
    config.write_text(
        f'[database]\ndsn = "postgresql://unused"\n\n[broker]\nhost = "{broker.host}"\n'
        f'port = {broker.port}\nca = "{broker.ca}"\ncert = "{cert}"\nkey = "{key}"\n'
        'client_id = "ingest-1"\n'
    )
    code, out, _ = run(["dev-a", "ping", "--config", str(config)])
    assert code == EXIT_OK
    assert json.loads(out)["ok"] is True


@pytest.mark.integration
def test_device_certificate_cannot_send_commands(broker: Any) -> None:
    # A device certificate may not command another device: the broker already refuses
    # the subscription to the reply topic (SUBACK 0x87), before anything is published.
    cert, key = broker.pki.files("dev-b")
    argv = ["dev-a", "ping", "--broker-host", broker.host, "--port", str(broker.port)]
    argv += ["--ca", str(broker.ca), "--cert", str(cert), "--key", str(key), "--timeout", "1"]
    with pytest.raises(CommandError, match=r"refused the reply subscription.*service cert"):
        run(argv)


def test_broker_targets_are_every_broker_of_the_config_or_of_the_flags(tmp_path: Path) -> None:
    config = tmp_path / "ingest.toml"
    files = 'ca = "ca.crt"\ncert = "c.crt"\nkey = "c.key"\n'
    config.write_text(f'[broker]\nhosts = ["a.example:8883", "b.example:8884"]\n{files}')
    targets = broker_targets(parse(["dev-a", "ping", "--config", str(config)]))
    assert [(t.host, t.port) for t in targets] == [("a.example", 8883), ("b.example", 8884)]
    flags = ["--broker-host", "c.example", "--broker-host", "d.example:1884", "--port", "1883"]
    targets = broker_targets(parse(["dev-a", "ping", "--config", str(config), *flags]))
    assert [(t.host, t.port) for t in targets] == [("c.example", 1883), ("d.example", 1884)]
    config.write_text(f'[broker]\nhosts = ["a.example", "b.example:x"]\n{files}')
    with pytest.raises(ConfigError) as caught:
        broker_targets(parse(["dev-a", "ping", "--config", str(config)]))
    assert caught.value.key == "broker.hosts[1]"
