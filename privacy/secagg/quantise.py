"""Fixed-point quantisation of clipped, weighted updates into the ring Z_{2^bits} and back.

A site's update u = local weights − global weights is clipped coordinate-wise to [−c, c] (c =
``clip_range``), weighted by r = w / W_max (w its example count, W_max ``max_weight``, so r ≤ 1)
and scaled to an integer q = round(r · u · L / c), then clamped to the integer range [−L, L].
The scale L = ⌊(2^(bits−1) − 1) / n⌋ for the n sites of the round, capped at 2^48
(``FLOAT_SAFE``). The clamp is exact integer arithmetic, so |q| ≤ L for every site whatever
float64 rounding did, and the sum of up to n such integers is at most n·L ≤ 2^(bits−1) − 1: the
ring never wraps, on 32 or 64 bits, for any n and any clip range (read as a signed integer, the
ring sum is the exact sum of the q).
The server turns it back into the weighted mean update Σ r_i u_i / Σ r_i = S · c · W_max / (L · W)
with W = Σ w_i. Error (``mean_error_bound``): each site's rounding moves its term by at most half
a unit, and float64 (53-bit mantissa) moves r·u·L/c by at most 2^-3 of a unit while L ≤ 2^48,
so each term is within 5/8 < 3/4 of a unit; turning the exact integer S back into a float64 mean
costs at most 2^-50·c more. So the mean is within n_s · (3/4) · c · W_max / (L · W) + 2^-50 · c
of the exact weighted mean of the clipped updates (n_s the survivors), on either ring size
(property-tested against exact rational arithmetic, tests/test_secagg_maths.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from privacy.secagg.masking import ring_dtype

FLOAT_SAFE = 2**48  # the largest scale: float64 keeps r·u·L/c within 2^-3 of a unit below it
UNIT_ERROR = 0.75  # the most one site's term moves, in units (rounding ½ + float64 ⅛, rounded up)
CHUNK_VALUES = 1 << 15  # 256 KiB of float64: quantisation works chunk by chunk, in cache


def ring_scale(num_sites: int, bits: int) -> int:
    """L: the integer that stands for the clip range c, so that n terms never wrap the ring."""
    if num_sites < 1:
        raise ValueError(f"ring scale for {num_sites} sites")
    ring_dtype(bits)
    return max(1, min((2 ** (bits - 1) - 1) // num_sites, FLOAT_SAFE))


def quantise(
    update: np.ndarray,
    *,
    clip_range: float,
    weight: int,
    max_weight: int,
    scale: int,
    bits: int,
) -> tuple[np.ndarray, int]:
    """(q as a ring vector, how many coordinates were clipped) for one site's flat update."""
    values = np.asarray(update)
    chunks = (values[begin : begin + CHUNK_VALUES] for begin in range(0, len(values), CHUNK_VALUES))
    return quantise_chunks(
        chunks,
        len(values),
        clip_range=clip_range,
        weight=weight,
        max_weight=max_weight,
        scale=scale,
        bits=bits,
    )


def quantise_chunks(
    chunks: Iterable[np.ndarray],
    length: int,
    *,
    clip_range: float,
    weight: int,
    max_weight: int,
    scale: int,
    bits: int,
    then: Callable[[np.ndarray], None] | None = None,
) -> tuple[np.ndarray, int]:
    """:func:`quantise` of the ``length``-value update that ``chunks`` yields in order (e.g.
    :meth:`~privacy.secagg.layout.VectorLayout.update_chunks`, which never builds the whole
    float64 vector); the same values, so the same ring vector, as quantising it whole.

    ``then``: called with each chunk of the ring vector as soon as it is written, in order,
    to change it in place while it is in cache (a site adds its masks:
    :meth:`~privacy.secagg.masking.MaskStreams.add_to`)."""
    if not 0 <= weight <= max_weight:
        raise ValueError(f"weight {weight} outside [0, {max_weight}]")
    factor = (weight / max_weight) * (scale / clip_range)
    bound = clip_range * factor  # ≈ r·L ≤ L; the integer clamp below makes |q| ≤ L exact
    # q = clamp(rint(clamp(u·f, ±c·f)), ±L) = clamp(rint(u·f), ±min(rint(c·f), L)), as rint is
    # monotone and odd: one clamp, in whole numbers ≤ 2^48 (exact in float64)
    rounded_bound = float(np.rint(bound))
    limit = min(rounded_bound, float(scale))
    bound_fits = rounded_bound <= scale  # then an unclipped chunk needs no clamp
    ring = np.empty(length, dtype=ring_dtype(bits))
    signed = signed_view(ring, bits)
    scratch = np.empty(min(CHUNK_VALUES, length), dtype=np.float64)
    clipped, begin = 0, 0
    for chunk in chunks:
        if begin + len(chunk) > length:
            raise ValueError(f"the update holds more than {length} values")
        scaled = scratch[: len(chunk)] if len(chunk) <= len(scratch) else np.empty(len(chunk))
        np.multiply(chunk, factor, out=scaled, dtype=np.float64)
        # The common chunk: every value finite and within ±c (NaN fails both comparisons), so
        # |u·f| ≤ c·f (float multiplication is monotone) and only rounding is left to do.
        if -clip_range <= chunk.min() and chunk.max() <= clip_range:
            np.rint(scaled, out=scaled)
            if not bound_fits:
                np.clip(scaled, -limit, limit, out=scaled)
        else:
            if not np.isfinite(scaled).all():
                raise ValueError("the update holds NaN or infinite values")
            clipped += int(np.count_nonzero(np.abs(chunk) > clip_range))
            np.rint(scaled, out=scaled)
            np.clip(scaled, -limit, limit, out=scaled)
        stop = begin + len(chunk)
        signed[begin:stop] = scaled
        if then is not None:
            then(ring[begin:stop])
        begin = stop
    if begin != length:
        raise ValueError(f"the update holds {begin} values, expected {length}")
    # |q| ≤ L < 2^(bits−1): the two's-complement bits of q are its ring element
    return ring, clipped


def signed_view(ring_values: np.ndarray, bits: int) -> np.ndarray:
    """Ring elements read in place as two's-complement signed integers (int32 or int64)."""
    signed = np.int32 if bits == 32 else np.int64
    return np.asarray(ring_values, dtype=ring_dtype(bits)).view(signed)


def to_signed(ring_values: np.ndarray, bits: int) -> np.ndarray:
    """Ring elements read as two's-complement signed integers (int64)."""
    return signed_view(ring_values, bits).astype(np.int64)


def dequantise_mean(
    ring_sum: np.ndarray,
    *,
    clip_range: float,
    total_weight: int,
    max_weight: int,
    scale: int,
    bits: int,
) -> np.ndarray:
    """The weighted mean update (float64) from the unmasked ring sum of the survivors' inputs."""
    if total_weight <= 0:
        raise ValueError("the survivors' total weight is zero")
    factor = (clip_range / scale) * (max_weight / total_weight)
    # int → float64: the rounding the module doc bounds (exact on 32 bits)
    mean = signed_view(ring_sum, bits).astype(np.float64)
    mean *= factor
    return mean


def mean_error_bound(
    num_survivors: int, *, clip_range: float, total_weight: int, max_weight: int, scale: int
) -> float:
    """The largest distance between the dequantised mean and the exact weighted mean (per value):
    n_s · (3/4) · c · W_max / (L · W) + 2^-50 · c (see the module doc)."""
    units = num_survivors * UNIT_ERROR * clip_range * max_weight / (scale * total_weight)
    return units + clip_range * 2.0**-50
