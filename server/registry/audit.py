"""The audit log as a hash chain of signed entries (pure functions; the store keeps the rows).

Entry ``n`` holds ``prev_hash`` = the hash of entry ``n-1`` (64 zeros for the first); its own
``entry_hash`` is the sha256 of the canonical JSON of its body (everything but the hash and the
signature), and its actor signs ``fedgov:audit:v1:<entry_hash>``. The registry also records the
head (last sequence number and hash) in the same database, so that:

- an edited entry no longer matches its hash (or, re-hashed, breaks the next entry's link);
- a deleted entry leaves a gap in the sequence and a broken link (at the end: a head mismatch);
- reordered entries break the links.

Whoever edits the database can also move the head, so cutting entries off the end is caught only
against a checkpoint kept elsewhere (``checkpoint``); whose key may sign which entry is checked
by replaying the log under the policy in force (``replay``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.registry.manifest import canonical_json, sha256_hex
from server.registry.signing import SigningKey, key_id, verify_signature

GENESIS_HASH = "0" * 64
ACTIONS = ("publish", "approve", "reject", "promote", "serve_start", "policy")


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the chain."""

    seq: int
    at: str  # UTC ISO 8601
    action: str
    subject: str  # "name:version" or "name@alias"
    actor: str  # the principal's name ("" when the key is not in a policy)
    actor_key: str  # "ed25519:<base64>"
    details: dict[str, Any] = field(default_factory=dict)
    prev_hash: str = GENESIS_HASH
    entry_hash: str = ""
    signature: str = ""

    def body(self) -> dict[str, Any]:
        """What the entry hash covers."""
        return {
            "seq": self.seq,
            "at": self.at,
            "action": self.action,
            "subject": self.subject,
            "actor": self.actor,
            "actor_key": self.actor_key,
            "details": self.details,
            "prev_hash": self.prev_hash,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.body(),
            "actor_key_id": key_id(self.actor_key),
            "entry_hash": self.entry_hash,
            "signature": self.signature,
        }


def entry_hash(body: dict[str, Any]) -> str:
    """The sha256 (hex) of an entry body's canonical JSON."""
    return sha256_hex(canonical_json(body))


def audit_message(hash_hex: str) -> bytes:
    """The bytes an actor signs for an entry of hash ``hash_hex``."""
    return f"fedgov:audit:v1:{hash_hex}".encode("ascii")


def next_entry(
    previous: tuple[int, str] | None,
    *,
    at: str,
    action: str,
    subject: str,
    actor: str,
    key: SigningKey,
    details: dict[str, Any],
) -> AuditEntry:
    """The entry after the head ``previous`` = (seq, hash), or the first; hashed and signed."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    seq, prev_hash = (previous[0] + 1, previous[1]) if previous else (1, GENESIS_HASH)
    unsigned = AuditEntry(seq, at, action, subject, actor, key.public_key, details, prev_hash)
    digest = entry_hash(unsigned.body())
    return AuditEntry(
        seq,
        at,
        action,
        subject,
        actor,
        key.public_key,
        details,
        prev_hash,
        entry_hash=digest,
        signature=key.sign(audit_message(digest)),
    )


def verify_chain(entries: Sequence[AuditEntry], head: tuple[int, str] | None = None) -> list[str]:
    """Every problem with the chain ``entries`` (in stored order) and the recorded ``head``.

    Returns an empty list when the chain is intact: sequence numbers 1, 2, ... without gaps, each
    hash recomputes, each link points at the previous hash, each signature verifies against the
    entry's key, and the last entry is the recorded head.
    """
    problems: list[str] = []
    expected_seq, expected_prev = 1, GENESIS_HASH
    for entry in entries:
        if entry.seq != expected_seq:
            if entry.seq > expected_seq:
                missing = (
                    f"entry {expected_seq}"
                    if entry.seq == expected_seq + 1
                    else f"entries {expected_seq}-{entry.seq - 1}"
                )
                problems.append(
                    f"audit entry {entry.seq}: follows entry {expected_seq - 1}; "
                    f"{missing} missing (deleted)"
                )
            else:
                problems.append(
                    f"audit entry {entry.seq}: out of order after entry {expected_seq - 1}"
                )
        recomputed = entry_hash(entry.body())
        if recomputed != entry.entry_hash:
            problems.append(
                f"audit entry {entry.seq} ({entry.action} {entry.subject}): content does not match "
                "its hash (edited)"
            )
        if entry.prev_hash != expected_prev:
            problems.append(
                f"audit entry {entry.seq}: its link does not match the previous entry's hash "
                "(an entry before it was edited, deleted, inserted or reordered)"
            )
        if not verify_signature(entry.actor_key, audit_message(entry.entry_hash), entry.signature):
            problems.append(f"audit entry {entry.seq}: signature does not verify")
        expected_seq, expected_prev = entry.seq + 1, entry.entry_hash
    if head is not None:
        last = (entries[-1].seq, entries[-1].entry_hash) if entries else (0, GENESIS_HASH)
        if head[0] != last[0] or head[1] != last[1]:
            if head[0] > last[0]:
                problems.append(
                    f"audit: the log ends at entry {last[0]} but the registry's head is entry "
                    f"{head[0]} (entries deleted from the end)"
                )
            else:
                problems.append(
                    f"audit: the last entry ({last[0]}) is not the registry's recorded head "
                    f"(entry {head[0]})"
                )
    return problems
