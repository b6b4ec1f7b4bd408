"""SecAgg+ through the real round loop and the real ClientApp, messages serialised as on the wire.

The grid (tests/inprocess.py) runs every site's ClientApp handlers in this process; sites vanish
at any stage, send broken or hostile replies, or decline, and a dishonest server asks for both
secrets. Each test checks the unmasked sum against the sum the test computes itself from each
survivor's own update (same training, same quantisation): equal bit for bit (its SHA-256).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from inprocess import InProcessGrid

from clients import secagg as client_secagg
from clients.app import app as client_app
from clients.site_data import load_site_data
from clients.update import SiteDeclined, compute_update
from fedgov import messages as keys
from fedgov.config import RunConfig, from_flower_config, to_flower_config
from fedgov.errors import ConfigError
from fedgov.models import initial_model
from fedgov_data.federation import simulated_federation
from privacy.secagg import masking, records
from privacy.secagg.layout import VectorLayout
from privacy.secagg.quantise import quantise
from server.outputs import metrics_document
from server.round_context import RoundContext
from server.rounds import run_rounds
from strategies.registry import build_strategy
from strategies.run_config import load_run_config

SETUP, SHARE, MASKED, CONSISTENCY, UNMASK, ABORT = (
    records.MESSAGE_TYPES[s] for s in records.MESSAGE_TYPES
)
SITES = ["site-00", "site-01", "site-02", "site-03"]


@pytest.fixture(autouse=True)
def server_identity():
    """Messages the round loop creates are stamped as the ServerApp's (node 0)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def make_cfg(n: int = 4, secagg: str = "secaggplus", rounds: int = 1, **overrides) -> RunConfig:
    cfg = RunConfig(rounds=rounds, seed=11, progress=False)
    cfg.dataset.name, cfg.federation.num_sites = "synthetic", n
    cfg.secagg.name = secagg
    cfg.secagg.timeout = 0.25  # a vanished site costs this much per stage
    cfg.federation.round_timeout = 30.0
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return from_flower_config(to_flower_config(cfg))


class Federation:
    """An in-process federation of ``cfg.federation.num_sites`` synthetic sites."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        n = cfg.federation.num_sites
        schema = simulated_federation(cfg).pool.schema
        model = initial_model("mlp", schema.input_shape, len(schema.classes), 64, cfg.seed)
        self.initial = ArrayRecord(model.state_dict())
        configs = [{"partition-id": i, "num-partitions": n} for i in range(n)]
        self.grid = InProcessGrid(client_app, configs, to_flower_config(cfg))
        self.global_at: dict[int, ArrayRecord] = {}  # round → the weights the sites trained from
        self.grid.tamper_request = self._remember

    def _remember(self, node_id: int, message: Message) -> Message:
        if message.metadata.message_type == MASKED:
            self.global_at[int(message.metadata.group_id)] = message.content[keys.ARRAYS]
        return message

    def run(self, strategy: str | None = None, privacy=None):
        if strategy:
            self.cfg.strategy.name = strategy
        strategy_object = build_strategy(self.cfg.strategy)
        context = RoundContext(self.grid, self.cfg, strategy_object, privacy)
        return run_rounds(context, self.initial)

    def expected_sum_sha256(self, server_round: int, summary: dict, survivors: list[str]) -> str:
        """The SHA-256 of Σ quantised updates, each survivor's recomputed here independently."""
        cfg, n = self.cfg, self.cfg.federation.num_sites
        start = self.global_at[server_round]
        layout = VectorLayout.of(start)
        total = np.zeros(layout.length, dtype=masking.ring_dtype(cfg.secagg.bits))
        for site_id in survivors:
            index = int(site_id.split("-")[1])
            node_config = {"partition-id": index, "num-partitions": n}
            site = load_site_data(cfg, node_config)
            context = Context(
                run_id=1,
                node_id=index + 1,
                node_config=node_config,
                state=RecordDict(),
                run_config=to_flower_config(cfg),
            )
            update = compute_update(
                cfg, site, start, ConfigRecord({keys.SERVER_ROUND: server_round}), context
            )
            weight = min(int(update.metrics[keys.NUM_EXAMPLES]), summary["weight_scale"])
            quantised, _ = quantise(
                layout.update_vector(update.arrays, start),
                clip_range=cfg.secagg.clip_range,
                weight=weight,
                max_weight=summary["weight_scale"],
                scale=summary["scale"],
                bits=cfg.secagg.bits,
            )
            np.add(total, quantised, out=total)
        return hashlib.sha256(total.tobytes()).hexdigest()


