"""The governance policy: who may publish, approve and promote, and the gates of each alias.

A policy file (YAML, see ``conf/registry/policy.yaml``)::

    principals:
      alice: {public_key: "ed25519:...", roles: [clinical-lead]}
      fl-server: {public_key: "ed25519:...", roles: [publisher]}
    aliases:
      production:
        quorum: 2                          # distinct approvers whose latest decision is approve
        approver_roles: [clinical-lead, privacy-officer]   # whose decisions count (default: all)
        required_roles: [privacy-officer]  # at least one approval from each of these roles
        promoter_roles: [release-manager]  # who may move the alias (default: any principal)
        gates:
          max_epsilon: 8.0                 # from the privacy report; no report = refused
          min_metrics: {central_eval_accuracy: 0.6}
          max_metrics: {central_eval_loss: 0.7}
          require_secure_aggregation: true
    governance:                            # who signs the NEXT version of this policy
      quorum: 2                            # distinct principals' signatures
      signer_roles: [clinical-lead, privacy-officer]   # whose signatures count (default: all)

The policy in force is the head of a signed chain of versions (``server.registry.policy_chain``);
a bare policy file is only a proposal. Parsing (:func:`parse_policy`) and gate evaluation
(:func:`evaluate_gates`) are pure; the caller verifies signatures and passes in only decisions
that were valid under the policy in force when they were made.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgov.errors import check_keys
from server.registry.errors import PolicyError, RegistryError
from server.registry.manifest import (
    check_alias,
    final_metric,
    privacy_epsilon,
    secure_aggregation_enabled,
)
from server.registry.signing import key_id, parse_public_key

PUBLISHER_ROLE = "publisher"
GATE_KEYS = ("max_epsilon", "min_metrics", "max_metrics", "require_secure_aggregation")
ALIAS_KEYS = ("quorum", "approver_roles", "required_roles", "promoter_roles", "gates")
GOVERNANCE_KEYS = ("quorum", "signer_roles")


@dataclass(frozen=True)
class Principal:
    """A person or service the policy knows by name, public key and roles."""

    name: str
    public_key: str
    roles: tuple[str, ...]

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)


@dataclass(frozen=True)
class AliasRule:
    """What moving ``alias`` to a version requires."""

    alias: str
    quorum: int = 1
    approver_roles: tuple[str, ...] = ()  # () = every principal that is not only a publisher
    required_roles: tuple[str, ...] = ()
    promoter_roles: tuple[str, ...] = ()  # () = any principal
    max_epsilon: float | None = None
    min_metrics: tuple[tuple[str, float], ...] = ()
    max_metrics: tuple[tuple[str, float], ...] = ()
    require_secure_aggregation: bool = False

    def may_approve(self, principal: Principal) -> bool:
        """Whether ``principal``'s decisions count toward this alias's quorum and vetoes."""
        if self.approver_roles:
            return bool(set(principal.roles) & set(self.approver_roles))
        return set(principal.roles) != {PUBLISHER_ROLE}

    def may_promote(self, principal: Principal) -> bool:
        """Whether ``principal`` may move this alias."""
        return not self.promoter_roles or bool(set(principal.roles) & set(self.promoter_roles))


@dataclass(frozen=True)
class GovernanceRule:
    """What the NEXT version of the policy needs: ``quorum`` distinct signers holding a role in
    ``signer_roles`` (empty: any principal)."""

    quorum: int
    signer_roles: tuple[str, ...] = ()

    def may_sign(self, principal: Principal) -> bool:
        return not self.signer_roles or bool(set(principal.roles) & set(self.signer_roles))


@dataclass(frozen=True)
class Policy:
    """A parsed policy. In a governed registry ``sha256`` is the signed version's digest and
    ``version`` its number in the chain (0: not yet part of a chain)."""

    principals: tuple[Principal, ...]
    aliases: Mapping[str, AliasRule]
    sha256: str = ""
    source: str = "policy"
    governance: GovernanceRule | None = None
    version: int = 0
    document: Mapping[str, Any] | None = None  # the policy's mapping form, as signed

    def principal_for_key(self, public_key: str) -> Principal | None:
        """The principal holding ``public_key``, or None."""
        return next((p for p in self.principals if p.public_key == public_key), None)

    def principal(self, name: str) -> Principal | None:
        return next((p for p in self.principals if p.name == name), None)

    def is_publisher(self, public_key: str) -> bool:
        """Whether ``public_key`` belongs to a principal with the ``publisher`` role."""
        principal = self.principal_for_key(public_key)
        return principal is not None and PUBLISHER_ROLE in principal.roles

    def rule(self, alias: str) -> AliasRule:
        """The rule of ``alias``; an alias the policy does not govern raises RegistryError."""
        if alias not in self.aliases:
            known = ", ".join(sorted(self.aliases)) or "none"
            raise RegistryError(
                f"alias '{alias}' is not governed by {self.source} (aliases it defines: {known})"
            )
        return self.aliases[alias]


@dataclass(frozen=True)
class Decision:
    """An approval or rejection whose signature the caller verified against the policy's key."""

    principal: str
    decision: str  # "approve" | "reject"
    order: int  # later decisions have larger orders; a principal's latest decision counts


