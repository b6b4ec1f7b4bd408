"""Masks: 256-bit seeds expanded by AES-128 in counter mode into ring vectors (pure functions).

A site's masked input is y_i = x_i + PRG(b_i) + Σ_j ±PRG(s_ij) in the ring Z_{2^bits}: its self
mask from its own seed b_i, and one pairwise mask per neighbour j, added by the lower index and
subtracted by the higher, so that every pair cancels in the sum of both. The expansion writes the
keystream straight into a preallocated ``uint32``/``uint64`` buffer (no fresh allocation per
mask, no conversions) and numpy adds it in place, a cache-sized chunk at a time; unsigned
arithmetic wraps, which *is* reduction modulo 2^bits. A keystream is uniform over the ring, so a
masked vector is too.

The PRG is AES-128 in counter mode keyed with the first 128 bits of the seed (the PRG of
Bonawitz et al.'s implementation): block i of a stream is AES_K(nonce ‖ i + 2), the nonce a
12-byte label per purpose, so a seed never yields the same stream for its self mask and a
pairwise mask. It is computed as the ciphertext of zeros of OpenSSL's AES-GCM encryptor (exactly
that counter-mode keystream; the tag is never computed), because OpenSSL runs GCM with the
VAES instructions: 1M 32-bit values in 0.36 ms, against 0.52 ms for its CTR mode and 1.0 ms for
ChaCha20 (``python -m benchmarks.secagg``, section 2), and a site expands one mask per
neighbour every round. The 32-bit block counter bounds a stream at 2^32 − 2 blocks (64 GiB).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

RING_DTYPES = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
# The 96-bit nonce of each purpose: a seed never yields the same stream for both.
SELF_MASK_NONCE = b"fedgov-self."
PAIR_MASK_NONCE = b"fedgov-pair."
KEY_BYTES = 16  # AES-128: the first 128 bits of a 256-bit seed
MAX_STREAM_BYTES = (2**32 - 2) * 16  # the 32-bit block counter, from 2


def keystream(seed: bytes, nonce: bytes) -> CipherContext:
    """The PRG of ``seed`` for one purpose: an encryptor whose output on zeros is the mask
    (AES-128-CTR from block nonce ‖ 2; see the module doc). At most MAX_STREAM_BYTES."""
    if len(seed) < KEY_BYTES:
        raise ValueError(f"a mask seed of {len(seed)} bytes: expected at least {KEY_BYTES}")
    return Cipher(algorithms.AES(seed[:KEY_BYTES]), modes.GCM(nonce)).encryptor()


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
    """Fill ``out`` (a contiguous unsigned ring vector) with the keystream of ``seed``.

    The fastest way to one whole mask (the benchmark's throughput figure); masking itself uses
    :func:`apply_masks`, which streams every mask through the cache in chunks.
    """
    if out.nbytes > MAX_STREAM_BYTES:
        raise ValueError(f"a mask of {out.nbytes} bytes: at most {MAX_STREAM_BYTES}")
    out.fill(0)
    view = memoryview(out).cast("B")
    keystream(seed, nonce).update_into(view, view)
    return out


def expand(seed: bytes, nonce: bytes, length: int, bits: int) -> np.ndarray:
    """A fresh ring vector of ``length`` keystream values (for tests and one-off use)."""
    return expand_into(seed, nonce, np.empty(length, dtype=ring_dtype(bits)))


CHUNK_BYTES = 1 << 18  # 256 KiB: a chunk of every stream and of the target stay in cache


class MaskStreams:
    """Masks added chunk by chunk, in order: each :meth:`add_to` adds the next ``len(chunk)``
    values of every stream to ``chunk`` in place, so a caller that produces its vector a chunk at
    a time (the quantisation) masks each chunk while it is still in cache."""

    def __init__(self, masks: Iterable[tuple[bytes, bytes, int]], dtype: np.dtype) -> None:
        """``masks``: (seed, nonce, sign ±1) each; ``dtype``: the ring's (uint32 or uint64)."""
        self._streams = [(keystream(seed, nonce), sign) for seed, nonce, sign in masks]
        self._scratch = np.zeros(max(1, CHUNK_BYTES // np.dtype(dtype).itemsize), dtype=dtype)
        self._zeros = memoryview(np.zeros(self._scratch.nbytes, dtype=np.uint8))
        self._used = 0  # bytes of each stream used so far

    def add_to(self, chunk: np.ndarray) -> None:
        """chunk ← chunk + Σ sign · (the streams' next values) (mod 2^bits), in place."""
        self._used += chunk.nbytes
        if self._used > MAX_STREAM_BYTES:
            raise ValueError(f"masks of more than {MAX_STREAM_BYTES} bytes")
        step = len(self._scratch)
        for begin in range(0, len(chunk), step):
            part = chunk[begin : begin + step]
            buffer = self._scratch[: len(part)]
            view, source = memoryview(buffer).cast("B"), self._zeros[: buffer.nbytes]
            for encryptor, sign in self._streams:
                encryptor.update_into(source, view)  # the next keystream bytes of this mask
                if sign > 0:
                    np.add(part, buffer, out=part)
                else:
                    np.subtract(part, buffer, out=part)


def apply_masks(target: np.ndarray, masks: Iterable[tuple[bytes, bytes, int]]) -> np.ndarray:
    """target ← target + Σ sign · PRG(seed, nonce) (mod 2^bits), in place; returns ``target``.

    ``masks`` holds (seed, nonce, sign ±1). The streams are expanded chunk by chunk into one
    small scratch buffer (:class:`MaskStreams`), so each chunk of the target is read and written
    once per mask while it is still in cache: the cost is the keystream, not memory traffic.
    """
    masks = list(masks)
    if masks and len(target):
        MaskStreams(masks, target.dtype).add_to(target)
    return target


def pair_masks(
    own_index: int, self_seed: bytes, pair_seeds: Iterable[tuple[int, bytes]]
) -> list[tuple[bytes, bytes, int]]:
    """A site's masks as (seed, nonce, sign): its self mask, then one per neighbour in
    ``pair_seeds`` (peer index, agreed seed), added by the lower index, subtracted by the
    higher."""
    return [(self_seed, SELF_MASK_NONCE, 1)] + [
        (seed, PAIR_MASK_NONCE, pair_sign(own_index, peer)) for peer, seed in pair_seeds
    ]


def mask_input(
    quantised: np.ndarray,
    own_index: int,
    self_seed: bytes,
    pair_seeds: Iterable[tuple[int, bytes]],
) -> np.ndarray:
    """y = x + PRG(self_seed) + Σ sign · PRG(pair seed): the masked input (a new vector).

    ``pair_seeds`` holds (peer index, agreed seed) for every neighbour the site masks with.
    """
    return apply_masks(np.array(quantised, copy=True), pair_masks(own_index, self_seed, pair_seeds))


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
    masks = [(seed, SELF_MASK_NONCE, -1) for seed in self_seeds] + [
        (seed, PAIR_MASK_NONCE, -pair_sign(survivor, dropped))
        for survivor, dropped, seed in pair_terms
    ]
    return apply_masks(total, masks)
