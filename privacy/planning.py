"""Checks of a privacy plan that need the sites' sizes (known before a simulation starts).

``fedgov.config.validate_privacy`` checks what the config alone decides; here the limits that
depend on the data: δ below 1/n (n a site's training records; for site-level DP, n the number of
sites), a batch no larger than a site's records (Poisson sampling rate ≤ 1), and a target ε
reachable in the planned rounds. Each failure is one line naming the field and its allowed range.
Sites check the same limits themselves at run time (clients.site_privacy).
"""

from __future__ import annotations

from collections.abc import Mapping

from fedgov.config import RunConfig, sample_level_on, site_level_on
from fedgov.errors import ConfigError
from privacy.accounting import (
    MAX_NOISE_MULTIPLIER,
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
                    lowest = minimum_reachable_epsilon(p.delta, rate, steps * cfg.rounds,
                                                       p.accountant)  # fmt: skip
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
