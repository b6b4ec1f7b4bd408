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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
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
from server.privacy_round import PrivacyRound
from server.replies import (
    MAX_EXAMPLES,
    ReplyProblem,
    canonical,
    check_evaluate_reply,
    check_train_reply,
)
from server.sampling import sample_sites, sites_per_round
from server.secagg_round import PreparedSetup, run_secagg_round

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
                log(WARNING, "node %s failed discovery: %s", reply.metadata.src_node_id,
                    reply.error.reason)  # fmt: skip
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
                log(WARNING, "node %s sent an unreadable site record; ignoring it",
                    reply.metadata.src_node_id)  # fmt: skip
                continue
            site_id = info.site_id
            site_record = reply.content.config_records[keys.SITE]
            if (problem := self._schema_problem(site_record)) is not None:
                self._leave_out(node_id, site_id, problem)
                continue
            self.left_out.pop(site_id, None)  # fixed and back: it takes part again
            if info.site_id in known_ids:
                log(WARNING, "two nodes claim site id %s; ignoring node %s", info.site_id,
                    reply.metadata.src_node_id)  # fmt: skip
                continue
            known_ids.add(info.site_id)
            self.by_node[reply.metadata.src_node_id] = info

    def wait_for(self, count: int, progress: bool = True) -> None:
        """Block until ``count`` sites are known, or raise after the timeout.

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
                print(f"[fedgov] {self.waiting_line(count, deadline - now)}",
                      file=sys.stderr, flush=True)  # fmt: skip
                shown = (names, now)
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
    grid: Grid,
    cfg: RunConfig,
    strategy: Strategy,
    initial_arrays: ArrayRecord,
    central_evaluate: Callable[[ArrayRecord], EvalResult] | None,
    on_round: Callable[[RoundRecord], None] | None = None,
    privacy: PrivacyRound | None = None,
    resume_from: Checkpoint | None = None,
    run_id: str = "",
    schema_digest: str = "",
) -> RunResult:
    """Run ``cfg.rounds`` rounds of federated training and evaluation.

    With ``cfg.output_dir`` set, the state after every round is checkpointed there; with
    ``resume_from`` the loop continues after that checkpoint's round (its weights, strategy and
    privacy state are the ones passed in).

    ``privacy`` (server/privacy_round.py), when DP is on: Poisson site sampling under site-level
    DP, receipts and declines kept per site, and the noisy DP-FedAvg aggregate.

    ``schema_digest``: the federation schema's digest; a site answering discovery with another is
    left out (``RunResult.left_out``), as is a site that declines discovery.
    """
    fed = cfg.federation
    directory = SiteDirectory(grid, fed.round_timeout, schema_digest)
    directory.wait_for(fed.num_sites or fed.min_sites_per_round, progress=cfg.progress)
    if privacy is not None and sample_level_on(cfg):
        rounds_left = cfg.rounds - (resume_from.completed_round if resume_from else 0)
        _plan_budgets(cfg, directory, rounds_left, enforce=resume_from is None)
    arrays = initial_arrays
    records: list[RoundRecord] = list(resume_from.records) if resume_from else []
    seen: dict[str, SiteInfo] = dict(resume_from.sites) if resume_from else {}
    first_round = resume_from.completed_round + 1 if resume_from else 1
    prepared: PreparedSetup | None = None  # SecAgg+: this round's key stages, if pipelined
    for server_round in range(first_round, cfg.rounds + 1):
        started = time.monotonic()
        directory.refresh()
        seen.update({info.site_id: info for info in directory.by_node.values()})
        node_of = directory.node_of()
        count = sites_per_round(len(node_of), fed.sites_per_round, fed.min_sites_per_round)
        chosen = sample_sites(list(node_of), count, cfg.seed, server_round)
        if privacy is not None and (poisson := privacy.sample(list(node_of), count)) is not None:
            chosen = poisson  # site-level DP: Poisson sampling, accounted at its rate
        view = SampledGrid(grid, [node_of[site_id] for site_id in chosen])
        record = RoundRecord(round=server_round, participants=[], sites_connected=len(node_of))
        record.refused = directory.refusals()

        if cfg.secagg.name == "secaggplus":
            num_train = {site_id: info.num_train for site_id, info in seen.items()}
            # The next round's draw, if it is known now (seeded, not Poisson): its key stages
            # ride on this round's masked input and unmask, used if it draws the same sites.
            next_sites = (
                sample_sites(list(node_of), count, cfg.seed, server_round + 1)
                if server_round < cfg.rounds and (privacy is None or not privacy.site_level)
                else []
            )
            arrays, view, prepared = _train_secagg(
                grid, cfg, strategy, server_round, arrays, view, node_of, chosen, num_train, record,
                privacy, run_id, next_sites, prepared,
            )  # fmt: skip
        else:
            arrays = _train_plain(
                grid, fed.round_timeout, strategy, server_round, arrays, view, directory, chosen,
                record, privacy, run_id,
            )  # fmt: skip

        # A Flower strategy waits forever when shown no nodes (Poisson sampling can pick none).
        eval_msgs = (
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(), view)
            if list(view.get_node_ids())
            else []
        )
        eval_replies = _by_site(exchange(grid, eval_msgs, fed.round_timeout), directory)
        good_eval = [
            reply for _, reply in eval_replies
            if not reply.has_error() and keys.decline_reason(reply) is None
            and _usable(check_evaluate_reply, reply)
        ]  # fmt: skip
        if good_eval:
            eval_metrics = strategy.aggregate_evaluate(server_round, canonical(good_eval))
            record.eval_loss = _metric(eval_metrics, "eval_loss")
            record.eval_accuracy = _metric(eval_metrics, "eval_accuracy")
        if central_evaluate is not None:
            central = central_evaluate(arrays)
            record.central_eval_loss = central.loss
            record.central_eval_accuracy = central.accuracy
        record.seconds = time.monotonic() - started
        records.append(record)
        if cfg.output_dir:
            save_checkpoint(
                cfg.output_dir,
                Checkpoint(server_round, arrays, strategy, privacy, records, seen, run_id,
                           to_flower_config(cfg)),
            )  # fmt: skip
        if on_round is not None:
            on_round(record)
    return RunResult(arrays=arrays, rounds=records, sites=seen, left_out=dict(directory.left_out))


def _train_plain(
    grid: Grid,
    timeout: float,
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    view: Grid,
    directory: SiteDirectory,
    chosen: list[str],
    record: RoundRecord,
    privacy: PrivacyRound | None = None,
    run_id: str = "",
) -> ArrayRecord:
    """Train without secure aggregation: the strategy sees each site's weights."""
    train_msgs = (
        strategy.configure_train(server_round, arrays, keys.train_config(run_id), view)
        if chosen
        else []
    )
    train_replies = _by_site(exchange(grid, train_msgs, timeout), directory)
    answered = {site_id for site_id, _ in train_replies}
    record.failures.update({s: "no reply before the timeout" for s in chosen if s not in answered})
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
                log(WARNING, "round %d: site %s excluded: %s", server_round, site_id,
                    record.failures[site_id])  # fmt: skip
                continue
            good.append(reply)
            record.participants.append(site_id)
    good = canonical(good)
    if privacy is not None and privacy.aggregates:  # noise on every round, even an empty one
        new_arrays, _ = privacy.aggregate_train(server_round, arrays, good, strategy)
        arrays = new_arrays if new_arrays is not None else arrays
    elif good:
        new_arrays, train_metrics = strategy.aggregate_train(server_round, good)
        if new_arrays is not None:
            arrays = new_arrays
        record.train_loss = _metric(train_metrics, "train_loss")
    return arrays


