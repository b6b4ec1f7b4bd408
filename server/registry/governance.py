"""Registry operations under the policy: verify, approve/reject, promote (and roll back), audit.

Each operation checks signatures against the policy's keys, evaluates the pure gates of
``server.registry.policy`` and writes through one locked transaction that also appends the
action's signed audit entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from server.registry.audit import AuditEntry, verify_chain
from server.registry.errors import PromotionRefused, VerificationError
from server.registry.manifest import (
    ModelRef,
    check_alias,
    decision_message,
    manifest_digest,
    manifest_message,
)
from server.registry.policy import Decision, GateReport, Policy, evaluate_gates
from server.registry.registry import Registry
from server.registry.signing import SigningKey, key_id, verify_signature
from server.registry.store import DecisionRecord, VersionRecord


@dataclass
class Check:
    """One verification step: what was checked, whether it held, and the detail."""

    what: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.what}: {self.detail}"


@dataclass
class VerificationReport:
    ref: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if not c.ok), None)

    def raise_for_failure(self, prefix: str = "") -> None:
        failed = self.first_failure()
        if failed is not None:
            raise VerificationError(f"{prefix}{self.ref}: {failed.what}: {failed.detail}")


# ---- verification of one version ----------------------------------------------------------------


def verify_version(
    registry: Registry, record: VersionRecord, policy: Policy | None
) -> VerificationReport:
    """Check the manifest's digest and signature, the signer against the policy, every artifact."""
    report = VerificationReport(record.ref)
    add = report.checks.append
    manifest = record.manifest
    digest = manifest_digest(manifest)
    same_identity = (
        manifest.get("name") == record.name and manifest.get("version") == record.version
    )
    add(
        Check(
            "manifest",
            digest == record.manifest_sha256 and same_identity,
            f"sha256 {digest[:16]}…"
            if digest == record.manifest_sha256 and same_identity
            else "the stored manifest does not match its recorded digest or name/version (edited)",
        )
    )
    publisher_key = (manifest.get("publisher") or {}).get("public_key", "")
    signature_ok = publisher_key == record.signer_key and verify_signature(
        record.signer_key, manifest_message(record.manifest_sha256), record.signature
    )
    add(
        Check(
            "signature",
            signature_ok,
            f"Ed25519 by key {key_id(record.signer_key)}"
            if signature_ok
            else f"the manifest signature does not verify against key {_kid(record.signer_key)}",
        )
    )
    if policy is not None:
        principal = policy.principal_for_key(record.signer_key)
        trusted = policy.is_publisher(record.signer_key)
        add(
            Check(
                "publisher",
                trusted,
                f"signed by {principal.name} (role publisher in {policy.source})"
                if trusted
                else f"key {_kid(record.signer_key)} is not a publisher in {policy.source}",
            )
        )
    artifacts = manifest.get("artifacts") or {}
    if not artifacts:
        add(Check("artifacts", False, "the manifest lists no artifacts"))
    for role, info in sorted(artifacts.items()):
        try:
            registry.artifacts.verify(info["sha256"], f"artifact {role}")
        except VerificationError as error:
            add(Check(f"artifact {role}", False, str(error).partition(": ")[2]))
        else:
            add(
                Check(
                    f"artifact {role}",
                    True,
                    f"sha256 {info['sha256'][:16]}… ({info['bytes']} bytes)",
                )
            )
    return report


def _kid(public_key: str) -> str:
    try:
        return key_id(public_key)
    except Exception:
        return repr(public_key)


