"""Flower's ClientApp process, behind the site's app approval (:mod:`clients.app_approval`).

Every ClientApp task of a fedgov site runs :func:`guarded_clientapp`, in every runtime of
``fedgov site start``: the zygote's forked children (default and ``--stock-supernode``: it is
:mod:`clients.superexec`'s task entry) and the fresh interpreters Flower's own SuperExec starts
(``--stock-executor``, and the forking executor's fallback): those start ``flwr-clientapp`` by
name, and the site daemon puts :func:`write_clientapp_shim`'s ``flwr-clientapp`` first on
their ``PATH``.

Where the check sits: Flower's ``run_clientapp`` pulls the task (message, context, run and the
FAB's bytes) from the SuperNode, then ``install_from_fab`` unpacks the FAB under
``$FLWR_HOME/apps``, and the loader puts that folder first on ``sys.path`` and imports the app.
The guard rebinds, in ``flwr.supernode.runtime.run_clientapp``'s namespace only, four names:

- ``pull_task_input``: after the pull, the FAB's bytes are checked (the earliest point the
  site holds them); the verdict is kept for this task;
- ``install_from_fab`` and ``install_app_dependencies``: skipped for a refused FAB (nothing is
  written to disk, nothing installed);
- ``get_load_client_app_fn``: for a refused FAB, a loader that imports nothing and returns
  :class:`RefusingApp`, whose reply is a decline naming the site and the app digest.

For an approved FAB the loader first forgets the modules of the packages the FAB ships that
this process imported from the site's copy (the guard's own), so the FAB's code is what runs,
exactly as in a stock ClientApp; in a forked task the zygote does this (it keeps its preloaded
modules only for a FAB byte-identical to them).

So an unapproved FAB is never unpacked, put on ``sys.path``, imported or run, and the
coordinator gets a normal reply (a decline) for the message. A site without ``site-dir`` in its
node config is not a fedgov site (a plain ``flower-supernode``): its tasks pass unchecked.
If Flower's names or signatures are not those of 1.42 the guard cannot be installed, and the
task stops before pulling anything (fail closed); ``tests/test_app_approval.py`` then fails.
"""

from __future__ import annotations

import importlib
import inspect
import io
import os
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Message

# Everything the guard runs is imported here, never inside its functions: in a forked task the
# zygote drops the app's modules from ``sys.modules`` before the guard runs, and an import then
# would load them again from the site's copy, ahead of the FAB's (clients/zygote.py).
from clients.app_approval import AppRefused, refuse_unapproved_app
from clients.site_status import record_run_outcome
from fedgov import messages as keys

#: The module whose names are rebound, and the parameters each name must take (flwr 1.42).
RUNTIME_MODULE = "flwr.supernode.runtime.run_clientapp"
GUARDED_NAMES = {
    "pull_task_input": ["client"],
    "install_from_fab": ["fab_file", "install_dir", "skip_prompt"],
    "install_app_dependencies": None,
    "get_load_client_app_fn": ["default_app_ref", "app_path", "multi_app"],
}
SHIM_DIR = "bin"
SHIM_NAME = "flwr-clientapp"
NODE_SITE_DIR, NODE_SITE_ID = "site-dir", "site-id"


def guard_problems() -> list[str]:
    """Why the guard cannot be installed in this Flower (empty: it can)."""
    try:
        runtime = importlib.import_module(RUNTIME_MODULE)
    except ImportError as error:
        return [f"{RUNTIME_MODULE} cannot be imported ({error})"]
    problems = []
    for name, params in GUARDED_NAMES.items():
        target = getattr(runtime, name, None)
        if not callable(target):
            problems.append(f"{RUNTIME_MODULE}.{name} is missing")
            continue
        if params is not None:
            found = list(inspect.signature(target).parameters)[: len(params)]
            if found != params:
                problems.append(f"{RUNTIME_MODULE}.{name} takes {found}, expected {params}")
    if "install_from_fab(" not in inspect.getsource(runtime.run_clientapp):
        problems.append("run_clientapp no longer calls install_from_fab")
    return problems


class RefusingApp:
    """Stands in for the ClientApp of a refused FAB: replies to any message with a decline."""

    def __init__(self, refusal: Exception, site_id: str, digest: str) -> None:
        self.reason = str(refusal)
        self.site_id = site_id
        self.digest = digest

    def __call__(self, message: Any, context: Any) -> Any:
        content = keys.decline_content(
            self.site_id, self.reason, refused="app", **{"app-digest": self.digest}
        )
        return Message(content, reply_to=message)


