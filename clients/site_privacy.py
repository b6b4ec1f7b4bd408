"""A site's own privacy budget: its settings (node config), key, ledger, and the per-round check.

What the site enforces comes from the site, never from the server's messages:

- node config ``site-dir``: the folder holding the site's ledger (``privacy_ledger.json``) and
  signing key (``site_key.pem``/``site_key.pub``); created on first use;
- node config ``epsilon-cap``: the most ε (sample-level) the site will ever spend, across rounds
  and runs; the run config cannot raise it;
- node config ``delta`` (optional): the δ the site accounts at; else the run's ``privacy.delta``,
  which the site accepts only below 1/n (n its training records).

In deployment these come from ``flower-supernode --node-config "site-dir=... epsilon-cap=8"``;
in simulation ``simulations.engine`` gives every simulated site its own (the run's
``privacy.site_epsilon_cap`` stands for each simulated site's setting). Without ``site-dir`` or
``epsilon-cap`` a site declines every DP round: a budget nobody set is not a budget.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clients.budget import read_budget
from clients.dp_training import DpSgdPlan
from fedgov import site_query
from fedgov.config import RunConfig
from fedgov.errors import FedgovError
from privacy.accounting import epsilon, noise_multiplier_for, steps_per_round
from privacy.ledger import LedgerError, LedgerState, SiteLedger, Spend
from privacy.receipts import (
    Receipt,
    canonical_json,
    sign,
)
from privacy.site_state import open_site_state

NODE_SITE_DIR = "site-dir"
NODE_EPSILON_CAP = "epsilon-cap"
NODE_DELTA = "delta"


class BudgetRefusal(Exception):
    """The site will not train this round; ``details`` (ε spent, cap, ...) go back with it."""

    def __init__(self, reason: str, **details: int | float | str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


@dataclass(frozen=True)
class BudgetSettings:
    """The site's own privacy settings, read from its node config."""

    site_dir: Path
    epsilon_cap: float
    delta: float | None


def budget_settings(node_config: Mapping[str, Any]) -> BudgetSettings:
    """Parse ``site-dir``, ``epsilon-cap`` and ``delta``; refuse (decline) when missing or bad."""
    site_dir = str(node_config.get(NODE_SITE_DIR, "") or "")
    if not site_dir:
        raise BudgetRefusal(
            f"no privacy ledger: node config '{NODE_SITE_DIR}' (the site's own folder) is not set"
        )
    cap = _positive(node_config, NODE_EPSILON_CAP)
    if cap is None:
        raise BudgetRefusal(f"no privacy budget: node config '{NODE_EPSILON_CAP}' is not set")
    delta = _positive(node_config, NODE_DELTA)
    if delta is not None and not delta < 1:
        raise BudgetRefusal(f"node config '{NODE_DELTA}': {delta} must be in (0, 1)")
    return BudgetSettings(Path(site_dir), cap, delta)


def _positive(node_config: Mapping[str, Any], key: str) -> float | None:
    if key not in node_config or node_config[key] in ("", None):
        return None
    try:
        value = float(node_config[key])
    except (TypeError, ValueError):
        raise BudgetRefusal(f"node config '{key}': {node_config[key]!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise BudgetRefusal(f"node config '{key}': {value} must be a number > 0")
    return value


def secret_seeds(key: Ed25519PrivateKey, *labels: object) -> tuple[int, int]:
    """Two 63-bit seeds (sampling, noise) only the site can compute: HKDF-SHA256 of its key."""
    from cryptography.hazmat.primitives import serialization

    material = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    info = ("fedgov dp-sgd|" + "|".join(str(label) for label in labels)).encode()
    okm = HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=info).derive(material)
    return int.from_bytes(okm[:8], "big") >> 1, int.from_bytes(okm[8:], "big") >> 1


def plan_dp_sgd(cfg: RunConfig, num_records: int, delta: float) -> DpSgdPlan:
    """This round's DP-SGD at a site of ``num_records`` rows: q and steps as Opacus defines them,
    σ from ``privacy.noise_multiplier`` or, with ``privacy.target_epsilon``, the σ that spends the
    target over ``rounds`` rounds (assuming the site trains in every one of them)."""
    rate, steps = steps_per_round(num_records, cfg.train.batch_size, cfg.train.local_epochs)
    p = cfg.privacy
    if p.target_epsilon > 0:
        try:
            sigma = noise_multiplier_for(
                p.target_epsilon, delta, rate, steps * cfg.rounds, p.accountant
            )
        except ValueError as error:
            raise BudgetRefusal(f"privacy.target_epsilon: {error}") from None
    else:
        sigma = p.noise_multiplier
    return DpSgdPlan(sigma, rate, steps, p.max_grad_norm, num_records)


