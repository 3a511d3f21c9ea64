"""The ingest config examples in docs/cloud.md (and retention.md) load with the real loader.

Every ```toml block is written to a file, the files it names are created (absolute
paths under a temporary root), and `millrace.cloud.config.load_config` reads it, so
a renamed key, a wrong range or a stale comment about defaults fails here.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from millrace.cloud import config as ingest_config
from millrace.cloud.config import IngestConfig, load_config
from millrace.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs"
TOML_BLOCK = re.compile(r"^```toml\n(.*?)^```$", re.M | re.S)
FILE_KEYS = frozenset({"ca", "cert", "key", "dsn_file"})
# What a fragment (a block with only some tables) is completed with.
BASE_CONFIG = """
[database]
dsn = "postgresql://ingest1@db.plant.example/millrace"

[broker]
host = "broker.plant.example"
ca = "ca.crt"
cert = "ingest-1.crt"
key = "ingest-1.key"
client_id = "ingest-1"
"""


def toml_blocks(page: str) -> list[str]:
    return TOML_BLOCK.findall((DOCS / page).read_text())


def _file_values(data: Mapping[str, Any]) -> Iterator[str]:
    for key, value in data.items():
        if isinstance(value, Mapping):
            yield from _file_values(value)
        elif key in FILE_KEYS and isinstance(value, str):
            yield value


def materialize(block: str, root: Path) -> Path:
    """Write `block` as root/ingest.toml with every file it names present; returns the path."""
    text = block
    if "[database]" not in text:
        text = BASE_CONFIG + "\n" + text
    for name in set(_file_values(tomllib.loads(text))):
        target = root / name.lstrip("/")
        if name.startswith("/"):
            text = text.replace(f'"{name}"', f'"{target}"')
        target.parent.mkdir(parents=True, exist_ok=True)
        content = "postgresql://ingest1@db.plant.example/millrace\n" if "dsn" in name else "x\n"
        target.write_text(content)
    for name in ("ca.crt", "ingest-1.crt", "ingest-1.key"):
        (root / name).write_text("x\n")
    path = root / "ingest.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("page", "index"),
    [(page, i) for page in ("cloud.md", "retention.md") for i in range(len(toml_blocks(page)))],
)
def test_every_ingest_config_example_in_the_docs_loads(
    page: str, index: int, tmp_path: Path
) -> None:
    config = load_config(materialize(toml_blocks(page)[index], tmp_path))
    assert isinstance(config, IngestConfig)


def test_cloud_md_worker_example_has_a_retention_dsn_file_and_shows_the_defaults(
    tmp_path: Path,
) -> None:
    (example,) = toml_blocks("cloud.md")
    shown = load_config(materialize(example, tmp_path))
    defaults = load_config(materialize(BASE_CONFIG, tmp_path / "defaults"))
    assert shown.retention.dsn is not None, "the [retention] example must show dsn_file"
    assert shown.batch == defaults.batch
    assert shown.validation == defaults.validation
    assert shown.http == defaults.http
    assert shown.limits == defaults.limits
    assert (shown.stale_after_s, shown.alert_refresh_s, shown.no_data_check_s) == (
        defaults.stale_after_s,
        defaults.alert_refresh_s,
        defaults.no_data_check_s,
    )
    assert (shown.retention.enabled, shown.retention.interval_s, shown.retention.days) == (
        defaults.retention.enabled,
        defaults.retention.interval_s,
        defaults.retention.days,
    )
    for field in ("session_expiry_s", "receive_maximum", "keepalive_s"):
        assert getattr(shown.broker, field) == getattr(defaults.broker, field), field


def test_cloud_md_share_group_is_described_as_the_loader_derives_it(tmp_path: Path) -> None:
    text = (DOCS / "cloud.md").read_text()
    assert 'share_group = "ingest"' not in text
    (example,) = toml_blocks("cloud.md")
    shown = tomllib.loads(example)["broker"]["share_group"]
    derived = load_config(materialize(BASE_CONFIG, tmp_path)).broker.share_group
    assert re.fullmatch(r"ingest-[0-9a-f]{16}", shown) and re.fullmatch(
        r"ingest-[0-9a-f]{16}", derived
    )
    assert ingest_config.SHARE_GROUP_HASH_CHARS == 16
    assert "16 hex digits of the" in text and "CA certificate's SHA-256" in text


def test_cloud_md_quotes_the_real_config_error(tmp_path: Path) -> None:
    quoted = re.search(r"Errors name the key \(`([^`]+)`\)", (DOCS / "cloud.md").read_text())
    assert quoted, "docs/cloud.md no longer quotes a config error"
    path = materialize(BASE_CONFIG + "\n[batch]\nmax_rows = 0\n", tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).replace(str(path), "ingest.toml") == quoted.group(1)


def test_cloud_md_says_readings_ts_is_the_window_start() -> None:
    text = (DOCS / "cloud.md").read_text()
    assert "`ts` is the window's **start**" in text
