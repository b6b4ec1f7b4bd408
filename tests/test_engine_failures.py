"""The simulation engine on a bad day (simulations/backend.py), through the real Ray engine: a
site's actor killed between rounds is replaced and its message retried, naming site, round and
stage; a site whose ClientApp raises is recorded by site, round and stage; an engine that cannot
start its actors says so instead of "An error was encountered"."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.telemetry import EventType

from fedgov.flower_hooks import run_simulation_engine, simulation_backend
from fedgov.messages import SERVER_ROUND
from server.checkpoint import CHECKPOINT_FILE
from simulations.backend import (
    MESSAGE_TIMEOUT_KEY,
    RAY_ENVIRONMENT,
    SITE_IDS_KEY,
    EngineFailure,
    PatientRayBackend,
)

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


# ---- a site whose ClientApp raises, on Flower's engine with fedgov's backend -----------------

FAILING_PARTITION = 1
flaky_client = ClientApp()
recording_server = ServerApp()


@flaky_client.train()
def _train(message: Message, context: Context) -> Message:
    if context.node_config["partition-id"] == FAILING_PARTITION:
        raise ValueError("the site's disk is full")
    return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=message)


@recording_server.main()
def _main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 300
    while len(list(grid.get_node_ids())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # the engine registers its nodes after the ServerApp starts
    messages = [
        Message(RecordDict({"config": ConfigRecord({SERVER_ROUND: 3})}), node, "train")
        for node in sorted(grid.get_node_ids())
    ]
    replies = grid.send_and_receive(messages, timeout=600)
    reasons = {str(r.metadata.src_node_id): r.error.reason for r in replies if r.has_error()}
    context.state["reasons"] = ConfigRecord(reasons)
    context.state["answered"] = ConfigRecord({"count": len(replies)})


def test_a_site_whose_clientapp_raises_is_named_by_site_round_and_stage(
    flower_warnings, monkeypatch
):
    for name, value in RAY_ENVIRONMENT.items():  # as simulations.engine sets them
        monkeypatch.setenv(name, value)
    with simulation_backend(PatientRayBackend) as installed:
        assert installed
        result = run_simulation_engine(
            num_supernodes=2,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=flaky_client,
            server_app=recording_server,
            backend_name="ray",
            backend_config={
                "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2, "logging_level": "ERROR"},
                SITE_IDS_KEY: ["hospital-a", "hospital-b"],
                MESSAGE_TIMEOUT_KEY: 600.0,
            },
        )
    state = result.context.state
    assert state["answered"]["count"] == 2
    (reason,) = state["reasons"].values()  # only the failing site's reply is an error
    expected = "site hospital-b, round 3, stage train failed: "
    assert expected in reason and "the site's disk is full" in reason, reason
    assert any(expected in line for line in flower_warnings), flower_warnings
