"""The federation's privacy budget across runs: per site ε spent against its cap, from receipts.

A pure function of the loaded runs (:func:`console.runs.load_runs`). Only receipts that verified
(signature, ε replayed by two accountants, history extending the previous one) count toward ε
spent; a failed receipt is listed as failed and left out of every number and of the chart. A
site's ledger is cumulative across runs, so its latest verified receipt states its total ε.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

STATUSES = ("trained", "declined", "refused", "dropped")


def federation_budget(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-site totals, the chart's series (cumulative ε over the runs' rounds) and problems."""
    sites: dict[str, dict[str, Any]] = {}
    steps: list[tuple[int, int]] = []  # (run index, round) in time order: the chart's x axis
    step_labels: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    usable = [r for r in runs if not r.get("error")]
    for index, run in enumerate(usable):
        for site_id, rounds in run["participation"].items():
            site = sites.setdefault(site_id, _new_site(site_id))
            for round_key, cell in sorted(rounds.items(), key=lambda kv: int(kv[0])):
                status = cell["status"]
                if status not in STATUSES:
                    continue
                site["rounds"][status] += 1
                if status != "trained":
                    site["reasons"][status][short_reason(cell["reason"])] += 1
                site["last_seen"] = {
                    "run": run["key"],
                    "run_id": run["run_id"],
                    "round": int(round_key),
                    "status": status,
                    "at": run["finished_at"],
                }
        sample = (run.get("privacy") or {}).get("sample_level") or {}
        for site_id, info in (sample.get("sites") or {}).items():
            site = sites.setdefault(site_id, _new_site(site_id))
            for receipt in info["receipts"]:
                point = {
                    "run": run["key"],
                    "run_id": run["run_id"],
                    "round": receipt["round"],
                    "kind": receipt["kind"],
                    "epsilon": receipt["epsilon"],
                }
                if not receipt["verified"]:
                    failed.append({"site": site_id, **point, "problems": receipt["problems"]})
                    site["failed_receipts"] += 1
                    continue
                site["verified_receipts"] += 1
                site["keys"].add(receipt.get("key"))
                step = (index, int(receipt["round"] or 0))
                if step not in steps:
                    steps.append(step)
                    step_labels.append(
                        {"run": run["key"], "run_id": run["run_id"], "round": step[1]}
                    )
                site["series"].append({**point, "step": step})
                if receipt["epsilon"] is not None and (
                    site["epsilon"] is None or receipt["epsilon"] >= site["epsilon"]
                ):
                    site["epsilon"] = receipt["epsilon"]
                if receipt.get("cap") is not None:
                    site["cap"] = receipt["cap"]
                if receipt.get("delta") is not None:
                    site["delta"] = receipt["delta"]
    order = {step: i for i, step in enumerate(sorted(steps))}
    labels = [step_labels[steps.index(step)] for step in sorted(steps)]
    out_sites = []
    for site_id in sorted(sites):
        site = sites[site_id]
        series = [
            {**{k: v for k, v in p.items() if k != "step"}, "x": order[p["step"]]}
            for p in site["series"]
        ]
        series.sort(key=lambda p: (p["x"], p["kind"] != "dp-sgd"))
        keys = sorted(k for k in site["keys"] if k)
        eps, cap = site["epsilon"], site["cap"]
        out_sites.append(
            {
                "site": site_id,
                "epsilon": eps,
                "cap": cap,
                "delta": site["delta"],
                "remaining": None if eps is None or cap is None else max(cap - eps, 0.0),
                "rounds": dict(site["rounds"]),
                "reasons": {s: dict(c) for s, c in site["reasons"].items() if c},
                "last_seen": site["last_seen"],
                "verified_receipts": site["verified_receipts"],
                "failed_receipts": site["failed_receipts"],
                "signing_keys": keys,
                "problem": (
                    f"receipts signed by {len(keys)} different keys across runs"
                    if len(keys) > 1
                    else None
                ),
                "series": series,
            }
        )
    return {
        "sites": out_sites,
        "steps": labels,
        "failed_receipts": failed,
        "runs": len(runs),
        "unreadable_runs": [{"run": r["key"], "error": r["error"]} for r in runs if r.get("error")],
    }


def short_reason(reason: str) -> str:
    """A reason without its particulars ("privacy budget exhausted: … ε = 3.49 > cap 3.48" →
    "privacy budget exhausted"), so that the same cause is counted once; the run page keeps
    the full text."""
    return reason.split(":", 1)[0].strip() or "no reason given" if reason else "no reason given"


def _new_site(site_id: str) -> dict[str, Any]:
    return {
        "site": site_id,
        "epsilon": None,
        "cap": None,
        "delta": None,
        "rounds": Counter({s: 0 for s in STATUSES}),
        "reasons": {s: Counter() for s in STATUSES if s != "trained"},
        "last_seen": None,
        "verified_receipts": 0,
        "failed_receipts": 0,
        "keys": set(),
        "series": [],
    }
