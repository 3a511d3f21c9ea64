"""Pure parts of ingest: config, validation, batching, sequence gaps, rollup merging, classify."""

from __future__ import annotations

import hashlib
import math
import random
import struct
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from millrace.cloud.config import DSN_ENV, load_config, parse_config
from millrace.cloud.ingest import streams
from millrace.cloud.ingest.batcher import Batcher
from millrace.cloud.ingest.classify import Limits, classify, kind_label, validate_batch
from millrace.cloud.ingest.deliveries import FailedDeliveries
from millrace.cloud.ingest.messages import DeadLetter, HealthItem, Inbound, Incoming, StateItem
from millrace.cloud.ingest.metrics import LOOP_STALL_SECONDS, loop_health
from millrace.cloud.ingest.store import error_kind
from millrace.cloud.ingest.writer import to_datetime
from millrace.cloud.rollups import aggregate, rebucket
from millrace.configfile import BrokerConnection
from millrace.errors import ConfigError
from millrace.wire import Batch, DeviceState, Event, Heartbeat, Window, encode_batch

NOW_MS = 1_750_000_000_000 - 1_750_000_000_000 % 3_600_000
LIMITS = Limits(max_age_s=86_400, max_skew_s=60, allowed_periods_s=frozenset({1, 10, 60}))
BOOT = "ab" * 16


def window(
    start_ms: int = NOW_MS - 60_000, *, period_s: int = 60, values: tuple[float, ...] = (1, 2, 3)
) -> Window:
    return Window(
        "temp",
        start_ms,
        period_s,
        len(values),
        math.fsum(values),
        min(values),
        max(values),
        values[0],
        values[-1],
        math.fsum(v * v for v in values),
    )


def batch(*windows: Window, device: str = "dev-a", events: tuple[Event, ...] = ()) -> Batch:
    return Batch(device, BOOT, 1, NOW_MS, windows=windows, events=events)


# -- config ---------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> Path:
    for name in ("ca.crt", "w.crt", "w.key"):
        (tmp_path / name).write_text("x")
    return tmp_path


def minimal(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "database": {"dsn": "postgresql://ingest@db/millrace"},
        "broker": {
            "host": "broker",
            "ca": "ca.crt",
            "cert": "w.crt",
            "key": "w.key",
            "client_id": "ingest-1",
        },
    }
    data.update(overrides)
    return data


def test_share_group_is_derived_from_the_ca_never_a_fixed_word(tls_files: Path) -> None:
    config = parse_config(minimal(), base=tls_files)
    digest = hashlib.sha256(b"x").hexdigest()[:16]  # tls_files writes "x" as ca.crt
    assert config.broker.share_group == f"ingest-{digest}" != "ingest"
    (tls_files / "ca.crt").write_text("another plant's CA")
    assert parse_config(minimal(), base=tls_files).broker.share_group != config.broker.share_group
    explicit = minimal()
    explicit["broker"]["share_group"] = "g1"  # type: ignore[index]
    assert parse_config(explicit, base=tls_files).broker.share_group == "g1"


def test_config_defaults_and_relative_paths(tls_files: Path) -> None:
    config = parse_config(minimal(), base=tls_files)
    assert config.broker.port == 8883
    assert config.broker.ca == tls_files / "ca.crt"
    assert isinstance(config.broker, BrokerConnection)  # the edge agent's type too
    assert config.batch.max_rows == 20_000 and config.batch.max_delay_ms == 200
    assert config.batch.rollup_drain_ms == 1000  # rollups trail readings by about a second
    assert 3600 in config.validation.allowed_periods_s
    assert config.retention.enabled and config.retention.days["readings"] == 90
    assert "postgresql" not in repr(config), "the DSN may hold a password: never in reprs"


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        ({"batch": {"max_rows": 0}}, "batch.max_rows", "0 is outside [1, 1000000]"),
        ({"batch": {"max_delay_ms": "fast"}}, "batch.max_delay_ms", "expected an integer"),
        ({"batch": {"rollup_drain_ms": 0}}, "batch.rollup_drain_ms", "0 is outside [10, 60000]"),
        (
            {"validation": {"allowed_periods_s": [60, 7]}},
            "validation.allowed_periods_s[1]",
            "7 does not divide 3600",
        ),
        ({"broker": {"host": "b", "client_id": "w"}}, "broker.ca", "missing"),
        ({"http": {"prot": 1}}, "http.prot", "did you mean 'port'?"),
        ({"retention": {"days": {"readings": -1}}}, "retention.days.readings", "must be > 0"),
        ({"retention": {"days": {"nope": 3}}}, "retention.days.nope", "unknown key"),
        ({"status": {"stale_after_s": 0}}, "status.stale_after_s", "outside"),
        ({"database": {}}, "database.dsn", f"or the {DSN_ENV} environment variable"),
        ({"database": {"dsn": "x", "dsn_file": "f"}}, "database.dsn", "not both"),
    ],
)
def test_config_errors_name_the_key(
    tls_files: Path,
    overrides: dict[str, object],
    key: str,
    words: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(DSN_ENV, raising=False)
    data = minimal()
    for section, values in overrides.items():
        if section in ("broker", "database"):
            data[section] = values  # replaces the whole table
        else:
            data[section] = {**data.get(section, {}), **values}  # type: ignore[dict-item]
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base=tls_files, source="ingest.toml")
    assert caught.value.key == key
    assert words in caught.value.problem
    assert str(caught.value).startswith(f"ingest.toml: {key}: ")


