"""The site's side of SecAgg+: the stage handlers behind the ClientApp's custom actions.

Each handler reads the request records, runs the site's :class:`SiteSecAgg` (kept between
messages in ``context.state``) and replies with records.

Pipelining: a site can hold two rounds at once, the current one (``records.STATE``) and the next
one set up ahead (``records.STATE_NEXT``). The next round's setup rides on this round's masked
input message, its share distribution on this round's unmasking message (``records.NEXT``);
each half is answered on its own. The next round becomes the current one when its masked input
is asked for; the round it replaces has been unmasked by then, or the server has left it (an
abort notice for it still finds it until then).
The site's update comes from :func:`clients.update.compute_update`, like every release of a
site's update; a :class:`SiteDeclined` there makes the site a dropout of this round, with its
reason. A request that breaks the protocol (another round's, out of order, asking for both
secrets of one site, a threshold weaker than the run's) gets a refusal, never secrets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.site_data import SiteData
from clients.update import SiteDeclined, compute_update
from fedgov import messages as keys
from fedgov.config import RunConfig
from privacy.receipts import load_site_key, public_key_bytes
from privacy.secagg import records, roster
from privacy.secagg.client import DONE, SiteSecAgg
from privacy.secagg.layout import VectorLayout, array_view
from privacy.secagg.masking import ring_dtype
from privacy.secagg.protocol import (
    ABORT,
    CONSISTENCY,
    MASKED_INPUT,
    SETUP,
    SHARE_KEYS,
    UNMASK,
    MaskedInput,
    ProtocolRefusal,
)
from privacy.secagg.quantise import quantise_chunks, ring_scale

logger = logging.getLogger("fedgov.secagg")
NODE_SITE_DIR = "site-dir"  # the node config key of the site's folder (its key, its anchor)
ROSTER_STATE = "secagg-roster"  # context.state: the version of the last roster accepted


def handle_setup(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Stage 1: fresh keys for this round; reply with the public halves."""
    return _reply(msg, context, SETUP, lambda: _setup(msg.content, context, cfg))


def _setup(content: RecordDict, context: Context, cfg: RunConfig) -> RecordDict:
    """Start the round ``content`` sets up; its key advert.

    It becomes the current round, or the next one while the current round is still under way.
    """
    request = records.parse_setup_request(content)
    for previous in _rounds(context):
        if previous.round_id == request.round_id or previous.server_round > request.server_round:
            raise ProtocolRefusal(
                f"setup for round {request.server_round} after round {previous.server_round} "
                "(replayed or stale)"
            )
    settings = cfg.secagg
    site_id, roster_sites, identity = _roster_of(request.roster, context)
    site = SiteSecAgg(
        request,
        settings.threshold,
        settings.max_weight,
        settings.neighbours,
        site_id=site_id,
        roster=roster_sites,
    )
    current = _load(context, records.STATE)
    if current is not None and current.expects != DONE:
        context.state[records.STATE_NEXT] = ConfigRecord(site.state_dict())
    else:
        context.state[records.STATE] = ConfigRecord(site.state_dict())
        _forget(context, records.STATE_NEXT)
    return RecordDict(
        {records.SECAGG: records.advert_record(site.round_id, site.index, site.advert(identity))}
    )


def _roster_of(
    signed: bytes, context: Context
) -> tuple[str, dict[str, bytes], Ed25519PrivateKey | None]:
    """(this site's id, the verified roster, its identity key) when the site has a trust anchor
    in its ``site-dir``; ("", {}, None) without one. Refuses an unsigned, under-signed or older
    roster, and one that does not list this site's own key."""
    site_dir = context.node_config.get(NODE_SITE_DIR)
    try:
        anchor = roster.load_anchor(str(site_dir) if site_dir else None)
        if anchor is None:
            return "", {}, None
        seen = context.state.config_records.get(ROSTER_STATE)
        last = int(seen["version"]) if seen is not None else 0
        accepted = roster.verify_roster(signed, anchor, min_version=last)
        identity = load_site_key(str(site_dir))
    except (roster.RosterError, OSError, ValueError) as error:
        raise ProtocolRefusal(f"roster: {error}") from None
    if accepted.sites.get(anchor.site_id) != public_key_bytes(identity):
        raise ProtocolRefusal(
            f"roster v{accepted.version} does not list this site ({anchor.site_id!r}) with its key"
        )
    context.state[ROSTER_STATE] = ConfigRecord({"version": accepted.version})
    return anchor.site_id, accepted.sites, identity


