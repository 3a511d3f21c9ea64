"""The receipt reader against a real ledger: one round trip per commit, exact answers.

Receipts are read on the committer thread after every COMMIT, so their cost is paid
by every device; these tests pin it to one query however many streams a commit
touched, and check that what is answered is what the ledger holds.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from millrace.cloud.ingest.classify import Limits, classify, failed_too_often
from millrace.cloud.ingest.messages import DeadLetter, Inbound
from millrace.cloud.ingest.receipts import ReceiptReader, dead_letter_receipts
from millrace.wire import CONTENT_TYPE_MSGPACK, encode_batch
from tests.cloud.ingest_support import IngestDb, aligned_now_ms, make_batches, prepare_database

STREAMS = 20


@pytest.fixture
def ingest_db(fresh_db: str) -> IngestDb:
    return prepare_database(fresh_db)


class CountingConnection:
    """A real connection that counts the statements sent through it."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.statements = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self.statements += 1
        return self.conn.execute(*args, **kwargs)


def _fill_ledger(conn: psycopg.Connection[Any], ledger: dict[tuple[str, str], list[int]]) -> None:
    now = datetime.now(UTC)
    for (device, boot_id), seqs in ledger.items():
        device_id = conn.execute(
            "INSERT INTO devices (name) VALUES (%s) ON CONFLICT (name) DO UPDATE"
            " SET name = EXCLUDED.name RETURNING id",
            (device,),
        ).fetchone()[0]  # type: ignore[index]
        for seq in seqs:
            conn.execute(
                "INSERT INTO ingest_ledger (device_id, boot_id, seq, sent_at, received_at,"
                " windows, events, dropped, rejected, clock_synced)"
                " VALUES (%s, %s, %s, %s, %s, 1, 0, 0, 0, true)",
                (device_id, uuid.UUID(hex=boot_id), seq, now, now),
            )


def test_receipts_for_many_streams_cost_one_query_per_commit(ingest_db: IngestDb) -> None:
    """Review finding: one SELECT per (device, boot_id) ran on the committer thread."""
    ledger = {}
    for i in range(STREAMS):
        # Stream i holds 0..i and, for odd i, a hole then i + 10 (an outbox drop).
        seqs = list(range(i + 1)) + ([i + 10] if i % 2 else [])
        ledger[(f"gw-{i:02d}", uuid.uuid4().hex)] = seqs
    with psycopg.connect(ingest_db.owner_dsn, autocommit=True) as conn:
        _fill_ledger(conn, ledger)
        counting = CountingConnection(conn)
        reader = ReceiptReader()
        committed = {stream: {seqs[-1]} for stream, seqs in ledger.items()}
        receipts = reader.receipts(counting, committed)  # type: ignore[arg-type]
        assert counting.statements == 1
        by_stream = {(r.device, r.boot_id): r for r in receipts}
        assert len(by_stream) == STREAMS
        for i, ((device, boot_id), _) in enumerate(ledger.items()):
            receipt = by_stream[(device, boot_id)]
            assert receipt.watermark == i
            assert list(receipt.ranges) == ([(i + 10, i + 10)] if i % 2 else [])
        # The watermarks are cached: the next commit reads only above them, still once.
        again = reader.receipts(counting, committed)  # type: ignore[arg-type]
        assert counting.statements == 2
        assert {(r.device, r.boot_id, r.watermark) for r in again} == {
            (r.device, r.boot_id, r.watermark) for r in receipts
        }


def test_a_stream_with_many_holes_is_answered_with_the_commits_own_seqs_only(
    ingest_db: IngestDb,
) -> None:
    """Found by test_gap_flood: a device sending every other seq had every range above its
    watermark listed again after each commit (2,500 ranges: 40 receipts per commit)."""
    stream = ("gw-holes", uuid.uuid4().hex)
    with psycopg.connect(ingest_db.owner_dsn, autocommit=True) as conn:
        _fill_ledger(conn, {stream: list(range(0, 1000, 2))})
        reader = ReceiptReader()
        receipts = reader.receipts(conn, {stream: {998}})
        assert [(r.watermark, r.ranges) for r in receipts] == [(0, ((998, 998),))]
        # Filling the first hole moves the watermark on, in bounded steps per commit.
        _fill_ledger(conn, {stream: [1]})
        (receipt,) = reader.receipts(conn, {stream: {1}})
        assert (receipt.watermark, receipt.ranges) == (2, ())


def test_a_commit_batch_of_an_unknown_device_is_not_receipted(ingest_db: IngestDb) -> None:
    with psycopg.connect(ingest_db.owner_dsn, autocommit=True) as conn:
        receipts = ReceiptReader().receipts(conn, {("gw-none", uuid.uuid4().hex): {0}})
    assert [(r.watermark, r.ranges) for r in receipts] == [(-1, ())]


def _inbound(topic: str, payload: bytes) -> Inbound:
    now = datetime.now(UTC)
    return Inbound(topic, payload, 1, 1, CONTENT_TYPE_MSGPACK, False, 0, now, 0.0)


LIMITS = Limits(max_age_s=600, max_skew_s=60, allowed_periods_s=frozenset({10}))
DATA_TOPIC = "millrace/v1/d/gw-a/data"


def _one_batch(device: str, *, end_ms: int) -> Any:
    return make_batches(device, batches=1, windows_per_batch=3, period_s=10, end_ms=end_ms)[0]


def test_dead_letters_are_receipted_from_the_key_classify_decoded() -> None:
    """Review finding: each dead-lettered payload was decoded a second time for its receipt."""
    now_ms = aligned_now_ms(10)
    old = _one_batch("gw-a", end_ms=now_ms - 3_600_000)
    letter = classify(_inbound(DATA_TOPIC, encode_batch(old)), limits=LIMITS, now_ms=now_ms)
    assert isinstance(letter, DeadLetter) and letter.code == "too_old"
    assert letter.batch_key == ("gw-a", old.boot_id, old.seq)
    # The receipt comes from the key alone: a letter whose payload no longer decodes
    # is still answered, so nothing decodes it again.
    keyed = dataclasses.replace(letter, payload=b"")
    [receipt] = dead_letter_receipts([keyed], now_ms=1)
    assert (receipt.device, receipt.boot_id, receipt.watermark) == ("gw-a", old.boot_id, -1)
    assert list(receipt.ranges) == [(old.seq, old.seq)]


def test_a_batch_claiming_another_device_is_not_keyed_for_a_receipt() -> None:
    now_ms = aligned_now_ms(10)
    other = _one_batch("gw-b", end_ms=now_ms - 20_000)
    letter = classify(_inbound(DATA_TOPIC, encode_batch(other)), limits=LIMITS, now_ms=now_ms)
    assert isinstance(letter, DeadLetter) and letter.code == "identity_mismatch"
    assert letter.batch_key is None
    assert dead_letter_receipts([letter], now_ms=1) == []


def test_a_batch_redelivered_too_often_is_keyed_for_its_receipt() -> None:
    batch = _one_batch("gw-a", end_ms=aligned_now_ms(10) - 20_000)
    letter = failed_too_often(_inbound(DATA_TOPIC, encode_batch(batch)), 5, "x")
    assert letter.code == "redelivered"
    assert letter.batch_key == ("gw-a", batch.boot_id, batch.seq)
