"""A pre-warmed "zygote": imports Flower, torch and the app once, then forks one child per task.

A stock SuperExec starts a fresh ``flwr-clientapp`` interpreter for every message a site
receives, which imports flwr, torch and the app (~3 s here) and then, at the first
``optimizer.step()``, lazily imports ``torch._dynamo`` (~1 s more), and under DP imports
Opacus' accountants (with ``scipy.stats``: ~0.8 CPU-s per task). The zygote pays these
once: it is started (by :mod:`clients.superexec`) as its own interpreter, imports and warms
everything up, and then, on request, ``fork()``s a child that runs Flower's ClientApp entry
(``flwr-clientapp --runtime-api-address ... --token ...``) with the already-imported modules.

Fork safety: the zygote forks only from its main thread and only while it has a single OS
thread (checked at warm-up and before every fork). Two libraries would otherwise keep helper
threads in it: OpenBLAS (a worker pool; ``OPENBLAS_NUM_THREADS=1``) and pyarrow's jemalloc
(a background thread; ``JE_ARROW_MALLOC_CONF=background_thread:false``); the zygote sets both
(unless already set) before importing anything. The SuperExec itself (HTTP client, signal
handlers, threads) is never forked.

Same code as Flower would run: a stock ClientApp imports the app from the FAB the server
shipped (``$FLWR_HOME/apps/<...>.<fab-hash>``, first on ``sys.path``). The zygote records the
files of the app packages it imported (the packages of the distribution that provides the
preloaded modules, e.g. ``clients``, ``fedgov``, ``server``...). Before forking for a task it
compares them with the task's installed FAB; a child runs on the preloaded app modules only if
every app file the FAB ships is byte-identical. Otherwise (a different app version, or a FAB
not installed yet: the very first task of a FAB) the child drops the app modules and imports
them from the FAB exactly as a stock ClientApp does; flwr and torch stay warm either way.

In the zygote (so in every child) two names of Flower's ClientApp runtime are rebound
(:func:`fedgov.flower_hooks.install_clientapp_tuning`, guarded by its checks): object pulls
retry after 20 ms instead of 1 s (a forked child asks for the message's objects before the
SuperNode has them all), and a FAB whose exact bytes are installed is not unzipped again.

Per child, as in a fresh interpreter: numpy's and torch's global generators are reseeded from
the OS (Python's ``random`` is reseeded by CPython at fork); the control socket is closed;
signal handlers are reset. Children are reaped by the zygote and reported to the SuperExec.

Protocol (JSON lines over a private socket pair, see :mod:`clients.superexec`)::

    zygote → {"event": "ready", "pid", "seconds", "threads", "preloaded", "failed"}
    parent → {"op": "launch", "id", "entry": "module:function", "argv": [...],
              "fab_hash": str | null, "quiet": bool}
    zygote → {"id", "pid", "warm": bool}  or  {"id", "error": "..."}
    zygote → {"event": "exited", "pid", "code", "cpu"}   (a child was reaped; CPU seconds)
    parent → {"op": "stop"}  (or end of file): stop the children, then exit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

#: Environment that keeps native helper threads out of the zygote (set only when absent).
SINGLE_THREAD_ENVIRONMENT = {
    "OPENBLAS_NUM_THREADS": "1",
    "JE_ARROW_MALLOC_CONF": "background_thread:false",
}
#: The ClientApp's entry point (what the ``flwr-clientapp`` console script calls).
CLIENTAPP_ENTRY = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"
#: Always imported before the app modules.
BASE_PRELOAD = ("flwr.supernode.cli.flwr_clientapp", "flwr.supernode.runtime.run_clientapp")
#: A fedgov site's task entry: the ClientApp behind the site's app approval (clients/app_guard.py).
GUARDED_CLIENTAPP_ENTRY = "clients.app_guard:guarded_forked_clientapp"
#: What ``clients.app`` imports lazily on some paths (differential privacy), and the app guard
#: with what it checks with: preloaded too.
DEFAULT_PRELOAD = (
    "clients.app",
    "clients.dp_training",
    "clients.site_privacy",
    "clients.app_guard",
    "clients.app_approval",
)
#: App files compared with a task's FAB.
COMPARED_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".toml")
#: Diagnostics: set to a folder, every forked task writes a cProfile there (task-PID.prof).
PROFILE_ENV = "FEDGOV_ZYGOTE_PROFILE_DIR"
STOP_GRACE_SECONDS = 5.0
#: The loop wakes on a request or a child's exit (SIGCHLD); this is only a safety net.
REAP_INTERVAL_SECONDS = 1.0


def os_thread_count() -> int:
    """How many OS threads this process has (Linux; 1 where /proc is absent)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of the compared files under ``root`` (caches skipped)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in COMPARED_SUFFIXES and "__pycache__" not in path.parts and path.is_file():
            found[path.relative_to(root).as_posix()] = _sha256(path)
    return found


