"""One training round under SecAgg+: four Message exchanges, then the strategy sees only the sum.

Pipelining: when the next round's sites are known in advance (seeded sampling, not site-level
DP's Poisson draw), its two key stages ride on this round's two last exchanges: its setup (fresh
keys, advertised) on the masked-input exchange, its share distribution on the unmask exchange.
Each site sampled next round gets the next round's request inside this round's request, or on
its own in the same batch; the answers are kept as a :class:`PreparedSetup`. The next round uses
it only if it samples exactly those sites at the same nodes with the same weight scale; else it
runs its own key stages. A steady SecAgg+ round so costs one exchange more than a plain round
(the unmasking), not three. A round that aborts before its unmasking leaves the next round with
its setup done and its share distribution still to run.

``run_rounds`` branches here when ``secagg.name`` is ``secaggplus``. The stages (see
``privacy.secagg.protocol``) run over the sampled sites; a site that does not answer in time,
answers with an error, refuses, or sends anything malformed (another round's reply, a share that
does not open, a masked vector of the wrong length or dtype, a weight above ``secagg.max_weight``)
is excluded from the sum as a dropout, with the stage and reason in ``metrics.json``. With fewer
than t sites left, or a secret that cannot be rebuilt, the round is *aborted*: the global model
stays as it was and the round record says ``aborted`` with the reason.

The unmasked ring sum becomes the weighted mean update Σ w_i·u_i / Σ w_i of the survivors'
clipped updates; the global weights plus that mean, with weight Σ w_i, go to
``strategy.aggregate_train`` as the round's one reply, so FedAvg/FedProx keep it and FedAdam
applies its server optimiser to it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgov import messages as keys
from fedgov.config import RunConfig, site_level_on
from fedgov.errors import ConfigError
from privacy.secagg import records
from privacy.secagg.layout import VectorLayout
from privacy.secagg.protocol import (
    ABORT,
    MASKED_INPUT,
    SETUP,
    SHARE_KEYS,
    UNMASK,
    RoundAborted,
)
from privacy.secagg.quantise import dequantise_mean, mean_error_bound
from privacy.secagg.roster import RosterError, config_digest, model_digest, roster_sites
from privacy.secagg.server import SecAggSettings, ServerSecAgg
from server.messaging import exchange
from server.privacy_round import PrivacyRound

T = TypeVar("T")
MAX_REASON_CHARS = 300
# The key stages take milliseconds at a site: poll for their replies at least every 20 ms.
STAGE_MAX_POLL_SECONDS = 0.02
ABORT_NOTICE_SECONDS = 30.0  # at most this long for the sites to confirm an abort notice


@dataclass
class SecAggRoundResult:
    """What one SecAgg+ round produced, for the round loop to record."""

    arrays: ArrayRecord | None = None  # the new global weights (None: keep the old ones)
    train_metrics: MetricRecord | None = None
    participants: list[str] = field(default_factory=list)  # the survivors: inputs in the sum
    declined: dict[str, str] = field(default_factory=dict)  # site → reason (SiteDeclined)
    dropouts: dict[str, dict[str, str]] = field(default_factory=dict)  # site → stage, reason
    unreachable: set[str] = field(default_factory=set)  # stopped answering: not evaluated
    aborted: bool = False
    abort_reason: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # metrics.json "secagg" entry
    prepared_next: PreparedSetup | None = None  # the next round's key stages, if pipelined
    # site → the plaintext METRICS of its masked-input reply (train metrics, and the received
    # model's eval metrics when asked: server/rounds.py reads those)
    site_metrics: dict[str, MetricRecord] = field(default_factory=dict)


@dataclass
class PreparedSetup:
    """A round whose key stages ran during the previous round's last two exchanges."""

    server: ServerSecAgg  # adverts (and, if ``shared``, ciphertexts) received; dropouts recorded
    sites: list[str]  # sorted: index i is sites[i - 1]
    node_of: dict[str, int]  # the node each site was reached at
    weight_scale: int  # the scale asked for (the rows the sites reported when they joined)
    shared: bool = False  # the share distribution ran too

    def node_at(self, index: int) -> int:
        """The node of the site with ``index`` in this round (1-based)."""
        return self.node_of[self.sites[index - 1]]

    def fits(self, server_round: int, sites: list[str], node_of: Mapping[str, int], scale: int):
        """Whether the round about to start is the one this setup was for."""
        return (
            self.server.server_round == server_round
            and self.sites == sites
            and all(node_of.get(site) == self.node_of[site] for site in sites)
            and self.weight_scale == scale
        )


