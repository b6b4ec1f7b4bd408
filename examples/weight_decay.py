"""A local objective in one file: L2 weight decay, λ/2·‖w‖², on every site's training loss.

    python -m simulations.run objective._target_=examples.weight_decay.WeightDecay \\
        +objective.weight=0.01

The penalty depends on the weights only (never on a row), so it also runs under DP-SGD
(``privacy=sample_dp``): its gradient λ·w is added after clipping and noise, as post-processing.
With plain SGD it equals ``torch.optim.SGD(weight_decay=λ)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class WeightDecay:
    """λ/2·Σ‖p‖² over every parameter (biases included)."""

    def __init__(self, weight: float = 0.01) -> None:
        if weight < 0:
            raise ValueError(f"weight {weight} must be ≥ 0")
        self.weight = weight

    def penalty(
        self, params: Sequence[torch.Tensor], start: Sequence[torch.Tensor]
    ) -> torch.Tensor | None:
        if self.weight == 0:
            return None
        return 0.5 * self.weight * sum(p.pow(2).sum() for p in params)
