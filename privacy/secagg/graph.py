"""The SecAgg+ neighbour graph and the reconstruction threshold (pure functions).

SecAgg (Bonawitz et al. 2017) pairs every site with every other: O(n) keys, shares and masks per
site. SecAgg+ (Bell et al. 2020) pairs each site with k others on a random k-regular graph (a
Harary circulant over a random permutation of the sites), which keeps the same guarantees with
high probability for k = O(log n). fedgov uses the full graph for small federations.
A site's *share group* is itself plus its neighbours: its secrets are split among them, and any
``threshold`` of them can rebuild those secrets.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping

FULL_GRAPH_UP_TO = 64  # neighbours = 0 (auto): every site is everyone's neighbour up to here
AUTO_DEGREE_FACTOR = 8  # above it, k = the even number ≥ 8·⌈log2 n⌉


def resolve_degree(num_sites: int, neighbours: int) -> int:
    """k, the number of neighbours of each site for ``num_sites`` sites.

    ``neighbours`` = 0 picks automatically: n − 1 (the full graph) up to 64 sites, then the even
    number ≥ 8·⌈log2 n⌉ (80 at n = 1000). An explicit k is used as given (an odd k is rounded up
    to the next even number, as the circulant graph needs), capped at n − 1.
    """
    if num_sites < 2:
        return 0
    if neighbours <= 0:
        if num_sites <= FULL_GRAPH_UP_TO:
            return num_sites - 1
        neighbours = AUTO_DEGREE_FACTOR * math.ceil(math.log2(num_sites))
    degree = neighbours + (neighbours % 2)
    return min(degree, num_sites - 1)


def neighbour_graph(num_sites: int, degree: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """Each site index (1 … n) → its neighbours, sorted. Symmetric, no self loops.

    With ``degree`` ≥ n − 1 every site neighbours every other. Otherwise the sites are placed on a
    ring in an order shuffled by ``seed`` and each is joined to the ``degree``/2 nearest on either
    side (a k-regular Harary graph). The graph needs no secrecy: it is public to all parties.
    """
    indices = list(range(1, num_sites + 1))
    if degree >= num_sites - 1:
        return {i: tuple(j for j in indices if j != i) for i in indices}
    if degree % 2:
        raise ValueError(f"a circulant neighbour graph needs an even degree, not {degree}")
    order = indices[:]
    random.Random(hashlib.sha256(b"fedgov-secagg/v1/graph" + seed).digest()).shuffle(order)
    graph: dict[int, set[int]] = {i: set() for i in indices}
    for position, site in enumerate(order):
        for step in range(1, degree // 2 + 1):
            other = order[(position + step) % num_sites]
            graph[site].add(other)
            graph[other].add(site)
    return {i: tuple(sorted(graph[i])) for i in indices}


def share_threshold(group_size: int, threshold: float) -> int:
    """t: how many of a share group of ``group_size`` sites must answer to rebuild a secret.

    ``threshold`` in (0, 1] is a fraction of the group (rounded up), > 1 a count. Whatever the
    setting, t is at least 2 and a strict majority of the group (⌊m/2⌋ + 1): then no two disjoint
    sets of sites can each rebuild a secret, so a server that tells different sites different
    stories about who dropped out still cannot collect both secrets of one site. A t larger than
    the group means the round cannot run (the caller aborts it).
    """
    majority = group_size // 2 + 1
    wanted = math.ceil(threshold * group_size - 1e-9) if threshold <= 1 else int(threshold)
    return max(wanted, majority, 2)


def isolated_survivors(
    graph: Mapping[int, tuple[int, ...]], survivors: Iterable[int], threshold: int
) -> list[int]:
    """Survivors with fewer than ``threshold`` − 1 surviving neighbours, sorted.

    SecAgg+'s design bound: a survivor's input stays hidden in the sum while enough of its
    neighbours' pairwise masks stay in it; fedgov asks that every survivor keep at least t − 1
    surviving neighbours (so at most k + 1 − t of its k neighbours dropped out). A site refuses to
    reveal anything for a survivor set that breaks this (Bell et al. 2020, §3–4).
    """
    kept = set(survivors)
    return sorted(s for s in kept if len(kept.intersection(graph.get(s, ()))) < threshold - 1)
