"""The Sparkplug host's /metrics and /healthz, scraped over loopback from a running host on
the real broker and database (and on a database that is down)."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
import uuid

import pytest

from millrace.cloud.config import HttpSettings
from millrace.cloud.sparkplug.config import SparkplugConfig
from tests.cloud.ingest_support import IngestDb, ingest_db, wait_for  # noqa: F401
from tests.cloud.test_sparkplug_brokers import Node, birth, data
from tests.cloud.test_sparkplug_e2e import WAIT_S, aligned_past_s, host_config, running_host
from tests.fixtures.fix_broker import MosquittoServer, PKIFixture, free_port

pytestmark = pytest.mark.integration


def with_http(config: SparkplugConfig) -> SparkplugConfig:
    return dataclasses.replace(config, http=HttpSettings(host="127.0.0.1", port=free_port()))


def scrape(config: SparkplugConfig) -> dict[str, float]:
    url = f"http://127.0.0.1:{config.http.port}/metrics"
    with urllib.request.urlopen(url, timeout=WAIT_S) as reply:
        text = reply.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("millrace_sparkplug_")
    }


def healthz(config: SparkplugConfig) -> tuple[int, dict[str, object]]:
    url = f"http://127.0.0.1:{config.http.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=WAIT_S) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_metrics_count_messages_duplicates_refusals_rebirths_and_health_follows_the_database(
    broker: MosquittoServer,
    test_pki: PKIFixture,
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    name = f"spx-{uuid.uuid4().hex[:6]}"
    test_pki.issue(name)
    config = with_http(host_config(broker, test_pki, ingest_db.ingest_dsn))
    t = aligned_past_s(60)
    with running_host(config) as host:
        node = Node(broker, name)
        try:
            node.send("NBIRTH", birth(0))
            node.send("NDATA", data(1, 2.0, t))
            node.send("NDATA", data(1, 2.0, t))  # a redelivery
            node.send("NDATA", data(5, 3.0, t + 1))  # a gap
            assert node.ncmds.get(timeout=WAIT_S) == ["Node Control/Rebirth"]
        finally:
            node.close()
        wait_for(lambda: host.counters.transactions >= 1 and host.pending == 0, what="stored")
        got = scrape(config)
        endpoint = f"{broker.host}:{broker.port}"
        assert got["millrace_sparkplug_messages_total"] == 4
        assert got["millrace_sparkplug_duplicates_total"] == 1
        assert got['millrace_sparkplug_refused_total{code="seq_gap"}'] == 1
        assert got["millrace_sparkplug_rebirths_asked_total"] == 1
        assert got["millrace_sparkplug_batches_total"] >= 1
        assert got["millrace_sparkplug_db_up"] == 1
        assert got[f'millrace_sparkplug_broker_connected{{broker="{endpoint}"}}'] == 1
        code, state = healthz(config)
        assert (code, state["ok"], state["db"], state["broker"]) == (200, True, True, True)

    down = with_http(dataclasses.replace(config, dsn="postgresql://nobody@127.0.0.1:1/none"))
    with running_host(down):
        wait_for(lambda: healthz(down)[0] == 503, what="503 while the database is down")
        state = healthz(down)[1]
        assert state["db"] is False and state["broker"] is True, state
        assert scrape(down)["millrace_sparkplug_db_up"] == 0
