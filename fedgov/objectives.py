"""Local objectives: one hook on the sites' training loss, used by plain and DP-SGD training alike.

A local objective adds a *penalty* that depends on the model's weights only — never on the
training rows — to the loss a site minimises: ``penalty(params, start)`` gets the current
parameters and the global ones the round started from and returns a scalar tensor (or None for
nothing). Training adds the penalty's gradient to the data gradient before each optimiser step
(:class:`ObjectiveTerm`): in plain SGD that is exactly minimising loss + penalty; under DP-SGD it
is added after clipping and noise, i.e. post-processing of the private gradient, so the privacy
accounting is unchanged. That is why the penalty must not read any row.

``objective=proximal`` (the default) is FedProx's μ/2·‖w − w_start‖², with μ from the round's
train config (``proximal-mu``, which the fedprox strategy sends; no μ → no term) unless
``objective.mu`` is set. ``objective._target_=mypkg.module.Name`` imports an
:class:`ObjectiveSpec` or a class whose keyword parameters are its fields and whose instances have
``penalty``; see docs/extending.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from fedgov.errors import ConfigError
from fedgov.plugins import Registry, check_options, signature_config

#: The train config key (ConfigRecord) in which FedProx sends μ.
PROXIMAL_MU_KEY = "proximal-mu"


class LocalObjective(Protocol):
    """A penalty on the weights that a site adds to its training loss."""

    def penalty(
        self, params: Sequence[torch.Tensor], start: Sequence[torch.Tensor]
    ) -> torch.Tensor | None:
        """The penalty (a scalar tensor, differentiable in ``params``) or None for none."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """How to build a local objective: ``build(options, round_config)`` → objective or None.

    ``options``: an instance of ``config_cls`` (the objective's fields, ``objective.<field>``);
    ``round_config``: the round's train config as the server sent it (e.g. ``proximal-mu``).
    """

    build: Callable[[Any, Mapping[str, Any]], LocalObjective | None]
    config_cls: type


@dataclass(frozen=True)
class Proximal:
    """FedProx's proximal term μ/2·‖w − w_start‖² (Li et al. 2020)."""

    mu: float

    def penalty(
        self, params: Sequence[torch.Tensor], start: Sequence[torch.Tensor]
    ) -> torch.Tensor | None:
        if self.mu <= 0:
            return None
        return (
            0.5 * self.mu * sum((p - p0).pow(2).sum() for p, p0 in zip(params, start, strict=True))
        )


@dataclass
class ProximalConfig:
    """``mu`` > 0 overrides the μ the round's train config carries (0 = take the round's)."""

    mu: float = 0.0

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ConfigError(f"objective.mu: {self.mu} is below its minimum 0")


def _proximal(options: ProximalConfig, round_config: Mapping[str, Any]) -> LocalObjective | None:
    mu = options.mu or float(round_config.get(PROXIMAL_MU_KEY, 0.0) or 0.0)
    return Proximal(mu) if mu > 0 else None


def _objective_from_target(where: str, obj: Any) -> ObjectiveSpec:
    """A ``_target_`` object → a spec: an ObjectiveSpec as it is, a class adapted (built from its
    fields as keywords; its instances must have ``penalty``)."""
    if isinstance(obj, ObjectiveSpec):
        return obj
    if not callable(obj):
        raise ConfigError(f"{where}: {obj!r} is neither an ObjectiveSpec nor an objective class")

    def build(options: Any, round_config: Mapping[str, Any]) -> LocalObjective:
        objective = obj(**dataclasses.asdict(options))
        if not callable(getattr(objective, "penalty", None)):
            raise ConfigError(
                f"{where}: '{getattr(obj, '__qualname__', obj)}' built a "
                f"{type(objective).__name__} without a penalty(params, start) method"
            )
        return objective

    return ObjectiveSpec(build, signature_config(obj))


OBJECTIVES: Registry[ObjectiveSpec] = Registry(
    kind="objective",
    key="objective.name",
    expected="an ObjectiveSpec or a class with a penalty(params, start) method",
    adapt=_objective_from_target,
)
OBJECTIVES.register("proximal", ObjectiveSpec(_proximal, ProximalConfig))


def build_objective(
    name: str, options: Mapping[str, Any], round_config: Mapping[str, Any]
) -> LocalObjective | None:
    """The objective ``name`` names, with its ``options``, for a round sent ``round_config``."""
    spec = OBJECTIVES.resolve(name)
    return spec.build(check_options("objective", options, spec.config_cls), round_config)


class ObjectiveTerm:
    """An objective bound to one round of local training: remembers the start weights and adds
    the penalty's gradient to ``.grad`` of the parameters (before each optimiser step)."""

    def __init__(self, objective: LocalObjective, params: Sequence[nn.Parameter]) -> None:
        self.objective = objective
        self.start = [p.detach().clone() for p in params]

    def add_gradient(self, params: Sequence[nn.Parameter]) -> None:
        """``p.grad += ∂penalty/∂p`` for every parameter (a no-op when the penalty is None)."""
        params = list(params)
        trainable = [p for p in params if p.requires_grad]
        with torch.enable_grad():
            penalty = self.objective.penalty(params, self.start)
            if penalty is None:
                return
            grads = torch.autograd.grad(penalty, trainable, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(trainable, grads, strict=True):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)


def bind(objective: LocalObjective | None, model: nn.Module) -> ObjectiveTerm | None:
    """The objective bound to ``model``'s current (start) weights; None without an objective."""
    return None if objective is None else ObjectiveTerm(objective, list(model.parameters()))


def resolve_objective(
    objective: LocalObjective | None, proximal_mu: float
) -> LocalObjective | None:
    """``objective``, or FedProx's term for a bare ``proximal_mu`` > 0 (the older keyword)."""
    if objective is not None:
        return objective
    return Proximal(proximal_mu) if proximal_mu > 0 else None
