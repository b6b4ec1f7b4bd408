"""Split one dataset's rows into simulated sites: by natural site, IID, or Dirichlet label skew.

Pure functions of their arguments and seed. Each returns one sorted int64 index array per site;
the arrays are disjoint (``natural`` may leave out the rows of sites it drops, the others cover
every row).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from fedgov.datasets import Dataset
from fedgov.errors import ConfigError
from fedgov.plugins import Registry, one_line

#: A partitioner: (dataset, num_sites, alpha, seed) → (site ids, one row-index array per site).
Partitioner = Callable[[Dataset, int, float, int], tuple[list[str], list[np.ndarray]]]

#: Dirichlet draws tried before giving up on giving every site ``min_size`` rows.
MAX_DIRICHLET_DRAWS = 10_000


def site_ids(num_sites: int) -> list[str]:
    """``site-00``, ``site-01``, ...: zero-padded to width 2, or wider for 101+ sites."""
    width = max(2, len(str(num_sites - 1)))
    return [f"site-{i:0{width}d}" for i in range(num_sites)]


def natural_partition(
    site_labels: np.ndarray, num_sites: int
) -> tuple[list[str], list[np.ndarray]]:
    """One partition per natural site, ordered by site label.

    ``num_sites=0`` keeps every site; a smaller count keeps the ``num_sites`` largest sites (ties
    broken by label) and drops the others' rows; more than there are raises ConfigError.
    """
    labels = np.asarray(site_labels).astype(str)
    if num_sites < 0:
        raise ConfigError(f"federation.num_sites: {num_sites} must be >= 0")
    if labels.size and np.any(labels == ""):
        raise ConfigError(
            "dataset.partitioner: some rows have no natural site "
            "(use dataset.partitioner=iid or dirichlet)"
        )
    names, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if num_sites > len(names):
        raise ConfigError(
            f"federation.num_sites: {num_sites} is more than the {len(names)} natural sites "
            f"(expected at most {len(names)}, or 0 for all)"
        )
    keep = len(names) if num_sites == 0 else num_sites
    # np.unique sorts names, so a stable sort on -count breaks ties by label.
    chosen = np.sort(np.argsort(-counts, kind="stable")[:keep])
    grouped = np.argsort(inverse, kind="stable")  # row indices, grouped by site, ascending within
    starts = np.concatenate([[0], np.cumsum(counts)])
    partitions = [grouped[starts[i] : starts[i + 1]].astype(np.int64) for i in chosen]
    return [str(names[i]) for i in chosen], partitions


def _check_num_sites(num_sites: int, n: int) -> None:
    if num_sites < 1:
        raise ConfigError(f"federation.num_sites: {num_sites} must be >= 1 for a non-natural split")
    if num_sites > n:
        raise ConfigError(
            f"federation.num_sites: {num_sites} sites for {n} rows (expected at most {n})"
        )


def iid_partition(n: int, num_sites: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``n`` rows into ``num_sites`` parts whose sizes differ by at most one."""
    _check_num_sites(num_sites, n)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_sites)]


