"""The console's one adapter into the model registry: read-only, returning plain dicts.

Every call the console makes into ``server.registry`` lives here, so a change of the registry's
API is fixed in this one module. The registry's SQLite file is opened read-only (``mode=ro``):
the console never writes to it. Each function returns JSON-safe data (the pages' JSON twins).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedgov.errors import FedgovError
from server.registry.checkpoint import Checkpoint, read_checkpoint
from server.registry.governance import (
    gate_report,
    verified_decisions,
    verify_audit,
    verify_version,
)
from server.registry.manifest import privacy_summary
from server.registry.policy import Policy, latest_decisions
from server.registry.registry import DB_ENV, DB_FILE, Registry
from server.registry.signing import key_id
from server.registry.store import VersionRecord


class RegistryUnavailable(FedgovError):
    """The registry folder cannot be opened for reading (the message says why, in one line)."""


def open_registry(path: str | Path) -> Registry:
    """The registry at ``path``, its SQLite file opened read-only (or ``$FEDGOV_REGISTRY_DB``)."""
    path = Path(path).resolve()
    db_url = os.environ.get(DB_ENV, "")
    if not db_url:
        db_file = path / DB_FILE
        if not db_file.is_file():
            raise RegistryUnavailable(
                f"--registry: {path} holds no {DB_FILE} (publish a run into it first: "
                "registry.publish=true, or fedgov demo)"
            )
        db_url = f"sqlite:///file:{db_file}?mode=ro&uri=true"
    try:
        return Registry(path, db_url)
    except FedgovError as error:
        raise RegistryUnavailable(str(error)) from None
    except Exception as error:  # a corrupt database file: one line, never a traceback
        raise RegistryUnavailable(f"--registry: {path} cannot be read ({error})") from None


def load_policy(registry: Registry) -> tuple[Policy | None, str | None]:
    """The registry's policy (``DIR/policy.yaml`` or ``$FEDGOV_POLICY``), or (None, why not)."""
    try:
        policy = registry.optional_policy()
    except FedgovError as error:
        return None, str(error)
    if policy is None:
        return None, f"no policy at {registry.policy_path()}: gates cannot be evaluated"
    return policy, None


def read_anchor(path: Path | None) -> tuple[Checkpoint | None, str | None]:
    """The checkpoint file at ``path`` (None: no anchor given), or (None, why it is unusable)."""
    if path is None:
        return None, None
    try:
        return read_checkpoint(path), None
    except FedgovError as error:
        return None, str(error)


def registry_overview(
    registry: Registry, only: tuple[str, int] | None = None, anchor: Path | None = None
) -> dict[str, Any]:
    """Models, their versions (lineage, verification, gates per alias, decisions), alias history
    and the audit chain's verification, as one plain dict; ``only`` = (name, version) evaluates
    that version alone (each model still says its ``latest`` version); with ``anchor`` (a
    checkpoint file kept outside the registry) the chain must also extend that checkpoint."""
    policy, policy_problem = load_policy(registry)
    checkpoint, anchor_problem = read_anchor(anchor)
    audit = verify_audit(registry, anchor=checkpoint)
    audit_problems = list(audit.problems) + ([anchor_problem] if anchor_problem else [])
    promotions = [_promotion(e) for e in audit.entries if e.action == "promote"]
    models: dict[str, dict[str, Any]] = {}
    with registry.store.read() as session:
        store = registry.store
        aliases = store.aliases(session)
        for record in store.versions(session, only[0] if only else None):
            model = models.setdefault(
                record.name,
                {
                    "name": record.name,
                    "versions": [],
                    "aliases": {
                        a.alias: {"version": a.version, "updated_at": a.updated_at}
                        for a in aliases
                        if a.name == record.name
                    },
                    "alias_history": [p for p in promotions if p["model"] == record.name],
                },
            )
            model["latest"] = record.version
            if only is None or record.version == only[1]:
                model["versions"].append(_version(registry, session, record, policy))
    return {
        "registry": str(registry.path),
        "policy": {
            "source": str(policy.source) if policy else None,
            "sha256": policy.sha256 if policy else None,
            "problem": policy_problem,
        },
        "models": list(models.values()),
        "audit": {
            "ok": audit.ok and anchor_problem is None,
            "entries": len(audit.entries),
            "head_seq": audit.head[0],
            "head_hash": audit.head[1],
            "problems": audit_problems,
            # the checkpoint the chain was checked against (None: no --anchor given)
            "anchor": None
            if anchor is None
            else {
                "file": str(anchor),
                "seq": checkpoint.seq if checkpoint else None,
                "head_hash": checkpoint.head_hash if checkpoint else None,
                "signer": checkpoint.signer if checkpoint else None,
                "extends": checkpoint is not None and audit.ok,
            },
        },
    }


