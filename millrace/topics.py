"""The versioned topic scheme: one builder and one parser for every topic.

Every device topic is rooted at `millrace/v1/d/<id>/`, so the broker's role for a
device (generated from the PKI, docs/security.md) scopes it to its own subtree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from millrace.errors import WireError
from millrace.ids import DEVICE_ID_RULE, is_device_id

ROOT = "millrace/v1"
DEVICE_ROOT = f"{ROOT}/d"
ALERTS_ROOT = f"{ROOT}/alerts"

COMMAND_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
TopicKind = Literal["data", "state", "health", "receipt", "cmd", "reply", "alert"]
_PLAIN_KINDS = ("data", "state", "health", "receipt")


def _checked(device_id: str) -> str:
    if not is_device_id(device_id):
        raise WireError(f"invalid device id {device_id!r}: {DEVICE_ID_RULE}")
    return device_id


def _checked_command(name: str) -> str:
    if not isinstance(name, str) or COMMAND_NAME_PATTERN.fullmatch(name) is None:
        raise WireError(f"invalid command name {name!r}: 1-32 chars of a-z 0-9 _ -")
    return name


def data_topic(device_id: str) -> str:
    """Where a device publishes window batches (QoS 1)."""
    return f"{DEVICE_ROOT}/{_checked(device_id)}/data"


def state_topic(device_id: str) -> str:
    """Retained birth message; the last will marks the device offline."""
    return f"{DEVICE_ROOT}/{_checked(device_id)}/state"


def health_topic(device_id: str) -> str:
    """Periodic heartbeat."""
    return f"{DEVICE_ROOT}/{_checked(device_id)}/health"


def receipt_topic(device_id: str) -> str:
    """Where the cloud tells a device which of its batches are committed (services only)."""
    return f"{DEVICE_ROOT}/{_checked(device_id)}/receipt"


def cmd_topic(device_id: str, name: str) -> str:
    """A command to the device."""
    return f"{DEVICE_ROOT}/{_checked(device_id)}/cmd/{_checked_command(name)}"


def cmd_filter(device_id: str) -> str:
    """Subscription filter for all commands to one device."""
    return f"{DEVICE_ROOT}/{_checked(device_id)}/cmd/+"


def reply_topic(device_id: str, name: str) -> str:
    """The device's reply to a command."""
    return f"{cmd_topic(device_id, name)}/reply"


def alert_topic(device_id: str) -> str:
    """Alerts the cloud raises or clears for a device."""
    return f"{ALERTS_ROOT}/{_checked(device_id)}"


def all_devices_filter(kind: Literal["data", "state", "health", "reply"]) -> str:
    """Filter a service subscribes to for one kind of topic of every device."""
    if kind == "reply":
        return f"{DEVICE_ROOT}/+/cmd/+/reply"
    return f"{DEVICE_ROOT}/+/{kind}"


def shared(group: str, topic_filter: str) -> str:
    """A shared-subscription filter so workers of `group` split the messages."""
    if not group or any(c in group for c in "/+#"):
        raise WireError(f"invalid shared subscription group {group!r}: no / + #")
    return f"$share/{group}/{topic_filter}"


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed millrace topic."""

    kind: TopicKind
    device_id: str
    command: str | None = None


def parse_topic(topic: str) -> Topic:
    """Parse any millrace topic; raise WireError naming what is wrong."""
    parts = topic.split("/")
    if topic.startswith(ALERTS_ROOT + "/") and len(parts) == 4:
        return Topic("alert", _checked(parts[3]))
    if len(parts) < 5 or "/".join(parts[:3]) != DEVICE_ROOT:
        raise WireError(f"topic {topic!r} is not under {DEVICE_ROOT}/<id>/")
    device_id = _checked(parts[3])
    rest = parts[4:]
    if len(rest) == 1 and rest[0] in _PLAIN_KINDS:
        return Topic(rest[0], device_id)  # type: ignore[arg-type]
    if len(rest) == 2 and rest[0] == "cmd":
        return Topic("cmd", device_id, _checked_command(rest[1]))
    if len(rest) == 3 and rest[0] == "cmd" and rest[2] == "reply":
        return Topic("reply", device_id, _checked_command(rest[1]))
    raise WireError(f"topic {topic!r} has an unknown suffix {'/'.join(rest)!r}")
