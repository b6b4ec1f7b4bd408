"""A registry insider (write access to the registry folder and database, no approver's key) tries
to get an unapproved or rejected model served. Each attack goes through the real command line
(``python -m fedgov``) and a real ``fedgov serve``, and must be refused with the check named.

The base registry (built once, copied per test): toy-mlp versions 1 and 2 published by the
server; version 1 approved by alice and bob and promoted to production by dana; policy version 1
signed by alice and bob (the governance quorum, 2 of the three approvers).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from processes import free_port
from registry_support import (
    PRINCIPALS,
    Governance,
    insider_append,
    insider_cut_last_rejection,
    insider_rewrite_from,
    make_governance,
    privacy_report,
    publish_toy,
)

from server.registry.governance import checkpoint, decide, promote, propose_policy
from server.registry.manifest import parse_ref
from server.registry.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Governance:
    root = tmp_path_factory.mktemp("insiders")
    governance = make_governance(root)
    registry = Registry(governance.registry_path)
    server = governance.keys["server"]
    publish_toy(registry, server, report=privacy_report(3.0))
    publish_toy(registry, server, seed=1, report=privacy_report(3.0))
    policy = registry.load_policy()
    for name in ("alice", "bob"):
        decide(registry, parse_ref("toy-mlp:1"), "approve", governance.keys[name], policy)
    promote(registry, parse_ref("toy-mlp:1"), "production", governance.keys["dana"], policy)
    registry.close()
    return governance


@pytest.fixture
def world(base, tmp_path) -> Governance:
    """A copy of the base registry that the test may damage (keys stay outside it)."""
    copy = tmp_path / "registry"
    shutil.copytree(base.registry_path, copy)
    return Governance(base.root, base.keys, base.key_paths, copy / "policy.yaml", copy)


def fedgov(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedgov", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def refused(result: subprocess.CompletedProcess) -> str:
    """The one-line error of a refused command."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def serve(world: Governance, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return fedgov(
        "serve",
        "toy-mlp@production",
        "--registry",
        str(world.registry_path),
        "--port",
        str(free_port()),
        *extra,
        env=env,
    )


def audit(world: Governance, *extra: str) -> subprocess.CompletedProcess:
    return fedgov("registry", "audit", "--verify", "--registry", str(world.registry_path), *extra)


def db(world: Governance) -> Path:
    return world.registry_path / "registry.db"


def library(world: Governance, action, *args, **kwargs):
    registry = Registry(world.registry_path)
    try:
        return action(registry, *args, **kwargs)
    finally:
        registry.close()


def _decide(world: Governance, who: str, decision: str, ref: str = "toy-mlp:1") -> None:
    library(
        world,
        lambda r: decide(r, parse_ref(ref), decision, world.keys[who], r.load_policy()),
    )


def _digest(world: Governance, version: int) -> str:
    with sqlite3.connect(db(world)) as connection:
        return connection.execute(
            "SELECT manifest_sha256 FROM model_versions WHERE version = ?", (version,)
        ).fetchone()[0]


# ---- 1. the policy is governed ------------------------------------------------------------------


def test_an_edited_policy_file_gives_the_insider_nothing(world):
    """Attack 1: mallory's key as approver and release manager, quorum 0, no required roles."""
    principals = {**PRINCIPALS, "mallory": ["clinical-lead", "release-manager"]}
    world.write_plain_policy(
        world.policy_path,
        principals={
            name: {"public_key": world.keys[name].public_key, "roles": roles}
            for name, roles in principals.items()
        },
        aliases={"production": {"quorum": 0}},
    )
    reg = ["--registry", str(world.registry_path)]
    mallory = str(world.key_paths["mallory"])
    line = refused(fedgov("registry", "approve", "toy-mlp:2", "--key", mallory, *reg))
    assert "is not a signed policy version" in line
    line = refused(
        fedgov("registry", "promote", "toy-mlp:2", "--alias", "production", "--key", mallory, *reg)
    )
    assert "is not a signed policy version" in line
    assert "is not a signed policy version" in refused(serve(world))


def test_a_policy_version_signed_by_the_insider_is_refused(world, tmp_path):
    data = world.policy_data({"quorum": 0})
    data["principals"]["mallory"] = {
        "public_key": world.keys["mallory"].public_key,
        "roles": ["release-manager"],
    }
    version = library(world, propose_policy, data, "insider.yaml")
    from server.registry.policy_chain import policy_entry_details, write_version

    forged = version.with_signature(world.keys["mallory"], "mallory")
    proposal = write_version(tmp_path / "proposal.yaml", forged)
    line = refused(
        fedgov(
            "registry",
            "policy",
            "apply",
            str(proposal),
            "--key",
            str(world.key_paths["mallory"]),
            "--registry",
            str(world.registry_path),
        )
    )
    assert "check policy-quorum: 0 of 2 required governance signatures" in line
    # Written straight into the database, hashed and linked: the replay refuses it.
    insider_append(
        db(world),
        action="policy",
        subject="policy:v2",
        actor="mallory",
        key=world.keys["mallory"],
        details=policy_entry_details(forged),
    )
    shutil.copy(proposal, world.policy_path)
    line = refused(audit(world))
    assert "check policy-quorum: version 2 has 0 of 2 required governance signatures" in line
    assert "check policy-quorum" in refused(serve(world))


