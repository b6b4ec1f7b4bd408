"""Sending messages to sites and collecting replies, with a short poll.

Flower's ``Grid.send_and_receive`` sleeps 3 s between pulls on a real SuperLink; this loop pushes
the messages and polls with a back-off from 10 ms to 100 ms, so a round ends as soon as the last
site answers. A reply seen that early may still be uploading its objects (the model's arrays),
and Flower's Grid then retries after 1 s, 2 s...: on a SuperLink, the ServerApp's process
retries after 20 ms instead (fedgov/flower_hooks.py, installed at its first exchange, guarded by
checks of Flower's internals).
On a SuperLink, each message's model weights also travel as one packed object each way
(fedgov/wire.py): Flower sends every object of a message as an HTTP request of its own. Grids
that hand messages over in memory (Flower's simulation, the tests' in-process grid) carry them
as they are; the ClientApp answers in the form it was asked, and the handlers and the strategy
see the same records either way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

try:  # the ServerApp's grid on a SuperLink
    from flwr.superlink.grid.http_grid import HttpGrid
except ImportError:  # pragma: no cover - another Flower: messages go unpacked
    HttpGrid = None  # type: ignore[assignment,misc]

from fedgov import wire
from fedgov.flower_hooks import install_grid_pull_tuning, set_reply_sender

FIRST_POLL_SECONDS = 0.01
MAX_POLL_SECONDS = 0.1
#: After this long, an exchange polls at most every MAX_POLL_SECONDS whatever its ``max_poll``:
#: a short cap is for replies that take milliseconds, and an exchange that lasts (sites
#: training) would otherwise cost the SuperLink a pull (~5-10 ms of its CPU) every few ms.
SHORT_EXCHANGE_SECONDS = 1.0


def exchange(
    grid: Grid, messages: Iterable[Message], timeout: float, max_poll: float = MAX_POLL_SECONDS
) -> list[Message]:
    """Push ``messages`` and return the replies that arrive within ``timeout`` seconds.

    ``max_poll`` caps the back-off between pulls for the first :data:`SHORT_EXCHANGE_SECONDS`
    (short exchanges, such as secure aggregation's key stages, use a lower cap so that they
    are not rounded up to it); after that the cap is at least :data:`MAX_POLL_SECONDS`.
    """
    messages = list(messages)
    if packs_weights(grid):
        install_grid_pull_tuning()  # this process only, once; Flower's retries if it differs
        wire.pack_messages(messages)
    message_ids = list(grid.push_messages(messages))
    addressee = {mid: m.metadata.dst_node_id for mid, m in zip(message_ids, messages, strict=False)}
    pending = set(message_ids)
    replies: list[Message] = []
    started = time.monotonic()
    deadline = started + timeout
    pause = min(FIRST_POLL_SECONDS, max_poll)
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(pending))
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        for reply in arrived:
            _attribute_to_addressee(reply, addressee)
        replies.extend(reply for reply in arrived if _unpacked(reply))
        if pending and not arrived:
            time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
            cap = max_poll
            if time.monotonic() - started > SHORT_EXCHANGE_SECONDS:
                cap = max(max_poll, MAX_POLL_SECONDS)
            pause = min(pause * 2, cap)
        elif arrived:
            pause = FIRST_POLL_SECONDS
    return replies


def _attribute_to_addressee(reply: Message, addressee: dict[str, int]) -> None:
    """A reply the SuperLink wrote itself (an unavailable node, an expired message) comes from
    the SuperLink's node id: name the node it was addressed to as its sender, so that the
    failure is recorded against the right site."""
    node_id = addressee.get(reply.metadata.reply_to_message_id)
    if node_id is not None and reply.metadata.src_node_id != node_id and reply.has_error():
        set_reply_sender(reply, node_id)


def _unpacked(reply: Message) -> bool:
    """Restore a reply's packed weights; False (the reply is dropped, as if never sent) when
    they are malformed: one broken site must not stop the round."""
    try:
        wire.unpack_message(reply)
    except Exception as error:  # anything a malformed packed record may raise
        log(
            WARNING,
            "dropping a reply of node %s: unreadable packed weights (%s)",
            reply.metadata.src_node_id,
            error,
        )
        return False
    return True


def packs_weights(grid: Grid) -> bool:
    """Whether ``grid`` sends messages to sites over the network (a SuperLink's HTTP API), where
    every object of a message is a request and packing the weights into one pays."""
    while isinstance(grid, SampledGrid):
        grid = grid._grid
    return HttpGrid is not None and isinstance(grid, HttpGrid)


class SampledGrid(Grid):
    """A view of ``grid`` that shows only the sampled nodes.

    Flower's strategies sample with an unseeded ``random.sample`` over ``get_node_ids()``; giving
    them this view with ``fraction_train=1.0`` makes them address exactly the sites fedgov chose.
    Everything else is delegated to the real grid.
    """

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    @property
    def run(self) -> Run:
        return self._grid.run

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[override]
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
