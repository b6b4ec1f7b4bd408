"""Signed checkpoints of the audit chain: anchors that governance keeps outside the registry.

A checkpoint names an entry of the chain (its sequence number and hash), the policy version in
force there and when it was made, signed by a principal of that policy::

    {"format": "fedgov.audit-checkpoint/1", "seq": 12, "head_hash": "<64 hex>",
     "policy_version": 2, "policy_sha256": "<64 hex>", "at": "2026-...Z",
     "signer": "alice", "public_key": "ed25519:...", "signature": "<base64>"}

The signature covers ``fedgov:checkpoint:v1:`` + the canonical JSON of every field but the
signature. Because every entry's hash covers the previous one's, a chain whose entry ``seq``
still has ``head_hash`` extends the checkpoint unchanged; a shorter chain was truncated, and a
different hash at ``seq`` means the log was rewritten or forked at or before that entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from server.registry.audit import AuditEntry
from server.registry.errors import RegistryError, VerificationError
from server.registry.manifest import canonical_json
from server.registry.policy_chain import PolicyChain
from server.registry.signing import SigningKey, verify_signature

CHECKPOINT_FORMAT = "fedgov.audit-checkpoint/1"
ANCHOR_ENV = "FEDGOV_AUDIT_ANCHOR"
_FIELDS = ("format", "seq", "head_hash", "policy_version", "policy_sha256", "at", "signer")


@dataclass(frozen=True)
class Checkpoint:
    format: str
    seq: int
    head_hash: str
    policy_version: int
    policy_sha256: str
    at: str  # UTC ISO 8601
    signer: str
    public_key: str
    signature: str = ""

    def body(self) -> dict[str, Any]:
        """What the signature covers."""
        data = asdict(self)
        data.pop("signature")
        return data

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def checkpoint_message(body: Mapping[str, Any]) -> bytes:
    return b"fedgov:checkpoint:v1:" + canonical_json(dict(body))


def make_checkpoint(
    entries: Sequence[AuditEntry], chain: PolicyChain, key: SigningKey, at: str
) -> Checkpoint:
    """A checkpoint of the chain's last entry, signed with ``key`` (a principal of the policy)."""
    if not entries:
        raise RegistryError("checkpoint: the audit log is empty (nothing to anchor)")
    if not chain:
        raise RegistryError("checkpoint: the registry has no policy yet (run fedgov registry init)")
    last = entries[-1]
    policy = chain.head
    principal = policy.principal_for_key(key.public_key)
    if principal is None:
        raise VerificationError(
            f"--key: key {key.key_id} is not a principal's key under {policy.source}"
        )
    unsigned = Checkpoint(
        CHECKPOINT_FORMAT,
        last.seq,
        last.entry_hash,
        policy.version,
        policy.sha256,
        at,
        principal.name,
        key.public_key,
    )
    signature = key.sign(checkpoint_message(unsigned.body()))
    return Checkpoint(**{**unsigned.as_dict(), "signature": signature})


def read_checkpoint(path: str | Path, where: str = "--anchor") -> Checkpoint:
    """Read a checkpoint file; any problem is one line naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{where}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise RegistryError(f"{where}: {path} is not a JSON checkpoint file") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise RegistryError(f"{where}: {path} is not a checkpoint ({CHECKPOINT_FORMAT})")
    try:
        checkpoint = Checkpoint(**{k: data[k] for k in (*_FIELDS, "public_key", "signature")})
    except KeyError as error:
        raise RegistryError(f"{where}: {path} lacks the field {error.args[0]}") from None
    if (
        isinstance(checkpoint.seq, bool)
        or not isinstance(checkpoint.seq, int)
        or checkpoint.seq < 1
        or not isinstance(checkpoint.head_hash, str)
    ):
        raise RegistryError(f"{where}: {path}: seq must be a whole number ≥ 1, head_hash a hash")
    return checkpoint


def check_anchor(
    checkpoint: Checkpoint, entries: Sequence[AuditEntry], chain: PolicyChain
) -> list[str]:
    """Every reason the (structurally verified) chain ``entries`` does not extend ``checkpoint``."""
    problems = []
    seq = checkpoint.seq
    last = entries[-1].seq if entries else 0
    if last < seq:
        return [
            f"anchor: check anchor-extends: the log ends at entry {last} but the checkpoint "
            f"covers entry {seq} (entries cut off the end)"
        ]
    entry = entries[seq - 1] if entries[seq - 1].seq == seq else None
    if entry is None or entry.entry_hash != checkpoint.head_hash:
        return [
            f"anchor: check anchor-extends: entry {seq} does not have the checkpoint's hash "
            f"{checkpoint.head_hash[:16]}… (the log was rewritten or forked at or before entry "
            f"{seq})"
        ]
    policy = chain.in_force(seq + 1)
    if policy is None or policy.sha256 != checkpoint.policy_sha256:
        problems.append(
            f"anchor: check anchor-policy: the policy in force at entry {seq} is not the "
            f"checkpoint's version {checkpoint.policy_version}"
        )
        return problems
    principal = policy.principal_for_key(checkpoint.public_key)
    if principal is None or principal.name != checkpoint.signer:
        problems.append(
            f"anchor: check anchor-signer: {checkpoint.signer}'s key is not a principal's key "
            f"under {policy.source}"
        )
    elif not verify_signature(
        checkpoint.public_key, checkpoint_message(checkpoint.body()), checkpoint.signature
    ):
        problems.append(
            "anchor: check anchor-signature: the checkpoint's signature does not verify"
        )
    return problems


def write_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write the checkpoint as JSON, atomically."""
    from fedgov.atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), json.dumps(checkpoint.as_dict(), indent=2).encode() + b"\n")
