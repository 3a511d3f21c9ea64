"""Local dashboard accounts: a TOML users file with scrypt-hashed passwords.

    [users.alice]
    role = "operator"
    password = "scrypt$16384$8$1$<salt, base64>$<key, base64>"

    [users."bob@example.com"]   # an OIDC identity: a role, no password
    role = "admin"

Each password has its own random salt; verification compares in constant
time and hashes even for unknown names, so timing does not reveal which
accounts exist. The file is written 0600 by `millrace dash add-user`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from millrace.dashboards.config import ROLES, Role
from millrace.errors import ConfigError, MillraceError

# scrypt cost: N=2**14, r=8, p=1 is the OWASP-recommended floor (16 MiB, ~50 ms here):
# cheap for one login, expensive for a guesser.
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SCRYPT_KEY_BYTES: Final = 32
SALT_BYTES: Final = 16
# 64 MiB: room for N up to 2**15 with r=8 when an admin raises the cost.
SCRYPT_MAXMEM_BYTES: Final = 64 * 1024 * 1024
MIN_PASSWORD_CHARS: Final = 8
MAX_PASSWORD_CHARS: Final = 1024
USER_NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
USER_NAME_RULE: Final = "1-128 chars of letters, digits . _ @ + -, starting with a letter or digit"
_SCHEME: Final = "scrypt"


class UserError(MillraceError):
    """A user name, role or password cannot be used as given."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One account: its role and, for local logins, its password hash."""

    name: str
    role: Role
    password_hash: str | None = None


def check_user_name(name: str) -> str:
    """`name` if it may name a dashboard user, else UserError."""
    if not USER_NAME_PATTERN.fullmatch(name):
        raise UserError(f"user name {name!r}: {USER_NAME_RULE}")
    return name


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise UserError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, *, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=SCRYPT_MAXMEM_BYTES
    )


def hash_password(password: str) -> str:
    """A self-describing scrypt hash of `password` with a fresh random salt."""
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise UserError(f"a password needs {MIN_PASSWORD_CHARS}-{MAX_PASSWORD_CHARS} characters")
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_KEY_BYTES)
    return f"{_SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


# Verified when the name is unknown, so a miss costs as much as a wrong password.
_DUMMY_HASH: Final = (
    f"{_SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(bytes(SALT_BYTES))}"
    f"${_b64(bytes(SCRYPT_KEY_BYTES))}"
)


def verify_password(password: str, encoded: str) -> bool:
    """True when `password` matches `encoded`; a malformed hash never matches."""
    try:
        scheme, n, r, p, salt_b64, key_b64 = encoded.split("$")
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(key_b64, validate=True)
        cost = (int(n), int(r), int(p))
    except (ValueError, binascii.Error):
        return False
    if scheme != _SCHEME or not expected or len(password) > MAX_PASSWORD_CHARS:
        return False
    try:
        actual = _scrypt(password, salt, n=cost[0], r=cost[1], p=cost[2], dklen=len(expected))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(actual, expected)


def load_users(path: Path) -> dict[str, UserRecord]:
    """Every account in the users file; a missing file means no accounts."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError("users_file", f"cannot read {path}: {exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("users_file", f"not valid TOML: {exc}", source=str(path)) from exc
    table = data.get("users", {})
    if not isinstance(table, dict):
        raise ConfigError("users", "expected a table of users", source=str(path))
    users: dict[str, UserRecord] = {}
    for name, entry in table.items():
        key = f"users.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(key, "expected a table with role (and password)", source=str(path))
        role = entry.get("role")
        if role not in ROLES:
            raise ConfigError(f"{key}.role", f"one of {', '.join(ROLES)}", source=str(path))
        password = entry.get("password")
        if password is not None and not isinstance(password, str):
            raise ConfigError(f"{key}.password", "expected a hash string", source=str(path))
        users[name] = UserRecord(name=name, role=role, password_hash=password)
    return users


def authenticate(users: dict[str, UserRecord], name: str, password: str) -> UserRecord | None:
    """The account when name and password match, else None (in constant-ish time)."""
    record = users.get(name)
    encoded = record.password_hash if record and record.password_hash else _DUMMY_HASH
    ok = verify_password(password, encoded)
    return record if ok and record is not None and record.password_hash else None


def _render(users: dict[str, UserRecord]) -> str:
    # json.dumps yields valid TOML basic strings (quotes and escapes alike).
    lines = ["# millrace dashboard accounts; managed by `millrace dash add-user`.", ""]
    for name in sorted(users):
        record = users[name]
        lines.append(f"[users.{json.dumps(name)}]")
        lines.append(f"role = {json.dumps(record.role)}")
        if record.password_hash:
            lines.append(f"password = {json.dumps(record.password_hash)}")
        lines.append("")
    return "\n".join(lines)


def save_users(path: Path, users: dict[str, UserRecord]) -> None:
    """Write the users file atomically, readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(_render(users))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def add_user(path: Path, name: str, *, role: str, password: str | None) -> bool:
    """Create or update an account; True when it was new. No password = OIDC-only."""
    record = UserRecord(
        name=check_user_name(name),
        role=check_role(role),
        password_hash=hash_password(password) if password is not None else None,
    )
    users = load_users(path)
    created = name not in users
    users[name] = record
    save_users(path, users)
    return created
