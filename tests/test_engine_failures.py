"""The simulation engine on a bad day (simulations/backend.py), through the real Ray engine: a
site's actor killed between rounds is replaced and its message retried, naming site, round and
stage; an engine that cannot start its actors says so instead of "An error was encountered"."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from server.checkpoint import CHECKPOINT_FILE
from simulations.backend import EngineFailure

SYNTHETIC = ("dataset=synthetic", "model=mlp", "federation.num_sites=3")


def _descendants(root: int) -> list[int]:
    """The live processes below ``root`` (Ray's raylet, and its workers, are this test's own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            children.setdefault(int(rest.rpartition(") ")[2].split()[1]), []).append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _actor_processes() -> list[int]:
    actors = []
    for pid in _descendants(os.getpid()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if argv.startswith(b"ray::ClientAppActor"):
            actors.append(pid)
    return actors


class _Warnings(logging.Handler):
    """Flower's log lines of WARNING and above (fedgov's engine logs through Flower's logger)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def flower_warnings():
    collected = _Warnings()
    logger = logging.getLogger("flwr")
    logger.addHandler(collected)
    yield collected.lines
    logger.removeHandler(collected)


def test_an_actor_killed_between_rounds_is_replaced_and_every_site_trains(
    simulate, flower_warnings
):
    run_dir = simulate.root / "run"
    killed: list[int] = []

    def kill_one_actor_after_round_one() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not (run_dir / CHECKPOINT_FILE).exists():
            time.sleep(0.05)
        actors = _actor_processes()
        if actors:
            os.kill(actors[0], signal.SIGKILL)
            killed.append(actors[0])

    killer = threading.Thread(target=kill_one_actor_after_round_one, daemon=True)
    killer.start()
    metrics = simulate(*SYNTHETIC, "rounds=3")
    killer.join(timeout=5)
    assert killed, "no ClientAppActor process of this run was found to kill"
    rounds = metrics["rounds"]
    sites = sorted(rounds[0]["participants"])
    assert len(sites) == 3
    for record in rounds:  # the lost actor's message was retried on a fresh one
        assert sorted(record["participants"]) == sites and not record["failures"], record
    retried = [line for line in flower_warnings if "retrying on a fresh actor" in line]
    assert retried, flower_warnings
    assert any(
        f"site {site}, round " in line and ", stage " in line for line in retried for site in sites
    ), retried
    assert all(", round 1," not in line for line in retried), retried  # killed after round 1


def test_an_engine_that_cannot_place_its_actors_names_that_stage(simulate):
    # No node of this machine has 4096 CPUs: Flower's actor pool is empty and its engine stops.
    with pytest.raises(EngineFailure) as stopped:
        simulate(
            *SYNTHETIC, "rounds=1", "federation.client_cpus=4096", "federation.round_timeout=30"
        )
    message = str(stopped.value)
    assert message.startswith("simulation engine: starting the ClientApp actors failed: ")
    assert "ActorPool is empty" in message
    assert "An error was encountered" not in message
