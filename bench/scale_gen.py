"""The lean load generator of bench/scale.py: thousands of simulated gateways per process.

Each gateway is its own MQTT v5 connection over mutual TLS with its own certificate
(`millrace.mqtt.tls_context`, as the edge agent builds it), subscribed to its command
and receipt topics like the agent, publishing one QoS 1 batch of W windows per period
at its own phase (gateway k of N sends at k/N of the period, so the fleet's load is
spread evenly; with --burst every gateway sends at the boundary plus the agent's 2 s
grace, as real agents do). Frames are written by hand and the batch is spliced from pre-encoded
parts: the envelope's constant head per gateway, the windows once per period for all,
and only `s` and `t` packed per send. At start the splice is checked to be byte-equal to
`millrace.wire.encode_batch` of the same batch, so the broker and worker see exactly
what an agent sends. The generator does not resend (no outbox): every batch it reports
PUBACKed must be stored exactly once, which bench/scale.py checks in the database.

Protocol with bench/scale.py: JSON lines on stdout ({"event": "ready", ...} once every
connection was tried, {"event": "done", ...} at the end); the line "stop" on stdin ends
sending, waits up to --settle-s for outstanding PUBACKs and receipts, and disconnects.

Run by bench/scale.py; alone: python bench/scale_gen.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import struct
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgpack

from millrace import topics
from millrace.configfile import DEFAULT_BROKER_KEEPALIVE_SECONDS
from millrace.mqtt import tls_context
from millrace.ops import pki
from millrace.wire import CONTENT_TYPE_MSGPACK, Batch, Window, encode_batch
from millrace.wire.batch import WINDOW_FIELDS

BROKER_HOSTNAME: Final = "localhost"  # what the broker certificate names
COUNT_PER_WINDOW: Final = 10  # readings per window (1 Hz would be `period`; any count works)
CONNECT_CONCURRENCY: Final = 64  # TLS handshakes in flight per process
CONNECT_TIMEOUT_SECONDS: Final = 60.0
QOS1: Final = 1
# MQTT v5 packet types (high nibble of the fixed header).
CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP, DISCONNECT = 2, 3, 4, 9, 13, 14
PROP_CONTENT_TYPE: Final = 0x03
BURST_PHASE_S: Final = 2.0  # the agent's default grace: it closes windows then
PROBE_WINDOW_MS: Final = 946_684_800_000  # 2000-01-01: aligned to every period


def varint(value: int) -> bytes:
    """MQTT's variable byte integer."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + varint(len(body)) + body


def connect_frame(client_id: str, keepalive_s: int) -> bytes:
    """CONNECT, MQTT 5, clean start, no properties; the broker takes the id from the cert."""
    header = utf8("MQTT") + bytes([5, 0x02]) + struct.pack(">H", keepalive_s) + varint(0)
    return packet(0x10, header + utf8(client_id))


def subscribe_frame(packet_id: int, filters: list[str]) -> bytes:
    body = struct.pack(">H", packet_id) + varint(0)
    body += b"".join(utf8(f) + bytes([QOS1]) for f in filters)
    return packet(0x82, body)


