"""The fleet manifest: a JSON file saying which simulated device answers where.

The local stack and tests generate edge configs from it. It is written
atomically (temporary file + rename) when the fleet is up (status
"running") and again when it has stopped (status "stopped").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict[str, Any]:
    """Load a manifest written by `write_manifest`."""
    with path.open(encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data
