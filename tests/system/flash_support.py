"""Helpers for the system tier's gateway tests: device bundles for the test broker.

Imported by the test modules (fixtures included), not registered as a plugin.
"""

from __future__ import annotations

from pathlib import Path

from millrace.ops import provision
from tests.ansible.rollout_support import TEST_AGENT_TEMPLATE
from tests.fixtures.fix_broker import MosquittoServer, PKIFixture

# The rollout tests' agent config, with receipts awaited 5 s instead of 30-60 s before a
# batch is sent again, so a backlog drains within a test's patience.
GATEWAY_TEMPLATE = TEST_AGENT_TEMPLATE.replace(
    "reconnect_max_s = 2.0\n", "reconnect_max_s = 2.0\nreceipt_wait_s = 5.0\n"
)
assert GATEWAY_TEMPLATE != TEST_AGENT_TEMPLATE


def make_bundle(
    device: str,
    work: Path,
    *,
    test_pki: PKIFixture,
    broker: MosquittoServer,
    agent_wheel: Path,
    wheelhouse: Path,
    template: str = GATEWAY_TEMPLATE,
) -> provision.Bundle:
    """`millrace provision DEVICE` for the test broker (offline wheels), its role synced."""
    work.mkdir(parents=True, exist_ok=True)
    template_path = work / f"{device}.toml.tmpl"
    template_path.write_text(template)
    bundle = provision.build_bundle(
        device,
        pki_dir=test_pki.dir,
        out=work / f"{device}.tar.gz",
        config_template=template_path,
        broker_host=broker.host,
        broker_port=broker.port,
        wheel=agent_wheel,
        wheelhouse=wheelhouse,
    )
    broker.sync()  # the new identity's broker role, as `millrace broker sync` does
    return bundle
