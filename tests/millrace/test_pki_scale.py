"""The CA at fleet scale: issuing costs the same however many certificates exist.

Work is counted, not timed: the bytes this process writes (`wchar` in
/proc/self/io) per certificate, on a fresh index and on one of thousands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from millrace.errors import PKIError
from millrace.ops import pki

GROWN = 5000  # records in the grown index: the old code rewrote ~1 MB per certificate there
PER_STEP = 5


def _written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def _bytes_per_issue(pki_dir: Path, prefix: str) -> float:
    before = _written_bytes()
    for n in range(PER_STEP):
        pki.issue(pki_dir, f"{prefix}-{n:05d}")
    return (_written_bytes() - before) / PER_STEP


def _legacy_index(pki_dir: Path, certs: list[dict[str, object]]) -> None:
    """An index.json exactly as the old code wrote it (whole document, indent 2)."""
    index = json.loads((pki_dir / "index.json").read_text())
    index["certs"] = index["certs"] + certs
    (pki_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")


def _fake_records(count: int) -> list[dict[str, object]]:
    return [
        {
            "id": f"old-{n:05d}",
            "role": "device",
            "serial": format(0x10_0000_0000 + n, "x"),
            "not_after": "2030-01-01T00:00:00+00:00",
            "revoked_at": None,
        }
        for n in range(count)
    ]


def test_issuing_writes_the_same_bytes_on_a_fresh_and_a_grown_index(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    fresh = _bytes_per_issue(tmp_path, "new")
    _legacy_index(tmp_path, _fake_records(GROWN))
    grown = _bytes_per_issue(tmp_path, "late")
    index_size = (tmp_path / "index.json").stat().st_size
    assert index_size > 500_000, "the grown index is large enough to show a rewrite"
    # Certificates and signatures vary by a few bytes; a rewrite would add ~index_size.
    assert grown - fresh < 200, (fresh, grown, index_size)
    assert len(pki.issued_records(tmp_path)) == 2 * PER_STEP + GROWN


def test_an_old_index_json_keeps_working_for_issue_revoke_list_and_crl(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    pki.issue(tmp_path, "dev-old")
    pki.revoke(tmp_path, "dev-old")
    pki.issue(tmp_path, "dev-kept")
    # The old writer's layout, with `certs` first as a hand-edited index may have it.
    index = json.loads((tmp_path / "index.json").read_text())
    reordered = {"certs": index["certs"], "crl_number": index["crl_number"]}
    (tmp_path / "index.json").write_text(json.dumps(reordered, indent=2) + "\n")

    pki.issue(tmp_path, "dev-new")
    pki.issue(tmp_path, "svc-new", role="service")
    revoked = pki.revoke(tmp_path, "dev-kept")

    records = pki.issued_records(tmp_path)
    assert [r.ident for r in records] == ["dev-old", "dev-kept", "dev-new", "svc-new"]
    assert [r.revoked for r in records] == [True, True, False, False]
    assert pki.service_ids(tmp_path) == ["svc-new"]
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert {c.serial_number for c in crl} == {records[0].serial, *revoked}
    index = json.loads((tmp_path / "index.json").read_text())
    assert list(index) == ["crl_number", "certs"], "rewritten once with certs last"
    assert index["crl_number"] == 3


def test_an_append_torn_by_a_crash_is_read_around_and_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki.init_pki(tmp_path)
    pki.issue(tmp_path, "dev-a")
    whole = (tmp_path / "index.json").read_bytes()
    real_pwrite = os.pwrite
    calls: list[int] = []

    def torn(fd: int, data: bytes, offset: int) -> int:
        calls.append(len(data))
        if len(calls) == 1:  # the undo record is armed (and synced) first
            return real_pwrite(fd, data, offset)
        real_pwrite(fd, data[: len(data) // 2], offset)  # then the index: half of it
        raise OSError("power lost")

    monkeypatch.setattr(pki.os, "pwrite", torn)
    with pytest.raises(OSError, match="power lost"):
        pki.issue(tmp_path, "dev-b")
    monkeypatch.undo()
    with pytest.raises(ValueError):
        json.loads((tmp_path / "index.json").read_bytes())  # really torn on disk

    assert [r.ident for r in pki.issued_records(tmp_path)] == ["dev-a"], "readers read around"
    pki.issue(tmp_path, "dev-b")  # the next writer rolls back first; dev-b was never recorded
    assert [r.ident for r in pki.issued_records(tmp_path)] == ["dev-a", "dev-b"]
    after = json.loads((tmp_path / "index.json").read_bytes())
    assert after["certs"][:1] == json.loads(whole)["certs"], "dev-a's record is untouched"
    assert (tmp_path / ".index.undo").read_bytes() == b"", "disarmed"


def test_issue_many_checks_every_id_before_writing_any(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    pki.issue(tmp_path, "dev-2")
    with pytest.raises(PKIError, match="'dev-2' already has a valid certificate"):
        pki.issue_many(tmp_path, ["dev-1", "dev-2", "dev-3"])
    with pytest.raises(PKIError, match="'dev-1' is given more than once"):
        pki.issue_many(tmp_path, ["dev-1", "dev-3", "dev-1"])
    assert [r.ident for r in pki.issued_records(tmp_path)] == ["dev-2"]
    assert not (tmp_path / "issued" / "dev-1.key").exists()

    issued = pki.issue_many(tmp_path, ["dev-1", "dev-3"])
    assert [p.cert.name for p in issued] == ["dev-1.crt", "dev-3.crt"]
    assert all(os.stat(p.key).st_mode & 0o777 == 0o600 for p in issued)


_ISSUE_LOOP = """
import sys
from millrace.ops import pki
for n in range(int(sys.argv[3])):
    pki.issue(sys.argv[1], f"{sys.argv[2]}-{n:03d}")
"""


def test_concurrent_issuers_are_serialized_into_one_whole_index(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    count = 15
    procs = [
        subprocess.Popen([sys.executable, "-c", _ISSUE_LOOP, str(tmp_path), name, str(count)])
        for name in ("left", "right")
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    index = json.loads((tmp_path / "index.json").read_text())
    ids = sorted(e["id"] for e in index["certs"])
    expected = sorted(f"{name}-{n:03d}" for name in ("left", "right") for n in range(count))
    assert ids == expected


def test_cli_issues_several_ids_in_one_run(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    command = ["pki", "issue", "--pki", str(tmp_path), "--no-broker-sync", "gw-1", "gw-2", "gw-3"]
    result = subprocess.run(
        [sys.executable, "-m", "millrace.cli", *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [Path(line).name for line in lines[:6]] == [
        f"gw-{n}.{ext}" for n in (1, 2, 3) for ext in ("crt", "key")
    ]
    assert sum("broker: not updated" in line for line in lines) == 1, "one broker sync"
    assert [r.ident for r in pki.issued_records(tmp_path)] == ["gw-1", "gw-2", "gw-3"]


def test_an_undo_record_torn_while_arming_leaves_the_index_as_it_was(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    pki.issue(tmp_path, "dev-a")
    before = (tmp_path / "index.json").read_bytes()
    (tmp_path / ".index.undo").write_bytes(b'{"offset": 12, "tail": "5d0a7d')  # cut short
    assert [r.ident for r in pki.issued_records(tmp_path)] == ["dev-a"]
    pki.issue(tmp_path, "dev-b")
    assert (tmp_path / "index.json").read_bytes().startswith(before[: before.rindex(b"}\n  ]")])
    assert [r.ident for r in pki.issued_records(tmp_path)] == ["dev-a", "dev-b"]
