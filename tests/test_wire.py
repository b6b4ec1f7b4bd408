"""Packed weights on the wire (fedgov/wire.py): exact round trips, fewer objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedgov import wire


def _arrays() -> ArrayRecord:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    record = ArrayRecord(model.state_dict())
    record["steps"] = Array(np.arange(3, dtype=np.int64))
    return record


def _message(content: RecordDict) -> Message:
    return Message(content, dst_node_id=7, message_type="train")


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are stamped with the identity of the task running them (here: site node 7)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7


def test_packing_round_trips_every_array_exactly_and_sends_fewer_objects():
    arrays = _arrays()
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 3})})
    packed = wire.pack(content)
    assert wire.any_packed(packed) and not wire.any_packed(content)
    assert len(packed["arrays"]) == 1 and packed["config"] is content["config"]
    restored = wire.unpack(packed)
    assert list(restored["arrays"].keys()) == list(arrays.keys())
    for key, array in arrays.items():
        again = restored["arrays"][key]
        assert (again.dtype, again.shape, again.stype, again.data) == (
            array.dtype,
            array.shape,
            array.stype,
            array.data,
        )
    assert restored["arrays"].object_id == arrays.object_id
    plain_objects = len(get_all_nested_objects(_message(content)))
    packed_objects = len(get_all_nested_objects(_message(packed)))
    assert packed_objects == plain_objects - 2 * (len(arrays) - 1)


def test_nothing_to_pack_leaves_the_content_as_it_is():
    single = RecordDict({"vector": ArrayRecord({"v": Array(np.ones(4, dtype=np.float32))})})
    assert wire.pack(single) is single
    metrics = RecordDict({"metrics": MetricRecord({"loss": 0.5})})
    assert wire.pack(metrics) is metrics and wire.unpack(metrics) is metrics


def test_messages_sharing_the_global_model_pack_it_once():
    content = RecordDict({"arrays": _arrays()})
    messages = wire.pack_messages([_message(content), _message(content)])
    assert messages[0].content["arrays"] is messages[1].content["arrays"]
    assert wire.any_packed(messages[0].content)


def test_the_client_mod_answers_packed_only_when_asked_packed():
    seen: list[RecordDict] = []

    def handler(message: Message, context: Context) -> Message:
        seen.append(message.content)
        return Message(
            RecordDict({"arrays": _arrays(), "m": MetricRecord({"x": 1.0})}), reply_to=message
        )

    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    plain = _message(RecordDict({"arrays": _arrays()}))
    reply = wire.client_mod(plain, context, handler)
    assert not wire.any_packed(seen[-1]) and not wire.any_packed(reply.content)

    packed = wire.pack_messages([_message(RecordDict({"arrays": _arrays()}))])[0]
    reply = wire.client_mod(packed, context, handler)
    assert not wire.any_packed(seen[-1])  # the handler saw plain records
    assert wire.any_packed(reply.content)
    assert wire.unpack(reply.content)["arrays"].object_id == _arrays().object_id


def test_a_corrupt_packed_record_is_refused():
    packed = wire.pack(RecordDict({"arrays": _arrays()}))
    array = packed["arrays"]["packed"]
    broken = ArrayRecord(
        {
            "packed": Array(
                dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data + b"x"
            )
        }
    )
    with pytest.raises(ValueError):
        wire.unpack(RecordDict({"arrays": broken}))


def test_the_server_packs_only_for_a_superlink_and_drops_an_unreadable_reply():
    from inprocess import InProcessGrid

    from clients.app import app
    from server.messaging import SampledGrid, _unpacked, packs_weights

    grid = InProcessGrid(app, [{}], {})
    assert not packs_weights(grid) and not packs_weights(SampledGrid(grid, [1]))

    content = wire.pack(RecordDict({"arrays": _arrays()}))
    array = content["arrays"]["packed"]
    short = ArrayRecord(
        {
            "packed": Array(
                dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data[:-5]
            )
        }
    )
    good, bad = _message(content), _message(RecordDict({"arrays": short}))
    assert _unpacked(good) and not wire.any_packed(good.content)
    assert not _unpacked(bad)