def _identity(context: Context) -> Ed25519PrivateKey | None:
    site_dir = context.node_config.get(NODE_SITE_DIR)
    try:
        return load_site_key(str(site_dir)) if site_dir else None
    except (OSError, ValueError):
        return None


def _share_keys(content: RecordDict, context: Context) -> RecordDict:
    request = records.parse_share_keys_request(content)
    site = _require(context, request.round_id)
    ciphertexts = site.share_keys(request)
    _save(context, site)
    record = records.ciphertexts_record(site.round_id, site.index, ciphertexts)
    return RecordDict({records.SECAGG: record})


def handle_share_keys(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Stage 2: Shamir-split both secrets among the live neighbours, one ciphertext each."""

    return _reply(msg, context, SHARE_KEYS, lambda: _share_keys(msg.content, context))


def handle_masked_input(
    msg: Message, context: Context, cfg: RunConfig, load_site: Callable[[], SiteData]
) -> Message:
    """Stage 3: open the neighbours' shares, train (or decline), reply with the masked update.

    A pipelined request also carries the next round's setup (``records.NEXT``): it runs after the
    input is masked, and its advert (or refusal) goes back under ``records.NEXT``.
    """

    def run() -> RecordDict:
        request = records.parse_masked_input_request(msg.content)
        site_round = _require(context, request.round_id, promote=True)
        bad_shares = site_round.accept_shares(request)
        for sender, reason in bad_shares.items():
            logger.warning("secagg: the share from site index %d failed: %s", sender, reason)
        site = load_site()
        global_arrays = msg.content.array_records[keys.ARRAYS]
        header = records.reply_header(MASKED_INPUT, site_round.round_id, site_round.index)
        try:
            update = compute_update(
                cfg, site, global_arrays, msg.content.config_records[keys.CONFIG], context
            )
        except SiteDeclined as declined:
            site_round.decline()
            _save(context, site_round)
            content = keys.decline_content(site.site_id, declined.reason, **declined.details)
            content[records.SECAGG] = ConfigRecord(header)
            return content
        layout = VectorLayout.of(global_arrays)
        settings = cfg.secagg
        weight = min(int(update.metrics[keys.NUM_EXAMPLES]), site_round.weight_scale)
        masks = site_round.mask_streams(ring_dtype(settings.bits))
        try:  # quantised and masked a cache-sized chunk at a time
            masked_vector, clipped = quantise_chunks(
                layout.update_chunks(update.arrays, global_arrays),
                layout.length,
                clip_range=settings.clip_range,
                weight=weight,
                max_weight=site_round.weight_scale,
                scale=ring_scale(site_round.num_sites, settings.bits),
                bits=settings.bits,
                then=masks.add_to,
            )
        except ValueError as error:  # NaN/inf or a mismatched model: send nothing of it
            site_round.decline()  # it can still help rebuild the others' secrets
            _save(context, site_round)
            raise ProtocolRefusal(f"cannot quantise this site's update: {error}") from None
        if clipped:
            logger.warning(
                "secagg: %d of %d update values exceeded secagg.clip_range %g and were clipped",
                clipped,
                layout.length,
                settings.clip_range,
            )
        proof = site_round.accusation_proof(bad_shares)
        identity = _identity(context) if site_round.roster else None
        contribution = site_round.contribution(
            identity,
            roster.model_digest((name, array_view(global_arrays[name])) for name in global_arrays),
            roster.config_digest(dict(msg.content.config_records[keys.CONFIG])),
        )
        site_round.input_masked()
        masked = MaskedInput(
            vector=masked_vector,
            weight=weight,
            bad_shares=bad_shares,
            clipped=clipped,
            proof=proof,
            contribution=contribution,
            early_signature=site_round.early_signature(identity),
        )
        _save(context, site_round)
        config, arrays = records.masked_input_records(site_round.round_id, site_round.index, masked)
        return RecordDict(
            {
                records.SECAGG: config,
                records.MASKED: arrays,
                keys.METRICS: MetricRecord(dict(update.metrics)),
                keys.SITE: keys.site_record(site.site_id),
                **update.extra_records(),  # e.g. the sample-level DP receipt of this release
            }
        )

    content = _answer(msg.content, context, MASKED_INPUT, run)
    if records.NEXT in msg.content.config_records:
        next_part = records.next_round_part(msg.content)
        advert = _answer(next_part, context, SETUP, lambda: _setup(next_part, context, cfg))
        content[records.NEXT] = advert.config_records[records.SECAGG]
    return Message(content, reply_to=msg)


def handle_consistency(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Stage 4 (only when a site asked for an input sent none): sign the smaller survivor set
    the server names; reveal nothing yet."""

    def run() -> RecordDict:
        request = records.parse_consistency_request(msg.content)
        site = _require(context, request.round_id)
        signature = site.consistency(request, _identity(context) if site.roster else None)
        _save(context, site)
        record = records.consistency_reply_record(site.round_id, site.index, signature)
        return RecordDict({records.SECAGG: record})

    return _reply(msg, context, CONSISTENCY, run)


def handle_unmask(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Stage 5: reveal shares (one kind per site, once per round), then forget the round.

    A pipelined request also carries the next round's share distribution (``records.NEXT``): it
    runs after the reveal, and its ciphertexts (or refusal) go back under ``records.NEXT``.
    """

    def run() -> RecordDict:
        request = records.parse_unmask_request(msg.content)
        site = _require(context, request.round_id)
        shares = site.reveal(request)
        _save(context, site)  # wiped: only the round id and "done" are left
        record = records.unmask_shares_record(site.round_id, site.index, shares)
        return RecordDict({records.SECAGG: record})

    content = _answer(msg.content, context, UNMASK, run)
    if records.NEXT in msg.content.config_records:
        next_part = records.next_round_part(msg.content)
        shared = _answer(next_part, context, SHARE_KEYS, lambda: _share_keys(next_part, context))
        content[records.NEXT] = shared.config_records[records.SECAGG]
    return Message(content, reply_to=msg)


def handle_abort(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """After an aborted round: wipe its secrets (nothing of it will ever be unmasked)."""

    def run() -> RecordDict:
        round_id, reason = records.parse_abort(msg.content)
        site = _require(context, round_id)
        site.abandon(round_id)
        _save(context, site)
        logger.warning("secagg: round %d aborted by the server: %s", site.server_round, reason)
        header = records.reply_header(ABORT, site.round_id, site.index)
        return RecordDict({records.SECAGG: ConfigRecord(header)})

    return _reply(msg, context, ABORT, run)


def _reply(msg: Message, context: Context, stage: str, run: Callable[[], RecordDict]) -> Message:
    return Message(_answer(msg.content, context, stage, run), reply_to=msg)


def _answer(
    request: RecordDict, context: Context, stage: str, run: Callable[[], RecordDict]
) -> RecordDict:
    """``run()``'s reply content, or a refusal record naming why the request was refused."""
    try:
        return run()
    except (ProtocolRefusal, records.MalformedReply) as refusal:
        reason = getattr(refusal, "reason", str(refusal))
        logger.warning("secagg: refused the %s request: %s", stage, reason)
        site = _load(context)
        index = site.index if site is not None else 0
        round_id = records.request_round_id(request)
        return RecordDict({records.SECAGG: records.refusal_record(stage, round_id, index, reason)})


# ---- the site's rounds in context.state: the current one and the next one set up ahead ----------
def _load(context: Context, slot: str = records.STATE) -> SiteSecAgg | None:
    state = context.state.config_records.get(slot)
    return None if state is None else SiteSecAgg.from_state_dict(state)


def _rounds(context: Context) -> list[SiteSecAgg]:
    return [r for slot in (records.STATE, records.STATE_NEXT) if (r := _load(context, slot))]


def _require(context: Context, round_id: bytes, *, promote: bool = False) -> SiteSecAgg:
    """The round ``round_id`` names: the next one (made current with ``promote``), else the
    current one, whose own checks refuse a request of another round."""
    ahead = _load(context, records.STATE_NEXT)
    if ahead is not None and ahead.round_id == round_id:
        if promote:  # the current round was unmasked, or the server has left it: forget it
            context.state[records.STATE] = ConfigRecord(ahead.state_dict())
            _forget(context, records.STATE_NEXT)
        return ahead
    site = _load(context, records.STATE)
    if site is None:
        raise ProtocolRefusal("no secure-aggregation round in progress at this site")
    return site


def _save(context: Context, site: SiteSecAgg) -> None:
    """Store ``site`` in the slot that holds its round."""
    ahead = context.state.config_records.get(records.STATE_NEXT)
    in_ahead = ahead is not None and ahead.get("round-id") == site.round_id
    context.state[records.STATE_NEXT if in_ahead else records.STATE] = ConfigRecord(
        site.state_dict()
    )


def _forget(context: Context, slot: str) -> None:
    if slot in context.state.config_records:
        del context.state[slot]