def verified_decisions(
    policy: Policy, record: VersionRecord, rows: list[DecisionRecord]
) -> tuple[list[Decision], list[str]]:
    """The decisions whose signature holds against the policy's key for their signer.

    Returns (counted, ignored reasons): a decision by a key not in the policy, for another
    manifest digest, or with a bad signature is ignored.
    """
    counted, ignored = [], []
    for row in rows:
        principal = policy.principal_for_key(row.public_key)
        if principal is None:
            ignored.append(f"decision #{row.id} by key {_kid(row.public_key)}: not in the policy")
            continue
        if row.manifest_sha256 != record.manifest_sha256:
            ignored.append(f"decision #{row.id} by {principal.name}: for another manifest")
            continue
        message = decision_message(
            row.decision, record.name, record.version, record.manifest_sha256
        )
        if not verify_signature(row.public_key, message, row.signature):
            ignored.append(f"decision #{row.id} by {principal.name}: signature does not verify")
            continue
        counted.append(Decision(principal.name, row.decision, row.id))
    return counted, ignored


def gate_report(
    registry: Registry,
    session: Session,
    record: VersionRecord,
    policy: Policy,
    alias: str,
    promoter_key: str | None = None,
) -> GateReport:
    """Every gate of ``alias`` for ``record`` (the promoter gate only when a key is given)."""
    rule = policy.rule(alias)
    rows = registry.store.decisions(session, record.name, record.version)
    decisions, _ = verified_decisions(policy, record, rows)
    promoter = None
    if promoter_key is not None:
        promoter = policy.principal_for_key(promoter_key)
        if promoter is None:
            raise VerificationError(
                f"--key: key {_kid(promoter_key)} is not in the policy {policy.source}"
            )
    return evaluate_gates(policy, rule, record.manifest, decisions, promoter)


# ---- actions ------------------------------------------------------------------------------------


def resolve(registry: Registry, ref: ModelRef) -> VersionRecord:
    with registry.store.read() as session:
        return registry.store.resolve(session, ref)


def decide(
    registry: Registry,
    ref: ModelRef,
    decision: str,
    key: SigningKey,
    policy: Policy,
    comment: str = "",
) -> tuple[VersionRecord, str]:
    """Sign and record an approval or rejection; returns (version, principal name).

    The key must belong to a principal of the policy whose roles count for some alias, and the
    version must verify (signature, publisher, artifacts): nobody approves a tampered model.
    """
    principal = policy.principal_for_key(key.public_key)
    if principal is None:
        raise VerificationError(
            f"--key: key {key.key_id} is not in the policy {policy.source}: only a principal it "
            "lists may approve or reject"
        )
    if not any(rule.may_approve(principal) for rule in policy.aliases.values()):
        raise VerificationError(
            f"--key: {principal.name} (roles {', '.join(principal.roles)}) may not approve or "
            f"reject under any alias of {policy.source}"
        )
    record = resolve(registry, ref)
    verify_version(registry, record, policy).raise_for_failure(f"{decision} refused: ")
    signature = key.sign(
        decision_message(decision, record.name, record.version, record.manifest_sha256)
    )
    with registry.store.write() as tx:
        entry = tx.audit(
            action=decision,
            subject=record.ref,
            actor=principal.name,
            key=key,
            details={
                "manifest_sha256": record.manifest_sha256,
                "signature": signature,
                "comment": comment,
            },
        )
        tx.add_decision(
            name=record.name,
            version=record.version,
            decision=decision,
            principal=principal.name,
            public_key=key.public_key,
            manifest_sha256=record.manifest_sha256,
            signature=signature,
            comment=comment,
            audit_seq=entry.seq,
        )
    return record, principal.name


@dataclass
class Promotion:
    record: VersionRecord
    alias: str
    previous_version: int | None
    report: GateReport
    promoter: str

    @property
    def rollback(self) -> bool:
        return self.previous_version is not None and self.record.version < self.previous_version


