"""Checks of a privacy plan that need the sites' sizes (known before a simulation starts).

``fedgov.config.validate_privacy`` checks what the config alone decides; here the limits that
depend on the data: δ below 1/n (n a site's training records; for site-level DP, n the number of
sites), a batch no larger than a site's records (Poisson sampling rate ≤ 1), and a target ε
reachable in the planned rounds. Each failure is one line naming the field and its allowed range.
Sites check the same limits themselves at run time (clients.site_privacy).

Before a deployment run with DP-SGD the coordinator also plans the budgets: every site answers
the discovery query with its training rows, ε spent, cap and δ (never its data; see
fedgov/site_query.py); :func:`plan_site` projects the ε this run spends at each site with the σ
the site will pick, and :func:`check_budget_plan` refuses a run that would take any site past
``privacy.budget_share`` of what it has left, unless ``privacy.budget_confirmed``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedgov.config import RunConfig, sample_level_on, site_level_on
from fedgov.errors import ConfigError
from privacy.accounting import (
    MAX_NOISE_MULTIPLIER,
    epsilon,
    minimum_reachable_epsilon,
    noise_multiplier_for,
    steps_per_round,
)


def check_privacy_plan(cfg: RunConfig, train_records: Mapping[str, int]) -> None:
    """Raise ConfigError when the plan cannot hold for these sites (site id → training rows)."""
    p = cfg.privacy
    if not train_records:
        return
    if sample_level_on(cfg):
        smallest_site = min(train_records, key=lambda site: train_records[site])
        smallest = train_records[smallest_site]
        if cfg.train.batch_size > smallest:
            raise ConfigError(
                f"train.batch_size: {cfg.train.batch_size} is larger than site {smallest_site}'s "
                f"{smallest} training records; allowed range [1, {smallest}] with DP-SGD"
            )
        if not p.delta < 1 / smallest:
            raise ConfigError(
                f"privacy.delta: {p.delta:g} must be in (0, 1/n) = (0, {1 / smallest:.3g}), "
                f"n = {smallest} records at site {smallest_site}"
            )
        if p.target_epsilon > 0:
            for site, records in sorted(train_records.items()):
                rate, steps = steps_per_round(records, cfg.train.batch_size, cfg.train.local_epochs)
                try:
                    noise_multiplier_for(
                        p.target_epsilon, p.delta, rate, steps * cfg.rounds, p.accountant
                    )
                except ValueError:
                    lowest = minimum_reachable_epsilon(
                        p.delta, rate, steps * cfg.rounds, p.accountant
                    )
                    raise ConfigError(
                        f"privacy.target_epsilon: {p.target_epsilon:g} is unreachable in "
                        f"{cfg.rounds} rounds at site {site} (it would need σ > "
                        f"{MAX_NOISE_MULTIPLIER:g}); allowed range [{lowest:.3g}, "
                        f"{p.site_epsilon_cap:g}]"
                    ) from None
    if site_level_on(cfg) and not p.delta < 1 / len(train_records):
        raise ConfigError(
            f"privacy.delta: {p.delta:g} must be in (0, 1/n) = (0, {1 / len(train_records):.3g}) "
            f"for site-level DP, n = {len(train_records)} sites"
        )


# ---- the budget plan of a deployment run: asked of the sites before round 1 ---------------------


@dataclass(frozen=True)
class SiteBudget:
    """What a site answers the planning query with: its size, ε spent, cap and δ (no data)."""

    site_id: str
    num_train: int
    epsilon_spent: float
    epsilon_cap: float
    delta: float


@dataclass(frozen=True)
class SitePlan:
    """One site's projected spend for this run against what it has left."""

    site_id: str
    noise_multiplier: float | None  # σ the site will train with (None: the site would decline)
    epsilon_run: float  # ε this run alone spends at the site (inf when it cannot train)
    epsilon_left: float  # cap − ε spent
    problem: str = ""  # why the site cannot train this run, if so

    @property
    def share(self) -> float:
        """``epsilon_run / epsilon_left`` (inf when nothing is left)."""
        if self.epsilon_left <= 0:
            return math.inf
        return self.epsilon_run / self.epsilon_left


def plan_site(cfg: RunConfig, site: SiteBudget, rounds: int) -> SitePlan:
    """The σ the site will pick (as clients.site_privacy.plan_dp_sgd does) and the ε that
    ``rounds`` rounds of DP-SGD at it spend, composed by the run's accountant."""
    p = cfg.privacy
    left = site.epsilon_cap - site.epsilon_spent
    if site.num_train < 1:
        return SitePlan(site.site_id, None, math.inf, left, "no training rows")
    rate, steps = steps_per_round(site.num_train, cfg.train.batch_size, cfg.train.local_epochs)
    if p.target_epsilon > 0:
        try:
            sigma = noise_multiplier_for(
                p.target_epsilon, site.delta, rate, steps * cfg.rounds, p.accountant
            )
        except ValueError:
            problem = f"privacy.target_epsilon {p.target_epsilon:g} is unreachable"
            return SitePlan(site.site_id, None, math.inf, left, problem)
    else:
        sigma = p.noise_multiplier
    spent = epsilon([(sigma, rate, steps * rounds)], site.delta, p.accountant)
    return SitePlan(site.site_id, sigma, spent, left)


def plan_lines(plans: list[SitePlan], rounds: int) -> list[str]:
    """One line per site: σ, the run's projected ε, what is left and the share it would take."""
    lines = []
    for plan in sorted(plans, key=lambda plan: plan.site_id):
        if plan.noise_multiplier is None:
            lines.append(f"privacy plan: site {plan.site_id}: cannot train ({plan.problem})")
            continue
        share = "all" if math.isinf(plan.share) else f"{100 * plan.share:.0f}%"
        lines.append(
            f"privacy plan: site {plan.site_id}: σ {plan.noise_multiplier:.3g}, projected ε "
            f"{plan.epsilon_run:.3g} over {rounds} round(s) of its remaining "
            f"{max(plan.epsilon_left, 0):.3g} ({share})"
        )
    return lines


def check_budget_plan(cfg: RunConfig, plans: list[SitePlan]) -> None:
    """Refuse (ConfigError, one line) a run that would take a site past
    ``privacy.budget_share`` of its remaining budget, unless ``privacy.budget_confirmed``."""
    share = cfg.privacy.budget_share
    if share <= 0 or cfg.privacy.budget_confirmed:
        return
    over = [plan for plan in plans if plan.noise_multiplier is not None and plan.share > share]
    if not over:
        return
    worst = max(over, key=lambda plan: plan.share)
    taken = "all" if math.isinf(worst.share) else f"{100 * worst.share:.0f}%"
    others = f" (and {len(over) - 1} other site(s))" if len(over) > 1 else ""
    raise ConfigError(
        f"privacy plan: this run would spend ε {worst.epsilon_run:.3g} at site {worst.site_id}"
        f"{others}, {taken} of its remaining budget {max(worst.epsilon_left, 0):.3g}, above "
        f"privacy.budget_share {share:g}; lower rounds, raise privacy.noise_multiplier or set "
        "privacy.target_epsilon, or confirm with privacy.budget_confirmed=true"
    )
