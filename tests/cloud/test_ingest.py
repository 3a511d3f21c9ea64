"""Ingest against the real TLS broker and TimescaleDB: exact storage, duplicates, two workers."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from millrace.wire import Batch, Event
from tests.cloud.ingest_support import (
    IngestDb,
    Publisher,
    assert_stored_exactly,
    ingest_db,
    make_batches,
    make_config,
    publishers,
    query,
    running_worker,
    scalar,
    wait_for,
    wait_ledger,
)

__all__ = ["ingest_db", "publishers"]  # fixtures used by name below

pytestmark = pytest.mark.integration


def _group() -> str:
    return f"g{uuid.uuid4().hex[:8]}"


def test_rows_and_rollups_equal_the_published_aggregates(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    server = broker_factory()
    config = make_config(
        tmp_path, server=server, dsn=ingest_db.ingest_dsn, client_id="w1", group=_group()
    )
    # No drain on the interval in this test: only the clean stop's drain merges rollups.
    config = dataclasses.replace(
        config, batch=dataclasses.replace(config.batch, rollup_drain_ms=60_000)
    )
    # ~30 h of 60 s windows for 3 metrics per device: many hours and a UTC midnight.
    a = make_batches("ing-a", batches=60, windows_per_batch=90, seed=1)
    b = make_batches("ing-b", batches=60, windows_per_batch=90, seed=2)
    events = Batch(
        device="ing-a",
        boot_id=a[0].boot_id,
        seq=len(a),
        sent_at_ms=a[-1].sent_at_ms,
        events=(
            Event("mode", a[-1].windows[0].start_ms, "auto"),
            Event("run", a[-1].windows[0].start_ms, True),
        ),
    )
    with running_worker(config) as runner:
        pa, pb = publishers(server, "ing-a"), publishers(server, "ing-b")
        pa.publish(a[:30])
        pb.publish(b, encoding="json")
        pa.publish([*a[30:], events])
        wait_ledger(ingest_db.owner_dsn, len(a) + len(b) + 1)
        assert runner.counter("millrace_ingest_rows_total", table="readings") == 60 * 90 * 2
    # The worker stopped cleanly: its drain merged every partial before it exited.
    assert scalar(ingest_db.owner_dsn, "SELECT count(*) FROM rollup_pending") == 0
    assert scalar(ingest_db.owner_dsn, "SELECT sum(windows) FROM rollup_daily") == 60 * 90 * 2
    assert_stored_exactly(ingest_db.owner_dsn, [*a, *b, events])
    assert query(
        ingest_db.owner_dsn,
        "SELECT kind, value, text FROM events ORDER BY kind",
    ) == [("bool", 1.0, None), ("text", None, "auto")]
    assert scalar(ingest_db.owner_dsn, "SELECT count(*) FROM sequence_gaps") == 0
    assert scalar(ingest_db.owner_dsn, "SELECT count(*) FROM dead_letters") == 0
    last = query(
        ingest_db.owner_dsn, "SELECT name, last_data_at IS NOT NULL FROM devices ORDER BY name"
    )
    assert last == [("ing-a", True), ("ing-b", True)]


def test_the_same_batches_published_twice_are_stored_once(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    server = broker_factory()
    config = make_config(
        tmp_path, server=server, dsn=ingest_db.ingest_dsn, client_id="w1", group=_group()
    )
    batches = make_batches("dup-a", batches=40, windows_per_batch=30, seed=3)
    with running_worker(config) as runner:
        pub = publishers(server, "dup-a")
        pub.publish(batches)
        wait_ledger(ingest_db.owner_dsn, len(batches))
        # Again, in another order and interleaved with itself (several copies per commit).
        pub.publish([*reversed(batches), *batches[::2]])
        wait_for(
            lambda: runner.counter("millrace_ingest_duplicates_total") == len(batches) * 1.5,
            what="the duplicates to be seen and skipped",
        )
    assert_stored_exactly(ingest_db.owner_dsn, batches)
    assert scalar(ingest_db.owner_dsn, "SELECT count(*) FROM sequence_gaps") == 0
    assert scalar(ingest_db.owner_dsn, "SELECT sum(batches) FROM ingest_streams") == len(batches)


def test_sequence_gaps_are_recorded_and_closed_by_late_batches(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    server = broker_factory()
    config = make_config(
        tmp_path, server=server, dsn=ingest_db.ingest_dsn, client_id="w1", group=_group()
    )
    batches = make_batches("gap-a", batches=12, windows_per_batch=6, seed=4)
    gaps_sql = "SELECT seq_from, seq_to FROM sequence_gaps ORDER BY seq_from"
    with running_worker(config):
        pub = publishers(server, "gap-a")
        pub.publish([batches[i] for i in (0, 1, 2, 5, 6, 10, 11)])
        wait_ledger(ingest_db.owner_dsn, 7)
        assert query(ingest_db.owner_dsn, gaps_sql) == [(3, 4), (7, 9)]
        pub.publish([batches[8], batches[3]])
        wait_ledger(ingest_db.owner_dsn, 9)
        assert query(ingest_db.owner_dsn, gaps_sql) == [(4, 4), (7, 7), (9, 9)]
        pub.publish([batches[i] for i in (4, 7, 9)])
        wait_ledger(ingest_db.owner_dsn, 12)
        assert query(ingest_db.owner_dsn, gaps_sql) == []
    assert_stored_exactly(ingest_db.owner_dsn, batches)
    assert query(ingest_db.owner_dsn, "SELECT first_seq, max_seq, batches FROM ingest_streams") == [
        (0, 11, 12)
    ]


def test_two_workers_split_the_load_and_store_everything_once(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    server = broker_factory()
    group = _group()
    configs = [
        make_config(
            tmp_path, server=server, dsn=ingest_db.ingest_dsn, client_id=f"w{i}", group=group
        )
        for i in (1, 2)
    ]
    devices = [f"two-{i}" for i in range(4)]
    batches = {
        d: make_batches(d, batches=50, windows_per_batch=20, seed=i) for i, d in enumerate(devices)
    }
    everything = [b for d in devices for b in batches[d]]
    with running_worker(configs[0]) as w1, running_worker(configs[1]) as w2:
        for device in devices:
            publishers(server, device).publish(batches[device])
        wait_ledger(ingest_db.owner_dsn, len(everything))
        shares = [
            w.counter("millrace_ingest_messages_total", kind="data", outcome="stored")
            for w in (w1, w2)
        ]
    assert sum(shares) == len(everything)
    assert all(share > 0 for share in shares), f"the load was not split: {shares}"
    assert_stored_exactly(ingest_db.owner_dsn, everything)


REFUSE_POISON_EVENTS = """
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.metric_id = (SELECT id FROM metrics WHERE name = 'poison.event') THEN
        RAISE EXCEPTION 'refused by the test trigger' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_poison();