def test_a_replayed_old_policy_version_is_refused(world):
    old = world.policy_path.read_bytes()
    world.write_policy(
        {"quorum": 3, "approver_roles": ["clinical-lead", "privacy-officer", "data-steward"]}
    )
    world.policy_path.write_bytes(old)  # the insider puts version 1 back
    line = refused(
        fedgov(
            "registry",
            "promote",
            "toy-mlp:1",
            "--alias",
            "production",
            "--key",
            str(world.key_paths["dana"]),
            "--registry",
            str(world.registry_path),
        )
    )
    assert "is version 1, not the chain's head version 2" in line
    assert "check policy-head: an old policy version replayed" in line
    assert "an old policy version replayed" in refused(serve(world))
    # ... and version 1 appended again as the chain's next version.
    registry = Registry(world.registry_path)
    first = registry.policy_chain().versions[0][1]
    registry.close()
    from server.registry.policy_chain import policy_entry_details

    insider_append(
        db(world),
        action="policy",
        subject="policy:v1",
        actor="alice",
        key=world.keys["mallory"],
        details=policy_entry_details(first),
    )
    line = refused(audit(world))
    assert "check policy-version: version 1 where version 3 was due" in line


# ---- 2. every entry is signed by its principal's key --------------------------------------------


def test_a_promotion_signed_with_a_throwaway_key_is_refused(world):
    """Attack 2: a 'dana' promote of the never-approved version 2, signed by mallory's key."""
    seq = insider_append(
        db(world),
        action="promote",
        subject="toy-mlp@production",
        actor="dana",
        key=world.keys["mallory"],
        details={"alias": "production", "version": 2, "manifest_sha256": _digest(world, 2)},
    )
    with sqlite3.connect(db(world)) as connection:
        connection.execute("UPDATE aliases SET version = 2, audit_seq = ?", (seq,))
    line = refused(audit(world))
    assert f"audit entry {seq} (promote toy-mlp@production): check principal-key: key" in line
    assert "check principal-key" in refused(serve(world))


def test_a_rejection_deleted_and_the_rest_re_signed_by_the_insider_is_refused(world):
    """Attack 2: bob's rejection removed from the middle; every later entry re-hashed and
    re-signed with the insider's key."""
    _decide(world, "bob", "reject")
    _decide(world, "alice", "approve", ref="toy-mlp:2")
    with sqlite3.connect(db(world)) as connection:
        (seq,) = connection.execute("SELECT seq FROM audit_log WHERE action = 'reject'").fetchone()
        connection.execute("DELETE FROM decisions WHERE decision = 'reject'")
    insider_rewrite_from(db(world), seq, world.keys["mallory"])
    line = refused(audit(world))
    assert f"audit entry {seq} (approve toy-mlp:2): check principal-key" in line
    assert "check principal-key" in refused(serve(world))


def test_an_entry_by_a_principal_removed_in_a_later_policy_is_refused(world):
    without_carol = {k: v for k, v in PRINCIPALS.items() if k != "carol"}
    world.write_policy(
        {"quorum": 2, "approver_roles": ["clinical-lead", "privacy-officer"]}, without_carol
    )
    line = refused(
        fedgov(
            "registry",
            "approve",
            "toy-mlp:2",
            "--key",
            str(world.key_paths["carol"]),
            "--registry",
            str(world.registry_path),
        )
    )
    assert "is not in the policy" in line
    # Carol, colluding with the insider, signs the entry herself.
    from server.registry.manifest import decision_message

    digest = _digest(world, 2)
    signature = world.keys["carol"].sign(decision_message("approve", "toy-mlp", 2, digest))
    seq = insider_append(
        db(world),
        action="approve",
        subject="toy-mlp:2",
        actor="carol",
        key=world.keys["carol"],
        details={"manifest_sha256": digest, "signature": signature, "comment": ""},
    )
    with sqlite3.connect(db(world)) as connection:
        connection.execute(
            "INSERT INTO decisions (name, version, decision, principal, public_key, "
            "manifest_sha256, signature, comment, created_at, audit_seq) VALUES "
            "('toy-mlp', 2, 'approve', 'carol', ?, ?, ?, '', 'x', ?)",
            (world.keys["carol"].public_key, digest, signature, seq),
        )
    line = refused(audit(world))
    assert f"audit entry {seq} (approve toy-mlp:2): check principal-key" in line
    assert "under policy version 2" in line


# ---- 3. truncation and forks against an anchor --------------------------------------------------


