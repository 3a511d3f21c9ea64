"""`millrace up` keeps the CRL from lapsing: renewed at start and while the plant runs.

An expired CRL makes mosquitto refuse every client (test_broker_acl), so a plant left
running for a month, or restarted after one, would lock itself out. These tests drive the
real Plant steps (certificates, then the broker from `millrace broker config`) with a CRL
signed to end two days from now.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from millrace.ops import pki
from millrace.ops.stack.plant import Plant, PlantOptions
from tests.fixtures.fix_broker import free_port
from tests.millrace.test_broker_acl import attempt, client_context, write_expired_crl

pytestmark = pytest.mark.integration

SHORT_CRL_DAYS = 2
# Bounds on waiting for mosquitto to act on SIGHUP; not a performance assertion.
RELOAD_WAIT_SECONDS = 15.0


def _plant(root: Path) -> Plant:
    return Plant(PlantOptions(root=root, devices=1, broker_port=free_port()))


def _wait_for(plant: Plant, context: object, want_accepted: bool) -> str:
    """Probe the plant broker until it accepts (or refuses) `context`; the last outcome."""
    server = SimpleNamespace(host="localhost", port=plant.options.broker_port)
    deadline = time.monotonic() + RELOAD_WAIT_SECONDS
    while True:
        outcome = attempt(server, context)  # type: ignore[arg-type]
        if (outcome == "accepted") == want_accepted or time.monotonic() > deadline:
            return outcome
        time.sleep(0.1)


def _crl_running_short(pki_dir: Path) -> None:
    pki.renew_crl(pki_dir, days=SHORT_CRL_DAYS)
    assert pki.crl_days_left(pki_dir) < SHORT_CRL_DAYS


def test_plant_whose_crl_is_two_days_from_expiry_comes_up_with_it_renewed(
    tmp_path: Path,
) -> None:
    plant = _plant(tmp_path / "plant")
    pki_dir = plant.layout.pki
    pki.init_pki(pki_dir)
    _crl_running_short(pki_dir)
    try:
        plant._identities()  # the "certificates" step of millrace up
        assert pki.crl_days_left(pki_dir) > pki.CRL_VALIDITY_DAYS - 1
        plant._start_brokers()
        context = client_context(pki.pki_paths(pki_dir).ca_cert, "gw0001", pki_dir)
        assert _wait_for(plant, context, want_accepted=True) == "accepted"
    finally:
        plant.stop()


def test_running_plant_renews_a_crl_running_short_and_the_broker_rereads_it(
    tmp_path: Path,
) -> None:
    plant = _plant(tmp_path / "plant")
    pki_dir = plant.layout.pki
    try:
        plant._identities()
        plant._start_brokers()
        context = client_context(pki.pki_paths(pki_dir).ca_cert, "gw0001", pki_dir)
        assert _wait_for(plant, context, want_accepted=True) == "accepted"
        assert plant.keep_crl_fresh() is False  # fresh: left alone, no reload

        # The plant ran for a month: its CRL lapsed and a reload made the broker see it.
        write_expired_crl(pki_dir)
        broker = next(s for s in plant.services if s.name == "broker")
        os.kill(broker.pid, signal.SIGHUP)
        assert _wait_for(plant, context, want_accepted=False).startswith("refused")

        assert plant.keep_crl_fresh() is True  # what the supervision loop runs hourly
        assert pki.crl_days_left(pki_dir) > pki.CRL_VALIDITY_DAYS - 1
        assert _wait_for(plant, context, want_accepted=True) == "accepted"
    finally:
        plant.stop()
