"""Replaying the audit log under the policy in force at each entry (pure functions).

The chain's hashes and links (``audit.verify_chain``) say the log was not edited; the replay says
every entry was allowed when it was made: its key is the key of the principal it names under the
policy version in force, that principal's role permits the action, a decision's signature covers
the published manifest, and every promotion met every gate of the policy then in force with the
decisions made before it (later decisions replace a principal's earlier one, in audit order).
Each problem names the entry and the check that caught it (``check principal-key``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.registry.audit import AuditEntry
from server.registry.errors import RegistryError
from server.registry.manifest import decision_message, manifest_digest
from server.registry.policy import PUBLISHER_ROLE, Decision, Policy, Principal, evaluate_gates
from server.registry.policy_chain import POLICY_ACTION, PolicyChain, chain_from_entries
from server.registry.signing import key_id, verify_signature


@dataclass(frozen=True)
class ChainDecision:
    """An approval or rejection that the replay found valid when it was made."""

    seq: int
    principal: str
    decision: str
    public_key: str
    signature: str
    at: str
    comment: str


def _chain_decision(entry: AuditEntry, principal: str) -> ChainDecision:
    """The decision an approve/reject ``entry`` made by ``principal`` records."""
    details = entry.details or {}
    return ChainDecision(
        entry.seq,
        principal,
        entry.action,
        entry.actor_key,
        str(details.get("signature", "")),
        entry.at,
        str(details.get("comment", "")),
    )


@dataclass
class ChainState:
    """What the audit log says, entry by entry, and every problem found replaying it."""

    policies: PolicyChain
    published: dict[tuple[str, int], tuple[int, str]] = field(default_factory=dict)
    decisions: dict[tuple[str, int], list[ChainDecision]] = field(default_factory=dict)
    aliases: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # → version, seq
    problems: list[str] = field(default_factory=list)

    @property
    def governed(self) -> bool:
        return bool(self.policies)


def describe(entry: AuditEntry) -> str:
    return f"audit entry {entry.seq} ({entry.action} {entry.subject})"


def principal_problem(entry: AuditEntry, chain: PolicyChain) -> tuple[Principal | None, str | None]:
    """The principal that signed ``entry`` under the policy in force, or the problem."""
    policy = chain.in_force(entry.seq)
    if policy is None:
        return None, None  # an ungoverned registry: nothing binds keys to names
    if entry.action == POLICY_ACTION and entry.seq == chain.first_seq():
        policy = chain.versions[0][2]  # version 1 governs its own application
    principal = policy.principal_for_key(entry.actor_key)
    where = describe(entry)
    if principal is None:
        return None, (
            f"{where}: check principal-key: key {_kid(entry.actor_key)} is no principal's key "
            f"under {policy.source} (in force at that entry)"
        )
    before_governance = entry.seq < chain.first_seq()
    if principal.name != entry.actor and not (before_governance and entry.actor == "publisher"):
        return None, (
            f"{where}: check principal-key: signed with {principal.name}'s key but names "
            f"'{entry.actor}' as its actor"
        )
    if before_governance and entry.action != "publish":
        return None, f"{where}: check governed: a {entry.action} before the registry had a policy"
    return principal, None


def decision_problem(
    entry: AuditEntry, principal: Principal, policy: Policy, published_digest: str | None
) -> str | None:
    """Why an approve/reject entry does not count, or None."""
    where = describe(entry)
    if not any(rule.may_approve(principal) for rule in policy.aliases.values()):
        return (
            f"{where}: check role: {principal.name} may not approve or reject under {policy.source}"
        )
    if published_digest is None:
        return f"{where}: check published: no earlier publish entry of {entry.subject}"
    name, version = _ref_of(entry.subject)
    details = entry.details or {}
    if details.get("manifest_sha256") != published_digest:
        return f"{where}: check decision-manifest: the decision is for another manifest digest"
    message = decision_message(entry.action, name, version, published_digest)
    if not verify_signature(entry.actor_key, message, str(details.get("signature", ""))):
        return f"{where}: check decision-signature: {principal.name}'s signature does not verify"
    return None


def chain_decisions(
    entries: Sequence[AuditEntry], chain: PolicyChain, ref: str, published_digest: str | None
) -> tuple[list[ChainDecision], list[str]]:
    """The valid decisions on ``ref`` (``NAME:VERSION``) in audit order, and why others do not
    count. Each is judged under the policy in force when it was made."""
    counted, ignored = [], []
    for entry in entries:
        if entry.action not in ("approve", "reject") or entry.subject != ref:
            continue
        principal, problem = principal_problem(entry, chain)
        if principal is not None:
            problem = decision_problem(
                entry, principal, chain.in_force(entry.seq), published_digest
            )
        if problem is None and principal is None:
            problem = f"{describe(entry)}: check governed: the registry has no policy"
        if problem is not None:
            ignored.append(problem)
            continue
        counted.append(_chain_decision(entry, principal.name))
    return counted, ignored


def as_gate_decisions(decisions: Sequence[ChainDecision]) -> list[Decision]:
    """Decisions for ``policy.evaluate_gates``, ordered by their audit sequence number."""
    return [Decision(d.principal, d.decision, d.seq) for d in decisions]


def replay(
    entries: Sequence[AuditEntry], manifests: Mapping[tuple[str, int], Mapping[str, Any]]
) -> ChainState:
    """Replay ``entries`` (a structurally intact chain) with the stored ``manifests``."""
    chain, problems = chain_from_entries(entries)
    state = ChainState(chain, problems=list(problems))
    for entry in entries:
        principal, problem = principal_problem(entry, chain)
        if problem is not None:
            state.problems.append(problem)
            continue
        policy = chain.in_force(entry.seq)
        where = describe(entry)
        details = entry.details or {}
        if entry.action == "publish":
            if principal is not None and PUBLISHER_ROLE not in principal.roles:
                state.problems.append(
                    f"{where}: check role: {principal.name} is not a publisher under "
                    f"{policy.source}"
                )
                continue
            name, version = _ref_of(entry.subject)
            state.published[(name, version)] = (entry.seq, str(details.get("manifest_sha256")))
        elif entry.action in ("approve", "reject"):
            if principal is None:
                continue
            name, version = _ref_of(entry.subject)
            published = state.published.get((name, version))
            problem = decision_problem(
                entry, principal, policy, published[1] if published else None
            )
            if problem is not None:
                state.problems.append(problem)
                continue
            state.decisions.setdefault((name, version), []).append(
                _chain_decision(entry, principal.name)
            )
        elif entry.action == "promote":
            problem = _promote_problem(entry, principal, policy, state, manifests)
            if problem is not None:
                state.problems.append(problem)
                continue
            name = entry.subject.partition("@")[0]
            state.aliases[(name, str(details.get("alias")))] = (int(details["version"]), entry.seq)
        elif entry.action == POLICY_ACTION and principal is not None:
            governing = chain.in_force(entry.seq)
            if entry.seq == chain.first_seq():
                governing = chain.versions[0][2]
            rule = governing.governance
            if rule is not None and not rule.may_sign(principal):
                state.problems.append(
                    f"{where}: check role: {principal.name} may not apply policy versions"
                )
    return state


def _promote_problem(
    entry: AuditEntry,
    principal: Principal | None,
    policy: Policy | None,
    state: ChainState,
    manifests: Mapping[tuple[str, int], Mapping[str, Any]],
) -> str | None:
    where = describe(entry)
    details = entry.details or {}
    name, _, alias = entry.subject.partition("@")
    version = details.get("version")
    if details.get("alias") != alias or isinstance(version, bool) or not isinstance(version, int):
        return f"{where}: check promote-details: the alias or version is malformed"
    published = state.published.get((name, version))
    if published is None:
        return f"{where}: check published: no earlier publish entry of {name}:{version}"
    if details.get("manifest_sha256") != published[1]:
        return f"{where}: check promote-manifest: names another manifest than {name}:{version}'s"
    if principal is None or policy is None:
        return None  # ungoverned: nothing more to check
    if details.get("policy_sha256") not in (None, policy.sha256):
        return (
            f"{where}: check promote-policy: it names another policy than {policy.source}, the "
            "one in force at that entry"
        )
    try:
        rule = policy.rule(alias)
    except RegistryError:
        return f"{where}: check gates: alias '{alias}' is not governed by {policy.source}"
    manifest = manifests.get((name, version))
    if manifest is None or manifest_digest(dict(manifest)) != published[1]:
        return (
            f"{where}: check manifest: the stored manifest of {name}:{version} is not the one "
            "published"
        )
    decisions = [d for d in state.decisions.get((name, version), []) if d.seq < entry.seq]
    report = evaluate_gates(policy, rule, manifest, as_gate_decisions(decisions), principal)
    if not report.passed:
        unmet = "; ".join(str(g) for g in report.unmet)
        return f"{where}: check gates: under {policy.source} at that entry: {unmet}"
    return None


def _ref_of(subject: str) -> tuple[str, int]:
    """(name, version) of a ``NAME:VERSION`` subject; (subject, 0) when it is not one."""
    name, _, version = subject.partition(":")
    return (name, int(version)) if version.isascii() and version.isdigit() else (subject, 0)


def _kid(public_key: str) -> str:
    try:
        return key_id(public_key)
    except Exception:
        return "(malformed)"
