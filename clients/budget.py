"""``fedgov site budget``: what a site's own privacy ledger says it has spent, against its cap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgov.errors import FedgovError
from privacy.accounting import epsilon
from privacy.ledger import LedgerError, LedgerState, SiteLedger
from privacy.receipts import PRIVATE_KEY_FILE


@dataclass(frozen=True)
class BudgetSummary:
    """A site's ledger read back: ε spent (recomputed from its history), cap and events."""

    site_id: str
    ledger_path: Path
    cap: float
    epsilon_spent: float
    delta: float | None
    accountant: str | None
    state: LedgerState

    def as_dict(self) -> dict[str, Any]:
        return {
            "site_id": self.site_id,
            "ledger": str(self.ledger_path),
            "epsilon_cap": self.cap,
            "epsilon_spent": self.epsilon_spent,
            "epsilon_left": max(self.cap - self.epsilon_spent, 0.0),
            "delta": self.delta,
            "accountant": self.accountant,
            "spends": [
                {
                    "run": s.run_id,
                    "round": s.round,
                    "noise_multiplier": s.noise_multiplier,
                    "sample_rate": s.sample_rate,
                    "steps": s.steps,
                    "epsilon_after": s.epsilon_after,
                    "status": s.status,
                }
                for s in self.state.spends
            ],
            "declines": [
                {
                    "run": d.run_id,
                    "round": d.round,
                    "reason": d.reason,
                    "epsilon_spent": d.epsilon_spent,
                    "cap": d.cap,
                }
                for d in self.state.declines
            ],
        }


def read_budget(site_dir: str | Path, site_id: str, cap: float) -> BudgetSummary:
    """Read the site's ledger; ε is recomputed from the history with the latest δ/accountant."""
    ledger = SiteLedger(site_dir, site_id, PRIVATE_KEY_FILE)
    try:
        state = ledger.read()
    except LedgerError as error:
        raise FedgovError(f"site {site_id}: {error}") from None
    latest = state.spends[-1] if state.spends else None
    spent = epsilon(state.history(), latest.delta, latest.accountant) if latest else 0.0
    return BudgetSummary(
        site_id=site_id,
        ledger_path=ledger.path,
        cap=cap,
        epsilon_spent=spent,
        delta=latest.delta if latest else None,
        accountant=latest.accountant if latest else None,
        state=state,
    )


def format_budget(summary: BudgetSummary) -> str:
    """A short human-readable table of the site's spends and declines."""
    lines = [
        f"site {summary.site_id}: ε spent {summary.epsilon_spent:.3f} of cap {summary.cap:g}"
        + (f" (δ = {summary.delta:g}, {summary.accountant} accountant)" if summary.delta else ""),
        f"ledger {summary.ledger_path}",
    ]
    if summary.state.spends:
        lines.append(" run                  round   σ       q        steps  ε after  status")
        for s in summary.state.spends:
            lines.append(
                f" {s.run_id[:20]:<20} {s.round:>5}   {s.noise_multiplier:<7.3f} "
                f"{s.sample_rate:<8.4f} {s.steps:>5}  {s.epsilon_after:>7.3f}  {s.status}"
            )
    else:
        lines.append(" no spends yet")
    for d in summary.state.declines:
        lines.append(f" declined run {d.run_id} round {d.round}: {d.reason}")
    return "\n".join(lines)
