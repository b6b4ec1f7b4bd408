"""One training round under SecAgg+: up to five Message exchanges, then the strategy sees only
the sum.

The stages are the methods of :class:`SecAggRound` (setup, share keys, masked input,
consistency, unmask, finish); :func:`run_secagg_round` is the entry point the round loop calls.

The consistency check rides on the masked input: each request names the sites asked for an
input, and each site signs that set, as the survivor set, with its input. When every one of
them sends its input (a round without dropouts), those signatures are the consistency check and
go out with the unmask request; only a round in which a site dropped after the request runs the
consistency exchange over the smaller set.

Pipelining: when the next round's sites are known in advance (seeded sampling, not site-level
DP's Poisson draw), its two key stages ride on this round's masked-input and unmask exchanges:
its setup (fresh keys, advertised) on the masked input, its share distribution on the unmasking.
Each site sampled next round gets the next round's request inside this round's request, or on
its own in the same batch; the answers are kept as a :class:`PreparedSetup`. The next round uses
it only if it samples exactly those sites at the same nodes with the same weight scale; else it
runs its own key stages. A steady SecAgg+ round so costs one exchange more than a plain train
exchange (the unmasking), not four. A round that aborts before its unmasking leaves the next
round with its setup done and its share distribution still to run; every site still answering
gets the abort notice and wipes the aborted round's secrets.

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
from privacy.secagg.layout import VectorLayout, array_view
from privacy.secagg.protocol import (
    ABORT,
    CONSISTENCY,
    MASKED_INPUT,
    SETUP,
    SHARE_KEYS,
    UNMASK,
    MaskedInput,
    RoundAborted,
)
from privacy.secagg.quantise import dequantise_mean, mean_error_bound
from privacy.secagg.roster import RosterError, config_digest, model_digest, roster_sites
from privacy.secagg.server import SecAggSettings, ServerSecAgg, UnmaskedSum
from server.messaging import exchange
from server.privacy_round import PrivacyRound
from server.round_context import RoundContext, RoundPlan

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
    """A round whose key stages ran during the previous round's two exchanges."""

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
    """Run the SecAgg+ stages over ``sites`` and aggregate the unmasked sum (:class:`SecAggRound`).

    ``num_train``: the row counts the sites reported when they joined; the largest (capped at
    ``secagg.max_weight``) is the round's weight scale.
    ``privacy`` (server/privacy_round.py): under site-level DP each site adds a noise share sized
    for ``dp-min-survivors`` survivors (sent in the train config); with fewer survivors the
    privacy policy decides, before anything is unmasked, to abort or to account the smaller noise.
    Receipts and declines of the masked-input replies are kept as for a plain train reply.
    ``next_sites``: the next round's sample, whose key stages then ride on this round's masked
    input and unmask exchanges (``result.prepared_next``); ``prepared``: this round's key
    stages, if they were pipelined.
    """
    context = RoundContext(grid, cfg, strategy, privacy, run_id)
    plan = RoundPlan(server_round, arrays, view, node_of, list(sites))
    return SecAggRound(context, plan, num_train, next_sites, prepared).run()


