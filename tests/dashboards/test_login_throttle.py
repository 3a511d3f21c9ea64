"""Hostile logins against the real login handler: parallel guesses, name flooding,
many sources. scrypt is wrapped to count (and, for the race, hold) the hashes it runs.

`auth._try_login` is what the sign-in form calls; outside a Streamlit run its
st.error messages are dropped, so the count of hashes is what the tests read.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from millrace.dashboards import auth, users
from millrace.dashboards.config import load_config
from millrace.dashboards.throttle import (
    MAX_FAILURES_PER_SOURCE,
    MAX_FAILURES_PER_USER,
    LoginThrottle,
)
from millrace.dashboards.users import add_user
from tests.dashboards.conftest import write_config

PARALLEL_ATTEMPTS = 40
FLOOD_NAMES = 10_000
# A deadlock guard only: the test does not measure time.
GATE_TIMEOUT_S = 120.0


class CountingScrypt:
    """Counts scrypt runs; with `hold`, each waits until `release()` (to force a race)."""

    def __init__(self, real: Callable[..., bytes], *, hold: bool) -> None:
        self.real = real
        self.calls = 0
        self.lock = threading.Lock()
        self.entered = threading.Condition(self.lock)
        self.gate = threading.Event()
        if not hold:
            self.gate.set()

    def __call__(self, password: str, salt: bytes, **cost: int) -> bytes:
        with self.lock:
            self.calls += 1
            self.entered.notify_all()
        assert self.gate.wait(GATE_TIMEOUT_S), "scrypt gate never opened"
        return self.real(password, salt, **cost)


@pytest.fixture
def tess(tmp_path: Path) -> Iterator[Path]:
    """A config whose users file holds one operator, tess."""
    users_file = tmp_path / "users.toml"
    add_user(users_file, "tess", role="operator", password="tess-right-pw")
    yield write_config(tmp_path, dsn="postgresql://unused@127.0.0.1:1/none", users=users_file)


def _scrypt(monkeypatch: pytest.MonkeyPatch, *, hold: bool) -> CountingScrypt:
    counter = CountingScrypt(users._scrypt, hold=hold)
    monkeypatch.setattr(users, "_scrypt", counter)
    return counter


@pytest.mark.security
def test_parallel_guesses_for_one_user_hash_at_most_the_limit(
    tess: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(tess)
    scrypt = _scrypt(monkeypatch, hold=True)
    finished = 0

    def guess() -> None:
        nonlocal finished
        try:
            auth._try_login(config, "tess", "wrong-guess")
        finally:
            with scrypt.lock:
                finished += 1
                scrypt.entered.notify_all()

    threads = [threading.Thread(target=guess) for _ in range(PARALLEL_ATTEMPTS)]
    for thread in threads:
        thread.start()
    # Hold every hash until each attempt is either hashing or has been turned away, so
    # all 40 race past the check together, as 40 browser tabs would.
    with scrypt.lock:
        settled = scrypt.entered.wait_for(
            lambda: scrypt.calls + finished >= PARALLEL_ATTEMPTS, timeout=GATE_TIMEOUT_S
        )
    scrypt.gate.set()
    for thread in threads:
        thread.join()
    assert settled
    assert finished == PARALLEL_ATTEMPTS
    assert scrypt.calls <= MAX_FAILURES_PER_USER, f"{scrypt.calls} of 40 guesses were hashed"
    # Still locked afterwards: the right password is not even hashed.
    before = scrypt.calls
    auth._try_login(config, "tess", "tess-right-pw")
    assert scrypt.calls == before


@pytest.mark.security
def test_flooding_distinct_names_does_not_unlock_a_locked_user(
    tess: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(tess)
    # Each flood attempt from its own address, so only the name table is under test.
    sources = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in itertools.count())
    monkeypatch.setattr(auth, "client_source", lambda _settings: next(sources), raising=False)
    scrypt = _scrypt(monkeypatch, hold=False)
    for _ in range(MAX_FAILURES_PER_USER):
        auth._try_login(config, "tess", "wrong-guess")
    assert scrypt.calls == MAX_FAILURES_PER_USER
    # Flooding is cheap for the attacker; make it cheap for the test too.
    monkeypatch.setattr(users, "_scrypt", lambda password, salt, **cost: b"\x01" * cost["dklen"])
    for i in range(FLOOD_NAMES):
        auth._try_login(config, f"flood{i}", "wrong-guess")
    scrypt = _scrypt(monkeypatch, hold=False)
    auth._try_login(config, "tess", "tess-right-pw")
    assert scrypt.calls == 0, "tess was unlocked by the flood: her password was checked"


@pytest.mark.security
def test_one_source_cannot_spread_guesses_over_many_names(
    tess: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(tess)
    monkeypatch.setattr(auth, "client_source", lambda _settings: "192.0.2.7", raising=False)
    counting = _scrypt(monkeypatch, hold=False)
    for i in range(MAX_FAILURES_PER_SOURCE * 3):
        auth._try_login(config, f"guess{i}", "wrong-guess")
    assert counting.calls == MAX_FAILURES_PER_SOURCE
    # Another address is not affected.
    monkeypatch.setattr(auth, "client_source", lambda _settings: "198.51.100.9", raising=False)
    auth._try_login(config, "guess0", "wrong-guess")
    assert counting.calls == MAX_FAILURES_PER_SOURCE + 1


# -- the throttle alone (no hashing), with a manual clock


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.security
def test_throttle_keeps_locked_entries_and_bounds_the_table() -> None:
    clock = Clock()
    throttle = LoginThrottle(per_user=2, per_source=1000, window_s=60, max_keys=10, clock=clock)
    for _ in range(2):
        slot = throttle.reserve("victim", "s")
        assert slot is not None
        slot.failed()
    assert throttle.reserve("victim", "s") is None
    for i in range(100):
        slot = throttle.reserve(f"n{i}", f"s{i}")
        assert slot is not None
        slot.failed()
    assert throttle.tracked()[0] <= 10
    assert throttle.reserve("victim", "other") is None  # still locked
    clock.now += 61
    assert throttle.reserve("victim", "other") is not None  # expired: free again


@pytest.mark.security
def test_throttle_fails_closed_when_every_tracked_name_is_locked() -> None:
    throttle = LoginThrottle(per_user=1, per_source=1000, window_s=60, max_keys=3, clock=Clock())
    for name in ("a", "b", "c"):
        slot = throttle.reserve(name, "s")
        assert slot is not None
        slot.failed()
    assert throttle.reserve("d", "s") is None
    assert throttle.tracked()[0] == 3


@pytest.mark.security
def test_throttle_counts_attempts_in_flight_and_success_clears_the_user() -> None:
    throttle = LoginThrottle(per_user=2, per_source=1000, window_s=60, max_keys=10, clock=Clock())
    first, second = throttle.reserve("u", "s"), throttle.reserve("u", "s")
    assert first is not None and second is not None
    assert throttle.reserve("u", "s") is None  # two in flight fill the limit
    first.succeeded()
    second.failed()
    second.failed()  # a slot reports once
    third = throttle.reserve("u", "s")
    assert third is not None
    assert throttle.reserve("u", "s") is None  # one failure + one in flight
