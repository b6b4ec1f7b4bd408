"""A cheating coordinator and hostile sites against SecAgg+, through the real ClientApp and loop.

Each test plays the adversary on the in-process wire (tests/inprocess.py: real handlers, records
serialised as on the wire) and asserts what the sites did: refused with the reason, revealed
nothing of the victim, and the sum of the others is exact (SHA-256 of the ring sum, recomputed
from each survivor's own update), or the round aborted before anything was revealed.
"""

from __future__ import annotations

import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity
from test_secagg_app import Federation, assert_exact, make_cfg

from privacy.secagg import graph as secagg_graph
from privacy.secagg import records
from privacy.secagg import server as secagg_server

SETUP, SHARE, MASKED, CONSISTENCY, UNMASK, ABORT = (
    records.MESSAGE_TYPES[s] for s in records.MESSAGE_TYPES
)


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _sites(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


def _replies_of(fed: Federation, message_type: str) -> dict[int, dict]:
    """node → the SECAGG record of its reply to ``message_type`` (filled as the round runs)."""
    seen: dict[int, dict] = {}

    def watch(request: Message, reply: Message) -> Message:
        if request.metadata.message_type == message_type and not reply.has_error():
            secagg = reply.content.config_records.get(records.SECAGG)
            seen[reply.metadata.src_node_id] = {
                **dict(secagg or {}),
                "has-masked": records.MASKED in reply.content.array_records,
            }
        return reply

    fed.grid.tamper = watch
    return seen


# ---- problem 1: withheld shares ------------------------------------------------------------------
@pytest.mark.parametrize(("n", "kept"), [(3, 0), (5, 0), (10, 0), (10, 5)])
def test_a_site_whose_shares_are_withheld_refuses_to_mask_and_nothing_of_it_is_unmasked(n, kept):
    """The server forwards the victim (node 1) fewer than t − 1 of its neighbours' shares."""
    fed = Federation(make_cfg(n=n))

    def withhold(node_id: int, message: Message) -> Message:
        fed._remember(node_id, message)
        if node_id == 1 and message.metadata.message_type == MASKED:
            config = message.content[records.SECAGG]
            config["senders"] = list(config["senders"])[:kept]
            config["ciphertexts"] = list(config["ciphertexts"])[:kept]
        return message

    fed.grid.tamper_request = withhold
    masked_replies = _replies_of(fed, MASKED)
    record = fed.run().rounds[0]
    victim = masked_replies[1]
    assert "masks nothing with so few" in victim["refused"]
    assert victim["has-masked"] is False  # no masked input ever left the victim
    assert record.dropouts["site-00"]["stage"] == "masked_input"
    assert_exact(fed, record, _sites(n)[1:])  # the others, exactly


# ---- problem 3: isolation on a sparse graph ------------------------------------------------------
def _isolate_node_1(fed: Federation) -> dict[str, tuple[int, ...]]:
    """At setup, make every neighbour of site index 1 vanish after sharing its keys."""
    seen: dict[str, tuple[int, ...]] = {}

    def watch(node_id: int, message: Message) -> Message:
        fed._remember(node_id, message)
        if node_id == 1 and message.metadata.message_type == SETUP:
            config = message.content[records.SECAGG]
            seen["neighbours"] = tuple(config["neighbours"])
            fed.grid.vanish_at |= {(j, MASKED) for j in config["neighbours"]}
        return message

    fed.grid.tamper_request = watch
    return seen


@pytest.mark.slow
def test_an_honest_server_aborts_before_unmasking_a_survivor_whose_neighbours_all_dropped():
    fed = Federation(make_cfg(n=20, secagg__neighbours=8))
    seen = _isolate_node_1(fed)
    record = fed.run().rounds[0]
    assert len(seen["neighbours"]) == 8 and record.secagg["threshold"] == 6
    assert record.aborted and record.abort_reason.startswith("masked_input: survivors [1")
    assert "fewer than 5 surviving neighbours" in record.abort_reason
    assert UNMASK not in {message_type for _, message_type in fed.grid.log}


@pytest.mark.slow
def test_the_sites_refuse_to_reveal_for_a_server_that_unmasks_an_isolated_survivor(monkeypatch):
    """The coordinator skips its own check and goes on: every survivor refuses to sign that
    survivor set (and would refuse to reveal for it), nothing is asked or revealed."""
    monkeypatch.setattr(secagg_server, "isolated_survivors", lambda *args: [])
    fed = Federation(make_cfg(n=20, secagg__neighbours=8))
    seen = _isolate_node_1(fed)
    consistency = _replies_of(fed, CONSISTENCY)
    record = fed.run().rounds[0]
    survivors = set(range(1, 21)) - set(seen["neighbours"])
    assert set(consistency) == survivors
    for reply in consistency.values():
        assert "design bound t − 1" in reply["refused"]
        assert "signature" not in reply
    assert record.aborted and record.abort_reason.startswith("consistency: 0 survivors signed")
    assert UNMASK not in {message_type for _, message_type in fed.grid.log}


def test_the_isolation_rule_is_the_design_bound():
    graph = secagg_graph.neighbour_graph(20, 8, b"0123456789abcdef")
    survivors = set(range(1, 21)) - set(graph[1])
    assert secagg_graph.isolated_survivors(graph, survivors, 6)[0] == 1
    assert secagg_graph.isolated_survivors(graph, range(1, 21), 6) == []
    # three of 1's eight neighbours gone: it keeps 5 = t − 1, fine; a fourth: below the bound
    gone = list(graph[1])
    assert 1 not in secagg_graph.isolated_survivors(graph, set(range(1, 21)) - set(gone[:3]), 6)
    assert 1 in secagg_graph.isolated_survivors(graph, set(range(1, 21)) - set(gone[:4]), 6)


# ---- problem 5: accusations need proof -----------------------------------------------------------
def _accuse(fed: Federation, proof_of):
    """Site-01 (node 2) claims site index 1's share did not open, with ``proof_of(fed)``."""

    def tamper(request: Message, reply: Message) -> Message:
        if reply.metadata.src_node_id == 2 and request.metadata.message_type == MASKED:
            config = reply.content[records.SECAGG]
            config["bad-senders"], config["bad-reasons"] = [1], ["x" * 10_000]
            config["accusation-proof"] = proof_of(fed)
        return reply

    return tamper


def _real_key(fed: Federation) -> bytes:
    return fed.grid.context(2).state.config_records[records.STATE]["enc-private"]


@pytest.mark.parametrize(
    ("proof_of", "why"),
    [
        (lambda fed: b"", "no proof"),
        (lambda fed: bytes(range(32)), "the proof is not the key the accuser advertised"),
        (_real_key, "the share opens with the accuser's own key"),
    ],
)
def test_a_forged_accusation_is_ignored_with_a_bounded_reason_and_the_sum_is_exact(proof_of, why):
    fed = Federation(make_cfg())
    fed.grid.tamper = _accuse(fed, proof_of)
    record = fed.run().rounds[0]
    assert_exact(fed, record, _sites(4))  # site-00 stays in the sum
    assert record.dropouts == {}
    (reason,) = record.secagg["ignored_accusations"].values()
    assert list(record.secagg["ignored_accusations"]) == ["site-01"]
    assert reason.startswith("against site 1 ignored: ") and why in reason
    assert len(reason) <= 200


# ---- problem 6: a bad share never aborts a round that has t good ones ---------------------------
@pytest.mark.slow
def test_bad_shares_from_the_lowest_index_holder_at_twenty_sites_leave_the_exact_sum():
    from privacy.secagg import shamir

    fed = Federation(make_cfg(n=20))

    def lie(request: Message, reply: Message) -> Message:
        if reply.metadata.src_node_id == 1 and request.metadata.message_type == UNMASK:
            config = reply.content[records.SECAGG]
            config["seed-shares"] = [shamir.share_to_bytes(12345)] * len(config["seed-shares"])
        return reply

    fed.grid.tamper = lie
    record = fed.run().rounds[0]
    assert record.secagg["threshold"] == 14 and record.secagg["neighbours"] == 19
    assert_exact(fed, record, _sites(20))
    # index 1 (site-00) was found out: its shares (its own seed's too) fit no rebuilt polynomial
    assert record.secagg["bad_share_holders"] == {"site-00": _sites(20)}
