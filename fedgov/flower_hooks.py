"""Every Flower-internal name fedgov rebinds, where, why, and the checks that guard it.

fedgov never edits Flower's installed files. Its site processes (:mod:`clients.superexec`,
:mod:`clients.zygote` and its ClientApp children, :mod:`clients.supernode`) run Flower's own
entry points after rebinding a few module-level names *in their own process only*; the
ServerApp (:mod:`server.messaging`) rebinds one name in its own process. These names
are internals of flwr 1.42.0 (pinned in pyproject.toml), so each group has a ``*_problems()``
check: the flwr version, that the name is still looked up where we rebind it, the signatures
and the call sites in Flower's source. A process whose check fails logs a warning and runs
Flower unmodified (slower, never broken); ``tests/test_flower_hooks.py`` asserts every check
and fails loudly instead. The simulation engine (:mod:`simulations.engine`) rebinds names of
Flower's engine in its own process for the duration of one run.

=================================  ==========================================================
where (module namespace)           what and why
=================================  ==========================================================
``flwr.supercore.superexec.        ``get_executor``: run_superexec's only way to build its
run_superexec``                    executor; returns fedgov's forking executor instead;
                                   ``time``: its pause between task polls also ends when the
                                   SuperNode rings (clients/doorbell.py).
``flwr.supernode.                  ``time``: its ``sleep(3)`` after an empty pull and
start_client_internal``            ``sleep(0.5)`` reply polls, bounded while a run is on;
                                   ``_pull_and_store_message``: wrapped to note arrivals
                                   and, with ``_push_messages``, each contact with the
                                   SuperLink (``supernode.json``, clients/site_status.py);
                                   ``pull_objects``: first retry after 20 ms, not 1 s.
``flwr.supernode.runtime.          ``pull_and_inflate_object_from_tree``: same retry bound;
run_clientapp`` (the zygote and    ``install_from_fab``: skips re-extracting and re-hashing
its ClientApp children)            a FAB whose exact bytes are already installed.
``flwr.superlink.grid.http_grid``  ``pull_objects``: the ServerApp's pull of a site's reply
(the ServerApp, deployment only)   objects, same retry bound (installed at its first exchange).
``flwr.app.Metadata`` (ServerApp)  ``__dict__["_src_node_id"]``: a reply the SuperLink wrote
                                   itself is attributed to the site it was sent to.
``flwr.server.superlink.fleet.     for one simulation run only: ``_register_node_info_stores``
vce.vce_api`` (simulation)         (each site's privacy keys in its node config),
                                   ``add_messages_to_queue`` (prompt delivery) and the
                                   state's ``store_message_ins`` (rings it);
``...vce.backend.raybackend``      ``RayBackend``: fedgov's subclass (Ray start retried,
                                   lost actors replaced, failures named by site, round, stage),
                                   which uses its ``BasicActorPool``'s ``pool`` list too.
``flwr.supercore.task_identity``   ``TaskIdentity``: set for the in-process ServerApp, as
                                   Flower's own runtimes set it; ``_run_simulation`` is called.
=================================  ==========================================================

No rebinding happens at import time: each is installed by a call (a site process's start, the
ServerApp's first exchange, a simulation run) after its ``*_problems()`` check passes. A check
that fails is logged once at WARNING (:func:`checked`) and Flower's own code runs instead.

Why ``get_executor`` and not a ``flwr-clientapp`` shim (issue 14, prototyped, not kept): the
shim route leaves Flower's ``SubprocessExecutor`` in place and puts a ``flwr-clientapp`` first
on the SuperExec's PATH that hands its argv to the zygote over a Unix socket and waits for the
child's exit code. Flower's argv carries no FAB hash, so the zygote cannot tell whether its
preloaded app matches the task's FAB and must let every child import the app from the FAB (the
stock executor's capacity gate and the fork-failure fallback are lost too). Measured with
``python -m benchmarks.deployment --sites 3 --rounds 4 --runtimes zygote+fast-poll`` (TLS,
doorbell on), alternating both routes in one script, 3 repeats on the shared 2-core machine
(load 4-9): current route 1.01 / 1.49 / 0.68 s per round and 3.06 / 3.61 / 2.91 CPU-s per round;
shim 1.17 / 1.30 / 0.97 s and 3.74 / 3.88 / 3.23 CPU-s (medians +16 % wall, +22 % CPU: the
zygote's children 1.1-1.3 CPU-s per round instead of 0.5-0.7). Only when the shim is told the
FAB (an oracle taking the one installed FAB, unsafe in general) does it match: 0.81 / 0.71 /
0.94 s, 2.96 / 2.97 / 3.45 CPU-s, the shim processes themselves ~0.09 CPU-s per round. Beyond the
10 % bar, so the rebinding stays; the shim would need the warm-or-cold decision moved into the
child, after the app guard has seen the task's FAB.

Why the object-pull retries matter: a message's objects (the model's arrays) are uploaded
after the message itself. A consumer that looks early (a SuperNode polling fast, a ClientApp
forked in milliseconds, a ServerApp polling for replies every 100 ms) finds them not yet there
and Flower then retries after 1 s, 2 s, 4 s...
(±20 %). Here the first retry comes after :data:`PULL_INITIAL_BACKOFF_SECONDS`, doubling to
:data:`PULL_BACKOFF_CAP_SECONDS`; the give-up horizon stays Flower's (``max_time``, 2 h) as the
per-object try limit is lifted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FLOWER_VERSION = "1.42.0"
PULL_INITIAL_BACKOFF_SECONDS = 0.02
PULL_BACKOFF_CAP_SECONDS = 0.25
#: Where a ClientApp records which exact FAB bytes are installed (under FLWR_HOME).
FAB_MARKERS = Path("fedgov") / "installed-fabs"

GET_EXECUTOR_PARAMETERS = ["executor_type", "executor_config", "insecure", "root_certificates_path"]
START_PARAMETERS = [
    "state_factory",
    "server_address",
    "node_config",
    "root_certificates",
    "insecure",
    "authentication_keys",
    "max_retries",
    "max_wait_time",
    "isolation",
    "runtime_api_address",
    "runtime_certificates",
    "runtime_root_certificates_path",
    "health_server_address",
    "trusted_entities",
    "superexec_auth_secret",
    "runtime_dependency_install",
]
PULL_AND_STORE_PARAMETERS = [
    "state",
    "object_store",
    "node_config",
    "receive",
    "get_run",
    "get_fab",
    "pull_object",
    "confirm_message_received",
    "trusted_entities",
]
PULL_OPTIONS = {"initial_backoff", "backoff_cap", "max_tries_per_object"}
INSTALL_PARAMETERS = ["fab_file", "install_dir", "skip_prompt"]


def version_problems() -> list[str]:
    """["flwr is X, expected 1.42.0"] when the installed Flower is not the one checked."""
    from flwr.supercore.version import package_version

    if package_version != FLOWER_VERSION:
        return [f"flwr is {package_version}, expected {FLOWER_VERSION}"]
    return []


def source_of(function: object) -> str:
    """``function``'s source text, or "" when Python cannot show it (a C function, None)."""
    try:
        return inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        return ""


