"""Hostile input through the real broker: every bad message ends in dead letters with a reason,
and the worker keeps storing good data right after each one."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from millrace import topics
from millrace.wire import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, MAX_PAYLOAD_BYTES, encode_batch
from tests.cloud.ingest_support import (
    IngestDb,
    Publisher,
    aligned_now_ms,
    drain_rollups,
    ingest_db,
    make_batches,
    make_config,
    publishers,
    query,
    running_worker,
    scalar,
    wait_for,
)

__all__ = ["ingest_db", "publishers"]

pytestmark = pytest.mark.security

DEVICE = "hostile-a"
HOUR_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class Case:
    """One hostile message: where it goes, what it is, which dead-letter codes fit."""

    topic_kind: str
    payload: bytes
    content_type: str | None
    codes: frozenset[str] | None  # None: any code, as long as there is a reason


def _good_plain(seq: int) -> dict[str, Any]:
    batch = make_batches(DEVICE, batches=1, windows_per_batch=3, seed=seq, first_seq=seq)[0]
    plain: dict[str, Any] = msgpack.unpackb(encode_batch(batch), raw=False)
    return plain


def _mutate(plain: dict[str, Any], mutation: str) -> tuple[dict[str, Any], frozenset[str]]:
    w = plain["w"][0]  # [metric, start, period, count, sum, min, max, first, last, sumsq, rej]
    invalid = frozenset({"invalid"})
    if mutation == "count_zero":
        w[3] = 0
    elif mutation == "min_above_max":
        w[5], w[6] = w[6] + 1.0, w[5]
    elif mutation == "nan_sum":
        w[4] = math.nan
    elif mutation == "inf_max":
        w[6] = math.inf
    elif mutation == "misaligned":
        w[1] += 1
    elif mutation == "first_outside":
        w[7] = w[6] + 10.0
    elif mutation == "negative_sumsq":
        w[9] = -1.0
    elif mutation == "unknown_version":
        plain["v"] = 99
        return plain, frozenset({"unknown_version"})
    elif mutation == "unknown_key":
        plain["zz"] = 1
        # msgpack's map-size cap refuses an 11th key before the envelope check does.
        return plain, frozenset({"invalid", "undecodable"})
    elif mutation == "bad_boot_id":
        plain["b"] = "not-hex"
    elif mutation == "negative_seq":
        plain["s"] = -5
    elif mutation == "identity_mismatch":
        plain["d"] = "someone-else"
        return plain, frozenset({"identity_mismatch"})
    elif mutation == "too_old":
        w[1] = aligned_now_ms(w[2]) - 40 * 24 * HOUR_MS
        return plain, frozenset({"too_old"})
    elif mutation == "in_future":
        w[1] = aligned_now_ms(w[2]) + 24 * HOUR_MS
        return plain, frozenset({"in_future"})
    elif mutation == "period_not_allowed":
        w[2] = 7
        w[1] = aligned_now_ms(7) - 7000 * 10
        return plain, frozenset({"period_not_allowed"})
    elif mutation == "huge_value":
        w[4], w[5], w[6], w[7], w[8], w[9] = 1e300, 1e300, 1e300, 1e300, 1e300, 1e300
        w[3] = 1
        return plain, frozenset({"out_of_range", "inconsistent", "invalid"})
    elif mutation == "sumsq_impossible":
        w[9] = (abs(w[5]) + abs(w[6]) + 1.0) ** 2 * w[3] * 10 + 1e6
        return plain, frozenset({"inconsistent"})
    elif mutation == "nul_text_event":
        plain["e"] = [["mode", w[1], "a\x00b"]]
        return plain, frozenset({"bad_text"})
    elif mutation == "duplicate_window":
        plain["w"].append(list(w))
    return plain, invalid


MUTATIONS = (
    "count_zero", "min_above_max", "nan_sum", "inf_max", "misaligned", "first_outside",
    "negative_sumsq", "unknown_version", "unknown_key", "bad_boot_id", "negative_seq",
    "identity_mismatch", "too_old", "in_future", "period_not_allowed", "huge_value",
    "sumsq_impossible", "nul_text_event", "duplicate_window",
)  # fmt: skip

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_junk = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def hostile_cases(draw: st.DrawFn) -> Case:
    kind = draw(
        st.sampled_from(["bytes", "msgpack_junk", "json_junk", "mutated", "state", "health"])
    )
    if kind == "bytes":
        payload = draw(st.binary(min_size=0, max_size=300))
        ctype = draw(
            st.sampled_from([None, CONTENT_TYPE_MSGPACK, CONTENT_TYPE_JSON, "text/x-evil"])
        )
        return Case("data", payload, ctype, None)
    if kind == "msgpack_junk":
        return Case(
            "data", msgpack.packb(draw(_junk), use_bin_type=True), CONTENT_TYPE_MSGPACK, None
        )
    if kind == "json_junk":
        value = draw(_junk.filter(lambda v: not isinstance(v, bytes)))
        text = json.dumps(value, default=repr)  # NaN/Infinity literals included on purpose
        return Case("data", text.encode(), CONTENT_TYPE_JSON, None)
    if kind == "mutated":
        plain, codes = _mutate(
            _good_plain(draw(st.integers(0, 10_000))), draw(st.sampled_from(MUTATIONS))
        )
        if draw(st.booleans()):
            text = json.dumps(plain)  # json writes NaN/Infinity: the decoder must refuse them
            return Case("data", text.encode(), CONTENT_TYPE_JSON, codes | {"undecodable"})
        return Case("data", msgpack.packb(plain, use_bin_type=True), CONTENT_TYPE_MSGPACK, codes)
    # state / health: JSON junk or objects with wrong fields
    value = draw(
        st.dictionaries(
            st.sampled_from(["device", "status", "ts_ms", "boot_id", "x"]), _junk, max_size=4
        )
        | _junk
    )
    return Case(kind, json.dumps(value, default=repr).encode(), None, None)


def test_hostile_payloads_are_dead_lettered_and_good_data_keeps_flowing(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    server = broker_factory()
    config = make_config(
        tmp_path,
        server=server,
        dsn=ingest_db.ingest_dsn,
        client_id="hostile-w1",
        group=f"g{uuid.uuid4().hex[:8]}",
        max_delay_ms=10,
    )
    dsn = ingest_db.owner_dsn
    good = make_batches(DEVICE, batches=400, windows_per_batch=2, seed=99)
    counter = {"sent": 0}
    with running_worker(config):
        pub = publishers(server, DEVICE)

        @settings(
            max_examples=120,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=hostile_cases())
        def check(case: Case) -> None:
            before = scalar(dsn, "SELECT count(*) FROM dead_letters")
            topic = {
                "data": topics.data_topic(DEVICE),
                "state": topics.state_topic(DEVICE),
                "health": topics.health_topic(DEVICE),
            }[case.topic_kind]
            pub.publish_raw(case.payload, topic=topic, content_type=case.content_type)
            batch = good[counter["sent"]]
            counter["sent"] += 1
            pub.publish([batch])
            wait_for(
                lambda: (
                    scalar(dsn, "SELECT count(*) FROM ingest_ledger WHERE seq = %s", [batch.seq])
                    == 1
                ),
                timeout_s=30,
                what="the good batch after a hostile one",
            )
            wait_for(
                lambda: scalar(dsn, "SELECT count(*) FROM dead_letters") > before,
                timeout_s=30,
                what="the hostile message's dead letter",
            )
            # Dead letters are at-least-once like everything else: a redelivery after a
            # reconnect may file the same message twice, but never anything else.
            letters = query(
                dsn,
                "SELECT code, reason, payload, payload_bytes, device FROM dead_letters"
                " ORDER BY id OFFSET %s",
                [before],
            )
            for code, reason, payload, size, device in letters:
                assert reason.strip(), "a dead letter needs a reason"
                assert bytes(payload) == case.payload[: len(payload)], (code, reason)
                assert size == len(case.payload) and device == DEVICE
                if case.codes is not None:
                    assert code in case.codes, (code, reason)

        check()
    sent = counter["sent"]
    assert scalar(dsn, "SELECT count(*) FROM ingest_ledger") == sent
    drain_rollups(dsn)
    assert scalar(dsn, "SELECT sum(windows) FROM rollup_daily") == sent * 2


def test_identity_mismatch_and_oversize_payloads_are_refused_with_reasons(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    server = broker_factory()
    config = make_config(
        tmp_path, server=server, dsn=ingest_db.ingest_dsn, client_id="w1", group="gid"
    )
    dsn = ingest_db.owner_dsn
    theirs = make_batches("victim-b", batches=1, windows_per_batch=5, seed=5)[0]
    ours = make_batches("mallory-a", batches=2, windows_per_batch=5, seed=6)
    with running_worker(config):
        pub = publishers(server, "mallory-a")
        # mallory's certificate may only publish on mallory's topic: claim victim's data there.
        pub.publish_raw(encode_batch(theirs), content_type=CONTENT_TYPE_MSGPACK)
        # Just over the worker's limit and still under the broker's max_packet_size
        # (MAX_PAYLOAD_BYTES + 4 KiB), so it reaches the worker to be refused there.
        pub.publish_raw(b"\x81" + b"\xa1v" * 1 + b"\x01" + b"x" * (MAX_PAYLOAD_BYTES + 1024))
        pub.publish(ours)
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM dead_letters") == 2, what="2 letters")
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM ingest_ledger") == 2, what="ours")
    letters = query(
        dsn,
        "SELECT code, reason, device, length(payload), payload_bytes FROM dead_letters"
        " ORDER BY received_at, id",
    )
    assert letters[0][0] == "identity_mismatch"
    assert "victim-b" in letters[0][1] and letters[0][2] == "mallory-a"
    assert letters[1][0] == "oversize"
    assert letters[1][3] == 64 * 1024 and letters[1][4] > MAX_PAYLOAD_BYTES
    assert query(dsn, "SELECT name FROM devices ORDER BY name") == [("mallory-a",)]


def _raw_birth(device: str, boot_id: str, **changes: object) -> bytes:
    """A birth as a device could send it, built by hand: the contract would refuse to build it."""
    fields: dict[str, object] = {
        "device": device,
        "status": "online",
        "ts_ms": aligned_now_ms(1),
        "boot_id": boot_id,
        "agent_version": "1.0.0",
        "config_hash": "cfg",
        "units": {},
    }
    return json.dumps({**fields, **changes}).encode()


def _raw_heartbeat(device: str, boot_id: str, **changes: object) -> bytes:
    fields: dict[str, object] = {
        "device": device,
        "boot_id": boot_id,
        "ts_ms": aligned_now_ms(1),
        "outbox_batches": 0,
        "outbox_bytes": 0,
        "outbox_oldest_age_s": 0.0,
        "dropped_batches": 0,
        "rejected_readings": 0,
    }
    return json.dumps({**fields, **changes}).encode()


def test_nul_birth_nul_heartbeat_and_huge_heartbeat_field_are_dead_lettered_while_others_commit(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    """One device's unstorable birth or heartbeat must not stop the plant (the issue "The
    guarantee must not end at the broker": a NUL agent_version made every worker loop)."""
    server = broker_factory()
    config = make_config(
        tmp_path,
        server=server,
        dsn=ingest_db.ingest_dsn,
        client_id="nul-w1",
        group=f"g{uuid.uuid4().hex[:8]}",
        max_delay_ms=200,
    )
    dsn = ingest_db.owner_dsn
    boot = uuid.uuid4().hex
    gateways = {
        name: make_batches(name, batches=6, windows_per_batch=3, seed=i)
        for i, name in enumerate(("gw-good-1", "gw-good-2"), start=70)
    }
    hostile = {
        "nul_birth": (
            topics.state_topic("gw-evil"),
            _raw_birth("gw-evil", boot, agent_version="1.0\u0000evil"),
            "state.agent_version",
        ),
        "nul_heartbeat": (
            topics.health_topic("gw-evil"),
            _raw_heartbeat("gw-evil", boot, agent_version="x\u0000"),
            "health.agent_version",
        ),
        "huge_heartbeat": (
            topics.health_topic("gw-evil"),
            _raw_heartbeat("gw-evil", boot, outbox_batches=10**30),
            "health.outbox_batches",
        ),
    }
    with running_worker(config) as runner:
        good_pubs = {name: publishers(server, name) for name in gateways}
        evil = publishers(server, "gw-evil")
        for name, batches in gateways.items():
            good_pubs[name].publish(batches[:2])
        for topic, payload, _field in hostile.values():
            evil.publish_raw(payload, topic=topic)
        for name, batches in gateways.items():
            good_pubs[name].publish(batches[2:])
        wait_for(
            lambda: scalar(dsn, "SELECT count(*) FROM dead_letters") == len(hostile),
            what="a dead letter for each hostile message",
        )
        wait_for(
            lambda: scalar(dsn, "SELECT count(*) FROM ingest_ledger") == 12,
            what="every batch of the good gateways",
        )
        assert runner.counter("millrace_ingest_db_errors_total", kind="down") == 0
    letters = query(dsn, "SELECT topic, code, reason, device FROM dead_letters")
    assert sorted(code for _t, code, _r, _d in letters) == ["invalid"] * 3
    assert {d for *_rest, d in letters} == {"gw-evil"}
    reasons = " | ".join(r for _t, _c, r, _d in letters)
    for _topic, _payload, field_name in hostile.values():
        assert field_name in reasons, reasons
    assert "non-printable" in reasons and "outside" in reasons
    per_device = dict(
        query(
            dsn,
            "SELECT d.name, count(*) FROM readings r JOIN devices d ON d.id = r.device_id"
            " GROUP BY d.name",
        )
    )
    assert per_device == {"gw-good-1": 18, "gw-good-2": 18}
    # The evil device's registry row was never touched by the refused messages.
    assert query(dsn, "SELECT count(*) FROM device_health") == [(0,)]
