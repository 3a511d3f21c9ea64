"""Alert notifications: webhook and e-mail channels, routes, and a durable outbox.

Beside the MQTT alerts topic, each alert transition (raised, cleared) is sent to
the channels its route names. The worker never sends from the committer:

1. `enqueue(conn, settings, messages)` runs in the very transaction that records
   the transitions (store.py, worker.py) and writes one `notifications` row per
   (alert, transition, channel); a unique index makes a second intent impossible.
   A rolled-back batch leaves no intent; a committed one cannot lose it.
2. `NotificationSender` (one thread per channel, its own database connection)
   delivers due rows after commit, holding a row lock (FOR UPDATE SKIP LOCKED, so
   several workers share the work) across the send and marking the row delivered
   in the same transaction. A failure is retried with exponential backoff until
   `max_attempts`, then the row is `failed` with its last error: the recorded
   failure. On restart, whatever is pending is sent.
3. The one window a crash can hit is between the receiver accepting a message
   and the `delivered` mark committing: the row is then sent again. So delivery
   to an external endpoint is at-least-once, and every message carries its
   `delivery_id` (JSON field, `X-Millrace-Delivery` and `Idempotency-Key`
   headers, e-mail `Message-ID`) for the receiver to drop the rare repeat.

A storm (more than `digest_threshold` transitions for a channel within
`digest_window_s`) is sent as digests: one message with counts, the first few
transitions, and the delivery ids of all it covers.

A dead endpoint costs only its own channel's thread: ingest inserts rows and
moves on; HTTP and SMTP calls have timeouts. docs/alerts.md is the reference.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import http.client
import json
import logging
import random
import smtplib
import ssl
import stat
import threading
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote, urlsplit

import psycopg
from psycopg.types.json import Jsonb

from millrace.cloud.alerts.rules import SEVERITIES
from millrace.configfile import Table
from millrace.wire import AlertMessage

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-Millrace-Signature"
TIMESTAMP_HEADER: Final = "X-Millrace-Timestamp"
DELIVERY_HEADER: Final = "X-Millrace-Delivery"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
# Receivers should refuse a signature older than this (replay window).
SIGNATURE_TOLERANCE_SECONDS: Final = 300
STATES: Final = ("active", "cleared")
DEFAULT_DIGEST_THRESHOLD: Final = 20
DEFAULT_DIGEST_WINDOW_SECONDS: Final = 60.0
DEFAULT_DIGEST_LIST: Final = 10
# One digest covers at most this many transitions; a bigger storm takes several.
DIGEST_MAX_ITEMS: Final = 5000
DEFAULT_MAX_ATTEMPTS: Final = 8
DEFAULT_BACKOFF_INITIAL_SECONDS: Final = 2.0
DEFAULT_BACKOFF_MAX_SECONDS: Final = 300.0
DEFAULT_POLL_SECONDS: Final = 2.0
DEFAULT_TIMEOUT_SECONDS: Final = 10.0
DB_RETRY_SECONDS: Final = 5.0
MAX_ERROR_CHARS: Final = 500

ChannelType = Literal["webhook", "email"]


# --- configuration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebhookChannel:
    """HTTP POST of JSON, HMAC-SHA256 signed with `secret`."""

    name: str
    url: str
    secret: bytes = field(repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_SECONDS
    ca: Path | None = None
    type: ChannelType = "webhook"


@dataclass(frozen=True, slots=True)
class EmailChannel:
    """SMTP submission with STARTTLS (always), optional login."""

    name: str
    host: str
    port: int
    sender: str
    to: tuple[str, ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_SECONDS
    ca: Path | None = None
    type: ChannelType = "email"


Channel = WebhookChannel | EmailChannel


@dataclass(frozen=True, slots=True)
class Route:
    """Transitions of rules matching `rules` (globs) with a severity in `severities` go
    to `channels`."""

    channels: tuple[str, ...]
    rules: tuple[str, ...] = ("*",)
    severities: frozenset[str] = frozenset(SEVERITIES)
    states: frozenset[str] = frozenset(STATES)

    def matches(self, msg: AlertMessage) -> bool:
        return (
            msg.severity in self.severities
            and msg.state in self.states
            and any(fnmatch.fnmatchcase(msg.rule, pattern) for pattern in self.rules)
        )


@dataclass(frozen=True, slots=True)
class NotifySettings:
    """The `[notify]` table of the ingest config; empty = no notifications."""

    channels: Mapping[str, Channel] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    dashboard_url: str | None = None
    digest_threshold: int = DEFAULT_DIGEST_THRESHOLD
    digest_window_s: float = DEFAULT_DIGEST_WINDOW_SECONDS
    digest_list: int = DEFAULT_DIGEST_LIST
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_SECONDS
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_SECONDS
    poll_s: float = DEFAULT_POLL_SECONDS

    @property
    def enabled(self) -> bool:
        return bool(self.channels and self.routes)

    def channels_for(self, msg: AlertMessage) -> list[str]:
        """The channels a transition goes to (each once, in route order)."""
        out: dict[str, None] = {}
        for route in self.routes:
            if route.matches(msg):
                out.update(dict.fromkeys(route.channels))
        return list(out)

    def ack_url(self, alert_id: int) -> str | None:
        """The dashboard's Alerts page with this alert preselected for acknowledging."""
        if not self.dashboard_url:
            return None
        return f"{self.dashboard_url.rstrip('/')}/alerts?alert={alert_id}"