"""


def test_a_message_the_database_refuses_is_dead_lettered_alone(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    server = broker_factory()
    # A long delay: the good and the refused batches land in one commit batch.
    config = make_config(
        tmp_path,
        server=server,
        dsn=ingest_db.ingest_dsn,
        client_id="w1",
        group=_group(),
        max_delay_ms=1500,
    )
    good = make_batches("poison-a", batches=6, windows_per_batch=5, seed=31)
    # The database itself refuses seq 6 (a trigger stands in for any data the database
    # rejects after validation passed): that message alone must go to dead letters.
    with psycopg.connect(ingest_db.owner_dsn, autocommit=True) as conn:
        conn.execute(REFUSE_POISON_EVENTS)
    clash = Batch(
        device="poison-a",
        boot_id=good[0].boot_id,
        seq=6,
        sent_at_ms=good[0].sent_at_ms,
        events=(Event("poison.event", good[0].sent_at_ms, 1.0),),
    )
    with running_worker(config) as runner:
        pub = publishers(server, "poison-a")
        pub.publish(good[:1])
        wait_ledger(ingest_db.owner_dsn, 1)
        pub.publish([*good[1:3], clash, *good[3:]])
        wait_ledger(ingest_db.owner_dsn, len(good))
        wait_for(
            lambda: runner.counter("millrace_ingest_dead_letters_total", code="db_poison") == 1,
            what="the refused batch's dead letter",
        )
    assert_stored_exactly(ingest_db.owner_dsn, good)
    code, reason, topic = query(
        ingest_db.owner_dsn, "SELECT code, reason, topic FROM dead_letters"
    )[0]
    assert code == "db_poison" and "refused by the test trigger" in reason
    assert topic == "millrace/v1/d/poison-a/data"


def test_state_heartbeat_and_alerts_go_through_the_worker(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    mqtt_connect: Callable[..., Any],
    tmp_path: Path,
) -> None:

    from millrace import topics
    from millrace.cloud.alerts.rules import AlertRule, add_rule
    from millrace.wire import AlertMessage, DeviceState, Heartbeat, Window

    with psycopg.connect(ingest_db.owner_dsn, autocommit=True) as conn:
        add_rule(conn, AlertRule(name="hot", metric="temp", condition="above", high=100.0))
    server = broker_factory()
    config = make_config(
        tmp_path, server=server, dsn=ingest_db.ingest_dsn, client_id="w1", group=_group()
    )
    hot = make_batches("alert-a", batches=1, windows_per_batch=3, seed=41)[0]
    w = hot.windows[0]
    spike = Window(
        w.metric,
        w.start_ms,
        w.period_s,
        2,
        150.0 + w.min,
        w.min,
        150.0,
        w.min,
        150.0,
        w.min * w.min + 22500.0,
    )
    hot = Batch(hot.device, hot.boot_id, 0, hot.sent_at_ms, windows=(spike, *hot.windows[1:]))
    alerts_seen: list[AlertMessage] = []
    watcher = mqtt_connect(
        "alert-watcher",
        "svc-test",
        server=server,
        on_message=lambda _c, _u, msg: alerts_seen.append(AlertMessage.from_json(msg.payload)),
    )
    watcher.subscribe(topics.alert_topic("alert-a"), qos=1)
    with running_worker(config) as runner:
        pub = publishers(server, "alert-a")
        pub.publish_raw(
            DeviceState("alert-a", "online", hot.sent_at_ms, boot_id=hot.boot_id).to_json(),
            topic=topics.state_topic("alert-a"),
        )
        pub.publish_raw(
            Heartbeat("alert-a", hot.boot_id, hot.sent_at_ms, 3, 4096, 1.5, 0, 2).to_json(),
            topic=topics.health_topic("alert-a"),
        )
        pub.publish([hot])
        wait_ledger(ingest_db.owner_dsn, 1)
        # Published on millrace/v1/alerts/alert-a after the commit; a service receives it.
        wait_for(lambda: runner.counter("millrace_ingest_alerts_published_total") == 1)
        wait_for(lambda: len(alerts_seen) == 1)
    assert (alerts_seen[0].state, alerts_seen[0].value, alerts_seen[0].rule) == (
        "active",
        150.0,
        "hot",
    )
    rule, state, value = query(ingest_db.owner_dsn, "SELECT rule_name, state, value FROM alerts")[0]
    assert (rule, state, value) == ("hot", "active", 150.0)
    assert query(ingest_db.owner_dsn, "SELECT status, boot_id FROM devices") == [
        ("online", hot.boot_id)
    ]
    assert query(ingest_db.owner_dsn, "SELECT outbox_batches FROM device_health") == [(3,)]


def test_a_refused_message_is_isolated_by_bisection_and_the_rest_commits_in_few_transactions(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    """One refused message (class 23) among 16 costs about log2(16) transactions for the
    others, not one commit each (the issue "The guarantee must not end at the broker")."""
    server = broker_factory()
    config = make_config(
        tmp_path,
        server=server,
        dsn=ingest_db.ingest_dsn,
        client_id="w1",
        group=_group(),
        max_delay_ms=1500,
    )
    good = make_batches("bisect-a", batches=16, windows_per_batch=3, seed=33)
    with psycopg.connect(ingest_db.owner_dsn, autocommit=True) as conn:
        conn.execute(REFUSE_POISON_EVENTS)
    clash = Batch(
        device="bisect-a",
        boot_id=good[0].boot_id,
        seq=16,
        sent_at_ms=good[0].sent_at_ms,
        events=(Event("poison.event", good[0].sent_at_ms, 1.0),),
    )
    with running_worker(config) as runner:
        pub = publishers(server, "bisect-a")
        pub.publish(good[:1])  # devices and metrics exist before the measured batch
        wait_ledger(ingest_db.owner_dsn, 1)
        pub.publish([*good[1:4], clash, *good[4:]])
        wait_ledger(ingest_db.owner_dsn, len(good))
        wait_for(
            lambda: runner.counter("millrace_ingest_dead_letters_total", code="db_poison") == 1,
            what="the refused batch's dead letter",
        )
        rolled_back = runner.counter("millrace_ingest_transactions_total", outcome="rolled_back")
    assert_stored_exactly(ingest_db.owner_dsn, good)
    # Each transaction that stored ledger rows leaves its own xmin on them.
    transactions = scalar(
        ingest_db.owner_dsn,
        "SELECT count(DISTINCT l.xmin::text) FROM ingest_ledger l WHERE l.seq > 0",
    )
    # log2(16) = 4 halves committed (plus one if the batcher split the 16 by time);
    # message by message would take 15.
    assert 1 <= transactions <= 6, transactions
    assert 1 <= rolled_back <= 8, rolled_back
    code, reason = query(ingest_db.owner_dsn, "SELECT code, reason FROM dead_letters")[0]
    assert code == "db_poison" and "refused by the test trigger" in reason


STUCK_EVENTS = """
CREATE FUNCTION refuse_stuck() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.metric_id = (SELECT id FROM metrics WHERE name = 'stuck.event') THEN
        RAISE EXCEPTION 'the test trigger fails this one every time';  -- P0001: unexplained
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_stuck BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_stuck();
"""


def test_a_message_that_keeps_failing_is_dead_lettered_after_n_deliveries(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    """An error nobody classified (SQLSTATE P0001) is recovered like an outage, but each
    failed delivery is charged to the messages of the batch; the culprit is dead-lettered
    after MAX_FAILED_DELIVERIES, its batch-mates commit on their own."""
    from millrace.cloud.ingest.deliveries import MAX_FAILED_DELIVERIES

    server = broker_factory()
    config = make_config(
        tmp_path,
        server=server,
        dsn=ingest_db.ingest_dsn,
        client_id="w1",
        group=_group(),
        max_delay_ms=1500,
    )
    good = make_batches("stuck-a", batches=5, windows_per_batch=3, seed=35)
    with psycopg.connect(ingest_db.owner_dsn, autocommit=True) as conn:
        conn.execute(STUCK_EVENTS)
    stuck = Batch(
        device="stuck-a",
        boot_id=good[0].boot_id,
        seq=5,
        sent_at_ms=good[0].sent_at_ms,
        events=(Event("stuck.event", good[0].sent_at_ms, 1.0),),
    )
    with running_worker(config) as runner:
        pub = publishers(server, "stuck-a")
        pub.publish(good[:1])
        wait_ledger(ingest_db.owner_dsn, 1)
        pub.publish([*good[1:3], stuck, *good[3:]])
        wait_ledger(ingest_db.owner_dsn, len(good))
        wait_for(
            lambda: runner.counter("millrace_ingest_dead_letters_total", code="redelivered") == 1,
            what="the stuck message's dead letter",
        )
        failed = runner.counter("millrace_ingest_failed_deliveries_total")
    assert_stored_exactly(ingest_db.owner_dsn, good)
    (code, reason, topic), *others = query(
        ingest_db.owner_dsn, "SELECT code, reason, topic FROM dead_letters"
    )
    assert others == []
    assert code == "redelivered" and topic == "millrace/v1/d/stuck-a/data"
    assert f"{MAX_FAILED_DELIVERIES} deliveries failed" in reason
    assert "the test trigger fails this one every time" in reason
    # The culprit's failures, plus one each for the batch-mates it took down once.
    assert MAX_FAILED_DELIVERIES <= failed <= MAX_FAILED_DELIVERIES + len(good), failed


def test_a_value_psycopg_cannot_send_is_poison_not_an_outage(ingest_db: IngestDb) -> None:
    """A NUL in a text raises a client-side DataError without SQLSTATE: it blames the
    message (dead-lettered alone), never the database (which made the worker loop)."""
    from datetime import UTC, datetime

    from millrace.cloud.ingest.messages import StateItem
    from millrace.cloud.ingest.store import BatchStore
    from millrace.wire import DeviceState

    def unchecked_birth(device: str, version: str) -> DeviceState:
        # What a device with a valid certificate could send before the contract checked it.
        state = DeviceState(device, "online", 1_700_000_000_000, "ab" * 16, "1.0", "cfg")
        object.__setattr__(state, "agent_version", version)
        return state

    now = datetime.now(UTC)
    items = [
        StateItem(unchecked_birth("nul-ok-1", "1.0"), now),
        StateItem(unchecked_birth("nul-bad", "1.0\x00evil"), now),
        StateItem(unchecked_birth("nul-ok-2", "2.0"), now),
        StateItem(unchecked_birth("surrogate-bad", "1.0\ud800"), now),
    ]
    outcomes: list[str] = []
    with psycopg.connect(ingest_db.ingest_dsn, autocommit=True) as conn:
        stored = BatchStore(lambda _kind: None, outcomes.append).store(conn, items, None)
    assert sorted(stored.refused) == sorted([id(items[1]), id(items[3])])
    letter = stored.refused[id(items[1])]
    assert letter.code == "db_poison" and "NUL" in letter.reason
    assert stored.refused[id(items[3])].code == "db_poison"
    assert query(ingest_db.owner_dsn, "SELECT name, agent_version FROM devices ORDER BY 1") == [
        ("nul-ok-1", "1.0"),
        ("nul-ok-2", "2.0"),
    ]
    assert scalar(ingest_db.owner_dsn, "SELECT count(*) FROM dead_letters") == 2
    # [4] -> [2] -> ok-1 and the NUL's letter; [2] -> ok-2 and the surrogate's letter.
    assert outcomes.count("committed") == 4
