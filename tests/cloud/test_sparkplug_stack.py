"""`millrace up`'s Sparkplug host config (millrace/ops/stack/sparkplug.py) read by the
host's real loader: every broker of the plant, the service identity as host id."""

from __future__ import annotations

from pathlib import Path

from millrace.cloud.sparkplug.config import load_config
from millrace.ops.stack.sparkplug import SERVICE_ID, config_toml
from tests.fixtures.fix_broker import PKIFixture


def test_up_writes_a_sparkplug_config_the_loader_accepts_with_every_broker(
    test_pki: PKIFixture, tmp_path: Path
) -> None:
    cert, key = test_pki.issue(SERVICE_ID, role="service")
    dsn_file = tmp_path / "ingest.dsn"
    dsn_file.write_text("postgresql://ingest@localhost:15432/millrace\n")
    path = tmp_path / "sparkplug.toml"
    path.write_text(
        config_toml(
            dsn_file=dsn_file,
            brokers=["localhost:18883", "localhost:18884"],
            ca=test_pki.ca,
            cert=cert,
            key=key,
            period_s=2,
        )
    )
    config = load_config(path)
    assert config.broker.endpoints == (("localhost", 18883), ("localhost", 18884))
    assert config.host_id == SERVICE_ID and config.broker.cert == cert
    assert config.dsn == "postgresql://ingest@localhost:15432/millrace"
    assert config.periods_s == (2,) and config.groups == ()
    assert config.http.port == 0  # up reserves no port for it
