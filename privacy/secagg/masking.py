"""Masks: 256-bit seeds expanded by the ChaCha20 stream cipher into ring vectors (pure functions).

A site's masked input is y_i = x_i + PRG(b_i) + Σ_j ±PRG(s_ij) in the ring Z_{2^bits}: its self
mask from its own seed b_i, and one pairwise mask per neighbour j, added by the lower index and
subtracted by the higher, so that every pair cancels in the sum of both. The expansion writes the
ChaCha20 keystream straight into a preallocated ``uint32``/``uint64`` buffer (no fresh allocation
per mask, no conversions) and numpy adds it in place; unsigned arithmetic wraps, which *is*
reduction modulo 2^bits. A keystream is uniform over the ring, so a masked vector is too.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

RING_DTYPES = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
# ChaCha20 in `cryptography` takes a 16-byte nonce: a 32-bit block counter then a 96-bit nonce.
# The two purposes use different nonces, so a seed never yields the same stream for both.
SELF_MASK_NONCE = bytes(4) + b"fedgov-self."
PAIR_MASK_NONCE = bytes(4) + b"fedgov-pair."


def ring_dtype(bits: int) -> np.dtype:
    """The unsigned dtype that holds the ring Z_{2^bits} (bits = 32 or 64)."""
    try:
        return RING_DTYPES[bits]
    except KeyError:
        raise ValueError(f"ring of {bits} bits: expected 32 or 64") from None


def pair_sign(own_index: int, peer_index: int) -> int:
    """+1 if the site adds the pairwise mask it shares with ``peer_index``, −1 if it subtracts."""
    return 1 if own_index < peer_index else -1


def expand_into(seed: bytes, nonce: bytes, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (a contiguous unsigned ring vector) with the ChaCha20 keystream of ``seed``."""
    out.fill(0)
    view = memoryview(out).cast("B")
    Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update_into(view, view)
    return out


def expand(seed: bytes, nonce: bytes, length: int, bits: int) -> np.ndarray:
    """A fresh ring vector of ``length`` keystream values (for tests and one-off use)."""
    return expand_into(seed, nonce, np.empty(length, dtype=ring_dtype(bits)))


class MaskAccumulator:
    """Adds and subtracts expanded masks into a ring vector, reusing one scratch buffer."""

    def __init__(self, length: int, bits: int) -> None:
        self._scratch = np.empty(length, dtype=ring_dtype(bits))

    def add(self, target: np.ndarray, seed: bytes, nonce: bytes, sign: int = 1) -> None:
        """target ← target + sign · PRG(seed) (mod 2^bits), in place."""
        expand_into(seed, nonce, self._scratch)
        if sign > 0:
            np.add(target, self._scratch, out=target)
        else:
            np.subtract(target, self._scratch, out=target)


def mask_input(
    quantised: np.ndarray,
    own_index: int,
    self_seed: bytes,
    pair_seeds: Iterable[tuple[int, bytes]],
) -> np.ndarray:
    """y = x + PRG(self_seed) + Σ sign · PRG(pair seed): the masked input (a new vector).

    ``pair_seeds`` holds (peer index, agreed seed) for every neighbour the site masks with.
    """
    masked = np.array(quantised, copy=True)
    masks = MaskAccumulator(len(masked), masked.dtype.itemsize * 8)
    masks.add(masked, self_seed, SELF_MASK_NONCE, +1)
    for peer, seed in pair_seeds:
        masks.add(masked, seed, PAIR_MASK_NONCE, pair_sign(own_index, peer))
    return masked


def remove_masks(
    total: np.ndarray,
    self_seeds: Iterable[bytes],
    pair_terms: Iterable[tuple[int, int, bytes]],
) -> np.ndarray:
    """Unmask a sum of masked inputs in place and return it.

    ``self_seeds``: the rebuilt self-mask seeds of every site whose input is in ``total``.
    ``pair_terms``: (survivor index, dropped peer index, agreed seed) for every pairwise mask a
    survivor added for a neighbour whose own input is not in the sum (so it did not cancel).
    """
    masks = MaskAccumulator(len(total), total.dtype.itemsize * 8)
    for seed in self_seeds:
        masks.add(total, seed, SELF_MASK_NONCE, -1)
    for survivor, dropped, seed in pair_terms:
        masks.add(total, seed, PAIR_MASK_NONCE, -pair_sign(survivor, dropped))
    return total
