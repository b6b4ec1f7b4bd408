"""A privacy budget statement for one model version: the document a privacy officer files.

Pure: built from the version's entry in the registry overview (lineage, gates, decisions), its
signed manifest's embedded privacy report (re-verified here, receipt by receipt) and, when the
runs folder holds the run that trained it, that run's site sizes.
"""

from __future__ import annotations

from typing import Any

from console.runs import privacy_view


def statement_data(
    version: dict[str, Any], manifest: dict[str, Any], runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """What data, which sites, which guarantees (ε, δ), which receipts back them, who approved."""
    report = manifest.get("privacy_report")
    lineage = version["lineage"]
    run = next(
        (r for r in runs if not r.get("error") and r["run_id"] == str(lineage.get("run_id"))),
        None,
    )
    privacy = privacy_view(report) if isinstance(report, dict) else None
    sites = []
    site_rows = (run or {}).get("sites") or {}
    sample_sites = ((privacy or {}).get("sample_level") or {}).get("sites") or {}
    for site_id in sorted(set(lineage["sites"]) | set(sample_sites)):
        info = sample_sites.get(site_id)
        receipts = (info or {}).get("receipts") or []
        sites.append(
            {
                "site": site_id,
                "records": (site_rows.get(site_id) or {}).get("num_train"),
                "epsilon": (info or {}).get("epsilon"),
                "cap": (info or {}).get("cap"),
                "delta": (info or {}).get("delta"),
                "receipts": len(receipts),
                "receipts_verified": sum(1 for r in receipts if r["verified"]),
                "signing_keys": sorted({r.get("key") for r in receipts if r.get("key")}),
            }
        )
    return {
        "model": version["ref"],
        "manifest_sha256": version["manifest_sha256"],
        "created_at": version["created_at"],
        "publisher_key_id": version["publisher_key_id"],
        "version_verified": version["verification"]["ok"],
        "data": {
            "dataset": lineage.get("dataset"),
            "run_id": lineage.get("run_id"),
            "run": (run or {}).get("key"),
            "strategy": lineage.get("strategy"),
            "rounds": lineage.get("rounds_completed") or lineage.get("rounds"),
        },
        "sites": sites,
        "guarantees": (privacy or {}).get("guarantees"),
        "summary": (privacy or {}).get("summary"),
        "receipts": (privacy or {}).get("verification")
        or {"ok": False, "receipts_checked": 0, "problems": ["no privacy report in the manifest"]},
        "approvals": [
            {k: d[k] for k in ("principal", "decision", "at", "comment", "key_id")}
            for d in version["decisions"]
            if d["counted"]
        ],
        "uncounted_decisions": version["ignored_decisions"],
        "gates": {
            alias: {"passed": g["passed"], "approvers": g["approvers"], "awaiting": g["awaiting"]}
            for alias, g in version["gates"].items()
        },
    }
