"""Signed privacy receipts: a site's Ed25519 signature over what one release of its update spent.

A receipt's payload is a flat JSON object (run, round, site, steps, σ, sampling rate, δ, accountant,
ε after this round, the site's cap and the full accounting history it composed); it is signed over
its canonical JSON (sorted keys, no whitespace, UTF-8), so any verifier that re-serialises the
payload the same way checks the same bytes. Receipts travel as a ConfigRecord (``payload`` str,
``signature`` and ``public-key`` bytes, see :func:`to_record`) and are stored in
``privacy_report.json`` as hex.

The site's key pair lives in its own directory (``site_key.pem``, PKCS#8, mode 0600, and
``site_key.pub``, the raw 32-byte public key in hex); the private key never leaves the site.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_KEY_FILE = "site_key.pem"
PUBLIC_KEY_FILE = "site_key.pub"
RECEIPT_VERSION = 1


def canonical_json(payload: dict[str, Any]) -> bytes:
    """The bytes a receipt's signature covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``arrays`` in order: what a receipt
    names as the weights a site received and the update it released."""
    digest = hashlib.sha256()
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte Ed25519 public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_key: bytes) -> str:
    """A short, human-comparable name of a public key: SHA-256, first 16 hex digits."""
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True)
class Receipt:
    """A signed payload and the public key that verifies it."""

    payload: dict[str, Any]
    signature: bytes
    public_key: bytes

    def verify(self, expected_public_key: bytes | None = None) -> bool:
        """True when the signature is the key's over the payload (and the key the expected one)."""
        if expected_public_key is not None and expected_public_key != self.public_key:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(
                self.signature, canonical_json(self.payload)
            )
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_json(self) -> dict[str, Any]:
        """As stored in privacy_report.json."""
        return {
            "payload": self.payload,
            "signature": self.signature.hex(),
            "public_key": self.public_key.hex(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Receipt:
        return cls(
            payload=dict(data["payload"]),
            signature=bytes.fromhex(data["signature"]),
            public_key=bytes.fromhex(data["public_key"]),
        )

    def to_record(self) -> dict[str, str | bytes]:
        """The ConfigRecord content a reply carries (``receipt``)."""
        return {
            "payload": canonical_json(self.payload).decode("utf-8"),
            "signature": self.signature,
            "public-key": self.public_key,
        }

    @classmethod
    def from_record(cls, record: Any) -> Receipt:
        return cls(
            payload=json.loads(str(record["payload"])),
            signature=bytes(record["signature"]),
            public_key=bytes(record["public-key"]),
        )


def sign(private_key: Ed25519PrivateKey, payload: dict[str, Any]) -> Receipt:
    """Sign ``payload`` (a JSON object) with the site's key."""
    payload = {"version": RECEIPT_VERSION, **payload}
    return Receipt(
        payload, private_key.sign(canonical_json(payload)), public_key_bytes(private_key)
    )


def create_site_key(site_dir: str | Path) -> Ed25519PrivateKey:
    """Create the site's key pair in ``site_dir`` (refuses to overwrite an existing key)."""
    from fedgov.atomic import atomic_write_bytes

    site_dir = Path(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_path = site_dir / PRIVATE_KEY_FILE
    # O_EXCL: two processes racing to initialise the site cannot both create a key.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    atomic_write_bytes(site_dir / PUBLIC_KEY_FILE, (public_key_bytes(key).hex() + "\n").encode())
    return key


def load_site_key(site_dir: str | Path) -> Ed25519PrivateKey:
    """The site's private key; raises OSError/ValueError when missing or unreadable."""
    data = (Path(site_dir) / PRIVATE_KEY_FILE).read_bytes()
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{Path(site_dir) / PRIVATE_KEY_FILE} is not an Ed25519 key")
    return key


def read_public_key(site_dir: str | Path) -> bytes:
    """The site's published public key (raw 32 bytes) from ``site_key.pub``."""
    return bytes.fromhex((Path(site_dir) / PUBLIC_KEY_FILE).read_text().strip())
