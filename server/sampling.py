"""Which sites train in a round: a pure, seeded choice over site ids (not Flower's node ids,
which are random per run), so the same seed picks the same sites in every run."""

from __future__ import annotations

import math

import numpy as np


def sites_per_round(num_available: int, requested: float, minimum: int) -> int:
    """How many of ``num_available`` sites to sample.

    ``requested`` ≥ 1 is a count, a value in (0, 1) a fraction of the available sites (never
    below ``minimum``), and 0 means every site. The result is capped at ``num_available``.
    """
    if requested == 0:
        count = num_available
    elif requested >= 1:
        count = int(requested)
    else:
        count = max(math.ceil(requested * num_available), minimum)
    return min(count, num_available)


def sample_sites(site_ids: list[str], count: int, seed: int, server_round: int) -> list[str]:
    """``count`` distinct site ids, sorted, drawn uniformly without replacement.

    The draw depends only on (seed, round, the sorted set of ids).
    """
    ordered = sorted(site_ids)
    if count >= len(ordered):
        return ordered
    rng = np.random.default_rng([seed, server_round])
    chosen = rng.choice(len(ordered), size=count, replace=False)
    return sorted(ordered[i] for i in chosen)
