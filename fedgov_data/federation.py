"""A simulated federation: a bundled dataset split into sites, plus the central held-out set.

The split is a pure function of the run config (dataset, partitioner, α, number of sites, seed), so
the ServerApp (for central evaluation) and every simulated site (for its own rows) compute the same
split independently; it is cached per process because sites load it every round.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np

from fedgov.config import RunConfig
from fedgov.datasets import (
    DEFAULT_SYNTHETIC_SITES,
    Dataset,
    DatasetSchema,
    load_named_dataset,
    schema_from_json,
    split_holdout,
)
from fedgov.errors import ConfigError
from fedgov_data.partitioners import partition


@dataclass(frozen=True)
class SimulatedFederation:
    """Site ids, each site's rows (indices into ``pool``) and the central held-out set."""

    site_ids: tuple[str, ...]
    partitions: tuple[np.ndarray, ...]
    pool: Dataset
    holdout: Dataset

    def site_rows(self, index: int) -> Dataset:
        """The rows that simulated site number ``index`` holds."""
        return self.pool.subset(self.partitions[index])


def resolved_num_sites(cfg: RunConfig) -> int:
    """The number of sites a run has: ``federation.num_sites``, or the dataset's natural count."""
    return len(simulated_federation(cfg).site_ids)


def simulated_federation(cfg: RunConfig) -> SimulatedFederation:
    """Split ``cfg.dataset`` into ``cfg.federation.num_sites`` sites (cached per process)."""
    d = cfg.dataset
    options = json.dumps(d.options, sort_keys=True)  # hashable, for the cache
    sites = cfg.federation.num_sites
    return _federation(d.name, options, d.partitioner, d.alpha, d.holdout_fraction, sites, cfg.seed)


def bundled_split(cfg: RunConfig) -> tuple[Dataset, Dataset]:
    """``cfg.dataset`` loaded and cut into (site pool, central hold-out), before any site split:
    what a deployment on a bundled dataset needs (its schema, its hold-out) whatever
    ``federation.num_sites`` says."""
    d = cfg.dataset
    options = json.dumps(d.options, sort_keys=True)
    return _split(d.name, options, d.holdout_fraction, cfg.federation.num_sites, cfg.seed)


@functools.lru_cache(maxsize=8)
def _split(
    name: str, options: str, holdout_fraction: float, num_sites: int, seed: int
) -> tuple[Dataset, Dataset]:
    dataset = load_named_dataset(
        name, json.loads(options), seed=seed, num_sites=num_sites or DEFAULT_SYNTHETIC_SITES
    )
    return split_holdout(dataset, holdout_fraction, seed)


@functools.lru_cache(maxsize=8)
def _federation(
    name: str,
    options: str,
    partitioner: str,
    alpha: float,
    holdout_fraction: float,
    num_sites: int,
    seed: int,
) -> SimulatedFederation:
    if num_sites == 0 and partitioner != "natural":
        num_sites = DEFAULT_SYNTHETIC_SITES
    pool, holdout = _split(name, options, holdout_fraction, num_sites, seed)
    site_ids, partitions = partition(pool, partitioner, num_sites, alpha, seed)
    if not site_ids:
        raise ConfigError(f"federation.num_sites: dataset '{name}' yields no sites")
    return SimulatedFederation(tuple(site_ids), tuple(partitions), pool, holdout)


def federation_schema(cfg: RunConfig) -> DatasetSchema:
    """The schema the run's model is built for: ``dataset.schema`` when set, else the bundled
    dataset's (returns a ``fedgov.datasets.DatasetSchema``)."""
    if cfg.dataset.schema:
        return schema_from_json(cfg.dataset.schema)
    return bundled_split(cfg)[0].schema
