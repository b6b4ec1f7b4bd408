"""A user model in one file: one hidden layer of ``width`` tanh units.

    python -m simulations.run model._target_=examples.tiny_mlp.TinyMLP +model.width=4

fedgov calls it with ``input_shape`` (the schema's, e.g. ``(3,)``) and ``num_classes``, plus its
own fields (``width``) from ``model.<field>``. It has (∏input_shape + 1)·width + (width + 1)·classes
trainable weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Flatten → Linear(width) → tanh → Linear(num_classes)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 8) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width {width} must be ≥ 1")
        self.hidden = nn.Linear(math.prod(input_shape), width)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x.flatten(1))))
