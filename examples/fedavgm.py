"""FedAvgM (Hsu et al. 2019, "Measuring the effects of non-identical data distribution"): FedAvg
with server momentum, as a fedgov strategy in one file.

    python -m simulations.run strategy._target_=examples.fedavgm.FedAvgM \\
        +strategy.server_momentum=0.9

Each round: Δ = w − mean(w_i) (the weighted mean of the sites' weights), v ← β·v + Δ,
w ← w − η·v. It needs only the weighted mean, so it declares ``aggregate = "mean"`` and runs under
``secagg=secaggplus`` and site-level DP too (fedgov then hands it one reply holding the mean).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class FedAvgM(FedAvg):
    """FedAvg with server learning rate ``server_lr`` (η) and momentum ``server_momentum`` (β)."""

    aggregate = "mean"  # fedgov: a weighted mean of the updates is all it needs

    def __init__(self, *, server_lr: float = 1.0, server_momentum: float = 0.9, **kwargs) -> None:
        super().__init__(**kwargs)
        if server_lr <= 0 or not 0 <= server_momentum < 1:
            raise ValueError(
                f"server_lr {server_lr} must be > 0 and server_momentum {server_momentum} in [0, 1)"
            )
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.current: dict[str, np.ndarray] | None = None
        self.velocity: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = {name: array.numpy() for name, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None or self.current is None:
            return mean, metrics
        averaged = {name: array.numpy() for name, array in mean.items()}
        delta = {name: self.current[name] - averaged[name] for name in self.current}
        if self.velocity is None:
            self.velocity = delta
        else:
            self.velocity = {
                name: self.server_momentum * self.velocity[name] + delta[name] for name in delta
            }
        updated = {
            name: (self.current[name] - self.server_lr * self.velocity[name]).astype(
                self.current[name].dtype
            )
            for name in self.current
        }
        return ArrayRecord({name: Array(value) for name, value in updated.items()}), metrics
