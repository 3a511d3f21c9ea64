"""The batch codec: every valid batch round-trips; every mutation is rejected with a reason."""

from __future__ import annotations

import json
import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from millrace.errors import WireError
from millrace.wire import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_MSGPACK,
    MAX_PAYLOAD_BYTES,
    Batch,
    DeviceState,
    Event,
    Heartbeat,
    Rejection,
    Window,
    decode_batch,
    encode_batch,
)
from millrace.wire.batch import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS

PERIODS = (1, 5, 10, 60, 300, 3600)
device_ids = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,20}\Z")
metric_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}\Z")
values = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)


@st.composite
def windows(draw: st.DrawFn, metric: str | None = None) -> Window:
    period = draw(st.sampled_from(PERIODS))
    start = draw(st.integers(MIN_TIMESTAMP_MS // 1000 // period + 1, 4_000_000_000 // period))
    readings = draw(st.lists(values, min_size=1, max_size=20))
    return Window(
        metric=metric if metric is not None else draw(metric_names),
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
    value=st.one_of(values, st.integers(-(2**31), 2**31), st.text(max_size=64), st.booleans()),
)


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    names = draw(st.lists(metric_names, unique=True, max_size=8))
    return Batch(
        device=draw(device_ids),
        boot_id=draw(st.from_regex(r"\A[0-9a-f]{32}\Z")),
        seq=draw(st.integers(0, 2**63 - 1)),
        sent_at_ms=draw(st.integers(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS)),
        windows=tuple(draw(windows(metric=name)) for name in names),
        events=tuple(draw(st.lists(events, max_size=5))),
        clock_synced=draw(st.booleans()),
        dropped=draw(st.integers(0, 10**6)),
        rejected=draw(st.integers(0, 10**6)),
    )


@given(batches(), st.sampled_from(["msgpack", "json"]))
def test_every_valid_batch_round_trips(batch: Batch, encoding: str) -> None:
    payload = encode_batch(batch, encoding=encoding)  # type: ignore[arg-type]
    content_type = CONTENT_TYPE_JSON if encoding == "json" else CONTENT_TYPE_MSGPACK
    assert decode_batch(payload, content_type=content_type) == batch
    assert decode_batch(payload) == batch  # sniffed without a content-type


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.data())
def test_truncated_payload_is_rejected(batch: Batch, data: st.DataObject) -> None:
    payload = encode_batch(batch)
    cut = data.draw(st.integers(0, len(payload) - 1))
    result = decode_batch(payload[:cut])
    assert isinstance(result, Rejection)
    assert result.reason


@given(batches(), st.binary(min_size=1, max_size=64), st.data())
def test_random_corruption_never_raises(batch: Batch, junk: bytes, data: st.DataObject) -> None:
    payload = bytearray(encode_batch(batch))
    at = data.draw(st.integers(0, len(payload) - 1))
    payload[at : at + len(junk)] = junk
    result = decode_batch(bytes(payload))
    assert isinstance(result, Batch | Rejection)
    if isinstance(result, Rejection):
        assert result.code in {"oversize", "undecodable", "unknown_version", "invalid"}


def _plain(batch: Batch) -> dict:
    return msgpack.unpackb(encode_batch(batch), raw=False)


def _first_valid_batch() -> Batch:
    w = Window("temp", 1_700_000_000_000, 10, 2, 3.0, 1.0, 2.0, 1.0, 2.0, 5.0)
    return Batch(
        device="dev-a", boot_id="ab" * 16, seq=7, sent_at_ms=1_700_000_010_000, windows=(w,)
    )


ENVELOPE_MUTATIONS = {
    "unknown version": ("v", 99, "unknown_version"),
    "version as bool": ("v", True, "unknown_version"),
    "device not a string": ("d", 42, "invalid"),
    "device with a slash": ("d", "a/b", "invalid"),
    "boot_id too short": ("b", "abc", "invalid"),
    "seq negative": ("s", -1, "invalid"),
    "seq as float": ("s", 1.5, "invalid"),
    "seq too big": ("s", 2**64 - 1, "invalid"),
    "sent_at in 1970": ("t", 0, "invalid"),
    "clock flag as int": ("c", 1, "invalid"),
    "windows not a list": ("w", {"a": 1}, "invalid"),
}


@pytest.mark.parametrize("name", sorted(ENVELOPE_MUTATIONS))
def test_envelope_mutation_is_rejected(name: str) -> None:
    key, value, code = ENVELOPE_MUTATIONS[name]
    plain = _plain(_first_valid_batch())
    plain[key] = value
    result = decode_batch(msgpack.packb(plain))
    assert isinstance(result, Rejection), name
    assert result.code == code
    assert result.reason


WINDOW_MUTATIONS = {
    "nan sum": (4, float("nan"), "not finite"),
    "inf max": (6, float("inf"), "not finite"),
    "count zero": (3, 0, "outside"),
    "huge count": (3, 10**12, "outside"),
    "count as string": (3, "2", "expected an integer"),
    "min above max": (5, 9.0, "min"),
    "first outside range": (7, -5.0, "first"),
    "unaligned start": (1, 1_700_000_000_001, "aligned"),
    "zero period": (2, 0, "outside"),
    "negative sumsq": (9, -1.0, "negative"),
    "metric with space": (0, "a b", "metric"),
}


@pytest.mark.parametrize("name", sorted(WINDOW_MUTATIONS))
def test_window_mutation_is_rejected_with_reason(name: str) -> None:
    index, value, words = WINDOW_MUTATIONS[name]
    plain = _plain(_first_valid_batch())
    plain["w"][0][index] = value
    result = decode_batch(msgpack.packb(plain))
    assert isinstance(result, Rejection), name
    assert result.code == "invalid"
    assert words in result.reason


def test_nan_in_json_is_rejected() -> None:
    text = encode_batch(_first_valid_batch(), encoding="json").decode().replace("3.0", "NaN", 1)
    result = decode_batch(text.encode(), content_type=CONTENT_TYPE_JSON)
    assert isinstance(result, Rejection)
    assert "NaN" in result.reason


def test_unknown_and_duplicate_keys_are_rejected() -> None:
    plain = json.loads(encode_batch(_first_valid_batch(), encoding="json"))
    plain["extra"] = 1
    assert isinstance(decode_batch(json.dumps(plain).encode()), Rejection)
    text = encode_batch(_first_valid_batch(), encoding="json").decode()
    duplicated = text.replace('"s":7', '"s":7,"s":8')
    result = decode_batch(duplicated.encode())
    assert isinstance(result, Rejection)
    assert "duplicate" in result.reason


def test_oversize_payload_is_rejected_before_parsing() -> None:
    result = decode_batch(b"{" + b" " * MAX_PAYLOAD_BYTES + b"}")
    assert isinstance(result, Rejection)
    assert result.code == "oversize"


def test_unsupported_content_type_is_rejected() -> None:
    result = decode_batch(encode_batch(_first_valid_batch()), content_type="text/plain")
    assert isinstance(result, Rejection)
    assert "content-type" in result.reason


def test_duplicate_window_key_is_invalid() -> None:
    w = _first_valid_batch().windows[0]
    with pytest.raises(WireError, match="twice"):
        Batch(
            device="dev-a", boot_id="ab" * 16, seq=1, sent_at_ms=1_700_000_010_000, windows=(w, w)
        )


def test_deep_nesting_is_rejected_not_raised() -> None:
    payload = b"[" * 100_000 + b"]" * 100_000
    assert isinstance(decode_batch(payload, content_type=CONTENT_TYPE_JSON), Rejection)


def test_birth_carries_units_and_rejects_bad_ones() -> None:
    state = DeviceState("dev-a", "online", 1_700_000_000_000, "ab" * 16, units={"t": "degC"})
    assert DeviceState.from_json(state.to_json()) == state
    assert DeviceState.from_json(b'{"device":"dev-a","status":"offline","ts_ms":1}').units == {}
    with pytest.raises(WireError, match="metric name"):
        DeviceState("dev-a", "online", 1, units={"a b": "x"})
    with pytest.raises(WireError, match="longer than"):
        DeviceState("dev-a", "online", 1, units={"t": "x" * 33})


# -- births and heartbeats: validated like batches, before they can reach the database ----

_BOOT = "ab" * 16
_GOOD_BIRTH: dict[str, object] = {
    "device": "dev-a",
    "status": "online",
    "ts_ms": 1_700_000_000_000,
    "boot_id": _BOOT,
    "agent_version": "1.2.0",
    "config_hash": "0123abcd",
    "units": {"t": "degC", "flow": "m³/h"},
}
_GOOD_HEARTBEAT: dict[str, object] = {
    "device": "dev-a",
    "boot_id": _BOOT,
    "ts_ms": 1_700_000_000_000,
    "outbox_batches": 3,
    "outbox_bytes": 4096,
    "outbox_oldest_age_s": 1.5,
    "dropped_batches": 0,
    "rejected_readings": 2,
    "driver_errors": {"modbus": 1},
    "cpu_percent": 4.5,
    "rss_bytes": 40_000_000,
    "disk_free_bytes": 10**9,
    "cert_days_left": -2.0,
    "clock_synced": False,
    "agent_version": "1.2.0",
}


def _json(base: dict[str, object], **changes: object) -> bytes:
    return json.dumps({**base, **changes}).encode()


def test_good_births_and_heartbeats_pass_the_contract() -> None:
    state = DeviceState.from_json(_json(_GOOD_BIRTH))
    assert DeviceState.from_json(state.to_json()) == state
    # A will from a tool without a boot, and a gateway whose clock reset to 1970.
    assert DeviceState.from_json(_json(_GOOD_BIRTH, boot_id="", ts_ms=0)).boot_id == ""
    hb = Heartbeat.from_json(_json(_GOOD_HEARTBEAT))
    assert Heartbeat.from_json(hb.to_json()) == hb
    # A certificate valid until 9999-12-31 (the end of X.509 time) is still reportable.
    assert Heartbeat.from_json(_json(_GOOD_HEARTBEAT, cert_days_left=2_900_000.0))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"agent_version": "1.0\x00evil"}, "agent_version: holds non-printable"),
        ({"agent_version": "1.0\ud800"}, "agent_version: holds non-printable"),
        ({"agent_version": "1.0\x1b[31m"}, "agent_version: holds non-printable"),
        ({"agent_version": "v" * 65}, "agent_version: longer than 64"),
        ({"config_hash": "a\x00b"}, "config_hash: holds non-printable"),
        ({"config_hash": "h" * 129}, "config_hash: longer than 128"),
        ({"units": {"t": "deg\x00C"}}, "units\\['t'\\]: holds non-printable"),
        ({"units": {f"m{i}": "x" for i in range(4097)}}, "more than 4096 metrics"),
        ({"boot_id": "not-hex"}, "boot_id: expected 32 lowercase hex"),
        ({"boot_id": "AB" * 16}, "boot_id: expected 32 lowercase hex"),
        ({"ts_ms": 10**30}, "ts_ms: .* is outside"),
        ({"ts_ms": -1}, "ts_ms: .* is outside"),
    ],
)
def test_birth_with_unstorable_fields_is_refused_with_a_reason(
    change: dict[str, object], reason: str
) -> None:
    with pytest.raises(WireError, match=reason):
        DeviceState.from_json(_json(_GOOD_BIRTH, **change))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"agent_version": "x\x00"}, "agent_version: holds non-printable"),
        ({"agent_version": "\udfff"}, "agent_version: holds non-printable"),
        ({"boot_id": ""}, "boot_id: expected 32 lowercase hex"),
        ({"boot_id": "ab" * 15 + "zz"}, "boot_id: expected 32 lowercase hex"),
        ({"outbox_batches": 10**30}, "outbox_batches: .* is outside"),
        ({"outbox_bytes": -1}, "outbox_bytes: .* is outside"),
        ({"disk_free_bytes": 2**63}, "disk_free_bytes: .* is outside"),
        ({"cpu_percent": 1e30}, "cpu_percent: .* is outside"),
        ({"outbox_oldest_age_s": -0.5}, "outbox_oldest_age_s: .* is outside"),
        ({"cert_days_left": 1e30}, "cert_days_left: .* is outside"),
        ({"ts_ms": 10**30}, "ts_ms: .* is outside"),
        ({"driver_errors": {"mod\x00bus": 1}}, "driver_errors key: holds non-printable"),
        ({"driver_errors": {"modbus": 10**30}}, "driver_errors\\['modbus'\\]: .* is outside"),
        ({"driver_errors": {f"d{i}": 1 for i in range(4097)}}, "more than 4096 drivers"),
        ({"driver_errors": {"d" * 129: 1}}, "driver_errors key: longer than 128"),
        ({"cpu_percent": True}, "cpu_percent: wrong type bool"),
    ],
)
def test_heartbeat_with_unstorable_fields_is_refused_with_a_reason(
    change: dict[str, object], reason: str
) -> None:
    with pytest.raises(WireError, match=reason):
        Heartbeat.from_json(_json(_GOOD_HEARTBEAT, **change))


