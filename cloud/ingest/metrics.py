"""Prometheus metrics of one ingest worker, and its /metrics + /healthz endpoint.

Each worker gets its own registry so several can live in one process (tests).
/healthz answers 200 only while the worker can do its job: database reachable,
broker connected, and the main loop turning (a stuck loop fails the check).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

# The loop wakes at least every half second; 30 s without a turn means it is stuck.
LOOP_STALL_SECONDS: Final = 30.0
COMMIT_BUCKETS_SECONDS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LAG_BUCKETS_SECONDS: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400)


class IngestMetrics:
    """The worker's counters, gauges and histograms (all prefixed millrace_ingest_)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "millrace_ingest_messages", "MQTT messages handled", ["kind", "outcome"], registry=r
        )
        self.rows = Counter("millrace_ingest_rows", "rows written", ["table"], registry=r)
        self.notifications = Counter(
            "millrace_ingest_notifications",
            "alert notifications by channel and outcome (delivered, retry, failed)",
            ["channel", "outcome"],
            registry=r,
        )
        self.batches = Counter("millrace_ingest_batches", "commit batches", registry=r)
        self.transactions = Counter(
            "millrace_ingest_transactions",
            "database transactions of the store (a bisected batch takes several)",
            ["outcome"],
            registry=r,
        )
        self.failed_deliveries = Counter(
            "millrace_ingest_failed_deliveries",
            "deliveries charged to their message after an unexplained failure",
            registry=r,
        )
        self.commit_seconds = Histogram(
            "millrace_ingest_commit_seconds",
            "write + commit time of one batch",
            buckets=COMMIT_BUCKETS_SECONDS,
            registry=r,
        )
        self.dead_letters = Counter(
            "millrace_ingest_dead_letters", "messages dead-lettered", ["code"], registry=r
        )
        self.redeliveries = Counter(
            "millrace_ingest_redeliveries", "messages delivered with the DUP flag", registry=r
        )
        self.duplicates = Counter(
            "millrace_ingest_duplicates", "batches already stored (skipped)", registry=r
        )
        self.gaps = Counter("millrace_ingest_sequence_gaps", "sequence gaps opened", registry=r)
        self.gaps_dropped = Counter(
            "millrace_ingest_sequence_gaps_dropped",
            "oldest gaps forgotten over the per-stream cap",
            registry=r,
        )
        self.metrics_refused = Counter(
            "millrace_ingest_metrics_refused",
            "batches with metrics over their device's cap (filed as too_many_metrics)",
            registry=r,
        )
        self.dead_letters_suppressed = Counter(
            "millrace_ingest_dead_letters_suppressed",
            "dead letters over their device's rate: counted, not stored",
            registry=r,
        )
        self.lag_seconds = Histogram(
            "millrace_ingest_lag_seconds",
            "from a batch's sent_at to its commit",
            buckets=LAG_BUCKETS_SECONDS,
            registry=r,
        )
        self.inbox = Gauge(
            "millrace_ingest_inbox_messages", "received, not yet written", registry=r
        )
        self.db_up = Gauge("millrace_ingest_db_up", "1 while the database is reachable", registry=r)
        self.broker_up = Gauge(
            "millrace_ingest_broker_connected", "1 while subscribed to a broker", registry=r
        )
        self.broker_subscribed = Gauge(
            "millrace_ingest_broker_subscribed",
            "1 while subscribed to this configured broker (host:port)",
            ["broker"],
            registry=r,
        )
        self.db_errors = Counter(
            "millrace_ingest_db_errors", "database errors by kind", ["kind"], registry=r
        )
        self.alerts = Counter("millrace_ingest_alerts_published", "alert messages", registry=r)
        self.receipts = Counter(
            "millrace_ingest_receipts_published", "receipt messages sent to devices", registry=r
        )
        self.receipt_seconds = Counter(
            "millrace_ingest_receipt_seconds",
            "committer time spent reading the ledger and publishing receipts",
            registry=r,
        )
        self.last_commit = Gauge(
            "millrace_ingest_last_commit_timestamp_seconds",
            "wall time of the last commit",
            registry=r,
        )
        # The rollups' second stage (rollup_drain.py): how far rollups trail the readings.
        self.rollup_pending = Gauge(
            "millrace_ingest_rollup_pending_rows",
            "hourly partials committed, not yet merged into the rollups",
            registry=r,
        )
        self.rollup_drain_seconds = Histogram(
            "millrace_ingest_rollup_drain_seconds", "one drain of rollup_pending", registry=r
        )
        self.rollup_lag_seconds = Gauge(
            "millrace_ingest_rollup_lag_seconds",
            "age of the oldest partial the last drain merged",
            registry=r,
        )


@dataclass(frozen=True, slots=True)
class Health:
    """What /healthz reports."""

    ok: bool
    db: bool
    broker: bool
    loop_age_s: float
    detail: str = ""


class HealthServer:
    """A tiny threaded HTTP server: GET /metrics and GET /healthz."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Callable[[], Health],
        *,
        host: str,
        port: int,
    ) -> None:

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    body = generate_latest(registry)
                    self._reply(200, CONTENT_TYPE_LATEST, body)
                elif self.path.split("?")[0] == "/healthz":
                    state = health()
                    body = json.dumps(
                        {
                            "ok": state.ok,
                            "db": state.db,
                            "broker": state.broker,
                            "loop_age_s": round(state.loop_age_s, 3),
                            "detail": state.detail,
                        }
                    ).encode()
                    self._reply(200 if state.ok else 503, "application/json", body)
                else:
                    self._reply(404, "text/plain", b"not found\n")

            def _reply(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("http: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="millrace-ingest-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s:%s/metrics", *self._server.server_address[:2])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def loop_health(*, db: bool, broker: bool, last_turn_mono: float) -> Health:
    """Health from the worker's state (pure, for tests)."""
    age = time.monotonic() - last_turn_mono
    problems = [
        what
        for what, bad in (
            ("database unreachable", not db),
            ("broker not connected", not broker),
            (f"main loop stalled {age:.0f} s", age > LOOP_STALL_SECONDS),
        )
        if bad
    ]
    return Health(not problems, db, broker, age, "; ".join(problems))
