"""``/metrics`` for Prometheus: each site's ε spent, cap, remaining budget and rounds by status.

Computed at each scrape from the verified receipts (a custom collector on a private registry,
so nothing global is touched).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily


class BudgetCollector:
    """Gauges of the federation budget (:func:`console.budget.federation_budget`)."""

    def __init__(self, budget: dict[str, Any]) -> None:
        self.budget = budget

    def collect(self):
        spent = GaugeMetricFamily(
            "fedgov_site_epsilon_spent",
            "ε a site has spent across runs (its latest verified receipt), at its δ",
            labels=["site", "delta"],
        )
        cap = GaugeMetricFamily("fedgov_site_epsilon_cap", "the site's ε cap", labels=["site"])
        remaining = GaugeMetricFamily(
            "fedgov_site_epsilon_remaining", "cap minus ε spent (≥ 0)", labels=["site"]
        )
        rounds = GaugeMetricFamily(
            "fedgov_site_rounds", "rounds across runs by status", labels=["site", "status"]
        )
        failed = GaugeMetricFamily(
            "fedgov_site_receipts_failed", "receipts that failed verification", labels=["site"]
        )
        for site in self.budget["sites"]:
            name = site["site"]
            if site["epsilon"] is not None:
                spent.add_metric(
                    [name, f"{site['delta']:g}" if site["delta"] else ""], site["epsilon"]
                )
            if site["cap"] is not None:
                cap.add_metric([name], site["cap"])
            if site["remaining"] is not None:
                remaining.add_metric([name], site["remaining"])
            for status, count in site["rounds"].items():
                rounds.add_metric([name, status], count)
            failed.add_metric([name], site["failed_receipts"])
        unreadable = GaugeMetricFamily(
            "fedgov_runs_unreadable", "run folders the console could not read"
        )
        unreadable.add_metric([], len(self.budget["unreadable_runs"]))
        yield from (spent, cap, remaining, rounds, failed, unreadable)


def exposition(sources: Any) -> tuple[bytes, str]:
    """The Prometheus text exposition of the current budget, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BudgetCollector(sources.federation()["budget"]))
    return generate_latest(registry), CONTENT_TYPE_LATEST
