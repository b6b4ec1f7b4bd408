"""The ServerApp: one entry point for simulation (Ray) and deployment (SuperLink) alike."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedgov.config import RunConfig
from fedgov.datasets import Dataset, DatasetSchema, schema_digest
from fedgov.errors import ConfigError, FedgovError
from fedgov.evaluation import EvalResult, evaluate
from fedgov.models import build_model, initial_model
from fedgov.records import load_array_record
from fedgov_data.federation import bundled_split, federation_schema
from server.checkpoint import load_checkpoint
from server.observability import round_status, write_status
from server.outputs import write_privacy_report, write_run_outputs
from server.privacy_round import PrivacyRound, report_of
from server.round_context import RoundContext
from server.rounds import RoundRecord, run_outcome, run_rounds
from strategies.registry import build_strategy
from strategies.run_config import load_run_config

app = ServerApp()
#: In the run directory when the ServerApp failed: ``{"reason": one line}``.
FAILURE_FILE = "failure.json"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config, train for ``rounds`` rounds, write the run's outputs."""
    cfg = load_run_config(context.run_config)
    try:
        run_federation(grid, cfg, flower_run_id=context.run_id)
    except BaseException as error:
        # `fedgov run` ends with this one line, whatever Flower prints around it.
        if cfg.output_dir:
            write_failure(cfg.output_dir, error)
        raise


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
    schema = federation_schema(cfg)
    model = initial_model(
        cfg.model.name,
        schema.input_shape,
        len(schema.classes),
        cfg.model.hidden,
        cfg.seed,
        cfg.model.options,
    )
    holdout, central_note = central_holdout(cfg, schema)
    central = _central_evaluator(cfg, schema, holdout) if holdout is not None else None
    if central is None:
        print(f"[fedgov] central evaluation: none ({central_note})", file=sys.stderr, flush=True)
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
            file=sys.stderr,
            flush=True,
        )
    observer = _RoundObserver(cfg, privacy, run_id, resume_from.records if resume_from else ())
    result = run_rounds(
        RoundContext(grid, cfg, strategy, privacy, run_id),
        arrays,
        central,
        on_round=observer,
        on_round_end=observer.ended,
        resume_from=resume_from,
        schema_digest=schema_digest(schema),
    )
    outcome = run_outcome(result)
    if cfg.output_dir:
        write_run_outputs(
            cfg.output_dir,
            cfg,
            result,
            time.monotonic() - started,
            schema=schema,
            central_evaluation=central_note,
            outcome=outcome,
        )
        if privacy is not None:
            write_privacy_report(cfg.output_dir, report_of(privacy, run_id))
    if not outcome["trained"]:
        print(f"[fedgov] {outcome['reason']}", file=sys.stderr, flush=True)
        if cfg.registry.publish:
            print("[fedgov] nothing published: no site trained", file=sys.stderr, flush=True)
        return
    # Last: every output of the run (privacy_report.json included) must be written before this.
    if cfg.registry.publish:
        _publish(cfg, schema, run_id or None)


def central_holdout(cfg: RunConfig, schema: DatasetSchema) -> tuple[Dataset | None, str]:
    """The rows central evaluation uses and a note saying which (or why there are none).

    With the federation's own schema (``dataset.schema``) only the coordinator's hold-out file of
    that schema (``dataset.holdout``) qualifies; a bundled dataset is never borrowed. Without it,
    the bundled dataset's label-stratified hold-out (simulations, demos), as before.
    """
    if cfg.dataset.schema:
        if not cfg.dataset.holdout:
            return None, (
                f"no coordinator hold-out of schema '{schema.name}' was given "
                "(fedgov run --holdout FILE)"
            )
        from fedgov_data.connector import read_site_table

        x, y = read_site_table(cfg.dataset.holdout, schema)
        rows = Dataset(x=x, y=y, site=np.full(len(y), "", dtype=object), schema=schema)
        return rows, f"coordinator hold-out {cfg.dataset.holdout} ({len(y)} rows)"
    holdout = bundled_split(cfg)[1]
    if not len(holdout.y):
        return None, "dataset.holdout_fraction is 0"
    return holdout, f"hold-out of bundled dataset '{cfg.dataset.name}' ({len(holdout.y)} rows)"


def write_failure(output_dir: str, error: BaseException) -> None:
    """Leave the run's cause of failure (one line) in ``failure.json`` for ``fedgov run``."""
    from pathlib import Path

    from fedgov.records import atomic_write_json

    line = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, FedgovError):
        line = f"{type(error).__name__}: {line}"
    with contextlib.suppress(OSError):
        atomic_write_json(Path(output_dir) / FAILURE_FILE, {"reason": line})


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
    classes = len(schema.classes)
    model = build_model(
        cfg.model.name, schema.input_shape, classes, cfg.model.hidden, cfg.model.options
    )

    def central_evaluate(arrays: ArrayRecord) -> EvalResult:
        load_array_record(model, arrays)
        return evaluate(model, holdout)

    return central_evaluate


class _RoundObserver:
    """The run's status.json for the coordinator as each round ends (``ended``), and the progress
    line once its federated evaluation is in (``__call__``: it arrives with the next round's
    replies), with the privacy spend as it stood when the round ended.

    ``earlier``: the rounds a resumed run completed before its checkpoint (the last of them is
    handed in again once evaluated)."""

    def __init__(
        self,
        cfg: RunConfig,
        privacy: PrivacyRound | None,
        run_id: str,
        earlier: Sequence[RoundRecord] = (),
    ) -> None:
        self._cfg, self._privacy, self._run_id = cfg, privacy, run_id
        self._records: dict[int, RoundRecord] = {record.round: record for record in earlier}
        # round → (site-level ε, max sample-level ε) when the round ended
        self._spent: dict[int, tuple[float | None, float | None]] = {}
        if earlier:  # resumed: the privacy state is the checkpoint's, as its round ended
            self._spent[earlier[-1].round] = self._spend()

    def _spend(self) -> tuple[float | None, float | None]:
        privacy = self._privacy
        site_epsilon = privacy.site_level_epsilon() if privacy and privacy.site_level else None
        return site_epsilon, privacy.max_site_epsilon() if privacy else None

    def ended(self, record: RoundRecord) -> None:
        """``record``'s round ended (its evaluation still to come): note the spend, write the
        status."""
        self._spent[record.round] = self._spend()
        self._records[record.round] = record
        self._write_status(record.round)

    def __call__(self, record: RoundRecord) -> None:
        """``record``'s evaluation is in: its progress line (and the status, if it is the last)."""
        self._records[record.round] = record
        if self._cfg.progress:
            _show_progress(self._cfg, record, *self._spent[record.round])
        if record.round == max(self._records):
            self._write_status(record.round)

    def _write_status(self, last_round: int) -> None:
        if self._cfg.output_dir:
            records = [self._records[r] for r in sorted(self._records)]
            write_status(
                self._cfg.output_dir,
                round_status(self._run_id, self._cfg.rounds, records, *self._spent[last_round]),
            )


def _show_progress(
    cfg: RunConfig, record: RoundRecord, site_epsilon: float | None, sample_epsilon: float | None
) -> None:
    """``[fedgov] round 2/3 · 4 sites · … · eval_acc 0.8125 · … · 1.2 s`` on stderr."""
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
    if sample_epsilon is not None:
        parts.append(f"max site ε {sample_epsilon:.2f}")
    if site_epsilon is not None:
        parts.append(f"site-level ε {site_epsilon:.2f}")
    parts.append(f"{record.seconds:.1f} s")
    print("[fedgov] " + " · ".join(parts), file=sys.stderr, flush=True)
