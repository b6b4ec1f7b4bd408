"""The ServerApp's exchange (server/messaging.py): replies the SuperLink writes itself."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid

from server.messaging import exchange

SITE_NODE = 4242


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are stamped with the identity of the task creating them (here: the ServerApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class UnavailableNodeGrid(Grid):
    """A grid whose only node has gone away: the SuperLink answers for it, as Flower 1.42's
    link state does, with its own NODE_UNAVAILABLE error reply."""

    def __init__(self) -> None:
        self.sent: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for index, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{index}"
            self.sent[f"m{index}"] = message
            ids.append(f"m{index}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [
            create_message_error_unavailable_res_message(self.sent[i].metadata, "node_unavail")
            for i in message_ids
        ]

    def get_node_ids(self) -> Iterable[int]:
        return [SITE_NODE]

    def create_message(self, *args, **kwargs):  # the round loop builds Messages itself
        raise NotImplementedError

    def send_and_receive(self, *args, **kwargs):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError


def test_a_superlink_error_reply_is_recorded_against_the_site_it_was_sent_to():
    message = Message(RecordDict({"config": ConfigRecord({"x": 1})}), SITE_NODE, "train")
    (reply,) = exchange(UnavailableNodeGrid(), [message], timeout=5.0)
    assert reply.has_error() and "unavailable" in reply.error.reason.lower()
    assert reply.metadata.src_node_id == SITE_NODE  # not the SuperLink's node id


class LateReplyGrid(UnavailableNodeGrid):
    """A grid whose node answers only once ``answer_at`` (seconds of ``clock``) has passed;
    records when each pull came."""

    def __init__(self, clock, answer_at: float) -> None:
        super().__init__()
        self.clock, self.answer_at, self.pulls = clock, answer_at, []

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls.append(self.clock.monotonic())
        return super().pull_messages(message_ids) if self.clock.now >= self.answer_at else []


class SteppedClock:
    """``time`` for server.messaging: sleeping advances the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_short_poll_cap_holds_for_the_first_second_then_polls_relax(monkeypatch):
    import server.messaging as messaging

    clock = SteppedClock()
    monkeypatch.setattr(messaging, "time", clock)
    grid = LateReplyGrid(clock, answer_at=3.0)
    message = Message(
        RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=SITE_NODE, message_type="train"
    )
    replies = exchange(grid, [message], timeout=10.0, max_poll=0.02)
    assert len(replies) == 1  # the reply is seen, at its first pull after it was written
    gaps = [b - a for a, b in zip(grid.pulls, grid.pulls[1:], strict=False)]
    early = [gap for at, gap in zip(grid.pulls, gaps, strict=False) if at + gap <= 1.0]
    late = [gap for at, gap in zip(grid.pulls, gaps, strict=False) if at > 1.2]
    assert early and max(early) <= 0.02 + 1e-9  # the stage's own cap while it is young
    assert late and min(late) == pytest.approx(messaging.MAX_POLL_SECONDS)
    assert grid.pulls[-1] - 3.0 <= messaging.MAX_POLL_SECONDS + 1e-9
    assert len(grid.pulls) < 1.0 / 0.02 + 2.0 / messaging.MAX_POLL_SECONDS + 10
