"""The server's side of differential privacy in a run: receipts, declines and site-level DP.

``server.rounds.run_rounds`` calls four hooks when privacy is on:

- :meth:`PrivacyRound.sample` — under site-level DP sites are **Poisson-sampled**: each connected
  site joins a round independently with probability q = (sites per round) / (connected sites)
  (q = 1 when every site trains), drawn from OS randomness so nobody can predict who takes part;
  the accountant composes the subsampled Gaussian mechanism at that q. ``min_sites_per_round`` does
  not apply (a floor would break the independence the accounting relies on).
- :meth:`PrivacyRound.observe_train` — every train reply: a sample-level receipt is verified
  (Ed25519, the key pinned on first sight for the whole run) and kept; a decline is kept with
  its reason, ε spent and cap (and its signed receipt, when the site sent one).
- :meth:`PrivacyRound.aggregate_train` — under site-level DP without secure aggregation: each
  update is re-clipped to C (so a faulty site cannot exceed the sensitivity), summed, Gaussian
  noise of std z·C is added, and the sum divided by the expected number of sites q·N moves the
  global model; the strategy (FedAvg/FedProx/FedAdam) receives that noisy mean as one reply.
  The noise is added in every round, even one where no site answered.
- :meth:`PrivacyRound.account_secure_round` — under secure aggregation the sites add the noise
  (clients.update); given the survivors, it decides abort/account and records the effective
  noise multiplier z·√(s/t).

:meth:`PrivacyRound.report` gives what ``privacy/report.py`` turns into ``privacy_report.json``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from fedgov import messages as keys
from fedgov.config import RunConfig, sample_level_on, site_level_on
from fedgov.records import arrays_to_numpy
from privacy.accounting import epsilon
from privacy.receipts import Receipt, arrays_sha256
from privacy.site_dp import (
    clip_update,
    dropout_decision,
    noisy_mean_update,
    poisson_sample,
    protected_noise_multiplier,
    site_sampling_rate,
)


@dataclass
class SiteLedgerView:
    """What the server learnt about one site's sample-level budget in this run."""

    public_key: bytes | None = None
    receipts: list[Receipt] = field(default_factory=list)
    receipt_valid: list[bool] = field(default_factory=list)
    declines: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SiteLevelRound:
    """One round of site-level DP as accounted."""

    round: int
    sampled: int
    contributed: int
    sample_rate: float
    noise_multiplier: float  # the effective z of this round's sum
    epsilon: float  # site-level ε after this round
    aborted: bool = False
    note: str = ""


