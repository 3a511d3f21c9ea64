"""Alert notifications: config, signing (unit); webhook + e-mail through a real worker,
database and broker, to receivers on loopback (integration, faults)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from millrace.cloud.alerts.notify import (
    NotifySettings,
    Outgoing,
    Route,
    digest_id,
    parse_notify,
    sign,
    verify,
)
from millrace.cloud.alerts.rules import AlertRule, sync_rules
from millrace.configfile import Table
from millrace.errors import ConfigError
from millrace.wire import AlertMessage, Batch, Window
from tests.cloud.ingest_support import (
    Publisher,
    WorkerProcess,
    aligned_now_ms,
    make_config,
    prepare_database,
    publishers,
    query,
    running_worker,
    scalar,
    wait_for,
    wait_ledger,
    write_config,
)
from tests.cloud.notify_support import (
    SECRET,
    SmtpReceiver,
    WebhookReceiver,
    notify_toml,
    write_secret,
)

__all__ = ["publishers"]


# --- unit: configuration, routing, signatures -------------------------------------------


def _parse(tmp_path: Path, data: dict[str, Any]) -> NotifySettings:
    return parse_notify(Table(data, "notify", base=tmp_path, source="ingest.toml"))


def _hook(tmp_path: Path, mode: int = 0o600) -> dict[str, Any]:
    secret = write_secret(tmp_path / f"hook-{mode:o}.secret", SECRET.decode(), mode)
    return {"type": "webhook", "url": "https://hooks.plant.example/m", "secret_file": str(secret)}


def test_notify_config_routes_by_rule_severity_and_state(tmp_path: Path) -> None:
    settings = _parse(
        tmp_path,
        {
            "dashboard_url": "https://dash.plant.example/",
            "channels": {"hook": _hook(tmp_path), "ops": _hook(tmp_path)},
            "route": [
                {"channels": ["hook"], "rules": ["press-*"], "severities": ["critical"]},
                {"channels": ["ops", "hook"], "states": "active"},
            ],
        },
    )
    msg = AlertMessage(7, "press-1", "temp", "press-hot", "critical", "active", 90.0, 0, "hot")
    assert settings.channels_for(msg) == ["hook", "ops"]
    cleared = AlertMessage(7, "press-1", "temp", "press-hot", "critical", "cleared", 1.0, 0, "")
    assert settings.channels_for(cleared) == ["hook"]
    other = AlertMessage(8, "line-1", "temp", "line-hot", "warning", "cleared", 1.0, 0, "")
    assert settings.channels_for(other) == []
    assert settings.ack_url(7) == "https://dash.plant.example/alerts?alert=7"
    assert "secret" not in repr(settings.channels["hook"]).lower().replace("secret_file", "")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda t, d: d["channels"]["hook"].update(url="ftp://x.example/"), "channels.hook.url"),
        (lambda t, d: d["route"][0].update(channels=["nope"]), "route[0].channels[0]"),
        (lambda t, d: d["route"][0].update(severities=["fatal"]), "route[0].severities[0]"),
        (lambda t, d: d["channels"]["hook"].update(colour="red"), "channels.hook.colour"),
        (lambda t, d: d.update(digest_threshold=0), "notify.digest_threshold"),
        (lambda t, d: d["channels"].update(hook=_hook(t, 0o644)), "channels.hook.secret_file"),
        (
            lambda t, d: d["channels"]["hook"].update(secret_file=str(t / "missing")),
            "channels.hook.secret_file",
        ),
        (lambda t, d: d.pop("route"), "notify.route"),
        (
            lambda t, d: d["channels"].update(
                m={"type": "email", "host": "smtp.plant.example", "from": "a@plant.example"}
            ),
            "channels.m.to",
        ),
    ],
)
def test_notify_config_errors_name_the_key(
    tmp_path: Path, change: Callable[[Path, dict[str, Any]], None], key: str
) -> None:
    data: dict[str, Any] = {
        "channels": {"hook": _hook(tmp_path)},
        "route": [{"channels": ["hook"]}],
    }
    change(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        _parse(tmp_path, data)
    assert key in str(info.value).split(": ")[1], str(info.value)
    assert "\n" not in str(info.value)


def test_secret_file_mode_error_says_the_fix(tmp_path: Path) -> None:
    data = {"channels": {"hook": _hook(tmp_path, 0o640)}, "route": [{"channels": ["hook"]}]}
    with pytest.raises(ConfigError, match=r"mode 0640.*chmod 600"):
        _parse(tmp_path, data)


def test_signature_verifies_and_refuses_tampering_and_replays() -> None:
    body = b'{"a":1}'
    sig = sign(SECRET, "1700000000", body)
    expected = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sig == "sha256=" + expected
    assert verify(SECRET, timestamp="1700000000", body=body, signature=sig, now=1700000100)
    assert not verify(SECRET, timestamp="1700000000", body=b'{"a":2}', signature=sig, now=1.7e9)
    # The same signed request replayed ten minutes later is refused.
    assert not verify(SECRET, timestamp="1700000000", body=body, signature=sig, now=1700000600)


def test_digest_id_is_stable_for_the_same_members() -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert digest_id([a, b]) == digest_id([b, a]) != digest_id([a])
    items = tuple(
        (str(uuid.uuid4()), {"state": "active", "severity": "warning", "rule": f"r{i}",
                             "device": "d", "message": "m", "ack_url": None})
        for i in range(30)
    )  # fmt: skip
    body = Outgoing("x", "digest", items, 5, "https://dash.plant.example").body()
    assert body["count"] == 30 and len(body["first"]) == 5 and len(body["delivery_ids"]) == 30
    assert body["by_state"] == {"active": 30}


def test_route_defaults_match_everything() -> None:
    msg = AlertMessage(1, "d", "m", "any", "info", "cleared", 0.0, 0, "")
    assert Route(("hook",)).matches(msg)


# --- integration: through a real worker -------------------------------------------------

PERIOD_S = 60


def _batch(device: str, boot_id: str, seq: int, value: float, slot: int) -> Batch:
    start = aligned_now_ms(PERIOD_S) - (30 - slot) * PERIOD_S * 1000
    w = Window("temp", start, PERIOD_S, 1, value, value, value, value, value, value * value)
    return Batch(device=device, boot_id=boot_id, seq=seq, sent_at_ms=start, windows=(w,))


@pytest.fixture
def receivers(test_pki: Any) -> Iterator[tuple[WebhookReceiver, SmtpReceiver]]:
    hook = WebhookReceiver()
    smtp = SmtpReceiver(test_pki.paths.broker_cert, test_pki.paths.broker_key)
    try:
        yield hook, smtp
    finally:
        hook.close()
        smtp.close()


def _states(dsn: str) -> Counter[str]:
    return Counter(r[0] for r in query(dsn, "SELECT state FROM notifications"))


@pytest.mark.faults
def test_one_webhook_and_one_email_per_transition_across_a_worker_kill(
    broker_factory: Callable[..., Any],
    fresh_db: str,
    publishers: Callable[..., Publisher],
    receivers: tuple[WebhookReceiver, SmtpReceiver],
    test_pki: Any,
    tmp_path: Path,
) -> None:
    hook, smtp = receivers
    db = prepare_database(fresh_db)
    with psycopg.connect(db.owner_dsn, autocommit=True) as conn:
        sync_rules(conn, [AlertRule("press-hot", "temp", "above", high=80.0, severity="critical")])
    server = broker_factory()
    path = write_config(
        tmp_path / "worker.toml",
        server=server,
        dsn=db.ingest_dsn,
        client_id="notify-w1",
        group=f"g{uuid.uuid4().hex[:8]}",
        extra=notify_toml(tmp_path, webhook=hook, smtp=smtp, ca=test_pki.ca),
    )
    pub = publishers(server, "press-1")
    boot = uuid.uuid4().hex
    worker = WorkerProcess(path, tmp_path / "worker.log")
    worker.mark()
    worker.start()
    try:
        worker.wait_subscribed()
        # 1. raised: delivered at once.
        pub.publish([_batch("press-1", boot, 0, 90.0, 0)])
        wait_for(lambda: len(hook.accepted) == 1 and len(smtp.accepted) == 1, what="raise sent")
        # 2. cleared while both receivers refuse: the intents stay pending, retried...
        hook.fail = smtp.fail = True
        pub.publish([_batch("press-1", boot, 1, 50.0, 1)])
        wait_for(
            lambda: (
                scalar(
                    db.owner_dsn,
                    "SELECT count(*) FROM notifications WHERE transition = 'cleared'"
                    " AND state = 'pending' AND attempts >= 1",
                )
                == 2
            ),
            what="the clear notifications to have failed once each",
        )
        # ... and the worker dies with them pending.
        worker.kill()
        # 3. raised again while the worker is dead (the broker session keeps the batch).
        pub.publish([_batch("press-1", boot, 2, 95.0, 2)])
        hook.fail = smtp.fail = False
        worker.mark()
        worker.start()
        worker.wait_subscribed()
        wait_ledger(db.owner_dsn, 3)
        wait_for(lambda: _states(db.owner_dsn) == {"delivered": 6}, what="all 6 delivered")
        assert worker.terminate() == 0
    finally:
        worker.close()
    # Exactly one per transition per channel: raise, clear, raise again.
    transitions = query(
        db.owner_dsn, "SELECT alert_id, transition FROM alerts a JOIN notifications n"
        " ON n.alert_id = a.id WHERE n.channel = 'hook' ORDER BY n.id",
    )  # fmt: skip
    assert [t for _, t in transitions] == ["active", "cleared", "active"]
    got_hooks = [(h.body["alert_id"], h.body["state"]) for h in hook.accepted]
    assert got_hooks == [(a, t) for a, t in transitions]
    assert hook.bad_signatures == 0
    assert all(h.delivery_id == h.idempotency_key == h.body["delivery_id"] for h in hook.accepted)
    assert all(
        h.body["ack_url"] == f"https://dash.plant.example/alerts?alert={h.body['alert_id']}"
        for h in hook.accepted
    )
    subjects = [m.message["Subject"] for m in smtp.accepted]
    assert sorted(subjects) == sorted(
        [
            "[millrace critical] raised: press-hot on press-1",
            "[millrace critical] cleared: press-hot on press-1",
            "[millrace critical] raised: press-hot on press-1",
        ]
    )
    assert all(m.authenticated and m.rcpt_tos == ["oncall@plant.example"] for m in smtp.accepted)
    mail_ids = {m.message["X-Millrace-Delivery"] for m in smtp.accepted}
    stored_ids = {str(r[0]) for r in query(db.owner_dsn, "SELECT delivery_id FROM notifications")}
    assert mail_ids | {h.delivery_id for h in hook.accepted} == stored_ids
    assert all("Acknowledge: https://dash.plant.example/alerts?alert=" in
               m.message.get_payload() for m in smtp.accepted)  # fmt: skip
    print(f"webhook attempts {hook.attempts}, accepted {len(hook.accepted)}; "
          f"smtp attempts {smtp.attempts}, accepted {len(smtp.accepted)}")  # fmt: skip


@pytest.mark.integration
def test_an_alert_storm_becomes_a_digest(
    broker_factory: Callable[..., Any],
    fresh_db: str,
    publishers: Callable[..., Publisher],
    receivers: tuple[WebhookReceiver, SmtpReceiver],
    test_pki: Any,
    tmp_path: Path,
) -> None:
    hook, smtp = receivers
    db = prepare_database(fresh_db)
    storm = 300
    with psycopg.connect(db.owner_dsn, autocommit=True) as conn:
        sync_rules(
            conn,
            [AlertRule(f"hot-{i:03}", "temp", "above", high=float(i % 50)) for i in range(storm)],
        )
    server = broker_factory()
    config = make_config(
        tmp_path,
        server=server,
        dsn=db.ingest_dsn,
        client_id="storm-w1",
        group=f"g{uuid.uuid4().hex[:8]}",
        extra=notify_toml(
            tmp_path, webhook=hook, smtp=smtp, ca=test_pki.ca,
            extra="digest_threshold = 20\ndigest_list = 5",
        ),
    )  # fmt: skip
    pub = publishers(server, "press-9")
    with running_worker(config):
        pub.publish([_batch("press-9", uuid.uuid4().hex, 0, 90.0, 0)])
        wait_for(lambda: _states(db.owner_dsn) == {"delivered": 2 * storm}, what="storm sent")
    # Hundreds of transitions, a handful of messages per channel.
    assert len(hook.accepted) < 10 and len(smtp.accepted) < 10
    digests = [h.body for h in hook.accepted if h.body["type"] == "digest"]
    assert digests and all(len(d["first"]) <= 5 for d in digests)
    covered = [i for d in digests for i in d["delivery_ids"]]
    covered += [h.delivery_id for h in hook.accepted if h.body["type"] == "alert"]
    hook_ids = query(db.owner_dsn, "SELECT delivery_id::text FROM notifications"
                     " WHERE channel = 'hook'")  # fmt: skip
    assert sorted(covered) == sorted(r[0] for r in hook_ids)  # each transition exactly once
    assert sum(d["count"] for d in digests) == len(covered) - (len(hook.accepted) - len(digests))
    assert any("alert transitions (digest)" in m.message["Subject"] for m in smtp.accepted)
    assert hook.bad_signatures == 0
    print(f"storm of {storm}: webhook messages {len(hook.accepted)} ({len(digests)} digests),"
          f" e-mails {len(smtp.accepted)}")  # fmt: skip


@pytest.mark.faults
def test_a_dead_webhook_retries_then_records_a_failure_and_ingest_goes_on(
    broker_factory: Callable[..., Any],
    fresh_db: str,
    publishers: Callable[..., Publisher],
    receivers: tuple[WebhookReceiver, SmtpReceiver],
    test_pki: Any,
    tmp_path: Path,
) -> None:
    hook, smtp = receivers
    hook.hold = threading.Event()  # the endpoint takes the request and does not answer
    hook.fail = True  # and when it does, it refuses
    db = prepare_database(fresh_db)
    with psycopg.connect(db.owner_dsn, autocommit=True) as conn:
        sync_rules(conn, [AlertRule("hot", "temp", "above", high=80.0)])
    server = broker_factory()
    config = make_config(
        tmp_path,
        server=server,
        dsn=db.ingest_dsn,
        client_id="dead-w1",
        group=f"g{uuid.uuid4().hex[:8]}",
        extra=notify_toml(
            tmp_path, webhook=hook, smtp=smtp, ca=test_pki.ca, extra="max_attempts = 3",
            webhook_timeout_s=60.0,
        ),
    )  # fmt: skip
    pub = publishers(server, "press-2")
    boot = uuid.uuid4().hex
    with running_worker(config) as runner:
        pub.publish([_batch("press-2", boot, 0, 90.0, 0)])
        wait_for(lambda: hook.in_flight == 1, what="the webhook request to hang")
        # While the webhook hangs: ingest commits 20 more batches and the e-mail goes out.
        pub.publish([_batch("press-2", boot, seq, 85.0, seq) for seq in range(1, 21)])
        wait_ledger(db.owner_dsn, 21)
        wait_for(lambda: len(smtp.accepted) == 1, what="the e-mail, beside the hung webhook")
        assert hook.in_flight == 1 and hook.attempts == 1, "the webhook answered meanwhile"
        hook.hold.set()  # it answers 503 now, every time
        wait_for(
            lambda: _states(db.owner_dsn) == {"delivered": 1, "failed": 1},
            what="the webhook notification to be given up",
        )
        assert (
            runner.counter("millrace_ingest_notifications_total", channel="hook", outcome="failed")
            == 1
        )
        row = query(
            db.owner_dsn,
            "SELECT attempts, last_error, delivered_at FROM notifications WHERE channel = 'hook'",
        )[0]
        assert row[0] == 3 and row[1] == "HTTP 503 Service Unavailable" and row[2] is None
        assert hook.attempts == 3 and hook.accepted == []
        # The endpoint fixed, the documented UPDATE sends the failed one again, same id.
        hook.fail = False
        failed_id = str(scalar(db.owner_dsn, "SELECT delivery_id FROM notifications"
                               " WHERE state = 'failed'"))  # fmt: skip
        query(db.owner_dsn, "UPDATE notifications SET state = 'pending', attempts = 0,"
              " next_attempt_at = now() WHERE state = 'failed' RETURNING id")  # fmt: skip
        wait_for(lambda: _states(db.owner_dsn) == {"delivered": 2}, what="the resend")
    assert [h.delivery_id for h in hook.accepted] == [failed_id]
    assert scalar(db.owner_dsn, "SELECT count(*) FROM readings") == 21
    assert json.loads(json.dumps(smtp.accepted[0].message["Subject"])).startswith("[millrace")


def test_the_notify_example_in_docs_alerts_md_loads(tmp_path: Path) -> None:
    import re
    import tomllib

    page = (Path(__file__).resolve().parents[2] / "docs" / "alerts.md").read_text()
    (block,) = [
        b for b in re.findall(r"^```toml\n(.*?)^```$", page, re.M | re.S) if "[notify]" in b
    ]
    for name, body in (("webhook.secret", SECRET.decode()), ("smtp.secret",
                       'username = "u"\npassword = "p"\n')):  # fmt: skip
        block = block.replace(f"/etc/millrace/{name}", str(write_secret(tmp_path / name, body)))
    settings = parse_notify(Table(tomllib.loads(block)["notify"], "notify", base=tmp_path))
    assert set(settings.channels) == {"ops-hook", "oncall-mail"} and len(settings.routes) == 2
    raised = AlertMessage(
        1, "press-1", "oil_temp", "press-oil-hot", "critical", "active", 90, 0, ""
    )
    assert settings.channels_for(raised) == ["ops-hook", "oncall-mail"]


def test_email_is_never_sent_without_starttls(tmp_path: Path) -> None:
    from aiosmtpd.controller import Controller

    from millrace.cloud.alerts.notify import DeliveryError, EmailChannel, send_email
    from tests.fixtures.fix_broker import free_port

    got: list[bytes] = []

    class Handler:
        async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
            got.append(envelope.content)
            return "250 OK"

    port = free_port()
    plain = Controller(Handler(), hostname="127.0.0.1", port=port)  # offers no STARTTLS
    plain.start()
    try:
        channel = EmailChannel("m", "127.0.0.1", port, "a@plant.example", ("b@plant.example",))
        items = (("d1", {"state": "active", "severity": "info", "rule": "r", "device": "x",
                         "metric": "m", "value": 1.0, "alert_id": 1, "message": "m"}),)  # fmt: skip
        with pytest.raises(DeliveryError, match="STARTTLS"):
            send_email(channel, Outgoing("d1", "alert", items))
    finally:
        plain.stop()
    assert got == []


@pytest.mark.integration
def test_a_crash_between_send_and_mark_resends_with_the_same_delivery_id(
    fresh_db: str, tmp_path: Path
) -> None:
    """The one window no database closes: the receiver dedupes on the delivery id."""
    from millrace.cloud.alerts.notify import NotificationSender, default_send, enqueue

    db = prepare_database(fresh_db)
    hook = WebhookReceiver()
    try:
        settings = parse_notify(
            Table(
                {"channels": {"hook": {"type": "webhook", "url": hook.url, "secret_file": str(
                    write_secret(tmp_path / "s", SECRET.decode()))}},
                 "route": [{"channels": ["hook"]}]},
                "notify", base=tmp_path,
            )
        )  # fmt: skip
        msg = AlertMessage(42, "press-1", "temp", "hot", "warning", "active", 90.0, 0, "hot")
        with psycopg.connect(db.ingest_dsn) as conn:
            assert enqueue(conn, settings, [msg]) == 1
            assert enqueue(conn, settings, [msg]) == 0  # a second intent is impossible
        victim = psycopg.connect(db.ingest_dsn, autocommit=True)
        pid = victim.info.backend_pid

        def send_then_crash(channel: Any, out: Any) -> None:
            default_send(channel, out)  # the receiver has it ...
            with psycopg.connect(db.owner_dsn, autocommit=True) as owner:  # ... then we "die"
                owner.execute("SELECT pg_terminate_backend(%s)", (pid,))

        crashing = NotificationSender(settings, lambda: victim, send=send_then_crash)
        with pytest.raises(psycopg.OperationalError):
            crashing.deliver_once(victim, settings.channels["hook"])
        assert _states(db.owner_dsn) == {"pending": 1}
        with psycopg.connect(db.ingest_dsn, autocommit=True) as conn:
            sender = NotificationSender(settings, lambda: conn)
            assert sender.deliver_once(conn, settings.channels["hook"])
            assert not sender.deliver_once(conn, settings.channels["hook"])
        assert _states(db.owner_dsn) == {"delivered": 1}
        ids = [h.delivery_id for h in hook.accepted]
        assert len(ids) == 2 and ids[0] == ids[1], ids  # sent twice, one delivery id
        assert ids[0] == str(scalar(db.owner_dsn, "SELECT delivery_id FROM notifications"))
    finally:
        hook.close()


@pytest.mark.integration
def test_a_failed_send_pauses_the_channel_instead_of_trying_every_row(
    fresh_db: str, tmp_path: Path
) -> None:
    from millrace.cloud.alerts.notify import DeliveryError, NotificationSender, enqueue

    db = prepare_database(fresh_db)
    secret = write_secret(tmp_path / "s", SECRET.decode())
    settings = parse_notify(
        Table(
            {"channels": {"hook": {"type": "webhook", "url": "https://hooks.plant.example/x",
                                   "secret_file": str(secret)}},
             "route": [{"channels": ["hook"]}]},
            "notify", base=tmp_path,
        )
    )  # fmt: skip
    tried: list[str] = []

    def refuse(_channel: Any, out: Any) -> None:
        tried.append(out.delivery_id)
        raise DeliveryError("HTTP 503 Service Unavailable")

    with psycopg.connect(db.ingest_dsn, autocommit=True) as conn:
        messages = [
            AlertMessage(i, "press-1", "temp", "hot", "warning", "active", 90.0, 0, "hot")
            for i in range(3)
        ]
        with conn.transaction():
            assert enqueue(conn, settings, messages) == 3
        sender = NotificationSender(settings, lambda: conn, send=refuse)
        assert not sender.deliver_once(conn, settings.channels["hook"])
    assert len(tried) == 1
    attempts = query(db.owner_dsn, "SELECT attempts FROM notifications ORDER BY id")
    assert attempts == [(1,), (0,), (0,)]
