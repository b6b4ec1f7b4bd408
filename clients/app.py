"""The ClientApp every site runs, in simulation and in deployment alike.

Each handler reads the run config (what the researcher asked for) and the node config (what the
site holds), does its work in plain functions (``clients.training``) and replies with records.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import secagg, site_policy
from clients.site_data import SiteData, load_site_data
from clients.site_privacy import budget_fields
from clients.update import SiteDeclined, compute_update, site_model
from fedgov import messages as keys
from fedgov import site_query, wire
from fedgov.config import RunConfig, sample_level_on
from fedgov.datasets import schema_digest
from fedgov.errors import DataValidationError
from fedgov.evaluation import EvalResult, evaluate
from fedgov.plugins import only_modules, site_plugin_modules
from privacy.secagg.protocol import ABORT, CONSISTENCY, MASKED_INPUT, SETUP, SHARE_KEYS, UNMASK
from privacy.secagg.records import ACTIONS as SECAGG_ACTIONS
from strategies.run_config import load_run_config

# Weights arrive and leave packed in one object when the server sends them so (fedgov/wire.py).
app = ClientApp(mods=[wire.client_mod])

warnings.filterwarnings("ignore", message=".*Full backward hook.*")
logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _run_config(
    items: tuple[tuple[str, object], ...], plugin_modules: tuple[str, ...] | None
) -> RunConfig:
    # A `_target_` in the coordinator's config imports code only from the modules the site allows.
    with only_modules(plugin_modules):
        return load_run_config(dict(items))


def _config(context: Context) -> RunConfig:
    allowed = site_plugin_modules(context.node_config)
    return _run_config(tuple(sorted(context.run_config.items())), allowed)


def _prepare(context: Context) -> tuple[RunConfig, SiteData]:
    # One thread per site: the simulation runs several sites on a few cores, and a deployed
    # site's tiny models gain nothing from more.
    torch.set_num_threads(1)
    cfg = _config(context)
    return cfg, load_site_data(cfg, context.node_config)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say who this site is, how many rows it holds, its schema's digest and, under DP-SGD,
    its ε spent, cap and δ for the coordinator's budget plan (no data leaves).

    A site whose data file fails validation declines with "data invalid" and keeps the exact
    error (file, column, row) in its own ``activity.json`` for ``fedgov site status``; a site
    with its own file of fewer than ``dataset.min_site_rows`` rows declines too.
    """
    try:
        cfg, site = _prepare(context)
    except DataValidationError as error:
        site_id = str(context.node_config.get("site-id", "") or "")
        _record_declined(context, f"{site_query.DATA_INVALID}: {error}")
        return Message(keys.decline_content(site_id, site_query.DATA_INVALID), reply_to=msg)
    rows = len(site.train.y) + len(site.test.y)
    if "data-path" in context.node_config and rows < cfg.dataset.min_site_rows:
        reason = f"too few rows: {rows} (dataset.min_site_rows {cfg.dataset.min_site_rows})"
        _record_declined(context, reason)
        return Message(keys.decline_content(site.site_id, reason), reply_to=msg)
    record = keys.site_record(
        site.site_id,
        **{
            "num-train": len(site.train.y),
            "num-test": len(site.test.y),
            site_query.SCHEMA_DIGEST: schema_digest(site.schema),
            **(
                budget_fields(cfg, context.node_config, site.site_id)
                if sample_level_on(cfg)
                else {}
            ),
        },
    )
    return Message(RecordDict({keys.SITE: record}), reply_to=msg)


def _record_declined(context: Context, reason: str) -> None:
    """Why the site declined the run (the exact validation error, say), for the site's operator
    only (``activity.json``, shown by ``fedgov site status``)."""
    site_dir = str(context.node_config.get("site-dir", "") or "")
    if not site_dir:
        return
    from clients.site_status import record_run_outcome

    record_run_outcome(site_dir, context.run_id, "declined", reason)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's rows and return the new weights; asked
    (``evaluate-first``), evaluate the received model first and add its metrics to the reply."""
    try:
        cfg, site = _prepare(context)
    except DataValidationError as error:  # the file went bad after discovery: decline the same
        _record_declined(context, f"{site_query.DATA_INVALID}: {error}")
        site_id = str(context.node_config.get("site-id", "") or "")
        return Message(keys.decline_content(site_id, site_query.DATA_INVALID), reply_to=msg)
    evaluated = _evaluate_first(msg, context, cfg, site)
    try:
        site_policy.refuse_outside_policy(cfg, context.node_config, clear=True)
        update = compute_update(
            cfg,
            site,
            msg.content.array_records[keys.ARRAYS],
            msg.content.config_records[keys.CONFIG],
            context,
        )
    except SiteDeclined as declined:
        content = keys.decline_content(site.site_id, declined.reason, **declined.details)
        if evaluated:  # the evaluation stands even when the training is declined
            content[keys.METRICS] = MetricRecord(evaluated)
        return Message(content, reply_to=msg)
    content = RecordDict(
        {
            keys.ARRAYS: update.arrays,
            keys.METRICS: MetricRecord({**dict(update.metrics), **evaluated}),
            keys.SITE: keys.site_record(site.site_id),
            **update.extra_records(),  # the signed privacy receipt under sample-level DP
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's held-out rows."""
    cfg, site = _prepare(context)
    try:
        site_policy.refuse_outside_policy(cfg, context.node_config, evaluate=True)
    except SiteDeclined as declined:  # e.g. report_eval_metrics off: nothing computed
        return Message(keys.decline_content(site.site_id, declined.reason), reply_to=msg)
    result = _evaluation(cfg, site, msg.content.array_records[keys.ARRAYS])
    metrics = MetricRecord(
        {
            keys.EVAL_LOSS: result.loss,
            keys.EVAL_ACCURACY: result.accuracy,
            keys.NUM_EXAMPLES: result.num_examples,
        }
    )
    content = RecordDict({keys.METRICS: metrics, keys.SITE: keys.site_record(site.site_id)})
    return Message(content, reply_to=msg)


