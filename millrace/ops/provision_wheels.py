"""Wheelhouses for a gateway platform: what a bundle installs with no package index.

`provision` downloads the dependency wheels for the bundle's target platform itself,
through pip's own configuration (index, proxy, certificates), and keeps them in a cache
outside the checkout (MILLRACE_WHEEL_CACHE, else /var/cache/millrace/wheels when it can
be written, else ~/.cache/millrace/wheels), so a second bundle needs no network.

A platform is what `uname -m` prints on the gateway. Debian 12 (and Raspberry Pi OS
bookworm) has glibc 2.36, so every manylinux tag from 2_17 (= manylinux2014) to 2_36 is
accepted: projects tag their wheels differently (cffi ships only manylinux2014/2_17,
cryptography 2_34, msgpack 2_28), and one `--platform` tag alone finds none of the others.
The gateway runs the same Python minor version as the provisioning environment.
"""

from __future__ import annotations

import logging
import os
import platform as _platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from millrace.errors import ConfigError, MillraceError

log = logging.getLogger(__name__)

# What `uname -m` prints on the gateways a bundle can be built for.
PLATFORMS = ("aarch64", "x86_64", "armv7l")
# glibc of Debian 12 bookworm: the newest manylinux a gateway can run.
GLIBC_MAX_MINOR = 36
MANYLINUX_MIN_MINOR = 17
CACHE_ENV = "MILLRACE_WHEEL_CACHE"
SYSTEM_CACHE = Path("/var/cache/millrace/wheels")
DOWNLOAD_TIMEOUT_SECONDS = 600
_NOT_FOUND = re.compile(r"No matching distribution found for (\S+)")


def this_platform() -> str:
    """The platform of this machine, as `uname -m` names it."""
    return _platform.machine()


def check_platform(machine: str) -> str:
    """`machine` if a bundle can be built for it, else a ConfigError naming the choices."""
    if machine not in PLATFORMS:
        raise ConfigError("--platform", f"{machine!r}: choose one of {', '.join(PLATFORMS)}")
    return machine


def platform_tags(machine: str) -> list[str]:
    """pip's --platform values for `machine`, newest glibc first."""
    check_platform(machine)
    many = [
        f"manylinux_2_{m}_{machine}" for m in range(GLIBC_MAX_MINOR, MANYLINUX_MIN_MINOR - 1, -1)
    ]
    return [*many, f"manylinux2014_{machine}", f"linux_{machine}"]


def _python() -> tuple[int, int]:
    return sys.version_info.major, sys.version_info.minor


def supported_tags(machine: str) -> frozenset[Any]:
    """Every wheel tag a CPython of this version on `machine` (glibc <= 2.36) installs."""
    from packaging import tags

    py = _python()
    interp = f"cp{py[0]}{py[1]}"
    plats = platform_tags(machine)
    found = [
        *tags.cpython_tags(py, abis=[interp, "abi3", "none"], platforms=plats),
        *tags.compatible_tags(py, interpreter=interp, platforms=plats),
    ]
    return frozenset(found)


def _parse_pin(pin: str) -> tuple[str, str]:
    from packaging.utils import canonicalize_name

    name, _, version = pin.partition("==")
    return canonicalize_name(name), version


def matching_wheels(pins: Iterable[str], machine: str, house: Path) -> dict[str, list[Path]]:
    """The wheels in `house` each pin installs from on `machine`; a pin may have none."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    wanted = {_parse_pin(pin): pin for pin in pins}
    supported = supported_tags(machine)
    found: dict[str, list[Path]] = {pin: [] for pin in wanted.values()}
    for wheel in sorted(house.glob("*.whl")) if house.is_dir() else []:
        try:
            name, version, _build, wheel_tags = parse_wheel_filename(wheel.name)
        except InvalidWheelFilename:
            continue
        pin = wanted.get((name, str(version)))
        if pin is not None and wheel_tags & supported:
            found[pin].append(wheel)
    return found


def cache_dir() -> Path:
    """Where downloaded wheels are kept between bundles (never inside the checkout)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    try:
        SYSTEM_CACHE.mkdir(parents=True, exist_ok=True)
        if os.access(SYSTEM_CACHE, os.W_OK):
            return SYSTEM_CACHE
    except OSError:
        pass
    return Path.home() / ".cache" / "millrace" / "wheels"


