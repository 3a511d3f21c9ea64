"""Per edge node: bdSeq, seq and the alias map of its births; every message judged against them.

Pure bookkeeping, no I/O: `Sessions.handle` turns one Sparkplug message into readings and
registry changes (`Accepted`), a redelivery to drop (`Duplicate`), or a refusal with a dead
letter code and whether to ask the node for a rebirth (`Refused`). The spec's rules:

- NBIRTH opens a session: its `bdSeq` metric is remembered, its seq starts the count, its
  metrics (with their aliases and datatypes) are the only ones later NDATA may carry.
- Every NDATA, DBIRTH, DDATA and DDEATH carries the next seq (0-255, wrapping). The same
  seq again is a redelivery (dropped, never counted twice); any other seq is a gap or a
  reordering: refused, the session is stale and the node is asked for a rebirth. Until the
  next NBIRTH nothing of a stale session is trusted.
- NDEATH ends the session only when its bdSeq is the birth's: an NDEATH with another bdSeq
  is the will of an older connection, arriving late, and is ignored (dead-lettered as
  `stale_death` so it is visible).

Two sources that map to one millrace device id are never merged: the first to birth
owns it (claims.py); the other's messages for it are refused `id_collision`, no rebirth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from millrace.cloud.config import DEFAULT_MAX_AGE_SECONDS, DEFAULT_MAX_SKEW_SECONDS
from millrace.cloud.sparkplug import names, values
from millrace.cloud.sparkplug.claims import ID_COLLISION, Claims, Source
from millrace.cloud.sparkplug.schema import DecodeError, parse_payload
from millrace.cloud.sparkplug.topic import SpTopic, TopicError, parse
from millrace.wire.batch import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS
from millrace.wire.messages import MAX_UNIT_CHARS, MAX_UNITS

SEQ_MODULUS: Final = 256
DEFAULT_MAX_PAYLOAD_BYTES: Final = 512 * 1024
DEFAULT_MAX_METRICS: Final = 5000
UNIT_PROPERTY: Final = "engUnit"


@dataclass(frozen=True, slots=True)
class Reading:
    """One metric value of one millrace device at `ts_ms`."""

    device: str
    metric: str
    ts_ms: int
    value: values.Value


@dataclass(slots=True)
class Accepted:
    """A message that counts: its readings, and devices that came online or went offline."""

    readings: list[Reading] = field(default_factory=list)
    online: dict[str, dict[str, str]] = field(default_factory=dict)  # device -> units
    offline: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The seq just accepted, again: a redelivery."""

    device: str


@dataclass(frozen=True, slots=True)
class Refused:
    """Dead-letter the message with `code` and `reason`; `rebirth`: ask the node for one."""

    code: str
    reason: str
    device: str | None = None
    rebirth: bool = False


Outcome = Accepted | Duplicate | Refused


@dataclass(frozen=True, slots=True)
class MetricDef:
    """A metric as its birth declared it."""

    name: str  # millrace name
    datatype: int
    stored: bool


@dataclass(slots=True)
class _Node:
    bd_seq: int
    seq: int
    # None: the node itself; otherwise a Sparkplug device id.
    by_alias: dict[str | None, dict[int, MetricDef]] = field(default_factory=dict)
    by_name: dict[str | None, dict[str, MetricDef]] = field(default_factory=dict)
    stale: bool = False


