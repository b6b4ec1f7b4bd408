"""The accountant registry: each privacy accountant as an :class:`AccountantSpec`, fedgov's own
(``rdp``, ``prv``: Opacus') included. Opacus' ``opacus/accountants/registry.py`` is the model.

An accountant turns a composed history ``[(σ, q, steps), ...]`` of Poisson-subsampled Gaussian
mechanisms (see ``privacy.accounting``) into ε at a given δ. A spec holds two ways to do it:
``epsilon`` (what fedgov prints, plans σ with and signs into receipts) and, optionally,
``independent`` (another implementation that ``fedgov privacy`` uses to re-check a report within
1%), with ``independent_name`` saying what that is, in words.

``privacy.accountant=<name>`` picks a registered spec; ``privacy.accountant=mypkg.module.Name``
(the ``_target_`` way) imports an :class:`AccountantSpec` or an Opacus accountant class (an
``opacus.accountants.IAccountant``: its ``history`` is set and ``get_epsilon(delta)`` asked).
``ACCOUNTANTS.register("name", AccountantSpec(...))`` adds one by name. See docs/extending.md.
No Opacus import until an ε is computed.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedgov.errors import ConfigError
from fedgov.plugins import Registry

HistoryEntry = tuple[float, float, int]  # (noise multiplier σ, sample rate q, steps)
#: (history as a tuple of (σ, q, steps), δ) → ε.
EpsilonFn = Callable[[tuple[HistoryEntry, ...], float], float]


@dataclass(frozen=True)
class AccountantSpec:
    """How one accountant computes ε, and how that ε can be re-checked independently.

    ``epsilon(history, delta)``: ε after composing ``history`` (a non-empty tuple of
    ``(σ, q, steps)``, already normalised); ``independent``: the same ε by another method (None
    when there is none: a report then says so and checks the replay only); ``independent_name``:
    that method in words (printed in the report's verification).
    """

    epsilon: EpsilonFn
    independent: EpsilonFn | None = None
    independent_name: str = ""


def _quiet_numpy():
    import numpy as np

    return np.errstate(divide="ignore", invalid="ignore")


def opacus_epsilon(accountant_cls: type, history: tuple[HistoryEntry, ...], delta: float) -> float:
    """ε of ``history`` by a fresh instance of an Opacus accountant class (its warnings muted:
    RDP's "optimal order is the largest" is a looser, still valid bound)."""
    with warnings.catch_warnings(), _quiet_numpy():
        warnings.simplefilter("ignore")
        accountant = accountant_cls()
        accountant.history = list(history)
        return float(accountant.get_epsilon(delta))


def _from_target(where: str, obj: Any) -> AccountantSpec:
    """A ``_target_`` object → its spec: an AccountantSpec as it is, an Opacus accountant class
    (``history`` + ``get_epsilon(delta)``) adapted."""
    if isinstance(obj, AccountantSpec):
        return obj
    if inspect.isclass(obj) and callable(getattr(obj, "get_epsilon", None)):
        return AccountantSpec(epsilon=functools.partial(opacus_epsilon, obj))
    raise ConfigError(
        f"{where}: {obj!r} is neither an AccountantSpec nor an Opacus accountant class "
        "(with history and get_epsilon(delta))"
    )


ACCOUNTANTS: Registry[AccountantSpec] = Registry(
    kind="accountant",
    key="privacy.accountant",
    expected="an AccountantSpec or an opacus.accountants.IAccountant class",
    adapt=_from_target,
)


# ---- fedgov's own: Opacus' RDP and PRV, each with an independent re-check ------------------------


@functools.lru_cache(maxsize=4096)
def _rdp(history: tuple[HistoryEntry, ...], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    return opacus_epsilon(RDPAccountant, history, delta)


@functools.lru_cache(maxsize=4096)
def _prv(history: tuple[HistoryEntry, ...], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    # PRV's error bound is absolute (0.01 in ε by default): a coarse pass sizes it to 0.2% of ε
    # (at most 0.005), so small ε are as exact as large ones. It divides by zero inside np.where
    # for q = 1, which does not change the result.
    with warnings.catch_warnings(), _quiet_numpy():
        warnings.simplefilter("ignore")
        prv = PRVAccountant()
        prv.history = list(history)
        rough = float(prv.get_epsilon(delta, eps_error=0.01))
        bound = min(0.005, max(0.002 * rough, 1e-4))
        return float(prv.get_epsilon(delta, eps_error=bound))


def _rdp_by_integration(history: tuple[HistoryEntry, ...], delta: float) -> float:
    from privacy.accounting import rdp_epsilon_by_integration

    return rdp_epsilon_by_integration(history, delta)


def _pld(history: tuple[HistoryEntry, ...], delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld import PLDAccountant

    backend = PLDAccountant(value_discretization_interval=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sigma, rate, steps in history:
            event = dp_event.GaussianDpEvent(sigma)
            if rate < 1:
                event = dp_event.PoissonSampledDpEvent(rate, event)
            backend.compose(event, steps)
        return float(backend.get_epsilon(delta))


ACCOUNTANTS.register(
    "rdp",
    AccountantSpec(
        epsilon=_rdp,
        independent=_rdp_by_integration,
        independent_name="RDP by numerical integration",
    ),
)
ACCOUNTANTS.register(
    "prv",
    AccountantSpec(
        epsilon=_prv,
        independent=_pld,
        independent_name="dp-accounting PLD (privacy loss distributions)",
    ),
)


def accountant_spec(name: str) -> AccountantSpec:
    """The spec ``name`` names: registered, or a ``_target_`` path (ConfigError naming
    ``privacy.accountant`` and the registered ones otherwise)."""
    return ACCOUNTANTS.resolve(name)


def as_history(entries: Sequence[Sequence[float]]) -> tuple[HistoryEntry, ...]:
    """Normalised entries as the hashable tuple a spec's functions take."""
    return tuple((float(s), float(q), int(t)) for s, q, t in entries)