@dataclass
class RoundBudget:
    """A reserved (pending) spend of this round and what signing its receipt needs."""

    key: Ed25519PrivateKey
    ledger: SiteLedger
    spend: Spend
    plan: DpSgdPlan
    site_id: str
    cap: float
    history: list[tuple[float, float, int]]  # the ledger's history including this spend
    # A retry of a round whose update already left the site (see privacy/ledger.py): the same
    # seeds give the same update, which spends nothing new; other bits are a new spend.
    repeat: bool = False
    run_cap: float | None = None  # the site policy's max_epsilon_per_run

    def seeds(self) -> tuple[int, int]:
        """(sampling, noise) seeds of this release: a function of the site's secret key and of
        everything the release depends on (``release_sha256``), so a byte-identical retry draws
        the same and any other request draws independent randomness."""
        return secret_seeds(self.key, "release", self.spend.release_sha256)

    def release(self, released_sha256: str) -> Receipt:
        """Sign the receipt and mark the spend released (call just before replying).

        A retry (``repeat``) that releases the very bits released before gets the same receipt
        again and spends nothing; a retry whose bits differ is reserved as a new spend first
        (:class:`BudgetRefusal` when that would pass the cap).
        """
        if self.repeat:
            again = self.ledger.release_again(self.spend, released_sha256, self.cap, self.run_cap)
            if again.spend is None and again.reason:
                raise BudgetRefusal(again.reason, epsilon_spent=again.epsilon_spent, cap=self.cap)
            if again.spend is None:
                raise BudgetRefusal(
                    f"privacy budget exhausted: the retried round {self.spend.round} did not "
                    f"reproduce its released update, and releasing it would bring the site to "
                    f"ε = {again.epsilon_after:.4g} > cap {self.cap:g}",
                    epsilon_spent=again.epsilon_spent,
                    epsilon_requested=again.epsilon_after,
                    cap=self.cap,
                )
            self.spend, self.history = again.spend, again.history
            if again.repeat:
                return self._receipt(released_sha256)
        receipt = self._receipt(released_sha256)
        self.ledger.release(self.spend, receipt.signature.hex(), released_sha256)
        return receipt

    def _receipt(self, released_sha256: str) -> Receipt:
        return sign(
            self.key,
            {
                "kind": "dp-sgd",
                "site": self.site_id,
                "run": self.spend.run_id,
                "round": self.spend.round,
                "steps": self.plan.steps,
                "noise_multiplier": self.plan.noise_multiplier,
                "sample_rate": self.plan.sample_rate,
                "max_grad_norm": self.plan.max_grad_norm,
                "delta": self.spend.delta,
                "accountant": self.spend.accountant,
                "epsilon": self.spend.epsilon_after,
                "cap": self.cap,
                "history": [list(entry) for entry in self.history],
                "input_sha256": self.spend.input_sha256,
                "release_sha256": self.spend.release_sha256,
                "ledger_seq": self.spend.ledger_seq,
                "ledger_sha256": self.spend.ledger_sha256,
                "update_sha256": released_sha256,
            },
        )


def reserve_round(
    cfg: RunConfig,
    node_config: Mapping[str, Any],
    site_id: str,
    num_records: int,
    run_id: str,
    server_round: int,
    input_sha256: str,
    *,
    request_sha256: str = "",
) -> RoundBudget:
    """Check this round against the site's cap and reserve it in the ledger (write-ahead).

    ``request_sha256`` (:func:`release_request_sha256`): what else the release depends on (the
    run's training settings, the round's train config, the site's rows); with the plan (σ, q,
    steps, C, n), δ, the run, the round and the input weights it makes the spend's
    ``release_sha256``, from which the release's DP randomness is derived.

    Raises :class:`BudgetRefusal` (→ a decline) when the settings are missing, the ledger cannot
    be trusted, δ is not below 1/n, or the round would take ε above the cap.
    """
    settings = budget_settings(node_config)
    try:
        key, ledger = open_site_state(settings.site_dir, site_id)
    except LedgerError as error:
        raise BudgetRefusal(f"privacy ledger unusable, failing closed: {error}") from None
    delta = settings.delta if settings.delta is not None else cfg.privacy.delta
    if not delta < 1 / num_records:
        raise BudgetRefusal(
            f"privacy.delta: {delta:g} must be in (0, 1/n) = (0, {1 / num_records:.3g}) for this "
            f"site's {num_records} records",
            cap=settings.epsilon_cap,
        )
    plan = plan_dp_sgd(cfg, num_records, delta)
    from clients.site_policy import (
        PolicyError,
        SitePolicy,
        noise_violation,
        run_epsilon_violation,
    )

    try:
        policy = SitePolicy.from_node_config(node_config)
    except PolicyError as error:
        raise BudgetRefusal(f"site policy unusable, failing closed: {error}") from None
    if reason := noise_violation(policy, plan.noise_multiplier):
        raise BudgetRefusal(reason, cap=settings.epsilon_cap)
    spend = Spend(
        run_id=run_id,
        round=server_round,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        delta=delta,
        accountant=cfg.privacy.accountant,
        epsilon_after=0.0,
        input_sha256=input_sha256,
        release_sha256=release_sha256(
            request_sha256,
            run_id,
            server_round,
            input_sha256,
            plan,
            delta,
            cfg.privacy.accountant,
        ),
    )
    try:
        reservation = ledger.reserve(spend, settings.epsilon_cap, policy.max_epsilon_per_run)
    except LedgerError as error:
        raise BudgetRefusal(f"privacy ledger unusable, failing closed: {error}") from None
    if reservation.spend is None and reservation.reason:  # the per-run limit, not the cap
        raise BudgetRefusal(
            run_epsilon_violation(policy, reservation.epsilon_after) or reservation.reason,
            epsilon_spent=reservation.epsilon_spent,
            cap=settings.epsilon_cap,
        )
    if reservation.spend is None:
        receipt = sign(
            key,
            {
                "kind": "decline",
                "site": site_id,
                "run": run_id,
                "round": server_round,
                "reason": "privacy budget exhausted",
                "delta": delta,
                "accountant": cfg.privacy.accountant,
                "epsilon": reservation.epsilon_spent,
                "epsilon_requested": reservation.epsilon_after,
                "cap": settings.epsilon_cap,
                "history": [list(entry) for entry in reservation.history],
            },
        )
        raise BudgetRefusal(
            "privacy budget exhausted: this round would bring the site to "
            f"ε = {reservation.epsilon_after:.4g} > cap {settings.epsilon_cap:g}",
            epsilon_spent=reservation.epsilon_spent,
            epsilon_requested=reservation.epsilon_after,
            cap=settings.epsilon_cap,
            **receipt_fields(receipt),
        )
    return RoundBudget(
        key,
        ledger,
        reservation.spend,
        plan,
        site_id,
        settings.epsilon_cap,
        reservation.history,
        repeat=reservation.repeat,
        run_cap=policy.max_epsilon_per_run,
    )


