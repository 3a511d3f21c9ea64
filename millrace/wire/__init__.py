"""The wire contract: batch envelope, its codec, the window aggregate, the small JSON messages."""

from millrace.wire.aggregate import Aggregate, merge_all
from millrace.wire.batch import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    Batch,
    Event,
    EventValue,
    Window,
)
from millrace.wire.codec import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_MSGPACK,
    Encoding,
    Rejection,
    content_type_for,
    decode_batch,
    encode_batch,
)
from millrace.wire.messages import (
    MAX_HOLE_METRICS,
    AlertMessage,
    Command,
    CommandReply,
    DeviceState,
    Heartbeat,
)
from millrace.wire.receipt import MAX_RECEIPT_RANGES, Receipt, receipts_for

__all__ = [
    "CONTENT_TYPE_JSON",
    "CONTENT_TYPE_MSGPACK",
    "MAX_HOLE_METRICS",
    "MAX_PAYLOAD_BYTES",
    "MAX_RECEIPT_RANGES",
    "SCHEMA_VERSION",
    "Aggregate",
    "AlertMessage",
    "Batch",
    "Command",
    "CommandReply",
    "DeviceState",
    "Encoding",
    "Event",
    "EventValue",
    "Heartbeat",
    "Receipt",
    "Rejection",
    "Window",
    "content_type_for",
    "decode_batch",
    "encode_batch",
    "merge_all",
    "receipts_for",
]