def assert_exact(fed: Federation, record, survivors: list[str]) -> None:
    assert record.participants == survivors, record
    assert not record.aborted, record.abort_reason
    expected = fed.expected_sum_sha256(record.round, record.secagg, survivors)
    assert record.secagg["sum_sha256"] == expected


def max_difference(a: ArrayRecord, b: ArrayRecord) -> float:
    return max(float(np.abs(a[k].numpy() - b[k].numpy()).max()) for k in a)


# ---- equality with the plain round ---------------------------------------------------------------
def test_secure_and_plain_rounds_give_the_same_model_within_the_quantisation_step():
    plain = Federation(make_cfg(secagg="off")).run()
    fed = Federation(make_cfg())
    secure = fed.run()
    record = secure.rounds[0]
    assert_exact(fed, record, SITES)
    bound = record.secagg["quantisation_error_bound"]
    assert 0 < bound < 1e-7
    difference = max_difference(plain.arrays, secure.arrays)
    # float32 weights: the plain FedAvg's own float32 rounding adds up to a few ulps
    assert difference <= bound + 2e-7, (difference, bound)
    assert record.train_loss == pytest.approx(plain.rounds[0].train_loss)
    assert record.eval_accuracy == pytest.approx(plain.rounds[0].eval_accuracy, abs=1e-9)
    assert record.dropouts == {} and record.secagg["clipped_values"] == 0
    # the server's grid carried only masked inputs: never one site's weights
    assert {t for _, t in fed.grid.log} >= {SETUP, SHARE, MASKED, UNMASK}
    assert "train" not in {t for _, t in fed.grid.log}


def test_fedadam_applies_its_server_optimiser_to_the_secure_mean():
    overrides = {"strategy__name": "fedadam"}
    plain = Federation(make_cfg(secagg="off", **overrides)).run()
    fed = Federation(make_cfg(**overrides))
    secure = fed.run()
    fedavg = Federation(make_cfg()).run()
    assert_exact(fed, secure.rounds[0], SITES)
    assert max_difference(plain.arrays, secure.arrays) < 1e-5
    assert max_difference(secure.arrays, fedavg.arrays) > 1e-3  # Adam's step, not the mean


# ---- dropouts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [SETUP, SHARE, MASKED])
def test_a_site_vanishing_at_any_stage_leaves_the_exact_sum_of_the_others(stage):
    fed = Federation(make_cfg(rounds=2))
    fed.grid.vanish_at = {(3, stage)}  # node 3 serves site-02
    result = fed.run()
    first, second = result.rounds
    others = ["site-00", "site-01", "site-03"]
    assert_exact(fed, first, others)
    assert first.dropouts == {"site-02": {"stage": stage.split("_", 1)[1], "reason": "no reply"}}
    # gone for good: the next round loses it at setup and still completes
    assert_exact(fed, second, others)
    assert second.dropouts["site-02"]["stage"] == "setup"


def test_a_site_vanishing_at_unmasking_is_still_in_the_sum():
    fed = Federation(make_cfg())
    fed.grid.vanish_at = {(2, UNMASK)}
    record = fed.run().rounds[0]
    assert_exact(fed, record, SITES)  # its input is in; the others' shares rebuild its seed
    assert record.secagg["silent_at_unmask"] == ["site-01"] and record.dropouts == {}


def test_below_the_threshold_the_round_is_aborted_and_the_model_kept():
    fed = Federation(make_cfg())
    fed.grid.vanish_at = {(1, MASKED), (4, MASKED)}
    result = fed.run()
    record = result.rounds[0]
    assert record.aborted and record.participants == []
    assert record.abort_reason == (
        "masked_input: only 2 of 4 sites remain after masked_input, below the threshold 3"
    )
    assert max_difference(result.arrays, fed.initial) == 0.0  # the previous model, untouched
    assert record.eval_accuracy is not None  # the kept model is still evaluated
    # the two sites still answering were told, and wiped the round's secrets at once
    told = sorted(node for node, message_type in fed.grid.log if message_type == ABORT)
    assert told == [2, 3]
    for node in told:
        state = fed.grid.context(node).state.config_records[records.STATE]
        assert state["expects"] == "done" and state["held-shares"] == []
        assert state["enc-private"] == b"" and state["own-share"] == b""
    document = metrics_document(fed.cfg, result, 1.0)
    entry = document["rounds"][0]
    assert entry["aborted"] is True and entry["abort_reason"] == record.abort_reason
    assert set(entry["dropouts"]) == {"site-00", "site-03"}