def settings_of(cfg: RunConfig) -> SecAggSettings:
    s = cfg.secagg
    signed_roster = b""
    if s.roster:
        try:
            signed_roster = Path(s.roster).read_bytes()
            roster_sites(signed_roster)
        except (OSError, RosterError) as error:
            raise ConfigError(f"secagg.roster: {s.roster}: {error}") from None
    return SecAggSettings(
        threshold=s.threshold,
        neighbours=s.neighbours,
        clip_range=s.clip_range,
        bits=s.bits,
        max_weight=s.max_weight,
        roster=signed_roster,
    )


def run_secagg_round(
    grid: Grid,
    cfg: RunConfig,
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    view: Grid,
    node_of: Mapping[str, int],
    sites: list[str],
    num_train: Mapping[str, int] | None = None,
    privacy: PrivacyRound | None = None,
    run_id: str = "",
    next_sites: Sequence[str] = (),
    prepared: PreparedSetup | None = None,
) -> SecAggRoundResult:
    """Run the four SecAgg+ stages over ``sites`` and aggregate the unmasked sum.

    ``num_train``: the row counts the sites reported when they joined; the largest (capped at
    ``secagg.max_weight``) is the round's weight scale.
    ``privacy`` (server/privacy_round.py): under site-level DP each site adds a noise share sized
    for ``dp-min-survivors`` survivors (sent in the train config); with fewer survivors the
    privacy policy decides, before anything is unmasked, to abort or to account the smaller noise.
    Receipts and declines of the masked-input replies are kept as for a plain train reply.
    ``next_sites``: the next round's sample, whose key stages then ride on this round's masked
    input and unmask exchanges (``result.prepared_next``); ``prepared``: this round's key stages,
    if they were pipelined.
    """
    sites = sorted(sites)
    timeout = cfg.secagg.timeout or cfg.federation.round_timeout
    index_of = {site: i for i, site in enumerate(sites, start=1)}
    site_of = {i: site for site, i in index_of.items()}
    node_index = {node_of[site]: index_of[site] for site in sites}
    layout = VectorLayout.of(arrays)
    result = SecAggRoundResult()
    timings: dict[str, float] = {}
    server: ServerSecAgg | None = None
    silent_at_unmask: set[int] = set()
    unmask_problems: dict[str, str] = {}  # site → why its unmask reply was not used
    declined: set[int] = set()
    moved_on: set[int] = set()  # nodes of sites that went on to the next round (pipelining)
    pipelined: list[str] = []  # this round's stages that rode on the last round's exchanges
    site_metrics: dict[int, MetricRecord] = {}

    def send_to_nodes(
        stage: str, contents: Mapping[int, tuple[str, RecordDict]], wait: float | None = None
    ) -> dict[int, Message]:
        """node id → (stage of the message, content); the first reply of each node asked."""
        started = time.monotonic()
        messages = [
            Message(
                content,
                dst_node_id=node,
                message_type=records.MESSAGE_TYPES[message_stage],
                group_id=str(server_round),
            )
            for node, (message_stage, content) in sorted(contents.items())
        ]
        replies: dict[int, Message] = {}
        for reply in exchange(grid, messages, wait or timeout, max_poll=STAGE_MAX_POLL_SECONDS):
            node = reply.metadata.src_node_id
            if node in contents and node not in replies:
                replies[node] = reply
        timings[stage] = round(time.monotonic() - started, 3)
        return replies

    def send(
        stage: str, contents: Mapping[int, RecordDict], wait: float | None = None
    ) -> dict[int, Message]:
        """Site index → content, all of ``stage``; the replies by site index."""
        by_node = {node_of[site_of[i]]: (stage, content) for i, content in contents.items()}
        replies = send_to_nodes(stage, by_node, wait)
        return {node_index[node]: reply for node, reply in replies.items()}

    def parsed(
        stage: str,
        replies: Mapping[int, Message],
        parse: Callable[[RecordDict, int], T],
        of: ServerSecAgg | None = None,
    ) -> dict[int, T]:
        """Valid replies of ``stage``; every other site asked is dropped with the reason.

        ``of``: the round the replies belong to (default: this one).
        """
        of = of or server
        assert of is not None
        good: dict[int, T] = {}
        for index, reply in sorted(replies.items()):
            if reply.has_error():
                of.drop(index, stage, _one_line(f"error: {reply.error.reason}"))
                continue
            if stage == MASKED_INPUT and (reason := keys.decline_reason(reply)) is not None:
                declined.add(index)
                result.declined[site_of[index]] = reason
                of.drop(index, stage, f"declined: {reason}", reachable=True)
                continue
            try:
                good[index] = parse(reply.content, index)
            except records.MalformedReply as error:
                of.drop(index, stage, _one_line(str(error)), reachable=True)
            except Exception as error:  # never let one site's bytes crash the round
                of.drop(index, stage, _one_line(f"unreadable reply: {error!r}"), True)
        return good

    try:
        scale = _weight_scale(cfg, sites, num_train)
        if prepared is not None and prepared.fits(server_round, sites, node_of, scale):
            server = prepared.server  # 1. setup: done during the last round's masked input
            pipelined = [SETUP, SHARE_KEYS] if prepared.shared else [SETUP]
            timings.update(dict.fromkeys(pipelined, 0.0))
        else:
            server = ServerSecAgg(
                len(sites), settings_of(cfg), layout.length, server_round, weight_scale=scale,
                site_ids=tuple(sites),
            )  # fmt: skip
            # 1. setup: keys and commitments
            requests = {i: records.setup_request_record(server.setup_request(i))
                        for i in server.alive()}  # fmt: skip
            replies = send(SETUP, {i: _content(request) for i, request in requests.items()})
            server.receive_adverts(
                parsed(SETUP, replies, lambda c, i: records.parse_advert(c, server.round_id, i))
            )
        round_id = server.round_id

        # 2. share keys: encrypted Shamir shares for the neighbours
        if SHARE_KEYS not in pipelined:
            replies = send(
                SHARE_KEYS,
                {i: _content(records.share_keys_request_record(server.share_keys_request(i)))
                 for i in server.alive()},
            )  # fmt: skip
            server.receive_ciphertexts(
                parsed(SHARE_KEYS, replies, lambda c, i: records.parse_ciphertexts(c, round_id, i))
            )

        # 3. masked input: the strategy's train message plus the shares each site receives,
        # and the next round's setup in the same batch
        train_content = _train_contents(strategy, server_round, arrays, view, run_id)
        dp_survivors = _dp_min_survivors(cfg, privacy, len(sites))
        contents: dict[int, RecordDict] = {}
        global_digest = b""
        for i in server.alive():
            content = train_content.get(node_of[site_of[i]])
            if content is None:
                server.drop(i, MASKED_INPUT, "the strategy sent it no train message", True)
                continue
            request = records.masked_input_request_record(server.masked_input_request(i))
            contents[i] = RecordDict({**dict(content.items()), records.SECAGG: request})
            if dp_survivors:
                config = ConfigRecord(dict(content.config_records.get(keys.CONFIG, {})))
                config[keys.DP_MIN_SURVIVORS] = dp_survivors
                contents[i][keys.CONFIG] = config
            if server.settings.roster:  # what each site signs it trained from (roster.py)
                global_digest = global_digest or roster_model_digest(arrays)
                train_config = dict(contents[i].config_records.get(keys.CONFIG, {}))
                server.expected_contribution[i] = (global_digest, config_digest(train_config))
        batch = {node_of[site_of[i]]: (MASKED_INPUT, content) for i, content in contents.items()}
        upcoming = _next_setup(cfg, server_round + 1, next_sites, num_train, layout, node_of)
        if upcoming is not None:
            _attach_next(batch, upcoming, SETUP, upcoming.server.setup_request,
                         records.setup_request_record)  # fmt: skip
        node_replies = send_to_nodes(MASKED_INPUT, batch)
        replies = _of_this_round(node_replies, node_index, contents)
        if upcoming is not None:
            result.prepared_next = upcoming = _receive_next(
                upcoming, SETUP, batch, node_replies, parsed, records.parse_advert,
                upcoming.server.receive_adverts,
            )  # fmt: skip
        if privacy is not None:  # receipts and declines, as for a plain train reply
            for i, reply in sorted(replies.items()):
                # a broken receipt excludes its site, never the round
                for reason in privacy.observe_train(server_round, [(site_of[i], reply)]).values():
                    server.drop(i, MASKED_INPUT, reason, reachable=True)

        def parse_input(content: RecordDict, index: int):
            masked = records.parse_masked_input(content, round_id, index)
            metrics = content.metric_records.get(keys.METRICS)
            site_metrics[index] = metrics if metrics is not None else MetricRecord()
            result.site_metrics[site_of[index]] = site_metrics[index]
            return masked

        server.receive_masked_inputs(parsed(MASKED_INPUT, replies, parse_input))
        if dp_survivors and privacy is not None:
            survivors = len(server.alive())
            if not privacy.account_secure_round(server_round, len(sites), survivors, dp_survivors):
                raise RoundAborted(
                    MASKED_INPUT,
                    f"{survivors} survivors, fewer than the {dp_survivors} the sites sized their "
                    "DP noise for (privacy.secagg_dropout=abort): not unmasked",
                )

        # 4. unmask: shares of the survivors' self masks and of the dropped sites' mask keys,
        # and the next round's share distribution in the same batch
        request = records.unmask_request_record(server.unmask_request())
        targets = server.unmask_targets()
        batch = {node_of[site_of[i]]: (UNMASK, _content(request)) for i in targets}
        if upcoming is not None:
            _attach_next(batch, upcoming, SHARE_KEYS, upcoming.server.share_keys_request,
                         records.share_keys_request_record)  # fmt: skip
            moved_on = {upcoming.node_at(j) for j in upcoming.server.alive()}
        node_replies = send_to_nodes(UNMASK, batch)
        replies = _of_this_round(node_replies, node_index, targets)
        if upcoming is not None:
            result.prepared_next = _receive_next(
                upcoming, SHARE_KEYS, batch, node_replies, parsed, records.parse_ciphertexts,
                upcoming.server.receive_ciphertexts,
            )  # fmt: skip
            if result.prepared_next is not None:
                result.prepared_next.shared = True
        silent_at_unmask = {i for i in targets if i not in replies}
        shares = {}
        for index, reply in sorted(replies.items()):
            try:
                if reply.has_error():
                    raise records.MalformedReply(f"error: {reply.error.reason}")
                shares[index] = records.parse_unmask_shares(reply.content, round_id, index)
            except Exception as error:  # its shares are not needed if enough others answer
                unmask_problems[site_of[index]] = _one_line(str(error))
                log(WARNING, "secagg round %d: site %s's unmask reply ignored: %s",
                    server_round, site_of[index], unmask_problems[site_of[index]])  # fmt: skip
        started = time.monotonic()
        unmasked = server.finish(shares)
        timings["unmask-compute"] = round(time.monotonic() - started, 3)
    except RoundAborted as aborted:
        result.aborted = True
        result.abort_reason = f"{aborted.stage}: {aborted.reason}"
        log(WARNING, "secagg round %d aborted at %s: %s (the global model is kept)",
            server_round, aborted.stage, aborted.reason)  # fmt: skip
        unmasked = None
        if server is not None:  # the sites still answering wipe the round's secrets now
            notice = _content(records.abort_record(server.round_id, result.abort_reason))
            # A site asked for the next round's shares has already left this one and its secrets.
            told = [
                i for i in server.sites
                if i not in server.unreachable and node_of[site_of[i]] not in moved_on
            ]  # fmt: skip
            send(ABORT, {i: notice for i in told}, min(timeout, ABORT_NOTICE_SECONDS))

    if server is not None:
        for index, dropout in sorted(server.dropouts.items()):
            if index in declined:
                continue
            result.dropouts[site_of[index]] = {"stage": dropout.stage, "reason": dropout.reason}
            log(WARNING, "secagg round %d: site %s excluded at %s: %s",
                server_round, site_of[index], dropout.stage, dropout.reason)  # fmt: skip
        result.unreachable = {site_of[i] for i in server.unreachable | silent_at_unmask}
        result.summary = {
            "sites": server.num_sites,
            "threshold": server.threshold,
            "neighbours": server.degree,
            "bits": cfg.secagg.bits,
            "scale": server.scale,
            "weight_scale": server.weight_scale,
            "stage_seconds": timings,
            "pipelined_stages": pipelined,
            # every key checked against the governance-signed roster (privacy/secagg/roster.py)
            "signed_keys": bool(server.settings.roster),
            "bad_share_holders": {
                site_of[h]: [site_of[o] for o in owners]
                for h, owners in sorted(server.bad_holders.items())
            },
            "ignored_accusations": {
                site_of[i]: reason for i, reason in sorted(server.ignored_accusations.items())
            },
        }
    if unmasked is None:
        return result

    s = cfg.secagg
    total_weight = unmasked.total_weight
    mean_update = dequantise_mean(
        unmasked.ring_sum, clip_range=s.clip_range, total_weight=total_weight,
        max_weight=server.weight_scale, scale=server.scale, bits=s.bits,
    )  # fmt: skip
    if privacy is not None and privacy.site_level:  # DP-FedAvg divides by q·N, not the survivors
        mean_update = mean_update * privacy.secure_mean_scale(total_weight)
    result.participants = [site_of[i] for i in unmasked.survivors]
    result.summary.update(
        {
            "total_weight": total_weight,
            "clipped_values": unmasked.clipped,
            "quantisation_error_bound": mean_error_bound(
                len(unmasked.survivors),
                clip_range=s.clip_range,
                total_weight=total_weight,
                max_weight=server.weight_scale,
                scale=server.scale,
            ),
            "sum_sha256": hashlib.sha256(unmasked.ring_sum.tobytes()).hexdigest(),
            "silent_at_unmask": sorted(site_of[i] for i in silent_at_unmask),
            "refused_at_unmask": unmask_problems,
        }
    )
    aggregate = Message(
        RecordDict(
            {
                keys.ARRAYS: layout.apply(arrays, mean_update),
                keys.METRICS: _mean_metrics(
                    {i: site_metrics.get(i, MetricRecord()) for i in unmasked.survivors},
                    unmasked.weights,
                ),
            }
        ),
        dst_node_id=0,
        message_type=records.MESSAGE_TYPES[MASKED_INPUT],
        group_id=str(server_round),
    )
    result.arrays, result.train_metrics = strategy.aggregate_train(server_round, [aggregate])
    return result


