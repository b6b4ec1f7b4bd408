"""Helpers for the registry and serving tests: keys, policies and small published models."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save as save_safetensors_bytes

from fedgov.datasets import DatasetSchema, FeatureSpec
from fedgov.models import build_model
from server.registry.publish import ModelSpec, publish_model
from server.registry.registry import Registry
from server.registry.signing import SigningKey, generate_key, write_key
from server.registry.store import VersionRecord

#: A three-feature tabular schema: a float, an int and a log1p column.
TOY_SCHEMA = DatasetSchema(
    name="toy",
    features=(
        FeatureSpec("age", "float", 50.0, 10.0),
        FeatureSpec("visits", "int", 2.0, 1.5),
        FeatureSpec("cost", "float", 5.0, 2.0, log1p=True),
    ),
    target="outcome",
    classes=("no", "yes"),
    input_shape=(3,),
    site_column=None,
)

PRINCIPALS = {
    "server": ["publisher"],
    "alice": ["clinical-lead"],
    "bob": ["privacy-officer"],
    "carol": ["data-steward"],
    "dana": ["release-manager"],
}


#: who signs policy versions: 2 of the three approvers
GOVERNANCE = {"quorum": 2, "signer_roles": ["clinical-lead", "privacy-officer", "data-steward"]}


@dataclass
class Governance:
    """Keys (in memory and on disk) and the signed policy chain of one registry."""

    root: Path
    keys: dict[str, SigningKey]
    key_paths: dict[str, Path]
    policy_path: Path
    registry_path: Path
    db_url: str | None = None

    def policy_data(
        self,
        production: dict[str, Any] | None = None,
        principals: dict[str, list[str]] | None = None,
    ) -> dict[str, Any]:
        """The policy mapping with ``production``'s rule (default: 2 of 3, ε ≤ 8, acc ≥ 0.6)."""
        rule = production or {
            "quorum": 2,
            "approver_roles": ["clinical-lead", "privacy-officer", "data-steward"],
            "required_roles": ["privacy-officer"],
            "promoter_roles": ["release-manager"],
            "gates": {
                "max_epsilon": 8.0,
                "min_metrics": {"central_eval_accuracy": 0.6},
                "require_secure_aggregation": False,
            },
        }
        return {
            "principals": {
                name: {"public_key": self.keys[name].public_key, "roles": roles}
                for name, roles in (principals or PRINCIPALS).items()
            },
            "aliases": {
                "production": rule,
                "staging": {
                    "quorum": 1,
                    "approver_roles": [
                        role
                        for role in ("clinical-lead", "privacy-officer")
                        if any(role in r for r in (principals or PRINCIPALS).values())
                    ],
                },
            },
            "governance": {
                "quorum": GOVERNANCE["quorum"],
                "signer_roles": [
                    role
                    for role in GOVERNANCE["signer_roles"]
                    if any(role in r for r in (principals or PRINCIPALS).values())
                ],
            },
        }

    def write_policy(
        self,
        production: dict[str, Any] | None = None,
        principals: dict[str, list[str]] | None = None,
        signers: tuple[str, ...] = ("alice", "bob"),
    ) -> Path:
        """Apply the next policy version (``production``'s rule), signed by ``signers``, through
        the library's propose/sign/apply; returns the policy file (the new head)."""
        from server.registry.governance import apply_policy, propose_policy

        registry = Registry(self.registry_path, self.db_url, create=True)
        try:
            version = propose_policy(registry, self.policy_data(production, principals), "test")
            for name in signers:
                version = version.with_signature(self.keys[name], name)
            apply_policy(registry, version, self.keys[signers[0]])
        finally:
            registry.close()
        return self.policy_path

    def write_plain_policy(self, path: Path, **changes: Any) -> Path:
        """An unsigned policy file (what an insider can write), for the attack tests."""
        data = self.policy_data()
        data.update(changes)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


