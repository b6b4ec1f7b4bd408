"""The strategy registry: each aggregation rule as a :class:`StrategySpec`, fedgov's own included.

A spec says how to build the Flower strategy from the strategy's own config dataclass and how it
aggregates: ``"mean"`` (a weighted mean of the updates, then anything that depends on that mean
only: a secure sum or site-level DP noise on the sum serves it) or ``"per-update"`` (it needs each
site's update: Krum, trimmed mean). SecAgg+ and site-level DP accept exactly the ``"mean"`` ones.

``strategy=<name>`` picks a registered spec (``conf/strategy/<name>.yaml`` sets its fields);
``strategy._target_=mypkg.module.Name`` imports a :class:`StrategySpec` or a Flower ``Strategy``
class (its keyword parameters are its fields; a class attribute ``aggregate = "mean"`` declares
it a mean, anything else is treated as per-update). See docs/extending.md.

fedgov samples the sites itself (seeded, by site id) and hands the strategy a grid that shows only
those sites, so every strategy is built to address all the nodes it is shown.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fedgov.errors import ConfigError
from fedgov.plugins import Registry, check_options, one_line, signature_config

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from fedgov.config import StrategyConfig

AGGREGATES = ("mean", "per-update")

# Sample every node the (already sampled) grid view shows.
ADDRESS_ALL: dict[str, float | int] = {
    "fraction_train": 1.0,
    "fraction_evaluate": 1.0,
    "min_train_nodes": 1,
    "min_evaluate_nodes": 1,
    "min_available_nodes": 1,
}


@dataclass(frozen=True)
class StrategySpec:
    """How to build one aggregation rule and what fedgov may assume about it.

    ``build(options)``: the Flower strategy, addressing every node it is shown (see
    :data:`ADDRESS_ALL`), from an instance of ``config_cls``; ``config_cls``: the dataclass of the
    strategy's own fields (``strategy.<field>`` in the config), range checks in its
    ``__post_init__``; ``aggregate``: ``"mean"`` or ``"per-update"`` (see the module docstring).
    """

    build: Callable[[Any], Strategy]
    config_cls: type
    aggregate: Literal["mean", "per-update"]

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise ConfigError(
                f"strategy: aggregate '{self.aggregate}' is not one of {', '.join(AGGREGATES)}"
            )

    @property
    def serves_a_sum(self) -> bool:
        """Whether a sum of the weighted updates is all it needs (SecAgg+, site-level DP)."""
        return self.aggregate == "mean"


def _from_target(where: str, obj: Any) -> StrategySpec:
    """A ``_target_`` object → its spec: a StrategySpec as it is, a class or factory adapted."""
    if isinstance(obj, StrategySpec):
        return obj
    if not callable(obj):
        raise ConfigError(
            f"{where}: {obj!r} is neither a StrategySpec nor a Flower Strategy class or factory"
        )
    aggregate = getattr(obj, "aggregate", "per-update")
    if aggregate not in AGGREGATES:
        aggregate = "per-update"  # an undeclared rule may need each update: the safe assumption
    parameters = inspect.signature(obj).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    address = {k: v for k, v in ADDRESS_ALL.items() if takes_any or k in parameters}
    config_cls = signature_config(obj, skip=tuple(ADDRESS_ALL))

    def build(options: Any) -> Strategy:
        return obj(**address, **dataclasses.asdict(options))

    return StrategySpec(build=build, config_cls=config_cls, aggregate=aggregate)


STRATEGIES: Registry[StrategySpec] = Registry(
    kind="strategy",
    key="strategy.name",
    expected="a StrategySpec or a flwr.serverapp.strategy.Strategy class",
    adapt=_from_target,
)


# ---- fedgov's own strategies: Flower's, each with its own fields ---------------------------------


@dataclass
class FedAvgConfig:
    """Federated averaging (McMahan et al. 2017): no fields."""


@dataclass
class FedProxConfig:
    """FedProx (Li et al. 2020): the sites add μ/2·‖w − w_global‖² (the proximal objective)."""

    proximal_mu: float = 0.0  # μ ≥ 0

    def __post_init__(self) -> None:
        if self.proximal_mu < 0:
            raise ConfigError(f"strategy.proximal_mu: {self.proximal_mu} is below its minimum 0")


@dataclass
class FedAdamConfig:
    """FedAdam (Reddi et al. 2021): Adam on the server over the averaged update."""

    server_lr: float = 0.1  # η
    server_tau: float = 1e-3  # adaptivity τ
    beta_1: float = 0.9
    beta_2: float = 0.99


@dataclass
class FedTrimmedAvgConfig:
    """Coordinate-wise trimmed mean (Yin et al. 2018)."""

    trim_beta: float = 0.2  # fraction cut from each end, in [0, 0.5)

    def __post_init__(self) -> None:
        if not 0 <= self.trim_beta < 0.5:
            raise ConfigError(f"strategy.trim_beta: {self.trim_beta} not in [0, 0.5)")


@dataclass
class KrumConfig:
    """Krum (Blanchard et al. 2017): picks the update closest to its neighbours."""

    num_malicious: int = 0  # Byzantine sites tolerated, ≥ 0

    def __post_init__(self) -> None:
        if self.num_malicious < 0:
            raise ConfigError(
                f"strategy.num_malicious: {self.num_malicious} is below its minimum 0"
            )


def _fedavg(options: FedAvgConfig) -> Strategy:
    from flwr.serverapp.strategy import FedAvg

    return FedAvg(**ADDRESS_ALL)


def _fedprox(options: FedProxConfig) -> Strategy:
    from flwr.serverapp.strategy import FedProx

    return FedProx(**ADDRESS_ALL, proximal_mu=options.proximal_mu)


def _fedadam(options: FedAdamConfig) -> Strategy:
    from flwr.serverapp.strategy import FedAdam

    return FedAdam(
        **ADDRESS_ALL,
        eta=options.server_lr,
        tau=options.server_tau,
        beta_1=options.beta_1,
        beta_2=options.beta_2,
    )


def _fedtrimmedavg(options: FedTrimmedAvgConfig) -> Strategy:
    from flwr.serverapp.strategy import FedTrimmedAvg

    return FedTrimmedAvg(**ADDRESS_ALL, beta=options.trim_beta)


def _krum(options: KrumConfig) -> Strategy:
    from flwr.serverapp.strategy import Krum

    return Krum(**ADDRESS_ALL, num_malicious_nodes=options.num_malicious)


STRATEGIES.register("fedavg", StrategySpec(_fedavg, FedAvgConfig, "mean"))
STRATEGIES.register("fedprox", StrategySpec(_fedprox, FedProxConfig, "mean"))
STRATEGIES.register("fedadam", StrategySpec(_fedadam, FedAdamConfig, "mean"))
STRATEGIES.register(
    "fedtrimmedavg", StrategySpec(_fedtrimmedavg, FedTrimmedAvgConfig, "per-update")
)
STRATEGIES.register("krum", StrategySpec(_krum, KrumConfig, "per-update"))


def strategy_spec(cfg: StrategyConfig) -> StrategySpec:
    """The spec ``cfg.name`` names (registered, or a ``_target_`` path), its options checked."""
    spec = STRATEGIES.resolve(cfg.name)
    check_options("strategy", cfg.options, spec.config_cls)
    return spec


def build_strategy(cfg: StrategyConfig) -> Strategy:
    """The Flower strategy ``cfg.name`` names, configured from its options ``cfg.options``."""
    from flwr.serverapp.strategy import Strategy

    spec = STRATEGIES.resolve(cfg.name)
    options = check_options("strategy", cfg.options, spec.config_cls)
    try:
        strategy = spec.build(options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"strategy: '{cfg.name}' refused its options ({one_line(error)})"
        ) from None
    if not isinstance(strategy, Strategy):
        raise ConfigError(
            f"strategy._target_: '{cfg.name}' built a {type(strategy).__name__}, expected a "
            "flwr.serverapp.strategy.Strategy"
        )
    return strategy
