"""Model weights on the wire as one object: each ArrayRecord of a message packed into one Array.

Flower sends a message as a tree of objects, one request each way per object: an ArrayRecord of
a model with k tensors is 1 + 2k objects (each Array and its ArrayChunk), so the six tensors of
the tabular MLP make a train message 16 objects and its reply 17. On a real federation every
object is an HTTP request to the SuperLink (node authentication, a database write) and another
to the site's SuperNode, which made object transfer most of the coordinator's CPU per round.

:func:`pack` turns every ArrayRecord of two or more arrays into an ArrayRecord holding a single
Array of serialisation type :data:`PACKED_STYPE` (its bytes: a JSON header with each array's key,
dtype, shape, serialisation type and size, then the arrays' bytes); :func:`unpack` restores the
exact original Arrays. Only the transport sees packed records: on a SuperLink the ServerApp packs
what it sends and unpacks what it receives (``server.messaging.exchange``), the ClientApp does
the same in a mod (:func:`client_mod`, installed in simulation and deployment alike), and a site
answers packed only when it was asked packed, so a grid that hands messages over in memory
(Flower's simulation, the tests' in-process grid), or any other sender, gets plain replies. The
handlers and the strategy see the same records either way.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

PACKED_STYPE = "fedgov.packed.v1"
_HEADER = struct.Struct("<I")


def _pack_record(record: ArrayRecord) -> ArrayRecord:
    arrays = list(record.items())
    layout = [
        {
            "key": key,
            "dtype": a.dtype,
            "shape": list(a.shape),
            "stype": a.stype,
            "size": len(a.data),
        }
        for key, a in arrays
    ]
    header = json.dumps(layout, separators=(",", ":")).encode()
    data = b"".join([_HEADER.pack(len(header)), header, *(bytes(a.data) for _, a in arrays)])
    return ArrayRecord(
        {"packed": Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)}
    )


def is_packed(record: ArrayRecord) -> bool:
    if len(record) != 1:
        return False
    (array,) = record.values()
    return array.stype == PACKED_STYPE


def _unpack_record(record: ArrayRecord) -> ArrayRecord:
    (array,) = record.values()
    data = memoryview(bytes(array.data))
    (length,) = _HEADER.unpack_from(data)
    offset = _HEADER.size + length
    layout = json.loads(bytes(data[_HEADER.size : offset]))
    arrays = {}
    for entry in layout:
        end = offset + int(entry["size"])
        if end > len(data):
            raise ValueError("a packed ArrayRecord is shorter than its header says")
        arrays[entry["key"]] = Array(
            dtype=entry["dtype"],
            shape=tuple(entry["shape"]),
            stype=entry["stype"],
            data=bytes(data[offset:end]),
        )
        offset = end
    if offset != len(data):
        raise ValueError("a packed ArrayRecord has trailing bytes")
    return ArrayRecord(arrays)


def _map_records(content: RecordDict, convert: Callable[[ArrayRecord], ArrayRecord | None]):
    """A new RecordDict with each ArrayRecord replaced by ``convert``'s result (None: kept)."""
    changed = False
    items = {}
    for key, record in content.items():
        if isinstance(record, ArrayRecord) and (converted := convert(record)) is not None:
            items[key], changed = converted, True
        else:
            items[key] = record
    return RecordDict(items) if changed else content


def pack(content: RecordDict, cache: dict[int, ArrayRecord] | None = None) -> RecordDict:
    """``content`` with every ArrayRecord of two or more arrays packed (the same object when
    there is nothing to pack); ``cache`` (record id → packed) packs a shared record once."""
    cache = {} if cache is None else cache

    def convert(record: ArrayRecord) -> ArrayRecord | None:
        if len(record) < 2:
            return None
        if id(record) not in cache:
            cache[id(record)] = _pack_record(record)
        return cache[id(record)]

    return _map_records(content, convert)


def unpack(content: RecordDict) -> RecordDict:
    """``content`` with every packed ArrayRecord restored (the same object when none is)."""
    return _map_records(content, lambda r: _unpack_record(r) if is_packed(r) else None)


def any_packed(content: RecordDict) -> bool:
    return any(isinstance(r, ArrayRecord) and is_packed(r) for r in content.values())


def pack_messages(messages: list[Message]) -> list[Message]:
    """Pack the content of messages about to be sent (in place; a record shared by several
    messages, such as the global model, is packed once)."""
    cache: dict[int, ArrayRecord] = {}
    for message in messages:
        if message.has_content():
            message.content = pack(message.content, cache)
    return messages


def unpack_message(message: Message) -> Message:
    """Restore a received message's packed records (in place)."""
    if message.has_content():
        message.content = unpack(message.content)
    return message


def client_mod(message: Message, context: Context, call_next: Callable) -> Message:
    """ClientApp mod: the handler sees plain records; its reply is packed iff the request was."""
    packed = message.has_content() and any_packed(message.content)
    if packed:
        unpack_message(message)
    reply = call_next(message, context)
    if packed and reply.has_content():
        reply.content = pack(reply.content)
    return reply
