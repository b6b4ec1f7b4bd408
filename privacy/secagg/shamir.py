"""Shamir t-of-n secret sharing of 256-bit secrets over the prime field GF(2^521 − 1).

A secret s becomes the constant term of a random polynomial f of degree t − 1; the share of the
site with index x is f(x). Any t shares give s back by Lagrange interpolation at 0; t − 1 shares
are independent of s (every value of s is equally likely given them). Indices are the sites'
round indices (1 … n), never 0.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

PRIME = 2**521 - 1  # the Mersenne prime M521: larger than every 256-bit secret
SHARE_BYTES = 66  # ⌈521 / 8⌉
SECRET_BYTES = 32


class ShareError(ValueError):
    """A share is malformed, or a set of shares is unusable (too few, duplicate indices)."""


def split(secret: bytes, threshold: int, indices: Iterable[int]) -> dict[int, int]:
    """Shares of ``secret`` (32 B) for each of ``indices``; any ``threshold`` rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"secret of {len(secret)} bytes, expected {SECRET_BYTES}")
    xs = list(indices)
    if threshold < 1 or threshold > len(xs):
        raise ShareError(f"threshold {threshold} with {len(xs)} share holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShareError(f"share indices must be distinct and non-zero: {xs}")
    coefficients = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    return {x: _evaluate(coefficients, x) for x in xs}


def reconstruct(shares: Mapping[int, int]) -> bytes:
    """The secret whose polynomial passes through every one of ``shares`` (index → value).

    Pass exactly ``threshold`` shares. Shares of a different secret, or corrupted ones, give a
    different field element; when it does not fit in 32 bytes this raises :class:`ShareError`,
    otherwise the caller's check (a commitment or a public key) catches it.
    """
    if not shares:
        raise ShareError("no shares")
    xs = list(shares)
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShareError(f"share indices must be distinct and non-zero: {xs}")
    secret = 0
    for x_j, y_j in shares.items():
        numerator, denominator = 1, 1
        for x_m in xs:
            if x_m != x_j:
                numerator = numerator * x_m % PRIME
                denominator = denominator * (x_m - x_j) % PRIME
        secret = (secret + y_j * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShareError("the shares do not belong to one 256-bit secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def evaluate_at(shares: Mapping[int, int], x: int) -> int:
    """The value at ``x`` of the polynomial through ``shares`` (Lagrange; to spot a bad share)."""
    xs = list(shares)
    value = 0
    for x_j, y_j in shares.items():
        numerator, denominator = 1, 1
        for x_m in xs:
            if x_m != x_j:
                numerator = numerator * (x - x_m) % PRIME
                denominator = denominator * (x_j - x_m) % PRIME
        value = (value + y_j * numerator * pow(denominator, -1, PRIME)) % PRIME
    return value


def share_to_bytes(value: int) -> bytes:
    """A share value as 66 big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(blob: bytes) -> int:
    """A share value from 66 bytes; raise :class:`ShareError` unless it is a field element."""
    if not isinstance(blob, bytes) or len(blob) != SHARE_BYTES:
        raise ShareError(f"share of {len(blob) if isinstance(blob, bytes) else '?'} bytes")
    value = int.from_bytes(blob, "big")
    if value >= PRIME:
        raise ShareError("share value outside the field")
    return value


def _evaluate(coefficients: list[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):  # Horner
        result = (result * x + coefficient) % PRIME
    return result
