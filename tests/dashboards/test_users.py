"""Local accounts: scrypt hashes, the users file, authentication."""

from __future__ import annotations

import base64
import stat
import tomllib
from pathlib import Path

import pytest

from millrace.dashboards import users
from millrace.dashboards.users import UserError, UserRecord
from millrace.errors import ConfigError


def test_hash_is_salted_self_describing_and_verifies() -> None:
    first = users.hash_password("correct horse")
    second = users.hash_password("correct horse")
    assert first != second  # a fresh salt each time
    scheme, n, r, p, salt, key = first.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert (len(base64.b64decode(salt)), len(base64.b64decode(key))) == (16, 32)
    assert users.verify_password("correct horse", first)
    assert users.verify_password("correct horse", second)
    assert not users.verify_password("correct horsE", first)
    assert not users.verify_password("", first)


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "plain-text-password",
        "bcrypt$16384$8$1$AAAA$AAAA",
        "scrypt$16384$8$1$!!notbase64$AAAA",
        "scrypt$x$8$1$AAAA$AAAA",
        "scrypt$16384$8$1$AAAA$",
        "scrypt$3$8$1$AAAA$AAAA",  # N must be a power of two: scrypt refuses
        "scrypt$1099511627776$8$1$AAAA$AAAA",  # beyond the memory cap
    ],
)
def test_malformed_hashes_never_match(encoded: str) -> None:
    assert not users.verify_password("anything", encoded)


@pytest.mark.parametrize("password", ["short", "x" * 1025])
def test_password_length_is_bounded(password: str) -> None:
    with pytest.raises(UserError, match="8-1024 characters"):
        users.hash_password(password)


def test_add_user_writes_a_private_file_and_updates_in_place(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "users.toml"
    assert users.add_user(path, "alice", role="operator", password="alice-pw-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not users.add_user(path, "alice", role="admin", password="alice-pw-2")
    assert users.add_user(path, "bob@example.com", role="viewer", password=None)
    loaded = users.load_users(path)
    assert loaded["alice"].role == "admin"
    assert users.authenticate(loaded, "alice", "alice-pw-2") == loaded["alice"]
    assert users.authenticate(loaded, "alice", "alice-pw-1") is None
    assert loaded["bob@example.com"] == UserRecord("bob@example.com", "viewer", None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(tomllib.loads(path.read_text())["users"]) == ["alice", "bob@example.com"]
    assert list(path.parent.iterdir()) == [path]  # no temporary files left behind


def test_authenticate_refuses_unknown_names_and_password_less_accounts(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    users.add_user(path, "sso@example.com", role="admin", password=None)
    loaded = users.load_users(path)
    assert users.authenticate(loaded, "sso@example.com", "") is None
    assert users.authenticate(loaded, "sso@example.com", "anything-at-all") is None
    assert users.authenticate(loaded, "ghost", "anything-at-all") is None


@pytest.mark.parametrize("name", ["", "-dash", "a b", "x" * 129, "name\n", "rm;ls", 'q"uote'])
def test_bad_user_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match="user name"):
        users.add_user(tmp_path / "u.toml", name, role="viewer", password="long-enough")


def test_bad_role_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="viewer, operator, admin"):
        users.add_user(tmp_path / "u.toml", "carol", role="root", password="long-enough")


def test_missing_users_file_means_no_accounts(tmp_path: Path) -> None:
    assert users.load_users(tmp_path / "absent.toml") == {}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("users = 3", "users"),
        ("[users]\nalice = 1", "users.alice"),
        ('[users.alice]\nrole = "root"', "users.alice.role"),
        ('[users.alice]\nrole = "admin"\npassword = 5', "users.alice.password"),
        ("[users", "users_file"),
    ],
)
def test_broken_users_file_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "users.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        users.load_users(path)
    assert info.value.key == key
