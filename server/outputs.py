"""What a run leaves in its directory: ``metrics.json``, ``model.safetensors`` and, with privacy
on, ``privacy_report.json`` + ``privacy_report.html``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedgov.config import RunConfig, to_flower_config
from fedgov.datasets import DatasetSchema, schema_digest
from fedgov.records import atomic_write_json, save_safetensors
from server.rounds import RunResult, round_as_dict

METRICS_FILE = "metrics.json"
MODEL_FILE = "model.safetensors"
PRIVACY_REPORT_JSON = "privacy_report.json"
PRIVACY_REPORT_HTML = "privacy_report.html"


def metrics_document(
    cfg: RunConfig,
    result: RunResult,
    wall_seconds: float,
    *,
    schema: DatasetSchema | None = None,
    central_evaluation: str = "",
    outcome: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``metrics.json`` document (keys as in docs/architecture.md, plus more).

    Also: ``schema`` (the federation's schema: name, digest, target, classes, features),
    ``central_evaluation`` (which rows it used, or why there was none), ``sites_left_out``
    (site → why discovery left it out) and ``outcome`` (``trained``: whether any site trained in
    any round that was not aborted; ``reason`` when none did).
    """
    rounds = [round_as_dict(r) for r in result.rounds]
    last = result.rounds[-1] if result.rounds else None
    final = {
        "eval_loss": last.eval_loss if last else None,
        "eval_accuracy": last.eval_accuracy if last else None,
        "central_eval_loss": last.central_eval_loss if last else None,
        "central_eval_accuracy": last.central_eval_accuracy if last else None,
    }
    sites = {
        site_id: {"num_train": info.num_train, "num_test": info.num_test}
        for site_id, info in sorted(result.sites.items())
    }
    document: dict[str, Any] = {
        "rounds": rounds,
        "final": final,
        "wall_seconds": wall_seconds,
        "sites": sites,
        "sites_left_out": dict(sorted(result.left_out.items())),
        "config": to_flower_config(cfg),
    }
    if schema is not None:
        document["schema"] = {
            "name": schema.name,
            "digest": schema_digest(schema),
            "target": schema.target,
            "classes": list(schema.classes),
            "features": list(schema.feature_names),
        }
    if central_evaluation:
        document["central_evaluation"] = central_evaluation
    if outcome is not None:
        document["outcome"] = outcome
    return document


def write_run_outputs(
    run_dir: str | Path,
    cfg: RunConfig,
    result: RunResult,
    wall_seconds: float,
    **extra: Any,
) -> dict[str, Path]:
    """Atomically write ``metrics.json`` and ``model.safetensors`` into ``run_dir``
    (``extra``: :func:`metrics_document`'s keyword arguments)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    model_path = run_dir / MODEL_FILE
    save_safetensors(model_path, result.arrays, metadata=_model_metadata(cfg, extra.get("schema")))
    atomic_write_json(metrics_path, metrics_document(cfg, result, wall_seconds, **extra))
    return {"metrics": metrics_path, "model": model_path}


def write_privacy_report(run_dir: str | Path, document: dict[str, Any]) -> dict[str, Path]:
    """Atomically write ``privacy_report.json`` and the self-contained ``privacy_report.html``."""
    from fedgov.records import atomic_write_bytes
    from privacy.report import render_html

    run_dir = Path(run_dir)
    json_path, html_path = run_dir / PRIVACY_REPORT_JSON, run_dir / PRIVACY_REPORT_HTML
    atomic_write_json(json_path, document)
    atomic_write_bytes(html_path, render_html(document).encode("utf-8"))
    return {"privacy_report": json_path, "privacy_report_html": html_path}


def _model_metadata(cfg: RunConfig, schema: DatasetSchema | None = None) -> dict[str, str]:
    return {
        "model": cfg.model.name,
        "dataset": schema.name if schema is not None else cfg.dataset.name,
        "strategy": cfg.strategy.name,
        "rounds": str(cfg.rounds),
        "seed": str(cfg.seed),
    }
