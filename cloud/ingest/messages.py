"""What flows through ingest: a delivered message, what it turned out to be, what got stored.

`Inbound` comes from the consumer; `classify` turns it into one `Classified` item
(a batch to store, a device state, a heartbeat, or a dead letter); the store writes
a commit batch of items in one transaction and reports a `WriteResult`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

from millrace.wire import Batch, DeviceState, Heartbeat, Window

# The device topics ingest subscribes to; `kind_label` calls every other topic "other".
INGESTED_KINDS: Final = ("data", "state", "health")
Key = tuple[str, str, int]  # device, boot_id, seq: a batch's identity in the ingest ledger


@dataclass(frozen=True, slots=True)
class Inbound:
    """One delivered message, detached from paho."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    content_type: str | None
    dup: bool
    generation: int
    received_at: datetime
    received_mono: float
    # Which configured broker carried it (index into broker.endpoints): its ack and its
    # receipt go back through that broker.
    broker: int = 0


@dataclass(frozen=True, slots=True)
class Incoming:
    """A validated batch and when this worker received it."""

    batch: Batch
    received_at: datetime


@dataclass(frozen=True, slots=True)
class StateItem:
    """A device's birth or will message, validated."""

    state: DeviceState
    received_at: datetime
    # Index into broker.endpoints of the broker that carried it (None: not over MQTT here).
    broker: int | None = None


@dataclass(frozen=True, slots=True)
class HealthItem:
    """A device's heartbeat, validated."""

    heartbeat: Heartbeat
    received_at: datetime
    # Index into broker.endpoints of the broker that carried it (None: not over MQTT here).
    broker: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that will never be stored, and why."""

    topic: str
    device: str | None
    code: str
    reason: str
    content_type: str | None
    payload: bytes
    received_at: datetime
    # The batch's ledger key when the payload decoded as a batch of the topic's own
    # device: receipts answer it from here without decoding the payload again.
    batch_key: Key | None = None


Classified = Incoming | StateItem | HealthItem | DeadLetter


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one `BatchWriter.write` stored; `windows` feeds the alert engine."""

    stored_batches: int
    duplicate_batches: int
    readings: int
    events: int
    rollup_rows: int
    gaps_opened: int
    windows: tuple[tuple[str, Window], ...]  # (device, window), for the alert engine
    stored_keys: frozenset[Key]
    gaps_dropped: int = 0  # old gaps forgotten over the per-stream cap
    metrics_refused: int = 0  # batches filed in part as too_many_metrics dead letters

    def __add__(self, other: WriteResult) -> WriteResult:
        """Both results, as if one write had stored them (message-by-message retries)."""
        return WriteResult(
            stored_batches=self.stored_batches + other.stored_batches,
            duplicate_batches=self.duplicate_batches + other.duplicate_batches,
            readings=self.readings + other.readings,
            events=self.events + other.events,
            rollup_rows=self.rollup_rows + other.rollup_rows,
            gaps_opened=self.gaps_opened + other.gaps_opened,
            windows=self.windows + other.windows,
            stored_keys=self.stored_keys | other.stored_keys,
            gaps_dropped=self.gaps_dropped + other.gaps_dropped,
            metrics_refused=self.metrics_refused + other.metrics_refused,
        )
