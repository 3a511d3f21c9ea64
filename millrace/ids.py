"""Device and metric identifiers: one rule, shared by topics, certificates and the database."""

from __future__ import annotations

import re

DEVICE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
METRIC_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
DEVICE_ID_RULE = "1-63 chars of a-z 0-9 . _ -, starting with a letter or digit"
METRIC_NAME_RULE = "1-100 chars of A-Z a-z 0-9 _ . : -, starting with a letter or digit"


def is_device_id(value: object) -> bool:
    """True when `value` may be a device id (and so a certificate CN and a topic level)."""
    return isinstance(value, str) and DEVICE_ID_PATTERN.fullmatch(value) is not None


def is_metric_name(value: object) -> bool:
    """True when `value` may name a metric."""
    return isinstance(value, str) and METRIC_NAME_PATTERN.fullmatch(value) is not None
