"""The run configuration: one typed schema for Hydra, Flower's run config and the apps.

Hydra composes `conf/` onto :class:`RunConfig` (so a typo or a wrong type fails before anything
runs); :func:`to_flower_config` flattens it into Flower's flat run config (``"strategy.name"``,
``"rounds"``, ...), which is also what ``[tool.flwr.app.config]`` in ``pyproject.toml`` holds, and
:func:`from_flower_config` rebuilds the typed object inside the ServerApp and ClientApp.
Flower's run config holds only scalars (bool, int, float, str), so every field here is a scalar,
except a plug-in's ``options`` (:data:`PLUGIN_GROUPS`), which travel as one JSON text each
(``"strategy.options"``). In a Hydra config or a flat mapping a plug-in's fields sit directly in
its group (``strategy.proximal_mu``) and ``<group>._target_`` names a plug-in by import path.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from fedgov.errors import ConfigError
from fedgov.plugins import coerce

SECAGG_NAMES = ("off", "secaggplus")
PRIVACY_NAMES = ("none", "sample_dp", "site_dp", "both")
GRAD_SAMPLE_MODES = ("fused", "hooks", "ghost", "ew", "functorch")
SECAGG_DROPOUT_POLICIES = ("abort", "account")
#: Config groups whose option is a plug-in (fedgov.plugins): named by ``name`` or ``_target_``,
#: with the plug-in's own fields as ``options`` (JSON text in Flower's flat run config).
PLUGIN_GROUPS = ("dataset", "model", "strategy", "objective")
TARGET_KEY = "_target_"


@dataclass
class DatasetConfig:
    """Which data the simulated sites hold and how it is split among them."""

    name: str = "randhie"  # a bundled dataset, or a loader's dotted path (dataset._target_)
    # natural (by site column) | iid | dirichlet (label skew) | a partitioner's dotted path
    partitioner: str = "natural"
    alpha: float = 0.5  # Dirichlet concentration; smaller = more label skew
    holdout_fraction: float = 0.2  # share kept back for central evaluation (0 = none)
    test_fraction: float = 0.2  # share of each site's rows kept for its local evaluation
    # A real federation's own data: the sites' agreed schema as JSON text (`fedgov run --schema
    # schema.yaml` fills it; "" = the bundled dataset `name`'s schema). The model's input width
    # and classes come from it, and a site whose schema differs is left out at discovery.
    schema: str = ""
    # The coordinator's own hold-out file (CSV/Parquet of the same schema) for central
    # evaluation, a path on the coordinator (`fedgov run --holdout FILE`); with a schema and no
    # hold-out there is no central evaluation (never a bundled dataset's rows instead).
    holdout: str = ""
    # A site with its own data file and fewer rows than this declines ("too few rows"); simulated
    # sites (a bundled dataset's partitions) are not held to it.
    min_site_rows: int = 10
    # A `_target_` loader's own fields (dataset.<field> in the config), e.g. its data folder.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The model every site trains: mlp | logreg (any data) or cnn | gabor (images).

    gabor: a linear head on fixed Gabor-energy features (fedgov.models.GaborLinear), the
    DP-friendly image model: far fewer trainable weights for DP-SGD's noise to land on.
    """

    name: str = "mlp"  # a registered model (fedgov.models.MODELS) or a dotted path (_target_)
    hidden: int = 64  # width of the MLP's hidden layers / channels of the CNN's first conv
    options: dict[str, Any] = field(default_factory=dict)  # the model's own further fields


@dataclass
class StrategyConfig:
    """The aggregation rule: a registered strategy or a ``_target_`` path, and its own fields.

    ``options`` holds the fields the strategy owns (``strategy.proximal_mu`` for fedprox, ...),
    checked against its spec's config dataclass (``strategies.registry``).
    """

    name: str = "fedavg"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    """The sites' local objective: a hook on the training loss (``fedgov.objectives``).

    ``proximal`` (the default) adds FedProx's μ/2·‖w − w_global‖² when the round's train config
    carries ``proximal-mu`` (fedprox sends it), nothing otherwise.
    """

    name: str = "proximal"
    options: dict[str, Any] = field(default_factory=dict)


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
    # Each round first waits (up to round_timeout) until this many sites are connected, so a
    # site that restarts between rounds is back in the next one; then it goes on with those
    # present. 0: a round takes whoever is connected when it starts (Flower: min_available_nodes).
    min_available_sites: int = 0
    round_timeout: float = 600.0  # seconds to wait for the sites' replies in one round
    client_cpus: float = 1.0  # Ray resources per simulated site
    ray_address: str = ""  # "" = local Ray; "auto" or "ray://host:10001" = an existing cluster
    # Simulation: where each simulated site keeps its own state (ledger, keys) as
    # <sites_dir>/<site-id>/ ("" = <run directory>/sites); reaches sites via their node config.
    sites_dir: str = ""


