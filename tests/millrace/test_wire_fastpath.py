"""The MessagePack fast decode path agrees with the strict path, and valid batches take it.

`decode_batch` has no public switch for its strict path, so the reference here is
`decode_batch` itself with `codec._fast_msgpack` replaced by one that always declines
(the strict path then decodes the payload, exactly as for anything the fast path refuses).
The fast path alone is `codec._fast_msgpack`, an internal function called directly.
"""

from __future__ import annotations

import math
from typing import Any
from unittest import mock

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from millrace.wire import Batch, Event, Rejection, Window, codec, decode_batch, encode_batch
from millrace.wire.batch import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS

PERIODS = (1, 5, 10, 60, 300, 3600)
device_ids = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,20}\Z")
metric_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}\Z")
values = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)

# Values a mutation puts in place of a field: type confusions and range edges.
odd_values = st.one_of(
    st.sampled_from(
        [
            None,
            True,
            False,
            0,
            1,
            -1,
            2**31,
            2**63 - 1,
            -(2**63),
            2**64 - 1,
            MIN_TIMESTAMP_MS - 1,
            MIN_TIMESTAMP_MS,
            MAX_TIMESTAMP_MS,
            MAX_TIMESTAMP_MS + 1,
            0.0,
            -0.0,
            1.0,
            -1.0,
            1e308,
            -1e308,
            5e-324,
            math.nan,
            math.inf,
            -math.inf,
            "",
            "x",
            "temp",
            "a b",
            "\u00e9",
            b"",
            b"raw",
            [],
            [1],
            {},
            {"k": 1},
        ]
    ),
    st.integers(-(2**63), 2**64 - 1),  # what MessagePack can carry
    st.floats(),
    st.text(max_size=8),
)