@dataclass(frozen=True)
class GateResult:
    """One gate: its name (as the policy spells it), whether it holds, and why."""

    gate: str
    passed: bool
    detail: str

    def __str__(self) -> str:
        return f"gate {self.gate}: {self.detail}"


@dataclass
class GateReport:
    """All gates of one promotion."""

    alias: str
    results: list[GateResult] = field(default_factory=list)
    approvers: list[str] = field(default_factory=list)  # whose approvals count toward the quorum

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def unmet(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]


# ---- evaluation (pure) --------------------------------------------------------------------------


def latest_decisions(decisions: Sequence[Decision]) -> dict[str, str]:
    """Each principal's latest decision (by ``order``)."""
    latest: dict[str, Decision] = {}
    for d in sorted(decisions, key=lambda d: d.order):
        latest[d.principal] = d
    return {name: d.decision for name, d in latest.items()}


def evaluate_gates(
    policy: Policy,
    rule: AliasRule,
    manifest: Mapping[str, Any],
    decisions: Sequence[Decision],
    promoter: Principal | None = None,
) -> GateReport:
    """Evaluate every gate of ``rule`` for a version with ``manifest`` and verified ``decisions``.

    ``promoter`` None skips the promoter gate (used when re-checking an alias at serve time).
    Decisions by names the policy does not know, or whose roles do not count here, are ignored.
    """
    report = GateReport(rule.alias)
    add = report.results.append
    latest = latest_decisions(decisions)
    eligible = {
        name: p
        for name in latest
        if (p := policy.principal(name)) is not None and rule.may_approve(p)
    }
    approvers = sorted(name for name, p in eligible.items() if latest[name] == "approve")
    rejecters = sorted(name for name, p in eligible.items() if latest[name] == "reject")
    report.approvers = approvers

    who = f" ({', '.join(approvers)})" if approvers else ""
    add(
        GateResult(
            "quorum",
            len(approvers) >= rule.quorum,
            f"{len(approvers)} of {rule.quorum} required approvals{who}",
        )
    )
    if rule.required_roles:
        missing = [
            role
            for role in rule.required_roles
            if not any(role in eligible[name].roles for name in approvers)
        ]
        add(
            GateResult(
                "required_roles",
                not missing,
                "no approval yet from role " + ", ".join(missing)
                if missing
                else "approved by every required role (" + ", ".join(rule.required_roles) + ")",
            )
        )
    add(
        GateResult(
            "rejections",
            not rejecters,
            "rejected by " + ", ".join(rejecters) if rejecters else "no standing rejection",
        )
    )
    if promoter is not None:
        allowed = rule.may_promote(promoter)
        roles = ", ".join(rule.promoter_roles) or "any principal"
        add(
            GateResult(
                "promoter_roles",
                allowed,
                f"{promoter.name} may move '{rule.alias}'"
                if allowed
                else f"{promoter.name} (roles {', '.join(promoter.roles) or 'none'}) may not move "
                f"'{rule.alias}' (allowed: {roles})",
            )
        )
    if rule.max_epsilon is not None:
        epsilon = privacy_epsilon(manifest.get("privacy_report"))
        if not manifest.get("privacy_report"):
            add(GateResult("max_epsilon", False, "no privacy report in the manifest (ε unknown)"))
        elif epsilon is None:
            add(
                GateResult(
                    "max_epsilon", False, "the privacy report has no ε (differential privacy off)"
                )
            )
        else:
            add(
                GateResult(
                    "max_epsilon",
                    epsilon <= rule.max_epsilon,
                    f"ε = {epsilon:.4g} {'≤' if epsilon <= rule.max_epsilon else '>'} "
                    f"{rule.max_epsilon:g}",
                )
            )
    for name, bound in rule.min_metrics:
        value = final_metric(manifest, name)
        ok = value is not None and value >= bound
        shown = "absent" if value is None else f"{value:.4g}"
        add(GateResult(f"min_metrics.{name}", ok, f"{name} = {shown}, minimum {bound:g}"))
    for name, bound in rule.max_metrics:
        value = final_metric(manifest, name)
        ok = value is not None and value <= bound
        shown = "absent" if value is None else f"{value:.4g}"
        add(GateResult(f"max_metrics.{name}", ok, f"{name} = {shown}, maximum {bound:g}"))
    if rule.require_secure_aggregation:
        enabled = secure_aggregation_enabled(dict(manifest))
        add(
            GateResult(
                "require_secure_aggregation",
                enabled,
                "trained with secure aggregation"
                if enabled
                else "trained without secure aggregation",
            )
        )
    return report


