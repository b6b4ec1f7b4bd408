"""Where a site's rows come from: its own file (deployment) or a simulated partition.

The node config decides, never the server's messages:
- ``data-path`` (+ ``schema-path``): the site's own CSV/Parquet, validated against its schema;
- ``partition-id`` (+ ``num-partitions``): one site of the simulated federation of the run's
  bundled dataset (set by Flower's simulation engine, or by hand on a SuperNode for demos/tests).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clients.connector import load_schema_file, read_site_table
from fedgov.config import RunConfig
from fedgov.datasets import Dataset, DatasetSchema, split_train_test
from fedgov.errors import ConfigError
from simulations.federation import simulated_federation


@dataclass(frozen=True)
class SiteData:
    """A site's local training and evaluation rows."""

    site_id: str
    train: Dataset
    test: Dataset

    @property
    def schema(self) -> DatasetSchema:
        return self.train.schema


def load_site_data(cfg: RunConfig, node_config: Mapping[str, Any]) -> SiteData:
    """Load and split this site's data as its node config says (cached per process)."""
    key = tuple(sorted((k, v) for k, v in node_config.items() if isinstance(v, (str, int, float))))
    d = cfg.dataset
    return _load(
        key, d.name, d.partitioner, d.alpha, d.holdout_fraction, d.test_fraction,
        cfg.federation.num_sites, cfg.seed,
    )  # fmt: skip


@functools.cache  # one entry per site this process serves
def _load(
    node_items: tuple[tuple[str, Any], ...],
    name: str,
    partitioner: str,
    alpha: float,
    holdout_fraction: float,
    test_fraction: float,
    num_sites: int,
    seed: int,
) -> SiteData:
    node_config = dict(node_items)
    if "data-path" in node_config:
        if "schema-path" not in node_config:
            raise ConfigError(
                "node config: 'data-path' needs 'schema-path' (the data's schema file)"
            )
        schema = load_schema_file(node_config["schema-path"])
        x, y = read_site_table(node_config["data-path"], schema)
        rows = Dataset(x=x, y=y, site=np.full(len(y), "", dtype=object), schema=schema)
        site_id = str(node_config.get("site-id") or Path(str(node_config["data-path"])).stem)
    elif "partition-id" in node_config:
        cfg = RunConfig()
        cfg.dataset.name, cfg.dataset.partitioner, cfg.dataset.alpha = name, partitioner, alpha
        cfg.dataset.holdout_fraction = holdout_fraction
        cfg.federation.num_sites, cfg.seed = num_sites, seed
        federation = simulated_federation(cfg)
        index = int(node_config["partition-id"])
        expected = int(node_config.get("num-partitions", len(federation.site_ids)))
        if expected != len(federation.site_ids) or not 0 <= index < expected:
            raise ConfigError(
                f"federation.num_sites: the dataset '{name}' was split into "
                f"{len(federation.site_ids)} sites but the federation has {expected} nodes "
                f"(partition-id {index})"
            )
        rows = federation.site_rows(index)
        site_id = str(node_config.get("site-id") or federation.site_ids[index])
    else:
        raise ConfigError(
            "node config: expected 'data-path' and 'schema-path' (the site's own data) or "
            "'partition-id' (a simulated site)"
        )
    train, test = split_train_test(rows, test_fraction, seed)
    return SiteData(site_id=site_id, train=train, test=test)
