"""Privacy accounting: ε of a composed history of subsampled Gaussian mechanisms.

Pure functions of a history ``[(noise_multiplier, sample_rate, steps), ...]`` — the state Opacus'
accountants keep (``accountant.state_dict()["history"]``) and that fedgov stores in a site's ledger,
in receipts and in ``privacy_report.json``. Each entry is ``steps`` compositions of the Poisson-
subsampled Gaussian mechanism: every record (sample-level) or site (site-level) is included with
probability ``sample_rate``, the sum of the contributions (each of L2 norm ≤ C) gets Gaussian noise
of standard deviation ``noise_multiplier · C``. Neighbouring datasets differ by adding or removing
one record (one site).

:func:`epsilon` is what fedgov prints, by the accountant the run names (``privacy.accountants``:
Opacus' RDP or PRV, or one a researcher registers). :func:`independent_epsilon` recomputes it
without Opacus' code: for ``rdp`` the Rényi divergences by numerical integration (Opacus uses
series and binomial sums), for ``prv`` Google dp-accounting's privacy-loss-distribution
accountant (the library behind Flower's ``RdpAccountant``). A disagreement above 1% means
something is wrong. (dp-accounting's own RDP accountant is no use here: it drops every
fractional order whose series it cannot converge, which makes it up to a few % looser than the
exact value at sampling rates ≥ 0.1.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

HistoryEntry = tuple[float, float, int]  # (noise multiplier σ, sample rate q, steps)

#: σ above this is "unreachable": training with it would learn nothing useful.
MAX_NOISE_MULTIPLIER = 100.0


def normalise_history(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """A history as a list of ``(σ, q, steps)`` with steps > 0, merging equal neighbours.

    Raises ValueError on a σ ≤ 0, a q outside (0, 1] or a negative step count.
    """
    merged: list[HistoryEntry] = []
    for entry in history:
        sigma, rate, steps = float(entry[0]), float(entry[1]), int(entry[2])
        if not sigma > 0 or not 0 < rate <= 1 or steps < 0:
            raise ValueError(f"invalid accounting entry (σ={sigma}, q={rate}, steps={steps})")
        if steps == 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == rate:
            merged[-1] = (sigma, rate, merged[-1][2] + steps)
        else:
            merged.append((sigma, rate, steps))
    return merged


def history_extends(earlier: Iterable[Sequence[float]], later: Iterable[Sequence[float]]) -> bool:
    """Whether ``later`` composes everything ``earlier`` does, in order, and possibly more."""
    before, after = normalise_history(earlier), normalise_history(later)
    if not before:
        return True
    if len(before) > len(after) or before[:-1] != after[: len(before) - 1]:
        return False
    sigma, rate, steps = before[-1]
    match = after[len(before) - 1]
    return match[0] == sigma and match[1] == rate and match[2] >= steps


def epsilon(history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` after composing ``history`` (0.0 for an empty history), by the accountant
    ``accountant`` names in ``privacy.accountants.ACCOUNTANTS`` (ConfigError for an unknown one)."""
    from privacy.accountants import accountant_spec, as_history

    entries = normalise_history(history)
    if not entries:
        return 0.0
    return accountant_spec(accountant).epsilon(as_history(entries), float(delta))


def independent_epsilon(
    history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp"
) -> float:
    """ε of ``history`` recomputed by the accountant's independent method (its spec's
    ``independent``; ValueError when it has none).

    ``rdp``: the Rényi divergence of the subsampled Gaussian computed by numerical integration
    (:func:`rdp_epsilon_by_integration`), where Opacus sums a series (fractional orders) or a
    binomial expansion (integer ones). ``prv``: Google dp-accounting's privacy loss distribution
    (PLD) accountant, a different numerical method from Opacus' PRV, on a fine discretisation.
    """
    from privacy.accountants import accountant_spec, as_history

    entries = normalise_history(history)
    if not entries:
        return 0.0
    spec = accountant_spec(accountant)
    if spec.independent is None:
        raise ValueError(f"accountant '{accountant}' has no independent recomputation")
    return spec.independent(as_history(entries), float(delta))


def rdp_epsilon_by_integration(history: Sequence[HistoryEntry], delta: float) -> float:
    """ε of a normalised ``history`` from Rényi divergences computed by numerical integration
    (:func:`log_moment_by_integration`) on Opacus' orders, composed and converted to (ε, δ) with
    Opacus' conversion (Balle et al. 2020)."""
    import numpy as np
    from opacus.accountants import RDPAccountant

    orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = np.zeros(len(orders))
    for sigma, rate, steps in history:
        rdp += steps * np.asarray(_rdp_per_step_by_integration(float(sigma), float(rate)))
    eps = rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(np.nanmin(eps))


