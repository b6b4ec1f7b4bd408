"""Publishing a trained global model as a new, signed, immutable version.

:func:`publish_run` reads a finished run directory (``model.safetensors``, ``metrics.json`` and,
when differential privacy was on, ``privacy_report.json``); :func:`publish_model` does the work:
it exports ONNX (and checks ONNX Runtime agrees with torch), stores the weights, the ONNX file and
the model card by content, then in one locked transaction allocates the version number, builds
and signs the manifest, records the version and appends the signed ``publish`` audit entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgov.config import RunConfig, to_flower_config
from fedgov.datasets import DIGITS_MEAN, DIGITS_STD, MNIST_MEAN, MNIST_STD, DatasetSchema
from fedgov.models import build_model
from server.registry.errors import RegistryError
from server.registry.manifest import (
    MANIFEST_FORMAT,
    canonical_json,
    check_name,
    json_safe,
    manifest_digest,
    manifest_message,
)
from server.registry.model_card import render_model_card
from server.registry.onnx_export import ONNX_OPSET, export_onnx, onnx_max_abs_diff
from server.registry.registry import Registry
from server.registry.signing import SigningKey, load_or_create_key
from server.registry.store import VersionRecord, utc_now

PRIVACY_REPORT_FILE = "privacy_report.json"
ONNX_TOLERANCE = 1e-4  # largest |ONNX − torch| logit accepted at publish time
_IMAGE_NORMALISATION = {"digits": (DIGITS_MEAN, DIGITS_STD), "mnist5k": (MNIST_MEAN, MNIST_STD)}


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild the network from its weights (``fedgov.models.build_model``)."""

    architecture: str  # mlp | logreg | cnn
    hidden: int


def input_schema(schema: DatasetSchema) -> dict[str, Any]:
    """The manifest's input schema: features (tabular) or image shape, and the classes."""
    out: dict[str, Any] = {
        "dataset": schema.name,
        "kind": "tabular" if schema.features else "image",
        "features": [spec.to_dict() for spec in schema.features],
        "target": schema.target,
        "classes": list(schema.classes),
        "input_shape": list(schema.input_shape),
    }
    if not schema.features:
        mean, std = _IMAGE_NORMALISATION.get(schema.name, (0.0, 1.0))
        out["preprocessing"] = {"pixel_range": [0.0, 1.0], "mean": mean, "std": std}
    return out


#: Folders of a source tree that are not the app's code (for :func:`source_digest`).
_NOT_CODE = {"tests", "runs", "outputs", "multirun", "__pycache__", "node_modules"}


def source_digest(root: Path) -> str | None:
    """``sha256:<hex>`` over the app's own code under ``root`` (every ``.py`` file and
    ``pyproject.toml``, by relative path and content), None when there is none: what identifies
    the code where there is no git checkout (a FAB installed by the SuperLink, a wheel)."""
    import hashlib

    files = sorted(
        path
        for path in root.rglob("*")
        if (path.suffix == ".py" or path.name == "pyproject.toml")
        and path.is_file()
        and not any(
            part.startswith(".") or part in _NOT_CODE for part in path.relative_to(root).parts[:-1]
        )
    )
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return f"sha256:{digest.hexdigest()}"


