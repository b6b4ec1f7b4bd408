"""A site's run policy: the terms on which it trains, set in its ``site.yaml``, never by the server.

Each setting (documented in docs/operators.md) travels to the site's ClientApp in the node config
(``fedgov site start`` writes it there; the coordinator cannot reach it) and is checked before any
training. A request outside it is declined with one reason naming the setting, the value asked
and the site's limit (:func:`policy_violation`); the coordinator records the decline.

=============================  =====================  ==========================================
``site.yaml``                  node config            declines a round when
=============================  =====================  ==========================================
``delta``                      ``delta``              the run asks a larger ``privacy.delta``
                                                      (every ε the site computes uses its own δ)
``require_dp``                 ``require-dp``         the run is not sample-level DP
``min_noise_multiplier``       ``min-noise-mult...``  the planned σ is smaller
``max_epsilon_per_run``        ``max-epsilon-per-run`` the run's ε at the site would pass it
``require_secure_aggregation`` ``require-secure-agg`` the update would leave without SecAgg+
``allowed_features``           ``allowed-features``   the run trains on another column
``max_rounds_per_run``         ``max-rounds-per-run`` the run asks more rounds (or a later round)
``max_local_epochs``           ``max-local-epochs``   the run asks more local epochs
``report_eval_metrics``        ``report-eval-metrics`` (off) the server asks for evaluation metrics
=============================  =====================  ==========================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedgov.config import RunConfig, sample_level_on
from fedgov.errors import ConfigError

#: site.yaml key -> node-config key.
POLICY_KEYS = {
    "delta": "delta",
    "require_dp": "require-dp",
    "min_noise_multiplier": "min-noise-multiplier",
    "max_epsilon_per_run": "max-epsilon-per-run",
    "require_secure_aggregation": "require-secure-aggregation",
    "allowed_features": "allowed-features",
    "max_rounds_per_run": "max-rounds-per-run",
    "max_local_epochs": "max-local-epochs",
    "report_eval_metrics": "report-eval-metrics",
    # the modules a run's `_target_` plug-ins may come from (fedgov.plugins); none when unset
    "plugin_modules": "plugin-modules",
}
#: The δ a site set up by ``fedgov site init`` accounts at unless its site.yaml says otherwise.
DEFAULT_SITE_DELTA = 1e-5


class PolicyError(ValueError):
    """A policy setting is malformed (in site.yaml or the node config)."""


@dataclass(frozen=True)
class SitePolicy:
    """The site's terms; ``None`` (or the default) leaves a setting unrestricted."""

    delta: float | None = None
    require_dp: bool = False
    min_noise_multiplier: float | None = None
    max_epsilon_per_run: float | None = None
    require_secure_aggregation: bool = False
    allowed_features: tuple[str, ...] | None = None
    max_rounds_per_run: int | None = None
    max_local_epochs: int | None = None
    report_eval_metrics: bool = True
    plugin_modules: tuple[str, ...] | None = None  # module prefixes of allowed plug-in code

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def from_values(cls, values: Mapping[str, Any], where: str) -> SitePolicy:
        """From ``site.yaml``-named values (PolicyError naming ``where`` and the key)."""

        def number(key: str, whole: bool = False) -> Any:
            value = values.get(key)
            if value is None or value == "":
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise PolicyError(f"{where}: {key} must be a number > 0, got {value!r}")
            try:
                parsed = float(value)
            except ValueError:
                raise PolicyError(f"{where}: {key} must be a number > 0, got {value!r}") from None
            if not (parsed > 0 and math.isfinite(parsed)) or (whole and not parsed.is_integer()):
                kind = "a whole number" if whole else "a number"
                raise PolicyError(f"{where}: {key} must be {kind} > 0, got {value!r}")
            return int(parsed) if whole else parsed

        def flag(key: str, default: bool) -> bool:
            value = values.get(key)
            if value is None or value == "":
                return default
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise PolicyError(f"{where}: {key} must be true or false, got {value!r}")

        def names(key: str, what: str) -> tuple[str, ...] | None:
            value = values.get(key)
            if value is None or value == "":
                return None
            if isinstance(value, str):
                return tuple(name.strip() for name in value.split(",") if name.strip())
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise PolicyError(f"{where}: {key} must be a list of {what}")

        allowed = names("allowed_features", "column names")
        delta = number("delta")
        if delta is not None and not delta < 1:
            raise PolicyError(f"{where}: delta must be in (0, 1), got {delta!r}")
        return cls(
            delta=delta,
            require_dp=flag("require_dp", False),
            min_noise_multiplier=number("min_noise_multiplier"),
            max_epsilon_per_run=number("max_epsilon_per_run"),
            require_secure_aggregation=flag("require_secure_aggregation", False),
            allowed_features=allowed,
            max_rounds_per_run=number("max_rounds_per_run", whole=True),
            max_local_epochs=number("max_local_epochs", whole=True),
            report_eval_metrics=flag("report_eval_metrics", True),
            plugin_modules=names("plugin_modules", "module names (e.g. mypkg)"),
        )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        """The policy the site daemon wrote into the node config."""
        values = {key: node_config.get(node_key) for key, node_key in POLICY_KEYS.items()}
        return cls.from_values(values, "node config")

    def node_config(self) -> dict[str, str | float | int]:
        """The node-config entries that carry this policy (only the settings that are set)."""
        entries: dict[str, str | float | int] = {}
        for key, node_key in POLICY_KEYS.items():
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool):
                entries[node_key] = int(value)  # a TOML-safe flag
            elif isinstance(value, tuple):
                entries[node_key] = ",".join(value)
            else:
                entries[node_key] = value
        return entries

    def as_yaml(self) -> dict[str, Any]:
        """The settings that are set, as ``site.yaml`` writes them."""
        data: dict[str, Any] = {}
        for key in POLICY_KEYS:
            value = getattr(self, key)
            if value is not None:
                data[key] = list(value) if isinstance(value, tuple) else value
        return data