class SecAggRound:
    """One SecAgg+ round as the server runs it: one method per stage, in order.

    :meth:`run` calls :meth:`setup`, :meth:`share_keys`, :meth:`masked_input`,
    :meth:`consistency` and :meth:`unmask`, then :meth:`finish` (the strategy's aggregate); a
    :class:`RoundAborted` on the way goes to :meth:`abort`. Each stage sends one batch of
    messages (a pipelined key stage sends none) and hands the valid replies to the
    :class:`ServerSecAgg`, which drops every site that sent nothing usable.
    """

    def __init__(
        self,
        context: RoundContext,
        plan: RoundPlan,
        num_train: Mapping[str, int] | None = None,
        next_sites: Sequence[str] = (),
        prepared: PreparedSetup | None = None,
    ) -> None:
        self.context, self.plan = context, plan
        self.cfg = context.cfg
        self.num_train = num_train
        self.next_sites = next_sites
        self.prepared = prepared
        self.sites = sorted(plan.chosen)
        self.timeout = self.cfg.secagg.timeout or self.cfg.federation.round_timeout  # seconds
        self.index_of = {site: i for i, site in enumerate(self.sites, start=1)}
        self.site_of = {i: site for site, i in self.index_of.items()}
        self.node_index = {plan.node_of[site]: self.index_of[site] for site in self.sites}
        self.layout = VectorLayout.of(plan.arrays)
        self.result = SecAggRoundResult()
        self.timings: dict[str, float] = {}  # stage → seconds its exchange took
        self.server: ServerSecAgg | None = None
        self.upcoming: PreparedSetup | None = None  # the next round, while its stages ride here
        self.silent_at_unmask: set[int] = set()
        self.unmask_problems: dict[str, str] = {}  # site → why its unmask reply was not used
        self.consistency_problems: dict[str, str] = {}  # survivor → why it did not sign
        self.declined: set[int] = set()
        self.pipelined: list[str] = []  # this round's stages that rode on the last round's
        self.site_metrics: dict[int, MetricRecord] = {}  # index → its masked-input metrics

    # ---- the round -------------------------------------------------------------------------------
    def run(self) -> SecAggRoundResult:
        """All stages; the result (aborted, or with the strategy's new weights)."""
        try:
            self.setup()
            self.share_keys()
            self.masked_input()
            self.consistency()
            unmasked: UnmaskedSum | None = self.unmask()
        except RoundAborted as aborted:
            self.abort(aborted)
            unmasked = None
        self._summarise()
        if unmasked is not None:
            self.finish(unmasked)
        return self.result

    def setup(self) -> None:
        """Stage 1: fresh keys and commitments (or take those set up during the last round)."""
        cfg, plan = self.cfg, self.plan
        scale = _weight_scale(cfg, self.sites, self.num_train)
        prepared = self.prepared
        if prepared is not None and prepared.fits(
            plan.server_round, self.sites, plan.node_of, scale
        ):
            self.server = prepared.server  # done during the last round's masked input
            self.pipelined = [SETUP, SHARE_KEYS] if prepared.shared else [SETUP]
            self.timings.update(dict.fromkeys(self.pipelined, 0.0))
            return
        server = self.server = ServerSecAgg(
            len(self.sites),
            settings_of(cfg),
            self.layout.length,
            plan.server_round,
            weight_scale=scale,
            site_ids=tuple(self.sites),
        )
        requests = {
            i: _content(records.setup_request_record(server.setup_request(i)))
            for i in server.alive()
        }
        replies = self._send(SETUP, requests)
        server.receive_adverts(
            self._parsed(SETUP, replies, lambda c, i: records.parse_advert(c, server.round_id, i))
        )

    def share_keys(self) -> None:
        """Stage 2: encrypted Shamir shares for the neighbours (unless pipelined)."""
        if SHARE_KEYS in self.pipelined:
            return
        server = self._server
        requests = {
            i: _content(records.share_keys_request_record(server.share_keys_request(i)))
            for i in server.alive()
        }
        replies = self._send(SHARE_KEYS, requests)
        server.receive_ciphertexts(
            self._parsed(
                SHARE_KEYS,
                replies,
                lambda c, i: records.parse_ciphertexts(c, server.round_id, i),
            )
        )

    def masked_input(self) -> None:
        """Stage 3: the strategy's train message plus the shares each site receives, and the
        next round's setup in the same batch; the masked inputs come back."""
        server, cfg, plan, privacy = self._server, self.cfg, self.plan, self.context.privacy
        node_of, site_of = plan.node_of, self.site_of
        train_content = _train_contents(
            self.context.strategy, plan.server_round, plan.arrays, plan.view, self.context.run_id
        )
        dp_survivors = _dp_min_survivors(cfg, privacy, len(self.sites))
        contents: dict[int, RecordDict] = {}
        global_digest = b""
        for i in server.alive():
            if node_of[site_of[i]] not in train_content:
                server.drop(i, MASKED_INPUT, "the strategy sent it no train message", True)
        server.expect_inputs()
        for i in server.alive():
            content = train_content[node_of[site_of[i]]]
            request = records.masked_input_request_record(server.masked_input_request(i))
            contents[i] = RecordDict({**dict(content.items()), records.SECAGG: request})
            if dp_survivors:
                config = ConfigRecord(dict(content.config_records.get(keys.CONFIG, {})))
                config[keys.DP_MIN_SURVIVORS] = dp_survivors
                contents[i][keys.CONFIG] = config
            if server.settings.roster:  # what each site signs it trained from (roster.py)
                global_digest = global_digest or roster_model_digest(plan.arrays)
                train_config = dict(contents[i].config_records.get(keys.CONFIG, {}))
                server.expected_contribution[i] = (global_digest, config_digest(train_config))
        batch = {node_of[site_of[i]]: (MASKED_INPUT, content) for i, content in contents.items()}
        upcoming = self.upcoming = _next_setup(
            cfg, plan.server_round + 1, self.next_sites, self.num_train, self.layout, node_of
        )
        if upcoming is not None:
            _attach_next(
                batch, upcoming, SETUP, upcoming.server.setup_request, records.setup_request_record
            )
        node_replies = self._send_to_nodes(MASKED_INPUT, batch)
        replies = _of_this_round(node_replies, self.node_index, contents)
        if upcoming is not None:
            self.result.prepared_next = self.upcoming = _receive_next(
                upcoming,
                SETUP,
                batch,
                node_replies,
                self._parsed,
                records.parse_advert,
                upcoming.server.receive_adverts,
            )
        if privacy is not None:  # receipts and declines, as for a plain train reply
            for i, reply in sorted(replies.items()):
                # a broken receipt excludes its site, never the round
                observed = privacy.observe_train(plan.server_round, [(site_of[i], reply)])
                for reason in observed.values():
                    server.drop(i, MASKED_INPUT, reason, reachable=True)

        def parse_input(content: RecordDict, index: int) -> MaskedInput:
            masked = records.parse_masked_input(content, server.round_id, index)
            metrics = content.metric_records.get(keys.METRICS)
            self.site_metrics[index] = metrics if metrics is not None else MetricRecord()
            return masked

        server.receive_masked_inputs(self._parsed(MASKED_INPUT, replies, parse_input))
        if dp_survivors and privacy is not None:
            survivors = len(server.alive())
            if not privacy.account_secure_round(
                plan.server_round, len(self.sites), survivors, dp_survivors
            ):
                raise RoundAborted(
                    MASKED_INPUT,
                    f"{survivors} survivors, fewer than the {dp_survivors} the sites sized their "
                    "DP noise for (privacy.secagg_dropout=abort): not unmasked",
                )

    def consistency(self) -> None:
        """Stage 4: each survivor signs the survivor set U3 (Bonawitz et al. §6). Skipped when
        every site asked for an input sent one: each signed that set with its input."""
        server = self._server
        if server.signed_early:
            self.timings[CONSISTENCY] = 0.0
            return
        node_of, site_of = self.plan.node_of, self.site_of
        request = records.consistency_request_record(server.consistency_request())
        targets = server.alive()
        batch = {node_of[site_of[i]]: (CONSISTENCY, _content(request)) for i in targets}
        replies = _of_this_round(self._send_to_nodes(CONSISTENCY, batch), self.node_index, targets)
        signatures: dict[int, bytes] = {}
        for index, reply in sorted(replies.items()):
            try:
                if reply.has_error():
                    raise records.MalformedReply(f"error: {reply.error.reason}")
                signatures[index] = records.parse_consistency_signature(
                    reply.content, server.round_id, index
                )
            except Exception as error:  # its input stays in; it is not asked to unmask
                server.unsigned[index] = _one_line(str(error))
                server.refused_consistency.add(index)
        try:
            server.receive_signatures(signatures)
        finally:
            self.consistency_problems = {
                site_of[i]: reason for i, reason in sorted(server.unsigned.items())
            }

    def unmask(self) -> UnmaskedSum:
        """Stage 5: shares of the survivors' self masks and of the dropped sites' mask keys;
        the server rebuilds the secrets and removes every mask. The next round's share
        distribution rides in the same batch."""
        server, node_of, site_of = self._server, self.plan.node_of, self.site_of
        upcoming = self.upcoming
        request = records.unmask_request_record(server.unmask_request())
        targets = server.unmask_targets()
        batch = {node_of[site_of[i]]: (UNMASK, _content(request)) for i in targets}
        if upcoming is not None:
            _attach_next(
                batch,
                upcoming,
                SHARE_KEYS,
                upcoming.server.share_keys_request,
                records.share_keys_request_record,
            )
        node_replies = self._send_to_nodes(UNMASK, batch)
        replies = _of_this_round(node_replies, self.node_index, targets)
        if upcoming is not None:
            self.result.prepared_next = _receive_next(
                upcoming,
                SHARE_KEYS,
                batch,
                node_replies,
                self._parsed,
                records.parse_ciphertexts,
                upcoming.server.receive_ciphertexts,
            )
            if self.result.prepared_next is not None:
                self.result.prepared_next.shared = True
        self.silent_at_unmask = {i for i in targets if i not in replies}
        shares = {}
        for index, reply in sorted(replies.items()):
            try:
                if reply.has_error():
                    raise records.MalformedReply(f"error: {reply.error.reason}")
                shares[index] = records.parse_unmask_shares(reply.content, server.round_id, index)
            except Exception as error:  # its shares are not needed if enough others answer
                self.unmask_problems[site_of[index]] = _one_line(str(error))
                log(
                    WARNING,
                    "secagg round %d: site %s's unmask reply ignored: %s",
                    self.plan.server_round,
                    site_of[index],
                    self.unmask_problems[site_of[index]],
                )
        started = time.monotonic()
        unmasked = server.finish(shares)
        self.timings["unmask-compute"] = round(time.monotonic() - started, 3)
        return unmasked

    def abort(self, aborted: RoundAborted) -> None:
        """Record the abort; the sites still answering wipe the round's secrets now."""
        result = self.result
        result.aborted = True
        result.abort_reason = f"{aborted.stage}: {aborted.reason}"
        log(
            WARNING,
            "secagg round %d aborted at %s: %s (the global model is kept)",
            self.plan.server_round,
            aborted.stage,
            aborted.reason,
        )
        server = self.server
        if server is None:
            return
        notice = _content(records.abort_record(server.round_id, result.abort_reason))
        told = [i for i in server.sites if i not in server.unreachable]
        self._send(ABORT, {i: notice for i in told}, min(self.timeout, ABORT_NOTICE_SECONDS))

    def finish(self, unmasked: UnmaskedSum) -> None:
        """The weighted mean update of the survivors, through the strategy's aggregate."""
        server, cfg, plan, result = self._server, self.cfg, self.plan, self.result
        privacy, site_of = self.context.privacy, self.site_of
        s = cfg.secagg
        total_weight = unmasked.total_weight
        mean_update = dequantise_mean(
            unmasked.ring_sum,
            clip_range=s.clip_range,
            total_weight=total_weight,
            max_weight=server.weight_scale,
            scale=server.scale,
            bits=s.bits,
        )
        if privacy is not None and privacy.site_level:  # DP-FedAvg divides by q·N
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
                "silent_at_unmask": sorted(site_of[i] for i in self.silent_at_unmask),
                "refused_at_unmask": self.unmask_problems,
            }
        )
        aggregate = Message(
            RecordDict(
                {
                    keys.ARRAYS: self.layout.apply(plan.arrays, mean_update),
                    keys.METRICS: _mean_metrics(
                        {i: self.site_metrics.get(i, MetricRecord()) for i in unmasked.survivors},
                        unmasked.weights,
                    ),
                }
            ),
            dst_node_id=0,
            message_type=records.MESSAGE_TYPES[MASKED_INPUT],
            group_id=str(plan.server_round),
        )
        strategy = self.context.strategy
        result.arrays, result.train_metrics = strategy.aggregate_train(
            plan.server_round, [aggregate]
        )

    def _summarise(self) -> None:
        """Dropouts, unreachable sites and the metrics.json summary, aborted or not."""
        server, result, site_of = self.server, self.result, self.site_of
        result.site_metrics = {site_of[i]: m for i, m in sorted(self.site_metrics.items())}
        if server is None:
            return
        for index, dropout in sorted(server.dropouts.items()):
            if index in self.declined:
                continue
            result.dropouts[site_of[index]] = {"stage": dropout.stage, "reason": dropout.reason}
            log(
                WARNING,
                "secagg round %d: site %s excluded at %s: %s",
                self.plan.server_round,
                site_of[index],
                dropout.stage,
                dropout.reason,
            )
        result.unreachable = {site_of[i] for i in server.unreachable | self.silent_at_unmask}
        result.summary = {
            "sites": server.num_sites,
            "threshold": server.threshold,
            "neighbours": server.degree,
            "bits": self.cfg.secagg.bits,
            "scale": server.scale,
            "weight_scale": server.weight_scale,
            "stage_seconds": self.timings,
            "pipelined_stages": self.pipelined,
            # the survivors signed the survivor set with their inputs: no consistency exchange
            "consistency_signed_with_inputs": server.signed_early,
            # every key checked against the governance-signed roster (privacy/secagg/roster.py)
            "signed_keys": bool(server.settings.roster),
            "unsigned_at_consistency": self.consistency_problems,
            "bad_share_holders": {
                site_of[h]: [site_of[o] for o in owners]
                for h, owners in sorted(server.bad_holders.items())
            },
            "ignored_accusations": {
                site_of[i]: reason for i, reason in sorted(server.ignored_accusations.items())
            },
        }

    # ---- messaging -------------------------------------------------------------------------------
    @property
    def _server(self) -> ServerSecAgg:
        assert self.server is not None, "setup runs first"
        return self.server

    def _send_to_nodes(
        self, stage: str, contents: Mapping[int, tuple[str, RecordDict]], wait: float | None = None
    ) -> dict[int, Message]:
        """node id → (stage of the message, content); the first reply of each node asked."""
        started = time.monotonic()
        messages = [
            Message(
                content,
                dst_node_id=node,
                message_type=records.MESSAGE_TYPES[message_stage],
                group_id=str(self.plan.server_round),
            )
            for node, (message_stage, content) in sorted(contents.items())
        ]
        replies: dict[int, Message] = {}
        grid = self.context.grid
        for reply in exchange(
            grid, messages, wait or self.timeout, max_poll=STAGE_MAX_POLL_SECONDS
        ):
            node = reply.metadata.src_node_id
            if node in contents and node not in replies:
                replies[node] = reply
        self.timings[stage] = round(time.monotonic() - started, 3)
        return replies

    def _send(
        self, stage: str, contents: Mapping[int, RecordDict], wait: float | None = None
    ) -> dict[int, Message]:
        """Site index → content, all of ``stage``; the replies by site index."""
        node_of, site_of = self.plan.node_of, self.site_of
        by_node = {node_of[site_of[i]]: (stage, content) for i, content in contents.items()}
        replies = self._send_to_nodes(stage, by_node, wait)
        return {self.node_index[node]: reply for node, reply in replies.items()}

    def _parsed(
        self,
        stage: str,
        replies: Mapping[int, Message],
        parse: Callable[[RecordDict, int], T],
        of: ServerSecAgg | None = None,
    ) -> dict[int, T]:
        """Valid replies of ``stage``; every other site asked is dropped with the reason.

        ``of``: the round the replies belong to (default: this one).
        """
        of = of or self._server
        good: dict[int, T] = {}
        for index, reply in sorted(replies.items()):
            if reply.has_error():
                of.drop(index, stage, _one_line(f"error: {reply.error.reason}"))
                continue
            if stage == MASKED_INPUT and (reason := keys.decline_reason(reply)) is not None:
                self.declined.add(index)
                self.result.declined[self.site_of[index]] = reason
                of.drop(index, stage, f"declined: {reason}", reachable=True)
                continue
            try:
                good[index] = parse(reply.content, index)
            except records.MalformedReply as error:
                of.drop(index, stage, _one_line(str(error)), reachable=True)
            except Exception as error:  # never let one site's bytes crash the round
                of.drop(index, stage, _one_line(f"unreadable reply: {error!r}"), True)
        return good


def roster_model_digest(arrays: ArrayRecord) -> bytes:
    """The global model's digest as the sites compute it (privacy/secagg/roster.py)."""
    return model_digest((name, array_view(arrays[name])) for name in arrays)


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
            len(sites),
            settings_of(cfg),
            layout.length,
            server_round,
            weight_scale=scale,
            site_ids=tuple(sites),
        )
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
    by_index = {
        j: replies[upcoming.node_at(j)] for j in server.alive() if upcoming.node_at(j) in replies
    }

    def parse_one(content: RecordDict, index: int):
        if batch[upcoming.node_at(index)][0] != stage:  # it rides in this round's reply (NEXT)
            content = records.next_round_part(content)
        return parse(content, server.round_id, index)

    try:
        receive(parsed(stage, by_index, parse_one, server))
    except RoundAborted as aborted:
        log(
            WARNING,
            "secagg: the pipelined %s of round %d failed (%s); it will run its own",
            stage,
            server.server_round,
            aborted.reason,
        )
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