def app_packages(modules: Iterable[str]) -> set[str]:
    """Top-level names of the app: every package of the distribution(s) providing ``modules``.

    ``clients.app`` comes from the ``fedgov`` distribution, which also provides ``fedgov``,
    ``server``, ``privacy``...: the app's own code, which a FAB ships and a stock ClientApp
    imports from it. Falls back to the modules' own top-level names.
    """
    from importlib.metadata import packages_distributions

    tops = {name.partition(".")[0] for name in modules}
    mapping = packages_distributions()
    dists = {dist for top in tops for dist in mapping.get(top, ())}
    # A name another distribution also claims (opacus ships a top-level "benchmarks") is kept:
    # it is only ever dropped from sys.modules, never compared unless the app imported it.
    return tops | {top for top, owners in mapping.items() if dists.intersection(owners)}


class AppSnapshot:
    """The files of the app's packages, to compare with a task's FAB.

    ``imported_only``: only packages already imported (what children would inherit);
    otherwise every package that can be found, located without importing it.
    """

    def __init__(self, packages: set[str], imported_only: bool = True) -> None:
        self.packages = set(packages)
        self.stale = False
        self.trees: dict[str, dict[str, str]] = {}
        for top in sorted(self.packages):
            if imported_only and top not in sys.modules:
                continue  # not preloaded: a child imports it afresh, from the FAB first
            try:
                spec = importlib.util.find_spec(top)  # a top-level name: nothing is imported
            except (ImportError, ValueError):
                continue
            if spec is None or not spec.origin or not spec.has_location:
                continue  # a namespace package: no files of its own to compare
            origin = Path(spec.origin).resolve()
            if origin.name == "__init__.py":
                self.trees[top] = _tree_digest(origin.parent)
            elif origin.suffix == ".py":
                self.trees[top] = {origin.name: _sha256(origin)}

    def module_names(self) -> list[str]:
        """Names in sys.modules that belong to the app's packages."""
        return [name for name in list(sys.modules) if name.partition(".")[0] in self.packages]

    def matches(self, fab_dir: Path) -> tuple[bool, str]:
        """Whether the FAB installed at ``fab_dir`` ships exactly the app files preloaded here.

        A package the FAB does not ship is imported from the installed copy by a stock
        ClientApp too, so it need not match; a package it ships must match file by file.
        """
        for top, expected in self.trees.items():
            if (fab_dir / top).is_dir():
                shipped = _tree_digest(fab_dir / top)
            elif (fab_dir / f"{top}.py").is_file():
                shipped = {f"{top}.py": _sha256(fab_dir / f"{top}.py")}
            else:
                continue
            if shipped != expected:
                differing = sorted(set(shipped.items()) ^ set(expected.items()))
                return False, f"{top}/{differing[0][0]} differs" if differing else top
        return True, ""


def installed_fab_dir(fab_hash: str | None) -> Path | None:
    """Where Flower installed the FAB with this hash under FLWR_HOME, if it has yet."""
    if not fab_hash:
        return None
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore.utils import get_flwr_home

    apps = Path(get_flwr_home()) / APP_DIR
    found = sorted(apps.glob(f"*.{fab_hash[:FAB_HASH_TRUNCATION]}"))
    return found[0] if len(found) == 1 and (found[0] / "pyproject.toml").is_file() else None


def warm_up_torch() -> None:
    """One tiny forward, backward and optimiser step, so that torch's lazy imports
    (``torch._dynamo`` on the first backward/step, ~1 s) happen here and not per task."""
    import torch

    torch.set_num_threads(1)  # an OpenMP team must not exist at fork time
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    for optimizer in (
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        torch.optim.Adam(model.parameters(), lr=0.01),
    ):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.zeros(8).long())
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model(torch.randn(2, 4)).softmax(dim=1)


def warm_up_libraries() -> None:
    """What a ClientApp task would otherwise import lazily, per task: httpx's transport
    (httpcore, h11: ~0.2 s; Flower's Runtime API client) and pandas' CSV reader pieces."""
    import httpx

    with httpx.Client():
        pass
    if "pandas" in sys.modules:
        import io

        sys.modules["pandas"].read_csv(io.StringIO("a,b\n1,2.5\n"))


