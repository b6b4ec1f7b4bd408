"""The ClientApp every site runs, in simulation and in deployment alike.

Each handler reads the run config (what the researcher asked for) and the node config (what the
site holds), does its work in plain functions (``clients.training``) and replies with records.
"""

from __future__ import annotations

import functools
import warnings

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import secagg, site_policy
from clients.site_data import SiteData, load_site_data
from clients.update import SiteDeclined, compute_update, site_model
from fedgov import messages as keys
from fedgov import wire
from fedgov.config import RunConfig, from_flower_config
from fedgov.evaluation import evaluate
from privacy.secagg.protocol import ABORT, MASKED_INPUT, SETUP, SHARE_KEYS, UNMASK
from privacy.secagg.records import ACTIONS as SECAGG_ACTIONS

# Weights arrive and leave packed in one object when the server sends them so (fedgov/wire.py).
app = ClientApp(mods=[wire.client_mod])

warnings.filterwarnings("ignore", message=".*Full backward hook.*")


@functools.lru_cache(maxsize=4)
def _run_config(items: tuple[tuple[str, object], ...]) -> RunConfig:
    return from_flower_config(dict(items))


def _config(context: Context) -> RunConfig:
    return _run_config(tuple(sorted(context.run_config.items())))


def _prepare(context: Context) -> tuple[RunConfig, SiteData]:
    # One thread per site: the simulation runs several sites on a few cores, and a deployed
    # site's tiny models gain nothing from more.
    torch.set_num_threads(1)
    cfg = _run_config(tuple(sorted(context.run_config.items())))
    return cfg, load_site_data(cfg, context.node_config)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say who this site is and how many rows it holds (no data leaves the site)."""
    _, site = _prepare(context)
    record = keys.site_record(
        site.site_id, **{"num-train": len(site.train.y), "num-test": len(site.test.y)}
    )
    return Message(RecordDict({keys.SITE: record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's rows and return the new weights."""
    cfg, site = _prepare(context)
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
        return Message(keys.decline_content(site.site_id, declined.reason, **declined.details),
                       reply_to=msg)  # fmt: skip
    content = RecordDict(
        {
            keys.ARRAYS: update.arrays,
            keys.METRICS: update.metrics,
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
    result = evaluate(site_model(cfg, site, msg.content.array_records[keys.ARRAYS]), site.test)
    metrics = MetricRecord(
        {"eval_loss": result.loss, "eval_accuracy": result.accuracy,
         keys.NUM_EXAMPLES: result.num_examples}
    )  # fmt: skip
    content = RecordDict({keys.METRICS: metrics, keys.SITE: keys.site_record(site.site_id)})
    return Message(content, reply_to=msg)


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
    """SecAgg+ stage 3 ("train.secagg_masked_input"): train, then send the masked update."""
    return secagg.handle_masked_input(
        msg, context, _config(context), load_site=lambda: _prepare(context)[1]
    )


@app.train(SECAGG_ACTIONS[UNMASK])
def secagg_unmask(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 4 ("train.secagg_unmask"): shares that remove the leftover masks."""
    return secagg.handle_unmask(msg, context, _config(context))


@app.train(SECAGG_ACTIONS[ABORT])
def secagg_abort(msg: Message, context: Context) -> Message:
    """After an aborted SecAgg+ round ("train.secagg_abort"): wipe its secrets."""
    return secagg.handle_abort(msg, context, _config(context))
