"""The governance part of ``fedgov demo``: demo keys, a demo policy, and the commands to run next.

Everything goes under the demo's ``--out DIR``: keys in ``DIR/keys/`` (private keys mode 0600,
generated once and reused; outside the registry folder), the registry in ``DIR/registry/``. The
demo governs the registry with its policy as signed version 1 (alice and bob, two of the three
approvers, are its governance quorum; ``fedgov registry init``), a copy of which is
``DIR/registry/policy.yaml``. The policy's ε and secure-aggregation gates are included when the
run has a privacy report and used secure aggregation, so the demo's candidate can pass them.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from server.registry.manifest import privacy_epsilon, secure_aggregation_enabled
from server.registry.signing import load_or_create_key

#: name → roles of the demo's principals
DEMO_PRINCIPALS: dict[str, list[str]] = {
    "fl-server": ["publisher"],
    "alice": ["clinical-lead"],
    "bob": ["privacy-officer"],
    "carol": ["data-steward"],
    "dana": ["release-manager"],
}
DEMO_MIN_ACCURACY = 0.75  # catches a broken model; always predicting 'expense' scores 0.78
DEMO_MAX_EPSILON = 10.0
DEMO_APPROVER_ROLES = ["clinical-lead", "privacy-officer", "data-steward"]
DEMO_GOVERNANCE_SIGNERS = ("alice", "bob")  # sign the demo's policy versions (quorum 2 of 3)


def demo_paths(out: Path) -> dict[str, Path]:
    return {"keys": out / "keys", "registry": out / "registry"}


def prepare_keys(out: Path) -> dict[str, str]:
    """Each demo principal's key pair under ``out/keys`` (created once); name → public key."""
    keys = demo_paths(out)["keys"]
    return {
        name: load_or_create_key(keys / f"{name}.key")[0].public_key for name in DEMO_PRINCIPALS
    }


def registry_overrides(out: Path) -> list[str]:
    """Hydra overrides that make the demo run publish into ``out/registry``, signed by fl-server."""
    paths = demo_paths(out)
    return [
        "registry.publish=true",
        f"registry.path={_quote(paths['registry'])}",
        f"registry.signing_key={_quote(paths['keys'] / 'fl-server.key')}",
    ]


def _quote(path: Path) -> str:
    text = str(path).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def demo_policy(public_keys: dict[str, str], manifest: dict[str, Any]) -> dict[str, Any]:
    """The demo's policy: 2 of 3 approvers (one the privacy officer), dana promotes, gates."""
    gates: dict[str, Any] = {"min_metrics": {"central_eval_accuracy": DEMO_MIN_ACCURACY}}
    if privacy_epsilon(manifest.get("privacy_report")) is not None:
        gates["max_epsilon"] = DEMO_MAX_EPSILON
    if secure_aggregation_enabled(manifest):
        gates["require_secure_aggregation"] = True
    approvers = DEMO_APPROVER_ROLES
    return {
        "principals": {
            name: {"public_key": public_keys[name], "roles": roles}
            for name, roles in DEMO_PRINCIPALS.items()
        },
        "aliases": {
            "production": {
                "quorum": 2,
                "approver_roles": approvers,
                "required_roles": ["privacy-officer"],
                "promoter_roles": ["release-manager"],
                "gates": gates,
            },
            "staging": {"quorum": 1, "approver_roles": approvers},
        },
        "governance": {"quorum": 2, "signer_roles": approvers},
    }


def write_policy(out: Path, policy: dict[str, Any]) -> Path:
    """Make ``policy`` the demo registry's policy in force: version 1 on a fresh registry, the
    next version when an earlier demo left another one, nothing when it is already in force.
    Signed by the demo's governance quorum (their keys are the demo's); returns the policy file."""
    from server.registry.governance import apply_policy, propose_policy
    from server.registry.registry import Registry
    from server.registry.signing import load_key

    keys = demo_paths(out)["keys"]
    registry = Registry(demo_paths(out)["registry"])
    try:
        chain = registry.policy_chain()
        if not chain or dict(chain.head.document or {}) != policy:
            version = propose_policy(registry, policy, "the demo policy")
            signers = [load_key(keys / f"{name}.key") for name in DEMO_GOVERNANCE_SIGNERS]
            for name, key in zip(DEMO_GOVERNANCE_SIGNERS, signers, strict=True):
                version = version.with_signature(key, name)
            apply_policy(registry, version, signers[0])
        return registry.policy_path()
    finally:
        registry.close()


def governance_commands(out: Path, ref: str, port: int = 8080) -> list[tuple[str, str]]:
    """(what it does, command) for the reader to run next, with paths as typed from here."""
    paths = demo_paths(out)
    registry = _shown(paths["registry"])
    key = {name: _shown(paths["keys"] / f"{name}.key") for name in DEMO_PRINCIPALS}
    name = ref.split(":")[0]
    reg = f"--registry {registry}"
    return [
        ("inspect the candidate and its gates", f"fedgov registry show {ref} {reg}"),
        (
            "approve as alice (clinical lead)",
            f"fedgov registry approve {ref} --key {key['alice']} {reg}",
        ),
        (
            "approve as bob (privacy officer)",
            f"fedgov registry approve {ref} --key {key['bob']} {reg}",
        ),
        (
            "promote as dana (release manager)",
            f"fedgov registry promote {ref} --alias production --key {key['dana']} {reg}",
        ),
        ("check the audit chain", f"fedgov registry audit --verify {reg}"),
        (
            "sign a checkpoint of it, kept outside the registry",
            f"fedgov registry checkpoint --key {key['alice']} --out "
            f"{_shown(out / 'checkpoint.json')} {reg}",
        ),
        (
            "serve it (verifies first, then every 30 s, against the checkpoint)",
            f"fedgov serve {name}@production {reg} --anchor {_shown(out / 'checkpoint.json')} "
            f"--port {port}",
        ),
    ]


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when inside it, shell-quoted."""
    relative = os.path.relpath(path)
    return shlex.quote(relative if not relative.startswith("..") else str(path))
