"""Model definitions shared by the server (initial weights, central evaluation) and the sites."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedgov.errors import ConfigError
from fedgov.plugins import NoOptions, Registry, check_options, signature_config


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


def gabor_filter_bank(
    size: int = 7, orientations: int = 8, frequencies: tuple[float, ...] = (0.25, 0.125)
) -> torch.Tensor:
    """Fixed Gabor filters (size×size), a cosine/sine pair per orientation and frequency.

    Shape (2·orientations·len(frequencies), 1, size, size); every filter has unit L2 norm and the
    cosine ones zero mean. Nothing here depends on data.
    """
    r = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    filters = []
    for frequency in frequencies:
        sigma = 0.56 / frequency  # about one octave of bandwidth
        envelope = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
        for k in range(orientations):
            theta = math.pi * k / orientations
            phase = 2 * math.pi * frequency * (xx * math.cos(theta) + yy * math.sin(theta))
            even = envelope * torch.cos(phase)
            even = even - even.mean()
            odd = envelope * torch.sin(phase)
            filters += [even / even.norm(), odd / odd.norm()]
    return torch.stack(filters)[:, None]


class GaborLinear(nn.Module):
    """A linear classifier on fixed Gabor-energy features: a DP-friendly image model.

    Features (no trainable weight, nothing learnt from data): the modulus of 16 complex Gabor
    responses (8 orientations × 2 frequencies) and the image itself, average-pooled 4×4, then
    normalised per image (group norm without affine weights). Only the linear head trains, so
    DP-SGD's noise lands on ~8k weights instead of a CNN's ~100k — the approach of Tramèr & Boneh,
    "Differentially private learning needs better features (or much more data)", ICLR 2021,
    with Gabor filters standing in for their scattering network.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, pool: int = 4) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        if in_channels != 1:
            raise ConfigError(f"model.name: 'gabor' needs 1-channel images, got {input_shape}")
        self.register_buffer("filters", gabor_filter_bank())
        self.pool = pool
        pairs = self.filters.shape[0] // 2
        self.head = nn.Linear((pairs + 1) * (height // pool) * (width // pool), num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        responses = F.conv2d(x, self.filters, padding=self.filters.shape[-1] // 2)
        pairs = responses.view(responses.shape[0], -1, 2, *responses.shape[2:])
        energy = (pairs.pow(2).sum(2) + 1e-6).sqrt()
        pooled = torch.cat([F.avg_pool2d(x, self.pool), F.avg_pool2d(energy, self.pool)], 1)
        return F.group_norm(pooled, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---- the model registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model: ``build(input_shape, num_classes, hidden, options)`` → module.

    ``config_cls``: the dataclass of the model's own fields (``model.<field>``); ``needs_image``:
    whether it takes only (C, H, W) input, so a tabular dataset is refused before anything runs.
    """

    build: Callable[[tuple[int, ...], int, int, Any], nn.Module]
    config_cls: type = NoOptions
    needs_image: bool = False


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(input_shape) != 3:
        raise ConfigError(f"model.name: '{name}' needs image input (C, H, W), got {input_shape}")
    return input_shape


def _model_from_target(where: str, obj: Any) -> ModelSpec:
    """A ``_target_`` object → a spec: a ModelSpec as it is, an ``nn.Module`` class (or factory)
    adapted: called with ``input_shape``, ``num_classes`` (and ``hidden`` when it takes it) and
    its own fields as keywords."""
    if isinstance(obj, ModelSpec):
        return obj
    if not callable(obj):
        raise ConfigError(f"{where}: {obj!r} is neither a ModelSpec nor an nn.Module class")
    parameters = inspect.signature(obj).parameters
    missing = [name for name in ("input_shape", "num_classes") if name not in parameters]
    if missing:
        raise ConfigError(
            f"{where}: '{getattr(obj, '__qualname__', obj)}' takes no '{missing[0]}', expected "
            "an nn.Module class taking input_shape and num_classes (and its own fields)"
        )
    takes_hidden = "hidden" in parameters

    def build(input_shape: tuple[int, ...], num_classes: int, hidden: int, options: Any):
        extra = {"hidden": hidden} if takes_hidden else {}
        own = dataclasses.asdict(options)
        model = obj(input_shape=input_shape, num_classes=num_classes, **extra, **own)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"{where}: '{getattr(obj, '__qualname__', obj)}' built a "
                f"{type(model).__name__}, expected a torch.nn.Module"
            )
        return model

    config = signature_config(obj, skip=("input_shape", "num_classes", "hidden"))
    return ModelSpec(build, config, needs_image=bool(getattr(obj, "needs_image", False)))


MODELS: Registry[ModelSpec] = Registry(
    kind="model",
    key="model.name",
    expected="a ModelSpec or an nn.Module class taking input_shape and num_classes",
    adapt=_model_from_target,
)
MODELS.register("mlp", ModelSpec(lambda shape, k, hidden, _: MLP(math.prod(shape), k, hidden)))
MODELS.register(
    "logreg", ModelSpec(lambda shape, k, hidden, _: LogisticRegression(math.prod(shape), k))
)
MODELS.register(
    "cnn",
    ModelSpec(
        lambda shape, k, hidden, _: SmallCNN(
            _image_shape("cnn", shape), k, channels=max(hidden // 4, 4)
        ),
        needs_image=True,
    ),
)
MODELS.register(
    "gabor",
    ModelSpec(
        lambda shape, k, hidden, _: GaborLinear(_image_shape("gabor", shape), k),
        needs_image=True,
    ),
)


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: int = 64,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build the model ``name`` names (mlp, logreg, cnn, gabor, or a ``_target_`` path) for
    ``input_shape`` with its own fields ``options``."""
    spec = MODELS.resolve(name)
    checked = check_options("model", options or {}, spec.config_cls)
    return spec.build(tuple(input_shape), num_classes, hidden, checked)


def initial_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: int,
    seed: int,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The global model at round 0: same seed → the same initial weights on every machine."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build_model(name, input_shape, num_classes, hidden, options)
    finally:
        torch.random.set_rng_state(generator_state)