class PrivacyRound:
    """Privacy bookkeeping of one run on the server (see module doc)."""

    def __init__(self, cfg: RunConfig, rng: np.random.Generator | None = None) -> None:
        self.cfg = cfg
        self.sample_level = sample_level_on(cfg)
        self.site_level = site_level_on(cfg)
        self.secure_aggregation = cfg.secagg.name != "off"
        # Sampling and noise from OS entropy: the run's seed is public (metrics.json), so noise
        # drawn from it could be subtracted again.
        self._rng = rng if rng is not None else np.random.default_rng()
        self.sites: dict[str, SiteLedgerView] = {}
        self.site_level_rounds: list[SiteLevelRound] = []
        self._rate_this_round = 1.0
        self._expected_sites = 0.0
        self._sampled_this_round = 0

    # ---- hooks called by server.rounds ---------------------------------------------------------
    @property
    def aggregates(self) -> bool:
        """Whether this object, not the strategy, aggregates the train replies."""
        return self.site_level and not self.secure_aggregation

    def sample(self, site_ids: list[str], count: int) -> list[str] | None:
        """Poisson sampling under site-level DP (None: keep the usual fixed-size sampling)."""
        if not self.site_level:
            return None
        self._rate_this_round = site_sampling_rate(count, len(site_ids)) if site_ids else 1.0
        self._expected_sites = self._rate_this_round * len(site_ids)
        chosen = poisson_sample(site_ids, self._rate_this_round, self._rng)
        self._sampled_this_round = len(chosen)
        return chosen

    def observe_train(
        self, server_round: int, replies: Sequence[tuple[str, Message]]
    ) -> dict[str, str]:
        """Keep and verify every receipt and decline of this round's train replies.

        Returns site → why its receipt or decline could not be read (bounded, one line): that
        site is excluded from the round; nothing a site sends raises out of here.
        """
        unreadable: dict[str, str] = {}
        for site_id, reply in replies:
            if reply.has_error():
                continue
            records = reply.content.config_records
            try:
                if keys.RECEIPT in records:
                    released = reply.content.array_records.get(keys.ARRAYS)
                    receipt = Receipt.from_record(records[keys.RECEIPT])
                    self._keep_receipt(site_id, receipt, released)
                if keys.DECLINE in records:
                    self._keep_decline(site_id, server_round, records[keys.DECLINE])
            except Exception as error:  # a site's bytes: never the round's failure
                unreadable[site_id] = keys.bounded(f"unreadable privacy receipt: {error!r}")
                log(WARNING, "site %s: %s", site_id, unreadable[site_id])
        return unreadable

    def aggregate_train(
        self,
        server_round: int,
        current: ArrayRecord,
        replies: Sequence[Message],
        strategy: Strategy,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """DP-FedAvg without secure aggregation: re-clip, sum, add N(0, (zC)²), divide by q·N."""
        p = self.cfg.privacy
        start = arrays_to_numpy(current)
        total = {name: np.zeros_like(array, dtype=np.float64) for name, array in start.items()}
        for reply in replies:
            local = arrays_to_numpy(reply.content.array_records[keys.ARRAYS])
            update = {name: local[name].astype(np.float64) - start[name] for name in start}
            clipped, _ = clip_update(update, p.clipping_norm)
            for name in total:
                total[name] += clipped[name]
        expected = self._expected_sites or float(len(replies)) or 1.0
        mean = noisy_mean_update(
            total, p.site_noise_multiplier, p.clipping_norm, expected, self._rng
        )
        self._account(server_round, len(replies), p.site_noise_multiplier)
        new_arrays = ArrayRecord(
            OrderedDict(
                (name, torch.from_numpy((start[name] + mean[name]).astype(start[name].dtype)))
                for name in start
            )
        )
        # Hand the strategy one reply holding the noisy mean, so FedAdam & co. treat it as the
        # round's aggregate (FedAvg/FedProx return it as is).
        content = RecordDict(
            {
                keys.ARRAYS: new_arrays,
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 1}),
            }
        )
        synthetic = Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
        arrays, _ = strategy.aggregate_train(server_round, [synthetic])
        return arrays, None

    def _record_aborted(self, server_round: int, sampled: int, survivors: int, note: str) -> None:
        """Record a secure round that was never unmasked: it spends nothing (ε unchanged)."""
        self.site_level_rounds.append(
            SiteLevelRound(
                server_round,
                sampled,
                survivors,
                self._accounted_rate(),
                0.0,
                self.site_level_epsilon(),
                aborted=True,
                note=note,
            )
        )

    def account_secure_round(
        self, server_round: int, sampled: int, survivors: int, min_survivors: int
    ) -> bool:
        """Account a secure-aggregation round whose sites added noise shares sized for
        ``min_survivors``; returns False when the round must be aborted (never unmasked)."""
        p = self.cfg.privacy
        decision = dropout_decision(survivors, min_survivors, p.secagg_dropout)
        if decision == "abort":
            self._record_aborted(
                server_round,
                sampled,
                survivors,
                f"{survivors} survivors < {min_survivors}: not unmasked",
            )
            return False
        # The protected site's own noise share leaves with it (add/remove one site): not counted.
        z = protected_noise_multiplier(p.site_noise_multiplier, survivors, min_survivors)
        if z <= 0:  # a lone survivor: nothing but its own share would protect it
            self._record_aborted(
                server_round,
                sampled,
                survivors,
                f"{survivors} survivor: no other site's noise protects it",
            )
            return False
        self._account(server_round, survivors, z, sampled=sampled)
        return True

    def _accounted_rate(self) -> float:
        """The site sampling rate the accountant may use. Under secure aggregation the adversary
        it defends against is the server, which sees who takes part in every round (and a round
        that aborts for lack of sampled sites): no amplification by sampling is claimed, q = 1."""
        return 1.0 if self.secure_aggregation else self._rate_this_round

    def secure_mean_scale(self, total_weight: float) -> float:
        """Factor turning secure aggregation's mean over ``total_weight`` (the survivors, each of
        weight 1 under site-level DP) into DP-FedAvg's sum / (q·N)."""
        expected = self._expected_sites or float(total_weight) or 1.0
        return float(total_weight) / expected

    # ---- state ---------------------------------------------------------------------------------
    def site_level_history(self) -> list[tuple[float, float, int]]:
        """Opacus-style history of the site-level mechanism: (z of the round, q, 1) per round."""
        return [
            (r.noise_multiplier, r.sample_rate, 1) for r in self.site_level_rounds if not r.aborted
        ]

    def site_level_epsilon(self) -> float:
        return epsilon(
            self.site_level_history(), self.cfg.privacy.delta, self.cfg.privacy.accountant
        )

    def max_site_epsilon(self) -> float | None:
        """The largest sample-level ε any site reported (receipts and declines)."""
        values = [r.payload.get("epsilon") for view in self.sites.values() for r in view.receipts]
        values += [
            d["epsilon_spent"]
            for view in self.sites.values()
            for d in view.declines
            if d.get("epsilon_spent") is not None
        ]
        values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return max(values) if values else None

    def _account(self, server_round: int, contributed: int, z: float, sampled: int = -1) -> None:
        sampled = sampled if sampled >= 0 else self._sampled_this_round
        self.site_level_rounds.append(
            SiteLevelRound(server_round, sampled, contributed, self._accounted_rate(), z, 0.0)
        )
        self.site_level_rounds[-1].epsilon = self.site_level_epsilon()

    def _view(self, site_id: str) -> SiteLedgerView:
        return self.sites.setdefault(site_id, SiteLedgerView())

    def _keep_receipt(
        self, site_id: str, receipt: Receipt, released: ArrayRecord | None = None
    ) -> None:
        """Verify (signature, pinned key, site) and keep a receipt; with the update in the clear
        (no secure aggregation), also check the receipt names exactly the weights received."""
        if not isinstance(receipt.payload, dict):
            raise ValueError("the receipt's payload is not a JSON object")
        view = self._view(site_id)
        if view.public_key is None:
            view.public_key = receipt.public_key
        valid = receipt.verify(view.public_key) and receipt.payload.get("site") == site_id
        if valid and released is not None and not self.secure_aggregation:
            valid = receipt.payload.get("update_sha256") == arrays_sha256(arrays_to_numpy(released))
        if not valid:
            log(WARNING, "site %s sent a privacy receipt that does not verify", site_id)
        view.receipts.append(receipt)
        view.receipt_valid.append(valid)

    def _keep_decline(self, site_id: str, server_round: int, record: Any) -> None:
        details = {key: record[key] for key in record}
        entry: dict[str, Any] = {
            "round": server_round,
            "reason": str(details.get("reason", "")),
            "epsilon_spent": _float_or_none(details.get("epsilon_spent")),
            "cap": _float_or_none(details.get("cap")),
        }
        if "receipt-payload" in details:
            receipt = Receipt(
                payload=json.loads(str(details["receipt-payload"])),
                signature=bytes.fromhex(str(details["receipt-signature"])),
                public_key=bytes.fromhex(str(details["receipt-public-key"])),
            )
            view = self._view(site_id)
            if view.public_key is None:
                view.public_key = receipt.public_key
            entry["receipt"] = receipt
            entry["receipt_valid"] = receipt.verify(view.public_key)
        self._view(site_id).declines.append(entry)


