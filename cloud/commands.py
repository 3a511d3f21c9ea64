"""`millrace cmd DEVICE NAME [key=value ...]`: send a command, print the device's reply.

The reply topic is subscribed before the command is published, so a fast
device cannot answer into the void. The command carries a fresh id (the agent
applies an id once) and an MQTT v5 message expiry equal to the timeout: a
device that is offline now will not act on a stale command hours later.

A plant with several brokers (`[broker] hosts`, or `--broker-host` repeated): the
device is on one of them, and which one can change at any moment (failover). The
command goes to every broker with the same id and the first reply wins: a device
that moves while it runs may get it twice and applies it once (edge/commands.py
keeps the reply per id). A broker that cannot be reached is reported and skipped
while another one takes the command.

Exit codes: 0 the device replied ok, 1 the device replied with an error,
3 no reply within the timeout; configuration and connection problems raise
MillraceError (the CLI prints one line and exits 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import queue
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from millrace import errors, topics
from millrace.configfile import DEFAULT_BROKER_PORT, Table, parse_endpoint, read_toml
from millrace.errors import ConfigError, MillraceError, UnreachableError, WireError
from millrace.wire import Command, CommandReply

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS: Final = 10.0
# Connecting and subscribing get their own budget so a slow TLS handshake does not eat
# the device's reply time.
CONNECT_TIMEOUT_SECONDS: Final = 10.0
EXIT_OK: Final = errors.EXIT_OK
EXIT_DEVICE_ERROR: Final = errors.EXIT_FAILED
# No reply in time: the device (or the path to it) did not answer.
EXIT_TIMEOUT: Final = errors.EXIT_UNREACHABLE


class CommandError(MillraceError):
    """`millrace cmd` cannot send the command (broker unreachable, refused, bad arguments)."""


@dataclass(frozen=True, slots=True)
class BrokerTarget:
    """Where and as whom `millrace cmd` connects (a service certificate)."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `run_cmd` reads (cloud/cli.py adds DEVICE NAME ARGS itself)."""
    parser.add_argument("--config", type=Path, help="ingest TOML file; its [broker] table is used")
    parser.add_argument(
        "--broker-host",
        action="append",
        metavar="HOST[:PORT]",
        help="broker (overrides --config); repeat for every broker of the plant",
    )
    parser.add_argument(
        "--port",
        type=int,
        help=f"port of a --broker-host without one (default {DEFAULT_BROKER_PORT})",
    )
    parser.add_argument("--ca", type=Path, help="project CA certificate")
    parser.add_argument("--cert", type=Path, help="service certificate")
    parser.add_argument("--key", type=Path, help="service certificate's key")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help=f"seconds to wait for the reply (default {DEFAULT_TIMEOUT_SECONDS:g})",
    )


