"""Every playbook passes ansible-lint's production profile and ansible-playbook --syntax-check."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.ansible.rollout_support import ANSIBLE_DIR, VENV_BIN

pytestmark = pytest.mark.ansible

PLAYBOOKS = ("edge.yml", "cloud.yml", "site.yml")
LINT_TIMEOUT_SECONDS = 300


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "NO_COLOR": "1",
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return subprocess.run(
        cmd,
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=LINT_TIMEOUT_SECONDS,
        check=False,
    )


def test_every_playbook_passes_ansible_lint_production_profile() -> None:
    result = _run(
        str(VENV_BIN / "ansible-lint"), "--profile", "production", "--offline", *PLAYBOOKS
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in result.stderr + result.stdout


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_syntax_check_passes(playbook: str) -> None:
    inventory = str(ANSIBLE_DIR / "inventory" / "example" / "hosts.yml")
    result = _run(str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i", inventory, playbook)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"playbook: {playbook}" in result.stdout
