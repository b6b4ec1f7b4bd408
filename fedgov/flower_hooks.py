"""Every Flower-internal name fedgov rebinds, where, why, and the checks that guard it.

fedgov never edits Flower's installed files. Its site processes (:mod:`clients.superexec`,
:mod:`clients.zygote` and its ClientApp children, :mod:`clients.supernode`) run Flower's own
entry points after rebinding a few module-level names *in their own process only*; the
ServerApp (:mod:`server.messaging`) rebinds one name in its own process. These names
are internals of flwr 1.42.0 (pinned in pyproject.toml), so each group has a ``*_problems()``
check: the flwr version, that the name is still looked up where we rebind it, the signatures
and the call sites in Flower's source. A process whose check fails logs a warning and runs
Flower unmodified (slower, never broken); ``tests/test_flower_hooks.py`` fails loudly instead.

=================================  ==========================================================
where (module namespace)           what and why
=================================  ==========================================================
``flwr.supercore.superexec.        ``get_executor``: run_superexec's only way to build its
run_superexec``                    executor; returns fedgov's forking executor instead;
                                   ``time``: its pause between task polls also ends when the
                                   SuperNode rings (clients/doorbell.py).
``flwr.supernode.                  ``time``: its ``sleep(3)`` after an empty pull and
start_client_internal``            ``sleep(0.5)`` reply polls, bounded while a run is on;
                                   ``_pull_and_store_message``: wrapped to note arrivals;
                                   ``pull_objects``: first retry after 20 ms, not 1 s.
``flwr.supernode.runtime.          ``pull_and_inflate_object_from_tree``: same retry bound;
run_clientapp`` (the zygote and    ``install_from_fab``: skips re-extracting and re-hashing
its ClientApp children)            a FAB whose exact bytes are already installed.
``flwr.superlink.grid.http_grid``  ``pull_objects``: the ServerApp's pull of a site's reply
(the ServerApp, deployment only)   objects, same retry bound.
=================================  ==========================================================

Why the object-pull retries matter: a message's objects (the model's arrays) are uploaded
after the message itself. A consumer that looks early (a SuperNode polling fast, a ClientApp
forked in milliseconds, a ServerApp polling for replies every 100 ms) finds them not yet there
and Flower then retries after 1 s, 2 s, 4 s...
(±20 %). Here the first retry comes after :data:`PULL_INITIAL_BACKOFF_SECONDS`, doubling to
:data:`PULL_BACKOFF_CAP_SECONDS`; the give-up horizon stays Flower's (``max_time``, 2 h) as the
per-object try limit is lifted.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLOWER_VERSION = "1.42.0"
PULL_INITIAL_BACKOFF_SECONDS = 0.02
PULL_BACKOFF_CAP_SECONDS = 0.25
#: Where a ClientApp records which exact FAB bytes are installed (under FLWR_HOME).
FAB_MARKERS = Path("fedgov") / "installed-fabs"

GET_EXECUTOR_PARAMETERS = ["executor_type", "executor_config", "insecure", "root_certificates_path"]
START_PARAMETERS = [
    "state_factory", "server_address", "node_config", "root_certificates", "insecure",
    "authentication_keys", "max_retries", "max_wait_time", "isolation", "runtime_api_address",
    "runtime_certificates", "runtime_root_certificates_path", "health_server_address",
    "trusted_entities", "superexec_auth_secret", "runtime_dependency_install",
]  # fmt: skip
PULL_AND_STORE_PARAMETERS = [
    "state", "object_store", "node_config", "receive", "get_run", "get_fab", "pull_object",
    "confirm_message_received", "trusted_entities",
]  # fmt: skip
PULL_OPTIONS = {"initial_backoff", "backoff_cap", "max_tries_per_object"}
INSTALL_PARAMETERS = ["fab_file", "install_dir", "skip_prompt"]


def _version_problems() -> list[str]:
    from flwr.supercore.version import package_version

    if package_version != FLOWER_VERSION:
        return [f"flwr is {package_version}, expected {FLOWER_VERSION}"]
    return []


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

    problems = _version_problems()
    if getattr(module, "get_executor", None) is not factory.get_executor:
        return [*problems, "run_superexec no longer imports get_executor into its namespace"]
    if _parameters(factory.get_executor) != GET_EXECUTOR_PARAMETERS:
        problems.append(f"get_executor's signature changed: {_parameters(factory.get_executor)}")
    if "get_executor(" not in inspect.getsource(module.run_superexec):
        problems.append("run_superexec no longer calls get_executor")
    return problems


def superexec_sleep_problems() -> list[str]:
    from flwr.supercore.superexec import run_superexec as module

    problems = _version_problems()
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

    problems = _version_problems()
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


# ---- the ClientApp (in the zygote, inherited by every forked child) -------------------------


def clientapp_problems() -> list[str]:
    from flwr.cli import install
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode.runtime import run_clientapp as module

    problems = _version_problems()
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

    problems = _version_problems()
    pull = getattr(module, "pull_objects", None)
    if pull is not inflatable_utils.pull_objects and not getattr(pull, "fedgov_bounded", False):
        return [*problems, "http_grid no longer imports pull_objects"]
    if "pull_objects(" not in inspect.getsource(module.HttpGrid.pull_messages):
        problems.append("HttpGrid.pull_messages no longer pulls with pull_objects")
    if not _keyword_only(inflatable_utils.pull_objects) >= PULL_OPTIONS:
        problems.append("pull_objects lost its retry options")
    return problems


def install_grid_pull_tuning() -> bool:
    """Bounded retries for the ServerApp's reply-object pulls; False (and nothing changed)
    when Flower's internals differ. Idempotent."""
    if grid_problems():
        return False
    from flwr.superlink.grid import http_grid as module

    if not getattr(module.pull_objects, "fedgov_bounded", False):
        module.pull_objects = bounded_pull(module.pull_objects)  # type: ignore[assignment]
    return True