class TaskGuard:
    """The verdict on this task's FAB (one task per ClientApp process)."""

    def __init__(self) -> None:
        self.checked = False
        self.refusal: RefusingApp | None = None
        self.fab_content = b""

    def check(self, context: Any, run: Any, fab: Any) -> None:
        self.fab_content = bytes(fab.content)
        node_config = context.node_config
        site_dir = str(node_config.get(NODE_SITE_DIR, "") or "")
        self.checked = True
        if not site_dir:
            return  # not a fedgov site: nothing to enforce
        site_id = str(node_config.get(NODE_SITE_ID, "") or "?")
        try:
            refuse_unapproved_app(site_dir, site_id, bytes(fab.content), str(run.run_id))
        except AppRefused as refused:
            self.refusal = RefusingApp(refused, site_id, refused.digest)
            record_run_outcome(site_dir, run.run_id, "refused", str(refused))


def shipped_packages(fab: bytes) -> set[str]:
    """Top-level module names a FAB ships (``clients``, ``fedgov``, a root ``module.py``...)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        names = [n for n in archive.namelist() if n.endswith(".py")]
    return {n.split("/", 1)[0] if "/" in n else n[: -len(".py")] for n in names}


def drop_modules(packages: set[str]) -> None:
    """Forget imported modules of ``packages``: the FAB's own copies are imported next."""
    for name in [m for m in sys.modules if m.partition(".")[0] in packages]:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


def install_app_guard(drop_site_modules: bool = True) -> TaskGuard:
    """Rebind the four names (see the module docstring); the guard that holds the verdict.

    ``drop_site_modules``: before an approved FAB's app is loaded, forget the modules of the
    packages it ships that this process imported from the site's copy (the guard's own), so
    that the FAB's are the ones that run; a forked task leaves this to the zygote, which keeps
    its preloaded modules only where the installed FAB is byte-identical to them.
    """
    runtime = importlib.import_module(RUNTIME_MODULE)
    guard = TaskGuard()
    pull, install = runtime.pull_task_input, runtime.install_from_fab
    dependencies, loader = runtime.install_app_dependencies, runtime.get_load_client_app_fn

    def pull_task_input(client: Any) -> Any:
        message, context, run, fab = pull(client)
        guard.check(context, run, fab)
        return message, context, run, fab

    def install_from_fab(*args: Any, **kwargs: Any) -> Any:
        if not guard.checked:
            raise RuntimeError("fedgov app guard: the FAB was not checked; refusing to unpack it")
        return None if guard.refusal is not None else install(*args, **kwargs)

    def install_app_dependencies(*args: Any, **kwargs: Any) -> Any:
        return None if guard.refusal is not None else dependencies(*args, **kwargs)

    def get_load_client_app_fn(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        if guard.refusal is not None:
            refusal = guard.refusal
            return lambda *_args, **_kwargs: refusal  # nothing imported
        if drop_site_modules and guard.fab_content:
            drop_modules(shipped_packages(guard.fab_content))
        return loader(*args, **kwargs)

    runtime.pull_task_input = pull_task_input
    runtime.install_from_fab = install_from_fab
    runtime.install_app_dependencies = install_app_dependencies
    runtime.get_load_client_app_fn = get_load_client_app_fn
    return guard


def guarded_clientapp(drop_site_modules: bool = True) -> None:
    """``flwr-clientapp``, with the app guard installed first (fails closed if it cannot be)."""
    problems = guard_problems()
    if problems:
        print(
            "fedgov app guard: cannot check apps, running nothing: " + "; ".join(problems),
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1)
    install_app_guard(drop_site_modules)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


def guarded_forked_clientapp() -> None:
    """:func:`guarded_clientapp` in a task forked from the zygote (which drops app modules)."""
    guarded_clientapp(drop_site_modules=False)


def write_clientapp_shim(site_dir: str | Path, python: str = sys.executable) -> Path:
    """``<site_dir>/bin/flwr-clientapp``: the guarded ClientApp under Flower's command name;
    returns the folder to put first on ``PATH``."""
    folder = Path(site_dir) / SHIM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / SHIM_NAME
    script = (
        f"#!{python}\n"
        "# fedgov: Flower's flwr-clientapp behind the site's app approval (clients/app_guard.py)\n"
        "from clients.app_guard import guarded_clientapp\n\n"
        "guarded_clientapp()\n"
    )
    if not shim.exists() or shim.read_text() != script:
        temporary = shim.with_suffix(".tmp")
        temporary.write_text(script)
        os.chmod(temporary, 0o755)
        os.replace(temporary, shim)
    return folder
