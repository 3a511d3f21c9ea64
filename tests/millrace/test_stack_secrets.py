"""Secrets the local plant writes are private from their first instant (docs/security.md)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from millrace.ops.stack import postgres
from millrace.ops.stack.postgres import PostgresCluster

WIDE_UMASK = 0o022
# A stand-in initdb: records the mode its --pwfile has while initdb reads it, makes a datadir.
FAKE_INITDB = """#!/bin/sh
for arg in "$@"; do
  case "$arg" in --pwfile=*) stat -c %a "${arg#--pwfile=}" > "$PWD/pwfile-mode" ;; esac
done
mkdir -p "$2"
"""


@pytest.fixture
def wide_umask() -> Iterator[None]:
    old = os.umask(WIDE_UMASK)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def fake_bindir() -> Iterator[Path]:
    # Under /tmp, not tmp_path: as root the `postgres` user runs initdb and must reach it.
    base = Path(tempfile.mkdtemp(prefix="millrace-secrets-"))
    os.chmod(base, 0o755)
    initdb = base / "bin" / "initdb"
    initdb.parent.mkdir()
    initdb.write_text(FAKE_INITDB)
    initdb.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_initdb_password_file_is_0600_under_umask_022(
    fake_bindir: Path, wide_umask: None, tmp_path: Path
) -> None:
    """The superuser password copy initdb reads was 0644 under umask 022 (shutil.copyfile)."""
    password = tmp_path / "postgres-password"
    password.write_text("s3cret\n")
    cluster = PostgresCluster(
        fake_bindir / "cluster", bindir=fake_bindir / "bin", password_file=password
    )
    cluster.init()
    recorded = (cluster.base_dir / "pwfile-mode").read_text().strip()
    assert recorded == "600", f"initdb saw the password file with mode {recorded}"
    assert not (cluster.base_dir / postgres.INITDB_PASSWORD_FILE).exists()


def test_private_write_creates_with_mode_not_chmod(
    tmp_path: Path, wide_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is born 0600 by os.open(O_CREAT | O_EXCL, 0o600); no chmod widens or narrows it."""
    calls: list[tuple[int, int]] = []
    real_open = os.open

    def spy_open(path: object, flags: int, mode: int = 0o777, **kw: object) -> int:
        calls.append((flags, mode))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(postgres.os, "open", spy_open)
    target = tmp_path / "secret"
    postgres._write_private(target, b"pw\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert calls and calls[0][0] & os.O_CREAT and calls[0][0] & os.O_EXCL
    assert calls[0][1] == 0o600
    assert target.read_bytes() == b"pw\n"


def test_plant_secrets_are_0600_under_umask_022(tmp_path: Path, wide_umask: None) -> None:
    """Generated passwords, pgpass and DSN files all go through pki.write_atomic(mode=0o600)."""
    from millrace.ops.stack import plant

    generated = tmp_path / "secrets" / "postgres-password"
    plant._secret(generated)
    plant._write_secret(tmp_path / "secrets" / "retention.dsn", "postgresql://x@h/db\n")
    for path in (generated, tmp_path / "secrets" / "retention.dsn"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