@dataclass
class PrivacyConfig:
    """Differential privacy: none | sample_dp | site_dp | both (see privacy/ and the README).

    sample_dp: DP-SGD (Opacus accounting) at every site; each site checks its own ledger and cap.
    site_dp: DP-FedAvg; sites clip their update to ``clipping_norm``, Gaussian noise of multiplier
    ``site_noise_multiplier`` goes on the sum. both: the two guarantees together.
    """

    name: str = "none"
    delta: float = 1e-5  # δ of every (ε, δ) guarantee; must be below 1/n (records, or sites)
    # a registered accountant (privacy.accountants: rdp | prv, Opacus') or a _target_ path
    accountant: str = "rdp"
    # -- sample-level (a record at one site): DP-SGD at each site
    noise_multiplier: float = 1.0  # σ of DP-SGD; ignored when target_epsilon > 0
    target_epsilon: float = 0.0  # > 0: each site picks σ so that `rounds` rounds spend this ε
    max_grad_norm: float = 1.0  # per-record gradient clipping norm
    grad_sample_mode: str = "fused"  # fused (fedgov's) | hooks | ghost | ew | functorch (Opacus)
    # Simulation only: stands for every simulated site's own cap, which reaches the sites through
    # their node config (epsilon-cap), never through the server's messages.
    site_epsilon_cap: float = 8.0
    # Before a run with DP-SGD the coordinator asks every site its ε spent, cap and δ and refuses
    # a run that would spend more than this share of any site's remaining budget (0 = no check;
    # `fedgov run` uses 0.5 unless given) unless budget_confirmed.
    budget_share: float = 0.0
    budget_confirmed: bool = False
    # -- site-level (a whole site): DP-FedAvg
    clipping_norm: float = 1.0  # L2 norm a site's update is clipped to (C)
    site_noise_multiplier: float = 1.0  # z: noise std on the sum of updates is z·C
    # With secure aggregation: each site adds noise for `secagg_min_survivors` survivors; fewer
    # survivors than that → "abort" the round or "account" for the smaller noise.
    secagg_min_survivors: int = 0  # 0 = every sampled site
    secagg_dropout: str = "abort"


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
    clip_range: float = 2.0  # each value of a site's update is clipped to [−clip_range, clip_range]
    bits: int = 32  # the ring Z_{2^bits}: 32 (uint32 on the wire) or 64 (finer, twice the bytes)
    max_weight: int = 100_000  # the largest weight (example count) a site may claim
    timeout: float = 0.0  # seconds to wait for each stage's replies; 0 = federation.round_timeout
    # The governance-signed roster file (privacy/secagg/roster.py) the coordinator hands the
    # sites; "" = none (sites with a trust anchor then refuse the round).
    roster: str = ""


@dataclass
class RegistryConfig:
    """Publishing the final model to the governed registry (``server/registry``) after the run."""

    publish: bool = False  # publish the final global model as a new candidate version
    path: str = ""  # registry folder; "" = $FEDGOV_REGISTRY or ./.fedgov/registry
    db_url: str = ""  # SQLAlchemy URL of its metadata; "" = SQLite in the folder (registry.db)
    model_name: str = ""  # "" = "<schema name>-<model>" (e.g. randhie-mlp)
    # The server's Ed25519 private key (PEM) that signs manifests; "" = ~/.fedgov/keys/publisher.key
    # ($FEDGOV_KEYS_DIR), outside the registry folder.
    # Generated on first use when absent; the policy must list its public key as a publisher.
    signing_key: str = ""


