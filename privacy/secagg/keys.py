"""Key agreement, key derivation and authenticated encryption for SecAgg+ (pure functions).

Every site makes two fresh X25519 key pairs per round: an *encryption* pair (its shares for a
neighbour are encrypted under a key both derive from their encryption keys) and a *mask* pair
(the seed of the pairwise mask two neighbours add with opposite signs). Agreed secrets go through
HKDF-SHA256 bound to the round id, the purpose and the pair of site indices, so a key never serves
two purposes, two rounds or two pairs. Shares travel under AES-256-GCM whose associated data names
the round and the direction (sender → recipient): a share replayed from another round, reflected
back to its sender or altered in transit fails to decrypt.
"""

from __future__ import annotations

import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # X25519 keys, seeds and derived keys are all 256-bit
NONCE_BYTES = 12  # AES-GCM nonce
TAG_BYTES = 16  # AES-GCM authentication tag
ROUND_ID_BYTES = 16

PURPOSE_SHARES = b"fedgov-secagg/v1/share-encryption"
PURPOSE_MASK = b"fedgov-secagg/v1/pairwise-mask"
_SHARE_AAD = b"fedgov-secagg/v1/share"
_COMMIT = b"fedgov-secagg/v1/self-mask-commitment"


class KeyAgreementError(ValueError):
    """A peer's public key is malformed or yields no usable shared secret."""


class ShareDecryptionError(ValueError):
    """An encrypted share is malformed, altered, replayed or not meant for this recipient."""


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes: (private 32 B, public 32 B)."""
    private = X25519PrivateKey.generate()
    return _raw_private(private), _raw_public(private.public_key())


def public_key_of(private: bytes) -> bytes:
    """The X25519 public key (32 B) of a raw private key (used to check a rebuilt key)."""
    return _raw_public(X25519PrivateKey.from_private_bytes(private).public_key())


def random_seed() -> bytes:
    """A 256-bit secret from the operating system's CSPRNG."""
    return os.urandom(KEY_BYTES)


def new_round_id() -> bytes:
    """A fresh 128-bit round id: binds every key, share and reply to one round."""
    return os.urandom(ROUND_ID_BYTES)


def agree(
    private: bytes | X25519PrivateKey,
    peer_public: bytes,
    round_id: bytes,
    purpose: bytes,
    a: int,
    b: int,
) -> bytes:
    """The 256-bit key sites ``a`` and ``b`` share for ``purpose`` in round ``round_id``.

    X25519 of one site's private key with the other's public key, then HKDF-SHA256 with the round
    id as salt and (purpose, min(a, b), max(a, b)) as info: both sides derive the same key.
    ``private``: its 32 bytes, or the key loaded once for many peers (:func:`private_key`).
    Raises :class:`KeyAgreementError` for a malformed or low-order public key.
    """
    if len(peer_public) != KEY_BYTES:
        raise KeyAgreementError(f"public key of {len(peer_public)} bytes, expected {KEY_BYTES}")
    if isinstance(private, bytes):
        private = private_key(private)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:  # an all-zero shared secret (a low-order point)
        raise KeyAgreementError(f"unusable public key: {error}") from None
    low, high = sorted((a, b))
    info = purpose + struct.pack(">QQ", low, high)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=round_id, info=info).derive(
        shared
    )


def private_key(private: bytes) -> X25519PrivateKey:
    """The X25519 key of ``private`` (32 bytes), to agree with many peers without reloading it."""
    return X25519PrivateKey.from_private_bytes(private)


def encrypt_share(key: bytes, round_id: bytes, src: int, dst: int, plaintext: bytes) -> bytes:
    """AES-256-GCM of ``plaintext`` from site ``src`` to ``dst``: nonce ‖ ciphertext ‖ tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _share_aad(round_id, src, dst))


def decrypt_share(key: bytes, round_id: bytes, src: int, dst: int, blob: bytes) -> bytes:
    """Open a share sent by ``src`` to ``dst``; raise :class:`ShareDecryptionError` if it fails."""
    if not isinstance(blob, bytes) or len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ShareDecryptionError("truncated or malformed ciphertext")
    try:
        return AESGCM(key).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], _share_aad(round_id, src, dst)
        )
    except InvalidTag:
        raise ShareDecryptionError("authentication failed (wrong key, round or sender)") from None


def commitment(round_id: bytes, index: int, secret: bytes) -> bytes:
    """SHA-256 commitment to a site's self-mask seed, published with its keys.

    The server checks a seed rebuilt from shares against it, so a wrong share cannot silently
    turn into a wrong self mask (and so a wrong sum).
    """
    return hashlib.sha256(_COMMIT + round_id + struct.pack(">Q", index) + secret).digest()


def _share_aad(round_id: bytes, src: int, dst: int) -> bytes:
    return _SHARE_AAD + round_id + struct.pack(">QQ", src, dst)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