def test_a_declining_site_is_recorded_as_declined_and_the_others_are_summed(monkeypatch):
    def decline_site_01(cfg, site, *args):
        if site.site_id == "site-01":
            raise SiteDeclined("privacy budget exhausted", epsilon_spent=7.9, cap=8.0)
        return compute_update(cfg, site, *args)

    monkeypatch.setattr(client_secagg, "compute_update", decline_site_01)
    fed = Federation(make_cfg())
    record = fed.run().rounds[0]
    assert_exact(fed, record, ["site-00", "site-02", "site-03"])
    assert record.declined == ["site-01"]
    assert record.decline_reasons == {"site-01": "privacy budget exhausted"}
    assert record.dropouts == {}


# ---- hostile and broken replies ------------------------------------------------------------------
def _rewrite(node: int, message_type: str, change):
    def tamper(request: Message, reply: Message) -> Message:
        if reply.metadata.src_node_id == node and request.metadata.message_type == message_type:
            content = change(reply.content)
            return Message(content, reply_to=request)
        return reply

    return tamper


def _corrupt_first_share(content: RecordDict) -> RecordDict:
    config = content[records.SECAGG]
    blobs = list(config["ciphertexts"])
    blobs[0] = blobs[0][:-1] + bytes([blobs[0][-1] ^ 1])
    config["ciphertexts"] = blobs
    return content


def _masked_array(change):
    def rewrite(content: RecordDict) -> RecordDict:
        vector = content[records.MASKED][records.MASKED_ARRAY].numpy()
        content[records.MASKED] = ArrayRecord({records.MASKED_ARRAY: Array(change(vector))})
        return content

    return rewrite


def _secagg_field(name, value):
    def rewrite(content: RecordDict) -> RecordDict:
        content[records.SECAGG][name] = value
        return content

    return rewrite


def _drop_last_share(content: RecordDict) -> RecordDict:
    config = content[records.SECAGG]
    config["recipients"], config["ciphertexts"] = (
        config["recipients"][:-1],
        config["ciphertexts"][:-1],
    )
    return content


def _without(key):
    def rewrite(content: RecordDict) -> RecordDict:
        del content[key]
        return content

    return rewrite


@pytest.mark.parametrize(
    ("message_type", "change", "stage", "reason"),
    [
        (SHARE, _corrupt_first_share, "share_keys", "could not open its share"),
        (MASKED, _masked_array(lambda v: v[:-3]), "masked_input", "(2847,), expected (2850,)"),
        (MASKED, _masked_array(lambda v: v.astype(np.float32)), "masked_input", "float32"),
        (MASKED, _masked_array(lambda v: v.astype(np.int64)), "masked_input", "dtype int64"),
        (MASKED, _secagg_field("weight", 10**9), "masked_input", "weight 1000000000 outside"),
        (MASKED, _secagg_field("weight", "many"), "masked_input", "'weight' = 'many'"),
        (MASKED, _without(records.MASKED), "masked_input", "no 'secagg-masked' record"),
        (SETUP, _secagg_field("mask-key", b"\x00" * 32), "setup", "mask key"),
        (SETUP, _secagg_field("index", 3), "setup", "claims index 3, expected 2"),
        (SHARE, _drop_last_share, "share_keys", "addressed to [1, 3], expected [1, 3, 4]"),
        (SHARE, _without(records.SECAGG), "share_keys", "no 'secagg' record"),
    ],
)
def test_a_broken_or_hostile_reply_excludes_its_site_and_the_rest_sum_exactly(
    message_type, change, stage, reason
):
    fed = Federation(make_cfg())
    fed.grid.tamper = _rewrite(2, message_type, change)  # node 2 serves site-01
    record = fed.run().rounds[0]
    assert_exact(fed, record, ["site-00", "site-02", "site-03"])
    assert record.dropouts["site-01"]["stage"] == stage
    assert reason in record.dropouts["site-01"]["reason"], record.dropouts