@dataclass
class RunConfig:
    """Everything a run needs; the resolved Hydra config and the Flower run config both map here."""

    rounds: int = 5
    seed: int = 0
    output_dir: str = ""  # where the ServerApp writes metrics.json, model.safetensors, plots/
    progress: bool = True  # print a line per round
    resume: bool = False  # continue from output_dir's checkpoint (after a coordinator crash)
    # fedgov's id of the run, kept across resumes (checkpoint) and sent to the sites, whose privacy
    # ledgers key their spends by it; "" = the first start's Flower run id. Set it only to replay
    # a run exactly (the sites' DP noise is derived from their key, this id, round and input).
    run_id: str = ""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


def hydra_schema() -> type:
    """:class:`RunConfig` as Hydra's schema (``run_schema``): every group typed, except the plug-in
    groups, which are open mappings: the group's fields (``dataset.holdout_fraction``),
    ``_target_`` (default "") and whatever fields the chosen plug-in owns (from its YAML, or
    added with ``+``)."""
    hints = typing.get_type_hints(RunConfig)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(RunConfig):
        if f.name in PLUGIN_GROUPS:
            fields.append((f.name, dict[str, Any], field(default_factory=_open_group(f.name))))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, hints[f.name], field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, hints[f.name], field(default=f.default)))
    return dataclasses.make_dataclass("RunSchema", fields)


def _open_group(group: str) -> Any:
    """The Hydra default of a plug-in group: its own fields' defaults, and ``_target_: ""``."""

    def default() -> dict[str, Any]:
        values = dataclasses.asdict(getattr(RunConfig(), group))
        values.pop("options")
        return {**values, TARGET_KEY: ""}

    return default