def read_secret_file(t: Table, name: str) -> bytes:
    """A secret file: must exist, be a regular file, and readable by its owner only."""
    path = t.path(name)
    try:
        info = path.stat()
    except OSError as exc:
        raise t.error(name, f"cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise t.error(name, f"{path} is not a regular file")
    if info.st_mode & 0o077:
        raise t.error(
            name,
            f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; a secret must be 0600"
            f" (chmod 600 {path})",
        )
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise t.error(name, f"cannot read {path}: {exc.strerror}") from exc
    if not data:
        raise t.error(name, f"{path} is empty")
    return data


def _webhook(t: Table, name: str) -> WebhookChannel:
    url = t.text("url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise t.error("url", f"{url!r}: expected an http:// or https:// URL with a host")
    secret = read_secret_file(t, "secret_file")
    if len(secret) < 16:
        raise t.error("secret_file", "the secret is shorter than 16 bytes; use a random one")
    channel = WebhookChannel(
        name=name,
        url=url,
        secret=secret,
        timeout_s=t.number("timeout_s", DEFAULT_TIMEOUT_SECONDS, low=0.1, high=120.0),
        ca=t.optional_path("ca", must_exist=True),
    )
    return channel


def _email(t: Table, name: str) -> EmailChannel:
    host = t.text("host")
    port = t.integer("port", 587, low=1, high=65535)
    sender = t.text("from")
    if "@" not in sender:
        raise t.error("from", f"{sender!r} is not an e-mail address")
    raw_to = t.raw("to")
    if isinstance(raw_to, str):
        raw_to = [raw_to]
    if not isinstance(raw_to, list) or not raw_to:
        raise t.error("to", "expected an address or a non-empty array of addresses")
    for i, addr in enumerate(raw_to):
        if not isinstance(addr, str) or "@" not in addr:
            raise t.error(f"to[{i}]", f"{addr!r} is not an e-mail address")
    username = password = None
    if t.has("credentials_file"):
        username, password = _credentials(t, "credentials_file")
    return EmailChannel(
        name=name,
        host=host,
        port=port,
        sender=sender,
        to=tuple(raw_to),
        username=username,
        password=password,
        timeout_s=t.number("timeout_s", DEFAULT_TIMEOUT_SECONDS, low=0.1, high=120.0),
        ca=t.optional_path("ca", must_exist=True),
    )


def _credentials(t: Table, name: str) -> tuple[str, str]:
    """`username = "..."` and `password = "..."` in a 0600 TOML file."""
    text = read_secret_file(t, name).decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise t.error(name, f"not TOML with username and password: {exc}") from None
    user, password = data.get("username"), data.get("password")
    if not isinstance(user, str) or not user or not isinstance(password, str) or not password:
        raise t.error(name, 'expected username = "..." and password = "..." (both non-empty)')
    unknown = sorted(set(data) - {"username", "password"})
    if unknown:
        raise t.error(name, f"unknown key {unknown[0]!r} (expected username, password)")
    return user, password


def _strings(t: Table, name: str, allowed: Sequence[str] | None = None) -> tuple[str, ...] | None:
    raw = t.raw(name)
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise t.error(name, "expected a string or a non-empty array of strings")
    for i, value in enumerate(raw):
        if not isinstance(value, str) or not value:
            raise t.error(f"{name}[{i}]", "expected a non-empty string")
        if allowed is not None and value not in allowed:
            raise t.error(f"{name}[{i}]", f"{value!r} is not one of {', '.join(allowed)}")
    return tuple(raw)


def parse_notify(t: Table) -> NotifySettings:
    """Read `[notify]`, `[notify.channels.<name>]` and `[[notify.route]]`."""
    dashboard_url = t.text("dashboard_url", "") or None
    if dashboard_url is not None:
        parts = urlsplit(dashboard_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise t.error("dashboard_url", "expected the dashboard's http(s):// base URL")
    channels: dict[str, Channel] = {}
    channels_table = t.table("channels")
    for name, ct in channels_table.subtables().items():
        kind = ct.choice("type", ("webhook", "email"))
        channels[name] = _webhook(ct, name) if kind == "webhook" else _email(ct, name)
        ct.check_unknown()
    routes: list[Route] = []
    for rt in t.array_of_tables("route"):
        names = _strings(rt, "channels")
        if names is None:
            raise rt.error("channels", "missing (expected channel names)")
        for i, name in enumerate(names):
            if name not in channels:
                known = ", ".join(sorted(channels)) or "none defined"
                raise rt.error(f"channels[{i}]", f"no channel {name!r} (known: {known})")
        routes.append(
            Route(
                channels=names,
                rules=_strings(rt, "rules") or ("*",),
                severities=frozenset(_strings(rt, "severities", SEVERITIES) or SEVERITIES),
                states=frozenset(_strings(rt, "states", STATES) or STATES),
            )
        )
        rt.check_unknown()
    settings = NotifySettings(
        channels=channels,
        routes=tuple(routes),
        dashboard_url=dashboard_url,
        digest_threshold=t.integer(
            "digest_threshold", DEFAULT_DIGEST_THRESHOLD, low=1, high=1_000_000
        ),
        digest_window_s=t.number(
            "digest_window_s", DEFAULT_DIGEST_WINDOW_SECONDS, low=1.0, high=86400.0
        ),
        digest_list=t.integer("digest_list", DEFAULT_DIGEST_LIST, low=1, high=1000),
        max_attempts=t.integer("max_attempts", DEFAULT_MAX_ATTEMPTS, low=1, high=1000),
        backoff_initial_s=t.number(
            "backoff_initial_s", DEFAULT_BACKOFF_INITIAL_SECONDS, low=0.0, low_open=True
        ),
        backoff_max_s=t.number(
            "backoff_max_s", DEFAULT_BACKOFF_MAX_SECONDS, low=0.0, low_open=True
        ),
        poll_s=t.number("poll_s", DEFAULT_POLL_SECONDS, low=0.05, high=3600.0),
    )
    if channels and not routes:
        raise t.error("route", "channels are defined but no [[notify.route]] sends to them")
    channels_table.check_unknown()
    t.check_unknown()
    return settings


# --- the outbox: intents in the ingest transaction -------------------------------------


def enqueue(
    conn: psycopg.Connection[Any], settings: NotifySettings, messages: Sequence[AlertMessage]
) -> int:
    """Record one notification intent per (transition, channel), in the caller's transaction.

    Returns how many rows were written (a repeat of an intent is ignored).
    """
    if not settings.enabled or not messages:
        return 0
    alert_ids: list[int] = []
    transitions: list[str] = []
    channels: list[str] = []
    payloads: list[Jsonb] = []
    for msg in messages:
        payload = {
            "alert_id": msg.alert_id,
            "device": msg.device,
            "metric": msg.metric,
            "rule": msg.rule,
            "severity": msg.severity,
            "state": msg.state,
            "value": msg.value,
            "ts_ms": msg.ts_ms,
            "message": msg.message,
            "ack_url": settings.ack_url(msg.alert_id),
        }
        for channel in settings.channels_for(msg):
            alert_ids.append(msg.alert_id)
            transitions.append(msg.state)
            channels.append(channel)
            payloads.append(Jsonb(payload))
    if not channels:
        return 0
    cur = conn.execute(
        """
        INSERT INTO notifications (alert_id, transition, channel, payload)
        SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::jsonb[])
        ON CONFLICT (alert_id, transition, channel) DO NOTHING
        """,
        (alert_ids, transitions, channels, payloads),
    )
    return cur.rowcount


# --- messages --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message for one channel: a single transition or a digest of several."""

    delivery_id: str
    kind: Literal["alert", "digest"]
    items: tuple[tuple[str, dict[str, Any]], ...]  # (delivery id, payload) covered
    list_limit: int = DEFAULT_DIGEST_LIST
    dashboard_url: str | None = None

    def body(self) -> dict[str, Any]:
        if self.kind == "alert":
            (_, payload) = self.items[0]
            return {"type": "alert", "delivery_id": self.delivery_id, **payload}
        states = Counter(p["state"] for _, p in self.items)
        severities = Counter(p["severity"] for _, p in self.items)
        return {
            "type": "digest",
            "delivery_id": self.delivery_id,
            "count": len(self.items),
            "by_state": dict(sorted(states.items())),
            "by_severity": dict(sorted(severities.items())),
            "first": [{"delivery_id": d, **p} for d, p in self.items[: self.list_limit]],
            "delivery_ids": [d for d, _ in self.items],
            "alerts_url": (
                f"{self.dashboard_url.rstrip('/')}/alerts" if self.dashboard_url else None
            ),
        }

    def subject(self) -> str:
        if self.kind == "alert":
            p = self.items[0][1]
            what = "raised" if p["state"] == "active" else "cleared"
            return f"[millrace {p['severity']}] {what}: {p['rule']} on {p['device']}"
        return f"[millrace] {len(self.items)} alert transitions (digest)"

    def text(self) -> str:
        if self.kind == "alert":
            p = self.items[0][1]
            lines = [
                p["message"],
                "",
                f"device:   {p['device']}",
                f"metric:   {p['metric']}",
                f"rule:     {p['rule']}",
                f"severity: {p['severity']}",
                f"state:    {p['state']}",
                f"value:    {p['value']:g}",
                f"alert id: {p['alert_id']}",
            ]
            if p.get("ack_url"):
                lines += ["", f"Acknowledge: {p['ack_url']}"]
        else:
            body = self.body()
            lines = [
                f"{body['count']} alert transitions: "
                + ", ".join(f"{n} {s}" for s, n in body["by_state"].items())
                + " ("
                + ", ".join(f"{n} {s}" for s, n in body["by_severity"].items())
                + ")",
                "",
                f"The first {len(body['first'])}:",
            ]
            for p in body["first"]:
                link = f"  {p['ack_url']}" if p.get("ack_url") else ""
                lines.append(
                    f"- [{p['severity']}] {p['state']} {p['rule']} on {p['device']}:"
                    f" {p['message']}{link}"
                )
            if body["alerts_url"]:
                lines += ["", f"All alerts: {body['alerts_url']}"]
        lines += ["", f"delivery id: {self.delivery_id}"]
        return "\n".join(lines) + "\n"


def digest_id(member_ids: Sequence[str]) -> str:
    """A digest's delivery id, the same for the same members (a resend after a crash)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "millrace-digest:" + ",".join(sorted(member_ids))))


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256 over `<timestamp>.<body>`."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: bytes,
    *,
    timestamp: str,
    body: bytes,
    signature: str,
    now: float | None = None,
    tolerance_s: float = SIGNATURE_TOLERANCE_SECONDS,
) -> bool:
    """What a receiver checks: the signature, and that the timestamp is recent."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class DeliveryError(Exception):
    """One send failed; the text is recorded (no secrets in it)."""


def send_webhook(channel: WebhookChannel, out: Outgoing) -> None:
    body = json.dumps(out.body(), separators=(",", ":"), sort_keys=True).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "millrace-notify",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(channel.secret, timestamp, body),
        DELIVERY_HEADER: out.delivery_id,
        IDEMPOTENCY_HEADER: out.delivery_id,
    }
    parts = urlsplit(channel.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=str(channel.ca) if channel.ca else None)
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=channel.timeout_s, context=context
        )
    else:
        conn = http.client.HTTPConnection(
            parts.hostname or "", parts.port, timeout=channel.timeout_s
        )
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(4096)
        if not 200 <= response.status < 300:
            raise DeliveryError(f"HTTP {response.status} {response.reason}")
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


def send_email(channel: EmailChannel, out: Outgoing) -> None:
    msg = EmailMessage()
    msg["Subject"] = out.subject()
    msg["From"] = channel.sender
    msg["To"] = ", ".join(channel.to)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    domain = channel.sender.rsplit("@", 1)[-1]
    msg["Message-ID"] = f"<{out.delivery_id}@{quote(domain, safe='.-')}>"
    msg[DELIVERY_HEADER] = out.delivery_id
    msg.set_content(out.text())
    context = ssl.create_default_context(cafile=str(channel.ca) if channel.ca else None)
    try:
        with smtplib.SMTP(channel.host, channel.port, timeout=channel.timeout_s) as smtp:
            smtp.ehlo()
            # STARTTLS is required: smtplib refuses when the server does not offer it.
            smtp.starttls(context=context)
            smtp.ehlo()
            if channel.username is not None and channel.password is not None:
                smtp.login(channel.username, channel.password)
            smtp.send_message(msg)
    except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:MAX_ERROR_CHARS]