def _float_or_none(value: object) -> float | None:
    try:
        return None if value is None else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def report_of(privacy: PrivacyRound, run_id: str) -> dict[str, Any]:
    """The ``privacy_report.json`` document of a finished run (privacy/report.py)."""
    from dataclasses import asdict

    from privacy.report import report_document

    p = privacy.cfg.privacy
    sample_level = None
    if privacy.sample_level:
        sample_level = {
            "noise_multiplier": None if p.target_epsilon > 0 else p.noise_multiplier,
            "target_epsilon": p.target_epsilon,
            "max_grad_norm": p.max_grad_norm,
            "grad_sample_mode": p.grad_sample_mode,
            "sites": {
                site_id: {
                    # the server's own check at receipt time: signature, pinned key, and (without
                    # secure aggregation) that the update received is the one the receipt names
                    "receipts_matched_updates": all(view.receipt_valid),
                    "receipts": [r.to_json() for r in view.receipts],
                    "declines": [
                        {
                            **{k: v for k, v in d.items() if k != "receipt_valid"},
                            "receipt": d["receipt"].to_json() if d.get("receipt") else None,
                        }
                        for d in view.declines
                    ],
                }
                for site_id, view in sorted(privacy.sites.items())
            },
        }
    site_level = None
    if privacy.site_level:
        site_level = {
            "clipping_norm": p.clipping_norm,
            "noise_multiplier": p.site_noise_multiplier,
            "sampling": "poisson",
            # Under secure aggregation the server (the adversary) sees who takes part: q = 1.
            "amplification": not privacy.secure_aggregation,
            "noise_accounting": (
                "z·√((s−1)/t) for s survivors of t: the protected site's own share not counted"
                if privacy.secure_aggregation
                else "z: the server adds all the noise"
            ),
            "rounds": [asdict(r) for r in privacy.site_level_rounds],
        }
    return report_document(
        run_id=run_id,
        rounds=privacy.cfg.rounds,
        delta=p.delta,
        accountant=p.accountant,
        secure_aggregation=privacy.secure_aggregation,
        sample_level=sample_level,
        site_level=site_level,
    )
