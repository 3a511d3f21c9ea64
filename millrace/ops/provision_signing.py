"""The release key: an Ed25519 key pair that signs every bundle's manifest.

The sha256 manifest of a bundle proves integrity only; its signature proves it came from
this PKI. The private key lives in the PKI directory (`release.key`, 0600 from creation)
and never leaves it; gateways trust the public key (`release.pub`), installed at
/etc/millrace/release.pub by the first install (`install.sh --release-key FILE`) or by
`millrace provision --sd`. The gateway verifies the raw Ed25519 signature with
`openssl pkeyutl -verify -rawin` (OpenSSL 3), the one verifier a minimal Debian can add
without Python packages.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from millrace.errors import PKIError
from millrace.ops import pki

RELEASE_KEY_NAME = "release.key"
RELEASE_PUB_NAME = "release.pub"
SIGNATURE_SUFFIX = ".sig"
_KEY_MODE = 0o600
_PUB_MODE = 0o644


def release_key_path(pki_dir: Path | str) -> Path:
    """Where the PKI keeps the release signing key (private, 0600)."""
    return Path(pki_dir) / RELEASE_KEY_NAME


def release_pub_path(pki_dir: Path | str) -> Path:
    """Where the PKI keeps the release public key gateways trust."""
    return Path(pki_dir) / RELEASE_PUB_NAME


def _create_exclusive(path: Path, data: bytes, mode: int) -> bool:
    """Write `path` whole or not at all; False when another process made it first."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # atomic and refuses to replace: two racers keep one key
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def ensure_release_key(pki_dir: Path | str) -> Path:
    """Make the PKI's release key pair unless it exists; return the public key's path."""
    paths = pki.pki_path_checked(pki_dir)
    key_path = release_key_path(paths.dir)
    pub_path = release_pub_path(paths.dir)
    if not key_path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _create_exclusive(key_path, pem, _KEY_MODE)
    private = load_release_key(paths.dir)
    pub_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not pub_path.is_file() or pub_path.read_bytes() != pub_pem:
        pki.write_atomic(pub_path, pub_pem, mode=_PUB_MODE)
    return pub_path


def load_release_key(pki_dir: Path | str) -> ed25519.Ed25519PrivateKey:
    """The release signing key; refused when others can read it or it is not Ed25519."""
    path = release_key_path(pki_dir)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as exc:
        raise PKIError(f"cannot read the release key {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise PKIError(f"{path} is readable by others (mode {mode:04o}): chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise PKIError(f"{path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PKIError(f"{path} is not an Ed25519 key; move it aside and provision again")
    return key


def sign(pki_dir: Path | str, data: bytes) -> bytes:
    """The raw 64-byte Ed25519 signature of `data` by the PKI's release key."""
    ensure_release_key(pki_dir)
    return load_release_key(pki_dir).sign(data)
