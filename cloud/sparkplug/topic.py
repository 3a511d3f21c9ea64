"""Sparkplug B topics: `spBv1.0/<group>/<type>/<edge node>[/<device>]` and the host's STATE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

NAMESPACE: Final = "spBv1.0"
NODE_TYPES: Final = ("NBIRTH", "NDATA", "NDEATH", "NCMD")
DEVICE_TYPES: Final = ("DBIRTH", "DDATA", "DDEATH", "DCMD")
MessageType = Literal["NBIRTH", "NDATA", "NDEATH", "NCMD", "DBIRTH", "DDATA", "DDEATH", "DCMD"]
# What the spec allows in a group, edge node or device id: any UTF-8 but the MQTT specials.
_FORBIDDEN: Final = frozenset("/+#")


class TopicError(ValueError):
    """A topic under spBv1.0/ that is not a Sparkplug B topic; the message says why."""


@dataclass(frozen=True, slots=True)
class SpTopic:
    """One parsed Sparkplug topic; `device` is None for node-level messages."""

    group: str
    kind: MessageType
    node: str
    device: str | None = None

    @property
    def node_key(self) -> tuple[str, str]:
        """(group, edge node): whose seq, bdSeq and aliases a message belongs to."""
        return (self.group, self.node)


def _element(where: str, value: str) -> str:
    if not value or any(c in _FORBIDDEN for c in value) or not value.isprintable():
        raise TopicError(f"{where} {value!r}: must be non-empty, printable, without / + #")
    return value


def parse(topic: str) -> SpTopic:
    """Parse a Sparkplug topic; `TopicError` names the part that is wrong."""
    parts = topic.split("/")
    if parts[0] != NAMESPACE or len(parts) not in (4, 5):
        raise TopicError(f"{topic!r}: expected {NAMESPACE}/<group>/<type>/<edge node>[/<device>]")
    _, group, kind, node, *rest = parts
    if kind in NODE_TYPES and rest:
        raise TopicError(f"{topic!r}: {kind} has no device level")
    if kind in DEVICE_TYPES and not rest:
        raise TopicError(f"{topic!r}: {kind} needs a device level")
    if kind not in NODE_TYPES and kind not in DEVICE_TYPES:
        raise TopicError(f"{topic!r}: unknown message type {kind!r}")
    device = _element("device id", rest[0]) if rest else None
    return SpTopic(_element("group id", group), kind, _element("edge node id", node), device)  # type: ignore[arg-type]


def node_topic(group: str, kind: MessageType, node: str, device: str | None = None) -> str:
    """The topic of a message of `kind` from or to `node` (and `device`)."""
    tail = f"/{device}" if device is not None else ""
    return f"{NAMESPACE}/{group}/{kind}/{node}{tail}"


def state_topic(host_id: str) -> str:
    """The primary host's retained STATE topic (Sparkplug 3.0)."""
    return f"{NAMESPACE}/STATE/{host_id}"


def subscriptions(groups: tuple[str, ...]) -> list[str]:
    """What the host subscribes to: what nodes publish in its groups (or in all groups).

    Never commands or STATE: the host's own NCMDs would come back to it as messages.
    """
    filters: list[str] = []
    for group in groups or ("+",):
        filters += [f"{NAMESPACE}/{group}/{kind}/+" for kind in ("NBIRTH", "NDATA", "NDEATH")]
        filters += [f"{NAMESPACE}/{group}/{kind}/+/+" for kind in ("DBIRTH", "DDATA", "DDEATH")]
    return filters
