"""Prompt delivery of the ServerApp's messages to the simulated sites (a doorbell for the engine).

Flower's simulation engine moves messages from its in-memory link state to the Ray actors in a
thread (``vce_api.add_messages_to_queue``) that scans every node and then sleeps 0.1 s. Each
exchange therefore waits 0–100 ms before any site sees it: one wait for a plain round's train
message, one for its evaluate message, and one for each extra SecAgg+ stage. Measured here
(``python -m benchmarks.secagg``), those waits, not the cryptography, were most of SecAgg+'s
extra round time.

:func:`prompt_delivery` replaces that thread's function for the duration of a run with one that
does the same scan but is woken the moment the ServerApp stores a message (the link state's
``store_message_ins`` rings a bell), and otherwise waits as Flower does. The rebinding itself is
:func:`fedgov.flower_hooks.simulation_feed` (checked against Flower's internals; Flower's own
loop runs, with a warning, when they differ). Nothing in Flower's files changes, an idle
federation costs no extra CPU, and the deployment path has its own
equivalent (fedgov's SuperNode polls the SuperLink quickly; see ``clients/supernode.py``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from fedgov.flower_hooks import simulation_feed

IDLE_WAIT_SECONDS = 0.1  # as Flower's loop: the longest a stored message can wait unnoticed


def deliver_promptly(
    state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event, bell: threading.Event
) -> None:
    """Flower's scan of every node's stored messages into the actors' ``queue``, repeated at
    once while messages keep arriving and otherwise after ``bell`` rings (a message stored) or
    :data:`IDLE_WAIT_SECONDS`, until ``f_stop`` is set."""
    while not f_stop.is_set():
        bell.clear()  # before the scan: a message stored during it rings again
        delivered = False
        for node_id in nodes_mapping:
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
                delivered = True
        if not delivered:  # a node may hold more than one: scan again before waiting
            bell.wait(IDLE_WAIT_SECONDS)


@contextlib.contextmanager
def prompt_delivery() -> Iterator[bool]:
    """During the block, simulated sites receive each message as soon as it is stored; yields
    whether the prompt feed is installed (False: Flower's 0.1 s scan, logged)."""
    with simulation_feed(deliver_promptly) as installed:
        yield installed