def policy_from_yaml(data: Mapping[str, Any], where: str) -> SitePolicy:
    """The policy keys of a ``site.yaml`` mapping (δ defaults to :data:`DEFAULT_SITE_DELTA`)."""
    try:
        policy = SitePolicy.from_values({k: data.get(k) for k in POLICY_KEYS}, where)
    except PolicyError as error:
        raise ConfigError(str(error)) from None
    if policy.delta is None:
        from dataclasses import replace

        policy = replace(policy, delta=DEFAULT_SITE_DELTA)
    return policy


# ---- the checks (pure) -----------------------------------------------------------------------


def _asked(setting: str, asked: str, limit: str) -> str:
    return f"site policy {setting}: the run asks {asked}; this site's limit: {limit}"


def policy_violation(
    policy: SitePolicy,
    cfg: RunConfig,
    server_round: int,
    features: Iterable[str],
) -> str | None:
    """Why a train request is outside the policy (one reason), or None when it is inside.

    ``features``: the columns this round trains on. Whether the update may leave in the clear is
    :func:`clear_release_violation`'s (the plain train message asks that; SecAgg+ does not).
    """
    if policy.require_dp and not sample_level_on(cfg):
        return _asked(
            "require_dp",
            f"privacy.name = '{cfg.privacy.name}'",
            "sample-level DP (privacy.name = 'sample_dp') required",
        )
    if policy.delta is not None and sample_level_on(cfg) and cfg.privacy.delta > policy.delta:
        return _asked(
            "delta",
            f"privacy.delta = {cfg.privacy.delta:g}",
            f"δ = {policy.delta:g} (every ε here is accounted at it)",
        )
    if policy.max_rounds_per_run is not None:
        asked = max(cfg.rounds, server_round)
        if asked > policy.max_rounds_per_run:
            what = f"rounds = {cfg.rounds}" if cfg.rounds >= server_round else f"round {asked}"
            return _asked("max_rounds_per_run", what, f"{policy.max_rounds_per_run} rounds")
    if policy.max_local_epochs is not None and cfg.train.local_epochs > policy.max_local_epochs:
        return _asked(
            "max_local_epochs",
            f"train.local_epochs = {cfg.train.local_epochs}",
            f"{policy.max_local_epochs} epochs",
        )
    if policy.allowed_features is not None:
        outside = [name for name in features if name not in policy.allowed_features]
        if outside:
            return _asked(
                "allowed_features",
                f"column '{outside[0]}'",
                "only " + ", ".join(policy.allowed_features),
            )
    return None


def clear_release_violation(policy: SitePolicy, cfg: RunConfig) -> str | None:
    """Why this site does not send its update in the clear (a plain train message), or None."""
    if policy.require_secure_aggregation:
        asked = f"an update in the clear (secagg = '{cfg.secagg.name}')"
        limit = "updates leave only under secure aggregation (secagg = 'secaggplus')"
        return _asked("require_secure_aggregation", asked, limit)
    return None


def noise_violation(policy: SitePolicy, noise_multiplier: float) -> str | None:
    """Why a planned DP-SGD noise multiplier σ is below the policy's minimum, or None."""
    if policy.min_noise_multiplier is not None and noise_multiplier < policy.min_noise_multiplier:
        return _asked(
            "min_noise_multiplier",
            f"σ = {noise_multiplier:.4g}",
            f"σ ≥ {policy.min_noise_multiplier:g}",
        )
    return None


def run_epsilon_violation(policy: SitePolicy, run_epsilon_after: float) -> str | None:
    """Why this round would take the run's ε at the site past the per-run limit, or None."""
    if policy.max_epsilon_per_run is not None and run_epsilon_after > policy.max_epsilon_per_run:
        asked = f"a round that brings this run to ε = {run_epsilon_after:.4g}"
        limit = f"ε ≤ {policy.max_epsilon_per_run:g} per run"
        return _asked("max_epsilon_per_run", asked, limit)
    return None


def eval_violation(policy: SitePolicy) -> str | None:
    """Why the site does not report evaluation metrics, or None."""
    if not policy.report_eval_metrics:
        return (
            "site policy report_eval_metrics: the server asks for evaluation metrics; this "
            "site's limit: off (metrics on held-out rows are not covered by DP)"
        )
    return None


def refuse_outside_policy(
    cfg: RunConfig, node_config: Mapping[str, Any], *, clear: bool = False, evaluate: bool = False
) -> None:
    """Raise ``SiteDeclined`` when a message asks what the site's policy forbids: an update in
    the clear (``clear``) or evaluation metrics (``evaluate``); a malformed policy fails closed."""
    from clients.update import SiteDeclined

    try:
        policy = SitePolicy.from_node_config(node_config)
    except PolicyError as error:
        raise SiteDeclined(f"site policy unusable, failing closed: {error}") from None
    reason = (clear and clear_release_violation(policy, cfg)) or (
        evaluate and eval_violation(policy)
    )
    if reason:
        raise SiteDeclined(reason)
