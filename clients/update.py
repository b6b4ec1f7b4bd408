"""One site's contribution to a round: train the global model locally, or decline.

Every path that releases a site's update (the plain train message, and later the secure-
aggregation stages) goes through :func:`compute_update`, so the site's own checks (data
validation, privacy budget) apply to all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord

from clients.site_data import SiteData
from clients.training import site_round_seed, train_local
from fedgov import messages as keys
from fedgov.config import RunConfig
from fedgov.models import build_model
from fedgov.records import load_array_record


class SiteDeclined(Exception):
    """The site refuses to train this round; ``reason`` travels back to the server."""

    def __init__(self, reason: str, **details: int | float | str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


@dataclass
class SiteUpdate:
    """The locally trained weights and the metrics that go back with them."""

    arrays: ArrayRecord
    metrics: MetricRecord


def site_model(cfg: RunConfig, site: SiteData, arrays: ArrayRecord) -> torch.nn.Module:
    """The run's model for this site's schema, loaded with ``arrays``."""
    schema = site.schema
    model = build_model(cfg.model.name, schema.input_shape, len(schema.classes), cfg.model.hidden)
    load_array_record(model, arrays)
    return model


def compute_update(
    cfg: RunConfig,
    site: SiteData,
    global_arrays: ArrayRecord,
    config: ConfigRecord,
    context: Context,
) -> SiteUpdate:
    """Train ``global_arrays`` on the site's rows; raise :class:`SiteDeclined` to refuse."""
    model = site_model(cfg, site, global_arrays)
    server_round = int(config.get(keys.SERVER_ROUND, 0))
    result = train_local(
        model,
        site.train,
        cfg.train,
        seed=site_round_seed(cfg.seed, server_round, site.site_id),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    metrics = MetricRecord(
        {"train_loss": result.train_loss, keys.NUM_EXAMPLES: result.num_examples,
         "steps": result.steps}
    )  # fmt: skip
    return SiteUpdate(arrays=ArrayRecord(model.state_dict()), metrics=metrics)
