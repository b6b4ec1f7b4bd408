"""The run configuration: one typed schema for Hydra, Flower's run config and the apps.

Hydra composes `conf/` onto :class:`RunConfig` (so a typo or a wrong type fails before anything
runs); :func:`to_flower_config` flattens it into Flower's flat run config (``"strategy.name"``,
``"rounds"``, ...), which is also what ``[tool.flwr.app.config]`` in ``pyproject.toml`` holds, and
:func:`from_flower_config` rebuilds the typed object inside the ServerApp and ClientApp.
Flower's run config holds only scalars (bool, int, float, str), so every field here is a scalar.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedgov.errors import ConfigError

STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedtrimmedavg", "krum")
MODEL_NAMES = ("mlp", "logreg", "cnn")
PARTITIONERS = ("natural", "iid", "dirichlet")
SECAGG_NAMES = ("off", "secaggplus")
# Strategies whose aggregate is a weighted mean, so a secure sum of the updates is all they need.
SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedadam")


@dataclass
class DatasetConfig:
    """Which data the simulated sites hold and how it is split among them."""

    name: str = "randhie"
    partitioner: str = "natural"  # natural (by site column) | iid | dirichlet (label skew)
    alpha: float = 0.5  # Dirichlet concentration; smaller = more label skew
    holdout_fraction: float = 0.2  # share kept back for central evaluation (0 = none)
    test_fraction: float = 0.2  # share of each site's rows kept for its local evaluation


@dataclass
class ModelConfig:
    """The model every site trains: mlp | logreg (tabular) or cnn (images)."""

    name: str = "mlp"
    hidden: int = 64  # width of the MLP's hidden layers / channels of the CNN's first conv


@dataclass
class StrategyConfig:
    """The aggregation rule; fields a rule does not use are ignored by it."""

    name: str = "fedavg"
    proximal_mu: float = 0.0  # FedProx: weight of the proximal term μ/2·‖w − w_global‖²
    server_lr: float = 0.1  # FedAdam: server learning rate η
    server_tau: float = 1e-3  # FedAdam: adaptivity τ
    beta_1: float = 0.9  # FedAdam
    beta_2: float = 0.99  # FedAdam
    trim_beta: float = 0.2  # FedTrimmedAvg: fraction cut from each end, in [0, 0.5)
    num_malicious: int = 0  # Krum: number of Byzantine sites tolerated


@dataclass
class TrainConfig:
    """Local training at each site per round."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05  # SGD learning rate
    momentum: float = 0.9


@dataclass
class FederationConfig:
    """How many sites exist, how many train per round, and where the simulation runs."""

    num_sites: int = 0  # 0 = every natural site (or 10 for iid/dirichlet)
    # ≥ 1: a count of sites per round; in (0, 1): a fraction of the connected sites; 0: all
    sites_per_round: float = 0.0
    min_sites_per_round: int = 2  # floor when sampling by fraction
    round_timeout: float = 600.0  # seconds to wait for the sites' replies in one round
    client_cpus: float = 1.0  # Ray resources per simulated site
    ray_address: str = ""  # "" = local Ray; "auto" or "ray://host:10001" = an existing cluster


@dataclass
class PrivacyConfig:
    """Differential privacy (filled in by the privacy issue); "none" = off."""

    name: str = "none"


@dataclass
class SecAggConfig:
    """Secure aggregation: "off" (the server sees each update) or "secaggplus" (only the sum).

    secaggplus: SecAgg+ (Bell et al. 2020) on Flower's Message API, see privacy/secagg/. Each
    site's update (local − global) is clipped to ±``clip_range`` per value, weighted, quantised
    into the ring Z_{2^bits} and masked; the server unmasks only the sum of the survivors.
    """

    name: str = "off"
    # Shares needed to rebuild a site's secrets: a fraction in (0.5, 1] of its share group (the
    # site and its neighbours) or a count ≥ 2; never less than a strict majority of the group.
    threshold: float = 0.66
    neighbours: int = 0  # k, mask partners per site; 0 = all sites up to 64, then 8·⌈log2 n⌉
    clip_range: float = 1.0  # each value of a site's update is clipped to [−clip_range, clip_range]
    bits: int = 32  # the ring Z_{2^bits}: 32 (uint32 on the wire) or 64 (finer, twice the bytes)
    max_weight: int = 100_000  # the largest weight (example count) a site may claim
    timeout: float = 0.0  # seconds to wait for each stage's replies; 0 = federation.round_timeout


@dataclass
class RegistryConfig:
    """Publishing the final model to the governed registry (``server/registry``) after the run."""

    publish: bool = False  # publish the final global model as a new candidate version
    path: str = ""  # registry folder; "" = $FEDGOV_REGISTRY or ./.fedgov/registry
    db_url: str = ""  # SQLAlchemy URL of its metadata; "" = SQLite in the folder (registry.db)
    model_name: str = ""  # "" = "<dataset>-<model>" (e.g. randhie-mlp)
    # The server's Ed25519 private key (PEM) that signs manifests; "" = <path>/keys/publisher.key.
    # Generated on first use when absent; the policy must list its public key as a publisher.
    signing_key: str = ""


@dataclass
class RunConfig:
    """Everything a run needs; the resolved Hydra config and the Flower run config both map here."""

    rounds: int = 5
    seed: int = 0
    output_dir: str = ""  # where the ServerApp writes metrics.json, model.safetensors, plots/
    progress: bool = True  # print a line per round
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


