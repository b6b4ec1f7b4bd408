"""The Flower 1.42 internals fedgov rebinds (fedgov/flower_hooks.py): site processes, the
ServerApp's grid and reply metadata, and the simulation engine.

The first test is the tripwire: after a Flower upgrade it fails, naming what changed, before a
site silently runs with Flower's pauses (the processes themselves only warn and fall back).
The others check each rebinding's effect; they restore Flower's modules afterwards.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
import tomllib
from pathlib import Path

import pytest
from flwr.cli import install
from flwr.supercore.constant import ExecutorType
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.superexec import run_superexec
from flwr.supernode import start_client_internal
from flwr.supernode.runtime import run_clientapp

from clients.supernode import BoundedSleep
from fedgov import flower_hooks

ROOT = Path(__file__).resolve().parent.parent


def test_the_rebound_flower_internals_are_those_of_the_pinned_flower():
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    flwr = next(d for d in pinned if re.match(r"flwr(\[.*\])?==", d))
    assert flwr.endswith(f"=={flower_hooks.FLOWER_VERSION}")
    assert flower_hooks.version_problems() == []
    assert flower_hooks.superexec_problems() == []
    assert flower_hooks.superexec_sleep_problems() == []
    assert flower_hooks.supernode_problems() == []
    assert flower_hooks.supernode_contact_problems() == []
    assert flower_hooks.clientapp_problems() == []
    assert flower_hooks.grid_problems() == []
    assert flower_hooks.metadata_problems() == []
    assert flower_hooks.simulation_problems() == []
    assert flower_hooks.simulation_node_config_problems() == []
    assert flower_hooks.simulation_feed_problems() == []
    assert flower_hooks.simulation_backend_problems() == []


def test_every_problems_check_is_asserted_above():
    checks = {n for n in dir(flower_hooks) if n.endswith("_problems") and not n.startswith("_")}
    source = inspect.getsource(test_the_rebound_flower_internals_are_those_of_the_pinned_flower)
    assert checks == set(re.findall(r"flower_hooks\.(\w+_problems)\(\)", source))


def test_importing_fedgov_rebinds_nothing_until_asked(monkeypatch):
    import importlib

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.superlink.grid import http_grid

    import server.messaging
    import simulations.engine

    monkeypatch.setattr(http_grid, "pull_objects", inflatable_utils.pull_objects)
    importlib.reload(server.messaging)  # runs the modules' top level again
    importlib.reload(simulations.engine)
    assert http_grid.pull_objects is inflatable_utils.pull_objects
    assert vce_api.add_messages_to_queue.__module__ == vce_api.__name__
    assert vce_api._register_node_info_stores.__module__ == vce_api.__name__


class _Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_failed_check_is_logged_once_and_flower_runs_unchanged(monkeypatch):
    from flwr.superlink.grid import http_grid

    collected = _Collected()
    monkeypatch.setattr(logging.getLogger("flwr"), "handlers", [collected])  # only ours, for now
    monkeypatch.setattr(flower_hooks, "_CHECKED", {})
    monkeypatch.setattr(http_grid, "pull_objects", lambda *args, **kwargs: None)
    unchanged = http_grid.pull_objects
    assert flower_hooks.install_grid_pull_tuning() is False
    assert flower_hooks.install_grid_pull_tuning() is False
    assert http_grid.pull_objects is unchanged
    (line,) = collected.lines  # once, however often installing is tried
    assert "http_grid no longer imports pull_objects" in line
    assert "running Flower's own code there instead" in line


def test_the_simulation_rebindings_last_one_run_and_do_what_they_say(monkeypatch):
    import queue
    import threading

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    flower = (
        vce_api.add_messages_to_queue,
        vce_api._register_node_info_stores,
        raybackend.RayBackend,
    )
    fed: list[tuple] = []

    def feed(state, messages, nodes_mapping, f_stop, bell):
        state.store_message_ins("m1")
        fed.append((bell.is_set(), messages, nodes_mapping))

    class Backend(raybackend.RayBackend):
        pass

    class State:
        def store_message_ins(self, message):
            return f"id-{message}"

    extra = {1: {"site-dir": "/sites/b"}}
    with (
        flower_hooks.simulation_feed(feed) as fed_ok,
        flower_hooks.simulation_node_configs(extra) as configs_ok,
        flower_hooks.simulation_backend(Backend) as backend_ok,
    ):
        assert fed_ok and configs_ok and backend_ok
        state, messages = State(), queue.Queue()
        vce_api.add_messages_to_queue(state, messages, {7: 0}, threading.Event())
        assert fed == [(True, messages, {7: 0})]  # storing a message rang the bell
        assert raybackend.RayBackend is Backend
        from flwr.supercore.run import Run

        stores = vce_api._register_node_info_stores({10: 0, 11: 1}, Run.create_empty(5), None)
        assert stores[11].node_config["site-dir"] == "/sites/b"
        assert "site-dir" not in stores[10].node_config
        assert stores[11].retrieve_context(5).node_config["site-dir"] == "/sites/b"
    assert (
        vce_api.add_messages_to_queue,
        vce_api._register_node_info_stores,
        raybackend.RayBackend,
    ) == flower


class _Injected(Exception):
    pass


def test_run_superexec_builds_its_executor_with_the_rebound_factory(monkeypatch):
    seen = {}

    def factory(
        executor_type, executor_config=None, *, insecure=False, root_certificates_path=None
    ):
        seen.update(type=executor_type, insecure=insecure)
        raise _Injected

    monkeypatch.setattr(run_superexec, "get_executor", run_superexec.get_executor)
    flower_hooks.install_executor_factory(factory)
    with pytest.raises(_Injected):
        run_superexec.run_superexec("127.0.0.1:1", insecure=True)
    assert seen == {"type": ExecutorType.SUBPROCESS, "insecure": True}


def test_bounded_sleep_polls_fast_while_a_run_is_on_and_as_flower_when_idle():
    now = [100.0]
    slept: list[float] = []
    policy = BoundedSleep(
        fast=0.02, cap=0.2, hot_window=60, local=0.01, sleeper=slept.append, clock=lambda: now[0]
    )
    for _ in range(8):
        policy.sleep(3)  # Flower's pause after an empty pull
    assert slept[0] == 0.02 and slept[-1] == 0.2
    assert slept == sorted(slept) and all(pause <= 0.2 for pause in slept)
    policy.sleep(0.5)  # Flower's wait for the ClientApp's reply: a local poll
    assert slept[-1] == 0.01
    policy.message_arrived()
    policy.sleep(3)
    assert slept[-1] == 0.02  # back to fast polls after each message
    now[0] += 61  # an idle site: Flower's own pause
    policy.sleep(3)
    assert slept[-1] == 3


def test_supernode_pauses_route_to_the_policy_and_retry_object_pulls_quickly(monkeypatch):
    for name in ("time", "_pull_and_store_message", "pull_objects"):
        monkeypatch.setattr(start_client_internal, name, getattr(start_client_internal, name))
    pauses: list[float] = []
    arrivals: list[bool] = []
    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", lambda **kw: kw["r"])
    flower_hooks.install_supernode_pauses(pauses.append, lambda: arrivals.append(True))
    start_client_internal.time.sleep(3)
    assert pauses == [3] and start_client_internal.time.monotonic() > 0
    assert start_client_internal._pull_and_store_message(r=None) is None and arrivals == []
    assert start_client_internal._pull_and_store_message(r=7) == 7 and arrivals == [True]
    bounded = start_client_internal.pull_objects
    assert bounded.func is inflatable_utils.pull_objects
    assert bounded.keywords == {
        "initial_backoff": flower_hooks.PULL_INITIAL_BACKOFF_SECONDS,
        "backoff_cap": flower_hooks.PULL_BACKOFF_CAP_SECONDS,
        "max_tries_per_object": None,
    }


def test_object_pulls_retry_quickly_for_objects_still_being_uploaded():
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    calls: list[str] = []

    def pull(object_id: str) -> bytes:
        calls.append(object_id)
        if len(calls) < 4:
            raise ObjectUnavailableError(object_id)
        return b"content"

    bounded = flower_hooks.bounded_pull(inflatable_utils.pull_objects)
    started = time.monotonic()
    assert bounded(["x"], pull) == {"x": b"content"}
    # Flower's own retries would have waited 1 + 2 + 4 s (±20 %).
    assert time.monotonic() - started < 1.0


def test_clientapp_tuning_and_the_remembered_fab_install(monkeypatch, tmp_path):
    for name in ("pull_and_inflate_object_from_tree", "install_from_fab"):
        monkeypatch.setattr(run_clientapp, name, getattr(run_clientapp, name))
    flower_hooks.install_clientapp_tuning()
    assert run_clientapp.pull_and_inflate_object_from_tree.func is (
        inflatable_utils.pull_and_inflate_object_from_tree
    )
    assert run_clientapp.install_from_fab.__wrapped__ is install.install_from_fab

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    installed: list[bytes] = []

    def flower_install(fab_file, install_dir=None, skip_prompt=False):
        installed.append(fab_file)
        folder = tmp_path / "apps" / f"app-{len(installed)}"
        folder.mkdir(parents=True)
        (folder / "pyproject.toml").write_text("")
        return folder

    remembering = flower_hooks.remembering_install(flower_install)
    first = remembering(b"fab one", skip_prompt=True)
    assert remembering(b"fab one", skip_prompt=True) == first  # not unzipped again
    assert remembering(b"fab two", skip_prompt=True) != first
    assert installed == [b"fab one", b"fab two"]
    (first / "pyproject.toml").unlink()  # an installed app that went away is installed again
    remembering(b"fab one", skip_prompt=True)
    assert installed == [b"fab one", b"fab two", b"fab one"]
    remembering(b"fab one")  # an interactive install is Flower's, untouched
    assert len(installed) == 4


def test_the_superexec_pause_can_be_routed_to_the_doorbell(monkeypatch):
    from clients import doorbell

    assert flower_hooks.superexec_sleep_problems() == []
    monkeypatch.setattr(run_superexec, "time", run_superexec.time)
    pauses: list[float] = []
    flower_hooks.install_superexec_sleep(pauses.append)
    run_superexec.time.sleep(0.5)
    assert pauses == [0.5] and run_superexec.time.monotonic() > 0

    if not doorbell.available():
        pytest.skip("abstract Unix sockets are Linux-only")
    name = doorbell.new_name()
    listener, bell = doorbell.Listener(name), doorbell.Bell(name)
    try:
        started = time.monotonic()
        listener.sleep(0.05)  # nobody rang: the whole pause
        assert time.monotonic() - started >= 0.05 and listener.rings == 0
        bell.ring()
        started = time.monotonic()
        listener.sleep(5)  # rung: returns at once
        assert time.monotonic() - started < 1 and listener.rings == 1
    finally:
        listener.close()
        bell.close()
    doorbell.Bell(doorbell.new_name()).ring()  # nobody listening: no error


def test_forked_tasks_get_the_command_line_flowers_subprocess_executor_builds(monkeypatch):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import (
        ExecutionSpec,
        SubprocessExecutor,
        subprocess_executor,
    )

    from clients.superexec import _task_argv

    started: list[list[str]] = []
    monkeypatch.setattr(
        subprocess_executor.subprocess, "Popen", lambda args, **kw: started.append(list(args))
    )
    for insecure, certificates, installs in ((True, None, False), (False, "/ca.crt", True)):
        spec = ExecutionSpec(
            task_type=TaskType.CLIENT_APP,
            runtime_api_address="127.0.0.1:9",
            token="t0k",
            insecure=insecure,
            root_certificates_path=certificates,
            runtime_dependency_install=installs,
            parent_pid=42,
            suppress_output=False,
            task_id=7,
        )
        SubprocessExecutor().launch(spec)
        ours = _task_argv(spec)
        assert Path(ours[0]).name == started[-1][0] == "flwr-clientapp"
        assert ours[1:] == started[-1][1:]