def make_governance(
    root: Path,
    policy_path: Path | None = None,
    db_url: str | None = None,
    production: dict[str, Any] | None = None,
) -> Governance:
    """Fresh keys for every principal (under ``root/keys``) and a registry at ``root/registry``
    governed by policy version 1 (signed by alice and bob, the governance quorum)."""
    keys, paths = {}, {}
    for name in [*PRINCIPALS, "mallory"]:
        keys[name] = generate_key()
        paths[name] = root / "keys" / f"{name}.key"
        write_key(paths[name], keys[name])
    registry_path = root / "registry"
    governance = Governance(
        root, keys, paths, policy_path or registry_path / "policy.yaml", registry_path, db_url
    )
    governance.write_policy(production)
    return governance


def privacy_report(epsilon: float, secure_aggregation: bool = True) -> dict[str, Any]:
    """A privacy report in the documented shape, with site-level ε = ``epsilon``."""
    return {
        "delta": 1e-5,
        "secure_aggregation": secure_aggregation,
        "sample_level": {
            "accountant": "rdp",
            "sites": {
                "site-1": {
                    "epsilon": epsilon / 2,
                    "cap": 8.0,
                    "declined_rounds": [],
                    "history": [[1.1, 0.01, 100]],
                },
            },
        },
        "site_level": {
            "accountant": "rdp",
            "epsilon": epsilon,
            "clipping_norm": 1.0,
            "history": [[1.0, 1.0, 3]],
        },
    }


def toy_weights(seed: int = 0, hidden: int = 8) -> bytes:
    """Safetensors bytes of a seeded toy MLP."""
    torch.manual_seed(seed)
    model = build_model("mlp", TOY_SCHEMA.input_shape, 2, hidden)
    return save_safetensors_bytes({k: v.contiguous() for k, v in model.state_dict().items()})


def publish_toy(
    registry: Registry,
    key: SigningKey,
    *,
    name: str = "toy-mlp",
    seed: int = 0,
    accuracy: float = 0.8,
    report: dict[str, Any] | None = None,
    secure_aggregation: bool = True,
) -> VersionRecord:
    """Publish a seeded toy MLP with the given metrics and privacy report."""
    return publish_model(
        registry,
        name=name,
        weights=toy_weights(seed),
        spec=ModelSpec("mlp", 8),
        schema=TOY_SCHEMA,
        run_config={"rounds": 3, "seed": seed},
        lineage={
            "run_id": f"run-{seed}",
            "dataset": "toy",
            "seed": seed,
            "strategy": "fedavg",
            "rounds": 3,
            "rounds_completed": 3,
            "sites": ["site-1", "site-2", "site-3"],
            "sites_per_round": [3, 3, 3],
            "secure_aggregation": {"enabled": secure_aggregation, "settings": {}},
            "code_commit": None,
        },
        metrics={"final": {"central_eval_accuracy": accuracy, "central_eval_loss": 0.4}},
        privacy_report=report,
        key=key,
    )


ROOT = Path(__file__).resolve().parent.parent

PUBLISHER_SCRIPT = """
import sys, time
from server.registry.registry import Registry
from server.registry.signing import load_key
from registry_support import publish_toy
path, db, key_path, start, count, seed = sys.argv[1:7]
registry = Registry(path, db or None, create=True)
key = load_key(key_path)
while time.time() < float(start):
    time.sleep(0.005)
for i in range(int(count)):
    record = publish_toy(registry, key, seed=int(seed) * 100 + i)
    print(record.version, record.manifest_sha256, flush=True)
"""


def concurrent_publish(registry_path: Path, db_url: str, key_path: Path, processes: int, each: int):
    """Start ``processes`` publishers at the same instant; return {version: manifest sha256}."""
    start = time.time() + 4.0  # after every process has imported torch
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PUBLISHER_SCRIPT,
                str(registry_path),
                db_url,
                str(key_path),
                str(start),
                str(each),
                str(p),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(processes)
    ]
    published: dict[int, str] = {}
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        for line in out.split("\n"):
            if line:
                version, digest = line.split()
                assert int(version) not in published, f"version {version} published twice"
                published[int(version)] = digest
    return published