def roster_model_digest(arrays: ArrayRecord) -> bytes:
    """The global model's digest as the sites compute it (privacy/secagg/roster.py)."""
    return model_digest((name, arrays[name].numpy()) for name in arrays)


def _content(request: ConfigRecord) -> RecordDict:
    return RecordDict({records.SECAGG: request})


def _weight_scale(cfg: RunConfig, sites: Sequence[str], num_train: Mapping[str, int] | None) -> int:
    """The round's weight scale: the largest row count of its sites (capped by the sites).

    Under site-level DP every site reports weight 1 (clients/update.py): the scale is 1.
    """
    rows = [1 if site_level_on(cfg) else int((num_train or {}).get(site, 0)) for site in sites]
    return max(rows, default=0) or cfg.secagg.max_weight


def _next_setup(
    cfg: RunConfig,
    server_round: int,
    sites: Sequence[str],
    num_train: Mapping[str, int] | None,
    layout: VectorLayout,
    node_of: Mapping[str, int],
) -> PreparedSetup | None:
    """The next round's setup to send now (None: nothing to pipeline, or a round that aborts)."""
    sites = sorted(sites)
    if not sites or any(site not in node_of for site in sites):
        return None
    scale = _weight_scale(cfg, sites, num_train)
    try:
        server = ServerSecAgg(
            len(sites), settings_of(cfg), layout.length, server_round, weight_scale=scale,
            site_ids=tuple(sites),
        )  # fmt: skip
    except RoundAborted:  # e.g. a single site: the round reports that itself when it starts
        return None
    return PreparedSetup(server, sites, {site: node_of[site] for site in sites}, scale)