def test_dsn_from_file_or_environment(tls_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tls_files / "dsn").write_text("postgresql://from-file\n")
    config = parse_config(minimal(database={"dsn_file": "dsn"}), base=tls_files)
    assert config.dsn == "postgresql://from-file"
    monkeypatch.setenv(DSN_ENV, "postgresql://from-env")
    assert parse_config(minimal(database={}), base=tls_files).dsn == "postgresql://from-env"


def test_load_config_reports_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[broker\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


# -- validation -----------------------------------------------------------------------------


def test_a_good_batch_passes() -> None:
    assert (
        validate_batch(batch(window()), topic_device="dev-a", now_ms=NOW_MS, limits=LIMITS) is None
    )


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (batch(window(), device="dev-b"), "identity_mismatch"),
        (batch(window(NOW_MS - 2 * 86_400_000)), "too_old"),
        (batch(window(NOW_MS + 3_600_000)), "in_future"),
        (batch(window(NOW_MS - 5 * 60_000, period_s=300)), "period_not_allowed"),
        (batch(window(values=(1e16, 1e16))), "out_of_range"),
        (batch(events=(Event("mode", NOW_MS, "a\x00b"),)), "bad_text"),
        (batch(events=(Event("mode", NOW_MS - 3 * 86_400_000, 1),)), "too_old"),
        (Batch("dev-a", BOOT, 1, NOW_MS + 600_000), "in_future"),
    ],
)
def test_validation_refuses_with_a_code(bad: Batch, code: str) -> None:
    problem = validate_batch(bad, topic_device="dev-a", now_ms=NOW_MS, limits=LIMITS)
    assert problem is not None and problem.code == code and problem.reason


def test_impossible_sum_of_squares_is_inconsistent() -> None:
    good = window(values=(10.0, 20.0))
    for sumsq in (0.0, good.sumsq * 10):
        w = Window("temp", good.start_ms, 60, 2, good.sum, 10.0, 20.0, 10.0, 20.0, sumsq)
        problem = validate_batch(batch(w), topic_device="dev-a", now_ms=NOW_MS, limits=LIMITS)
        assert problem is not None and problem.code == "inconsistent"


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50))
def test_real_windows_are_never_called_inconsistent(values: list[float]) -> None:
    w = window(values=tuple(values))
    assert validate_batch(batch(w), topic_device="dev-a", now_ms=NOW_MS, limits=LIMITS) is None


# -- batcher --------------------------------------------------------------------------------


def test_batch_closes_by_rows_or_time_whichever_first() -> None:
    b: Batcher[str] = Batcher(max_rows=10, max_delay_s=0.2)
    assert b.deadline() is None and not b.is_due(100.0)
    b.add("a", rows=4, now=100.0)
    b.add("b", rows=0, now=100.05)  # a message without rows still weighs one
    assert b.rows == 5 and not b.is_due(100.1)
    assert b.is_due(100.2)
    b.add("c", rows=5, now=100.1)
    assert b.is_full() and b.is_due(100.1)
    assert b.take() == ["a", "b", "c"]
    assert len(b) == 0 and b.deadline() is None
    b.add("d", rows=1, now=200.0)
    assert b.deadline() == pytest.approx(200.2)


# -- sequence gaps --------------------------------------------------------------------------


def test_gaps_open_and_close() -> None:
    first = streams.advance(None, (), [5, 6, 9])
    assert (first.max_seq, first.gaps, first.opened) == (9, ((7, 8),), 1)
    late = streams.advance(9, first.gaps, [7, 12])
    assert (late.max_seq, late.gaps, late.opened) == (12, ((8, 8), (10, 11)), 1)
    closed = streams.advance(12, late.gaps, [8, 10, 11])
    assert closed.gaps == () and closed.changed_gaps and closed.opened == 0
    quiet = streams.advance(12, (), [13, 14])
    assert not quiet.changed_gaps and quiet.max_seq == 14