def promote(
    registry: Registry, ref: ModelRef, alias: str, key: SigningKey, policy: Policy
) -> Promotion:
    """Move ``alias`` to the version ``ref`` names when every gate holds, else PromotionRefused.

    Moving an alias back to an older version is a rollback: the same gates apply to it.
    """
    check_alias(alias, "--alias")
    policy.rule(alias)  # an ungoverned alias fails before anything else
    record = resolve(registry, ref)
    verify_version(registry, record, policy).raise_for_failure(f"promote to '{alias}' refused: ")
    with registry.store.write() as tx:
        report = gate_report(registry, tx.session, record, policy, alias, key.public_key)
        if not report.passed:
            unmet = "; ".join(str(g) for g in report.unmet)
            raise PromotionRefused(f"promote {record.ref} to '{alias}' refused: {unmet}")
        promoter = policy.principal_for_key(key.public_key)
        previous = tx.current_alias(record.name, alias)
        entry = tx.audit(
            action="promote",
            subject=f"{record.name}@{alias}",
            actor=promoter.name,
            key=key,
            details={
                "alias": alias,
                "version": record.version,
                "previous_version": previous,
                "rollback": previous is not None and record.version < previous,
                "manifest_sha256": record.manifest_sha256,
                "policy_sha256": policy.sha256,
                "gates": [
                    {"gate": g.gate, "passed": g.passed, "detail": g.detail} for g in report.results
                ],
            },
        )
        tx.set_alias(record.name, alias, record.version, entry.seq)
    return Promotion(record, alias, previous, report, promoter.name)


# ---- the audit log ------------------------------------------------------------------------------


@dataclass
class AuditReport:
    entries: list[AuditEntry]
    head: tuple[int, str]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_audit(registry: Registry) -> AuditReport:
    """The chain's integrity, and that every version, decision and alias has its audit entry.

    The second part catches what the chain alone cannot: a registry row changed or added
    without its action being logged (e.g. an alias pointed elsewhere directly in the database).
    """
    with registry.store.read() as session:
        store = registry.store
        entries = store.audit_entries(session)
        head = store.audit_head(session)
        problems = verify_chain(entries, head)
        by_seq = {e.seq: e for e in entries}

        def expect(seq: int, action: str, subject: str, what: str, **details: Any) -> None:
            entry = by_seq.get(seq)
            if (
                entry is None
                or entry.action != action
                or entry.subject != subject
                or any(entry.details.get(k) != v for k, v in details.items())
            ):
                problems.append(f"{what} has no matching '{action}' audit entry (entry {seq})")

        for version in store.versions(session):
            expect(
                version.audit_seq,
                "publish",
                version.ref,
                f"version {version.ref}",
                manifest_sha256=version.manifest_sha256,
            )
        for row in store.decisions(session):
            expect(
                row.audit_seq,
                row.decision,
                f"{row.name}:{row.version}",
                f"{row.decision} #{row.id} of {row.name}:{row.version}",
                signature=row.signature,
            )
        digests = {(v.name, v.version): v.manifest_sha256 for v in store.versions(session)}
        for alias in store.aliases(session):
            expect(
                alias.audit_seq,
                "promote",
                f"{alias.name}@{alias.alias}",
                f"alias {alias.name}@{alias.alias} → {alias.version}",
                version=alias.version,
                manifest_sha256=digests.get((alias.name, alias.version)),
            )
    return AuditReport(entries, head, problems)


def version_status(
    registry: Registry, session: Session, record: VersionRecord, policy: Policy | None
) -> dict[str, Any]:
    """Aliases, decisions and (with a policy) each alias's gates, for ``list`` and ``show``."""
    aliases = [
        a.alias for a in registry.store.aliases(session, record.name) if a.version == record.version
    ]
    rows = registry.store.decisions(session, record.name, record.version)
    status: dict[str, Any] = {
        "aliases": aliases,
        "decisions": [
            {
                "decision": r.decision,
                "principal": r.principal,
                "key_id": _kid(r.public_key),
                "at": r.created_at,
                "comment": r.comment,
            }
            for r in rows
        ],
    }
    if policy is not None:
        _, ignored = verified_decisions(policy, record, rows)
        status["ignored_decisions"] = ignored
        status["gates"] = {
            alias: {
                "passed": (report := gate_report(registry, session, record, policy, alias)).passed,
                "results": [
                    {"gate": g.gate, "passed": g.passed, "detail": g.detail} for g in report.results
                ],
            }
            for alias in sorted(policy.aliases)
        }
    return status
