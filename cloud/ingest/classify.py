"""What an inbound message is: decode, validate, classify; pure, no I/O.

`millrace.wire` already guarantees a decoded batch is well formed (finite numbers,
min <= first/last <= max, aligned windows). Here come the checks that need
context - the topic it arrived on, the worker's clock and configuration - and
those that protect the database: magnitudes that would overflow a rollup, and
text PostgreSQL cannot store. Anything unusable becomes a `DeadLetter` with a
code and a reason (docs/cloud.md lists the codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from millrace import topics
from millrace.cloud.ingest.messages import (
    INGESTED_KINDS,
    Classified,
    DeadLetter,
    HealthItem,
    Inbound,
    Incoming,
    StateItem,
)
from millrace.errors import WireError
from millrace.wire import Batch, DeviceState, Heartbeat, Rejection, Window, decode_batch

# Plant signals are far below this; the cap keeps sums of squares of an hour of
# windows (<= 3600 x 1e9 readings) finite in float64.
MAX_ABS_VALUE: Final = 1e15
# Relative slack for float rounding in the sum-of-squares bounds: generous, because an
# agent accumulating a billion readings may drift by ~1e-7; the check is for nonsense.
SUMSQ_TOLERANCE: Final = 1e-6

ValidationCode = Literal[
    "identity_mismatch",
    "too_old",
    "in_future",
    "period_not_allowed",
    "out_of_range",
    "inconsistent",
    "bad_text",
]


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a well-formed batch is still refused; `code` groups reasons for metrics."""

    code: ValidationCode
    reason: str


@dataclass(frozen=True, slots=True)
class Limits:
    """The worker's acceptance window and allowed periods."""

    max_age_s: int
    max_skew_s: int
    allowed_periods_s: frozenset[int]


def _window_problem(w: Window, oldest_ms: int, newest_ms: int, limits: Limits) -> Invalid | None:
    """Checks per window; kept to plain comparisons because every stored row passes here."""
    start = w.start_ms
    if w.period_s not in limits.allowed_periods_s:
        allowed = sorted(limits.allowed_periods_s)
        return Invalid(
            "period_not_allowed",
            f"window {w.metric!r} at {start}: period {w.period_s} s not in {allowed}",
        )
    if start < oldest_ms:
        return Invalid(
            "too_old", f"window {w.metric!r} at {start}: older than {limits.max_age_s} s"
        )
    if start + w.period_s * 1000 > newest_ms:
        return Invalid(
            "in_future",
            f"window {w.metric!r} at {start}: ends more than {limits.max_skew_s} s from now",
        )
    # The wire contract already holds first, last and sum/count inside [min, max].
    low, high, count = w.min, w.max, w.count
    if low < -MAX_ABS_VALUE or high > MAX_ABS_VALUE:
        return Invalid(
            "out_of_range", f"window {w.metric!r} at {start}: |value| > {MAX_ABS_VALUE:g}"
        )
    # Cauchy-Schwarz below (variance >= 0) and count * max(x^2) above.
    sumsq = w.sumsq
    floor = w.sum * w.sum / count
    largest = low * low if low * low > high * high else high * high
    slack = SUMSQ_TOLERANCE * (floor if floor > 1.0 else 1.0)
    if sumsq < floor - slack or sumsq > count * largest * (1 + SUMSQ_TOLERANCE) + slack:
        return Invalid(
            "inconsistent",
            f"window {w.metric!r} at {start}: sumsq {sumsq} impossible for its sum/min/max",
        )
    return None


