"""The governed policy: a chain of signed policy versions (the registry's root of trust).

Version 1 is signed by the quorum its own ``governance`` section names (like TUF's root); every
later version ``n`` names the digest of version ``n-1`` and carries the signatures that version
``n-1``'s ``governance`` rule requires. A version's digest is the sha256 of the canonical JSON of
its body ``{format, version, previous_sha256, policy}``; a signer signs
``fedgov:policy:v1:<digest>``. Each applied version is an audit entry (action ``policy``) whose
details hold the whole signed version, so the audit chain alone says which policy was in force
for every other entry. The policy file (``DIR/policy.yaml``) is a copy of the head, for people;
a file that is not the head is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgov.errors import check_keys
from server.registry.audit import GENESIS_HASH, AuditEntry
from server.registry.errors import PolicyError
from server.registry.manifest import canonical_json, sha256_hex
from server.registry.policy import Policy, parse_policy
from server.registry.signing import SigningKey, key_id, verify_signature

POLICY_FORMAT = "fedgov.policy/1"
POLICY_ACTION = "policy"


def policy_message(digest: str) -> bytes:
    """The bytes a governance signer signs for the policy version of this digest."""
    return f"fedgov:policy:v1:{digest}".encode("ascii")


@dataclass(frozen=True)
class PolicySignature:
    principal: str
    public_key: str
    signature: str

    def as_dict(self) -> dict[str, str]:
        return {
            "principal": self.principal,
            "public_key": self.public_key,
            "signature": self.signature,
        }


@dataclass(frozen=True)
class PolicyVersion:
    """One signed version of the policy."""

    version: int
    previous_sha256: str  # 64 zeros for version 1
    policy: Mapping[str, Any]  # the policy's mapping form (principals, aliases, governance)
    signatures: tuple[PolicySignature, ...] = ()

    def body(self) -> dict[str, Any]:
        """What the digest covers."""
        return {
            "format": POLICY_FORMAT,
            "version": self.version,
            "previous_sha256": self.previous_sha256,
            "policy": dict(self.policy),
        }

    @property
    def sha256(self) -> str:
        return sha256_hex(canonical_json(self.body()))

    def parsed(self, source: str = "") -> Policy:
        """The policy this version holds, with its digest and version number."""
        source = source or f"policy version {self.version}"
        parsed = parse_policy(self.policy, source=source, sha256=self.sha256)
        if parsed.governance is None:
            raise PolicyError(
                f"{source}: governance: a governed policy needs a governance section "
                "(quorum and signer_roles: who signs the next version)"
            )
        return Policy(
            parsed.principals,
            parsed.aliases,
            parsed.sha256,
            source,
            parsed.governance,
            self.version,
            parsed.document,
        )

    def with_signature(self, key: SigningKey, principal: str) -> PolicyVersion:
        """This version with ``principal``'s signature added (replacing their earlier one)."""
        signature = PolicySignature(
            principal, key.public_key, key.sign(policy_message(self.sha256))
        )
        kept = tuple(s for s in self.signatures if s.public_key != key.public_key)
        return PolicyVersion(self.version, self.previous_sha256, self.policy, (*kept, signature))

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.body(),
            "sha256": self.sha256,
            "signatures": [s.as_dict() for s in self.signatures],
        }


def version_from_mapping(data: Any, source: str) -> PolicyVersion:
    """A signed version from its mapping form; PolicyError names what is wrong."""
    if not isinstance(data, Mapping) or data.get("format") != POLICY_FORMAT:
        raise PolicyError(
            f"policy: {source} is not a signed policy version (check policy-head: format "
            f"{POLICY_FORMAT}); a plain "
            "policy is only a proposal: `fedgov registry init` (first version) or `fedgov "
            "registry policy propose` (later ones)"
        )
    check_keys(
        source,
        data,
        ("format", "version", "previous_sha256", "policy"),
        ("sha256", "signatures"),
        error=PolicyError,
    )
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PolicyError(f"{source}: version: expected a whole number ≥ 1, got {version!r}")
    previous = data["previous_sha256"]
    if not isinstance(previous, str) or len(previous) != 64:
        raise PolicyError(f"{source}: previous_sha256: expected 64 hex digits")
    if not isinstance(data["policy"], Mapping):
        raise PolicyError(f"{source}: policy: expected a mapping with principals and aliases")
    signatures = []
    for i, raw in enumerate(data.get("signatures") or []):
        if not isinstance(raw, Mapping) or not all(
            isinstance(raw.get(k), str) for k in ("principal", "public_key", "signature")
        ):
            raise PolicyError(
                f"{source}: signatures[{i}]: expected principal, public_key and signature"
            )
        signatures.append(PolicySignature(raw["principal"], raw["public_key"], raw["signature"]))
    try:
        result = PolicyVersion(version, previous, dict(data["policy"]), tuple(signatures))
        digest = result.sha256
    except (TypeError, ValueError):
        raise PolicyError(f"{source}: policy: holds values JSON cannot represent") from None
    if "sha256" in data and data["sha256"] != digest:
        raise PolicyError(
            f"{source}: sha256: the file says {str(data['sha256'])[:16]}… but its content hashes "
            f"to {digest[:16]}… (edited after it was made)"
        )
    return result


