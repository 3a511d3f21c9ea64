"""The host's Prometheus metrics and /healthz, served by the ingest worker's HealthServer.

The numbers are read from the host's own `Counters` at scrape time (one source of truth,
nothing counted twice); all are prefixed millrace_sparkplug_.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from millrace.cloud.ingest.metrics import Health, HealthServer, loop_health

if TYPE_CHECKING:
    from millrace.cloud.config import HttpSettings
    from millrace.cloud.sparkplug.host import Host


class HostCollector(Collector):
    """Counters and gauges of one host, read when scraped."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def collect(self) -> Iterator[Metric]:
        h, c = self.host, self.host.counters
        p = "millrace_sparkplug_"
        for name, doc, value in (
            ("messages", "Sparkplug messages judged", c.messages),
            ("duplicates", "redeliveries dropped (the seq just accepted)", c.duplicates),
            ("rebirths_asked", "NCMD Node Control/Rebirth published", c.rebirths_asked),
            ("batches", "millrace batches built from closed windows and events", c.batches),
            ("transactions", "store transactions committed", c.transactions),
            ("dropped", "data messages dropped unjudged past max_pending", c.dropped),
        ):
            yield CounterMetricFamily(p + name, doc, value=value)
        refused = CounterMetricFamily(
            p + "refused", "messages dead-lettered, by code", labels=["code"]
        )
        for code, count in sorted(dict(c.refused).items()):
            refused.add_metric([code], count)
        yield refused
        yield GaugeMetricFamily(
            p + "db_up", "1 while the last store reached the database", value=int(h.db_up)
        )
        yield GaugeMetricFamily(
            p + "pending", "items held until the next stored transaction", value=h.pending
        )
        connected = GaugeMetricFamily(
            p + "broker_connected", "1 while subscribed to this broker", labels=["broker"]
        )
        online = h.online_brokers()
        for i, (host, port) in enumerate(h.brokers):
            connected.add_metric([f"{host}:{port}"], int(i in online))
        yield connected


def health(host: Host) -> Health:
    """Healthy while the database is reachable, some broker is connected and the loop turns."""
    return loop_health(
        db=host.db_up, broker=bool(host.online_brokers()), last_turn_mono=host.last_turn_mono
    )


def serve(host: Host, http: HttpSettings) -> HealthServer:
    """Start /metrics and /healthz for `host` on `http` (the caller skips port 0: off)."""
    registry = CollectorRegistry()
    registry.register(HostCollector(host))
    server = HealthServer(registry, lambda: health(host), host=http.host, port=http.port)
    server.start()
    return server
