"""One site's contribution to a round: train the global model locally, or decline.

Every path that releases a site's update (the plain train message, and later the secure-
aggregation stages) goes through :func:`compute_update`, so the site's own checks (data
validation, privacy budget) apply to all of them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord

from clients.site_data import SiteData
from clients.training import TrainResult, site_round_seed, train_local
from fedgov import messages as keys
from fedgov.config import RunConfig, sample_level_on, site_level_on
from fedgov.models import build_model
from fedgov.objectives import build_objective
from fedgov.records import arrays_to_numpy, load_array_record


class SiteDeclined(Exception):
    """The site refuses to train this round; ``reason`` travels back to the server."""

    def __init__(self, reason: str, **details: int | float | str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


@dataclass
class SiteUpdate:
    """The locally trained weights and the metrics that go back with them.

    ``receipt``: under sample-level DP, the site's signed privacy receipt for this release; every
    reply that carries the update must carry it too (:meth:`extra_records`).
    """

    arrays: ArrayRecord
    metrics: MetricRecord
    receipt: ConfigRecord | None = None

    def extra_records(self) -> dict[str, ConfigRecord]:
        """Records to add to the reply next to the update (the receipt, under ``receipt``)."""
        return {keys.RECEIPT: self.receipt} if self.receipt is not None else {}


def rows_sha256(site: SiteData) -> str:
    """SHA-256 of the site's training rows (features and labels, with shapes and types)."""
    import hashlib

    digest = hashlib.sha256()
    for array in (site.train.x, site.train.y):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def site_model(cfg: RunConfig, site: SiteData, arrays: ArrayRecord) -> torch.nn.Module:
    """The run's model for this site's schema, loaded with ``arrays``."""
    schema = site.schema
    classes = len(schema.classes)
    model = build_model(
        cfg.model.name, schema.input_shape, classes, cfg.model.hidden, cfg.model.options
    )
    load_array_record(model, arrays)
    return model


def compute_update(
    cfg: RunConfig,
    site: SiteData,
    global_arrays: ArrayRecord,
    config: ConfigRecord,
    context: Context,
) -> SiteUpdate:
    """Train ``global_arrays`` on the site's rows; raise :class:`SiteDeclined` to refuse.

    Under sample-level DP the site first reserves the round in its own ledger against its own
    cap (node config), trains with DP-SGD and signs a receipt; under site-level DP it clips its
    update to ``privacy.clipping_norm`` (and, with secure aggregation, adds its noise share).
    Metrics computed from the training rows (``train_loss``) stay at the site when DP is on.
    The ledger keys the spend by fedgov's run id from the train config (the same after the
    coordinator resumed the run), else Flower's. With a site folder (node config ``site-dir``)
    the outcome goes to its ``activity.json`` for ``fedgov site status``.
    """
    run_id = keys.config_run_id(config, context.run_id)
    server_round = int(config.get(keys.SERVER_ROUND, 0))
    try:
        update, spent = _compute_update(
            cfg, site, global_arrays, config, context, run_id, server_round
        )
    except SiteDeclined as declined:
        _record(
            context,
            run_id,
            server_round,
            "declined",
            declined.reason,
            declined.details.get("epsilon_spent"),
        )
        raise
    _record(context, run_id, server_round, "trained", "", spent)
    return update


def _record(
    context: Context, run_id: str, server_round: int, outcome: str, reason: str, epsilon: object
) -> None:
    site_dir = str(context.node_config.get("site-dir", "") or "")
    if not site_dir:
        return
    from clients.site_status import record_activity

    with contextlib.suppress(OSError):  # a status file must never stop a round
        record_activity(
            site_dir,
            run_id=run_id,
            flower_run_id=context.run_id,
            server_round=server_round,
            outcome=outcome,
            reason=reason,
            epsilon=float(epsilon) if isinstance(epsilon, (int, float)) else None,
        )


