"""A Grid that delivers messages to the real ClientApp in this process, as the wire would.

Every message and every site's ``context`` goes through Flower's protobuf serialisation both ways
(what a SuperLink and SuperNode do), so records that would not survive the wire fail here too.
Nothing about the app is replaced: the ServerApp's round loop runs against this grid and the
ClientApp's real handlers answer. Tests can take a site offline (it never answers, like a killed
SuperNode), rewrite a reply in transit (a hostile or broken site) with ``tamper``, or a request
(a dishonest server) with ``tamper_request``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import serde
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

# (request as the site received it, reply as the site sent it) → the reply to deliver, or None
Tamper = Callable[[Message, Message], Message | None]


def wire(message: Message) -> Message:
    """``message`` after a trip through protobuf bytes."""
    proto = ProtoMessage()
    proto.ParseFromString(serde.message_to_proto(message).SerializeToString())
    return serde.message_from_proto(proto)


class InProcessGrid(Grid):
    """Node ids 1 … n, each a site running ``client_app`` with its own node config and state."""

    def __init__(
        self, client_app: ClientApp, node_configs: list[dict], run_config: dict, run_id: int = 1
    ) -> None:
        self._app = client_app
        self._run_id = run_id
        self._contexts = {
            node_id: _to_proto(
                Context(
                    run_id=run_id,
                    node_id=node_id,
                    node_config=dict(node_config),
                    state=RecordDict(),
                    run_config=dict(run_config),
                )
            )
            for node_id, node_config in enumerate(node_configs, start=1)
        }
        self._replies: dict[str, Message] = {}
        self.offline: set[int] = set()  # nodes that receive nothing and never answer
        # (node id, message type) pairs from which on a node goes offline for good
        self.vanish_at: set[tuple[int, str]] = set()
        self.tamper: Tamper | None = None
        # (node id, request as sent) → the request to deliver (a dishonest server), or None
        self.tamper_request: Callable[[int, Message], Message] | None = None
        self.log: list[tuple[int, str]] = []  # (node id, message type) of every delivery

    # ---- Grid ------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(self._run_id)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            node_id = message.metadata.dst_node_id
            if (node_id, message.metadata.message_type) in self.vanish_at:
                self.offline.add(node_id)
            if node_id in self.offline or node_id not in self._contexts:
                continue
            self.log.append((node_id, message.metadata.message_type))
            delivered = wire(message)
            if self.tamper_request is not None:
                delivered = self.tamper_request(node_id, delivered)
            reply = self._deliver(node_id, delivered)
            if reply is not None:
                self._replies[message_id] = wire(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # ---- sites -----------------------------------------------------------------------------------
    def context(self, node_id: int) -> Context:
        """A copy of the site's current context (its ``state`` included)."""
        return _from_proto(self._contexts[node_id])

    def _deliver(self, node_id: int, message: Message) -> Message | None:
        context = _from_proto(self._contexts[node_id])
        saved = (TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, self._run_id, node_id
        try:
            reply = self._app(message, context)
        except Exception as error:  # what Flower does: an error reply, the site carries on
            from flwr.app import Error

            reply = Message(
                Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message
            )
        finally:
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved
        self._contexts[node_id] = _to_proto(context)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        if self.tamper is not None:
            return self.tamper(message, reply)
        return reply


def _to_proto(context: Context) -> bytes:
    return serde.context_to_proto(context).SerializeToString()


def _from_proto(blob: bytes) -> Context:
    proto = ProtoContext()
    proto.ParseFromString(blob)
    return serde.context_from_proto(proto)
