"""Where a site's rows come from: its own file (deployment) or a simulated partition.

The node config decides, never the server's messages:
- ``data-path`` (+ ``schema-path``): the site's own CSV/Parquet, validated against its schema;
- ``partition-id`` (+ ``num-partitions``): one site of the simulated federation of the run's
  bundled dataset (set by Flower's simulation engine, or by hand on a SuperNode for demos/tests).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedgov.config import RunConfig
from fedgov.datasets import Dataset, DatasetSchema, split_train_test
from fedgov.errors import ConfigError
from fedgov_data.connector import load_schema_file, read_site_table
from fedgov_data.federation import simulated_federation


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
        key,
        d.name,
        d.partitioner,
        d.alpha,
        d.holdout_fraction,
        d.test_fraction,
        cfg.federation.num_sites,
        cfg.seed,
        json.dumps(d.options, sort_keys=True),
    )


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
    dataset_options: str = "{}",
) -> SiteData:
    node_config = dict(node_items)
    if "data-path" in node_config:
        if "schema-path" not in node_config:
            raise ConfigError(
                "node config: 'data-path' needs 'schema-path' (the data's schema file)"
            )
        schema, x, y = read_site_rows(node_config["data-path"], node_config["schema-path"])
        rows = Dataset(x=x, y=y, site=np.full(len(y), "", dtype=object), schema=schema)
        site_id = str(node_config.get("site-id") or Path(str(node_config["data-path"])).stem)
    elif "partition-id" in node_config:
        cfg = RunConfig()
        cfg.dataset.name, cfg.dataset.partitioner, cfg.dataset.alpha = name, partitioner, alpha
        cfg.dataset.holdout_fraction = holdout_fraction
        cfg.dataset.options = json.loads(dataset_options)
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


# ---- a site's own file, read once per file version ----------------------------------------------
#: (data path, schema path) → (the two files' identities, what was read). A site daemon's zygote
#: fills it before forking (clients/zygote.py), so each forked ClientApp task finds its rows
#: parsed and validated instead of reading the file again (~0.1-0.2 s per message).
_ROWS: dict[tuple[str, str], tuple[tuple, tuple[DatasetSchema, np.ndarray, np.ndarray]]] = {}
#: Environment naming the site's data and schema files (set by ``fedgov site start``).
DATA_ENV, SCHEMA_ENV = "FEDGOV_SITE_DATA", "FEDGOV_SITE_SCHEMA"


def _identity(path: str) -> tuple:
    stat = os.stat(path)
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def read_site_rows(
    data_path: str | Path, schema_path: str | Path
) -> tuple[DatasetSchema, np.ndarray, np.ndarray]:
    """The schema and the validated ``(x, y)`` of a site's file; read again whenever either
    file changed (another inode, size or modification time), else served from memory."""
    key = (str(data_path), str(schema_path))
    try:
        identity = (_identity(key[0]), _identity(key[1]))
    except OSError:
        identity = None  # missing or unreadable: read_site_table says so in one line
    cached = _ROWS.get(key)
    if identity is not None and cached is not None and cached[0] == identity:
        return cached[1]
    schema = load_schema_file(schema_path)
    x, y = read_site_table(data_path, schema)
    x.setflags(write=False)  # shared by every task forked after this: nobody may edit it
    y.setflags(write=False)
    if identity is not None:
        _ROWS[key] = (identity, (schema, x, y))
    return schema, x, y


def preload_site_rows(environ: Mapping[str, str] = os.environ) -> bool:
    """Read the site's file named in the environment (a site daemon's zygote, before forking);
    False when none is named."""
    data, schema = environ.get(DATA_ENV), environ.get(SCHEMA_ENV)
    if not data or not schema:
        return False
    read_site_rows(data, schema)
    return True