def _compute_update(
    cfg: RunConfig,
    site: SiteData,
    global_arrays: ArrayRecord,
    config: ConfigRecord,
    context: Context,
    run_id: str,
    server_round: int,
) -> tuple[SiteUpdate, float | None]:
    """:func:`compute_update`'s work; also returns the site's ε after it (None without DP)."""
    from clients.site_policy import PolicyError, SitePolicy, policy_violation

    try:  # the site's own terms (site.yaml, via the node config), before anything trains
        policy = SitePolicy.from_node_config(context.node_config)
    except PolicyError as error:
        raise SiteDeclined(f"site policy unusable, failing closed: {error}") from None
    if reason := policy_violation(policy, cfg, server_round, site.schema.feature_names):
        raise SiteDeclined(reason)
    model = site_model(cfg, site, global_arrays)
    objective = build_objective(cfg.objective.name, cfg.objective.options, config)
    budget = None
    if sample_level_on(cfg):
        from clients.dp_training import train_local_dp
        from clients.site_privacy import BudgetRefusal, release_request_sha256, reserve_round
        from privacy.receipts import arrays_sha256

        try:
            budget = reserve_round(
                cfg,
                context.node_config,
                site.site_id,
                len(site.train.y),
                run_id,
                server_round,
                arrays_sha256(arrays_to_numpy(global_arrays)),
                request_sha256=release_request_sha256(cfg, config, rows_sha256(site)),
            )
        except BudgetRefusal as refusal:
            raise SiteDeclined(refusal.reason, **refusal.details) from None
        sampling_seed, noise_seed = budget.seeds()
        result = train_local_dp(
            model,
            site.train,
            cfg.train,
            budget.plan,
            sampling_seed=sampling_seed,
            noise_seed=noise_seed,
            grad_sample_mode=cfg.privacy.grad_sample_mode,
            objective=objective,
        )
    else:
        result = train_local(
            model,
            site.train,
            cfg.train,
            seed=site_round_seed(cfg.seed, server_round, site.site_id),
            objective=objective,
        )
    arrays = ArrayRecord(model.state_dict())
    if site_level_on(cfg):
        arrays = _site_level_release(cfg, global_arrays, arrays, config)
    receipt = None
    if budget is not None:  # BudgetRefusal, arrays_sha256: imported above with the budget
        try:
            signed = budget.release(arrays_sha256(arrays_to_numpy(arrays)))
        except BudgetRefusal as refusal:  # a retried round that would be a new, too large spend
            raise SiteDeclined(refusal.reason, **refusal.details) from None
        receipt = ConfigRecord(signed.to_record())
    spent = budget.spend.epsilon_after if budget is not None else None
    return SiteUpdate(arrays=arrays, metrics=_metrics(cfg, result), receipt=receipt), spent


def _metrics(cfg: RunConfig, result: TrainResult) -> MetricRecord:
    # Under site-level DP every site weighs the same (its update's norm bounds its influence), so
    # it reports weight 1 — which secure aggregation then uses as the site's weight in the sum.
    weight = 1 if site_level_on(cfg) else result.num_examples
    metrics: dict[str, int | float] = {keys.NUM_EXAMPLES: weight, "steps": result.steps}
    if cfg.privacy.name == "none":
        metrics["train_loss"] = result.train_loss
    return MetricRecord(metrics)


def _site_level_release(
    cfg: RunConfig,
    global_arrays: ArrayRecord,
    trained: ArrayRecord,
    config: ConfigRecord,
) -> ArrayRecord:
    """global + clip_C(trained − global), plus this site's noise share under secure aggregation.

    The noise share (std z·C/√t, t = ``dp-min-survivors`` in the round's config, the number of
    survivors secure aggregation guarantees before it unmasks) is drawn from the site's own
    secret randomness; without t the site refuses rather than release an un-noised update.
    """
    from collections import OrderedDict

    import numpy as np

    from privacy.site_dp import clip_update, gaussian_noise_like, noise_share_std

    start = arrays_to_numpy(global_arrays)
    local = arrays_to_numpy(trained)
    clipped, _ = clip_update(
        {name: local[name] - start[name] for name in start}, cfg.privacy.clipping_norm
    )
    if cfg.secagg.name != "off":
        survivors = int(config.get(keys.DP_MIN_SURVIVORS, 0))
        if survivors < 1:
            raise SiteDeclined(
                "site-level DP under secure aggregation needs the round's "
                f"'{keys.DP_MIN_SURVIVORS}' to size this site's noise share"
            )
        std = noise_share_std(
            cfg.privacy.site_noise_multiplier, cfg.privacy.clipping_norm, survivors
        )
        rng = np.random.default_rng()  # OS entropy: the server must not be able to predict it
        noise = gaussian_noise_like(clipped, std, rng)
        clipped = {name: clipped[name] + noise[name] for name in clipped}
    return ArrayRecord(
        OrderedDict(
            (name, torch.from_numpy(np.ascontiguousarray(start[name] + clipped[name])))
            for name in start
        )
    )