@functools.lru_cache(maxsize=4096)
def _rdp_per_step_by_integration(sigma: float, rate: float) -> tuple[float, ...]:
    """One step's RDP at Opacus' orders, by integration; cached (re-verifying a report replays
    the same (σ, q) entries in every receipt's cumulative history)."""
    import numpy as np
    from opacus.accountants import RDPAccountant

    orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    return tuple(log_moment_by_integration(sigma, rate, orders) / (orders - 1))


def log_moment_by_integration(sigma: float, rate: float, orders: Sequence[float]):
    """log A_α of the Poisson-subsampled Gaussian for every order α, by numerical integration.

    A_α = ∫ μ₀(z)^{1−α} μ(z)^α dz with μ₀ = N(0, σ²) and μ = (1−q)·N(0, σ²) + q·N(1, σ²)
    (Mironov, Talwar, Zhang 2019: the RDP of order α is log A_α / (α − 1)). The integrand is
    evaluated in log space on a grid covering [−12σ − 2, max α + 12σ + 2] with spacing ≤ σ/40
    (the trapezoid rule on these smooth integrands agrees with Opacus' closed forms to ~1e-10).
    """
    import numpy as np
    from scipy.special import logsumexp

    alphas = np.asarray(orders, dtype=float)[:, None]
    low, high = -12 * sigma - 2, float(alphas.max()) + 12 * sigma + 2
    points = int(min(max((high - low) / (sigma / 40), 4001), 400_001))
    z = np.linspace(low, high, points)
    normaliser = math.log(sigma * math.sqrt(2 * math.pi))
    log_mu0 = -(z**2) / (2 * sigma**2) - normaliser
    log_mu1 = -((z - 1) ** 2) / (2 * sigma**2) - normaliser
    if rate < 1:
        log_mu = np.logaddexp(math.log1p(-rate) + log_mu0, math.log(rate) + log_mu1)
    else:
        log_mu = log_mu1
    weights = np.full(points, math.log(z[1] - z[0]))
    weights[[0, -1]] -= math.log(2)
    return logsumexp((1 - alphas) * log_mu0 + alphas * log_mu + weights, axis=1)


def epsilon_after(
    history: Iterable[Sequence[float]],
    next_entry: HistoryEntry,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε that composing ``next_entry`` onto ``history`` would bring the total to."""
    return epsilon([*normalise_history(history), next_entry], delta, accountant)


def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest σ (within 1% in ε) such that ``steps`` steps at rate ``sample_rate`` spend at
    most ``target_epsilon`` at ``delta``. Raises ValueError when it would exceed
    :data:`MAX_NOISE_MULTIPLIER` (the target is unreachable in that many steps)."""
    if not target_epsilon > 0:
        raise ValueError(f"target ε must be > 0, got {target_epsilon}")
    return _noise_for(
        float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant
    )


@functools.lru_cache(maxsize=256)
def _noise_for(target: float, delta: float, rate: float, steps: int, accountant: str) -> float:
    def eps_at(sigma: float) -> float:
        return epsilon([(sigma, rate, steps)], delta, accountant)

    if eps_at(MAX_NOISE_MULTIPLIER) > target:
        raise ValueError(
            f"ε {target} is unreachable in {steps} steps at sampling rate {rate:.4g}: even "
            f"σ = {MAX_NOISE_MULTIPLIER:g} spends {eps_at(MAX_NOISE_MULTIPLIER):.4g}"
        )
    low, high = 0.0, 1.0
    while eps_at(high) > target:
        low, high = high, high * 2
    # Bisect on σ until ε(high) is within 0.5% below the target; high always satisfies it.
    for _ in range(100):
        if target - eps_at(high) <= 0.005 * target:
            break
        middle = (low + high) / 2
        if eps_at(middle) > target:
            low = middle
        else:
            high = middle
    return high


def minimum_reachable_epsilon(
    delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest ε reachable with σ ≤ :data:`MAX_NOISE_MULTIPLIER` in ``steps`` steps."""
    return epsilon([(MAX_NOISE_MULTIPLIER, sample_rate, steps)], delta, accountant)


def steps_per_round(num_records: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sample rate q, DP-SGD steps) of one round at a site, as Opacus defines them.

    Opacus' Poisson data loader draws ``ceil(n / batch)`` batches per epoch, each record included
    with probability ``q = 1 / ceil(n / batch)`` (expected batch ≈ ``batch``).
    """
    if num_records < 1:
        raise ValueError("a site needs at least one record to train with DP-SGD")
    batches = math.ceil(num_records / batch_size)
    return 1.0 / batches, batches * local_epochs
