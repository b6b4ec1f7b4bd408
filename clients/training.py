"""Local training and evaluation at a site: plain functions of (model, rows, settings)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedgov.config import TrainConfig
from fedgov.datasets import Dataset
from fedgov.objectives import LocalObjective, bind, resolve_objective


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did: mean loss over its batches, rows and SGD steps."""

    train_loss: float
    num_examples: int
    steps: int


def site_round_seed(seed: int, server_round: int, site_id: str) -> int:
    """A 63-bit seed for one site's round, stable across processes (unlike ``hash()``)."""
    digest = hashlib.sha256(f"{seed}:{server_round}:{site_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def train_local(
    model: nn.Module,
    rows: Dataset,
    settings: TrainConfig,
    *,
    seed: int,
    objective: LocalObjective | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """SGD with momentum for ``settings.local_epochs`` over ``rows``, shuffled by ``seed``.

    ``objective``'s penalty (``fedgov.objectives``) joins the loss; ``proximal_mu`` > 0 without
    an objective is FedProx's μ/2·‖w − w_start‖², w_start being the round's global weights.
    ``train_loss`` is the data loss only.
    """
    x = torch.from_numpy(rows.x)
    y = torch.from_numpy(rows.y)
    n = len(y)
    if n == 0:
        return TrainResult(train_loss=0.0, num_examples=0, steps=0)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    criterion = nn.CrossEntropyLoss()
    term = bind(resolve_objective(objective, proximal_mu), model)
    model.train()
    total_loss, steps = 0.0, 0
    for _ in range(settings.local_epochs):
        order = torch.from_numpy(rng.permutation(n))
        for begin in range(0, n, settings.batch_size):
            batch = order[begin : begin + settings.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x[batch]), y[batch])
            total_loss += float(loss.detach())
            loss.backward()
            if term is not None:
                term.add_gradient(model.parameters())
            optimizer.step()
            steps += 1
    return TrainResult(train_loss=total_loss / steps, num_examples=n, steps=steps)
