"""Field-by-field checks of the plain train and evaluate replies before the strategy sees them.

A site may send anything. Every reply the round loop hands to a Flower strategy passes through
here first; one that does not fit excludes its site from the round with a bounded reason (one
line, ``messages.MAX_REASON_CHARS``), never the round. A train reply must hold exactly the records
``fedgov.messages`` documents: ``ARRAYS`` with the global model's keys and shapes, numeric, and only
finite values, and ``METRICS`` with a whole ``num-examples`` in [1, ``MAX_EXAMPLES``] and finite
values. The strategy then gets a canonical copy of each reply (those two records only, the
metrics every good reply shares), so Flower's consistency checks cannot fail a whole round
because of one site's extra records or keys. (SecAgg+ replies: privacy/secagg/records.py.)
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedgov import messages as keys

MAX_EXAMPLES = 2**53  # a weight the strategies' float arithmetic holds exactly


class ReplyProblem(ValueError):
    """Why a reply cannot be used (bounded, one line)."""


def check_train_reply(reply: Message, global_arrays: ArrayRecord) -> None:
    """Raise :class:`ReplyProblem` unless ``reply`` is a usable train reply for this model."""
    content = _content(reply)
    arrays = content.array_records.get(keys.ARRAYS)
    if arrays is None or len(content.array_records) != 1:
        raise ReplyProblem(f"a train reply needs exactly one ArrayRecord '{keys.ARRAYS}'")
    if list(arrays.keys()) != list(global_arrays.keys()):
        raise ReplyProblem(
            keys.bounded(f"arrays {list(arrays.keys())}, expected {list(global_arrays.keys())}")
        )
    for name in global_arrays:
        expected = global_arrays[name]
        try:
            value = arrays[name].numpy()
        except Exception as error:
            raise ReplyProblem(keys.bounded(f"array '{name}' unreadable: {error!r}")) from None
        # The shape must match; the dtype only be numeric (a server optimiser such as FedAdam
        # keeps float64 weights while the sites train in float32).
        if value.shape != tuple(expected.shape) or value.dtype.kind not in "fiu":
            raise ReplyProblem(
                keys.bounded(
                    f"array '{name}' of shape {value.shape} and dtype {value.dtype}, expected "
                    f"shape {tuple(expected.shape)}, numeric"
                )
            )
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise ReplyProblem(keys.bounded(f"array '{name}' holds NaN or infinite values"))
    check_metrics(content)


def check_evaluate_reply(reply: Message) -> None:
    """Raise :class:`ReplyProblem` unless ``reply`` is a usable evaluate reply."""
    check_metrics(_content(reply))


def check_metrics(content: RecordDict) -> None:
    """``METRICS``: the only MetricRecord, a whole ``num-examples`` ≥ 1, finite numbers."""
    metrics = content.metric_records.get(keys.METRICS)
    if metrics is None or len(content.metric_records) != 1:
        raise ReplyProblem(f"a reply needs exactly one MetricRecord '{keys.METRICS}'")
    weight = metrics.get(keys.NUM_EXAMPLES)
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise ReplyProblem(keys.bounded(f"'{keys.NUM_EXAMPLES}' = {weight!r} is not whole"))
    if not 1 <= weight <= MAX_EXAMPLES:
        raise ReplyProblem(f"'{keys.NUM_EXAMPLES}' = {weight} outside [1, 2^53]")
    for name in metrics:
        values = metrics[name]
        values = values if isinstance(values, list) else [values]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ReplyProblem(keys.bounded(f"metric '{name}' is NaN or infinite"))


def canonical(replies: Sequence[Message], drop: Collection[str] = ()) -> list[Message]:
    """Checked replies as the strategy should see them: ``ARRAYS`` (if any) and ``METRICS``
    restricted to the metric names every reply has, less ``drop``, in a fixed order."""
    names = _common_metric_names(reply.content.metric_records[keys.METRICS] for reply in replies)
    names = [name for name in names if name not in drop]
    result = []
    for reply in replies:
        content = reply.content
        metrics = content.metric_records[keys.METRICS]
        records: dict[str, object] = {keys.METRICS: MetricRecord({n: metrics[n] for n in names})}
        if keys.ARRAYS in content.array_records:
            records[keys.ARRAYS] = content.array_records[keys.ARRAYS]
        message = Message(
            RecordDict(records),  # type: ignore[arg-type]
            dst_node_id=0,
            message_type=reply.metadata.message_type,
            group_id=reply.metadata.group_id,
        )
        result.append(message)
    return result


# The eval metrics a train reply carries when asked to evaluate first (fedgov/messages.py).
EVAL_IN_TRAIN = (keys.EVAL_LOSS, keys.EVAL_ACCURACY, keys.EVAL_NUM_EXAMPLES)


def evaluation_in(metrics: MetricRecord | None, server_round: int) -> Message | None:
    """The evaluate reply a train reply's ``METRICS`` holds (``eval_loss``, ``eval_accuracy``,
    ``num-examples``), checked like any evaluate reply later; None when it reports no evaluation
    (no ``eval-num-examples``: the site was not asked, or ignored the flag)."""
    if metrics is None or keys.EVAL_NUM_EXAMPLES not in metrics:
        return None
    values = {
        name: metrics[name] for name in (keys.EVAL_LOSS, keys.EVAL_ACCURACY) if name in metrics
    }
    values[keys.NUM_EXAMPLES] = metrics[keys.EVAL_NUM_EXAMPLES]
    return Message(
        RecordDict({keys.METRICS: MetricRecord(values)}),  # type: ignore[arg-type]
        dst_node_id=0,
        message_type=MessageType.EVALUATE,
        group_id=str(server_round),
    )


def _common_metric_names(metrics: Sequence[MetricRecord] | object) -> list[str]:
    sets = [set(m.keys()) for m in metrics]  # type: ignore[attr-defined]
    common = set.intersection(*sets) if sets else set()
    return sorted(common)


def _content(reply: Message) -> RecordDict:
    if reply.has_error():
        raise ReplyProblem(keys.bounded(f"error: {reply.error.reason}"))
    if not reply.has_content():
        raise ReplyProblem("a reply without content")
    return reply.content
