"""Config names → Flower strategies (``conf/strategy/<name>.yaml`` ↔ an entry here).

fedgov samples the sites itself (seeded, by site id) and hands the strategy a grid that shows only
those sites, so every strategy is built to address all the nodes it is shown.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg, Krum, Strategy

from fedgov.config import StrategyConfig
from fedgov.errors import ConfigError

# Sample every node the (already sampled) grid view shows.
_ADDRESS_ALL = {
    "fraction_train": 1.0,
    "fraction_evaluate": 1.0,
    "min_train_nodes": 1,
    "min_evaluate_nodes": 1,
    "min_available_nodes": 1,
}


def _fedavg(cfg: StrategyConfig) -> Strategy:
    return FedAvg(**_ADDRESS_ALL)


def _fedprox(cfg: StrategyConfig) -> Strategy:
    return FedProx(**_ADDRESS_ALL, proximal_mu=cfg.proximal_mu)


def _fedadam(cfg: StrategyConfig) -> Strategy:
    return FedAdam(
        **_ADDRESS_ALL,
        eta=cfg.server_lr,
        tau=cfg.server_tau,
        beta_1=cfg.beta_1,
        beta_2=cfg.beta_2,
    )


def _fedtrimmedavg(cfg: StrategyConfig) -> Strategy:
    return FedTrimmedAvg(**_ADDRESS_ALL, beta=cfg.trim_beta)


def _krum(cfg: StrategyConfig) -> Strategy:
    return Krum(**_ADDRESS_ALL, num_malicious_nodes=cfg.num_malicious)


STRATEGIES: dict[str, Callable[[StrategyConfig], Strategy]] = {
    "fedavg": _fedavg,
    "fedprox": _fedprox,
    "fedadam": _fedadam,
    "fedtrimmedavg": _fedtrimmedavg,
    "krum": _krum,
}


def build_strategy(cfg: StrategyConfig) -> Strategy:
    """The Flower strategy named ``cfg.name``, configured from ``cfg``."""
    try:
        factory = STRATEGIES[cfg.name]
    except KeyError:
        raise ConfigError(
            f"strategy.name: '{cfg.name}' is not one of {', '.join(STRATEGIES)}"
        ) from None
    return factory(cfg)
