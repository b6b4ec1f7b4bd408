"""A run's config checked against every plug-in registry: the step between parsing and running.

``fedgov.config`` (the core) parses a config and checks what it can alone: types, ranges, and
the plug-ins of its own registries (dataset, model, local objective). The strategy
(``strategies.registry``), the partitioner (``fedgov_data.partitioners``) and the privacy
accountant (``privacy.accountants``) live in layers above the core, so they are resolved here,
with what depends on them: SecAgg+ and site-level DP serve only a strategy whose spec aggregates
by ``"mean"``. Whatever builds a RunConfig for a run (the simulation, the ServerApp and
ClientApp, the CLI) loads it with :func:`load_run_config` or :func:`run_config_from_mapping`, or
checks one it changed with :func:`check_run_config`. A mistake is one ConfigError line naming the
key and what was expected.
"""

from __future__ import annotations

from typing import Any

from fedgov.config import RunConfig, from_flower_config, from_mapping, site_level_on, validate
from fedgov.errors import ConfigError
from fedgov_data.partitioners import PARTITIONERS
from privacy.accountants import ACCOUNTANTS
from strategies.registry import STRATEGIES, strategy_spec


def load_run_config(flat: dict[str, Any]) -> RunConfig:
    """A RunConfig from Flower's flat run config, every plug-in resolved and checked."""
    cfg = from_flower_config(flat)
    check_plugins(cfg)
    return cfg


def run_config_from_mapping(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from a nested mapping (a resolved Hydra config), every plug-in checked."""
    cfg = from_mapping(data)
    check_plugins(cfg)
    return cfg


def check_run_config(cfg: RunConfig) -> None:
    """The core's checks (``fedgov.config.validate``), then :func:`check_plugins`."""
    validate(cfg)
    check_plugins(cfg)


def check_plugins(cfg: RunConfig) -> None:
    """The strategy, partitioner and accountant resolve (registered name or importable
    ``_target_``) and the strategy takes its options; SecAgg+ and site-level DP get a strategy
    whose spec aggregates by ``"mean"``."""
    PARTITIONERS.resolve(cfg.dataset.partitioner)
    spec = strategy_spec(cfg.strategy)
    ACCOUNTANTS.resolve(cfg.privacy.accountant)
    if spec.serves_a_sum:
        return
    if site_level_on(cfg):
        raise ConfigError(
            f"strategy.name: '{cfg.strategy.name}' needs each site's update, which site-level "
            f"DP hides; with privacy.name={cfg.privacy.name} use a strategy whose spec "
            f"aggregates by 'mean' ({', '.join(mean_strategies())})"
        )
    if cfg.secagg.name != "off":
        raise ConfigError(
            f"secagg.name: '{cfg.secagg.name}' hides individual updates, but strategy "
            f"'{cfg.strategy.name}' needs them (its spec aggregates 'per-update'); use a 'mean' "
            f"strategy ({', '.join(mean_strategies())}) or secagg=off"
        )


def mean_strategies() -> list[str]:
    """The registered strategies whose spec aggregates by a weighted mean."""
    return [name for name in STRATEGIES if STRATEGIES.resolve(name).serves_a_sum]