@given(st.lists(st.integers(0, 60), min_size=1, unique=True), st.randoms())
def test_gaps_are_exactly_the_missing_seqs_in_any_arrival_order(
    seqs: list[int], rnd: random.Random
) -> None:
    order = list(seqs)
    rnd.shuffle(order)
    chunks: list[list[int]] = []
    while order:
        size = rnd.randint(1, 4)
        chunks.append(order[:size])
        order = order[size:]
    prev_max: int | None = None
    open_gaps: tuple[streams.Gap, ...] = ()
    for chunk in chunks:
        update = streams.advance(prev_max, open_gaps, chunk)
        prev_max, open_gaps = update.max_seq, update.gaps
    start = min(chunks[0])  # the stream starts at its first batch seen
    missing = set(range(start, max(seqs) + 1)) - set(seqs)
    listed = {s for low, high in open_gaps for s in range(low, high + 1)}
    assert listed == missing
    assert prev_max == max(seqs)


# -- rollups --------------------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(st.integers(0, 200), st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=5)),
        min_size=1,
        max_size=40,
        unique_by=lambda t: t[0],
    )
)
def test_rollups_merge_exactly_in_any_grouping(slots: list[tuple[int, list[float]]]) -> None:
    base = NOW_MS - 300 * 60_000
    windows = [window(base + slot * 60_000, values=tuple(v)) for slot, v in slots]
    hourly = aggregate([(1, 2, w) for w in windows], bucket_s=3600)
    daily_direct = aggregate([(1, 2, w) for w in windows], bucket_s=86_400)
    daily = rebucket(hourly, bucket_s=86_400)
    assert daily.keys() == daily_direct.keys()
    for key, acc in daily.items():
        direct = daily_direct[key]
        assert (acc.count, acc.min, acc.max, acc.parts) == (
            direct.count,
            direct.min,
            direct.max,
            direct.parts,
        )
        assert (acc.first, acc.first_at, acc.last, acc.last_at) == (
            direct.first,
            direct.first_at,
            direct.last,
            direct.last_at,
        )
        assert math.isclose(acc.sum, direct.sum, rel_tol=1e-9, abs_tol=1e-6)
    everything = [v for _, vs in slots for v in vs]
    assert sum(a.count for a in hourly.values()) == len(everything)
    first_window = min(windows, key=lambda w: w.start_ms)
    assert any(a.first == first_window.first for a in daily.values())


def test_a_rollup_takes_first_and_last_by_window_start_whatever_the_order() -> None:
    base = NOW_MS - 3 * 60_000
    early, middle, late = (window(base + i * 60_000, values=(i, i + 10.0)) for i in range(3))
    (row,) = aggregate([(1, 2, w) for w in (middle, late, early)], bucket_s=3600).values()
    assert (row.first, row.last) == (early.first, late.last)
    assert (row.first_at, row.last_at, row.parts) == (early.start_ms, late.start_ms, 3)


def test_to_datetime_is_exact_to_the_millisecond() -> None:
    assert to_datetime(1_700_000_000_123) == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)


# -- classify -------------------------------------------------------------------------------


def inbound(topic: str, payload: bytes, content_type: str | None = None) -> Inbound:
    return Inbound(
        topic, payload, 1, 7, content_type, False, 1, datetime.now(UTC), time.monotonic()
    )


def test_classify_sorts_messages_by_what_they_are() -> None:
    now_ms = int(time.time() * 1000)
    now_ms -= now_ms % 60_000
    good = Batch("dev-a", BOOT, 3, now_ms, windows=(window(now_ms - 60_000),))
    item = classify(
        inbound("millrace/v1/d/dev-a/data", encode_batch(good)), limits=LIMITS, now_ms=now_ms
    )
    assert isinstance(item, Incoming) and item.batch == good
    state = DeviceState("dev-a", "online", now_ms, boot_id=BOOT)
    assert isinstance(
        classify(
            inbound("millrace/v1/d/dev-a/state", state.to_json()), limits=LIMITS, now_ms=now_ms
        ),
        StateItem,
    )
    hb = Heartbeat("dev-a", BOOT, now_ms, 0, 0, 0.0, 0, 0)
    assert isinstance(
        classify(inbound("millrace/v1/d/dev-a/health", hb.to_json()), limits=LIMITS, now_ms=now_ms),
        HealthItem,
    )


@pytest.mark.parametrize(
    ("topic", "payload", "code"),
    [
        ("millrace/v1/d/dev-a/data", b"\xc1", "undecodable"),
        ("millrace/v1/d/dev-a/data", b"", "undecodable"),
        ("millrace/v1/d/BAD/data", b"{}", "bad_topic"),
        ("millrace/v1/d/dev-a/cmd/ping/reply", b"{}", "bad_topic"),
        (
            "millrace/v1/d/dev-a/state",
            b'{"device": "dev-b", "status": "online", "ts_ms": 1}',
            "identity_mismatch",
        ),
        ("millrace/v1/d/dev-a/health", b"[1, 2]", "invalid"),
    ],
)
def test_classify_dead_letters_carry_codes(topic: str, payload: bytes, code: str) -> None:
    item = classify(inbound(topic, payload), limits=LIMITS, now_ms=NOW_MS)
    assert isinstance(item, DeadLetter)
    assert item.code == code and item.reason and item.payload == payload and item.topic == topic


