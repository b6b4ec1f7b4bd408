"""Coordinate-wise median (Yin et al. 2018) as a fedgov strategy in one file: a rule that needs
every site's update, so it declares ``aggregate = "per-update"`` and fedgov refuses it under
``secagg=secaggplus`` or site-level DP (which hide the individual updates).

    python -m simulations.run strategy._target_=examples.median.CoordinateMedian
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg


class CoordinateMedian(FedAvg):
    """The element-wise median of the sites' weights (unweighted)."""

    aggregate = "per-update"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [reply for reply in replies if reply.has_content()]
        if not replies:
            return None, None
        weights = [reply.content.array_records["arrays"] for reply in replies]
        median = {
            name: np.median(np.stack([w[name].numpy() for w in weights]), axis=0).astype(
                weights[0][name].numpy().dtype
            )
            for name in weights[0]
        }
        _, metrics = super().aggregate_train(server_round, replies)
        return ArrayRecord({name: Array(value) for name, value in median.items()}), metrics
