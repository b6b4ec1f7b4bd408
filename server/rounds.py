"""The round loop: discover sites, sample, train, aggregate with the strategy, evaluate, record.

fedgov drives Flower's strategies through their own hooks (``configure_train`` /
``aggregate_train`` / ``configure_evaluate`` / ``aggregate_evaluate``) but owns the loop, because
it needs what ``Strategy.start`` does not give: seeded sampling by site id (Flower's node ids are
random per run), replies aggregated in a fixed order (same seed → same bits), per-site
participation, declines and failures recorded per round, and a short reply poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgov import messages as keys
from fedgov.config import RunConfig, to_flower_config
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


@dataclass
class SiteInfo:
    """A connected site as the server knows it: never more than its id and row counts."""

    site_id: str
    num_train: int
    num_test: int


@dataclass
class RoundRecord:
    """What happened in one round (one entry of ``metrics.json``'s ``rounds``)."""

    round: int
    participants: list[str]
    sites_connected: int = 0
    declined: list[str] = field(default_factory=list)
    decline_reasons: dict[str, str] = field(default_factory=dict)
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
    """The final global weights, the round records and the sites seen."""

    arrays: ArrayRecord
    rounds: list[RoundRecord]
    sites: dict[str, SiteInfo]


class SiteDirectory:
    """Maps Flower node ids to fedgov site ids, asking each new node who it is (a query message)."""

    def __init__(self, grid: Grid, timeout: float) -> None:
        self._grid = grid
        self._timeout = timeout
        self.by_node: dict[int, SiteInfo] = {}

    def refresh(self) -> None:
        """Query nodes that connected since the last call; forget nodes that left."""
        online = set(self._grid.get_node_ids())
        for node_id in list(self.by_node):
            if node_id not in online:
                del self.by_node[node_id]
        new = sorted(online - set(self.by_node))
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
            info = _site_info(reply)
            if info is None:
                log(WARNING, "node %s sent an unreadable site record; ignoring it",
                    reply.metadata.src_node_id)  # fmt: skip
                continue
            if info.site_id in known_ids:
                log(WARNING, "two nodes claim site id %s; ignoring node %s", info.site_id,
                    reply.metadata.src_node_id)  # fmt: skip
                continue
            known_ids.add(info.site_id)
            self.by_node[reply.metadata.src_node_id] = info

    def wait_for(self, count: int) -> None:
        """Block until ``count`` sites are known, or raise after the timeout."""
        deadline = time.monotonic() + self._timeout
        while True:
            self.refresh()
            if len(self.by_node) >= count:
                return
            if time.monotonic() > deadline:
                raise FedgovError(
                    f"federation: only {len(self.by_node)} of {count} sites connected within "
                    f"{self._timeout:.0f} s (federation.round_timeout)"
                )
            time.sleep(DISCOVERY_POLL_SECONDS)

    def node_of(self) -> dict[str, int]:
        return {info.site_id: node_id for node_id, info in self.by_node.items()}


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
    return SiteInfo(site_id, int(counts[0]), int(counts[1]))


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
) -> RunResult:
    """Run ``cfg.rounds`` rounds of federated training and evaluation.

    With ``cfg.output_dir`` set, the state after every round is checkpointed there; with
    ``resume_from`` the loop continues after that checkpoint's round (its weights, strategy and
    privacy state are the ones passed in).

    ``privacy`` (server/privacy_round.py), when DP is on: Poisson site sampling under site-level
    DP, receipts and declines kept per site, and the noisy DP-FedAvg aggregate.
    """
    fed = cfg.federation
    directory = SiteDirectory(grid, fed.round_timeout)
    directory.wait_for(fed.num_sites or fed.min_sites_per_round)
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
        good_eval = [reply for _, reply in eval_replies if _usable(check_evaluate_reply, reply)]
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
    return RunResult(arrays=arrays, rounds=records, sites=seen)


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