def to_flower_config(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """Flatten to Flower's run config: nested fields become dotted keys (``"dataset.name"``);
    a plug-in's options become one JSON text (``"strategy.options"``)."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, f"{key}.")
            elif isinstance(value, dict):
                flat[key] = json.dumps(value, sort_keys=True, separators=(",", ":"))
            else:
                flat[key] = value

    walk(cfg, "")
    return flat


def from_flower_config(flat: dict[str, Any]) -> RunConfig:
    """Rebuild a :class:`RunConfig` from Flower's flat run config, checking names and types.

    In a plug-in group (:data:`PLUGIN_GROUPS`) ``<group>._target_`` (when not empty) replaces
    ``<group>.name`` and any key the group's dataclass lacks is one of the plug-in's options
    (checked against the plug-in by :func:`validate`). The core checks what it can alone; a run
    loads its config with ``strategies.run_config.load_run_config``, which also resolves the
    strategy, partitioner and accountant in their registries (layers above the core).
    """
    cfg = RunConfig()
    known = to_flower_config(cfg)
    targets: dict[str, str] = {}
    for key, value in flat.items():
        group, _, leaf = key.partition(".")
        if group in PLUGIN_GROUPS and leaf and key not in known:
            options = getattr(cfg, group).options
            if leaf == TARGET_KEY:
                if value not in ("", None):
                    targets[group] = _coerce(key, value, str)
                    if "." not in targets[group]:
                        raise ConfigError(
                            f"{key}: '{value}' is not a dotted import path (expected "
                            "package.module.Name)"
                        )
            elif value is not None:
                options[leaf] = value
            continue
        if key not in known:
            raise ConfigError(f"run config: unknown key '{key}' (known keys: {', '.join(known)})")
        *parents, leaf = key.split(".")
        target: Any = cfg
        for part in parents:
            target = getattr(target, part)
        if leaf == "options" and parents and parents[0] in PLUGIN_GROUPS:
            target.options = {**_options_json(key, value), **target.options}
            continue
        setattr(target, leaf, _coerce(key, value, type(known[key])))
    for group, path in targets.items():
        getattr(cfg, group).name = path
    validate(cfg)
    return cfg


def _options_json(key: str, value: Any) -> dict[str, Any]:
    """A plug-in's options from their JSON text (or a mapping already)."""
    if isinstance(value, dict):
        return dict(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a JSON object as text, got {type(value).__name__}")
    try:
        options = json.loads(value or "{}")
    except json.JSONDecodeError as error:
        raise ConfigError(f"{key}: not valid JSON ({error.msg} at char {error.pos})") from None
    if not isinstance(options, dict):
        raise ConfigError(f"{key}: expected a JSON object, got {type(options).__name__}")
    return options


def from_mapping(data: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from a nested mapping (a resolved Hydra config)."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and not prefix.startswith(_OPTION_PREFIXES):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(data, "")
    return from_flower_config(flat)


# A plug-in's own field may hold a mapping: it stays one option, not a nested group.
_OPTION_PREFIXES = tuple(f"{group}." for group in PLUGIN_GROUPS)


def _coerce(key: str, value: Any, expected: type) -> Any:
    """A run-config value as its field's scalar type (fedgov.plugins.coerce), else ConfigError."""
    if expected not in (bool, int, float, str) and not isinstance(value, expected):
        raise ConfigError(
            f"run config: '{key}' = {value!r} has type {type(value).__name__}, "
            f"expected {expected.__name__}"
        )
    return coerce(f"run config: '{key}' =", value, expected)


def validate(cfg: RunConfig) -> None:
    """Check ranges and names that the types alone cannot; raise ConfigError naming the field.

    The core's part: the plug-ins of the registries above it (strategy, partitioner,
    accountant) are ``strategies.run_config.check_plugins``'s."""
    from fedgov.datasets import schema_from_json

    def choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")

    def at_least(key: str, value: float, low: float) -> None:
        if value < low:
            raise ConfigError(f"{key}: {value} is below its minimum {low}")

    check_core_plugins(cfg)
    if cfg.dataset.schema:
        schema_from_json(cfg.dataset.schema)  # a bad schema fails here, before anything runs
    elif cfg.dataset.holdout:
        raise ConfigError(
            "dataset.holdout: a coordinator hold-out needs the federation's schema "
            "(dataset.schema, or `fedgov run --schema FILE`)"
        )
    choice("privacy.name", cfg.privacy.name, PRIVACY_NAMES)
    choice("secagg.name", cfg.secagg.name, SECAGG_NAMES)
    at_least("rounds", cfg.rounds, 1)
    at_least("federation.num_sites", cfg.federation.num_sites, 0)
    at_least("federation.sites_per_round", cfg.federation.sites_per_round, 0)
    at_least("federation.min_sites_per_round", cfg.federation.min_sites_per_round, 1)
    at_least("federation.min_available_sites", cfg.federation.min_available_sites, 0)
    at_least("federation.round_timeout", cfg.federation.round_timeout, 1)
    at_least("train.local_epochs", cfg.train.local_epochs, 1)
    at_least("train.batch_size", cfg.train.batch_size, 1)
    at_least("model.hidden", cfg.model.hidden, 1)
    at_least("dataset.min_site_rows", cfg.dataset.min_site_rows, 1)
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
    validate_privacy(cfg)
    validate_secagg(cfg)


def check_core_plugins(cfg: RunConfig) -> None:
    """The plug-ins of the core's own registries resolve (registered name or importable
    ``_target_``) and take their options: dataset, model, local objective; a model that needs
    images is refused on a bundled dataset that has none. The strategy, partitioner and
    accountant live in the layers above: ``strategies.run_config.check_plugins`` resolves them."""
    from fedgov.datasets import DATASETS
    from fedgov.models import MODELS
    from fedgov.objectives import OBJECTIVES
    from fedgov.plugins import check_options

    def own(group: str) -> tuple[str, ...]:  # the group's keys, for "did you mean"
        return tuple(f.name for f in dataclasses.fields(getattr(cfg, group)))

    dataset = DATASETS.resolve(cfg.dataset.name)
    check_options("dataset", cfg.dataset.options, dataset.config_cls, own("dataset"))
    model = MODELS.resolve(cfg.model.name)
    check_options("model", cfg.model.options, model.config_cls, own("model"))
    objective = OBJECTIVES.resolve(cfg.objective.name)
    check_options("objective", cfg.objective.options, objective.config_cls)
    if model.needs_image and dataset.image is False and not cfg.dataset.schema:
        raise ConfigError(
            f"model.name: '{cfg.model.name}' needs an image dataset (e.g. digits, mnist5k), not "
            f"'{cfg.dataset.name}'"
        )


def sample_level_on(cfg: RunConfig) -> bool:
    """Whether DP-SGD runs at the sites (privacy sample_dp or both)."""
    return cfg.privacy.name in ("sample_dp", "both")


def site_level_on(cfg: RunConfig) -> bool:
    """Whether DP-FedAvg protects whole sites (privacy site_dp or both)."""
    return cfg.privacy.name in ("site_dp", "both")


def validate_privacy(cfg: RunConfig) -> None:
    """The privacy settings' ranges; data-dependent limits (δ < 1/n, batch ≤ a site's rows, a
    reachable target ε) are checked by ``privacy.planning`` where the sites' sizes are known."""
    p = cfg.privacy
    if p.grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"privacy.grad_sample_mode: '{p.grad_sample_mode}' is not one of "
            f"{', '.join(GRAD_SAMPLE_MODES)}"
        )
    if p.secagg_dropout not in SECAGG_DROPOUT_POLICIES:
        raise ConfigError(
            f"privacy.secagg_dropout: '{p.secagg_dropout}' is not one of abort, account"
        )
    if not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta: {p.delta} must be in (0, 1/n), n the records of a site")
    if p.noise_multiplier < 0:
        raise ConfigError(f"privacy.noise_multiplier: {p.noise_multiplier} must be > 0")
    if p.target_epsilon < 0:
        raise ConfigError(
            f"privacy.target_epsilon: {p.target_epsilon} must be > 0 (or 0 to use "
            "privacy.noise_multiplier)"
        )
    if not 0 <= p.budget_share <= 1:
        raise ConfigError(
            f"privacy.budget_share: {p.budget_share} must be in [0, 1] (0 = no budget check)"
        )
    if p.site_epsilon_cap <= 0:
        raise ConfigError(f"privacy.site_epsilon_cap: {p.site_epsilon_cap} must be > 0")
    if p.max_grad_norm <= 0:
        raise ConfigError(f"privacy.max_grad_norm: {p.max_grad_norm} must be > 0")
    if p.clipping_norm <= 0:
        raise ConfigError(f"privacy.clipping_norm: {p.clipping_norm} must be > 0")
    if p.site_noise_multiplier < 0:
        raise ConfigError(f"privacy.site_noise_multiplier: {p.site_noise_multiplier} must be > 0")
    if p.secagg_min_survivors < 0:
        raise ConfigError(
            f"privacy.secagg_min_survivors: {p.secagg_min_survivors} must be ≥ 0 "
            "(0 = every sampled site)"
        )
    if sample_level_on(cfg):
        if p.target_epsilon == 0 and p.noise_multiplier == 0:
            raise ConfigError(
                "privacy.noise_multiplier: 0 gives no privacy; it must be > 0 "
                "(or set privacy.target_epsilon > 0)"
            )
        if p.target_epsilon > p.site_epsilon_cap:
            raise ConfigError(
                f"privacy.target_epsilon: {p.target_epsilon} is unreachable: the sites stop at "
                f"their cap (privacy.site_epsilon_cap {p.site_epsilon_cap}); allowed range "
                f"(0, {p.site_epsilon_cap}]"
            )
    if site_level_on(cfg) and p.site_noise_multiplier == 0:
        raise ConfigError("privacy.site_noise_multiplier: 0 gives no privacy; it must be > 0")


def validate_registry(cfg: RunConfig) -> None:
    """The registry settings: a model name the registry accepts (checked before any training)."""
    import re

    name = cfg.registry.model_name
    if name and not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
        raise ConfigError(
            f"registry.model_name: '{name}' must be 1-64 of a-z, 0-9, '.', '_', '-' starting "
            "with a letter or digit"
        )
    if cfg.registry.publish and ("." in cfg.model.name or cfg.model.options):
        # Serving rebuilds a model by its registered name and model.hidden from a manifest; it
        # never imports code a manifest names.
        raise ConfigError(
            f"registry.publish: model '{cfg.model.name}' is a _target_ model or has its own "
            "fields; the registry publishes registered models (mlp, logreg, cnn, gabor) only"
        )


def validate_secagg(cfg: RunConfig) -> None:
    """Secure aggregation's ranges (the strategies it can serve: ``strategies.run_config``)."""
    s = cfg.secagg
    if s.name == "off":
        return
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
