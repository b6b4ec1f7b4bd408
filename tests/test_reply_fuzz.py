"""No reply crashes a round: arbitrary, truncated and wrongly typed replies through the real loop.

One site's reply at one stage (plain train and evaluate, and every SecAgg+ stage) is rewritten in
transit by hypothesis, on the in-process wire (tests/inprocess.py) with the real ClientApp and
round loop. The round must never raise: it completes with the exact sum of the well-formed sites
(SecAgg+: the SHA-256 of the ring sum, recomputed here from each survivor's own update; plain:
FedAvg of the replies delivered, recomputed here), or it aborts cleanly; every reason recorded
is one bounded line and metrics.json still serialises.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_secagg_app import SITES, Federation, make_cfg, max_difference

from fedgov import messages as keys
from privacy.secagg import records
from server.outputs import metrics_document

SETUP, SHARE, MASKED, CONSISTENCY, UNMASK, _ = (
    records.MESSAGE_TYPES[s] for s in records.MESSAGE_TYPES
)
HOSTILE_NODE = 2  # site-01
OTHERS = ["site-00", "site-02", "site-03"]
EXAMPLES = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_expected: dict[tuple[str, ...], str] = {}  # survivors → SHA-256 of their ring sum (round 1)

INT64 = st.integers(-(2**63), 2**63 - 1)
SCALARS = st.one_of(
    INT64,
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=80),
    st.booleans(),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=66, max_size=66),
    st.text(min_size=2000, max_size=3000),
)
LISTS = st.one_of(
    st.lists(st.integers(-3, 8), max_size=6),
    st.lists(INT64, max_size=4),
    st.lists(st.binary(max_size=80), max_size=5),
    st.lists(st.text(max_size=20), max_size=4),
    st.lists(st.floats(), max_size=3),
    st.lists(st.booleans(), max_size=3),
)
VALUES = st.one_of(SCALARS, LISTS)
KNOWN_KEYS = [
    "stage",
    "round-id",
    "index",
    "refused",
    "enc-key",
    "mask-key",
    "commitment",
    "recipients",
    "ciphertexts",
    "weight",
    "clipped",
    "bad-senders",
    "bad-reasons",
    "seed-share-owners",
    "seed-shares",
    "key-share-owners",
    "key-shares",
    "reason",
    "survivors",
    "signature",
]
ARRAYS = st.builds(
    lambda n, dtype, fill: np.full(n, fill).astype(dtype),
    st.integers(0, 12),
    st.sampled_from(["uint32", "uint64", "int64", "float32", "float64"]),
    st.integers(0, 2**31),
)


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _config(data, base: ConfigRecord | None) -> ConfigRecord:
    """A config record: ``base`` with keys deleted (truncated) or retyped, or made up."""
    record = dict(base or {})
    how = data.draw(st.sampled_from(["truncate", "retype", "invent"]))
    if how == "truncate" and record:
        for key in data.draw(st.sets(st.sampled_from(sorted(record)), min_size=1)):
            del record[key]
    elif how == "retype" and record:
        for key in data.draw(st.sets(st.sampled_from(sorted(record)), min_size=1, max_size=3)):
            record[key] = data.draw(VALUES)
    else:
        names = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(min_size=1, max_size=12))
        record = data.draw(st.dictionaries(names, VALUES, max_size=8))
    return ConfigRecord(record)


def _mutate(data, content: RecordDict) -> RecordDict:
    """``content`` with one part rewritten (a record retyped, truncated, dropped, or added)."""
    parts = dict(content.items())
    what = data.draw(
        st.sampled_from(
            [
                "secagg",
                "next",
                "drop-record",
                "arrays",
                "metrics",
                "decline",
                "site",
                "receipt",
                "empty",
            ]
        )
    )
    if what == "secagg":
        parts[records.SECAGG] = _config(data, content.config_records.get(records.SECAGG))
    elif what == "next":
        parts[records.NEXT] = _config(data, None)
    elif what == "drop-record" and parts:
        del parts[data.draw(st.sampled_from(sorted(parts)))]
    elif what == "arrays":
        name = data.draw(st.sampled_from([records.MASKED, keys.ARRAYS]))
        key = data.draw(st.sampled_from([records.MASKED_ARRAY, "x", "fc1.weight"]))
        parts[name] = ArrayRecord({key: Array(data.draw(ARRAYS))})
    elif what == "metrics":
        values = st.one_of(INT64, st.floats(), st.lists(st.floats(), max_size=3))
        names = st.sampled_from([keys.NUM_EXAMPLES, "train_loss", "eval_loss", "other"])
        parts[keys.METRICS] = MetricRecord(data.draw(st.dictionaries(names, values, max_size=4)))
    elif what == "decline":
        parts[keys.DECLINE] = _config(data, ConfigRecord({"reason": "budget"}))
    elif what == "site":
        parts[keys.SITE] = _config(data, content.config_records.get(keys.SITE))
    elif what == "receipt":
        parts[keys.RECEIPT] = _config(
            data, ConfigRecord({"payload": "{}", "signature": b"s", "public-key": b"k"})
        )
    else:
        parts = {}
    return RecordDict(parts)


def _hostile(data, message_type: str, delivered: dict[int, RecordDict]):
    def tamper(request: Message, reply: Message) -> Message:
        node = reply.metadata.src_node_id
        if node == HOSTILE_NODE and request.metadata.message_type == message_type:
            if reply.has_error():
                return reply
            reply = Message(_mutate(data, reply.content), reply_to=request)
        if request.metadata.message_type == message_type and not reply.has_error():
            delivered[node] = reply.content
        return reply

    return tamper


def _assert_bounded(record) -> None:
    reasons = [d["reason"] for d in record.dropouts.values()]
    reasons += list(record.failures.values()) + list(record.decline_reasons.values())
    if record.secagg:
        reasons += list(record.secagg.get("refused_at_unmask", {}).values())
        reasons += list(record.secagg.get("unsigned_at_consistency", {}).values())
    if record.abort_reason:
        reasons.append(record.abort_reason)
    for reason in reasons:
        assert "\n" not in reason and len(reason) <= 400, reason


@pytest.mark.slow
@pytest.mark.parametrize("message_type", [SETUP, SHARE, MASKED, CONSISTENCY, UNMASK])
@EXAMPLES
@given(data=st.data())
def test_any_secagg_reply_leaves_the_exact_sum_of_the_well_formed_sites_or_a_clean_abort(
    message_type, data
):
    fed = Federation(make_cfg())
    fed.grid.tamper = _hostile(data, message_type, {})
    result = fed.run()  # never raises
    (record,) = result.rounds
    _assert_bounded(record)
    json.dumps(metrics_document(fed.cfg, result, 1.0), default=str)
    if record.aborted:
        assert record.participants == []
        assert max_difference(result.arrays, fed.initial) == 0.0  # the model is kept
        return
    assert record.participants in (SITES, OTHERS), record
    if message_type in (CONSISTENCY, UNMASK):  # these replies never take an input out
        assert record.participants == SITES
    survivors = tuple(record.participants)
    if survivors not in _expected:
        _expected[survivors] = fed.expected_sum_sha256(1, record.secagg, list(survivors))
    assert record.secagg["sum_sha256"] == _expected[survivors]


def _well_formed_train(content: RecordDict, initial: ArrayRecord) -> bool:
    arrays = content.array_records.get(keys.ARRAYS)
    metrics = content.metric_records.get(keys.METRICS)
    if arrays is None or metrics is None or list(arrays.keys()) != list(initial.keys()):
        return False
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return False  # Flower's strategies aggregate exactly one of each
    if keys.DECLINE in content.config_records:
        return False  # a decline, readable or not, takes the site out
    weight = metrics.get(keys.NUM_EXAMPLES)
    return (
        isinstance(weight, int)
        and weight >= 1
        and all(arrays[k].numpy().shape == initial[k].numpy().shape for k in initial)
        and all(arrays[k].numpy().dtype.kind in "fiu" for k in initial)
        and all(np.isfinite(arrays[k].numpy()).all() for k in initial)
    )


@pytest.mark.slow
@pytest.mark.parametrize("message_type", ["train", "evaluate"])
@EXAMPLES
@given(data=st.data())
def test_any_plain_reply_leaves_fedavg_of_the_well_formed_sites(message_type, data):
    fed = Federation(make_cfg(secagg="off"))
    delivered: dict[int, RecordDict] = {}
    fed.grid.tamper = _hostile(data, message_type, delivered)
    result = fed.run()  # never raises
    (record,) = result.rounds
    _assert_bounded(record)
    json.dumps(metrics_document(fed.cfg, result, 1.0), default=str)
    if message_type == "evaluate":
        assert record.participants == SITES
        assert record.eval_loss is None or math.isfinite(record.eval_loss)
        return
    assert set(OTHERS) <= set(record.participants) <= set(SITES)
    hostile_in = "site-01" in record.participants
    assert hostile_in == _well_formed_train(delivered[HOSTILE_NODE], fed.initial)
    # FedAvg recomputed here (float64) from exactly the replies the server received
    nodes = [1 + SITES.index(site) for site in record.participants]
    weights = [delivered[n][keys.METRICS][keys.NUM_EXAMPLES] for n in nodes]
    for name in fed.initial:
        mean = sum(
            w * delivered[n][keys.ARRAYS][name].numpy().astype(np.float64)
            for n, w in zip(nodes, weights, strict=True)
        ) / sum(weights)
        np.testing.assert_allclose(result.arrays[name].numpy(), mean, rtol=1e-5, atol=1e-6)


def _decline_without_reason(content: RecordDict) -> RecordDict:
    return RecordDict({**dict(content.items()), keys.DECLINE: ConfigRecord({"spent": 10**3})})


@pytest.mark.parametrize(("secagg", "message_type"), [("off", "train"), ("secaggplus", MASKED)])
def test_a_decline_without_a_reason_excludes_its_site_and_the_round_completes(secagg, message_type):
    fed = Federation(make_cfg(secagg=secagg))

    def tamper(request: Message, reply: Message) -> Message:
        if reply.metadata.src_node_id == HOSTILE_NODE and request.metadata.message_type == (
            message_type
        ):
            return Message(_decline_without_reason(reply.content), reply_to=request)
        return reply

    fed.grid.tamper = tamper
    (record,) = fed.run().rounds
    assert record.participants == OTHERS
    assert record.decline_reasons == {"site-01": "declined without a reason (reason = None)"}
    if secagg == "secaggplus":
        assert record.secagg["sum_sha256"] == fed.expected_sum_sha256(1, record.secagg, OTHERS)


def test_float32_replies_to_a_float64_server_model_are_well_formed():
    """FedAdam keeps float64 weights; the sites answer in float32: every site still counts."""
    fed = Federation(make_cfg(secagg="off", rounds=2, strategy__name="fedadam"))
    second = fed.run().rounds[1]
    assert second.participants == SITES and second.failures == {}