def _download(pins: list[str], machine: str, into: Path) -> None:
    """`pip download` the pins' wheels for `machine` into `into`, through pip's own config."""
    py = _python()
    cmd = [
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
        "--quiet", "--no-deps", "--only-binary", ":all:",
        "--implementation", "cp", "--python-version", f"{py[0]}.{py[1]}",
        "--abi", f"cp{py[0]}{py[1]}", "--abi", "abi3", "--abi", "none",
    ]  # fmt: skip
    for tag in platform_tags(machine):
        cmd += ["--platform", tag]
    result = subprocess.run(
        [*cmd, "--dest", str(into), *pins],
        capture_output=True,
        text=True,
        timeout=DOWNLOAD_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        found = _NOT_FOUND.search(result.stderr)
        which = found.group(1) if found else " ".join(pins)
        said = result.stderr.strip().splitlines() or ["pip download failed"]
        reason = "" if found else f" ({said[-1]})"
        raise MillraceError(
            f"no {machine} wheel of {which} on the package index{reason}: build it on "
            f"an {machine} machine ('pip wheel {which}') and pass --wheelhouse DIR"
        )


def build_wheelhouse(
    pins: Iterable[str], machine: str, out_dir: Path, *, cache: Path | None = None
) -> list[Path]:
    """Copy one wheel per pin for `machine` into `out_dir`, downloading what the cache lacks."""
    pins = sorted(pins)
    store = (cache or cache_dir()) / machine / "cp{}{}".format(*_python())
    store.mkdir(parents=True, exist_ok=True)
    missing = [pin for pin, found in matching_wheels(pins, machine, store).items() if not found]
    if missing:
        log.info("downloading %s wheels: %s", machine, " ".join(missing))
        with tempfile.TemporaryDirectory(prefix=".download-", dir=store) as tmp:
            _download(missing, machine, Path(tmp))
            for wheel in Path(tmp).glob("*.whl"):
                os.replace(wheel, store / wheel.name)  # whole files only: caches are shared
    found = matching_wheels(pins, machine, store)
    still = [pin for pin, wheels in found.items() if not wheels]
    if still:
        raise MillraceError(f"no {machine} wheels for {' '.join(still)} after downloading them")
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for pin in pins:
        wheel = found[pin][0]
        shutil.copyfile(wheel, out_dir / wheel.name)
        copied.append(out_dir / wheel.name)
    return copied


def select_wheelhouse(pins: Iterable[str], machine: str, house: Path, out_dir: Path) -> list[Path]:
    """Copy the wheels of a given wheelhouse for `machine` into `out_dir`, one set per pin.

    Every pin needs a wheel that installs on `machine`: a bundle that would need an index
    on the gateway is refused here, naming the pins.
    """
    if not house.is_dir():
        raise ConfigError("--wheelhouse", f"not a directory: {house}")
    found = matching_wheels(pins, machine, house)
    missing = sorted(pin for pin, wheels in found.items() if not wheels)
    if missing:
        raise ConfigError(
            "--wheelhouse",
            f"{house} has no {machine} wheel for {' '.join(missing)}: add them, or leave "
            "--wheelhouse out and provision downloads them",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for pin in sorted(found):
        for wheel in found[pin]:
            shutil.copyfile(wheel, out_dir / wheel.name)
            copied.append(out_dir / wheel.name)
    return copied


def prefetch(machines: Iterable[str]) -> None:
    """Fill the cache with the gateway's dependency wheels for `machines` (bootstrap).

    Machine set-up may use the package index; tests and bundles then find every wheel in
    the cache and ask no index (the test suite sets PIP_NO_INDEX to make sure).
    """
    from millrace.ops import provision  # provision imports this module

    # Both kinds of gateway: the plain edge closure and the one with OPC UA servers.
    pins = sorted(
        set(provision.edge_requirements()) | set(provision.gateway_requirements("[opcua.any]\n"))
    )
    for machine in machines:
        check_platform(machine)
        with tempfile.TemporaryDirectory() as tmp:
            build_wheelhouse(pins, machine, Path(tmp))


if __name__ == "__main__":  # python -m millrace.ops.provision_wheels x86_64 aarch64
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prefetch(sys.argv[1:] or [this_platform()])