def test_metrics_label_messages_by_their_topic_kind() -> None:
    assert kind_label("millrace/v1/d/dev-a/data") == "data"
    assert kind_label("millrace/v1/d/dev-a/health") == "health"
    assert kind_label("millrace/v1/d/dev-a/cmd/ping/reply") == "other"
    assert kind_label("millrace/v1/d/BAD/data") == "other"  # topics.py refuses the device id
    assert kind_label("elsewhere") == "other"


# -- health ---------------------------------------------------------------------------------


def test_health_needs_database_broker_and_a_turning_loop() -> None:
    now = time.monotonic()
    assert loop_health(db=True, broker=True, last_turn_mono=now).ok
    down = loop_health(db=False, broker=True, last_turn_mono=now)
    assert not down.ok and "database" in down.detail
    stuck = loop_health(db=True, broker=True, last_turn_mono=now - LOOP_STALL_SECONDS - 1)
    assert not stuck.ok and "stalled" in stuck.detail


# -- what a storing error blames, and failed deliveries ----------------------------------


class _Conn:
    """Only what `error_kind` reads of a connection: whether it is still usable."""

    def __init__(self, *, broken: bool = False) -> None:
        self.closed = False
        self.broken = broken


def _pg_error(cls: type[Exception], sqlstate: str | None) -> Exception:
    exc = cls("test")
    if sqlstate is not None:
        exc.sqlstate = sqlstate  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        # The loop: psycopg refuses a NUL itself, so there is no SQLSTATE.
        (_pg_error(psycopg.DataError, None), "poison"),
        (_pg_error(psycopg.errors.CheckViolation, "23514"), "poison"),
        (_pg_error(psycopg.errors.NumericValueOutOfRange, "22003"), "poison"),
        (_pg_error(psycopg.errors.SerializationFailure, "40001"), "transient"),
        (_pg_error(psycopg.errors.QueryCanceled, "57014"), "transient"),
        (_pg_error(psycopg.errors.AdminShutdown, "57P01"), "down"),
        (_pg_error(psycopg.errors.TooManyConnections, "53300"), "down"),
        (_pg_error(psycopg.errors.InsufficientPrivilege, "42501"), "down"),
        (_pg_error(psycopg.OperationalError, None), "down"),
        (_pg_error(psycopg.errors.RaiseException, "P0001"), "unexplained"),
        (OverflowError("date value out of range"), "poison"),
        # The writer packs readings rows itself: an int out of int4's range is the data's.
        (struct.error("'i' format requires -2147483648 <= number <= 2147483647"), "poison"),
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), "poison"),
        (KeyError("a bug"), "unexplained"),
    ],
)
def test_storing_errors_blame_the_message_only_for_its_data(exc: Exception, kind: str) -> None:
    assert error_kind(_Conn(), exc) == kind  # type: ignore[arg-type]
    # Whatever the error, a broken connection is an outage.
    assert error_kind(_Conn(broken=True), exc) == "down"  # type: ignore[arg-type]


def test_failed_deliveries_count_per_topic_and_payload_and_clear_on_commit() -> None:
    failed = FailedDeliveries(max_tracked=2)
    a, b, c = (inbound("millrace/v1/d/dev-a/data", p) for p in (b"a", b"b", b"c"))
    assert failed.failures(a) == (0, "")
    failed.charge([a, b], "boom")
    failed.charge([a], "boom again")
    # A redelivery is another Inbound (new packet id, DUP set) with the same content.
    again = Inbound(a.topic, a.payload, 1, 99, None, True, 2, a.received_at, 0.0)
    assert failed.failures(again) == (2, "boom again")
    assert failed.failures(b) == (1, "boom")
    failed.clear([b])
    assert failed.failures(b) == (0, "")
    failed.charge([b, c], "x")  # over the cap: the oldest (a) is forgotten
    assert failed.failures(a) == (0, "")
    assert failed.failures(c) == (1, "x")


def test_failed_deliveries_are_forgotten_when_the_message_does_not_come_back() -> None:
    now = [0.0]
    failed = FailedDeliveries(forget_after_s=60.0, clock=lambda: now[0])
    a, b = (inbound("millrace/v1/d/dev-a/data", p) for p in (b"a", b"b"))
    failed.charge([a], "boom")
    now[0] = 30.0
    failed.charge([b], "boom")
    assert failed.failures(a) == (1, "boom")
    now[0] = 61.0  # a went to another worker of the group: forgotten, b not yet
    assert failed.failures(a) == (0, "") and failed.failures(b) == (1, "boom")