def puback_frame(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack(">H", packet_id)


CONTENT_TYPE_PROPS: Final = (
    varint(3 + len(CONTENT_TYPE_MSGPACK)) + bytes([PROP_CONTENT_TYPE]) + utf8(CONTENT_TYPE_MSGPACK)
)


def window(metric_index: int, metric: str, start_ms: int, period_s: int) -> Window:
    """A valid window of a slowly varying signal (min < first = last < max)."""
    base = 20.0 + metric_index * 0.5 + (start_ms // (period_s * 1000)) % 7 * 0.1
    count = COUNT_PER_WINDOW
    return Window(
        metric,
        start_ms,
        period_s,
        count,
        base * count,
        base - 1.0,
        base + 1.0,
        base,
        base,
        base * base * count + 2.0,
        0,
    )


def windows_for(start_ms: int, period_s: int, metrics: list[str]) -> tuple[Window, ...]:
    return tuple(window(i, m, start_ms, period_s) for i, m in enumerate(metrics))


def envelope_head(device: str, boot_id: str) -> bytes:
    """The map header and the keys before seq: v, d, b (in encode_batch's key order)."""
    pack = msgpack.packb
    return b"\x8a" + pack("v") + pack(1) + pack("d") + pack(device) + pack("b") + pack(boot_id)


def envelope_tail(windows: tuple[Window, ...]) -> bytes:
    """The keys after sent_at: c, dr, rj, w, e (the same for every gateway of a period)."""
    pack = msgpack.packb
    rows = [[getattr(w, name) for name in WINDOW_FIELDS] for w in windows]
    return (
        pack("c")
        + pack(True)
        + pack("dr")
        + pack(0)
        + pack("rj")
        + pack(0)
        + pack("w")
        + pack(rows, use_bin_type=True)
        + pack("e")
        + pack([])
    )


def splice(head: bytes, seq: int, sent_at_ms: int, tail: bytes) -> bytes:
    pack = msgpack.packb
    return head + b"\xa1s" + pack(seq) + b"\xa1t" + pack(sent_at_ms) + tail


def check_splice(device: str, boot_id: str, windows: tuple[Window, ...]) -> None:
    """Refuse to run if the spliced payload is not what encode_batch makes of the same batch."""
    now_ms = int(time.time() * 1000)
    spliced = splice(envelope_head(device, boot_id), 7, now_ms, envelope_tail(windows))
    reference = encode_batch(Batch(device, boot_id, 7, now_ms, windows=windows))
    if spliced != reference:
        raise SystemExit("scale_gen: spliced batch differs from encode_batch: fix envelope_*")


@dataclass
class Stats:
    """What this process did; reported as JSON at the end."""

    connected: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    sent_windows: int = 0
    acked: int = 0
    ack_errors: int = 0
    receipted: int = 0
    first_window_ms: int | None = None
    last_window_ms: int | None = None
    # (wall ms of the send, ms from the send to the receipt covering it)
    receipt_latency: list[tuple[int, int]] = field(default_factory=list)


class Gateway:
    """One simulated gateway: a TLS connection, a send schedule and its open batches."""

    def __init__(self, device: str, phase_s: float, run: Run) -> None:
        self.device = device
        self.phase_s = phase_s
        self.run = run
        self.boot_id = uuid.uuid4().hex
        self.head = envelope_head(device, self.boot_id)
        self.topic = utf8(topics.data_topic(device))
        self.seq = 0
        self.packet_id = 1
        self.unacked: set[int] = set()
        self.unreceipted: dict[int, tuple[float, int]] = {}  # seq -> (monotonic, wall ms)
        self.writer: asyncio.StreamWriter | None = None
        self.connack: asyncio.Future[int] | None = None
        self.suback: asyncio.Future[bytes] | None = None

    def next_packet_id(self) -> int:
        self.packet_id = self.packet_id % 65535 + 1
        return self.packet_id

    async def connect(self, context: ssl.SSLContext) -> None:
        run = self.run
        reader, writer = await asyncio.open_connection(
            run.host, run.port, ssl=context, server_hostname=BROKER_HOSTNAME
        )
        self.writer = writer
        loop = asyncio.get_running_loop()
        self.connack, self.suback = loop.create_future(), loop.create_future()
        run.tasks.add(asyncio.create_task(self.read(reader)))
        writer.write(connect_frame(self.device, DEFAULT_BROKER_KEEPALIVE_SECONDS))
        code = await self.connack
        if code != 0:
            raise ConnectionError(f"CONNACK reason {code:#x}")
        filters = [topics.cmd_filter(self.device), topics.receipt_topic(self.device)]
        writer.write(subscribe_frame(self.next_packet_id(), filters))
        granted = await self.suback
        if any(code >= 0x80 for code in granted):
            raise ConnectionError(f"SUBACK refused {granted.hex()}")

    async def read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                first = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                self.handle(first, await reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            self.lost(type(exc).__name__)

    def lost(self, why: str) -> None:
        for future in (self.connack, self.suback):
            if future is not None and not future.done():
                future.set_exception(ConnectionError(why))
        if not self.run.stopping:
            self.run.stats.lost[why] += 1
        self.writer = None

    def handle(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == CONNACK and self.connack is not None:
            self.connack.set_result(body[1])
        elif kind == SUBACK and self.suback is not None:
            props_len = body[2]  # properties are short here: a one-byte varint
            self.suback.set_result(body[3 + props_len :])
        elif kind == PUBACK:
            (packet_id,) = struct.unpack_from(">H", body)
            if packet_id in self.unacked:
                self.unacked.discard(packet_id)
                if len(body) > 2 and body[2] >= 0x80:
                    self.run.stats.ack_errors += 1
                else:
                    self.run.stats.acked += 1
        elif kind == PUBLISH:
            self.on_publish(first, body)
        elif kind == DISCONNECT:
            self.lost(f"DISCONNECT {body[:1].hex() or '00'}")

    def on_publish(self, first: int, body: bytes) -> None:
        (topic_len,) = struct.unpack_from(">H", body)
        at = 2 + topic_len
        if (first >> 1) & 3:
            (packet_id,) = struct.unpack_from(">H", body, at)
            at += 2
            if self.writer is not None:
                self.writer.write(puback_frame(packet_id))
        props_len, shift = 0, 0
        while True:
            byte = body[at]
            at += 1
            props_len |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if not body[2 : 2 + topic_len].endswith(b"/receipt"):
            return
        receipt = json.loads(body[at + props_len :])
        if receipt.get("boot_id") != self.boot_id:
            return
        watermark, ranges = receipt["watermark"], receipt.get("ranges", [])
        now = time.monotonic()
        for seq in [
            s for s in self.unreceipted if s <= watermark or any(lo <= s <= hi for lo, hi in ranges)
        ]:
            sent_mono, sent_wall = self.unreceipted.pop(seq)
            self.run.stats.receipted += 1
            self.run.stats.receipt_latency.append((sent_wall, round((now - sent_mono) * 1000)))

    async def send_loop(self) -> None:
        run = self.run
        period_ms = run.period_s * 1000
        while not run.stopping and self.writer is not None:
            now_ms = time.time() * 1000
            target = (now_ms // period_ms) * period_ms + self.phase_s * 1000
            if target <= now_ms:
                target += period_ms
            await asyncio.sleep((target - now_ms) / 1000)
            if run.stopping or self.writer is None:
                return
            start_ms = int(target - self.phase_s * 1000) - period_ms  # the window just closed
            if start_ms < run.min_window_ms:
                continue
            self.publish(start_ms)

    def publish(self, start_ms: int) -> None:
        run, stats = self.run, self.run.stats
        sent_at = int(time.time() * 1000)
        payload = splice(self.head, self.seq, sent_at, run.tail(start_ms))
        packet_id = self.next_packet_id()
        body = self.topic + struct.pack(">H", packet_id) + CONTENT_TYPE_PROPS + payload
        assert self.writer is not None
        self.writer.write(packet(0x32, body))
        self.unacked.add(packet_id)
        self.unreceipted[self.seq] = (time.monotonic(), sent_at)
        self.seq += 1
        stats.sent += 1
        stats.sent_windows += len(run.metrics)
        stats.first_window_ms = min(stats.first_window_ms or start_ms, start_ms)
        stats.last_window_ms = max(stats.last_window_ms or start_ms, start_ms)


class Run:
    """This process's gateways, their shared per-period payload tails, and the stop signal."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.host, self.port = args.host, args.port
        self.period_s, self.min_window_ms = args.period_s, args.min_window_ms
        self.metrics = [f"bench.s{i:02d}" for i in range(args.windows)]
        self.paths = pki.pki_paths(args.pki)
        self.stats = Stats()
        self.stopping = False
        self.tasks: set[asyncio.Task[None]] = set()
        self._tails: dict[int, bytes] = {}
        ids = [f"gw-{i:05d}" for i in range(1, args.gateways + 1)]
        self.gateways = [
            Gateway(
                device, BURST_PHASE_S if args.burst else k * args.period_s / args.gateways, self
            )
            for k, device in enumerate(ids)
            if k % args.procs == args.index
        ]

    def tail(self, start_ms: int) -> bytes:
        tail = self._tails.get(start_ms)
        if tail is None:
            self._tails = {
                start_ms: envelope_tail(windows_for(start_ms, self.period_s, self.metrics))
            }
            tail = self._tails[start_ms]
        return tail

    async def connect_all(self) -> list[Gateway]:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(gateway: Gateway) -> Gateway | None:
            async with gate:
                try:
                    paths = self.paths
                    context = tls_context(
                        ca=paths.ca_cert,
                        cert=paths.cert_for(gateway.device),
                        key=paths.key_for(gateway.device),
                    )
                    await asyncio.wait_for(gateway.connect(context), CONNECT_TIMEOUT_SECONDS)
                except (OSError, ssl.SSLError, TimeoutError) as exc:
                    self.stats.failed[f"{type(exc).__name__}: {exc}"[:100]] += 1
                    if gateway.writer is not None:
                        gateway.writer.close()
                        gateway.writer = None
                    return None
            self.stats.connected += 1
            self.tasks.add(asyncio.create_task(gateway.send_loop()))
            return gateway

        done = await asyncio.gather(*(one(g) for g in self.gateways))
        return [g for g in done if g is not None]

    async def settle(self, live: list[Gateway], give_up_s: float) -> None:
        deadline = time.monotonic() + give_up_s
        while time.monotonic() < deadline and any(
            g.writer is not None and (g.unacked or g.unreceipted) for g in live
        ):
            await asyncio.sleep(0.2)


def report(event: str, stats: Stats, **extra: object) -> None:
    body = {"event": event, "connected": stats.connected, "failed": dict(stats.failed), **extra}
    sys.stdout.write(json.dumps(body) + "\n")
    sys.stdout.flush()


async def main_async(args: argparse.Namespace) -> None:
    run = Run(args)
    if run.gateways:
        probe = windows_for(PROBE_WINDOW_MS, run.period_s, run.metrics)
        check_splice(run.gateways[0].device, run.gateways[0].boot_id, probe)
    live = await run.connect_all()
    report("ready", run.stats)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "stop" (or EOF: the parent died)
    run.stopping = True
    await run.settle(live, args.settle_s)
    stats = run.stats
    for gateway in live:
        if gateway.writer is not None:
            gateway.writer.write(b"\xe0\x00")
            gateway.writer.close()
    report(
        "done",
        stats,
        lost=dict(stats.lost),
        sent=stats.sent,
        sent_windows=stats.sent_windows,
        count_per_window=COUNT_PER_WINDOW,
        acked=stats.acked,
        ack_errors=stats.ack_errors,
        receipted=stats.receipted,
        unacked=sum(len(g.unacked) for g in live),
        first_window_ms=stats.first_window_ms,
        last_window_ms=stats.last_window_ms,
        receipt_latency=stats.receipt_latency,
    )
    for task in run.tasks:
        task.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pki", type=Path, required=True, help="the cached PKI directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gateways", type=int, required=True, help="N of the whole fleet")
    parser.add_argument("--procs", type=int, default=1, help="generator processes in all")
    parser.add_argument("--index", type=int, default=0, help="this process: 0..procs-1")
    parser.add_argument("--period-s", type=int, default=10)
    parser.add_argument("--windows", type=int, default=50, help="windows per batch")
    parser.add_argument("--min-window-ms", type=int, default=0, help="send no earlier window")
    parser.add_argument("--settle-s", type=float, default=25.0)
    parser.add_argument("--burst", action="store_true", help="all send together, as agents do")
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