def warm_up_privacy() -> None:
    """Opacus and its accountants' numerics, imported and run once here: a DP task imports
    them lazily (``privacy.accounting``: ``opacus`` pulls in ``scipy.stats``), which a profile
    of ``python -m benchmarks.deployment --privacy`` showed as ~60 % of each training task's
    CPU (~0.8 CPU-s per site per round). Not an app module: never compared with a FAB."""
    import warnings

    import numpy as np
    from opacus import PrivacyEngine  # noqa: F401  (clients.dp_training's Opacus modes)
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(1.0, 0.01, 10)]
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        accountant.get_epsilon(1e-5)


def warm_up_site_data() -> None:
    """The site's own rows, read and validated once (``fedgov site start`` names the files in
    the environment): every forked task that runs on the preloaded app finds them in memory,
    and reads them again only if a file changed since."""
    if "clients.site_data" in sys.modules:
        sys.modules["clients.site_data"].preload_site_rows()


def load_entry(entry: str):
    module, _, attribute = entry.partition(":")
    target = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


class Zygote:
    """The zygote's state and loop (runs in the zygote process)."""

    def __init__(self, channel: socket.socket, preload: Iterable[str], bare: bool = False) -> None:
        self.channel = channel
        self.preload = list(preload)
        self.bare = bare  # tests: no Flower, no torch, no tuning
        self.children: set[int] = set()
        self.snapshot: AppSnapshot | None = None
        self.verdicts: dict[str, bool] = {}  # fab hash -> matched (only matches are cached)
        self._buffer = b""
        self._wakeup_read = self._wakeup_write = -1

    # ---- messages ------------------------------------------------------------------------------
    def send(self, payload: dict) -> None:
        with contextlib.suppress(OSError):
            self.channel.sendall((json.dumps(payload) + "\n").encode())

    def _requests(self) -> list[dict] | None:
        """Requests that arrived (None: the parent closed the channel)."""
        try:
            chunk = self.channel.recv(65536)  # select() said readable: this does not block
        except InterruptedError:
            return []
        except OSError:
            return None
        if not chunk:
            return None
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    # ---- warm-up -------------------------------------------------------------------------------
    def warm_up(self) -> None:
        started = time.monotonic()
        failed: dict[str, str] = {}
        loaded = []
        packages = app_packages(self.preload) if self.preload else set()
        before = AppSnapshot(packages, imported_only=False)
        for name in [*([] if self.bare else BASE_PRELOAD), *self.preload]:
            try:
                importlib.import_module(name)
                loaded.append(name)
            except Exception as error:  # a missing optional module must not stop the site
                failed[name] = f"{type(error).__name__}: {error}"
        problems = ["bare"]
        if not self.bare:
            for warm in (warm_up_torch, warm_up_libraries, warm_up_privacy, warm_up_site_data):
                try:
                    warm()
                except Exception as error:
                    failed[warm.__name__] = f"{type(error).__name__}: {error}"
            from fedgov.flower_hooks import clientapp_problems, install_clientapp_tuning

            problems = clientapp_problems()
            if problems:  # Flower's own retries and installs: slower, still correct
                failed["ClientApp tuning"] = "; ".join(problems)
            else:
                install_clientapp_tuning()
        if packages:  # even after a failed import: what it left in sys.modules is checked
            self.snapshot = AppSnapshot(packages)
            # A file edited while it was being imported: what is loaded may not be what is on
            # disk now, so no FAB can be shown to match it. Children then import the app.
            changed = sorted(
                t for t, tree in self.snapshot.trees.items() if before.trees.get(t) != tree
            )
            if changed:
                self.snapshot.stale = True
                failed["app snapshot"] = f"files changed while importing: {', '.join(changed)}"
        self.send(
            {
                "event": "ready",
                "pid": os.getpid(),
                "seconds": round(time.monotonic() - started, 3),
                "threads": os_thread_count(),
                "preloaded": loaded,
                "failed": failed,
                "tuned": not problems,
                "app_packages": sorted(self.snapshot.packages) if self.snapshot else [],
            }
        )

    # ---- the loop ------------------------------------------------------------------------------
    def serve(self) -> None:
        # SIGCHLD writes a byte to ``wakeup``: an exited child wakes the loop at once.
        wakeup, self._wakeup_write = os.pipe()
        os.set_blocking(wakeup, False)
        os.set_blocking(self._wakeup_write, False)
        self._wakeup_read = wakeup
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self._wakeup_write)
        try:
            while True:
                readable, _, _ = select.select(
                    [self.channel, wakeup], [], [], REAP_INTERVAL_SECONDS
                )
                if wakeup in readable:
                    with contextlib.suppress(OSError):
                        os.read(wakeup, 4096)
                if self.channel in readable:
                    requests = self._requests()
                    if requests is None:
                        return
                    for request in requests:
                        if request.get("op") == "stop":
                            return
                        if request.get("op") == "launch":
                            self.send(self.launch(request))
                self.reap()
        finally:
            self.stop_children()

    def _warm_for(self, fab_hash: str | None) -> bool:
        """Whether a child for a task of this FAB may run on the preloaded app modules."""
        if self.snapshot is None:
            return True  # nothing of the app preloaded: nothing to check
        if self.snapshot.stale:
            return False
        if fab_hash and self.verdicts.get(fab_hash):
            return True
        fab_dir = installed_fab_dir(fab_hash)
        if fab_dir is None:
            return False  # not installed yet: the child imports the app from the FAB
        matched, _ = self.snapshot.matches(fab_dir)
        if matched and fab_hash:
            self.verdicts[fab_hash] = True  # a FAB is content-addressed: the verdict holds
        return matched

    def launch(self, request: dict) -> dict:
        reply: dict = {"id": request.get("id")}
        try:
            entry, argv = str(request["entry"]), [str(arg) for arg in request["argv"]]
            warm = self._warm_for(request.get("fab_hash"))
            threads = os_thread_count()
            if threads != 1:
                raise RuntimeError(f"the zygote has {threads} OS threads; refusing to fork")
            evict = [] if warm or self.snapshot is None else self.snapshot.module_names()
            pid = os.fork()
        except Exception as error:
            reply["error"] = f"{type(error).__name__}: {error}"
            return reply
        if pid == 0:  # the child: never returns
            signal.set_wakeup_fd(-1)
            for fd in (self._wakeup_read, self._wakeup_write):
                with contextlib.suppress(OSError):
                    os.close(fd)
            _run_child(self.channel, entry, argv, evict, bool(request.get("quiet")))
        self.children.add(pid)
        reply.update(pid=pid, warm=warm)
        return reply

    def reap(self) -> None:
        while self.children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send(
                {
                    "event": "exited",
                    "pid": pid,
                    "code": os.waitstatus_to_exitcode(status),
                    "cpu": round(usage.ru_utime + usage.ru_stime, 3),
                }
            )

    def stop_children(self) -> None:
        """SIGTERM the children (Flower's handlers report the task as stopped), then SIGKILL."""
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:
            self.reap()
            time.sleep(0.01)