def validate_batch(
    batch: Batch, *, topic_device: str, now_ms: int, limits: Limits
) -> Invalid | None:
    """None when `batch` may be stored; otherwise the first problem found."""
    if batch.device != topic_device:
        return Invalid(
            "identity_mismatch",
            f"payload device {batch.device!r} published on the topic of {topic_device!r}",
        )
    if batch.sent_at_ms > now_ms + limits.max_skew_s * 1000:
        return Invalid("in_future", f"sent_at {batch.sent_at_ms} is in the future")
    oldest_ms = now_ms - limits.max_age_s * 1000
    newest_ms = now_ms + limits.max_skew_s * 1000
    for window in batch.windows:
        problem = _window_problem(window, oldest_ms, newest_ms, limits)
        if problem is not None:
            return problem
    for event in batch.events:
        where = f"event {event.metric!r} at {event.ts_ms}"
        if event.ts_ms < oldest_ms:
            return Invalid("too_old", f"{where}: older than {limits.max_age_s} s")
        if event.ts_ms > newest_ms:
            return Invalid("in_future", f"{where}: more than {limits.max_skew_s} s from now")
        value = event.value
        if isinstance(value, str):
            if "\x00" in value or not value.isprintable():
                return Invalid("bad_text", f"{where}: text holds control characters")
        elif not isinstance(value, bool) and abs(value) > MAX_ABS_VALUE:
            return Invalid("out_of_range", f"{where}: |value| > {MAX_ABS_VALUE:g}")
    return None


def dead_letter(
    msg: Inbound, device: str | None, code: str, reason: str, batch: Batch | None = None
) -> DeadLetter:
    """`msg` refused with `code` and `reason`, payload kept for diagnosis.

    `batch` is the payload decoded, when it was; only a batch of the topic's own device
    is keyed (and so receipted): one claiming another device is never answered.
    """
    key = (batch.device, batch.boot_id, batch.seq) if batch and batch.device == device else None
    return DeadLetter(
        topic=msg.topic,
        device=device,
        code=code,
        reason=reason,
        content_type=msg.content_type,
        payload=msg.payload,
        received_at=msg.received_at,
        batch_key=key,
    )


def failed_too_often(msg: Inbound, failures: int, last_failure: str) -> DeadLetter:
    """`msg` failed `failures` deliveries without a commit: dead-letter it, do not try again."""
    device: str | None = None
    batch: Batch | None = None
    try:
        topic = topics.parse_topic(msg.topic)
        device = topic.device_id
    except WireError:
        pass
    else:
        if topic.kind == "data":
            decoded = decode_batch(msg.payload, content_type=msg.content_type)
            batch = decoded if isinstance(decoded, Batch) else None
    return dead_letter(
        msg,
        device,
        "redelivered",
        f"{failures} deliveries failed without a commit; last failure: {last_failure}",
        batch,
    )


def classify(msg: Inbound, *, limits: Limits, now_ms: int) -> Classified:
    """Decode and validate one message; anything unusable becomes a dead letter."""
    try:
        topic = topics.parse_topic(msg.topic)
    except WireError as exc:
        return dead_letter(msg, None, "bad_topic", exc.reason)
    device = topic.device_id
    if topic.kind == "data":
        decoded = decode_batch(msg.payload, content_type=msg.content_type)
        if isinstance(decoded, Rejection):
            return dead_letter(msg, device, decoded.code, decoded.reason)
        problem = validate_batch(decoded, topic_device=device, now_ms=now_ms, limits=limits)
        if problem is not None:
            return dead_letter(msg, device, problem.code, problem.reason, decoded)
        return Incoming(decoded, msg.received_at)
    if topic.kind in ("state", "health"):
        try:
            parsed: DeviceState | Heartbeat = (
                DeviceState.from_json(msg.payload)
                if topic.kind == "state"
                else Heartbeat.from_json(msg.payload)
            )
        except WireError as exc:
            return dead_letter(msg, device, "invalid", exc.reason)
        if parsed.device != device:
            return dead_letter(
                msg,
                device,
                "identity_mismatch",
                f"payload device {parsed.device!r} published on the topic of {device!r}",
            )
        if isinstance(parsed, DeviceState):
            return StateItem(parsed, msg.received_at, msg.broker)
        return HealthItem(parsed, msg.received_at, msg.broker)
    return dead_letter(msg, device, "bad_topic", f"{topic.kind} messages are not ingested")


def kind_label(topic: str) -> str:
    """A message's `kind` in the metrics: data, state, health, or other (any other topic)."""
    try:
        kind = topics.parse_topic(topic).kind
    except WireError:
        return "other"
    return kind if kind in INGESTED_KINDS else "other"