def _promotion(entry: Any) -> dict[str, Any]:
    name, _, alias = entry.subject.partition("@")
    details = entry.details or {}
    return {
        "seq": entry.seq,
        "at": entry.at,
        "model": name,
        "alias": details.get("alias", alias),
        "version": details.get("version"),
        "previous_version": details.get("previous_version"),
        "rollback": bool(details.get("rollback")),
        "by": entry.actor,
    }


def _version(
    registry: Registry, session: Any, record: VersionRecord, policy: Policy | None
) -> dict[str, Any]:
    manifest = record.manifest
    lineage = manifest.get("lineage") or {}
    verification = verify_version(registry, record, policy)
    rows = registry.store.decisions(session, record.name, record.version)
    counted: set[int] = set()
    ignored: list[str] = []
    gates: dict[str, Any] = {}
    if policy is not None:
        decisions, ignored = verified_decisions(policy, record, rows)
        counted = {d.order for d in decisions}
        latest = latest_decisions(decisions)
        for alias, rule in sorted(policy.aliases.items()):
            report = gate_report(registry, session, record, policy, alias)
            may_approve = [p for p in policy.principals if rule.may_approve(p)]
            pending = [p.name for p in may_approve if latest.get(p.name) != "approve"]
            missing_roles = [
                role
                for role in rule.required_roles
                if not any(role in p.roles for p in may_approve if p.name in report.approvers)
            ]
            gates[alias] = {
                "passed": report.passed,
                "results": [
                    {"gate": g.gate, "passed": g.passed, "detail": g.detail} for g in report.results
                ],
                "approvers": list(report.approvers),
                "quorum": rule.quorum,
                # who may still approve, and for a missing required role who holds it
                "awaiting": pending if len(report.approvers) < rule.quorum or missing_roles else [],
                "required_roles_missing": {
                    role: [p.name for p in may_approve if role in p.roles and p.name in pending]
                    for role in missing_roles
                },
                "promoters": [p.name for p in policy.principals if rule.may_promote(p)],
            }
    return {
        "ref": record.ref,
        "name": record.name,
        "version": record.version,
        "created_at": record.created_at,
        "manifest_sha256": record.manifest_sha256,
        "publisher_key_id": _kid(record.signer_key),
        "run_id": record.run_id,
        "lineage": {
            "run_id": lineage.get("run_id"),
            "run_dir": lineage.get("run_dir"),
            "dataset": lineage.get("dataset"),
            "strategy": lineage.get("strategy"),
            "rounds": lineage.get("rounds"),
            "rounds_completed": lineage.get("rounds_completed"),
            "sites": list(lineage.get("sites") or []),
            "secure_aggregation": bool((lineage.get("secure_aggregation") or {}).get("enabled")),
            "privacy": (lineage.get("privacy") or {}).get("name"),
            "code_commit": lineage.get("code_commit"),
        },
        "metrics": dict((manifest.get("metrics") or {}).get("final") or {}),
        "privacy": privacy_summary(manifest.get("privacy_report")),
        "verification": {
            "ok": verification.ok,
            "checks": [
                {"what": c.what, "ok": c.ok, "detail": c.detail} for c in verification.checks
            ],
        },
        "decisions": [
            {
                "id": r.id,
                "decision": r.decision,
                "principal": r.principal,
                "key_id": _kid(r.public_key),
                "at": r.created_at,
                "comment": r.comment,
                "counted": r.id in counted,
            }
            for r in rows
        ],
        "ignored_decisions": ignored,
        "gates": gates,
    }


def version_manifest(registry: Registry, name: str, version: int) -> dict[str, Any] | None:
    """The stored manifest of ``name:version`` (None when there is no such version)."""
    with registry.store.read() as session:
        for record in registry.store.versions(session, name):
            if record.version == version:
                return record.manifest
    return None


def _kid(public_key: str) -> str:
    try:
        return key_id(public_key)
    except Exception:
        return "unparseable key"
