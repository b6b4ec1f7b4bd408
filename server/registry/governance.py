"""Registry operations under the policy: verify, approve/reject, promote (and roll back), audit.

Each operation checks signatures against the policy's keys, evaluates the pure gates of
``server.registry.policy`` and writes through one locked transaction that also appends the
action's signed audit entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from server.registry.audit import GENESIS_HASH, AuditEntry, verify_chain
from server.registry.checkpoint import Checkpoint, check_anchor, make_checkpoint
from server.registry.errors import PolicyError, PromotionRefused, VerificationError
from server.registry.manifest import (
    ModelRef,
    check_alias,
    decision_message,
    manifest_digest,
    manifest_message,
)
from server.registry.policy import Decision, GateReport, Policy, evaluate_gates, parse_policy
from server.registry.policy_chain import (
    POLICY_ACTION,
    PolicyChain,
    PolicyVersion,
    chain_from_entries,
    check_quorum,
    policy_entry_details,
    write_version,
)
from server.registry.registry import Registry
from server.registry.replay import ChainState, as_gate_decisions, chain_decisions, replay
from server.registry.signing import SigningKey, key_id, verify_signature
from server.registry.store import DecisionRecord, VersionRecord, utc_now


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
    """Every gate of ``alias`` for ``record`` (the promoter gate only when a key is given).

    The decisions that count are the signed ``approve``/``reject`` entries of the audit log,
    each valid under the policy in force when it was made, in audit order (the decision rows
    are only an index of them).
    """
    rule = policy.rule(alias)
    decisions, _ = chain_decisions_of(registry, session, record)
    promoter = None
    if promoter_key is not None:
        promoter = policy.principal_for_key(promoter_key)
        if promoter is None:
            raise VerificationError(
                f"--key: key {_kid(promoter_key)} is not in the policy {policy.source}"
            )
    return evaluate_gates(policy, rule, record.manifest, as_gate_decisions(decisions), promoter)


def chain_decisions_of(registry: Registry, session: Session, record: VersionRecord):
    """(valid decisions on ``record`` in audit order, why other decision entries do not count)."""
    store = registry.store
    chain, _ = chain_from_entries(store.audit_entries(session, actions=(POLICY_ACTION,)))
    publish = store.audit_entries(session, actions=("publish",), subject=record.ref)
    digest = str((publish[0].details or {}).get("manifest_sha256")) if publish else None
    if digest != record.manifest_sha256:
        digest = None
    entries = store.audit_entries(session, actions=("approve", "reject"), subject=record.ref)
    return chain_decisions(entries, chain, record.ref, digest)


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
                "policy_version": policy.version,
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
    audit = verify_audit(registry)
    if not audit.ok:
        raise VerificationError(
            f"promote {record.ref} to '{alias}' refused: the audit log does not verify: "
            f"{audit.problems[0]}"
        )
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
                "policy_version": policy.version,
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
    state: ChainState | None = None  # the replay (policies, decisions, aliases) when it ran

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def governed(self) -> bool:
        return self.state is not None and self.state.governed


def verify_audit(registry: Registry, anchor: Checkpoint | None = None) -> AuditReport:
    """The chain's integrity, every entry replayed under the policy in force, and the registry's
    rows matched one to one with their entries (and ``anchor``, when given, extended).

    1. hashes, links, the entry signatures and the recorded head (``audit.verify_chain``);
    2. the replay (``replay``): each entry signed by the key of the principal it names under the
       policy version then in force, with a role that permits its action; policy versions signed
       by the previous version's governance quorum; promotions that met every gate then;
    3. versions ↔ publish entries, decision rows ↔ approve/reject entries, alias rows ↔ the
       latest promote entry of each alias: one to one, in both directions;
    4. with ``anchor``: the chain extends the checkpoint (``checkpoint.check_anchor``).
    """
    with registry.store.read() as session:
        store = registry.store
        entries = store.audit_entries(session)
        head = store.audit_head(session)
        problems = verify_chain(entries, head)
        versions = store.versions(session)
        decision_rows = store.decisions(session)
        alias_rows = store.aliases(session)
    manifests = {
        (v.name, v.version): v.manifest
        for v in versions
        if manifest_digest(v.manifest) == v.manifest_sha256
    }
    state = replay(entries, manifests)
    problems += state.problems
    problems += _correspondence(entries, state, versions, decision_rows, alias_rows)
    if anchor is not None:
        if verify_chain(entries):  # a broken chain cannot be compared with the checkpoint
            problems.append("anchor: check anchor-extends: the log itself is broken (above)")
        else:
            problems += check_anchor(anchor, entries, state.policies)
    return AuditReport(entries, head, problems, state)


def _correspondence(
    entries: list[AuditEntry],
    state: ChainState,
    versions: list[VersionRecord],
    decision_rows: list[DecisionRecord],
    alias_rows: list,
) -> list[str]:
    problems: list[str] = []
    by_seq = {e.seq: e for e in entries}

    def expect(seq: int, action: str, subject: str, what: str, **details: Any) -> bool:
        entry = by_seq.get(seq)
        if (
            entry is None
            or entry.action != action
            or entry.subject != subject
            or any(entry.details.get(k) != v for k, v in details.items())
        ):
            problems.append(f"{what} has no matching '{action}' audit entry (entry {seq})")
            return False
        return True

    claimed: dict[int, str] = {}

    def claim(seq: int, what: str) -> None:
        if seq in claimed:
            problems.append(
                f"{what} and {claimed[seq]} both claim audit entry {seq} (check one-to-one: a "
                "copied row)"
            )
        claimed.setdefault(seq, what)

    for version in versions:
        what = f"version {version.ref}"
        expect(
            version.audit_seq, "publish", version.ref, what, manifest_sha256=version.manifest_sha256
        )
        claim(version.audit_seq, what)
    for row in decision_rows:
        what = f"{row.decision} #{row.id} of {row.name}:{row.version}"
        matched = expect(
            row.audit_seq,
            row.decision,
            f"{row.name}:{row.version}",
            what,
            signature=row.signature,
            manifest_sha256=row.manifest_sha256,
        )
        if matched:
            entry = by_seq[row.audit_seq]
            if entry.actor_key != row.public_key or entry.actor != row.principal:
                problems.append(
                    f"{what}: its principal or key differs from audit entry {row.audit_seq}'s"
                )
        claim(row.audit_seq, what)
    for entry in entries:
        if entry.action in ("publish", "approve", "reject") and entry.seq not in claimed:
            problems.append(
                f"audit entry {entry.seq} ({entry.action} {entry.subject}) has no "
                f"{'version' if entry.action == 'publish' else 'decision'} row (check one-to-one: "
                "deleted)"
            )
    rows = {(a.name, a.alias): a for a in alias_rows}
    for (name, alias), row in sorted(rows.items()):
        what = f"alias {name}@{alias} → {row.version}"
        latest = state.aliases.get((name, alias))
        if latest == (row.version, row.audit_seq):
            continue
        entry = by_seq.get(row.audit_seq)
        if (
            latest is not None
            and entry is not None
            and entry.action == "promote"
            and entry.subject == f"{name}@{alias}"
            and entry.details.get("version") == row.version
        ):
            problems.append(
                f"{what}: audit entry {row.audit_seq} is not the latest promotion of "
                f"{name}@{alias} (check latest-promote: entry {latest[1]} moved it to version "
                f"{latest[0]})"
            )
        else:
            problems.append(f"{what} has no matching 'promote' audit entry (entry {row.audit_seq})")
    for (name, alias), (version, seq) in sorted(state.aliases.items()):
        if (name, alias) not in rows:
            problems.append(
                f"audit entry {seq} moved {name}@{alias} to version {version} but no alias row "
                "says so (check one-to-one: deleted)"
            )
    return problems


# ---- the governed policy ------------------------------------------------------------------------


def apply_policy(registry: Registry, version: PolicyVersion, key: SigningKey) -> Policy:
    """Append ``version`` to the policy chain (as a signed ``policy`` audit entry) and write it
    to ``DIR/policy.yaml``. It must be the next version, name the head's digest and carry the
    quorum of signatures the head's governance rule requires (version 1: its own rule).
    ``key`` (one of the governing policy's signers) signs the audit entry."""
    new_policy = version.parsed(f"policy version {version.version}")
    with registry.store.write() as tx:
        entries = registry.store.audit_entries(tx.session, actions=(POLICY_ACTION,))
        chain, problems = chain_from_entries(entries)
        if problems:
            raise PolicyError(f"policy chain: {problems[0]}")
        head = chain.head_version if chain else None
        expected = head.version + 1 if head else 1
        if version.version != expected:
            raise PolicyError(
                f"policy apply refused: this is version {version.version} but the chain's next "
                f"version is {expected} (check policy-version: propose it again from the head)"
            )
        if version.previous_sha256 != (head.sha256 if head else GENESIS_HASH):
            raise PolicyError(
                f"policy apply refused: version {version.version} does not name the head's "
                "digest (check policy-link: propose it again from the head)"
            )
        governing = chain.head if chain else new_policy
        quorum = check_quorum(version, governing)
        if not quorum.ok:
            raise PolicyError(
                f"policy apply refused: check policy-quorum: {quorum.detail()} under "
                f"{governing.source}"
            )
        principal = governing.principal_for_key(key.public_key)
        if principal is None or principal.name not in quorum.signers:
            raise VerificationError(
                f"--key: key {key.key_id} is not one of this version's governance signers "
                f"({', '.join(quorum.signers)})"
            )
        tx.audit(
            action=POLICY_ACTION,
            subject=f"policy:v{version.version}",
            actor=principal.name,
            key=key,
            details=policy_entry_details(version),
        )
    write_version(registry.path / "policy.yaml", version)
    return new_policy


def propose_policy(registry: Registry, policy_data: Any, source: str) -> PolicyVersion:
    """An unsigned proposal of the next version holding ``policy_data`` (a policy mapping)."""
    parse_policy(policy_data, source=source)  # any mistake is named before anything is written
    chain = registry.policy_chain()
    head = chain.head_version if chain else None
    version = PolicyVersion(
        head.version + 1 if head else 1, head.sha256 if head else GENESIS_HASH, dict(policy_data)
    )
    version.parsed(source)  # needs a governance section
    return version


def policy_history(registry: Registry) -> PolicyChain:
    """The applied policy versions (verified: a broken chain raises PolicyError)."""
    return registry.policy_chain()


def checkpoint(registry: Registry, key: SigningKey) -> Checkpoint:
    """A signed checkpoint of the current head; refused unless the whole log verifies."""
    report = verify_audit(registry)
    if not report.ok:
        raise VerificationError(
            f"checkpoint refused: the audit log does not verify: {report.problems[0]}"
        )
    if not report.governed:
        raise PolicyError(
            "checkpoint refused: the registry has no policy yet (fedgov registry init)"
        )
    return make_checkpoint(report.entries, report.state.policies, key, utc_now())


def version_status(
    registry: Registry, session: Session, record: VersionRecord, policy: Policy | None
) -> dict[str, Any]:
    """Aliases, decisions and (with a policy) each alias's gates, for ``list`` and ``show``."""
    aliases = [
        a.alias for a in registry.store.aliases(session, record.name) if a.version == record.version
    ]
    counted, ignored = chain_decisions_of(registry, session, record)
    rows = registry.store.decisions(session, record.name, record.version)
    seqs = {d.seq for d in counted}
    ignored += [
        f"decision #{r.id} by {r.principal}: no valid audit entry (entry {r.audit_seq})"
        for r in rows
        if r.audit_seq not in seqs
    ]
    status: dict[str, Any] = {
        "aliases": aliases,
        "decisions": [
            {
                "decision": d.decision,
                "principal": d.principal,
                "key_id": _kid(d.public_key),
                "at": d.at,
                "comment": d.comment,
                "audit_seq": d.seq,
            }
            for d in counted
        ],
    }
    if policy is not None:
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
