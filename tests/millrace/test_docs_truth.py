"""Docs, help texts and package metadata say what the code does (issue 15's stale texts)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _floor(requirement: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([0-9.]+)", requirement)
    assert match, requirement
    return tuple(int(p) for p in match.group(1).split("."))


def test_streamlit_floor_covers_st_login_st_user_and_chart_width() -> None:
    """st.user (not experimental) needs 1.45; st.altair_chart(width=...) 1.51."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (streamlit,) = [r for r in extras["optional-dependencies"]["dashboard"] if "streamlit" in r]
    floor = _floor(streamlit)
    assert floor >= (1, 51), streamlit
    installed = tuple(int(p) for p in version("streamlit").split(".")[:2])
    assert installed >= floor[:2], (installed, floor)


def test_provision_help_and_docs_agree_on_the_default_broker() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "millrace.cli", "provision", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": "400"},  # argparse wraps inside "non-loopback" otherwise
    )
    help_text = " ".join(done.stdout.split())
    rollout = (REPO / "docs" / "rollout.md").read_text()
    for words in ("first non-loopback name", "else localhost", "8883"):
        assert words in help_text, words
    row = next(line for line in rollout.splitlines() if line.startswith("| `--broker HOST"))
    for words in ("first non-loopback name", "else localhost", "8883"):
        assert words in row, words


def test_edge_docs_name_the_config_file_agent_toml() -> None:
    for path in (REPO / "docs" / "edge.md", REPO / "millrace" / "configfile.py"):
        text = path.read_text()
        assert "edge.toml" not in text, path
    assert "/etc/millrace/agent.toml: signals[3].scale" in (REPO / "docs" / "edge.md").read_text()


def test_dashboards_doc_does_not_say_nothing_writes_units() -> None:
    text = (REPO / "docs" / "dashboards.md").read_text()
    assert "nothing writes" not in text
    assert "birth" in text and "unit" in text.lower()


def test_install_skip_check_help_matches_when_the_check_runs() -> None:
    """The check runs after the switch to the new release (and rolls back on failure)."""
    script = (REPO / "millrace" / "ops" / "templates" / "bundle" / "install.sh").read_text()
    line = next(x for x in script.splitlines() if x.strip().startswith("--skip-check "))
    assert "before switching" not in line
    assert script.index('ln -sfn "releases/$release_id"') < script.index("edge check --config")