def insider_append(
    db_path: Path,
    *,
    action: str,
    subject: str,
    actor: str,
    key: SigningKey,
    details: dict[str, Any],
) -> int:
    """What an insider with write access to the SQLite file can do: append a correctly hashed
    and linked audit entry signed with ``key`` and move the recorded head. Returns its seq."""
    import sqlite3

    from server.registry.audit import next_entry
    from server.registry.manifest import canonical_json

    with sqlite3.connect(db_path) as db:
        seq, head = db.execute("SELECT audit_seq, audit_hash FROM registry_state").fetchone()
        entry = next_entry(
            (seq, head) if seq else None,
            at="2026-12-06T00:00:00.000000Z",
            action=action,
            subject=subject,
            actor=actor,
            key=key,
            details=details,
        )
        _insert_entry(db, entry, canonical_json)
        db.execute(
            "UPDATE registry_state SET audit_seq = ?, audit_hash = ?",
            (entry.seq, entry.entry_hash),
        )
    return entry.seq


def _insert_entry(db, entry, canonical_json) -> None:
    db.execute(
        "INSERT INTO audit_log (seq, at, action, subject, actor, actor_key, details, prev_hash, "
        "entry_hash, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            entry.seq,
            entry.at,
            entry.action,
            entry.subject,
            entry.actor,
            entry.actor_key,
            canonical_json(entry.details).decode(),
            entry.prev_hash,
            entry.entry_hash,
            entry.signature,
        ),
    )


def insider_rewrite_from(db_path: Path, seq: int, key: SigningKey) -> None:
    """Delete audit entry ``seq`` and re-hash, re-link and re-sign every later entry with ``key``
    (the insider's own), keeping each entry's named actor; the head moves to the new last one."""
    import json
    import sqlite3

    from server.registry.audit import AuditEntry, entry_hash
    from server.registry.manifest import canonical_json

    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "SELECT seq, at, action, subject, actor, details, prev_hash FROM audit_log "
            "WHERE seq >= ? ORDER BY seq",
            (seq,),
        ).fetchall()
        prev = rows[0][6]
        db.execute("DELETE FROM audit_log WHERE seq >= ?", (seq,))
        new_seq = seq
        for _, at, action, subject, actor, details, _ in rows[1:]:
            body = AuditEntry(
                new_seq, at, action, subject, actor, key.public_key, json.loads(details), prev
            )
            digest = entry_hash(body.body())
            entry = AuditEntry(
                *[getattr(body, f) for f in ("seq", "at", "action", "subject", "actor")],
                key.public_key,
                body.details,
                prev,
                digest,
                key.sign(f"fedgov:audit:v1:{digest}".encode()),
            )
            _insert_entry(db, entry, canonical_json)
            db.execute(
                "UPDATE decisions SET audit_seq = ? WHERE audit_seq = ?", (new_seq, new_seq + 1)
            )
            db.execute(
                "UPDATE aliases SET audit_seq = ? WHERE audit_seq = ?", (new_seq, new_seq + 1)
            )
            prev, new_seq = digest, new_seq + 1
        db.execute("UPDATE registry_state SET audit_seq = ?, audit_hash = ?", (new_seq - 1, prev))


def insider_cut_last_rejection(db_path: Path) -> int:
    """As an insider: delete the last audit entry (a rejection) and its decision row, and set
    the recorded head back one entry. Returns the deleted entry's seq."""
    with sqlite3.connect(db_path) as connection:
        (last,) = connection.execute("SELECT MAX(seq) FROM audit_log").fetchone()
        (previous_hash,) = connection.execute(
            "SELECT entry_hash FROM audit_log WHERE seq = ?", (last - 1,)
        ).fetchone()
        connection.execute("DELETE FROM audit_log WHERE seq = ?", (last,))
        connection.execute("DELETE FROM decisions WHERE decision = 'reject'")
        connection.execute(
            "UPDATE registry_state SET audit_seq = ?, audit_hash = ?", (last - 1, previous_hash)
        )
    return last