# ---- parsing ------------------------------------------------------------------------------------


def load_policy(path: str | Path) -> Policy:
    """Read and check a policy file; any problem raises PolicyError naming the file and field."""
    import yaml

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError(f"policy: {path} does not exist") from None
    except OSError as error:
        raise PolicyError(f"policy: {path} cannot be read ({error.strerror})") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PolicyError(f"policy: {path} is not valid YAML{where}") from None
    return parse_policy(data, source=str(path), sha256=hashlib.sha256(raw).hexdigest())


def parse_policy(data: Any, source: str = "policy", sha256: str = "") -> Policy:
    """Build a :class:`Policy` from its mapping form, checking every key and value."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"{source}: expected a mapping with keys principals, aliases")
    check_keys(
        source, data, ("principals", "aliases"), ("version", "governance"), error=PolicyError
    )
    principals_raw = data["principals"]
    if not isinstance(principals_raw, Mapping) or not principals_raw:
        raise PolicyError(f"{source}: principals: expected a mapping name → {{public_key, roles}}")
    principals = []
    seen_keys: dict[str, str] = {}
    for name, entry in principals_raw.items():
        where = f"{source}: principals.{name}"
        if not isinstance(entry, Mapping):
            raise PolicyError(f"{where}: expected a mapping with public_key and roles")
        check_keys(where, entry, ("public_key", "roles"), error=PolicyError)
        try:
            parse_public_key(entry["public_key"], f"{where}.public_key")
        except RegistryError as error:
            raise PolicyError(str(error)) from None
        roles = _str_list(f"{where}.roles", entry["roles"])
        if entry["public_key"] in seen_keys:
            raise PolicyError(
                f"{where}.public_key: the same key as principals.{seen_keys[entry['public_key']]}"
            )
        seen_keys[entry["public_key"]] = str(name)
        principals.append(Principal(str(name), entry["public_key"], tuple(roles)))
    policy = Policy(tuple(principals), {}, sha256, source)

    aliases_raw = data["aliases"]
    if not isinstance(aliases_raw, Mapping):
        raise PolicyError(f"{source}: aliases: expected a mapping alias → rule")
    all_roles = {role for p in principals for role in p.roles}
    aliases = {}
    for alias, entry in aliases_raw.items():
        where = f"{source}: aliases.{alias}"
        try:
            check_alias(str(alias), where)
        except RegistryError as error:
            raise PolicyError(str(error)) from None
        aliases[str(alias)] = _parse_rule(where, str(alias), entry or {}, policy, all_roles)
    governance = None
    if "governance" in data:
        governance = _parse_governance(
            f"{source}: governance", data["governance"], policy, all_roles
        )
    return Policy(tuple(principals), aliases, sha256, source, governance, 0, data)


def _parse_governance(
    where: str, entry: Any, policy: Policy, all_roles: set[str]
) -> GovernanceRule:
    if not isinstance(entry, Mapping):
        raise PolicyError(f"{where}: expected a mapping with keys {', '.join(GOVERNANCE_KEYS)}")
    check_keys(where, entry, ("quorum",), ("signer_roles",), error=PolicyError)
    quorum = entry["quorum"]
    if isinstance(quorum, bool) or not isinstance(quorum, int) or quorum < 1:
        raise PolicyError(f"{where}.quorum: expected a whole number ≥ 1, got {quorum!r}")
    roles = tuple(_str_list(f"{where}.signer_roles", entry.get("signer_roles", [])))
    unknown = [r for r in roles if r not in all_roles]
    if unknown:
        raise PolicyError(
            f"{where}.signer_roles: role {', '.join(unknown)} is held by no principal "
            f"(roles in the policy: {', '.join(sorted(all_roles))})"
        )
    rule = GovernanceRule(quorum, roles)
    signers = [p.name for p in policy.principals if rule.may_sign(p)]
    if quorum > len(signers):
        raise PolicyError(
            f"{where}.quorum: {quorum} exceeds the {len(signers)} principals who may sign"
        )
    return rule


def _parse_rule(
    where: str, alias: str, entry: Any, policy: Policy, all_roles: set[str]
) -> AliasRule:
    if not isinstance(entry, Mapping):
        raise PolicyError(f"{where}: expected a mapping with keys {', '.join(ALIAS_KEYS)}")
    check_keys(where, entry, (), ALIAS_KEYS, error=PolicyError)
    quorum = entry.get("quorum", 1)
    if isinstance(quorum, bool) or not isinstance(quorum, int) or quorum < 0:
        raise PolicyError(f"{where}.quorum: expected a whole number ≥ 0, got {quorum!r}")
    roles = {}
    for key in ("approver_roles", "required_roles", "promoter_roles"):
        roles[key] = tuple(_str_list(f"{where}.{key}", entry.get(key, [])))
        unknown = [r for r in roles[key] if r not in all_roles]
        if unknown:
            raise PolicyError(
                f"{where}.{key}: role {', '.join(unknown)} is held by no principal "
                f"(roles in the policy: {', '.join(sorted(all_roles))})"
            )
    gates = entry.get("gates", {}) or {}
    if not isinstance(gates, Mapping):
        raise PolicyError(f"{where}.gates: expected a mapping with keys {', '.join(GATE_KEYS)}")
    check_keys(f"{where}.gates", gates, (), GATE_KEYS, error=PolicyError)
    max_epsilon = gates.get("max_epsilon")
    if max_epsilon is not None and (
        isinstance(max_epsilon, bool) or not isinstance(max_epsilon, int | float) or max_epsilon < 0
    ):
        raise PolicyError(f"{where}.gates.max_epsilon: expected a number ≥ 0, got {max_epsilon!r}")
    require_secagg = gates.get("require_secure_aggregation", False)
    if not isinstance(require_secagg, bool):
        raise PolicyError(
            f"{where}.gates.require_secure_aggregation: expected true or false, got "
            f"{require_secagg!r}"
        )
    rule = AliasRule(
        alias=alias,
        quorum=quorum,
        approver_roles=roles["approver_roles"],
        required_roles=roles["required_roles"],
        promoter_roles=roles["promoter_roles"],
        max_epsilon=None if max_epsilon is None else float(max_epsilon),
        min_metrics=_bounds(f"{where}.gates.min_metrics", gates.get("min_metrics", {})),
        max_metrics=_bounds(f"{where}.gates.max_metrics", gates.get("max_metrics", {})),
        require_secure_aggregation=require_secagg,
    )
    eligible = [p.name for p in policy.principals if rule.may_approve(p)]
    if quorum > len(eligible):
        raise PolicyError(
            f"{where}.quorum: {quorum} exceeds the {len(eligible)} principals who may approve"
        )
    return rule


def _bounds(where: str, value: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, Mapping):
        raise PolicyError(f"{where}: expected a mapping metric name → number")
    out = []
    for name, bound in value.items():
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            raise PolicyError(f"{where}.{name}: expected a number, got {bound!r}")
        out.append((str(name), float(bound)))
    return tuple(out)


def _str_list(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where}: expected a list of names, got {value!r}")
    return list(value)