# -- unclean end: the birth that reports the hole a previous boot left ---------------------

_PREV = "cd" * 16
_HOLE_BIRTH: dict[str, object] = {
    **_GOOD_BIRTH,
    "prev_boot_id": _PREV,
    "prev_closed_ms": {"t": 1_699_999_990_000, "flow": 1_699_999_980_000},
    "prev_metrics_omitted": 0,
    "started_ms": 1_699_999_999_000,
}


def test_unclean_end_birth_round_trips() -> None:
    state = DeviceState.from_json(json.dumps(_HOLE_BIRTH).encode())
    assert state.prev_boot_id == _PREV
    assert state.prev_closed_ms == {"t": 1_699_999_990_000, "flow": 1_699_999_980_000}
    assert DeviceState.from_json(state.to_json()) == state
    # An ordinary birth (or one from an older agent) carries no hole, and a birth without
    # one keeps the older layout (an older cloud refuses unknown fields).
    assert DeviceState.from_json(json.dumps(_GOOD_BIRTH).encode()).prev_boot_id == ""
    plain = DeviceState("dev-a", "online", 1, _BOOT, started_ms=5)
    assert "prev_boot_id" not in json.loads(plain.to_json())
    assert "started_ms" not in json.loads(plain.to_json())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"prev_boot_id": "XYZ"}, "prev_boot_id: expected 32"),
        ({"prev_boot_id": _BOOT}, "the same as boot_id"),
        ({"status": "offline"}, "only a birth"),
        ({"started_ms": 0}, "started_ms: required"),
        ({"started_ms": -5}, "started_ms"),
        ({"prev_closed_ms": {"t": 1_699_999_999_001}}, r"prev_closed_ms\['t'\]: .* outside"),
        ({"prev_closed_ms": {"t": 1.5}}, "wrong type float"),
        ({"prev_closed_ms": {"t": True}}, "wrong type bool"),
        ({"prev_closed_ms": {"a b": 1}}, "not a metric name"),
        ({"prev_closed_ms": [1]}, "prev_closed_ms: wrong type list"),
        (
            {"prev_closed_ms": {f"m{i}": 1 for i in range(257)}},
            "more than 256 metrics",
        ),
        ({"prev_metrics_omitted": -1}, "prev_metrics_omitted"),
        ({"prev_metrics_omitted": 2**40}, "prev_metrics_omitted"),
        ({"boot_id": ""}, "boot_id: required with prev_boot_id"),
        ({"prev_boot_id": "", "prev_metrics_omitted": 0}, "without prev_boot_id"),
    ],
)
def test_unclean_end_birth_rejects_hostile_holes(change: dict[str, object], reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        DeviceState.from_json(json.dumps({**_HOLE_BIRTH, **change}).encode())