def test_a_reply_replayed_from_an_earlier_round_is_excluded():
    kept: dict[str, RecordDict] = {}

    def replay(request: Message, reply: Message) -> Message:
        if reply.metadata.src_node_id == 2 and request.metadata.message_type == MASKED:
            if request.metadata.group_id == "1":
                kept["round 1"] = reply.content
            else:
                return Message(kept["round 1"], reply_to=request)  # the old masked input again
        return reply

    fed = Federation(make_cfg(rounds=2))
    fed.grid.tamper = replay
    first, second = fed.run().rounds
    assert_exact(fed, first, SITES)
    assert_exact(fed, second, ["site-00", "site-02", "site-03"])
    assert second.dropouts["site-01"]["stage"] == "masked_input"
    assert "replayed or stale" in second.dropouts["site-01"]["reason"]


def test_a_broken_privacy_receipt_excludes_its_site_and_never_the_round():
    from server.privacy_round import PrivacyRound

    def forge(content: RecordDict) -> RecordDict:
        content[keys.RECEIPT] = ConfigRecord({"payload": "{not json", "signature": b"x"})
        return content

    fed = Federation(make_cfg())
    fed.grid.tamper = _rewrite(2, MASKED, forge)
    record = fed.run(privacy=PrivacyRound(fed.cfg)).rounds[0]
    assert_exact(fed, record, ["site-00", "site-02", "site-03"])
    assert record.dropouts["site-01"]["stage"] == "masked_input"
    assert "unreadable privacy receipt" in record.dropouts["site-01"]["reason"]


def test_a_site_that_fails_is_a_dropout_with_the_error_and_never_a_crash(monkeypatch):
    original = client_secagg.handle_share_keys

    def broken(msg, context, cfg):
        if context.node_id == 4:
            raise RuntimeError("disk full")
        return original(msg, context, cfg)

    monkeypatch.setattr(client_secagg, "handle_share_keys", broken)
    fed = Federation(make_cfg())
    record = fed.run().rounds[0]
    assert_exact(fed, record, ["site-00", "site-01", "site-02"])
    assert record.dropouts["site-03"] == {
        "stage": "share_keys",
        "reason": "error: RuntimeError: disk full",
    }


def test_a_site_refuses_a_dishonest_server_asking_for_both_secrets():
    fed = Federation(make_cfg())
    refusals = []

    def ask_for_both(node_id: int, message: Message) -> Message:
        fed._remember(node_id, message)
        if message.metadata.message_type == UNMASK and node_id == 1:
            config = message.content[records.SECAGG]
            config["dropped"] = [2]  # site 2 also stays among the survivors: both secrets
        return message

    def watch(request: Message, reply: Message) -> Message:
        if request.metadata.message_type == UNMASK and reply.metadata.src_node_id == 1:
            refusals.append(dict(reply.content[records.SECAGG]))
        return reply

    fed.grid.tamper_request, fed.grid.tamper = ask_for_both, watch
    record = fed.run().rounds[0]
    (refusal,) = refusals
    assert "asked for both the self mask and the mask key of sites [2]" in refusal["refused"]
    assert "seed-shares" not in refusal and "key-shares" not in refusal
    # the three honest answers are enough (t = 3): the round still completes, exactly
    assert_exact(fed, record, SITES)
    assert record.secagg["silent_at_unmask"] == []  # it answered, with a refusal:
    assert "asked for both" in record.secagg["refused_at_unmask"]["site-00"]


def test_the_site_forgets_its_round_secrets_after_unmasking():
    fed = Federation(make_cfg())
    fed.run()
    state = fed.grid.context(1).state.config_records[records.STATE]
    assert state["expects"] == "done"
    for secret in ("enc-private", "mask-private", "self-seed", "own-share"):
        assert state[secret] == b""
    assert state["held-shares"] == [] and state["peer-mask-keys"] == []
    assert state["share-keys-with"] == [] and state["mask-seeds-with"] == []


