"""Evaluating a model on rows: the same computation at a site and on the server's held-out set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedgov.datasets import Dataset


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy loss and accuracy over ``num_examples`` rows."""

    loss: float
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate(model: nn.Module, rows: Dataset, batch_size: int = 1024) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``rows``."""
    n = len(rows.y)
    if n == 0:
        return EvalResult(loss=0.0, accuracy=0.0, num_examples=0)
    model.eval()
    x = torch.from_numpy(rows.x)
    y = torch.from_numpy(rows.y)
    loss_sum, correct = 0.0, 0
    for begin in range(0, n, batch_size):
        logits = model(x[begin : begin + batch_size])
        target = y[begin : begin + batch_size]
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return EvalResult(loss=loss_sum / n, accuracy=correct / n, num_examples=n)
