"""The ingest worker's per-device bounds, in one place: config `[limits]` fills it.

Each bound protects the shared database and the worker from one device (broken or
hostile): open sequence gaps per stream, metric names per device, names in the id
cache, and the dead-letter rate. docs/cloud.md ("Bounds per device") says what
happens at each.
"""

from __future__ import annotations

from dataclasses import dataclass

from millrace.cloud.ingest.idcache import DEFAULT_ID_CACHE_NAMES
from millrace.cloud.ingest.letterlimit import (
    DEFAULT_DEAD_LETTER_BURST,
    DEFAULT_DEAD_LETTERS_PER_MINUTE,
)
from millrace.cloud.ingest.metriccap import DEFAULT_MAX_METRICS_PER_DEVICE
from millrace.cloud.ingest.streams import DEFAULT_MAX_GAPS_PER_STREAM


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """Per-device bounds of one worker; the defaults suit a plant of thousands of devices."""

    max_gaps_per_stream: int = DEFAULT_MAX_GAPS_PER_STREAM
    max_metrics_per_device: int = DEFAULT_MAX_METRICS_PER_DEVICE
    id_cache_names: int = DEFAULT_ID_CACHE_NAMES
    dead_letters_per_minute: float = DEFAULT_DEAD_LETTERS_PER_MINUTE
    dead_letter_burst: int = DEFAULT_DEAD_LETTER_BURST