def read_version(path: str | Path) -> PolicyVersion:
    """Read a signed policy version (YAML or JSON) from ``path``."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_bytes())
    except FileNotFoundError:
        raise PolicyError(f"policy: {path} does not exist") from None
    except OSError as error:
        raise PolicyError(f"policy: {path} cannot be read ({error.strerror})") from None
    except yaml.YAMLError:
        raise PolicyError(f"policy: {path} is not valid YAML") from None
    return version_from_mapping(data, str(path))


def write_version(path: str | Path, version: PolicyVersion) -> Path:
    """Write ``version`` as YAML to ``path`` atomically (temporary file, fsync, rename)."""
    import yaml

    path = Path(path)
    header = (
        f"# fedgov signed policy version {version.version} (sha256 {version.sha256}).\n"
        "# Do not edit: any change breaks its signatures. Propose a new version instead:\n"
        "#   fedgov registry policy propose NEW_POLICY.yaml --out PROPOSAL\n"
    )
    text = header + yaml.safe_dump(version.as_dict(), sort_keys=False, allow_unicode=True)
    from fedgov.atomic import atomic_write_bytes

    atomic_write_bytes(path, text.encode())
    return path


# ---- the quorum a version needs ------------------------------------------------------------------


@dataclass
class QuorumCheck:
    """Whether a version carries the signatures its governing policy requires."""

    required: int
    signers: list[str] = field(default_factory=list)  # distinct principals whose signature counts
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return len(self.signers) >= self.required

    def detail(self) -> str:
        who = f" ({', '.join(self.signers)})" if self.signers else ""
        note = f"; ignored: {'; '.join(self.ignored)}" if self.ignored else ""
        return f"{len(self.signers)} of {self.required} required governance signatures{who}{note}"


def check_quorum(version: PolicyVersion, governing: Policy) -> QuorumCheck:
    """Count ``version``'s valid signatures under ``governing`` (the previous version, or the
    version itself for version 1)."""
    rule = governing.governance
    if rule is None:
        return QuorumCheck(1, [], [f"{governing.source} has no governance section"])
    check = QuorumCheck(rule.quorum)
    message = policy_message(version.sha256)
    for s in version.signatures:
        principal = governing.principal_for_key(s.public_key)
        kid = _kid(s.public_key)
        if principal is None:
            check.ignored.append(f"key {kid} is not a principal of {governing.source}")
        elif principal.name != s.principal:
            check.ignored.append(f"key {kid} is {principal.name}'s, not {s.principal}'s")
        elif not rule.may_sign(principal):
            check.ignored.append(f"{principal.name} may not sign policy versions")
        elif not verify_signature(s.public_key, message, s.signature):
            check.ignored.append(f"{principal.name}'s signature does not verify")
        elif principal.name not in check.signers:
            check.signers.append(principal.name)
    return check


def _kid(public_key: str) -> str:
    try:
        return key_id(public_key)
    except Exception:
        return "(malformed)"


# ---- the chain, read from the audit log ----------------------------------------------------------


@dataclass
class PolicyChain:
    """The applied versions in order, each with the audit sequence number that applied it."""

    versions: list[tuple[int, PolicyVersion, Policy]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.versions)

    @property
    def head(self) -> Policy:
        return self.versions[-1][2]

    @property
    def head_version(self) -> PolicyVersion:
        return self.versions[-1][1]

    def in_force(self, seq: int) -> Policy | None:
        """The policy that governs the audit entry ``seq``: the last version applied before it.

        Entries before the first version (a registry published into before it was initialised)
        are governed by version 1, which adopted them.
        """
        current = None
        for applied_seq, _, policy in self.versions:
            if applied_seq < seq:
                current = policy
            else:
                break
        if current is None and self.versions:
            return self.versions[0][2]
        return current

    def first_seq(self) -> int:
        return self.versions[0][0] if self.versions else 0


def policy_entry_details(version: PolicyVersion) -> dict[str, Any]:
    """The details of the audit entry that applies ``version``."""
    return {
        "version": version.version,
        "policy_sha256": version.sha256,
        "previous_sha256": version.previous_sha256,
        "document": version.body(),
        "signatures": [s.as_dict() for s in version.signatures],
    }


def chain_from_entries(entries: Sequence[AuditEntry]) -> tuple[PolicyChain, list[str]]:
    """The policy chain the ``policy`` entries of an audit log apply, and every problem with it:
    a malformed version, a version number or previous-digest out of line, a missing quorum."""
    chain = PolicyChain()
    problems: list[str] = []
    for entry in entries:
        if entry.action != POLICY_ACTION:
            continue
        where = f"audit entry {entry.seq} (policy)"
        details = entry.details or {}
        body = details.get("document")
        try:
            version = version_from_mapping(
                {**(body or {}), "signatures": details.get("signatures") or []}, where
            )
            policy = version.parsed(f"policy version {version.version}")
        except PolicyError as error:
            problems.append(f"{where}: check policy-document: {str(error).split(': ', 1)[-1]}")
            continue
        previous = chain.versions[-1] if chain.versions else None
        expected_version = previous[1].version + 1 if previous else 1
        expected_previous = previous[1].sha256 if previous else GENESIS_HASH
        if version.version != expected_version:
            problems.append(
                f"{where}: check policy-version: version {version.version} where version "
                f"{expected_version} was due (a replayed or skipped policy version)"
            )
            continue
        if version.previous_sha256 != expected_previous:
            problems.append(
                f"{where}: check policy-link: version {version.version} does not name version "
                f"{expected_version - 1}'s digest (a forked policy chain)"
            )
            continue
        if details.get("policy_sha256") != version.sha256:
            problems.append(f"{where}: check policy-digest: recorded digest is not the version's")
            continue
        governing = previous[2] if previous else policy
        quorum = check_quorum(version, governing)
        if not quorum.ok:
            problems.append(
                f"{where}: check policy-quorum: version {version.version} has {quorum.detail()} "
                f"under {governing.source}"
            )
            continue
        chain.versions.append((entry.seq, version, policy))
    return chain, problems