def _attach_next(
    batch: dict[int, tuple[str, RecordDict]],
    upcoming: PreparedSetup,
    stage: str,
    request_of: Callable[[int], Any],
    record_of: Callable[[Any], ConfigRecord],
) -> None:
    """Add the next round's ``stage`` request of each of its live sites to ``batch``: inside the
    site's message of this round (under ``records.NEXT``), or as a message of its own."""
    for j in upcoming.server.alive():
        node = upcoming.node_at(j)
        request = record_of(request_of(j))
        if node in batch:
            batch[node][1][records.NEXT] = request
        else:
            batch[node] = (stage, _content(request))


def _of_this_round(
    replies: Mapping[int, Message], node_index: Mapping[int, int], asked: Iterable[int]
) -> dict[int, Message]:
    """node id → reply, narrowed to this round's sites that were asked: index → reply."""
    asked = set(asked)
    return {
        node_index[node]: reply
        for node, reply in replies.items()
        if node in node_index and node_index[node] in asked
    }


def _receive_next(
    upcoming: PreparedSetup,
    stage: str,
    batch: Mapping[int, tuple[str, RecordDict]],
    replies: Mapping[int, Message],
    parsed: Callable[..., dict[int, Any]],
    parse: Callable[[RecordDict, bytes, int], Any],
    receive: Callable[[dict[int, Any]], None],
) -> PreparedSetup | None:
    """Hand the next round's ``stage`` answers in the batch's replies to its server (None: that
    round's pipelined key stages failed; it will run its own)."""
    server = upcoming.server
    by_index = {j: replies[upcoming.node_at(j)] for j in server.alive()
                if upcoming.node_at(j) in replies}  # fmt: skip

    def parse_one(content: RecordDict, index: int):
        if batch[upcoming.node_at(index)][0] != stage:  # it rides in this round's reply (NEXT)
            content = records.next_round_part(content)
        return parse(content, server.round_id, index)

    try:
        receive(parsed(stage, by_index, parse_one, server))
    except RoundAborted as aborted:
        log(WARNING, "secagg: the pipelined %s of round %d failed (%s); it will run its own",
            stage, server.server_round, aborted.reason)  # fmt: skip
        return None
    return upcoming