def to_flower_config(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """Flatten to Flower's run config: nested fields become dotted keys (``"dataset.name"``)."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, f"{key}.")
            else:
                flat[key] = value

    walk(cfg, "")
    return flat


def from_flower_config(flat: dict[str, Any]) -> RunConfig:
    """Rebuild a :class:`RunConfig` from Flower's flat run config, checking names and types."""
    cfg = RunConfig()
    known = to_flower_config(cfg)
    for key, value in flat.items():
        if key not in known:
            raise ConfigError(f"run config: unknown key '{key}' (known keys: {', '.join(known)})")
        *parents, leaf = key.split(".")
        target: Any = cfg
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, _coerce(key, value, type(known[key])))
    validate(cfg)
    return cfg


def from_mapping(data: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from a nested mapping (a resolved Hydra config)."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(data, "")
    return from_flower_config(flat)


def _coerce(key: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"run config: '{key}' = {value!r} has type {type(value).__name__}, "
            f"expected {expected.__name__}"
        )
    return value


def validate(cfg: RunConfig) -> None:
    """Check ranges and names that the types alone cannot; raise ConfigError naming the field."""
    from fedgov.datasets import DATASET_NAMES

    def choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")

    def at_least(key: str, value: float, low: float) -> None:
        if value < low:
            raise ConfigError(f"{key}: {value} is below its minimum {low}")

    choice("dataset.name", cfg.dataset.name, DATASET_NAMES)
    choice("dataset.partitioner", cfg.dataset.partitioner, PARTITIONERS)
    choice("model.name", cfg.model.name, MODEL_NAMES)
    choice("strategy.name", cfg.strategy.name, STRATEGY_NAMES)
    choice("privacy.name", cfg.privacy.name, ("none",))
    choice("secagg.name", cfg.secagg.name, SECAGG_NAMES)
    at_least("rounds", cfg.rounds, 1)
    at_least("federation.num_sites", cfg.federation.num_sites, 0)
    at_least("federation.sites_per_round", cfg.federation.sites_per_round, 0)
    at_least("federation.min_sites_per_round", cfg.federation.min_sites_per_round, 1)
    at_least("federation.round_timeout", cfg.federation.round_timeout, 1)
    at_least("train.local_epochs", cfg.train.local_epochs, 1)
    at_least("train.batch_size", cfg.train.batch_size, 1)
    at_least("model.hidden", cfg.model.hidden, 1)
    validate_registry(cfg)
    if (
        cfg.federation.sites_per_round >= 1
        and not float(cfg.federation.sites_per_round).is_integer()
    ):
        raise ConfigError(
            f"federation.sites_per_round: {cfg.federation.sites_per_round} must be a whole count "
            "(≥ 1) or a fraction in (0, 1)"
        )
    if not 0 < cfg.train.lr <= 10:
        raise ConfigError(f"train.lr: {cfg.train.lr} must be in (0, 10]")
    if not 0 <= cfg.dataset.holdout_fraction < 1:
        raise ConfigError(f"dataset.holdout_fraction: {cfg.dataset.holdout_fraction} not in [0, 1)")
    if not 0 <= cfg.dataset.test_fraction < 1:
        raise ConfigError(f"dataset.test_fraction: {cfg.dataset.test_fraction} not in [0, 1)")
    if cfg.dataset.alpha <= 0:
        raise ConfigError(f"dataset.alpha: {cfg.dataset.alpha} must be > 0")
    if not 0 <= cfg.strategy.trim_beta < 0.5:
        raise ConfigError(f"strategy.trim_beta: {cfg.strategy.trim_beta} not in [0, 0.5)")
    at_least("strategy.proximal_mu", cfg.strategy.proximal_mu, 0)
    at_least("strategy.num_malicious", cfg.strategy.num_malicious, 0)
    validate_secagg(cfg)
    image = cfg.dataset.name in ("digits", "mnist5k")
    if image != (cfg.model.name == "cnn") and cfg.model.name == "cnn":
        raise ConfigError(
            f"model.name: 'cnn' needs an image dataset (digits, mnist5k), not '{cfg.dataset.name}'"
        )


def validate_secagg(cfg: RunConfig) -> None:
    """Secure aggregation's ranges, and the strategies it can serve."""
    s = cfg.secagg
    if s.name == "off":
        return
    if cfg.strategy.name not in SECAGG_STRATEGIES:
        raise ConfigError(
            f"secagg.name: '{s.name}' hides individual updates, but strategy "
            f"'{cfg.strategy.name}' needs them; use one of {', '.join(SECAGG_STRATEGIES)} or "
            "secagg=off"
        )
    if not (0.5 < s.threshold <= 1 or (s.threshold >= 2 and float(s.threshold).is_integer())):
        raise ConfigError(
            f"secagg.threshold: {s.threshold} must be a fraction in (0.5, 1] or a whole count ≥ 2"
        )
    if s.neighbours < 0:
        raise ConfigError(f"secagg.neighbours: {s.neighbours} must be ≥ 0 (0 = automatic)")
    if not s.clip_range > 0:
        raise ConfigError(f"secagg.clip_range: {s.clip_range} must be > 0")
    if s.bits not in (32, 64):
        raise ConfigError(f"secagg.bits: {s.bits} is not one of 32, 64")
    if not 1 <= s.max_weight <= 2**53:
        raise ConfigError(f"secagg.max_weight: {s.max_weight} must be in [1, 2^53]")
    if s.timeout < 0:
        raise ConfigError(f"secagg.timeout: {s.timeout} must be ≥ 0 (0 = round_timeout)")


def validate_registry(cfg: RunConfig) -> None:
    """The registry settings: a model name the registry accepts (checked before any training)."""
    import re

    name = cfg.registry.model_name
    if name and not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
        raise ConfigError(
            f"registry.model_name: '{name}' must be 1-64 of a-z, 0-9, '.', '_', '-' starting "
            "with a letter or digit"
        )