def parse_command_args(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs into a dict; values are JSON where they parse (`n=3`, `on=true`)."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError("ARGS", f"{pair!r} is not key=value")
        if key in result:
            raise ConfigError("ARGS", f"{key!r} given twice")
        try:
            value = json.loads(raw, parse_constant=_reject_constant)
        except ValueError:
            value = raw
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _broker_from_file(path: Path) -> dict[str, Any]:
    """The connection keys of an ingest config's [broker] table, paths resolved as ingest does.

    Each key is optional here (flags fill the gaps); the rest of the file is ingest's business.
    """
    root = Table(read_toml(path), base=Path(path).resolve().parent, source=str(path))
    table = root.table("broker", required=True)
    found: dict[str, Any] = {}
    if table.has("hosts"):
        raw = table.raw("hosts")
        if not isinstance(raw, list) or not raw or not all(isinstance(h, str) for h in raw):
            raise table.error("hosts", 'expected a non-empty array of "host:port" strings')
        found["hosts"] = [_endpoint(item, table.key(f"hosts[{i}]")) for i, item in enumerate(raw)]
    if table.has("host"):
        found["host"] = table.text("host")
    if table.has("port"):
        found["port"] = table.integer("port", low=1, high=65535)
    for key in ("ca", "cert", "key"):
        if table.has(key):
            found[key] = table.path(key)
    return found


def _endpoint(text: str, key: str, default_port: int = DEFAULT_BROKER_PORT) -> tuple[str, int]:
    endpoint = parse_endpoint(text, default_port=default_port)
    if endpoint is None:
        raise ConfigError(key, f'{text!r} is not "host" or "host:port" (port 1-65535)')
    return endpoint


def broker_targets(args: argparse.Namespace) -> list[BrokerTarget]:
    """Every broker to send through: --config's [broker], overridden by explicit flags."""
    config = getattr(args, "config", None)
    settings = _broker_from_file(Path(config)) if config else {}
    for key, attr in (("port", "port"), ("ca", "ca"), ("cert", "cert"), ("key", "key")):
        value = getattr(args, attr, None)
        if value is not None:
            settings[key] = value
    port = int(settings.get("port", DEFAULT_BROKER_PORT))
    if not 1 <= port <= 65535:
        raise ConfigError("--port", f"{port} is not a TCP port")
    flags: list[str] = getattr(args, "broker_host", None) or []
    if flags:
        endpoints = [_endpoint(text, "--broker-host", port) for text in flags]
    elif "hosts" in settings:
        endpoints = settings["hosts"]
    elif "host" in settings:
        endpoints = [(str(settings["host"]), port)]
    else:
        endpoints = []
    if not endpoints:
        raise ConfigError("--broker-host", "is required (or --config with a [broker] table)")
    for key, flag in (("ca", "--ca"), ("cert", "--cert"), ("key", "--key")):
        if key not in settings:
            raise ConfigError(flag, "is required (or --config with a [broker] table)")
    return [
        BrokerTarget(
            host=host,
            port=endpoint_port,
            ca=Path(settings["ca"]),
            cert=Path(settings["cert"]),
            key=Path(settings["key"]),
        )
        for host, endpoint_port in dict.fromkeys(endpoints)
    ]


def run_cmd(
    args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Send args.name with args.args to args.device; print the reply JSON; see module doc."""
    out = out or sys.stdout
    err = err or sys.stderr
    device: str = args.device
    name: str = args.name
    timeout = getattr(args, "timeout", None)
    timeout_s = DEFAULT_TIMEOUT_SECONDS if timeout is None else float(timeout)
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError("--timeout", "must be a number of seconds > 0")
    command_topic = topics.cmd_topic(device, name)  # validates both (WireError)
    reply_topic = topics.reply_topic(device, name)
    command = Command(
        id=uuid.uuid4().hex,
        name=name,
        args=parse_command_args(list(getattr(args, "args", None) or [])),
        ts_ms=int(time.time() * 1000),
    )
    reply = _exchange(broker_targets(args), command, command_topic, reply_topic, timeout_s, err)
    if reply is None:
        print(
            f"millrace: no reply from {device} to {name!r} (id {command.id}) within "
            f"{timeout_s:g} s: is the device online?",
            file=err,
        )
        return EXIT_TIMEOUT
    print(reply.to_json().decode(), file=out)
    return EXIT_OK if reply.ok else EXIT_DEVICE_ERROR


def _exchange(
    targets: list[BrokerTarget],
    command: Command,
    command_topic: str,
    reply_topic: str,
    timeout_s: float,
    err: TextIO,
) -> CommandReply | None:
    """Send through every broker that answers, wait for the first reply; None on timeout."""
    replies: queue.Queue[bytes] = queue.Queue()
    sessions: list[_Session] = []
    unreachable: list[str] = []
    try:
        for target in targets:
            session = _Session(target, replies)
            try:
                session.open(reply_topic)
            except UnreachableError as exc:
                session.close()
                if len(targets) == 1:
                    raise
                unreachable.append(str(exc))
                continue
            sessions.append(session)
        if not sessions:
            raise UnreachableError("; ".join(unreachable))
        for problem in unreachable:
            print(f"millrace: warning: {problem}; sending through the others", file=err)
        deadline = time.monotonic() + timeout_s
        for session in sessions:
            session.send(command_topic, command, timeout_s)
        logger.debug(
            "command %s sent to %s via %d broker(s)", command.id, command_topic, len(sessions)
        )
        while (left := deadline - time.monotonic()) > 0:
            try:
                payload = replies.get(timeout=left)
            except queue.Empty:
                break
            try:
                reply = CommandReply.from_json(payload)
            except WireError as exc:
                logger.warning("ignoring a malformed reply on %s: %s", reply_topic, exc.reason)
                continue
            if reply.id == command.id:
                return reply
            logger.debug("ignoring a reply to another command (id %s)", reply.id)
        return None
    finally:
        for session in sessions:
            session.close()


class _Session:
    """One broker's connection: subscribed to the reply before the command goes out."""

    def __init__(self, target: BrokerTarget, replies: queue.Queue[bytes]) -> None:
        from millrace.mqtt import tls_client

        self.target = target
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        client = tls_client(
            f"cmd-{uuid.uuid4().hex[:12]}", ca=target.ca, cert=target.cert, key=target.key
        )
        # paho callbacks only hand work to the queues; the decisions happen in the caller.
        client.on_connect = lambda _c, _u, _f, reason, _p: self.events.put(("connect", reason))
        client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.events.put(("subscribe", codes))
        client.on_message = lambda _c, _u, msg: replies.put(bytes(msg.payload))
        client.on_publish = lambda _c, _u, _mid, reason, _p: self.events.put(("publish", reason))
        client.on_disconnect = lambda _c, _u, _f, reason, _p: self.events.put(
            ("disconnect", reason)
        )
        self.client = client
        self._looping = False

    @property
    def where(self) -> str:
        return f"{self.target.host}:{self.target.port}"

    def open(self, reply_topic: str) -> None:
        try:
            self.client.connect(self.target.host, self.target.port)
        except OSError as exc:
            raise UnreachableError(f"cannot reach the broker at {self.where}: {exc}") from exc
        self.client.loop_start()
        self._looping = True
        reason = _wait_for(self.events, "connect", CONNECT_TIMEOUT_SECONDS)
        if reason is None or reason.is_failure:
            raise CommandError(f"broker {self.where} refused the connection: {reason}")
        self.client.subscribe(reply_topic, qos=1)
        granted = _wait_for(self.events, "subscribe", CONNECT_TIMEOUT_SECONDS)
        if granted is None or any(code.is_failure for code in granted):
            raise CommandError(
                f"the broker refused the reply subscription {reply_topic}: {granted}"
                " (send commands with a service certificate)"
            )

    def send(self, command_topic: str, command: Command, timeout_s: float) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = max(1, math.ceil(timeout_s))
        props.ContentType = "application/json"
        self.client.publish(command_topic, command.to_json(), qos=1, properties=props)
        # Mosquitto grants any subscription and filters on delivery, but refuses a
        # publish the ACL forbids in the PUBACK: the one clear signal of a wrong identity.
        acked = _wait_for(self.events, "publish", CONNECT_TIMEOUT_SECONDS)
        if acked is not None and acked.is_failure:
            raise CommandError(
                f"the broker refused the command on {command_topic}: {acked}"
                " (send commands with a service certificate)"
            )

    def close(self) -> None:
        self.client.disconnect()
        if self._looping:
            self.client.loop_stop()


def _wait_for(events: queue.Queue[tuple[str, Any]], kind: str, timeout_s: float) -> Any:
    """The value of the next `kind` event within `timeout_s`; None on timeout.

    A disconnect while waiting for the connection is its refusal; later ones
    (paho reconnects by itself) are only logged.
    """
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            got, value = events.get(timeout=left)
        except queue.Empty:
            return None
        if got == kind:
            return value
        if got == "disconnect":
            if kind == "connect":
                return value
            logger.warning("disconnected from the broker (%s); paho reconnects", value)
    return None