def _run_child(
    channel: socket.socket, entry: str, argv: list[str], evict: list[str], quiet: bool
) -> None:
    """In the forked child: become a fresh-looking task process, run ``entry``, exit."""
    code = 1
    try:
        channel.close()
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if quiet:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        # The entry (the app guard) is resolved before the app's modules are dropped: it is the
        # site's own code, never the FAB's, and it decides whether the FAB may be imported.
        target = load_entry(entry)
        for name in evict:
            sys.modules.pop(name, None)
        importlib.invalidate_caches()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        if "torch" in sys.modules:
            sys.modules["torch"].seed()
        sys.argv = list(argv)
        if profile_dir := os.environ.get(PROFILE_ENV):  # diagnostics: one profile per task
            import cProfile

            profiler = cProfile.Profile()
            try:
                profiler.runcall(target)
            finally:
                profiler.dump_stats(os.path.join(profile_dir, f"task-{os.getpid()}.prof"))
        else:
            target()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="control socket (inherited)")
    parser.add_argument(
        "--preload",
        default=",".join(DEFAULT_PRELOAD),
        help="comma-separated app modules to import before forking (default: %(default)s; "
        "empty: none)",
    )
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)  # tests
    options = parser.parse_args(args)
    # The SuperExec's Ctrl-C or SIGTERM reaches the zygote too (same process group): it stops
    # when the SuperExec closes the channel, after its children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    channel = socket.socket(fileno=options.fd)
    channel.settimeout(30.0)  # a send never blocks forever on a parent that stopped reading
    preload = [name for name in options.preload.split(",") if name.strip()]
    zygote = Zygote(channel, preload, bare=options.bare)
    zygote.warm_up()
    # Objects that exist now are never collected in the children: without this, their first
    # garbage collection would touch (and so copy) every page the zygote's objects live on.
    gc.collect()
    gc.freeze()
    zygote.serve()
    # Skip the interpreter's teardown of torch & co. (seconds): nothing is left to clean up.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


if __name__ == "__main__":
    for _name, _value in SINGLE_THREAD_ENVIRONMENT.items():
        if _name not in os.environ:  # before numpy and pyarrow are imported
            os.environ[_name] = _value
    main()
