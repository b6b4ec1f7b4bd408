"""The round loop: discover sites, sample, train, aggregate with the strategy, evaluate, record.

fedgov drives Flower's strategies through their own hooks (``configure_train`` /
``aggregate_train`` / ``configure_evaluate`` / ``aggregate_evaluate``) but owns the loop, because
it needs what ``Strategy.start`` does not give: seeded sampling by site id (Flower's node ids are
random per run), replies aggregated in a fixed order (same seed → same bits), per-site
participation, declines and failures recorded per round, and a short reply poll.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgov import messages as keys
from fedgov import site_query as keys_schema
from fedgov.config import RunConfig, sample_level_on, to_flower_config
from fedgov.errors import FedgovError
from fedgov.evaluation import EvalResult
from server.checkpoint import Checkpoint, save_checkpoint
from server.messaging import SampledGrid, exchange
from server.replies import (
    EVAL_IN_TRAIN,
    MAX_EXAMPLES,
    ReplyProblem,
    canonical,
    check_evaluate_reply,
    check_train_reply,
    evaluation_in,
)
from server.round_context import RoundContext, RoundPlan
from server.sampling import sample_sites, sites_per_round
from server.secagg_round import PreparedSetup, SecAggRound

DISCOVERY_POLL_SECONDS = 0.5
WAIT_REPORT_SECONDS = 30.0  # while waiting for sites, repeat the progress line this often


@dataclass
class SiteInfo:
    """A connected site as the server knows it: never more than its id and row counts."""

    site_id: str
    num_train: int
    num_test: int
    # The site's answer to the budget plan under DP-SGD (ε spent, cap, δ); None when not sent.
    budget: tuple[float, float, float] | None = None


@dataclass
class RoundRecord:
    """What happened in one round (one entry of ``metrics.json``'s ``rounds``)."""

    round: int
    participants: list[str]
    sites_connected: int = 0
    declined: list[str] = field(default_factory=list)
    decline_reasons: dict[str, str] = field(default_factory=dict)
    # Sites that refused to run this run's app at all (not approved there): site → reason.
    refused: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    central_eval_loss: float | None = None
    central_eval_accuracy: float | None = None
    seconds: float = 0.0
    # Secure aggregation: sites whose input is not in the sum (site → stage, reason), and a
    # round that could not finish securely (the global model is then kept).
    dropouts: dict[str, dict[str, str]] = field(default_factory=dict)
    aborted: bool = False
    abort_reason: str | None = None
    secagg: dict[str, object] | None = None
    # The sites asked to evaluate this round's output (its sample, less those that stopped
    # answering under SecAgg+); their answers come with the next round's train replies.
    eval_sites: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    """The final global weights, the round records, the sites seen and those left out."""

    arrays: ArrayRecord
    rounds: list[RoundRecord]
    sites: dict[str, SiteInfo]
    left_out: dict[str, str] = field(default_factory=dict)  # site id → why discovery left it out


def run_outcome(result: RunResult) -> dict[str, object]:
    """``{"trained": bool, "reason": str}``: whether any site's update reached the model.

    A run trained when some round that was not aborted had a participant; otherwise ``reason``
    is one line saying why (every round aborted, or what the sites answered).
    """
    if any(r.participants and not r.aborted for r in result.rounds):
        return {"trained": True, "reason": ""}
    total = len(result.rounds)
    if total and all(r.aborted for r in result.rounds):
        reasons = sorted({str(r.abort_reason) for r in result.rounds})
        why = "; ".join(reasons)
        return {"trained": False, "reason": f"run failed: all {total} rounds aborted ({why})"}
    answers: dict[str, str] = dict(result.left_out)
    for r in result.rounds:
        answers.update(r.decline_reasons)
        answers.update(r.failures)
    detail = "; ".join(f"{site}: {reason}" for site, reason in sorted(answers.items()))
    return {
        "trained": False,
        "reason": f"run failed: no site trained in {total} round(s)"
        + (f" ({detail})" if detail else ""),
    }


class SiteDirectory:
    """Maps Flower node ids to fedgov site ids, asking each new node who it is (a query message).

    A site whose schema digest differs from the federation's (``schema_digest``), or that declines
    the query (its data is invalid, too few rows), is left out of the run with its reason
    (``left_out``) and not asked again while its node stays connected.
    """

    def __init__(self, grid: Grid, timeout: float, schema_digest: str = "") -> None:
        self._grid = grid
        self._timeout = timeout
        self._schema_digest = schema_digest
        self.by_node: dict[int, SiteInfo] = {}
        self.left_out: dict[str, str] = {}  # site id → reason
        # Nodes whose site refused the run's app (clients/app_guard.py): not asked again.
        self.refused: dict[int, tuple[str, str]] = {}  # node id -> (site id, reason)
        self._left_out_nodes: set[int] = set()

    def _leave_out(self, node_id: int, site_id: str, reason: str) -> None:
        self._left_out_nodes.add(node_id)
        if self.left_out.get(site_id) != reason:
            print(f"[fedgov] site {site_id} left out: {reason}", file=sys.stderr, flush=True)
        self.left_out[site_id] = reason

    def _schema_problem(self, site: ConfigRecord) -> str | None:
        if not self._schema_digest:
            return None
        digest = str(site.get(keys_schema.SCHEMA_DIGEST, ""))
        if not digest:
            return "sent no schema digest (an older fedgov?)"
        if digest != self._schema_digest:
            return (
                f"its schema differs from the federation's (digest {digest[:12]}, expected "
                f"{self._schema_digest[:12]}): it must use the federation's schema.yaml"
            )
        return None

    def refresh(self) -> None:
        """Query nodes that connected since the last call; forget nodes that left."""
        online = set(self._grid.get_node_ids())
        for node_id in list(self.by_node):
            if node_id not in online:
                del self.by_node[node_id]
        self._left_out_nodes &= online
        new = sorted(online - set(self.by_node) - self._left_out_nodes - set(self.refused))
        if not new:
            return
        queries = [
            Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.QUERY)
            for node_id in new
        ]
        known_ids = {info.site_id for info in self.by_node.values()}
        for reply in exchange(self._grid, queries, self._timeout):
            if reply.has_error():
                log(
                    WARNING,
                    "node %s failed discovery: %s",
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            if keys.is_app_refusal(reply):
                site_id = keys.reply_site_id(reply) or f"node-{reply.metadata.src_node_id}"
                reason = keys.decline_reason(reply) or "refused the run's app"
                log(WARNING, "site %s refused: %s", site_id, reason)
                self.refused[reply.metadata.src_node_id] = (site_id, reason)
                continue
            node_id = reply.metadata.src_node_id
            if (declined := keys.decline_reason(reply)) is not None:
                site_id = keys.reply_site_id(reply) or f"node-{node_id}"
                self._leave_out(node_id, site_id, f"declined: {declined}")
                continue
            info = _site_info(reply)
            if info is None:
                log(
                    WARNING,
                    "node %s sent an unreadable site record; ignoring it",
                    reply.metadata.src_node_id,
                )
                continue
            site_id = info.site_id
            site_record = reply.content.config_records[keys.SITE]
            if (problem := self._schema_problem(site_record)) is not None:
                self._leave_out(node_id, site_id, problem)
                continue
            self.left_out.pop(site_id, None)  # fixed and back: it takes part again
            if info.site_id in known_ids:
                log(
                    WARNING,
                    "two nodes claim site id %s; ignoring node %s",
                    info.site_id,
                    reply.metadata.src_node_id,
                )
                continue
            known_ids.add(info.site_id)
            self.by_node[reply.metadata.src_node_id] = info

    def wait_for(self, count: int, progress: bool = True, required: bool = True) -> None:
        """Block until ``count`` sites are known; after the timeout raise (or, if not
        ``required``, say so in one line and return with the sites present).

        While waiting, a line says who is connected whenever that changes (and every
        ``WAIT_REPORT_SECONDS``); the timeout's error names the sites left out and why.
        """
        deadline = time.monotonic() + self._timeout
        shown: tuple[tuple[str, ...], float] | None = None
        while True:
            self.refresh()
            if len(self.by_node) >= count:
                return
            now = time.monotonic()
            names = tuple(sorted(info.site_id for info in self.by_node.values()))
            if progress and (
                shown is None or shown[0] != names or now - shown[1] >= WAIT_REPORT_SECONDS
            ):
                print(
                    f"[fedgov] {self.waiting_line(count, deadline - now)}",
                    file=sys.stderr,
                    flush=True,
                )
                shown = (names, now)
            if now > deadline and not required:
                print(
                    f"[fedgov] {len(self.by_node)} of {count} sites connected after "
                    f"{self._timeout:.0f} s (federation.round_timeout); the round goes on "
                    "with them",
                    file=sys.stderr,
                    flush=True,
                )
                return
            if now > deadline:
                left = "; ".join(f"{site}: {why}" for site, why in sorted(self.left_out.items()))
                refused = "; ".join(reason for _, reason in self.refused.values())
                raise FedgovError(
                    f"federation: only {len(self.by_node)} of {count} sites connected within "
                    f"{self._timeout:.0f} s (federation.round_timeout)"
                    + (f"; left out: {left}" if left else "")
                    + (f"; refused: {refused}" if refused else "")
                )
            time.sleep(DISCOVERY_POLL_SECONDS)

    def waiting_line(self, count: int, seconds_left: float) -> str:
        """``2 of 4 sites connected: hosp-a, hosp-b; waiting up to 600 s``."""
        names = sorted(info.site_id for info in self.by_node.values())
        listed = f": {', '.join(names)}" if names else ""
        left = f" ({len(self.left_out)} left out)" if self.left_out else ""
        return (
            f"{len(names)} of {count} sites connected{listed}{left}; waiting up to "
            f"{max(seconds_left, 0):.0f} s"
        )

    def refusals(self) -> dict[str, str]:
        """{site id: reason} of the sites that refused the run's app."""
        return {site_id: reason for site_id, reason in sorted(self.refused.values())}

    def node_of(self) -> dict[str, int]:
        return {info.site_id: node_id for node_id, info in self.by_node.items()}


def _plan_budgets(cfg: RunConfig, directory: SiteDirectory, rounds: int, enforce: bool) -> None:
    """Print each site's projected ε for the run against its remaining budget; refuse the run
    (ConfigError) past ``privacy.budget_share`` unless confirmed (privacy/planning.py)."""
    from privacy.planning import SiteBudget, check_budget_plan, plan_lines, plan_site

    plans = [
        plan_site(cfg, SiteBudget(info.site_id, info.num_train, *info.budget), rounds)
        for info in directory.by_node.values()
        if info.budget is not None
    ]
    for line in plan_lines(plans, rounds):
        print(f"[fedgov] {line}", file=sys.stderr, flush=True)
    if enforce:
        check_budget_plan(cfg, plans)


def _site_info(reply: Message) -> SiteInfo | None:
    """The site a query reply describes, or None when a field is missing or mistyped."""
    site_id = keys.reply_site_id(reply)
    record = reply.content.config_records.get(keys.SITE)
    counts = [record.get(name) for name in ("num-train", "num-test")] if record else []
    if (
        not site_id
        or len(counts) != 2
        or any(
            isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= MAX_EXAMPLES
            for c in counts
        )
    ):
        return None
    return SiteInfo(site_id, int(counts[0]), int(counts[1]), keys_schema.budget_of(record))


def _by_site(replies: list[Message], directory: SiteDirectory) -> list[tuple[str, Message]]:
    """Replies paired with their site id, sorted by site id (a fixed aggregation order)."""
    pairs = []
    for reply in replies:
        info = directory.by_node.get(reply.metadata.src_node_id)
        pairs.append((info.site_id if info else f"node-{reply.metadata.src_node_id}", reply))
    return sorted(pairs, key=lambda pair: pair[0])


def _usable(check: Callable[[Message], None], reply: Message) -> bool:
    try:
        check(reply)
    except ReplyProblem as problem:
        log(WARNING, "node %s: reply not used: %s", reply.metadata.src_node_id, problem)
        return False
    return True


def _metric(record: object, name: str) -> float | None:
    if record is None or name not in record:  # type: ignore[operator]
        return None
    return float(record[name])  # type: ignore[index]


def run_rounds(
    ctx: RoundContext,
    initial_arrays: ArrayRecord,
    central_evaluate: Callable[[ArrayRecord], EvalResult] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    resume_from: Checkpoint | None = None,
    schema_digest: str = "",
    on_round_end: Callable[[RoundRecord], None] | None = None,
) -> RunResult:
    """Run ``cfg.rounds`` rounds of federated training and evaluation.

    Each round sends one message per sampled site: the train message, which also asks the sites
    that should evaluate the previous round's output to do so first (``evaluate-first``). So
    round r's federated evaluation arrives with round r+1's train replies, and after the last
    round one evaluate message goes to the last round's sites. A site that sent no eval metrics
    (an older app ignoring the flag, an error) or was not sampled again is asked with an
    evaluate message (in the same exchange as the train messages where the round is not
    SecAgg+); one that did not answer at all is not asked again. ``on_round`` sees a record once
    its evaluation is in, ``on_round_end`` as its round ends (before the next round's spending).

    With ``cfg.output_dir`` set, the state after every round is checkpointed there; with
    ``resume_from`` the loop continues after that checkpoint's round (its weights, strategy and
    privacy state are the ones in ``ctx``), evaluating the checkpoint's round first.

    ``ctx.privacy`` (server/privacy_round.py), when DP is on: Poisson site sampling under
    site-level DP, receipts and declines kept per site, and the noisy DP-FedAvg aggregate.

    ``schema_digest``: the federation schema's digest; a site answering discovery with another is
    left out (``RunResult.left_out``), as is a site that declines discovery.
    """
    directory = _discover(ctx, resume_from, schema_digest)
    run = _RunState.start(initial_arrays, resume_from)
    for server_round in range(run.first_round, ctx.cfg.rounds + 1):
        started = time.monotonic()
        plan = _plan_round(ctx, directory, run, server_round)
        record = RoundRecord(
            round=server_round,
            participants=[],
            sites_connected=len(plan.node_of),
            refused=directory.refusals(),
        )
        if ctx.cfg.secagg.name == "secaggplus":
            trained = _train_secagg(ctx, plan, record, run)
        else:
            trained = _train_plain(ctx, plan, record, directory, run.pending)
        _evaluate(ctx, run.pending, trained.evaluations, directory, plan.node_of)
        _complete(run.pending, on_round)
        run.arrays = trained.arrays
        record.eval_sites = trained.eval_sites
        if central_evaluate is not None:
            central = central_evaluate(run.arrays)
            record.central_eval_loss, record.central_eval_accuracy = central.loss, central.accuracy
        record.seconds = time.monotonic() - started
        _keep(ctx, run, record)
        if on_round_end is not None:
            on_round_end(record)
    _evaluate(ctx, run.pending, {}, directory, directory.node_of())
    _complete(run.pending, on_round)
    return RunResult(run.arrays, run.records, run.seen, left_out=dict(directory.left_out))


@dataclass
class PendingEvaluation:
    """A round whose output the sites have not evaluated yet: its record (``eval_sites`` are the
    sites to ask: the round's sample, less those that stopped answering) and its weights."""

    record: RoundRecord
    arrays: ArrayRecord


# site → its evaluate reply (from a train reply's eval metrics or an evaluate message), or None:
# asked, no answer before the timeout (not asked again).
Evaluations = dict[str, Message | None]


@dataclass
class TrainResult:
    """One round's training: the new weights, the sites to evaluate them, and the evaluations
    of the previous round's output that came back with this round's messages."""

    arrays: ArrayRecord
    eval_sites: list[str]
    evaluations: Evaluations = field(default_factory=dict)


@dataclass
class _RunState:
    """What the loop carries from round to round."""

    arrays: ArrayRecord
    records: list[RoundRecord]
    seen: dict[str, SiteInfo]
    first_round: int
    pending: PendingEvaluation | None = None
    prepared: PreparedSetup | None = None  # SecAgg+: this round's key stages, if pipelined

    @classmethod
    def start(cls, arrays: ArrayRecord, resume_from: Checkpoint | None) -> _RunState:
        if resume_from is None:
            return cls(arrays, [], {}, first_round=1)
        records = list(resume_from.records)
        # A checkpoint is written before its round's evaluation comes back: evaluate it now
        # (one written before eval_sites existed was evaluated before it was written).
        evaluated = bool(records) and not hasattr(records[-1], "eval_sites")
        for record in records:
            record.__dict__.setdefault("eval_sites", [])
        pending = PendingEvaluation(records[-1], resume_from.arrays) if records else None
        pending = None if evaluated else pending
        return cls(
            arrays, records, dict(resume_from.sites), resume_from.completed_round + 1, pending
        )


def _discover(
    ctx: RoundContext, resume_from: Checkpoint | None, schema_digest: str
) -> SiteDirectory:
    """Wait for the sites; under DP-SGD, plan (and check) their budgets for the rounds left."""
    cfg, fed = ctx.cfg, ctx.cfg.federation
    directory = SiteDirectory(ctx.grid, fed.round_timeout, schema_digest)
    directory.wait_for(fed.num_sites or fed.min_sites_per_round, progress=cfg.progress)
    if ctx.privacy is not None and sample_level_on(cfg):
        rounds_left = cfg.rounds - (resume_from.completed_round if resume_from else 0)
        _plan_budgets(cfg, directory, rounds_left, enforce=resume_from is None)
    return directory


def _plan_round(
    ctx: RoundContext, directory: SiteDirectory, run: _RunState, server_round: int
) -> RoundPlan:
    """Refresh the connected sites (waiting for ``min_available_sites``) and sample this round's
    (seeded; Poisson under site-level DP)."""
    if ctx.cfg.federation.min_available_sites:
        wanted = ctx.cfg.federation.min_available_sites
        directory.wait_for(wanted, progress=ctx.cfg.progress, required=False)
    else:
        directory.refresh()
    run.seen.update({info.site_id: info for info in directory.by_node.values()})
    node_of = directory.node_of()
    chosen = sample_sites(list(node_of), _per_round(ctx, node_of), ctx.cfg.seed, server_round)
    if ctx.privacy is not None:
        poisson = ctx.privacy.sample(list(node_of), _per_round(ctx, node_of))
        chosen = poisson if poisson is not None else chosen  # accounted at its rate
    view = SampledGrid(ctx.grid, [node_of[site_id] for site_id in chosen])
    return RoundPlan(server_round, run.arrays, view, node_of, chosen)


def _per_round(ctx: RoundContext, node_of: Mapping[str, int]) -> int:
    fed = ctx.cfg.federation
    return sites_per_round(len(node_of), fed.sites_per_round, fed.min_sites_per_round)


def _train_plain(
    ctx: RoundContext,
    plan: RoundPlan,
    record: RoundRecord,
    directory: SiteDirectory,
    pending: PendingEvaluation | None = None,
) -> TrainResult:
    """Train without secure aggregation: the strategy sees each site's weights.

    One exchange: the train messages (asking the sites of ``pending`` to evaluate first) and
    an evaluate message for each site of ``pending`` not sampled this round.
    """
    strategy, server_round, arrays = ctx.strategy, plan.server_round, plan.arrays
    asked = set(pending.record.eval_sites) if pending is not None else set()
    train_msgs = (
        strategy.configure_train(server_round, arrays, keys.train_config(ctx.run_id), plan.view)
        if plan.chosen
        else []
    )
    _ask_evaluation(train_msgs, {plan.node_of[s] for s in asked if s in plan.chosen})
    not_sampled = [s for s in sorted(asked) if s not in plan.chosen and s in plan.node_of]
    eval_msgs = _evaluate_messages(ctx, pending, not_sampled, plan.node_of)
    replies = _by_site(exchange(ctx.grid, train_msgs + eval_msgs, ctx.timeout), directory)
    evaluations: Evaluations = {s: None for s in asked if s in plan.chosen or s in not_sampled}
    train_replies = []
    for site_id, reply in replies:
        if reply.metadata.message_type == MessageType.EVALUATE:
            evaluations[site_id] = reply
            continue
        train_replies.append((site_id, reply))
        if site_id in asked:
            metrics = None if reply.has_error() else reply.content.metric_records.get(keys.METRICS)
            evaluation = evaluation_in(metrics, pending.record.round) if pending else None
            if evaluation is None:
                del evaluations[site_id]  # it sent none: asked with an evaluate message
            else:
                evaluations[site_id] = evaluation
    answered = {site_id for site_id, _ in train_replies}
    record.failures.update(
        {s: "no reply before the timeout" for s in plan.chosen if s not in answered}
    )
    arrays = _aggregate_plain(ctx, plan, record, train_replies)
    return TrainResult(arrays, list(plan.chosen), evaluations)


def _aggregate_plain(
    ctx: RoundContext,
    plan: RoundPlan,
    record: RoundRecord,
    train_replies: list[tuple[str, Message]],
) -> ArrayRecord:
    """Record each site's train reply (used, declined or failed) and aggregate the good ones."""
    privacy, server_round, arrays = ctx.privacy, plan.server_round, plan.arrays
    # receipts, declines with ε and cap; an unreadable receipt or decline excludes its site
    unreadable = privacy.observe_train(server_round, train_replies) if privacy is not None else {}
    good: list[Message] = []
    for site_id, reply in train_replies:
        if reply.has_error():
            record.failures[site_id] = keys.bounded(reply.error.reason)
        elif (reason := keys.decline_reason(reply)) is not None:
            record.declined.append(site_id)
            record.decline_reasons[site_id] = reason
        elif site_id in unreadable:
            record.failures[site_id] = unreadable[site_id]
        else:
            try:
                check_train_reply(reply, arrays)
            except ReplyProblem as problem:  # one site's bytes never fail the round
                record.failures[site_id] = f"malformed train reply: {problem}"
                log(
                    WARNING,
                    "round %d: site %s excluded: %s",
                    server_round,
                    site_id,
                    record.failures[site_id],
                )
                continue
            good.append(reply)
            record.participants.append(site_id)
    good = canonical(good, drop=EVAL_IN_TRAIN)
    if privacy is not None and privacy.aggregates:  # noise on every round, even an empty one
        new_arrays, _ = privacy.aggregate_train(server_round, arrays, good, ctx.strategy)
        arrays = new_arrays if new_arrays is not None else arrays
    elif good:
        new_arrays, train_metrics = ctx.strategy.aggregate_train(server_round, good)
        if new_arrays is not None:
            arrays = new_arrays
        record.train_loss = _metric(train_metrics, "train_loss")
    return arrays


def _train_secagg(
    ctx: RoundContext, plan: RoundPlan, record: RoundRecord, run: _RunState
) -> TrainResult:
    """Train under SecAgg+ (server/secagg_round.py); the strategy sees only the sum.

    The sites of ``run.pending`` sampled this round evaluate first (their masked-input replies
    carry the eval metrics in the clear, as an evaluate reply would); the rest are asked after.
    Keeps the next round's key stages in ``run.prepared`` if they were pipelined.
    """
    cfg, server_round, node_of = ctx.cfg, plan.server_round, plan.node_of
    num_train = {site_id: info.num_train for site_id, info in run.seen.items()}
    # The next round's draw, if it is known now (seeded, not Poisson): its key stages ride on
    # this round's masked-input and unmask exchanges, used if it draws the same sites.
    next_sites = (
        sample_sites(list(node_of), _per_round(ctx, node_of), cfg.seed, server_round + 1)
        if server_round < cfg.rounds and (ctx.privacy is None or not ctx.privacy.site_level)
        else []
    )
    pending = run.pending
    asked = [s for s in pending.record.eval_sites if s in plan.chosen] if pending else []
    strategy = _EvaluateFirst(ctx.strategy, {node_of[s] for s in asked}) if asked else ctx.strategy
    outcome = SecAggRound(
        replace(ctx, strategy=strategy), plan, num_train, next_sites, run.prepared
    ).run()
    run.prepared = outcome.prepared_next
    record.participants = outcome.participants
    record.declined = sorted(outcome.declined)
    record.decline_reasons = dict(sorted(outcome.declined.items()))
    record.dropouts = outcome.dropouts
    record.aborted, record.abort_reason = outcome.aborted, outcome.abort_reason
    record.secagg = outcome.summary
    record.train_loss = _metric(outcome.train_metrics, "train_loss")
    evaluations: Evaluations = {}
    for site_id in asked:
        evaluation = evaluation_in(outcome.site_metrics.get(site_id), server_round - 1)
        if evaluation is not None:
            evaluations[site_id] = evaluation
        elif site_id in outcome.unreachable:
            evaluations[site_id] = None  # stopped answering: not asked again
    reachable = [s for s in plan.chosen if s not in outcome.unreachable]
    return TrainResult(outcome.arrays or plan.arrays, reachable, evaluations)


class _EvaluateFirst(Strategy):
    """``strategy`` whose train messages to ``nodes`` also ask for the received model's
    evaluation (``evaluate-first``); everything else is the strategy's own."""

    def __init__(self, strategy: Strategy, nodes: set[int]) -> None:
        self._strategy, self._nodes = strategy, nodes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self._strategy.configure_train(server_round, arrays, config, grid))
        _ask_evaluation(messages, self._nodes)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self._strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self._strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self._strategy.summary()