def dirichlet_partition(
    labels: np.ndarray, num_sites: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al. 2019): each class is divided by Dirichlet(alpha) proportions.

    Smaller ``alpha`` gives more skew. The proportions are redrawn until every site has at least
    ``min_size`` rows; ConfigError when that cannot happen or after MAX_DIRICHLET_DRAWS draws.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"dataset.alpha: {alpha} must be > 0")
    _check_num_sites(num_sites, n)
    if num_sites * min_size > n:
        raise ConfigError(
            f"federation.num_sites: {num_sites} sites of at least {min_size} rows need "
            f"{num_sites * min_size} rows; the data has {n}"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    members = [rng.permutation(np.flatnonzero(labels == label)) for label in classes]
    class_sizes = np.array([len(m) for m in members])
    for _ in range(MAX_DIRICHLET_DRAWS):
        proportions = rng.dirichlet(np.full(num_sites, alpha), size=len(classes))
        # cuts[k, j] = end of site j's slice of class k (as in the reference implementations)
        cuts = np.minimum(
            (np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64),
            class_sizes[:, None],
        )
        cuts[:, -1] = class_sizes
        site_sizes = np.diff(cuts, axis=1, prepend=0).sum(axis=0)
        if site_sizes.min() >= min_size:
            break
    else:
        raise ConfigError(
            f"dataset.alpha: {alpha} with federation.num_sites {num_sites} left some site with "
            f"fewer than {min_size} rows in {MAX_DIRICHLET_DRAWS} draws "
            "(raise dataset.alpha or lower federation.num_sites)"
        )
    starts = np.concatenate([np.zeros((len(classes), 1), dtype=np.int64), cuts[:, :-1]], axis=1)
    return [
        np.sort(
            np.concatenate([members[k][starts[k, j] : cuts[k, j]] for k in range(len(classes))])
        ).astype(np.int64)
        for j in range(num_sites)
    ]


def _natural(ds: Dataset, num_sites: int, alpha: float, seed: int):
    if ds.schema.site_column is None and not np.any(np.asarray(ds.site).astype(str) != ""):
        raise ConfigError(
            f"dataset.partitioner: '{ds.schema.name}' has no natural sites "
            "(use dataset.partitioner=iid or dirichlet)"
        )
    return natural_partition(ds.site, num_sites)


def _iid(ds: Dataset, num_sites: int, alpha: float, seed: int):
    return site_ids(num_sites), iid_partition(len(ds), num_sites, seed)


def _dirichlet(ds: Dataset, num_sites: int, alpha: float, seed: int):
    return site_ids(num_sites), dirichlet_partition(ds.y, num_sites, alpha, seed)


def _partitioner_from_target(where: str, obj: Any) -> Partitioner:
    """A ``_target_`` partitioner: a function (ds, num_sites, alpha, seed) → (ids, row indices)."""
    if not callable(obj):
        raise ConfigError(f"{where}: {obj!r} is not a partitioner function")
    try:
        inspect.signature(obj).bind(None, 0, 0.0, 0)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: '{getattr(obj, '__qualname__', obj)}' does not take (ds, num_sites, "
            "alpha, seed), expected a partitioner function"
        ) from None
    return obj


PARTITIONERS: Registry[Partitioner] = Registry(
    kind="partitioner",
    key="dataset.partitioner",
    expected="a function (ds, num_sites, alpha, seed) -> (site ids, row-index arrays)",
    adapt=_partitioner_from_target,
)
PARTITIONERS.register("natural", _natural)
PARTITIONERS.register("iid", _iid)
PARTITIONERS.register("dirichlet", _dirichlet)


def partition(
    ds: Dataset, scheme: str, num_sites: int, alpha: float, seed: int
) -> tuple[list[str], list[np.ndarray]]:
    """Split ``ds`` into sites by ``scheme`` (natural, iid, dirichlet or a ``_target_`` path):
    (site ids, row indices).

    Natural sites keep their labels; iid/dirichlet sites are named ``site-00``, ``site-01``, ...
    A user partitioner's result is checked: one id per part, distinct ids, disjoint in-range rows.
    """
    split = PARTITIONERS.resolve(scheme)
    result = split(ds, num_sites, alpha, seed)
    if scheme in PARTITIONERS:
        return result
    return _checked(scheme, result, len(ds))


def _checked(scheme: str, result: Any, n: int) -> tuple[list[str], list[np.ndarray]]:
    where = f"dataset.partitioner: '{scheme}'"
    try:
        ids, parts = result
        ids = [str(i) for i in ids]
        parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"{where} returned something other than (site ids, row-index arrays) "
            f"({one_line(error)})"
        ) from None
    if len(ids) != len(parts) or len(set(ids)) != len(ids):
        raise ConfigError(f"{where} returned {len(ids)} ids for {len(parts)} parts, or repeats")
    rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= n or len(np.unique(rows)) != rows.size):
        raise ConfigError(f"{where} returned rows out of range [0, {n}) or in two sites")
    return ids, parts


def label_skew(labels: np.ndarray, partitions: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each site's label distribution and the global one.

    0 means every site has the global class mix; 1 is the most skew possible. Empty partitions are
    skipped; the global distribution is that of all of ``labels``.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return 0.0
    global_dist = np.bincount(labels, minlength=num_classes) / labels.size
    distances = []
    for part in partitions:
        if len(part) == 0:
            continue
        site_dist = np.bincount(labels[part], minlength=num_classes) / len(part)
        distances.append(0.5 * float(np.abs(site_dist - global_dist).sum()))
    return float(np.mean(distances)) if distances else 0.0
