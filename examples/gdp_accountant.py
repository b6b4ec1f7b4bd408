"""A privacy accountant in one file: Gaussian differential privacy (μ-GDP) by the central limit
theorem (Dong, Roth, Su 2019; Bu et al. 2020 for Poisson subsampling).

    python -m simulations.run privacy=sample_dp privacy.accountant=examples.gdp_accountant.GDP

``steps`` compositions of the Poisson-subsampled Gaussian mechanism (noise σ, rate q) are about
μ-GDP with μ = q·√(steps·(e^{1/σ²} − 1)); μ-GDP mechanisms compose to √(Σ μᵢ²)-GDP; and μ-GDP
is (ε, δ)-DP for δ = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2), solved here for ε by bisection. The
CLT is an approximation that can underestimate ε for few steps (Opacus calls its own GDP
accountant experimental for that reason): an example of the plug-in point, not a recommendation.

Its independent re-check (what ``fedgov privacy`` compares against within 1%) is Opacus' own GDP
analysis (``opacus.accountants.analysis.gdp``), code that shares nothing with this file.
"""

from __future__ import annotations

import math

from privacy.accountants import AccountantSpec, HistoryEntry


def _phi(x: float) -> float:
    """The standard normal CDF, by erfc: exact to relative precision in the lower tail too."""
    return 0.5 * math.erfc(-x / math.sqrt(2))


def gdp_mu(history: tuple[HistoryEntry, ...]) -> float:
    """μ of the composed history: √(Σ q²·steps·(e^{1/σ²} − 1))."""
    return math.sqrt(sum(rate**2 * steps * math.expm1(sigma**-2) for sigma, rate, steps in history))


def delta_of(epsilon: float, mu: float) -> float:
    """δ(ε) of a μ-GDP mechanism (decreasing in ε)."""
    return _phi(-epsilon / mu + mu / 2) - math.exp(epsilon) * _phi(-epsilon / mu - mu / 2)


def gdp_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """The smallest ε with δ(ε) ≤ ``delta`` (bisection to 1e-10 relative)."""
    mu = gdp_mu(history)
    if delta_of(0.0, mu) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while delta_of(high, mu) > delta:
        low, high = high, high * 2
    while high - low > 1e-10 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if delta_of(middle, mu) > delta else (low, middle)
    return high


def opacus_gdp_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """The same ε by Opacus' GDP analysis (its μ per entry, composed, its ε from μ)."""
    from opacus.accountants.analysis import gdp

    mu = math.sqrt(
        sum(
            gdp.compute_mu_poisson(steps=steps, noise_multiplier=sigma, sample_rate=rate) ** 2
            for sigma, rate, steps in history
        )
    )
    return float(gdp.eps_from_mu(mu=mu, delta=delta))


GDP = AccountantSpec(
    epsilon=gdp_epsilon,
    independent=opacus_gdp_epsilon,
    independent_name="Opacus' GDP analysis (central limit theorem)",
)