def _ask_evaluation(messages: Sequence[Message], nodes: Collection[int]) -> None:
    """Set ``evaluate-first`` in the train config of the messages to ``nodes`` (each gets its
    own content: a Flower strategy's messages share one)."""
    for message in messages:
        if message.metadata.dst_node_id in nodes:
            config = ConfigRecord(dict(message.content.config_records.get(keys.CONFIG, {})))
            config[keys.EVALUATE_FIRST] = True
            message.content = RecordDict({**dict(message.content.items()), keys.CONFIG: config})


def _evaluate_messages(
    ctx: RoundContext,
    pending: PendingEvaluation | None,
    sites: Sequence[str],
    node_of: Mapping[str, int],
) -> list[Message]:
    """The strategy's evaluate messages of ``pending``'s weights to ``sites``."""
    if pending is None or not sites:  # a Flower strategy waits forever when shown no nodes
        return []
    view = SampledGrid(ctx.grid, [node_of[site_id] for site_id in sites])
    return ctx.strategy.configure_evaluate(
        pending.record.round, pending.arrays, ConfigRecord(), view
    )


def _evaluate(
    ctx: RoundContext,
    pending: PendingEvaluation | None,
    evaluations: Evaluations,
    directory: SiteDirectory,
    node_of: Mapping[str, int],
) -> None:
    """Fill ``pending``'s record with the weighted eval metrics of its sites: those in
    ``evaluations``, and (one exchange) an evaluate message to each other one still connected."""
    if pending is None:
        return
    evaluations = dict(evaluations)
    ask = [s for s in pending.record.eval_sites if s not in evaluations and s in node_of]
    messages = _evaluate_messages(ctx, pending, ask, node_of)
    if messages:
        evaluations.update(_by_site(exchange(ctx.grid, messages, ctx.timeout), directory))
    good = [
        reply
        for _, reply in sorted(evaluations.items())
        if reply is not None
        and not reply.has_error()
        and keys.decline_reason(reply) is None
        and _usable(check_evaluate_reply, reply)
    ]
    if good:
        eval_metrics = ctx.strategy.aggregate_evaluate(pending.record.round, canonical(good))
        pending.record.eval_loss = _metric(eval_metrics, keys.EVAL_LOSS)
        pending.record.eval_accuracy = _metric(eval_metrics, keys.EVAL_ACCURACY)


def _complete(
    pending: PendingEvaluation | None, on_round: Callable[[RoundRecord], None] | None
) -> None:
    """Hand a record whose evaluation is in to ``on_round``."""
    if pending is not None and on_round is not None:
        on_round(pending.record)


def _keep(ctx: RoundContext, run: _RunState, record: RoundRecord) -> None:
    """Add the round's record (its evaluation pending) and checkpoint the run's state."""
    run.records.append(record)
    run.pending = PendingEvaluation(record, run.arrays)
    if ctx.cfg.output_dir:
        save_checkpoint(
            ctx.cfg.output_dir,
            Checkpoint(
                record.round,
                run.arrays,
                ctx.strategy,
                ctx.privacy,
                run.records,
                run.seen,
                ctx.run_id,
                to_flower_config(ctx.cfg),
            ),
        )


def round_as_dict(record: RoundRecord) -> dict[str, object]:
    """A round record as plain JSON-able data."""
    return asdict(record)
