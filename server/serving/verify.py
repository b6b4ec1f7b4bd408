"""Verify-on-start: what ``fedgov serve NAME@ALIAS`` checks before it loads a single weight.

1. the alias resolves to a version (the policy governs the alias);
2. the manifest: its digest, the publisher's Ed25519 signature, the publisher listed in the policy;
3. every artifact's sha256 (the weights and ONNX bytes are read once, hashed, then used);
4. the approvals against the policy in force (the signed chain's head): every gate of the
   alias still holds, each decision judged under the policy in force when it was made;
5. the audit log verifies (chain, replay, rows one to one) and records this alias's promotion
   to this version as its latest; with an anchor, the log extends that checkpoint.

Any failure raises VerificationError with one line saying what failed. :func:`check_served`
repeats steps 1-5 for a running server (``--reverify-seconds``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from server.registry.checkpoint import Checkpoint
from server.registry.errors import RegistryError, VerificationError
from server.registry.governance import (
    AuditReport,
    VerificationReport,
    gate_report,
    verify_audit,
    verify_version,
)
from server.registry.manifest import ModelRef, privacy_summary
from server.registry.policy import GateReport, Policy
from server.registry.registry import Registry
from server.registry.store import VersionRecord
from server.serving.inputs import InputSpec

RUNTIMES = ("onnx", "torch")


@dataclass
class ServedModel:
    """A verified version, loaded and ready to predict."""

    record: VersionRecord
    alias: str
    runtime: str
    predictor: Any  # callable: float32 batch → logits
    spec: InputSpec
    checks: list[str] = field(default_factory=list)
    approvers: list[str] = field(default_factory=list)
    policy_sha256: str = ""
    audit_entries: int = 0
    withdrawn: str | None = None  # why it may no longer be served (set by re-verification)
    verified_at: float = field(default_factory=time.time)  # last successful verification (epoch s)

    @property
    def classes(self) -> list[str]:
        return list(self.record.manifest["input_schema"]["classes"])

    def summary(self) -> dict[str, Any]:
        """``GET /v1/model``: the manifest summary, the privacy summary, how it was verified."""
        m = self.record.manifest
        lineage = m.get("lineage") or {}
        return {
            "name": self.record.name,
            "version": self.record.version,
            "alias": self.alias,
            "manifest_sha256": self.record.manifest_sha256,
            "created_at": m["created_at"],
            "publisher_key_id": m["publisher"]["key_id"],
            "runtime": self.runtime,
            "model": {k: m["model"][k] for k in ("architecture", "hidden", "parameters")},
            "input": self.spec.describe(),
            "classes": self.classes,
            "metrics": (m.get("metrics") or {}).get("final", {}),
            "lineage": {
                k: lineage.get(k)
                for k in (
                    "run_id",
                    "dataset",
                    "strategy",
                    "rounds",
                    "rounds_completed",
                    "sites",
                    "sites_per_round",
                    "secure_aggregation",
                    "code_commit",
                )
            },
            "privacy": privacy_summary(m.get("privacy_report")),
            "artifacts": {
                role: {"sha256": a["sha256"], "bytes": a["bytes"]}
                for role, a in m["artifacts"].items()
            },
            "verification": {
                "checks": self.checks,
                "approved_by": self.approvers,
                "policy_sha256": self.policy_sha256,
                "audit_entries": self.audit_entries,
            },
        }


def check_served(
    registry: Registry,
    ref: ModelRef,
    policy: Policy,
    anchor: Checkpoint | None = None,
    expected: VersionRecord | None = None,
) -> tuple[VersionRecord, VerificationReport, GateReport, AuditReport]:
    """Steps 1-5 for ``ref`` (and, with ``expected``, that the alias still names that version);
    VerificationError names the first failure."""
    policy.rule(ref.alias)
    with registry.store.read() as session:
        record = registry.store.resolve(session, ref)
        if expected is not None and (record.version, record.manifest_sha256) != (
            expected.version,
            expected.manifest_sha256,
        ):
            raise VerificationError(
                f"{ref} now names {record.ref}, not the served {expected.ref} (moved by "
                "governance: restart to serve it)"
            )
        report = verify_version(registry, record, policy)
        report.raise_for_failure(f"serve refused: {ref} → ")
    audit = verify_audit(registry, anchor)
    if not audit.ok:
        more = f" (and {len(audit.problems) - 1} more)" if len(audit.problems) > 1 else ""
        raise VerificationError(f"serve refused: {audit.problems[0]}{more}")
    with registry.store.read() as session:
        gates = gate_report(registry, session, record, policy, ref.alias)
    if not gates.passed:
        unmet = "; ".join(str(g) for g in gates.unmet)
        raise VerificationError(
            f"serve refused: {ref} → {record.ref} no longer meets {policy.source}: {unmet}"
        )
    latest = audit.state.aliases.get((ref.name, ref.alias)) if audit.state else None
    if latest is None or latest[0] != record.version:
        raise VerificationError(
            f"serve refused: {ref} → {record.ref} is not what the audit log's latest promotion "
            "of the alias says (check latest-promote)"
        )
    return record, report, gates, audit


def load_for_serving(
    registry: Registry,
    ref: ModelRef,
    policy: Policy,
    runtime: str = "onnx",
    anchor: Checkpoint | None = None,
) -> ServedModel:
    """Verify ``ref`` (``NAME@ALIAS``) end to end and load it; VerificationError on any failure."""
    if ref.alias is None:
        raise RegistryError(
            f"serve: '{ref}' names a version; serve an alias (NAME@ALIAS) that governance moved"
        )
    if runtime not in RUNTIMES:
        raise RegistryError(f"--runtime: '{runtime}' is not one of {', '.join(RUNTIMES)}")
    record, report, gates, audit = check_served(registry, ref, policy, anchor)

    artifacts = record.manifest["artifacts"]
    predictor: Any
    if runtime == "onnx":
        from server.registry.onnx_export import OnnxPredictor

        onnx_bytes = registry.artifacts.read_verified(artifacts["onnx"]["sha256"], "artifact onnx")
        predictor = OnnxPredictor(onnx_bytes)
    else:
        predictor = _torch_predictor(registry, record)
    return ServedModel(
        record=record,
        alias=ref.alias,
        runtime=runtime,
        predictor=predictor,
        spec=InputSpec.from_manifest(record.manifest["input_schema"]),
        checks=[str(c) for c in report.checks] + [str(g) for g in gates.results],
        approvers=gates.approvers,
        policy_sha256=policy.sha256,
        audit_entries=len(audit.entries),
    )


def _torch_predictor(registry: Registry, record: VersionRecord):
    import torch
    from safetensors.torch import load as load_safetensors_bytes

    from fedgov.models import build_model
    from server.registry.onnx_export import TorchPredictor

    manifest = record.manifest
    weights = registry.artifacts.read_verified(
        manifest["artifacts"]["weights"]["sha256"], "artifact weights"
    )
    schema = manifest["input_schema"]
    model = build_model(
        manifest["model"]["architecture"],
        tuple(schema["input_shape"]),
        len(schema["classes"]),
        manifest["model"]["hidden"],
    )
    model.load_state_dict(load_safetensors_bytes(weights), strict=True)
    torch.set_num_threads(1)
    return TorchPredictor(model)
