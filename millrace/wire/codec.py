"""Encoding of batches: compact MessagePack by default, JSON for hand testing.

Both encodings carry the same shape (short keys, windows and events as
arrays), and one strict decoder turns bytes into either a `Batch` or a
`Rejection` with a reason; it never raises on bad input. The MQTT v5
content-type property says which encoding a payload uses.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgpack

from millrace.errors import WireError
from millrace.wire.batch import (
    MAX_EVENTS_PER_BATCH,
    MAX_PAYLOAD_BYTES,
    MAX_WINDOWS_PER_BATCH,
    SUPPORTED_VERSIONS,
    WINDOW_FIELDS,
    Batch,
    Event,
    Window,
    windows_from_rows,
)

CONTENT_TYPE_MSGPACK: Final = "application/msgpack"
CONTENT_TYPE_JSON: Final = "application/json"
Encoding = Literal["msgpack", "json"]

RejectionCode = Literal["oversize", "undecodable", "unknown_version", "invalid"]

_ENVELOPE_KEYS: Final = frozenset({"v", "d", "b", "s", "t", "c", "dr", "rj", "w", "e"})
_REQUIRED_KEYS: Final = frozenset({"v", "d", "b", "s", "t", "w"})
_WINDOW_FIELDS: Final = len(WINDOW_FIELDS)
_EVENT_FIELDS: Final = 3


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a payload is not a batch; `code` groups reasons for dashboards."""

    code: RejectionCode
    reason: str


# A window's wire row: its fields in `Window`'s own order (tuples pack as arrays).
_window_row: Final = operator.attrgetter(*WINDOW_FIELDS)


def _to_plain(batch: Batch) -> dict[str, Any]:
    return {
        "v": batch.version,
        "d": batch.device,
        "b": batch.boot_id,
        "s": batch.seq,
        "t": batch.sent_at_ms,
        "c": batch.clock_synced,
        "dr": batch.dropped,
        "rj": batch.rejected,
        "w": [_window_row(w) for w in batch.windows],
        "e": [[e.metric, e.ts_ms, e.value] for e in batch.events],
    }


def encode_batch(batch: Batch, *, encoding: Encoding = "msgpack") -> bytes:
    """Serialise a batch; the result always decodes back to an equal batch."""
    plain = _to_plain(batch)
    if encoding == "json":
        return json.dumps(plain, separators=(",", ":"), allow_nan=False).encode()
    return msgpack.packb(plain, use_bin_type=True)


def content_type_for(encoding: Encoding) -> str:
    """The MQTT v5 content-type that announces `encoding`."""
    return CONTENT_TYPE_JSON if encoding == "json" else CONTENT_TYPE_MSGPACK


def _reject_constant(name: str) -> float:
    raise WireError(f"JSON constant {name} is not a finite number")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise WireError("JSON object has a duplicate key")
    return result


def _looks_like_json(payload: bytes, content_type: str | None) -> bool:
    return content_type == CONTENT_TYPE_JSON or (
        content_type is None and payload[:1] in (b"{", b" ", b"\n", b"\t", b"\r")
    )