def _evaluation(cfg: RunConfig, site: SiteData, arrays: ArrayRecord) -> EvalResult:
    return evaluate(site_model(cfg, site, arrays), site.test)


def _evaluate_first(
    msg: Message, context: Context, cfg: RunConfig, site: SiteData
) -> dict[str, float | int]:
    """The received weights' ``eval_loss``, ``eval_accuracy`` and ``eval-num-examples`` on the
    test rows when the train message asks for them (``evaluate-first``); ``{}`` when it does not,
    when the site's policy keeps eval metrics home, or when the evaluation fails or is not finite
    (the server then asks with an evaluate message, which answers as it always did)."""
    config = msg.content.config_records.get(keys.CONFIG)
    arrays = msg.content.array_records.get(keys.ARRAYS)
    if config is None or arrays is None or config.get(keys.EVALUATE_FIRST) is not True:
        return {}
    try:
        site_policy.refuse_outside_policy(cfg, context.node_config, evaluate=True)
        result = _evaluation(cfg, site, arrays)
    except SiteDeclined:
        return {}
    except Exception as error:  # the training must not fail because its evaluation did
        logger.warning("evaluate-first failed, training anyway: %r", error)
        return {}
    if not (math.isfinite(result.loss) and math.isfinite(result.accuracy)):
        return {}
    return {
        keys.EVAL_LOSS: result.loss,
        keys.EVAL_ACCURACY: result.accuracy,
        keys.EVAL_NUM_EXAMPLES: result.num_examples,
    }


def _with_evaluation(reply: Message, evaluated: dict[str, float | int]) -> Message:
    """``reply`` with the eval metrics added to its ``METRICS`` (a SecAgg+ masked input)."""
    if evaluated and not reply.has_error() and keys.METRICS in reply.content.metric_records:
        reply.content.metric_records[keys.METRICS].update(evaluated)
    return reply


# ---- secure aggregation (SecAgg+): one custom train action per stage, see clients/secagg.py ----
@app.train(SECAGG_ACTIONS[SETUP])
def secagg_setup(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 1 ("train.secagg_setup"): this round's keys."""
    return secagg.handle_setup(msg, context, _config(context))


@app.train(SECAGG_ACTIONS[SHARE_KEYS])
def secagg_share_keys(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 2 ("train.secagg_share_keys"): encrypted shares for the neighbours."""
    return secagg.handle_share_keys(msg, context, _config(context))


@app.train(SECAGG_ACTIONS[MASKED_INPUT])
def secagg_masked_input(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 3 ("train.secagg_masked_input"): train, then send the masked update (and,
    asked, the received model's eval metrics in the clear, as an evaluate reply would)."""
    try:
        cfg, site = _prepare(context)
    except DataValidationError:  # the stage refuses it as before (its data is loaded there)
        return secagg.handle_masked_input(
            msg, context, _config(context), load_site=lambda: _prepare(context)[1]
        )
    evaluated = _evaluate_first(msg, context, cfg, site)
    reply = secagg.handle_masked_input(msg, context, cfg, load_site=lambda: site)
    return _with_evaluation(reply, evaluated)


@app.train(SECAGG_ACTIONS[CONSISTENCY])
def secagg_consistency(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 4 ("train.secagg_consistency"): sign the survivor set."""
    return secagg.handle_consistency(msg, context, _config(context))


@app.train(SECAGG_ACTIONS[UNMASK])
def secagg_unmask(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 5 ("train.secagg_unmask"): shares that remove the leftover masks."""
    return secagg.handle_unmask(msg, context, _config(context))


@app.train(SECAGG_ACTIONS[ABORT])
def secagg_abort(msg: Message, context: Context) -> Message:
    """After an aborted SecAgg+ round ("train.secagg_abort"): wipe its secrets."""
    return secagg.handle_abort(msg, context, _config(context))
