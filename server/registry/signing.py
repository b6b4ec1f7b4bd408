"""Ed25519 keys and signatures for manifests, approvals and audit entries.

A public key travels as text, ``ed25519:<base64 of the 32 raw bytes>``; its key id is the first
16 hex digits of the sha256 of those bytes. A private key is a PKCS#8 PEM file readable by its
owner only. Every signed message starts with a purpose tag (``fedgov:manifest:v1:`` ...), so a
signature made for one purpose can never be replayed as another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from server.registry.errors import RegistryError

PUBLIC_KEY_PREFIX = "ed25519:"


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key with its public text form and key id."""

    private: Ed25519PrivateKey
    public_key: str  # "ed25519:<base64>"
    key_id: str

    def sign(self, message: bytes) -> str:
        """The base64 Ed25519 signature of ``message``."""
        return base64.b64encode(self.private.sign(message)).decode("ascii")


def public_key_text(public: Ed25519PublicKey) -> str:
    """``ed25519:<base64>`` for a public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str, where: str = "public key") -> Ed25519PublicKey:
    """Read ``ed25519:<base64>``; a malformed key raises RegistryError naming ``where``."""
    if not isinstance(text, str) or not text.startswith(PUBLIC_KEY_PREFIX):
        raise RegistryError(f"{where}: expected 'ed25519:<base64>', got {text!r}")
    try:
        raw = base64.b64decode(text[len(PUBLIC_KEY_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise RegistryError(f"{where}: '{text}' is not valid base64") from None
    if len(raw) != 32:
        raise RegistryError(f"{where}: an Ed25519 public key has 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(public_key: str) -> str:
    """The short id of a public key: 16 hex digits of the sha256 of its raw bytes."""
    raw = base64.b64decode(public_key[len(PUBLIC_KEY_PREFIX) :])
    return hashlib.sha256(raw).hexdigest()[:16]


def verify_signature(public_key: str, message: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64) is ``public_key``'s Ed25519 signature of ``message``."""
    try:
        key = parse_public_key(public_key)
        key.verify(base64.b64decode(signature, validate=True), message)
    except (RegistryError, InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True


def _wrap(private: Ed25519PrivateKey) -> SigningKey:
    public = public_key_text(private.public_key())
    return SigningKey(private, public, key_id(public))


def generate_key() -> SigningKey:
    """A fresh Ed25519 key (in memory)."""
    return _wrap(Ed25519PrivateKey.generate())


def write_key(path: str | Path, key: SigningKey) -> None:
    """Write the private key (PEM, mode 0600) to ``path`` and its public key to ``path.pub``.

    Refuses to overwrite an existing key file: losing a key cannot be undone.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RegistryError(f"{path.parent}: cannot create the folder ({error.strerror})") from None
    pem = key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise RegistryError(f"{path}: a key file already exists (not overwritten)") from None
    except OSError as error:
        raise RegistryError(f"{path}: cannot create the key file ({error.strerror})") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path(path).write_text(key.public_key + "\n")


def public_path(private_path: str | Path) -> Path:
    """Where the public key of the private key at ``private_path`` is written."""
    private_path = Path(private_path)
    return private_path.with_name(private_path.name + ".pub")


def load_key(path: str | Path) -> SigningKey:
    """Read a private key written by :func:`write_key` (or any unencrypted Ed25519 PKCS#8 PEM)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RegistryError(f"--key: {path} does not exist") from None
    except OSError as error:
        raise RegistryError(f"--key: {path} cannot be read ({error.strerror})") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise RegistryError(f"--key: {path} is not an unencrypted PEM private key") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise RegistryError(f"--key: {path} is not an Ed25519 key")
    return _wrap(private)


def load_or_create_key(path: str | Path) -> tuple[SigningKey, bool]:
    """The key at ``path``, generated there first if absent; returns (key, created).

    Two processes that both find it absent race on ``O_EXCL``: the loser reads the winner's key.
    """
    path = Path(path)
    if path.exists():
        return load_key(path), False
    key = generate_key()
    try:
        write_key(path, key)
    except RegistryError:
        if not path.exists():
            raise
        return load_key(path), False
    return key, True