def _parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def _keyword_only(function: Callable[..., Any]) -> set[str]:
    return {
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def bounded_pull(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (Flower's ``pull_objects`` or ``pull_and_inflate_object_from_tree``) with
    fast first retries for objects still being uploaded."""
    bounded = functools.partial(
        function,
        initial_backoff=PULL_INITIAL_BACKOFF_SECONDS,
        backoff_cap=PULL_BACKOFF_CAP_SECONDS,
        max_tries_per_object=None,
    )
    bounded.fedgov_bounded = True  # type: ignore[attr-defined]
    return bounded


# ---- the SuperExec --------------------------------------------------------------------------


def superexec_problems() -> list[str]:
    from flwr.supercore.superexec import run_superexec as module
    from flwr.supercore.superexec.executor import factory

    problems = version_problems()
    if getattr(module, "get_executor", None) is not factory.get_executor:
        return [*problems, "run_superexec no longer imports get_executor into its namespace"]
    if _parameters(factory.get_executor) != GET_EXECUTOR_PARAMETERS:
        problems.append(f"get_executor's signature changed: {_parameters(factory.get_executor)}")
    if "get_executor(" not in inspect.getsource(module.run_superexec):
        problems.append("run_superexec no longer calls get_executor")
    return problems


def superexec_sleep_problems() -> list[str]:
    from flwr.supercore.superexec import run_superexec as module

    problems = version_problems()
    if getattr(module, "time", None) is not time:
        problems.append("run_superexec no longer uses the time module by that name")
    elif "time.sleep(task_poll_interval)" not in inspect.getsource(module.run_superexec):
        problems.append("run_superexec no longer pauses with time.sleep(task_poll_interval)")
    return problems


def install_superexec_sleep(sleep: Callable[[float], None]) -> None:
    """Route the pause between the SuperExec's task polls to ``sleep``."""
    from flwr.supercore.superexec import run_superexec as module

    module.time = _TimeWithSleep(sleep)  # type: ignore[assignment]


def install_executor_factory(get_executor: Callable[..., Any]) -> None:
    """Make ``run_superexec`` build its executor with ``get_executor``."""
    from flwr.supercore.superexec import run_superexec as module

    module.get_executor = get_executor  # type: ignore[assignment]


# ---- the SuperNode --------------------------------------------------------------------------


def supernode_problems() -> list[str]:
    from flwr.supernode import start_client_internal as module

    problems = version_problems()
    if getattr(module, "time", None) is not time:
        problems.append("start_client_internal no longer uses the time module by that name")
    start = getattr(module, "start_client_internal", None)
    pull = getattr(module, "_pull_and_store_message", None)
    push = getattr(module, "_push_messages", None)
    pull_objects = getattr(module, "pull_objects", None)
    if None in (start, pull, push, pull_objects):
        return [*problems, "start_client_internal's loop functions were renamed"]
    if _parameters(start) != START_PARAMETERS:
        problems.append(f"start_client_internal's signature changed: {_parameters(start)}")
    if _parameters(pull) != PULL_AND_STORE_PARAMETERS:
        problems.append(f"_pull_and_store_message's signature changed: {_parameters(pull)}")
    if not _keyword_only(pull_objects) >= PULL_OPTIONS:
        problems.append("pull_objects lost its retry options")
    start_source, push_source = inspect.getsource(start), inspect.getsource(push)
    if "time.sleep(3)" not in start_source or "_pull_and_store_message(" not in start_source:
        problems.append("the SuperNode loop no longer pauses with time.sleep(3) after a pull")
    if "time.sleep(0.5)" not in push_source:
        problems.append("the SuperNode no longer waits for replies with time.sleep(0.5)")
    if "pull_objects(" not in inspect.getsource(pull):
        problems.append("_pull_and_store_message no longer pulls with pull_objects")
    return problems


class _TimeWithSleep:
    """Stands in for the ``time`` module inside one Flower module: a different ``sleep``."""

    def __init__(self, sleep: Callable[[float], None]) -> None:
        self.sleep = sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install_supernode_pauses(
    sleep: Callable[[float], None], message_arrived: Callable[[], None]
) -> None:
    """Route the SuperNode loop's pauses to ``sleep``; call ``message_arrived`` per message."""
    from flwr.supernode import start_client_internal as module

    pull = module._pull_and_store_message

    def pull_and_note(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            message_arrived()
        return run_id

    pull_and_note.__wrapped__ = pull  # type: ignore[attr-defined]
    module._pull_and_store_message = pull_and_note
    module.time = _TimeWithSleep(sleep)  # type: ignore[assignment]
    module.pull_objects = bounded_pull(module.pull_objects)  # type: ignore[assignment]


def supernode_contact_problems() -> list[str]:
    """What :func:`install_supernode_contact` needs of Flower 1.42's SuperNode loop."""
    from flwr.supernode import start_client_internal as module
    from flwr.supernode.nodestate import NodeState

    problems = version_problems()
    start = getattr(module, "start_client_internal", None)
    for name in ("_pull_and_store_message", "_push_messages"):
        function = getattr(module, name, None)
        if not callable(function):
            problems.append(f"start_client_internal.{name} is gone")
        elif "state" not in _parameters(inspect.unwrap(function)):
            problems.append(f"start_client_internal.{name} no longer takes the node state")
        elif start is None or f"{name}(\n" not in inspect.getsource(start):
            problems.append(f"the SuperNode loop no longer calls {name}")
    if not callable(getattr(NodeState, "get_node_id", None)):
        problems.append("NodeState.get_node_id is gone")
    return problems


def install_supernode_contact(
    pulled: Callable[[int, bool], None], pushed: Callable[[int], None]
) -> None:
    """Tell fedgov when the SuperNode's loop talked to the SuperLink: ``pulled(node_id,
    message_arrived)`` after each pull, ``pushed(node_id)`` after replies went out (the loop
    waits for the ClientApp's reply in between). Wraps whatever is bound now (the pauses'
    wrapper too)."""
    from flwr.supernode import start_client_internal as module

    pull, push = module._pull_and_store_message, module._push_messages

    def node_id(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        return int((kwargs["state"] if "state" in kwargs else args[0]).get_node_id())

    def pull_and_record(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull(*args, **kwargs)
        pulled(node_id(args, kwargs), run_id is not None)
        return run_id

    def push_and_record(*args: Any, **kwargs: Any) -> Any:
        result = push(*args, **kwargs)
        pushed(node_id(args, kwargs))
        return result

    pull_and_record.__wrapped__ = pull  # type: ignore[attr-defined]
    push_and_record.__wrapped__ = push  # type: ignore[attr-defined]
    module._pull_and_store_message = pull_and_record
    module._push_messages = push_and_record


# ---- the ClientApp (in the zygote, inherited by every forked child) -------------------------


def clientapp_problems() -> list[str]:
    from flwr.cli import install
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode.runtime import run_clientapp as module

    problems = version_problems()
    pull = getattr(module, "pull_and_inflate_object_from_tree", None)
    if pull is not inflatable_utils.pull_and_inflate_object_from_tree:
        problems.append("run_clientapp no longer imports pull_and_inflate_object_from_tree")
    elif not _keyword_only(pull) >= PULL_OPTIONS:
        problems.append("pull_and_inflate_object_from_tree lost its retry options")
    installer = getattr(module, "install_from_fab", None)
    if installer is not install.install_from_fab:
        problems.append("run_clientapp no longer imports install_from_fab")
    elif _parameters(installer) != INSTALL_PARAMETERS:
        problems.append(f"install_from_fab's signature changed: {_parameters(installer)}")
    source = inspect.getsource(module)
    if "install_from_fab(fab.content, skip_prompt=True)" not in source:
        problems.append("run_clientapp no longer installs the FAB from its bytes")
    if "get_project_dir(" not in source:
        problems.append("run_clientapp no longer finds the app with get_project_dir")
    return problems


def _marker(fab_bytes: bytes) -> Path:
    from flwr.supercore.utils import get_flwr_home

    return Path(get_flwr_home()) / FAB_MARKERS / hashlib.sha256(fab_bytes).hexdigest()


def remembering_install(install_from_fab: Callable[..., Path]) -> Callable[..., Path]:
    """``install_from_fab`` that, for FAB bytes it installed before, returns the installed
    folder at once instead of unzipping and re-hashing every file (~0.1-0.3 s per message).

    Flower itself returns the existing folder for an installed FAB, after verifying the zip;
    the same bytes (same SHA-256) verify the same way. A marker per installed FAB's SHA-256
    under ``$FLWR_HOME/fedgov/installed-fabs`` names its folder.
    """

    def install(fab_file: Any, install_dir: Any = None, skip_prompt: bool = False) -> Path:
        if not isinstance(fab_file, bytes) or install_dir is not None or not skip_prompt:
            return install_from_fab(fab_file, install_dir, skip_prompt)
        marker = _marker(fab_file)
        try:
            folder = Path(marker.read_text())
        except OSError:
            folder = None
        if folder is not None and (folder / "pyproject.toml").is_file():
            return folder
        folder = Path(install_from_fab(fab_file, install_dir, skip_prompt))
        marker.parent.mkdir(parents=True, exist_ok=True)
        partial = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
        partial.write_text(str(folder))
        os.replace(partial, marker)
        return folder

    install.__wrapped__ = install_from_fab  # type: ignore[attr-defined]
    return install


def install_clientapp_tuning() -> None:
    """Bounded object-pull retries and the remembered FAB install, for ClientApps run here."""
    from flwr.supernode.runtime import run_clientapp as module

    module.pull_and_inflate_object_from_tree = bounded_pull(  # type: ignore[assignment]
        module.pull_and_inflate_object_from_tree
    )
    module.install_from_fab = remembering_install(module.install_from_fab)  # type: ignore[assignment]


# ---- the ServerApp on a SuperLink (flwr-serverapp) ------------------------------------------


def grid_problems() -> list[str]:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid as module

    problems = version_problems()
    pull = getattr(module, "pull_objects", None)
    if pull is not inflatable_utils.pull_objects and not getattr(pull, "fedgov_bounded", False):
        return [*problems, "http_grid no longer imports pull_objects"]
    if "pull_objects(" not in inspect.getsource(module.HttpGrid.pull_messages):
        problems.append("HttpGrid.pull_messages no longer pulls with pull_objects")
    if not _keyword_only(inflatable_utils.pull_objects) >= PULL_OPTIONS:
        problems.append("pull_objects lost its retry options")
    return problems


def install_grid_pull_tuning() -> bool:
    """Bounded retries for the ServerApp's reply-object pulls; False (nothing changed, logged
    once) when Flower's internals differ. Idempotent."""
    if not checked("ServerApp grid", grid_problems):
        return False
    from flwr.superlink.grid import http_grid as module

    if not getattr(module.pull_objects, "fedgov_bounded", False):
        module.pull_objects = bounded_pull(module.pull_objects)  # type: ignore[assignment]
    return True


# ---- checks run once per process; a failed one is logged, never silent ----------------------

_CHECKED: dict[str, list[str]] = {}


def checked(group: str, problems: Callable[[], list[str]]) -> bool:
    """Whether ``problems()`` finds nothing (run once per process and group). When it finds
    something, fedgov leaves that part of Flower as it is and says so once, at WARNING."""
    if group not in _CHECKED:
        _CHECKED[group] = found = problems()
        if found:
            from flwr.common.logger import log

            log(
                logging.WARNING,
                "fedgov: Flower's %s internals differ from flwr %s (%s); running Flower's own "
                "code there instead",
                group,
                FLOWER_VERSION,
                "; ".join(found),
            )
    return not _CHECKED[group]


# ---- a reply's sender (server/messaging.py) -------------------------------------------------


def metadata_problems() -> list[str]:
    from flwr.app import Metadata

    problems = version_problems()
    getter = getattr(getattr(Metadata, "src_node_id", None), "fget", None)
    if getter is None or '__dict__["_src_node_id"]' not in inspect.getsource(getter):
        problems.append("Metadata.src_node_id no longer reads __dict__['_src_node_id']")
    return problems


def set_reply_sender(reply: Any, node_id: int) -> bool:
    """Name ``node_id`` as the sender of ``reply`` (Flower's Metadata has no setter for it);
    False (the reply unchanged, logged once) when Flower's Metadata differs."""
    if not checked("Message metadata", metadata_problems):
        return False
    reply.metadata.__dict__["_src_node_id"] = node_id
    return True


# ---- the simulation engine (simulations/engine.py, simulations/delivery.py) -----------------
# Flower's engine is run in this process through its private ``_run_simulation`` (what
# ``flwr run`` does for a simulation federation). Three names of ``vce_api`` and the engine's
# Ray backend class are rebound for the duration of one run only (context managers below).

SIMULATION_PARAMETERS = {
    "num_supernodes",
    "exit_event",
    "backend_name",
    "backend_config",
    "client_app_attr",
    "server_app_attr",
    "server_app_context",
    "app_dir",
    "run",
    "is_app",
}
NODE_INFO_PARAMETERS = ["nodes_mapping", "run", "app_dir"]
FEED_PARAMETERS = ["state", "queue", "nodes_mapping", "f_stop"]


def simulation_problems() -> list[str]:
    """The engine entry point and the task identity fedgov sets (no fallback exists)."""
    from flwr.supercore.task_identity import TaskIdentity

    # by name: the package flwr.simulation exports a function called run_simulation
    module = importlib.import_module("flwr.simulation.run_simulation")
    problems = version_problems()
    engine = getattr(module, "_run_simulation", None)
    if engine is None:
        return [*problems, "flwr.simulation.run_simulation no longer has _run_simulation"]
    if not set(_parameters(engine)) >= SIMULATION_PARAMETERS:
        problems.append(f"_run_simulation's signature changed: {_parameters(engine)}")
    for name in ("task_id", "run_id", "node_id"):
        if getattr(type(TaskIdentity), name, None) is None:
            problems.append(f"TaskIdentity has no settable {name}")
    return problems


def run_simulation_engine(**arguments: Any) -> Any:
    """Flower's ``_run_simulation(**arguments)``; a clear error when Flower's differs."""
    problems = simulation_problems()
    if problems:
        raise RuntimeError(f"Flower's simulation engine changed: {'; '.join(problems)}")
    engine = importlib.import_module("flwr.simulation.run_simulation")._run_simulation
    return engine(**arguments)


def set_task_identity(task_id: int, run_id: int, node_id: int) -> None:
    """Stamp messages this process creates with this task identity (as Flower's runtimes do)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id


def simulation_node_config_problems() -> list[str]:
    from flwr.compat.client.run_info_store import DeprecatedRunInfoStore
    from flwr.server.superlink.fleet.vce import vce_api

    problems = version_problems()
    register = getattr(vce_api, "_register_node_info_stores", None)
    if register is None or _parameters(register) != NODE_INFO_PARAMETERS:
        return [*problems, "vce_api._register_node_info_stores changed"]
    if "_register_node_info_stores(" not in inspect.getsource(vce_api.start_vce):
        problems.append("start_vce no longer calls _register_node_info_stores")
    source = inspect.getsource(DeprecatedRunInfoStore)
    if "self.node_config = node_config" not in source or "self.run_infos" not in source:
        problems.append("DeprecatedRunInfoStore no longer keeps node_config and run_infos")
    return problems


@contextlib.contextmanager
def simulation_node_configs(extra: dict[int, dict[str, Any]]) -> Iterator[bool]:
    """During the block, the simulated node of each partition id in ``extra`` has those keys in
    its node config (and in the Contexts registered for it). Yields whether they are added."""
    if not extra:
        yield True
        return
    if not checked("simulation node config", simulation_node_config_problems):
        yield False
        return
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api._register_node_info_stores

    def register(nodes_mapping: Any, *args: Any, **kwargs: Any) -> Any:
        stores = original(nodes_mapping, *args, **kwargs)
        for node_id, partition_id in nodes_mapping.items():
            keys = extra.get(partition_id, {})
            store = stores[node_id]
            store.node_config.update(keys)
            for info in store.run_infos.values():  # Contexts registered by the original
                info.context.node_config.update(keys)
        return stores

    vce_api._register_node_info_stores = register
    try:
        yield True
    finally:
        vce_api._register_node_info_stores = original


def simulation_feed_problems() -> list[str]:
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import InMemoryLinkState

    problems = version_problems()
    feed = getattr(vce_api, "add_messages_to_queue", None)
    if feed is None or _parameters(feed) != FEED_PARAMETERS:
        return [*problems, "vce_api.add_messages_to_queue changed"]
    if "target=add_messages_to_queue" not in inspect.getsource(vce_api.run_api):
        problems.append("run_api no longer starts add_messages_to_queue as its feeding thread")
    for name, parameters in (
        ("store_message_ins", ["message"]),
        ("get_message_ins", ["node_id", "limit"]),
    ):
        method = getattr(InMemoryLinkState, name, None)
        if method is None or _parameters(method)[1 : 1 + len(parameters)] != parameters:
            problems.append(f"InMemoryLinkState.{name} changed")
    return problems


@contextlib.contextmanager
def simulation_feed(feed: Callable[..., None]) -> Iterator[bool]:
    """During the block, the engine's thread that moves stored messages to the Ray actors runs
    ``feed(state, queue, nodes_mapping, f_stop, bell)``, where ``bell`` (a threading.Event) is
    set each time the ServerApp stores a message in ``state``. Yields whether it is installed."""
    if not checked("simulation message feed", simulation_feed_problems):
        yield False
        return
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
        bell = threading.Event()
        store = state.store_message_ins

        def store_and_ring(message: Any) -> Any:
            message_id = store(message)
            bell.set()
            return message_id

        state.store_message_ins = store_and_ring  # this run's state object only
        feed(state, queue, nodes_mapping, f_stop, bell)

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original


def simulation_backend_problems() -> list[str]:
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    problems = version_problems()
    if "from .backend.raybackend import RayBackend" not in inspect.getsource(vce_api.start_vce):
        problems.append("start_vce no longer imports RayBackend when it builds its backend")
    backend = getattr(raybackend, "RayBackend", None)
    for name in ("init_ray", "build", "process_message", "terminate"):
        if not callable(getattr(backend, name, None)):
            problems.append(f"RayBackend.{name} is gone")
    if backend is not None and "self.pool" not in inspect.getsource(backend.__init__):
        problems.append("RayBackend no longer keeps its actor pool as .pool")
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    pool_source = inspect.getsource(BasicActorPool.__init__)
    if "self.pool" not in pool_source or "self.create_actor_fn" not in pool_source:
        problems.append("BasicActorPool no longer keeps .pool and .create_actor_fn")
    for name in ("submit", "add_actor_back_to_pool"):
        if not callable(getattr(BasicActorPool, name, None)):
            problems.append(f"BasicActorPool.{name} is gone")
    return problems


@contextlib.contextmanager
def simulation_backend(backend: type) -> Iterator[bool]:
    """During the block, the engine builds ``backend`` (a subclass of Flower's ``RayBackend``)
    instead of ``RayBackend``. Yields whether it is installed."""
    if not checked("simulation backend", simulation_backend_problems):
        yield False
        return
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    raybackend.RayBackend = backend  # type: ignore[misc]
    try:
        yield True
    finally:
        raybackend.RayBackend = original  # type: ignore[misc]