def _train_secagg(
    grid: Grid,
    cfg: RunConfig,
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    view: SampledGrid,
    node_of: dict[str, int],
    chosen: list[str],
    num_train: dict[str, int],
    record: RoundRecord,
    privacy: PrivacyRound | None = None,
    run_id: str = "",
    next_sites: Sequence[str] = (),
    prepared: PreparedSetup | None = None,
) -> tuple[ArrayRecord, SampledGrid, PreparedSetup | None]:
    """Train under SecAgg+ (server/secagg_round.py); the strategy sees only the sum.

    Returns the new global weights, the sites to evaluate (the sampled ones minus those that
    stopped answering during the round) and the next round's key stages if they were pipelined.
    """
    outcome = run_secagg_round(
        grid, cfg, strategy, server_round, arrays, view, node_of, chosen, num_train, privacy,
        run_id, next_sites, prepared,
    )  # fmt: skip
    record.participants = outcome.participants
    record.declined = sorted(outcome.declined)
    record.decline_reasons = dict(sorted(outcome.declined.items()))
    record.dropouts = outcome.dropouts
    record.aborted, record.abort_reason = outcome.aborted, outcome.abort_reason
    record.secagg = outcome.summary
    record.train_loss = _metric(outcome.train_metrics, "train_loss")
    reachable = [node_of[s] for s in chosen if s not in outcome.unreachable]
    return (outcome.arrays or arrays), SampledGrid(grid, reachable), outcome.prepared_next


def round_as_dict(record: RoundRecord) -> dict[str, object]:
    """A round record as plain JSON-able data."""
    return asdict(record)
