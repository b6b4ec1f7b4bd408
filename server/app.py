"""The ServerApp: one entry point for simulation (Ray) and deployment (SuperLink) alike."""

from __future__ import annotations

import logging
import sys
import time

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedgov.config import RunConfig, from_flower_config
from fedgov.datasets import DatasetSchema
from fedgov.errors import ConfigError
from fedgov.evaluation import EvalResult, evaluate
from fedgov.models import build_model, initial_model
from fedgov.records import load_array_record
from server.checkpoint import load_checkpoint
from server.observability import round_status, write_status
from server.outputs import write_privacy_report, write_run_outputs
from server.privacy_round import PrivacyRound, report_of
from server.rounds import RoundRecord, run_rounds
from simulations.federation import simulated_federation
from strategies.registry import build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config, train for ``rounds`` rounds, write the run's outputs."""
    cfg = from_flower_config(context.run_config)
    run_federation(grid, cfg, flower_run_id=context.run_id)


def run_federation(grid: Grid, cfg: RunConfig, flower_run_id: int | None = None) -> None:
    """The whole run: initial model, rounds with progress lines, ``metrics.json`` and weights.

    With ``registry.publish`` the final model becomes a new candidate version in the registry.
    """
    if cfg.registry.publish and not cfg.output_dir:
        raise ConfigError("registry.publish: needs output_dir (the run directory it publishes)")
    torch.set_num_threads(1)
    # Flower logs every sampling and aggregation at INFO; fedgov prints one line per round.
    logging.getLogger("flwr").setLevel(logging.WARNING)
    started = time.monotonic()
    federation = simulated_federation(cfg)
    schema = federation.pool.schema
    model = initial_model(
        cfg.model.name, schema.input_shape, len(schema.classes), cfg.model.hidden, cfg.seed
    )
    central = (
        _central_evaluator(cfg, schema, federation.holdout) if len(federation.holdout.y) else None
    )
    strategy = build_strategy(cfg.strategy)
    arrays = ArrayRecord(model.state_dict())
    privacy = PrivacyRound(cfg) if cfg.privacy.name != "none" else None
    resume_from = None
    # fedgov's run id: chosen at the first start, kept in every checkpoint, reused on resume (a
    # resumed run gets a new Flower run id); the sites' ledgers and receipts are keyed by it.
    run_id = cfg.run_id or (str(flower_run_id) if flower_run_id is not None else "")
    if cfg.resume:
        if not cfg.output_dir:
            raise ConfigError("resume: needs output_dir (the interrupted run's directory)")
        resume_from = load_checkpoint(cfg.output_dir, cfg)
        arrays, strategy, privacy = resume_from.arrays, resume_from.strategy, resume_from.privacy
        run_id = resume_from.run_id or run_id
        print(
            f"[fedgov] resuming {cfg.output_dir} after round {resume_from.completed_round}",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    result = run_rounds(
        grid,
        cfg,
        strategy,
        arrays,
        central,
        on_round=_round_observer(cfg, privacy, run_id),
        privacy=privacy,
        resume_from=resume_from,
        run_id=run_id,
    )
    if cfg.output_dir:
        write_run_outputs(cfg.output_dir, cfg, result, time.monotonic() - started)
        if privacy is not None:
            write_privacy_report(cfg.output_dir, report_of(privacy, run_id))
    # Last: every output of the run (privacy_report.json included) must be written before this.
    if cfg.registry.publish:
        _publish(cfg, schema, run_id or None)


def _publish(cfg: RunConfig, schema: DatasetSchema, run_id: str | None) -> None:
    from server.registry.publish import publish_run

    published = publish_run(cfg.output_dir, cfg, schema, run_id)
    if published.key_created:
        print(
            f"[fedgov] note: generated the publisher signing key {published.key_path} (public key "
            f"{published.key_path}.pub); list that public key with role 'publisher' in the "
            "registry policy, or the version cannot be approved or served",
            file=sys.stderr,
            flush=True,
        )
    record = published.record
    print(
        f"[fedgov] published {record.ref} to {published.registry_path} as a candidate "
        f"(manifest sha256 {record.manifest_sha256[:16]}…, signed by key "
        f"{record.manifest['publisher']['key_id']})",
        file=sys.stderr,
        flush=True,
    )


def _central_evaluator(cfg: RunConfig, schema: DatasetSchema, holdout) -> callable:
    model = build_model(cfg.model.name, schema.input_shape, len(schema.classes), cfg.model.hidden)

    def central_evaluate(arrays: ArrayRecord) -> EvalResult:
        load_array_record(model, arrays)
        return evaluate(model, holdout)

    return central_evaluate


def _round_observer(cfg: RunConfig, privacy: PrivacyRound | None, run_id: str):
    """After each round: the progress line, and the run's status.json for the coordinator."""
    show = _progress_printer(cfg, privacy) if cfg.progress else None
    records: list[RoundRecord] = []

    def observe(record: RoundRecord) -> None:
        records.append(record)
        if show is not None:
            show(record)
        if cfg.output_dir:
            site_epsilon = privacy.site_level_epsilon() if privacy and privacy.site_level else None
            sample_epsilon = privacy.max_site_epsilon() if privacy else None
            write_status(
                cfg.output_dir,
                round_status(run_id, cfg.rounds, records, site_epsilon, sample_epsilon),
            )

    return observe


def _progress_printer(cfg: RunConfig, privacy: PrivacyRound | None = None):
    def show(record: RoundRecord) -> None:
        parts = [f"round {record.round}/{cfg.rounds}", f"{len(record.participants)} sites"]
        if record.declined:
            parts.append(f"{len(record.declined)} declined")
        if record.refused:
            parts.append(f"refused by {', '.join(record.refused)} (app not approved there)")
        if record.failures:
            parts.append(f"{len(record.failures)} failed")
        if record.dropouts:
            parts.append(f"{len(record.dropouts)} dropped out")
        if record.aborted:
            parts.append(f"ABORTED, model kept ({record.abort_reason})")
        for label, value in (
            ("train_loss", record.train_loss),
            ("eval_acc", record.eval_accuracy),
            ("central_acc", record.central_eval_accuracy),
        ):
            if value is not None:
                parts.append(f"{label} {value:.4f}")
        if privacy is not None and (site_max := privacy.max_site_epsilon()) is not None:
            parts.append(f"max site ε {site_max:.2f}")
        if privacy is not None and privacy.site_level:
            parts.append(f"site-level ε {privacy.site_level_epsilon():.2f}")
        parts.append(f"{record.seconds:.1f} s")
        print("[fedgov] " + " · ".join(parts), file=sys.stderr, flush=True)

    return show
