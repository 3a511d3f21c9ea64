"""Sparkplug ids and metric names to millrace device ids and metric names.

A millrace device id is `<group>.<edge node>` for the node's own metrics and
`<group>.<edge node>.<device>` for a device, lowercased; ids that do not then satisfy
the device id rule (millrace.ids) are refused with that rule. Distinct Sparkplug ids
can map to one device id (case, or a `.` inside an id): claims.py keeps them apart.
Metric names keep their case; `/` (Sparkplug's folder separator) becomes `.`, and
every other character outside the metric name rule becomes `_`. Two names of one
birth that map to one millrace name are refused, so one millrace metric never mixes
two Sparkplug metrics.
"""

from __future__ import annotations

import re
from typing import Final

from millrace.ids import DEVICE_ID_RULE, is_device_id, is_metric_name

# Metrics the spec defines for control, not measurement: never stored.
CONTROL_PREFIXES: Final = ("Node Control/", "Device Control/")
BD_SEQ: Final = "bdSeq"
_OUTSIDE_RULE: Final = re.compile(r"[^A-Za-z0-9_.:-]")


class NameError_(ValueError):
    """An id or name with no millrace counterpart; the message says which and why."""


def device_id(group: str, node: str, device: str | None = None) -> str:
    """The millrace device id of a Sparkplug edge node (device None) or device."""
    parts = (group, node) if device is None else (group, node, device)
    mapped = ".".join(parts).lower()
    if not is_device_id(mapped):
        raise NameError_(
            f"{'/'.join(parts)!r} maps to {mapped!r}, not a device id: {DEVICE_ID_RULE}"
        )
    return mapped


def is_stored(name: str) -> bool:
    """False for the spec's control metrics and bdSeq, which describe the session."""
    return name != BD_SEQ and not name.startswith(CONTROL_PREFIXES)


def metric_name(name: str) -> str:
    """The millrace metric name of a Sparkplug metric name."""
    mapped = _OUTSIDE_RULE.sub("_", name.replace("/", ".")).lstrip("_.:-")
    if not is_metric_name(mapped):
        raise NameError_(f"metric {name!r} has no millrace name (maps to {mapped!r})")
    return mapped
