"""The gateway identities of bench/scale.py: one certificate each, issued once and cached.

Issuing goes through the project's CA code (`millrace.ops.pki.issue_many`, one lock
and one index append per chunk), and signing 10,000 identities still takes a while: they are kept
outside the checkout (default /var/cache/millrace/bench-scale/pki, or
MILLRACE_BENCH_SCALE_CACHE) and later runs only add what is missing. The CRL is
renewed when it runs short, since an expired CRL makes the broker refuse everyone.

Run alone to fill the cache ahead of a run: python bench/scale_pki.py 20000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Final

from millrace.ops import pki

CACHE_ENV: Final = "MILLRACE_BENCH_SCALE_CACHE"
DEFAULT_CACHE: Final = Path("/var/cache/millrace/bench-scale")
INGEST_IDS: Final = ("bench-ingest",)  # bench/common.py's worker identity
PROGRESS_EVERY: Final = 1000


def cache_dir() -> Path:
    """Where the cached PKI lives (MILLRACE_BENCH_SCALE_CACHE overrides the default)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def gateway_ids(count: int) -> list[str]:
    """The first `count` gateway ids; a step of N uses the first N, so caches grow."""
    return [f"gw-{i:05d}" for i in range(1, count + 1)]


def ensure_pki(pki_dir: Path, gateways: int) -> pki.PKIPaths:
    """A CA in `pki_dir` holding `gateways` device and the worker identities (adds the missing)."""
    paths = pki.pki_paths(pki_dir)
    if not paths.ca_cert.exists():
        pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pki.init_pki(pki_dir)
    have = {r.ident for r in pki.issued_records(pki_dir) if not r.revoked}
    for ident in INGEST_IDS:
        if ident not in have:
            pki.issue(pki_dir, ident, role="service")
    missing = [g for g in gateway_ids(gateways) if g not in have]
    started = time.monotonic()
    for first in range(0, len(missing), PROGRESS_EVERY):
        chunk = missing[first : first + PROGRESS_EVERY]
        pki.issue_many(pki_dir, chunk)
        elapsed = time.monotonic() - started
        done = first + len(chunk)
        print(f"issued {done}/{len(missing)} gateway certificates ({elapsed:.0f} s)", flush=True)
    pki.renew_crl_if_below(pki_dir)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gateways", type=int)
    args = parser.parse_args()
    ensure_pki(cache_dir() / "pki", args.gateways)
    return 0


if __name__ == "__main__":
    sys.exit(main())
