"""The SecAgg+ protocol objects end to end (site halves and server half, no transport).

Property tests drive n sites through the five stages with dropouts at every stage and check
the outcome against an independent oracle: the round completes exactly when it should, with the
exact ring sum of the survivors' inputs, and aborts otherwise. Hostile inputs (altered shares,
lying weights, wrong vectors, replays, requests for both secrets) exclude the culprit or are
refused; one site's masked input is uniform over the ring.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chi2

from privacy.secagg import keys, masking, shamir
from privacy.secagg.client import SiteSecAgg
from privacy.secagg.protocol import (
    MASKED_INPUT,
    SETUP,
    SHARE_KEYS,
    UNMASK,
    ConsistencyRequest,
    MaskedInput,
    MaskedInputRequest,
    ProtocolRefusal,
    RoundAborted,
    ShareKeysRequest,
    UnmaskRequest,
)
from privacy.secagg.server import SecAggSettings, ServerSecAgg

OK, DECLINE = "ok", "decline"
FATES = (OK, SETUP, SHARE_KEYS, MASKED_INPUT, DECLINE, UNMASK)  # the stage a site vanishes at


@dataclasses.dataclass
class Outcome:
    server: ServerSecAgg
    inputs: dict[int, np.ndarray]  # the plaintext ring vectors the sites would send
    ring_sum: np.ndarray | None = None
    survivors: tuple[int, ...] = ()
    aborted: RoundAborted | None = None


def run_round(
    n: int,
    config: SecAggSettings,
    length: int,
    fates: dict[int, str] | None = None,
    *,
    seed: int = 0,
    tamper=None,
    round_id: bytes | None = None,
) -> Outcome:
    """One round over n honest sites; ``fates`` says who vanishes (or declines) where.

    ``tamper(stage, index, payload) -> payload`` rewrites what a site sends (a hostile site).
    ``round_id``: fixes the round id, and with it a sparse neighbour graph (default: a fresh one).
    """
    fates = fates or {}
    tamper = tamper or (lambda stage, index, payload: payload)
    rng = np.random.default_rng(seed)
    server = ServerSecAgg(
        n, config, length, server_round=1, weight_scale=config.max_weight, round_id=round_id
    )
    dtype = masking.ring_dtype(config.bits)
    scale = server.scale
    inputs = {
        i: rng.integers(-scale, scale + 1, length).astype(np.int64).astype(dtype)
        for i in server.sites
    }
    out = Outcome(server, inputs)
    sites: dict[int, SiteSecAgg] = {}
    try:
        adverts = {}
        for i in server.alive():
            if fates.get(i) == SETUP:
                continue
            sites[i] = SiteSecAgg(
                server.setup_request(i), config.threshold, config.max_weight, config.neighbours
            )
            adverts[i] = tamper(SETUP, i, sites[i].advert())
        server.receive_adverts(adverts)
        shares = {}
        for i in server.alive():
            if fates.get(i) == SHARE_KEYS:
                continue
            try:
                shares[i] = tamper(SHARE_KEYS, i, sites[i].share_keys(server.share_keys_request(i)))
            except ProtocolRefusal as refusal:
                server.drop(i, SHARE_KEYS, refusal.reason, reachable=True)
        server.receive_ciphertexts(shares)
        masked = {}
        for i in server.alive():
            if fates.get(i) == MASKED_INPUT:
                continue
            bad = sites[i].accept_shares(server.masked_input_request(i))
            if fates.get(i) == DECLINE:
                sites[i].decline()
                server.drop(i, MASKED_INPUT, "declined", reachable=True)
                continue
            proof = sites[i].accusation_proof(bad)
            masked[i] = tamper(
                MASKED_INPUT,
                i,
                MaskedInput(sites[i].mask(inputs[i]), weight=1, bad_shares=bad, proof=proof),
            )
        server.receive_masked_inputs(masked)
        check = server.consistency_request()
        server.receive_signatures({i: sites[i].consistency(check) for i in server.alive()})
        request = server.unmask_request()
        answers = {
            i: tamper(UNMASK, i, sites[i].reveal(request))
            for i in server.unmask_targets()
            if fates.get(i) != UNMASK
        }
        result = server.finish(answers)
    except RoundAborted as aborted:
        out.aborted = aborted
        return out
    out.ring_sum, out.survivors = result.ring_sum, result.survivors
    return out


def plaintext_sum(out: Outcome, members) -> np.ndarray:
    dtype = out.server.dtype
    return np.sum([out.inputs[i] for i in members], axis=0, dtype=dtype).astype(dtype)


def oracle(n: int, graph: dict[int, tuple[int, ...]], t: int, fates: dict[int, str]):
    """(stage it aborts at or None, the survivors) — computed from the rules, not the code."""
    everyone = set(range(1, n + 1))
    u1 = {i for i in everyone if fates.get(i) != SETUP}
    if len(u1) < t:
        return SETUP, ()
    refusing = {i for i in u1 if len(set(graph[i]) & u1) + 1 < t}
    u2 = {i for i in u1 if fates.get(i) != SHARE_KEYS} - refusing
    while short := {i for i in u2 if len(set(graph[i]) & u2) + 1 < t}:
        u2 -= short  # too few neighbours left sharing: could not mask with t − 1 of them
    if len(u2) < t:
        return SHARE_KEYS, ()
    u3 = {i for i in u2 if fates.get(i) not in (MASKED_INPUT, DECLINE)}
    if len(u3) < t or any(len(set(graph[s]) & u3) < t - 1 for s in u3):
        return MASKED_INPUT, ()  # too few survivors, or one isolated below the design bound
    answering = {i for i in u2 if fates.get(i) not in (MASKED_INPUT, UNMASK)}
    needed = set(u3) | {j for j in u2 - u3 if set(graph[j]) & u3}
    for owner in needed:
        holders = ({owner} | (set(graph[owner]) & u2)) & answering
        if len(holders) < t:
            return UNMASK, ()
    return None, tuple(sorted(u3))


PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(
    data=st.data(),
    n=st.integers(2, 10),
    neighbours=st.sampled_from([0, 2, 4]),
    threshold=st.sampled_from([0.51, 0.66, 0.8, 1.0]),
    bits=st.sampled_from([32, 64]),
    length=st.integers(1, 40),
)
def test_unmasked_sum_is_the_exact_plaintext_sum_of_the_survivors(
    data, n, neighbours, threshold, bits, length
):
    config = SecAggSettings(threshold=threshold, neighbours=neighbours, bits=bits, max_weight=1)
    fate = st.sampled_from((OK,) * 10 + FATES[1:])  # mostly fine, or vanishing at any stage
    fates = {i: data.draw(fate, label=f"site {i}") for i in range(1, n + 1)}
    out = run_round(n, config, length, fates, seed=length)
    server = out.server
    stage, survivors = oracle(n, server.graph, server.threshold, fates)
    if stage is None:
        assert out.aborted is None, out.aborted
        assert out.survivors == survivors
        assert np.array_equal(out.ring_sum, plaintext_sum(out, survivors))
        lost = set(range(1, n + 1)) - set(survivors)
        assert set(server.dropouts) == lost
    else:
        assert out.aborted is not None and out.aborted.stage == stage, (out.aborted, stage)


def test_a_sparse_graph_of_forty_sites_with_dropouts_at_every_stage():
    config = SecAggSettings(threshold=0.66, neighbours=8, max_weight=1)
    fates = {3: SETUP, 7: SHARE_KEYS, 11: MASKED_INPUT, 12: DECLINE, 20: UNMASK, 31: MASKED_INPUT}
    # The graph is drawn from the round id; under some graphs these dropouts leave a survivor
    # with fewer than t live share holders, and the round rightly aborts (the property test above
    # covers those). This round id draws one where every secret can still be rebuilt.
    out = run_round(40, config, 1000, fates, round_id=b"sparse-graph-40!")
    assert out.server.degree == 8 and out.server.threshold == 6
    assert oracle(40, out.server.graph, 6, fates) == (None, out.survivors)
    assert out.aborted is None
    assert out.survivors == tuple(i for i in range(1, 41) if i not in (3, 7, 11, 12, 31))
    assert np.array_equal(out.ring_sum, plaintext_sum(out, out.survivors))
    assert {i: d.stage for i, d in out.server.dropouts.items()} == {
        3: SETUP,
        7: SHARE_KEYS,
        11: MASKED_INPUT,
        12: MASKED_INPUT,
        31: MASKED_INPUT,
    }


def test_below_the_threshold_the_round_aborts_with_the_reason():
    config = SecAggSettings(threshold=0.66, max_weight=1)  # 4 sites: t = 3
    out = run_round(4, config, 10, {1: MASKED_INPUT, 2: DECLINE})
    assert out.aborted is not None and out.aborted.stage == MASKED_INPUT
    assert "only 2 of 4 sites remain" in out.aborted.reason and "threshold 3" in out.aborted.reason
    with pytest.raises(RoundAborted, match="needs 2"):
        ServerSecAgg(1, config, 10, 1)
    with pytest.raises(RoundAborted, match="exceeds the share group"):
        ServerSecAgg(3, dataclasses.replace(config, threshold=5), 10, 1)


# ---- hostile and broken input --------------------------------------------------------------------
def test_an_altered_share_excludes_its_sender_and_the_sum_of_the_rest_is_exact():
    def alter(stage, index, payload):
        if stage == SHARE_KEYS and index == 2:
            blob = bytearray(payload[4])
            blob[20] ^= 0xFF
            payload = {**payload, 4: bytes(blob)}
        return payload

    out = run_round(6, SecAggSettings(max_weight=1), 50, tamper=alter)
    assert out.aborted is None and out.survivors == (1, 3, 4, 5, 6)
    assert np.array_equal(out.ring_sum, plaintext_sum(out, out.survivors))
    dropout = out.server.dropouts[2]
    assert dropout.stage == SHARE_KEYS and "site 4 could not open its share" in dropout.reason


def test_a_well_encrypted_but_wrong_share_cannot_corrupt_the_sum(monkeypatch):
    """Site 1 sends site 3 a share of another seed; the commitment check finds a good set."""
    seen = {}
    original_init = SiteSecAgg.__init__

    def remember(self, request, *args):
        original_init(self, request, *args)
        seen[request.index] = self

    monkeypatch.setattr(SiteSecAgg, "__init__", remember)

    def lie(stage, index, payload):
        if stage == SHARE_KEYS and index == 1:
            liar, victim = seen[1], seen[3]
            key = keys.agree(
                liar.enc_private, victim.enc_public, liar.round_id, keys.PURPOSE_SHARES, 1, 3
            )
            forged = shamir.share_to_bytes(12345) * 2
            payload = {**payload, 3: keys.encrypt_share(key, liar.round_id, 1, 3, forged)}
        return payload

    out = run_round(5, SecAggSettings(max_weight=1), 30, tamper=lie)
    assert out.aborted is None and out.survivors == (1, 2, 3, 4, 5)
    assert np.array_equal(out.ring_sum, plaintext_sum(out, out.survivors))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: dataclasses.replace(m, vector=m.vector[:-1]), "shape (29,), expected (30,)"),
        (lambda m: dataclasses.replace(m, vector=m.vector.astype(np.float32)), "dtype float32"),
        (lambda m: dataclasses.replace(m, vector=m.vector.astype(np.uint64)), "dtype uint64"),
        (lambda m: dataclasses.replace(m, weight=10**9), "weight 1000000000 outside [0, 100]"),
        (lambda m: dataclasses.replace(m, weight=-1), "weight -1 outside"),
        (lambda m: dataclasses.replace(m, weight=2.5), "not a whole number"),
    ],
)
def test_a_malformed_masked_input_excludes_its_site_and_the_rest_sum_exactly(change, reason):
    def hostile(stage, index, payload):
        return change(payload) if stage == MASKED_INPUT and index == 3 else payload

    config = SecAggSettings(max_weight=100)
    out = run_round(5, config, 30, tamper=hostile)
    assert out.aborted is None and out.survivors == (1, 2, 4, 5)
    assert np.array_equal(out.ring_sum, plaintext_sum(out, out.survivors))
    assert out.server.dropouts[3].stage == MASKED_INPUT
    assert reason in out.server.dropouts[3].reason


def test_an_unusable_public_key_excludes_its_site_at_setup():
    def bad_key(stage, index, payload):
        if stage == SETUP and index == 2:
            return dataclasses.replace(payload, mask_key=bytes(32))  # a low-order point
        return payload

    out = run_round(4, SecAggSettings(max_weight=1), 8, tamper=bad_key)
    assert out.survivors == (1, 3, 4)
    assert out.server.dropouts[2].stage == SETUP
    assert "mask key" in out.server.dropouts[2].reason


def _site_through_masking(n: int = 4, signed: tuple[int, ...] = ()):
    """n sites that masked their inputs; those in ``signed`` also signed ``signed`` as the
    survivor set (the consistency check)."""
    config = SecAggSettings(max_weight=1)
    server = ServerSecAgg(n, config, 8, 1, weight_scale=1)
    sites = {i: SiteSecAgg(server.setup_request(i), config.threshold, 1) for i in server.sites}
    server.receive_adverts({i: s.advert() for i, s in sites.items()})
    server.receive_ciphertexts(
        {i: s.share_keys(server.share_keys_request(i)) for i, s in sites.items()}
    )
    for i, s in sites.items():
        s.accept_shares(server.masked_input_request(i))
        s.mask(np.zeros(8, np.uint32))
    for i in signed:
        sites[i].consistency(ConsistencyRequest(server.round_id, signed))
    return server, sites


def test_a_site_reveals_only_for_the_survivor_set_it_signed():
    server, sites = _site_through_masking(signed=(1, 2, 3, 4))
    round_id = server.round_id
    unsigned = _site_through_masking()[1][1]  # a survivor never asked to sign: reveals nothing
    with pytest.raises(ProtocolRefusal, match="unmask request out of order"):
        unsigned.reveal(UnmaskRequest(unsigned.round_id, survivors=(1, 2, 3, 4), dropped=()))
    # the server claims site 4 dropped: site 1 signed that 4 survived, and refuses
    with pytest.raises(ProtocolRefusal, match="not the one this site signed"):
        sites[1].reveal(UnmaskRequest(round_id, survivors=(1, 2, 3), dropped=(4,)))
    assert sites[1].held  # nothing revealed, nothing forgotten
    shares = sites[1].reveal(UnmaskRequest(round_id, survivors=(1, 2, 3, 4), dropped=()))
    assert set(shares.self_shares) == {1, 2, 3, 4} and shares.key_shares == {}
    with pytest.raises(ProtocolRefusal, match="is not named a survivor"):
        unsigned.consistency(ConsistencyRequest(unsigned.round_id, (2, 3, 4)))


def test_a_site_refuses_to_reveal_both_secrets_of_any_site_or_to_answer_twice():
    server, sites = _site_through_masking(signed=(1, 2, 3))
    round_id = server.round_id
    with pytest.raises(ProtocolRefusal, match=r"both .* sites \[2\]"):
        sites[1].reveal(UnmaskRequest(round_id, survivors=(1, 2, 3), dropped=(2,)))
    with pytest.raises(ProtocolRefusal, match="fewer than the threshold"):
        sites[1].reveal(UnmaskRequest(round_id, survivors=(1, 2), dropped=(3, 4)))
    first = sites[2].reveal(UnmaskRequest(round_id, survivors=(1, 2, 3), dropped=(4,)))
    assert set(first.self_shares) == {1, 2, 3} and set(first.key_shares) == {4}
    # a second request (say, now claiming site 3 dropped) gets nothing: the secrets are gone
    with pytest.raises(ProtocolRefusal, match="out of order"):
        sites[2].reveal(UnmaskRequest(round_id, survivors=(1, 2, 4), dropped=(3,)))
    assert sites[2].state_dict()["held-shares"] == [] and sites[2].self_seed == b""


def test_requests_of_another_round_are_refused_as_replays():
    _server, sites = _site_through_masking()
    other = keys.new_round_id()
    with pytest.raises(ProtocolRefusal, match="replayed or stale"):
        sites[1].reveal(UnmaskRequest(other, survivors=(1, 2, 3, 4), dropped=()))
    with pytest.raises(ProtocolRefusal, match="replayed or stale"):
        sites[1].share_keys(ShareKeysRequest(other, peers={}))
    with pytest.raises(ProtocolRefusal, match="replayed or stale"):
        sites[1].accept_shares(MaskedInputRequest(other, shares={}))


def test_a_site_refuses_a_threshold_weaker_than_its_own_setting():
    server = ServerSecAgg(10, SecAggSettings(threshold=0.9, max_weight=1), 4, 1)
    request = dataclasses.replace(server.setup_request(1), threshold=3)
    with pytest.raises(ProtocolRefusal, match="accepts 9 … 10"):
        SiteSecAgg(request, 0.9, 1)
    with pytest.raises(ProtocolRefusal, match="weight scale"):
        SiteSecAgg(dataclasses.replace(server.setup_request(1), weight_scale=5), 0.9, 1)


def test_a_site_refuses_a_neighbour_list_that_is_not_the_rounds_graph():
    server = ServerSecAgg(30, SecAggSettings(neighbours=8, max_weight=1), 4, 1)
    honest = server.setup_request(5)
    assert SiteSecAgg(honest, 0.66, 1, neighbours=8).neighbours == honest.neighbours
    for neighbours in (honest.neighbours[:-2], tuple(sorted({*honest.neighbours[1:], 29, 30}))):
        with pytest.raises(ProtocolRefusal, match="not this round's graph"):
            SiteSecAgg(dataclasses.replace(honest, neighbours=neighbours), 0.66, 1, neighbours=8)
    with pytest.raises(ProtocolRefusal, match="not this round's graph"):  # a sparser graph
        SiteSecAgg(honest, 0.66, 1, neighbours=0)


def test_the_site_state_survives_a_round_trip_through_its_record():
    _server, sites = _site_through_masking()
    restored = SiteSecAgg.from_state_dict(sites[1].state_dict())
    assert restored.state_dict() == sites[1].state_dict()


# ---- what one masked input reveals ---------------------------------------------------------------
def _chi_square_p(values: np.ndarray, buckets: int) -> float:
    counts = np.bincount(values, minlength=buckets)
    expected = len(values) / buckets
    statistic = float(((counts - expected) ** 2).sum() / expected)
    return float(chi2.sf(statistic, buckets - 1))


def test_one_masked_update_is_uniform_over_the_ring_and_unlike_the_plaintext():
    length = 1 << 20
    config = SecAggSettings(max_weight=1)
    server = ServerSecAgg(3, config, length, 1, weight_scale=1)
    sites = {i: SiteSecAgg(server.setup_request(i), config.threshold, 1) for i in server.sites}
    server.receive_adverts({i: s.advert() for i, s in sites.items()})
    server.receive_ciphertexts(
        {i: s.share_keys(server.share_keys_request(i)) for i, s in sites.items()}
    )
    # a very structured plaintext: small values around zero, as quantised updates are
    rng = np.random.default_rng(0)
    plain = rng.integers(-1000, 1000, length).astype(np.int64).astype(np.uint32)
    sites[1].accept_shares(server.masked_input_request(1))
    masked = sites[1].mask(plain)
    buckets = {"top bits": lambda v: v >> np.uint32(22), "low bits": lambda v: v & np.uint32(1023)}
    for name, bucket in buckets.items():
        assert _chi_square_p(bucket(masked).astype(np.int64), 1024) > 1e-6, name
        assert _chi_square_p(bucket(plain).astype(np.int64), 1024) < 1e-12, name  # the test bites
    assert np.count_nonzero(masked == plain) < 5  # P(equal) = 2^-32 per value
    # neither is it correlated with the plaintext
    assert abs(np.corrcoef(masked.astype(np.float64), plain.astype(np.float64))[0, 1]) < 0.01