def test_the_site_forgets_the_derived_pair_keys_once_used():
    """The share keys and pairwise mask seeds derived at the key sharing are kept only until
    the shares are opened and the input is masked (the masked-input request)."""
    fed = Federation(make_cfg())
    after: dict[str, dict] = {}

    def watch(request: Message, reply: Message) -> Message:
        state = fed.grid.context(1).state.config_records.get(records.STATE)
        if reply.metadata.src_node_id == 1 and state is not None:
            after[request.metadata.message_type] = dict(state)
        return reply

    fed.grid.tamper = watch
    fed.run()
    shared = after[SHARE]
    assert len(shared["share-keys-with"]) == 3 and all(
        len(k) == 32 for k in shared["share-keys-with"]
    )
    assert all(len(seed) == 32 for seed in shared["mask-seeds-with"])
    masked = after[MASKED]
    assert masked["share-keys-with"] == [b""] * 3 and masked["mask-seeds-with"] == [b""] * 3
    assert masked["mask-private"] == b"" and masked["self-seed"] == b""


def test_the_round_entry_point_reports_each_survivors_masked_input_metrics():
    """``run_secagg_round`` (the SecAggRound class behind it) keeps every site's train metrics of
    its masked-input reply, by site id, beside the aggregate."""
    from server.secagg_round import run_secagg_round

    fed = Federation(make_cfg())
    fed.grid.vanish_at = {(3, MASKED)}  # site-02 sends no input
    node_of = {site: i + 1 for i, site in enumerate(SITES)}
    rows = {
        site: len(load_site_data(fed.cfg, {"partition-id": i, "num-partitions": 4}).train.y)
        for i, site in enumerate(SITES)
    }
    strategy = build_strategy(fed.cfg.strategy)
    result = run_secagg_round(
        fed.grid, fed.cfg, strategy, 1, fed.initial, fed.grid, node_of, SITES, rows
    )
    survivors = ["site-00", "site-01", "site-03"]
    assert result.participants == survivors and not result.aborted
    assert sorted(result.site_metrics) == survivors
    for site in survivors:
        assert result.site_metrics[site][keys.NUM_EXAMPLES] == rows[site]
        assert result.site_metrics[site]["train_loss"] > 0
    assert result.summary["total_weight"] == sum(rows[s] for s in survivors)


# ---- pipelining: the next round's key stages ride on this round's masked input and consistency --
KEY_STAGES = ["setup", "share_keys"]


def _watch_requests(fed: Federation) -> list[tuple[int, int, str, bool]]:
    """(round, node, message type, carries the next round's request) of every request delivered."""
    seen: list[tuple[int, int, str, bool]] = []

    def watch(node_id: int, message: Message) -> Message:
        fed._remember(node_id, message)
        carries_next = records.NEXT in message.content.config_records
        group = int(message.metadata.group_id or 0)  # the query that finds the sites has none
        seen.append((group, node_id, message.metadata.message_type, carries_next))
        return message

    fed.grid.tamper_request = watch
    return seen


def test_a_steady_round_has_two_exchanges_the_next_rounds_key_stages_riding_on_them():
    """Masked input (+ the next round's setup) and unmask (+ its share distribution); the
    consistency signatures came with the inputs, so no consistency exchange runs."""
    fed = Federation(make_cfg(rounds=3))
    seen = _watch_requests(fed)
    result = fed.run()
    for record in result.rounds:
        assert_exact(fed, record, SITES)
        assert record.secagg["consistency_signed_with_inputs"] is True
        assert record.secagg["stage_seconds"]["consistency"] == 0.0
    assert [r.secagg["pipelined_stages"] for r in result.rounds] == [[], KEY_STAGES, KEY_STAGES]
    for record in result.rounds[1:]:
        assert [record.secagg["stage_seconds"][stage] for stage in KEY_STAGES] == [0.0, 0.0]
    # key exchanges of their own: round 1's only
    for own in (SETUP, SHARE):
        assert sorted((r, n) for r, n, t, _ in seen if t == own) == [(1, n) for n in (1, 2, 3, 4)]
    for carrier in (MASKED, UNMASK):  # rounds 1, 2 carry the next round's stage, 3 not
        carried = sorted((r, n, carries) for r, n, t, carries in seen if t == carrier)
        assert carried == [(r, n, r < 3) for r in (1, 2, 3) for n in (1, 2, 3, 4)]
    assert not [t for _, _, t, _ in seen if t == CONSISTENCY]
    for node in (1, 2, 3, 4):  # after the last round: one round left, wiped; none set up ahead
        state = fed.grid.context(node).state.config_records
        assert records.STATE_NEXT not in state
        assert (
            state[records.STATE]["expects"] == "done" and state[records.STATE]["self-seed"] == b""
        )