def _load(payload: bytes, content_type: str | None) -> Any:
    is_json = _looks_like_json(payload, content_type)
    if content_type not in (None, CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK):
        raise WireError(f"unsupported content-type {content_type!r}")
    if is_json:
        return json.loads(
            payload.decode("utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=_no_duplicate_keys,
        )
    return msgpack.unpackb(
        payload,
        raw=False,
        strict_map_key=True,
        max_array_len=max(MAX_WINDOWS_PER_BATCH, MAX_EVENTS_PER_BATCH),
        max_map_len=len(_ENVELOPE_KEYS),
    )


def _window(row: Any, index: int) -> Window:
    if not isinstance(row, list) or len(row) != _WINDOW_FIELDS:
        raise WireError(f"w[{index}]: expected an array of {_WINDOW_FIELDS} fields")
    return Window(*row)


def _event(row: Any, index: int) -> Event:
    if not isinstance(row, list) or len(row) != _EVENT_FIELDS:
        raise WireError(f"e[{index}]: expected an array of {_EVENT_FIELDS} fields")
    metric, ts_ms, value = row
    if isinstance(value, float) and not math.isfinite(value):
        raise WireError(f"e[{index}]: value is not finite")
    return Event(metric, ts_ms, value)


def _batch_from_plain(plain: Any) -> Batch:
    if not isinstance(plain, dict):
        raise WireError(f"expected a map at the top level, got {type(plain).__name__}")
    unknown = set(plain) - _ENVELOPE_KEYS
    if unknown:
        raise WireError(f"unknown envelope key(s) {sorted(map(str, unknown))}")
    missing = _REQUIRED_KEYS - set(plain)
    if missing:
        raise WireError(f"missing envelope key(s) {sorted(missing)}")
    windows = plain["w"]
    events = plain.get("e", [])
    if not isinstance(windows, list):
        raise WireError("w: expected an array of windows")
    if not isinstance(events, list):
        raise WireError("e: expected an array of events")
    return Batch(
        device=plain["d"],
        boot_id=plain["b"],
        seq=plain["s"],
        sent_at_ms=plain["t"],
        windows=tuple(_window(row, i) for i, row in enumerate(windows)),
        events=tuple(_event(row, i) for i, row in enumerate(events)),
        clock_synced=plain.get("c", True),
        dropped=plain.get("dr", 0),
        rejected=plain.get("rj", 0),
        version=plain["v"],
    )


def _fast_msgpack(payload: bytes) -> Batch | None:
    """The common case in one pass: a well-formed MessagePack batch, or None.

    Tuples instead of lists and `windows_from_rows` instead of `Window(*row)` make this
    about four times cheaper than the strict path. It never explains a refusal: None (or
    any exception) sends the payload to the strict path, which decodes it again and words
    the first problem exactly as it always has. So a batch returned here is one the strict
    path would return equal, and a rejection always comes from the strict path.
    """
    plain = msgpack.unpackb(
        payload,
        raw=False,
        use_list=False,
        strict_map_key=True,
        max_array_len=max(MAX_WINDOWS_PER_BATCH, MAX_EVENTS_PER_BATCH),
        max_map_len=len(_ENVELOPE_KEYS),
    )
    if type(plain) is not dict or not _REQUIRED_KEYS <= plain.keys() <= _ENVELOPE_KEYS:
        return None
    version = plain["v"]
    rows = plain["w"]
    event_rows = plain.get("e", ())
    if not _is_supported_version(version) or type(rows) is not tuple:
        return None
    if type(event_rows) is not tuple or not all(type(row) is tuple for row in event_rows):
        return None
    windows = windows_from_rows(rows)
    if windows is None:
        return None
    return Batch._with_checked_windows(
        device=plain["d"],
        boot_id=plain["b"],
        seq=plain["s"],
        sent_at_ms=plain["t"],
        windows=windows,
        events=tuple(_event(list(row), i) for i, row in enumerate(event_rows)),
        clock_synced=plain.get("c", True),
        dropped=plain.get("dr", 0),
        rejected=plain.get("rj", 0),
        version=version,
    )


def _is_supported_version(version: object) -> bool:
    return type(version) is int and version in SUPPORTED_VERSIONS


def decode_batch(payload: bytes, *, content_type: str | None = None) -> Batch | Rejection:
    """Decode and validate a payload; never raises for bad input."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Rejection("oversize", f"payload of {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    if not payload:
        return Rejection("undecodable", "empty payload")
    if content_type in (None, CONTENT_TYPE_MSGPACK) and not _looks_like_json(payload, content_type):
        try:
            fast = _fast_msgpack(payload)
        except Exception:  # the strict path below decides, and says why
            fast = None
        if fast is not None:
            return fast
    try:
        plain = _load(payload, content_type)
    except WireError as exc:
        return Rejection("undecodable", exc.reason)
    except (ValueError, TypeError, UnicodeDecodeError, msgpack.UnpackException) as exc:
        return Rejection("undecodable", f"cannot decode payload: {type(exc).__name__}: {exc}")
    except RecursionError:
        return Rejection("undecodable", "payload nested too deeply")
    if isinstance(plain, dict) and "v" in plain and not _is_supported_version(plain["v"]):
        return Rejection("unknown_version", f"unknown schema version {plain['v']!r}")
    try:
        return _batch_from_plain(plain)
    except WireError as exc:
        return Rejection("invalid", exc.reason)
    except (TypeError, ValueError, OverflowError) as exc:
        return Rejection("invalid", f"{type(exc).__name__}: {exc}")