def test_entries_cut_off_the_end_are_caught_by_the_anchor(world, tmp_path):
    """Attack 3: the rejection (the last entry and its row) deleted and the head set back."""
    _decide(world, "bob", "reject")
    assert "rejections: rejected by bob" in refused(serve(world))
    anchor = tmp_path / "outside" / "checkpoint.json"
    made = fedgov(
        "registry",
        "checkpoint",
        "--key",
        str(world.key_paths["alice"]),
        "--out",
        str(anchor),
        "--registry",
        str(world.registry_path),
    )
    assert made.returncode == 0, made.stderr
    last = insider_cut_last_rejection(db(world))
    # Without an anchor the shortened log is a consistent log: that is what anchors are for.
    assert audit(world).returncode == 0
    line = refused(audit(world, "--anchor", str(anchor)))
    assert f"check anchor-extends: the log ends at entry {last - 1}" in line
    assert "cut off the end" in line
    assert "check anchor-extends" in refused(serve(world, "--anchor", str(anchor)))
    line = refused(serve(world, env={"FEDGOV_AUDIT_ANCHOR": str(anchor)}))
    assert "check anchor-extends" in line


def test_a_forked_chain_is_caught_by_the_anchor(world, tmp_path):
    fork = tmp_path / "fork"
    shutil.copytree(world.registry_path, fork)
    _decide(world, "bob", "reject")
    anchor = tmp_path / "checkpoint.json"
    from server.registry.checkpoint import write_checkpoint

    write_checkpoint(anchor, library(world, checkpoint, world.keys["alice"]))
    forked = Governance(world.root, world.keys, world.key_paths, fork / "policy.yaml", fork)
    _decide(forked, "carol", "approve")  # a different, validly signed entry at the same seq
    ok = audit(world, "--anchor", str(anchor))
    assert ok.returncode == 0 and "extends checkpoint" in ok.stdout
    line = refused(audit(forked, "--anchor", str(anchor)))
    assert "check anchor-extends" in line and "rewritten or forked" in line


# ---- 4. rows and entries one to one -------------------------------------------------------------


def test_a_copied_approval_row_and_an_alias_pointed_back_are_refused(world):
    """Attack 4: version 2 promoted, then bob rejects version 1; the insider copies bob's old
    approval row and points production back at version 1 with its old promote entry."""
    for name in ("alice", "bob"):
        _decide(world, name, "approve", ref="toy-mlp:2")
    library(
        world,
        lambda r: promote(
            r, parse_ref("toy-mlp:2"), "production", world.keys["dana"], r.load_policy()
        ),
    )
    _decide(world, "bob", "reject")
    with sqlite3.connect(db(world)) as connection:
        (old_promote,) = connection.execute(
            "SELECT MIN(seq) FROM audit_log WHERE action = 'promote'"
        ).fetchone()
        connection.execute(
            "INSERT INTO decisions (name, version, decision, principal, public_key, "
            "manifest_sha256, signature, comment, created_at, audit_seq) SELECT name, version, "
            "decision, principal, public_key, manifest_sha256, signature, comment, created_at, "
            "audit_seq FROM decisions WHERE principal = 'bob' AND version = 1 AND "
            "decision = 'approve'"
        )
        connection.execute("UPDATE aliases SET version = 1, audit_seq = ?", (old_promote,))
    result = audit(world)
    line = refused(result)
    assert "check one-to-one: a copied row" in result.stdout
    assert f"audit entry {old_promote} is not the latest promotion of toy-mlp@production" in (
        result.stdout
    )
    assert "check latest-promote" in result.stdout and "audit log verification failed" in line
    line = refused(serve(world))
    assert "rejected by bob" in line or "check one-to-one" in line


# ---- the independent verifier in the docs -------------------------------------------------------


def test_the_documented_independent_verifier_agrees(world, tmp_path):
    from server.registry.checkpoint import write_checkpoint

    _decide(world, "bob", "reject")
    anchor = tmp_path / "checkpoint.json"
    write_checkpoint(anchor, library(world, checkpoint, world.keys["carol"]))
    log = tmp_path / "log.json"
    listed = fedgov("registry", "audit", "--json", "--registry", str(world.registry_path))
    assert listed.returncode == 0, listed.stderr
    log.write_text(listed.stdout)
    script = [sys.executable, str(ROOT / "docs" / "audit_verifier.py"), str(log), str(anchor)]
    result = subprocess.run(script, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok: 7 entries", result.stdout
    # Truncated: the last entry (the rejection) cut off.
    import json

    data = json.loads(log.read_text())
    data["entries"] = data["entries"][:-1]
    log.write_text(json.dumps(data))
    result = subprocess.run(script, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "shorter than the checkpoint (truncated)" in result.stdout
    # Re-signed by the insider under bob's name.
    data["entries"].append(
        {
            **data["entries"][-1],
            "seq": 7,
            "actor": "bob",
            "actor_key": world.keys["mallory"].public_key,
        }
    )
    log.write_text(json.dumps(data))
    result = subprocess.run(script, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "entry 7: not signed with bob's key" in result.stdout