Send = Callable[[Channel, Outgoing], None]


def default_send(channel: Channel, out: Outgoing) -> None:
    if isinstance(channel, WebhookChannel):
        send_webhook(channel, out)
    else:
        send_email(channel, out)


# --- the sender ------------------------------------------------------------------------


def backoff_s(settings: NotifySettings, attempts: int) -> float:
    """Seconds before attempt `attempts + 1`: initial * 2^(attempts-1), capped, +-20 %."""
    base = min(settings.backoff_max_s, settings.backoff_initial_s * 2 ** max(0, attempts - 1))
    return base * random.uniform(0.8, 1.2)


_RECENT: Final = """
    SELECT count(*) FROM notifications
     WHERE channel = %s AND created_at > now() - make_interval(secs => %s)
"""
_CLAIM: Final = """
    SELECT id, delivery_id::text, payload, attempts FROM notifications
     WHERE channel = %s AND state = 'pending' AND next_attempt_at <= now()
     ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED
"""


class NotificationSender:
    """Delivers pending notifications after commit: one thread per channel."""

    def __init__(
        self,
        settings: NotifySettings,
        connect: Callable[[], psycopg.Connection[Any]],
        *,
        send: Send = default_send,
        on_outcome: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self._connect = connect
        self._send = send
        self._on_outcome = on_outcome or (lambda _channel, _outcome, _n: None)
        self._stop = threading.Event()
        self._wakes = {name: threading.Event() for name in settings.channels}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if not self.settings.enabled:
            return
        routed = {name for route in self.settings.routes for name in route.channels}
        for name in sorted(routed):
            thread = threading.Thread(
                target=self._run, args=(name,), name=f"millrace-notify-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """New intents were committed: look now instead of at the next poll."""
        for event in self._wakes.values():
            event.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the send in progress (bounded by the channel's timeout) and stop."""
        self._stop.set()
        self.wake()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads.clear()

    def _run(self, name: str) -> None:
        channel = self.settings.channels[name]
        wake = self._wakes[name]
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                while not self._stop.is_set() and self.deliver_once(conn, channel):
                    pass
            except psycopg.Error as exc:
                log.warning("notify %s: database problem (%s); retrying", name, _first_line(exc))
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(DB_RETRY_SECONDS)
                continue
            except Exception:
                log.exception("notify %s: sender failed; retrying", name)
                self._stop.wait(DB_RETRY_SECONDS)
                continue
            wake.wait(self.settings.poll_s)
            wake.clear()
        if conn is not None:
            conn.close()

    def deliver_once(self, conn: psycopg.Connection[Any], channel: Channel) -> bool:
        """Send one message (a single transition or a digest).

        False when nothing was delivered: nothing is due, or the send failed (then the
        thread waits a poll before trying the next row, not hammering a dead endpoint).
        """
        s = self.settings
        with conn.transaction():
            row = conn.execute(_RECENT, (channel.name, s.digest_window_s)).fetchone()
            storm = row is not None and int(row[0]) > s.digest_threshold
            rows = conn.execute(_CLAIM, (channel.name, DIGEST_MAX_ITEMS if storm else 1)).fetchall()
            if not rows:
                return False
            ids = [int(r[0]) for r in rows]
            items = tuple((str(r[1]), dict(r[2])) for r in rows)
            if len(rows) == 1:
                out = Outgoing(items[0][0], "alert", items, s.digest_list, s.dashboard_url)
            else:
                members = [d for d, _ in items]
                out = Outgoing(digest_id(members), "digest", items, s.digest_list, s.dashboard_url)
            try:
                self._send(channel, out)
            except DeliveryError as exc:
                self._failed(conn, channel, rows, str(exc)[:MAX_ERROR_CHARS])
                return False
            conn.execute(
                """
                UPDATE notifications
                   SET state = 'delivered', delivered_at = now(), attempts = attempts + 1,
                       sent_as = %s::uuid, last_error = NULL
                 WHERE id = ANY(%s)
                """,
                (out.delivery_id, ids),
            )
        self._on_outcome(channel.name, "delivered", len(ids))
        log.info(
            "notify %s: sent %s %s covering %s transition(s)",
            channel.name,
            out.kind,
            out.delivery_id,
            len(ids),
        )
        return True

    def _failed(
        self,
        conn: psycopg.Connection[Any],
        channel: Channel,
        rows: Sequence[Sequence[Any]],
        error: str,
    ) -> None:
        s = self.settings
        gave_up = 0
        for row_id, _delivery, _payload, attempts in rows:
            tries = int(attempts) + 1
            final = tries >= s.max_attempts
            gave_up += final
            conn.execute(
                """
                UPDATE notifications
                   SET attempts = %s, last_error = %s, last_attempt_at = now(),
                       state = CASE WHEN %s THEN 'failed' ELSE 'pending' END,
                       next_attempt_at = now() + make_interval(secs => %s)
                 WHERE id = %s
                """,
                (tries, error, final, backoff_s(s, tries), row_id),
            )
        if gave_up:
            log.error(
                "notify %s: gave up on %s notification(s) after %s attempts: %s",
                channel.name,
                gave_up,
                s.max_attempts,
                error,
            )
            self._on_outcome(channel.name, "failed", gave_up)
        else:
            log.warning("notify %s: send failed (%s); will retry", channel.name, error)
            self._on_outcome(channel.name, "retry", len(rows))
