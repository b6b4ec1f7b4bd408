"""Site-level DP (DP-FedAvg, McMahan et al. 2018): the maths, on plain name → ndarray mappings.

A round: sites are Poisson-sampled (each independently with probability q); every sampled site
clips its update Δ = w_local − w_global to L2 norm ≤ C over all its arrays together; Gaussian noise
of standard deviation z·C goes on the sum Σ Δ_i; the global model moves by the noisy sum divided
by the *expected* number of sites q·N (a fixed denominator: dividing by the number that actually
answered would make the step depend on whether one site took part). One site joining or leaving
changes the sum by at most C, so each round is the subsampled Gaussian mechanism with noise
multiplier z and rate q, composed over rounds by the accountant.

Under secure aggregation the server only ever sees the sum, so the noise cannot be added after it:
each site adds its share, Gaussian of std z·C/√t, before masking, t being the number of survivors
the shares were sized for. With s survivors the sum carries std z·C·√(s/t): at least z·C when
s ≥ t, and an *effective* noise multiplier z·√(s/t) otherwise, which the round either accounts
for or refuses (:func:`dropout_decision`). The noise that protects one site, though, excludes
its own share (it leaves with the site under add/remove-one-site): the rounds are accounted at
:func:`protected_noise_multiplier`, z·√((s−1)/t), the conservative choice; z·√(s/t) would hold
only for a "zero-out" relation (the site's data replaced by zeros, its noise share kept).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


def update_norm(update: Arrays) -> float:
    """The L2 norm of an update over all its arrays together."""
    return math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in update.values()))


def clip_update(update: Arrays, clipping_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``update`` scaled to L2 norm ≤ ``clipping_norm``; returns (clipped update, original norm)."""
    if not clipping_norm > 0:
        raise ValueError(f"clipping norm must be > 0, got {clipping_norm}")
    norm = update_norm(update)
    factor = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    clipped = {name: (a * factor).astype(a.dtype, copy=False) for name, a in update.items()}
    return clipped, norm


def gaussian_noise_like(
    update: Arrays, std: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Independent N(0, std²) noise shaped like every array of ``update`` (float64 draws)."""
    return {
        name: rng.normal(0.0, std, size=a.shape).astype(a.dtype, copy=False)
        for name, a in update.items()
    }


def noisy_mean_update(
    update_sum: Arrays,
    noise_multiplier: float,
    clipping_norm: float,
    expected_sites: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """(Σ clipped Δ_i + N(0, (z·C)²)) / (q·N): the server's DP-FedAvg step without SecAgg."""
    if not expected_sites > 0:
        raise ValueError(f"expected number of sites must be > 0, got {expected_sites}")
    noise = gaussian_noise_like(update_sum, noise_multiplier * clipping_norm, rng)
    return {
        name: ((a.astype(np.float64) + noise[name]) / expected_sites).astype(a.dtype)
        for name, a in update_sum.items()
    }


def noise_share_std(noise_multiplier: float, clipping_norm: float, min_survivors: int) -> float:
    """Std of the noise each site adds before masking so that ``min_survivors`` shares sum to
    std z·C: z·C/√t."""
    if min_survivors < 1:
        raise ValueError(f"min_survivors must be ≥ 1, got {min_survivors}")
    return noise_multiplier * clipping_norm / math.sqrt(min_survivors)


def effective_noise_multiplier(
    noise_multiplier: float, survivors: int, min_survivors: int
) -> float:
    """The noise multiplier really present in a sum of ``survivors`` shares sized for
    ``min_survivors``: z·√(s/t) (0 when nobody survived: nothing was released)."""
    if min_survivors < 1:
        raise ValueError(f"min_survivors must be ≥ 1, got {min_survivors}")
    return noise_multiplier * math.sqrt(max(survivors, 0) / min_survivors)


def protected_noise_multiplier(
    noise_multiplier: float, survivors: int, min_survivors: int
) -> float:
    """The noise multiplier that protects one site in a sum of ``survivors`` shares sized for
    ``min_survivors``, counting every share but its own: z·√((s−1)/t) (add/remove one site: the
    site's own share leaves with it). 0 with a single survivor: nothing protects it."""
    return effective_noise_multiplier(noise_multiplier, max(survivors - 1, 0), min_survivors)


def dropout_decision(survivors: int, min_survivors: int, policy: str) -> str:
    """``"ok"`` when the survivors' shares carry the full noise, else ``"abort"`` or ``"account"``
    as ``policy`` says (abort: the sum is never unmasked; account: use the smaller noise)."""
    if policy not in ("abort", "account"):
        raise ValueError(f"unknown dropout policy '{policy}' (abort or account)")
    return "ok" if survivors >= min_survivors else policy


def site_sampling_rate(sites_per_round: int, num_sites: int) -> float:
    """q of Poisson site sampling that gives ``sites_per_round`` sites per round on average."""
    if num_sites < 1:
        raise ValueError("no sites to sample from")
    return min(1.0, max(sites_per_round, 0) / num_sites)


def poisson_sample(site_ids: list[str], rate: float, rng: np.random.Generator) -> list[str]:
    """Each site independently with probability ``rate`` (sorted ids in, sorted ids out)."""
    ordered = sorted(site_ids)
    if rate >= 1:
        return ordered
    keep = rng.random(len(ordered)) < rate
    return [site for site, chosen in zip(ordered, keep, strict=True) if chosen]
