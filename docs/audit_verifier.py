"""An independent check of a fedgov audit log, using only hashlib, json and cryptography.

    fedgov registry audit --json --registry DIR > log.json
    python docs/audit_verifier.py log.json [checkpoint.json]

Checks: sequence numbers 1..n; each entry's hash is the sha256 of the canonical JSON of its body
and links to the previous one; each entry is signed by its actor's key, and that key is the
actor's under the policy version in force (policy versions: signed by the previous version's
governance quorum); the log extends the checkpoint. Exit 0 when all hold, else 1.
It does not re-evaluate promotion gates, nor bind the keys of entries made before the registry
had a policy (``fedgov registry audit --verify`` does both).
"""

import base64
import hashlib
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

BODY = ("seq", "at", "action", "subject", "actor", "actor_key", "details", "prev_hash")


def canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signed(public_key: str, message: bytes, signature: str) -> bool:
    try:
        raw = base64.b64decode(public_key.removeprefix("ed25519:"))
        Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(signature), message)
        return True
    except Exception:
        return False


def verify(entries: list, checkpoint: dict | None) -> list[str]:
    problems, previous, policy = [], "0" * 64, None  # policy: the one in force
    for n, entry in enumerate(entries, 1):
        digest = hashlib.sha256(canonical({k: entry[k] for k in BODY})).hexdigest()
        if entry["seq"] != n or entry["prev_hash"] != previous or entry["entry_hash"] != digest:
            problems.append(f"entry {n}: sequence, link or hash broken")
        if not signed(entry["actor_key"], f"fedgov:audit:v1:{digest}".encode(), entry["signature"]):
            problems.append(f"entry {n}: signature does not verify")
        governing = policy
        if entry["action"] == "policy":
            document = entry["details"]["document"]
            governing = governing or document["policy"]  # version 1 governs itself
            rule = governing["governance"]
            message = (
                b"fedgov:policy:v1:" + hashlib.sha256(canonical(document)).hexdigest().encode()
            )
            names = {
                name
                for s in entry["details"]["signatures"]
                for name, p in governing["principals"].items()
                if p["public_key"] == s["public_key"]
                and (not rule.get("signer_roles") or set(p["roles"]) & set(rule["signer_roles"]))
                and signed(s["public_key"], message, s["signature"])
            }
            if len(names) < rule["quorum"]:
                problems.append(f"entry {n}: policy version lacks its governance quorum")
            policy = document["policy"]
        principal = (governing or {}).get("principals", {}).get(entry["actor"], {})
        if governing and principal.get("public_key") != entry["actor_key"]:
            problems.append(f"entry {n}: not signed with {entry['actor']}'s key under the policy")
        previous = entry["entry_hash"]
        if checkpoint and n == checkpoint["seq"] and digest != checkpoint["head_hash"]:
            problems.append(f"entry {n}: differs from the checkpoint (rewritten or forked)")
    if checkpoint:
        body = {k: v for k, v in checkpoint.items() if k != "signature"}
        if len(entries) < checkpoint["seq"]:
            problems.append("the log is shorter than the checkpoint (truncated)")
        if not signed(
            checkpoint["public_key"],
            b"fedgov:checkpoint:v1:" + canonical(body),
            checkpoint["signature"],
        ):
            problems.append("the checkpoint's signature does not verify")
    return problems


if __name__ == "__main__":
    log = json.loads(Path(sys.argv[1]).read_text())
    anchor = json.loads(Path(sys.argv[2]).read_text()) if len(sys.argv) > 2 else None
    found = verify(log["entries"], anchor)
    print("\n".join(found) or f"ok: {len(log['entries'])} entries")
    sys.exit(1 if found else 0)