def test_a_site_sampled_next_round_but_not_this_one_gets_its_key_stages_in_the_same_batches():
    from server.sampling import sample_sites

    sites = [f"site-{i:02d}" for i in range(6)]
    fed = Federation(make_cfg(n=6, rounds=3, federation__sites_per_round=4.0))
    seen = _watch_requests(fed)
    result = fed.run()
    draws = [sample_sites(sites, 4, fed.cfg.seed, r) for r in (1, 2, 3)]
    assert draws[0] != draws[1] != draws[2]  # the seed gives different samples each round
    for record, drawn in zip(result.rounds, draws, strict=True):
        assert_exact(fed, record, drawn)
    assert [r.secagg["pipelined_stages"] for r in result.rounds] == [[], KEY_STAGES, KEY_STAGES]

    def nodes(site_ids) -> set[int]:
        return {int(site.split("-")[1]) + 1 for site in site_ids}

    newcomers = [nodes(set(draws[r]) - set(draws[r - 1])) for r in (1, 2)]  # of rounds 2 and 3
    assert all(newcomers)
    for own in (SETUP, SHARE):
        got = {r: {n for g, n, t, _ in seen if g == r and t == own} for r in (1, 2, 3)}
        # round 1: its own, plus round 2's newcomers; round 2: round 3's newcomers only
        assert got == {1: nodes(draws[0]) | newcomers[0], 2: newcomers[1], 3: set()}


def test_a_site_that_sends_no_input_brings_back_the_consistency_exchange_over_the_rest():
    """The early signatures name all four sites; site-02 sends nothing, so the survivors are
    asked to sign the three-site set, and the sum of their inputs is exact."""
    fed = Federation(make_cfg(rounds=2))
    fed.grid.vanish_at = {(3, MASKED)}  # node 3 serves site-02
    seen = _watch_requests(fed)
    first, second = fed.run().rounds
    survivors = ["site-00", "site-01", "site-03"]
    assert_exact(fed, first, survivors)
    assert first.secagg["consistency_signed_with_inputs"] is False
    assert first.secagg["stage_seconds"]["consistency"] > 0
    assert sorted(n for r, n, t, _ in seen if r == 1 and t == CONSISTENCY) == [1, 2, 4]
    assert_exact(fed, second, survivors)  # site-02 is gone; the rest sign with their inputs
    assert second.secagg["consistency_signed_with_inputs"] is True


def test_a_site_silent_at_the_unmasking_is_a_share_keys_dropout_of_the_next_round():
    fed = Federation(make_cfg(rounds=2))
    fed.grid.vanish_at = {(2, UNMASK)}  # node 2 serves site-01
    first, second = fed.run().rounds
    assert_exact(fed, first, SITES)  # its input is in; the others' shares rebuild its self mask
    assert first.secagg["silent_at_unmask"] == ["site-01"]
    assert_exact(fed, second, ["site-00", "site-02", "site-03"])
    assert second.secagg["pipelined_stages"] == KEY_STAGES
    assert second.dropouts == {"site-01": {"stage": "share_keys", "reason": "no reply"}}


@pytest.mark.parametrize(("carrier", "stage"), [(MASKED, "setup"), (UNMASK, "share_keys")])
def test_a_missing_pipelined_answer_excludes_its_site_from_the_next_round_only(carrier, stage):
    fed = Federation(make_cfg(rounds=2))
    fed.grid.tamper = _rewrite(2, carrier, _without(records.NEXT))
    first, second = fed.run().rounds
    assert_exact(fed, first, SITES)  # this round's half was fine
    assert_exact(fed, second, ["site-00", "site-02", "site-03"])
    assert second.dropouts["site-01"]["stage"] == stage
    assert "no 'secagg-next' record" in second.dropouts["site-01"]["reason"]