def code_commit(root: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes) of the code that ran; ``$FEDGOV_CODE_COMMIT`` wins.

    Outside a git checkout (a deployment runs the FAB the SuperLink installed) the commit is the
    code's :func:`source_digest` instead, and whether it has changes is unknown (None).
    """
    if os.environ.get("FEDGOV_CODE_COMMIT"):
        return os.environ["FEDGOV_CODE_COMMIT"], None
    root = Path(__file__).resolve().parents[2] if root is None else root
    try:
        top, head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.split()
        if Path(top).resolve() != root.resolve():  # some other repository holds the code
            return source_digest(root), None
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, ValueError, subprocess.SubprocessError):
        return source_digest(root), None
    return head or source_digest(root), bool(status.strip())


def publish_model(
    registry: Registry,
    *,
    name: str,
    weights: bytes,
    spec: ModelSpec,
    schema: DatasetSchema,
    run_config: dict[str, Any],
    lineage: dict[str, Any],
    metrics: dict[str, Any],
    privacy_report: dict[str, Any] | None,
    key: SigningKey,
) -> VersionRecord:
    """Publish ``weights`` (safetensors bytes) as the next version of ``name``."""
    from safetensors.torch import load as load_safetensors_bytes

    check_name(name, "registry.model_name")
    actor = _publisher_name(registry, key)
    model = build_model(spec.architecture, schema.input_shape, len(schema.classes), spec.hidden)
    try:
        model.load_state_dict(load_safetensors_bytes(weights), strict=True)
    except (RuntimeError, ValueError) as error:
        raise RegistryError(
            f"weights do not fit model '{spec.architecture}' (hidden {spec.hidden}) on "
            f"{schema.name}: {str(error).splitlines()[0]}"
        ) from None
    model.eval()
    onnx_bytes = export_onnx(model, schema.input_shape)
    probe = np.random.default_rng(0).normal(size=(8, *schema.input_shape)).astype(np.float32)
    onnx_diff = onnx_max_abs_diff(onnx_bytes, model, probe)
    if onnx_diff > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX export differs from torch by {onnx_diff:g} (> {ONNX_TOLERANCE})")

    artifacts = {
        "weights": _artifact(registry, weights, "model.safetensors", "application/x-safetensors"),
        "onnx": _artifact(registry, onnx_bytes, "model.onnx", "application/onnx"),
    }
    model_info = {
        "architecture": spec.architecture,
        "hidden": spec.hidden,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "tensors": {k: list(v.shape) for k, v in model.state_dict().items()},
        "framework": f"torch {torch.__version__}",
        "onnx_opset": ONNX_OPSET,
        "onnx_max_abs_diff": onnx_diff,
    }
    with registry.store.write() as tx:
        version = tx.allocate_version(name)
        manifest = json_safe(
            {
                "format": MANIFEST_FORMAT,
                "name": name,
                "version": version,
                "created_at": utc_now(),
                "publisher": {"public_key": key.public_key, "key_id": key.key_id},
                "model": model_info,
                "input_schema": input_schema(schema),
                "run_config": run_config,
                "lineage": lineage,
                "metrics": metrics,
                "privacy_report": privacy_report,
                "artifacts": artifacts,
            }
        )
        card = render_model_card(manifest).encode("utf-8")
        manifest["artifacts"]["model_card"] = _artifact(
            registry, card, "MODEL_CARD.md", "text/markdown"
        )
        digest = manifest_digest(manifest)
        signature = key.sign(manifest_message(digest))
        entry = tx.audit(
            action="publish",
            subject=f"{name}:{version}",
            actor=actor,
            key=key,
            details={"manifest_sha256": digest, "run_id": str(lineage.get("run_id", ""))},
        )
        tx.add_version(
            name=name,
            version=version,
            manifest=manifest,
            manifest_sha256=digest,
            signature=signature,
            signer_key=key.public_key,
            run_id=str(lineage.get("run_id", "")),
            audit_seq=entry.seq,
        )
    return VersionRecord(
        name,
        version,
        manifest["created_at"],
        manifest,
        canonical_json(manifest).decode("utf-8"),
        digest,
        signature,
        key.public_key,
        str(lineage.get("run_id", "")),
        entry.seq,
    )


def _publisher_name(registry: Registry, key: SigningKey) -> str:
    """The policy's name for the publishing key; a governed registry refuses any other key."""
    chain = registry.policy_chain()
    if not chain:
        return "publisher"  # not governed yet: `registry init` adopts what was published before
    policy = chain.head
    principal = policy.principal_for_key(key.public_key)
    if principal is None or not policy.is_publisher(key.public_key):
        raise RegistryError(
            f"publish refused: key {key.key_id} is not a publisher in {policy.source} (add it "
            "with a policy change: fedgov registry policy propose)"
        )
    return principal.name


def _artifact(registry: Registry, data: bytes, filename: str, media_type: str) -> dict[str, Any]:
    return {
        "sha256": registry.artifacts.put_bytes(data),
        "bytes": len(data),
        "filename": filename,
        "media_type": media_type,
    }


