"""Model definitions shared by the server (initial weights, central evaluation) and the sites."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedgov.errors import ConfigError


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on the flattened input."""

    def __init__(self, num_inputs: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_inputs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Two hidden ReLU layers (hidden, hidden // 2) on the flattened input."""

    def __init__(self, num_inputs: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(num_inputs, hidden),
            nn.ReLU(),
            nn.Linear(hidden, max(hidden // 2, 1)),
            nn.ReLU(),
            nn.Linear(max(hidden // 2, 1), num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


class SmallCNN(nn.Module):
    """Two conv + max-pool blocks and a linear head, for 1-channel images (8×8 up to 28×28)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 16) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 2 * channels * (height // 4) * (width // 4)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, hidden: int = 64
) -> nn.Module:
    """Build the model called ``name`` ("mlp", "logreg", "cnn") for inputs of ``input_shape``."""
    num_inputs = math.prod(input_shape)
    if name == "mlp":
        return MLP(num_inputs, num_classes, hidden)
    if name == "logreg":
        return LogisticRegression(num_inputs, num_classes)
    if name == "cnn":
        if len(input_shape) != 3:
            raise ConfigError(f"model.name: 'cnn' needs image input (C, H, W), got {input_shape}")
        return SmallCNN(input_shape, num_classes, channels=max(hidden // 4, 4))
    raise ConfigError(f"model.name: '{name}' is not one of mlp, logreg, cnn")


def initial_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, hidden: int, seed: int
) -> nn.Module:
    """The global model at round 0: same seed → the same initial weights on every machine."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build_model(name, input_shape, num_classes, hidden)
    finally:
        torch.random.set_rng_state(generator_state)