def test_a_site_refuses_a_stale_pipelined_setup_and_still_sends_its_input():
    fed = Federation(make_cfg(rounds=3))
    replies: list[RecordDict] = []

    def stale(node_id: int, message: Message) -> Message:
        fed._remember(node_id, message)
        masked_2 = message.metadata.message_type == MASKED and message.metadata.group_id == "2"
        if masked_2 and node_id == 1:  # round 3's setup, claiming to be round 1's: stale
            message.content[records.NEXT]["server-round"] = 1
        return message

    def watch(request: Message, reply: Message) -> Message:
        if request.metadata.message_type == MASKED and reply.metadata.src_node_id == 1:
            replies.append(reply.content)
        return reply

    fed.grid.tamper_request, fed.grid.tamper = stale, watch
    result = fed.run()
    assert_exact(fed, result.rounds[1], SITES)  # its masked input was sent and summed
    assert records.MASKED in replies[1]
    assert "setup for round 1 after round 2" in replies[1][records.NEXT]["refused"]
    third = result.rounds[2]
    assert_exact(fed, third, ["site-01", "site-02", "site-03"])
    assert third.dropouts["site-00"]["stage"] == "setup"
    assert "replayed or stale" in third.dropouts["site-00"]["reason"]


def _strip_round_1(message_type: str, nodes: tuple[int, ...], key: str, answers: list):
    """A tamper: round 1's ``message_type`` replies of ``nodes`` lose ``key``; every reply to an
    abort notice is kept in ``answers``."""

    def tamper(request: Message, reply: Message) -> Message:
        kind, group = request.metadata.message_type, request.metadata.group_id
        if kind == message_type and group == "1" and reply.metadata.src_node_id in nodes:
            del reply.content[key]
        if kind == ABORT:
            answers.append(reply.content[records.SECAGG])
        return reply

    return tamper


def test_a_round_aborted_at_unmask_leaves_the_pipelined_next_round_intact():
    fed = Federation(make_cfg(rounds=2))
    seen = _watch_requests(fed)
    abort_answers: list[ConfigRecord] = []
    # two sites' shares unreadable: 2 of t = 3
    fed.grid.tamper = _strip_round_1(UNMASK, (1, 2), records.SECAGG, abort_answers)
    first, second = fed.run().rounds
    assert first.aborted and first.abort_reason.startswith("unmask")
    assert_exact(fed, second, SITES)
    assert second.secagg["pipelined_stages"] == KEY_STAGES
    # each site holds round 2's shared keys and still found round 1 to wipe on the abort notice
    assert sorted(n for r, n, t, _ in seen if t == ABORT) == [1, 2, 3, 4]
    assert len(abort_answers) == 4 and not any("refused" in a for a in abort_answers)


def test_a_round_aborted_at_masked_input_leaves_the_next_round_set_up_and_wiped_its_own():
    fed = Federation(make_cfg(rounds=2))
    seen = _watch_requests(fed)
    abort_answers: list[ConfigRecord] = []
    # two sites send no input (their next round's adverts kept): 2 of t = 3
    fed.grid.tamper = _strip_round_1(MASKED, (1, 4), records.MASKED, abort_answers)
    first, second = fed.run().rounds
    assert first.aborted and first.abort_reason.startswith("masked_input")
    # each site holds round 2's keys and found round 1 to wipe on the abort notice
    assert sorted(n for r, n, t, _ in seen if t == ABORT) == [1, 2, 3, 4]
    assert len(abort_answers) == 4 and not any("refused" in a for a in abort_answers)
    assert second.secagg["pipelined_stages"] == ["setup"]  # its share distribution ran itself
    assert sorted((r, n) for r, n, t, _ in seen if t == SHARE) == [
        (r, n) for r in (1, 2) for n in (1, 2, 3, 4)
    ]
    assert_exact(fed, second, SITES)


# ---- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"strategy.name": "krum"}, "secagg.name"),
        ({"strategy.name": "fedtrimmedavg"}, "secagg.name"),
        ({"secagg.threshold": 0.4}, "secagg.threshold"),
        ({"secagg.threshold": 2.5}, "secagg.threshold"),
        ({"secagg.bits": 16}, "secagg.bits"),
        ({"secagg.clip_range": 0.0}, "secagg.clip_range"),
        ({"secagg.max_weight": 0}, "secagg.max_weight"),
        ({"secagg.neighbours": -2}, "secagg.neighbours"),
    ],
)
def test_secagg_config_errors_name_the_field_in_one_line(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_run_config({"secagg.name": "secaggplus", **overrides})
    message = str(info.value)
    assert message.startswith(field) and "\n" not in message
    if field == "secagg.name":
        assert "needs them" in message and "fedavg, fedprox, fedadam" in message