@st.composite
def windows(draw: st.DrawFn, metric: str) -> Window:
    period = draw(st.sampled_from(PERIODS))
    start = draw(st.integers(MIN_TIMESTAMP_MS // 1000 // period + 1, 4_000_000_000 // period))
    readings = draw(st.lists(values, min_size=1, max_size=8))
    return Window(
        metric=metric,
        start_ms=start * period * 1000,
        period_s=period,
        count=len(readings),
        sum=math.fsum(readings),
        min=min(readings),
        max=max(readings),
        first=readings[0],
        last=readings[-1],
        sumsq=math.fsum(r * r for r in readings),
        rejected=draw(st.integers(0, 1000)),
    )


events = st.builds(
    Event,
    metric=metric_names,
    ts_ms=st.integers(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS),
    value=st.one_of(values, st.integers(-(2**31), 2**31), st.text(max_size=16), st.booleans()),
)


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    names = draw(st.lists(metric_names, unique=True, min_size=1, max_size=6))
    return Batch(
        device=draw(device_ids),
        boot_id=draw(st.from_regex(r"\A[0-9a-f]{32}\Z")),
        seq=draw(st.integers(0, 2**63 - 1)),
        sent_at_ms=draw(st.integers(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS)),
        windows=tuple(draw(windows(name)) for name in names),
        events=tuple(draw(st.lists(events, max_size=3))),
        clock_synced=draw(st.booleans()),
        dropped=draw(st.integers(0, 10**6)),
        rejected=draw(st.integers(0, 10**6)),
    )


def _declined(payload: bytes) -> None:
    return None


def strict_decode(payload: bytes) -> Batch | Rejection:
    """`decode_batch` with the fast path declining every payload: the strict path alone."""
    with mock.patch.object(codec, "_fast_msgpack", _declined):
        return decode_batch(payload)


def assert_same(fast: Batch | Rejection, strict: Batch | Rejection) -> None:
    # repr as well as ==: it tells 1 from 1.0 and 0.0 from -0.0.
    assert fast == strict
    assert repr(fast) == repr(strict)


def _mutate_plain(plain: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """One structural change to a decoded batch: a field, a row, or the envelope."""
    kind = data.draw(
        st.sampled_from(
            [
                "envelope",
                "drop_key",
                "extra_key",
                "window_field",
                "window_len",
                "dup_window",
                "event_field",
                "event_len",
                "int_floats",
            ]
        )
    )
    rows = plain["w"]
    if kind == "envelope":
        plain[data.draw(st.sampled_from(sorted(codec._ENVELOPE_KEYS)))] = data.draw(odd_values)
    elif kind == "drop_key":
        del plain[data.draw(st.sampled_from(sorted(plain)))]
    elif kind == "extra_key":
        plain[data.draw(st.text(max_size=3))] = data.draw(odd_values)
    elif kind == "window_field":
        row = rows[data.draw(st.integers(0, len(rows) - 1))]
        row[data.draw(st.integers(0, len(row) - 1))] = data.draw(odd_values)
    elif kind == "window_len":
        row = rows[data.draw(st.integers(0, len(rows) - 1))]
        if data.draw(st.booleans()):
            row.pop()
        else:
            row.append(data.draw(odd_values))
    elif kind == "dup_window":
        rows.append(list(rows[data.draw(st.integers(0, len(rows) - 1))]))
    elif kind == "int_floats":  # whole-number floats sent as integers: valid, strict converts
        row = rows[data.draw(st.integers(0, len(rows) - 1))]
        row[4:10] = [int(v) if v.is_integer() and abs(v) < 2**53 else v for v in row[4:10]]
    else:
        evs = plain.setdefault("e", [])
        if not evs:
            evs.append(["temp", MIN_TIMESTAMP_MS, 1.0])
        row = evs[data.draw(st.integers(0, len(evs) - 1))]
        if kind == "event_field":
            row[data.draw(st.integers(0, len(row) - 1))] = data.draw(odd_values)
        else:
            row.append(data.draw(odd_values))
    return plain


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_valid_batches_decode_the_same_on_both_paths(batch: Batch) -> None:
    payload = encode_batch(batch)
    fast = codec._fast_msgpack(payload)
    assert fast is not None  # a valid float-valued batch is the fast path's case
    assert_same(fast, strict_decode(payload))
    assert_same(decode_batch(payload), batch)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.data())
def test_structurally_mutated_payloads_decode_the_same(batch: Batch, data: st.DataObject) -> None:
    plain = _mutate_plain(msgpack.unpackb(encode_batch(batch), raw=False), data)
    payload = msgpack.packb(plain, use_bin_type=True)
    result = decode_batch(payload)
    assert_same(result, strict_decode(payload))
    event(type(result).__name__ if isinstance(result, Batch) else f"rejected {result.code}")
    try:
        fast = codec._fast_msgpack(payload)
    except Exception:  # decode_batch treats a raising fast path as declining
        fast = None
    if fast is not None:  # whatever the fast path accepts, the strict path accepts equal
        assert_same(fast, strict_decode(payload))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.binary(min_size=1, max_size=16), st.data())
def test_byte_mutated_payloads_decode_the_same(
    batch: Batch, junk: bytes, data: st.DataObject
) -> None:
    payload = bytearray(encode_batch(batch))
    at = data.draw(st.integers(0, len(payload) - 1))
    how = data.draw(st.sampled_from(["overwrite", "insert", "truncate"]))
    if how == "overwrite":
        payload[at : at + len(junk)] = junk
    elif how == "insert":
        payload[at:at] = junk
    else:
        del payload[at:]
    mutated = bytes(payload)
    assert_same(decode_batch(mutated), strict_decode(mutated))


def _valid_batch() -> Batch:
    w1 = Window("temp", 1_700_000_000_000, 10, 2, 3.0, 1.0, 2.0, 1.0, 2.0, 5.0)
    w2 = Window("flow", 1_700_000_000_000, 10, 1, 4.5, 4.5, 4.5, 4.5, 4.5, 20.25, 3)
    return Batch(
        device="dev-a",
        boot_id="ab" * 16,
        seq=7,
        sent_at_ms=1_700_000_010_000,
        windows=(w1, w2),
        events=(Event("door", 1_700_000_005_000, "open"),),
    )


def _strict_forbidden(*args: object, **kwargs: object) -> Any:
    raise AssertionError("the strict path was taken")


def test_a_valid_msgpack_batch_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _valid_batch()
    payload = encode_batch(batch)
    monkeypatch.setattr(codec, "_load", _strict_forbidden)
    monkeypatch.setattr(codec, "_batch_from_plain", _strict_forbidden)
    assert decode_batch(payload) == batch
    assert decode_batch(payload, content_type=codec.CONTENT_TYPE_MSGPACK) == batch
    # The patch is live: a payload the fast path declines does reach the strict path.
    plain = msgpack.unpackb(payload, raw=False)
    plain["w"][0][4] = 3  # an integer sum: valid, but only the strict path converts it
    with pytest.raises(AssertionError, match="strict path was taken"):
        decode_batch(msgpack.packb(plain))


def test_integer_valued_floats_take_the_strict_path_and_come_out_floats() -> None:
    plain = msgpack.unpackb(encode_batch(_valid_batch()), raw=False)
    plain["w"][0][4] = 3
    payload = msgpack.packb(plain)
    assert codec._fast_msgpack(payload) is None
    decoded = decode_batch(payload)
    assert isinstance(decoded, Batch)
    assert decoded == _valid_batch()
    assert type(decoded.windows[0].sum) is float


@pytest.mark.parametrize(
    ("low", "high", "mean"),
    [
        (1.0, 2.0, 2.0),  # on the bound
        (1.0, 2.0, 2.0 + 1.5e-9),  # outside [min, max], inside the slack (1e-9 * 2)
        (1.0, 2.0, 2.0 + 2.5e-9),  # outside the slack
        (1.0, 2.0, 1.0 - 1.5e-9),
        (1.0, 2.0, 1.0 - 2.5e-9),
        (-3e6, -2e6, -3e6 - 2e-3),  # slack 1e-9 * 3e6 = 3e-3
        (-3e6, -2e6, -3e6 - 4e-3),
        (0.1, 0.2, 0.2 + 0.5e-9),  # slack 1e-9: |min|, |max| below 1
        (0.1, 0.2, 0.2 + 1.5e-9),
    ],
)
def test_mean_just_inside_or_outside_the_slack_decodes_the_same_on_both_paths(
    low: float, high: float, mean: float
) -> None:
    plain = msgpack.unpackb(encode_batch(_valid_batch()), raw=False)
    plain["w"][0][3:10] = [1, mean, low, high, low, high, high * high + low * low]
    payload = msgpack.packb(plain)
    fast, strict = decode_batch(payload), strict_decode(payload)
    assert_same(fast, strict)
    inside = low - 1e-9 * max(1.0, abs(low), abs(high)) <= mean
    inside = inside and mean <= high + 1e-9 * max(1.0, abs(low), abs(high))
    assert isinstance(fast, Batch) is inside