#: Run-config keys that change nothing a site releases (a resumed run differs in some of them);
#: every other key is an input of the release (including one more is only conservative).
NOT_RELEASE_INPUTS = frozenset({"resume", "output_dir", "progress", "run_id"})
NOT_RELEASE_PREFIXES = ("federation.", "registry.")


def release_request_sha256(
    cfg: RunConfig, train_config: Mapping[str, Any], data_sha256: str
) -> str:
    """SHA-256 of what a release depends on besides its plan: the run config's training settings
    (model, optimiser, lr, momentum, epochs, batch, σ, C, accountant, seed...), the round's train
    config (e.g. FedProx's μ) and the site's training rows (``data_sha256``)."""
    from fedgov.config import to_flower_config

    settings = {
        key: value
        for key, value in to_flower_config(cfg).items()
        if key not in NOT_RELEASE_INPUTS and not key.startswith(NOT_RELEASE_PREFIXES)
    }
    config = {str(key): repr(value) for key, value in train_config.items()}
    payload = {"run_config": settings, "train_config": config, "data": data_sha256}
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def release_sha256(
    request_sha256: str,
    run_id: str,
    server_round: int,
    input_sha256: str,
    plan: DpSgdPlan,
    delta: float,
    accountant: str,
) -> str:
    """SHA-256 of everything a release depends on: equal for a byte-identical retry only."""
    payload = {
        "request": request_sha256,
        "run": run_id,
        "round": server_round,
        "input": input_sha256,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": plan.steps,
        "max_grad_norm": plan.max_grad_norm,
        "records": plan.num_records,
        "delta": delta,
        "accountant": accountant,
    }
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def receipt_fields(receipt: Receipt) -> dict[str, str]:
    """A receipt as string fields of a decline record (``receipt-payload`` etc.)."""
    record = receipt.to_record()
    return {
        "receipt-payload": str(record["payload"]),
        "receipt-signature": receipt.signature.hex(),
        "receipt-public-key": receipt.public_key.hex(),
    }


def site_epsilon(ledger_state: LedgerState, accountant: str, delta: float) -> float:
    """ε of everything a site's ledger holds."""
    return epsilon(ledger_state.history(), delta, accountant)


def budget_fields(cfg: Any, node_config: Mapping[str, Any], site_id: str) -> dict[str, float]:
    """The site's answer to the budget plan (fedgov/site_query.py): ε spent (its ledger), cap
    and δ; {} when unset."""
    try:
        settings = budget_settings(node_config)
        spent = read_budget(settings.site_dir, site_id, settings.epsilon_cap).epsilon_spent
    except (BudgetRefusal, FedgovError, OSError):
        return {}
    delta = settings.delta if settings.delta is not None else cfg.privacy.delta
    return {
        site_query.EPSILON_SPENT: float(spent),
        site_query.EPSILON_CAP: settings.epsilon_cap,
        site_query.DELTA: float(delta),
    }