# ---- from a run directory -----------------------------------------------------------------------


@dataclass
class Published:
    record: VersionRecord
    registry_path: Path
    key_path: Path
    key_created: bool


def run_lineage(
    cfg: RunConfig, metrics: dict[str, Any], run_id: str, run_dir: Path
) -> dict[str, Any]:
    """Where the model came from: the run, its strategy, rounds, sites, secure aggregation, code."""
    flat = to_flower_config(cfg)
    commit, dirty = code_commit()
    rounds = metrics.get("rounds", [])
    import flwr

    return {
        "run_id": run_id,
        "run_dir": str(run_dir),
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "strategy": cfg.strategy.name,
        "strategy_config": {"name": cfg.strategy.name, **cfg.strategy.options},
        "rounds": cfg.rounds,
        "rounds_completed": len(rounds),
        "sites_per_round": [len(r.get("participants", [])) for r in rounds],
        "sites": sorted(metrics.get("sites", {})),
        "secure_aggregation": {
            "enabled": cfg.secagg.name not in ("off", "none", ""),
            "settings": {k[7:]: v for k, v in flat.items() if k.startswith("secagg.")},
        },
        "privacy": {k[8:]: v for k, v in flat.items() if k.startswith("privacy.")},
        "code_commit": commit,
        "code_dirty": dirty,
        "versions": {"flwr": flwr.__version__, "torch": torch.__version__},
    }


def run_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The manifest's metrics: the final values, wall time and a compact per-round history."""
    keep = (
        "train_loss",
        "eval_loss",
        "eval_accuracy",
        "central_eval_loss",
        "central_eval_accuracy",
    )
    return {
        "final": metrics.get("final", {}),
        "wall_seconds": metrics.get("wall_seconds"),
        "rounds": [
            {
                "round": r.get("round"),
                "participants": len(r.get("participants", [])),
                "declined": len(r.get("declined", [])),
                **{k: r.get(k) for k in keep},
            }
            for r in metrics.get("rounds", [])
        ],
    }


def _default_model_name(schema_name: str, architecture: str) -> str:
    """``<schema>-<model>``, lower-cased to the registry's alphabet (a-z, 0-9, '.', '_', '-')."""
    import re

    stem = re.sub(r"[^a-z0-9._-]+", "-", schema_name.lower()).strip("-._") or "model"
    return f"{stem}-{architecture}"[:64]


def publish_run(
    run_dir: str | Path,
    cfg: RunConfig,
    schema: DatasetSchema,
    run_id: str | int | None = None,
) -> Published:
    """Publish a finished run's model per ``cfg.registry``; returns the new version."""
    from server.registry.registry import default_registry_path

    run_dir = Path(run_dir)
    try:
        weights = (run_dir / "model.safetensors").read_bytes()
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except FileNotFoundError as error:
        raise RegistryError(
            f"publish: {error.filename} is missing (the run did not finish)"
        ) from None
    report_path = run_dir / PRIVACY_REPORT_FILE
    privacy_report = json.loads(report_path.read_text()) if report_path.exists() else None
    registry = Registry(
        cfg.registry.path or default_registry_path(), cfg.registry.db_url or None, create=True
    )
    try:
        key_path = Path(cfg.registry.signing_key or registry.default_publisher_key_path())
        key, created = load_or_create_key(key_path)
        # Named after the schema the model was trained for (the bundled dataset's name in
        # simulations), never a bundled dataset the federation did not use.
        name = cfg.registry.model_name or _default_model_name(schema.name, cfg.model.name)
        run_id_text = str(run_id) if run_id is not None else uuid.uuid4().hex
        lineage = run_lineage(cfg, metrics, run_id_text, run_dir.resolve())
        lineage["dataset"] = schema.name
        record = publish_model(
            registry,
            name=name,
            weights=weights,
            spec=ModelSpec(cfg.model.name, cfg.model.hidden),
            schema=schema,
            run_config=to_flower_config(cfg),
            lineage=lineage,
            metrics=run_metrics(metrics),
            privacy_report=privacy_report,
            key=key,
        )
    finally:
        registry.close()
    return Published(record, registry.path, key_path, created)