class _Refuse(Exception):
    def __init__(self, code: str, reason: str, *, rebirth: bool = False) -> None:
        super().__init__(reason)
        self.code, self.reason, self.rebirth = code, reason, rebirth


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one message may cost before it is refused."""

    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_metrics: int = DEFAULT_MAX_METRICS
    # The ingest worker's acceptance window (cloud/config.py), in ms.
    max_skew_ms: int = DEFAULT_MAX_SKEW_SECONDS * 1000
    max_age_ms: int = DEFAULT_MAX_AGE_SECONDS * 1000


def _timestamp(where: str, value: int) -> int:
    if not MIN_TIMESTAMP_MS <= value <= MAX_TIMESTAMP_MS:
        raise _Refuse("invalid", f"{where}: timestamp {value} is not between 2000 and 2100")
    return value


def _bd_seq(payload: Any, kind: str) -> int:
    for m in payload.metrics:
        if m.name == names.BD_SEQ:
            got = m.WhichOneof("value")
            if got not in ("long_value", "int_value"):
                raise _Refuse("invalid", f"{kind}: bdSeq must be an integer, got {got}")
            return int(getattr(m, got))
    raise _Refuse("invalid", f"{kind}: no bdSeq metric")


def _units(metric: Any) -> str | None:
    props = metric.properties
    for key, value in zip(props.keys, props.values, strict=False):
        if key == UNIT_PROPERTY and value.WhichOneof("value") == "string_value":
            unit = value.string_value
            return unit if 0 < len(unit) <= MAX_UNIT_CHARS and unit.isprintable() else None
    return None


class Sessions:
    """The edge node sessions one host application has seen."""

    def __init__(self, bounds: Bounds | None = None) -> None:
        self.bounds = bounds or Bounds()
        self._nodes: dict[tuple[str, str], _Node] = {}
        self.claims = Claims()

    def handle(self, topic: str, payload: bytes, received_ms: int) -> Outcome:
        """Judge one message published on a Sparkplug `topic`."""
        try:
            sp = parse(topic)
        except TopicError as exc:
            return Refused("bad_topic", str(exc))
        try:
            device = names.device_id(sp.group, sp.node, sp.device)
        except names.NameError_ as exc:
            self._count_seq(sp, payload)
            return Refused("bad_id", str(exc))
        try:
            outcome = self._handle(sp, device, payload, received_ms)
        except _Refuse as refused:
            if refused.rebirth and sp.node_key in self._nodes:
                self._nodes[sp.node_key].stale = True
            return Refused(refused.code, refused.reason, device, refused.rebirth)
        return self._owned(sp, device, outcome)

    def _owned(self, sp: SpTopic, device: str, outcome: Outcome) -> Outcome:
        """`outcome` if its source owns (or, by a birth, now claims) `device`, else an
        `id_collision` refusal. Judged after the session rules, so a colliding node's seq
        and births are still followed and its other devices are not stalled."""
        if not isinstance(outcome, Accepted):
            return outcome
        source = Source(sp.group, sp.node, sp.device)
        if sp.kind in ("NBIRTH", "DBIRTH"):
            reason = self.claims.claim(source, device)
        else:
            reason = self.claims.refusal(source, device)
        if reason is None or (sp.kind == "NDEATH" and outcome.offline):
            return outcome  # an NDEATH's offline ids are already only the node's own
        return Refused(ID_COLLISION, reason, device)

    def _count_seq(self, sp: SpTopic, data: bytes) -> None:
        """Take the seq of a device message refused for its id, so the node's next message
        is not a gap: one unmappable device must not stall its node's others."""
        node = self._nodes.get(sp.node_key)
        if node is None or sp.device is None or len(data) > self.bounds.max_payload_bytes:
            return
        try:
            seq = parse_payload(data).seq
        except DecodeError:
            return
        if seq == (node.seq + 1) % SEQ_MODULUS:
            node.seq = seq

    def _handle(self, sp: SpTopic, device: str, data: bytes, received_ms: int) -> Outcome:
        if sp.kind in ("NCMD", "DCMD"):
            raise _Refuse("bad_topic", f"{sp.kind} is a command to the node, not data")
        if len(data) > self.bounds.max_payload_bytes:
            raise _Refuse("oversize", f"{len(data)} bytes > {self.bounds.max_payload_bytes} bytes")
        try:
            payload = parse_payload(data)
        except DecodeError as exc:
            raise _Refuse("undecodable", f"not a Sparkplug B payload: {exc}") from None
        if len(payload.metrics) > self.bounds.max_metrics:
            raise _Refuse(
                "too_many_metrics",
                f"{len(payload.metrics)} metrics > {self.bounds.max_metrics} in one message",
            )
        if sp.kind == "NBIRTH":
            return self._nbirth(sp, device, payload, received_ms)
        if sp.kind == "NDEATH":
            return self._ndeath(sp, device, payload)
        node = self._in_sequence(sp, payload)
        if node is None:
            return Duplicate(device)
        if sp.kind == "DBIRTH":
            return self._birth(node, sp.device, device, payload, received_ms)
        if sp.kind == "DDEATH":
            node.by_alias.pop(sp.device, None)
            node.by_name.pop(sp.device, None)
            return Accepted(offline=[device])
        return Accepted(readings=self._data(node, sp.device, device, payload, received_ms))

    def _nbirth(self, sp: SpTopic, device: str, payload: Any, received_ms: int) -> Outcome:
        if not payload.HasField("seq") or payload.seq >= SEQ_MODULUS:
            raise _Refuse("invalid", "NBIRTH: seq missing or above 255")
        node = _Node(bd_seq=_bd_seq(payload, "NBIRTH"), seq=payload.seq)
        accepted = self._birth(node, None, device, payload, received_ms)
        self._nodes[sp.node_key] = node  # only a valid birth replaces the session
        return accepted

    def _ndeath(self, sp: SpTopic, device: str, payload: Any) -> Outcome:
        bd_seq = _bd_seq(payload, "NDEATH")
        node = self._nodes.get(sp.node_key)
        if node is not None and node.bd_seq != bd_seq:
            raise _Refuse(
                "stale_death",
                f"NDEATH bdSeq {bd_seq} is not the current birth's {node.bd_seq}: "
                "the will of an older connection, ignored",
            )
        self._nodes.pop(sp.node_key, None)
        devices = [] if node is None else [d for d in node.by_name if d is not None]
        offline = [(None, device), *((d, names.device_id(sp.group, sp.node, d)) for d in devices)]
        return Accepted(
            offline=[
                mapped
                for sp_device, mapped in offline
                if self.claims.refusal(Source(sp.group, sp.node, sp_device), mapped) is None
            ]
        )

    def _in_sequence(self, sp: SpTopic, payload: Any) -> _Node | None:
        """The node's session if this message is its next; None for a redelivery."""
        node = self._nodes.get(sp.node_key)
        if node is None:
            raise _Refuse("no_birth", f"{sp.kind} before any NBIRTH of the node", rebirth=True)
        if not payload.HasField("seq") or payload.seq >= SEQ_MODULUS:
            raise _Refuse("invalid", f"{sp.kind}: seq missing or above 255")
        seq = payload.seq
        if seq == node.seq:
            return None
        if node.stale:
            raise _Refuse(
                "awaiting_rebirth", f"{sp.kind} seq {seq}: waiting for the rebirth asked for"
            )
        expected = (node.seq + 1) % SEQ_MODULUS
        node.seq = seq
        if seq != expected:
            raise _Refuse(
                "seq_gap", f"{sp.kind} seq {seq}, expected {expected}: rebirth asked", rebirth=True
            )
        if sp.device is not None and sp.kind != "DBIRTH" and sp.device not in node.by_name:
            raise _Refuse("no_birth", f"{sp.kind} of a device without DBIRTH", rebirth=True)
        return node

    def _birth(
        self, node: _Node, sp_device: str | None, device: str, payload: Any, received_ms: int
    ) -> Accepted:
        kind = "NBIRTH" if sp_device is None else "DBIRTH"
        by_alias: dict[int, MetricDef] = {}
        by_name: dict[str, MetricDef] = {}
        mapped: dict[str, str] = {}
        units: dict[str, str] = {}
        for m in payload.metrics:
            if not m.name:
                raise _Refuse("invalid", f"{kind}: a metric without a name")
            if not 0 < m.datatype <= values.MAX_DATATYPE:
                raise _Refuse("wrong_datatype", f"{kind} {m.name!r}: datatype {m.datatype}")
            stored = names.is_stored(m.name) and values.kind_of(m.datatype) != "skip"
            name = m.name
            if stored:
                try:
                    name = names.metric_name(m.name)
                except names.NameError_ as exc:
                    raise _Refuse("bad_name", f"{kind}: {exc}") from None
                if mapped.setdefault(name, m.name) != m.name:
                    raise _Refuse(
                        "bad_name", f"{kind}: {mapped[name]!r} and {m.name!r} both map to {name!r}"
                    )
                unit = _units(m)
                if unit is not None and len(units) < MAX_UNITS:
                    units[name] = unit
            spec = MetricDef(name, m.datatype, stored)
            if m.name in by_name:
                raise _Refuse("invalid", f"{kind}: metric {m.name!r} twice")
            by_name[m.name] = spec
            if m.HasField("alias"):
                if m.alias in by_alias:
                    raise _Refuse("invalid", f"{kind}: alias {m.alias} twice")
                by_alias[m.alias] = spec
        node.by_alias[sp_device] = by_alias
        node.by_name[sp_device] = by_name
        readings = self._data(node, sp_device, device, payload, received_ms)
        return Accepted(readings=readings, online={device: units})

    def _data(
        self, node: _Node, sp_device: str | None, device: str, payload: Any, received_ms: int
    ) -> list[Reading]:
        by_alias, by_name = node.by_alias[sp_device], node.by_name[sp_device]
        default_ts = payload.timestamp if payload.HasField("timestamp") else received_ms
        readings: list[Reading] = []
        for m in payload.metrics:
            if m.name:
                spec = by_name.get(m.name)
                if spec is None:
                    raise _Refuse(
                        "unknown_metric", f"metric {m.name!r} is not in the birth", rebirth=True
                    )
            elif m.HasField("alias"):
                spec = by_alias.get(m.alias)
                if spec is None:
                    raise _Refuse(
                        "unknown_alias", f"alias {m.alias} is not in the birth", rebirth=True
                    )
            else:
                raise _Refuse("invalid", "a metric with neither name nor alias")
            where = f"metric {spec.name!r}"
            if m.datatype and m.datatype != spec.datatype:
                raise _Refuse(
                    "wrong_datatype",
                    f"{where}: {values.describe(m.datatype)}, born "
                    f"{values.describe(spec.datatype)}",
                )
            if not spec.stored:
                continue
            try:
                value = values.read_value(m, spec.datatype, where)
            except values.ValueError_ as exc:
                raise _Refuse(exc.code, str(exc)) from None
            if value is None:
                continue
            ts = _timestamp(where, m.timestamp if m.HasField("timestamp") else default_ts)
            if ts > received_ms + self.bounds.max_skew_ms:
                raise _Refuse("in_future", f"{where}: timestamp {ts} is ahead of the host's clock")
            if ts < received_ms - self.bounds.max_age_ms:
                raise _Refuse("too_old", f"{where}: timestamp {ts} is older than the host keeps")
            readings.append(Reading(device, spec.name, ts, value))
        return readings