def _dp_min_survivors(cfg: RunConfig, privacy: PrivacyRound | None, sampled: int) -> int:
    """Under site-level DP: the survivors each site sizes its noise share for (else 0)."""
    if privacy is None or not privacy.site_level:
        return 0
    return cfg.privacy.secagg_min_survivors or sampled


def _train_contents(
    strategy: Strategy, server_round: int, arrays: ArrayRecord, view: Grid, run_id: str = ""
) -> dict[int, RecordDict]:
    """Node id → the content of the train message the strategy would send it this round."""
    messages = strategy.configure_train(server_round, arrays, keys.train_config(run_id), view)
    return {message.metadata.dst_node_id: message.content for message in messages}


def _mean_metrics(metrics: Mapping[int, MetricRecord], weights: Mapping[int, int]) -> MetricRecord:
    """The weighted mean of the survivors' train metrics, with num-examples = the total weight.

    Only the metrics every survivor reported are averaged (as Flower's strategies require).
    """
    total = sum(weights.values())
    common = set.intersection(*(set(m.keys()) for m in metrics.values())) if metrics else set()
    common.discard(keys.NUM_EXAMPLES)
    mean: dict[str, float | int] = {keys.NUM_EXAMPLES: total}
    for name in sorted(common):
        values = [(metrics[i][name], weights[i]) for i in metrics]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in values):
            mean[name] = sum(float(v) * w for v, w in values) / total if total else 0.0
    return MetricRecord(mean)


def _one_line(text: str) -> str:
    return keys.bounded(text, MAX_REASON_CHARS)
