"""fedgov's SuperExec: Flower's ``flower-superexec`` with a forking executor for ClientApp tasks.

    python -m clients.superexec [--stock-executor] [--preload MODULE]... [--max-tasks N]
                                <flower-superexec options, e.g. --insecure --runtime-api-address A>

Flower's SuperExec asks the SuperNode's Runtime API for tasks and hands each to an *executor*
(``flwr.supercore.superexec.executor.types.Executor``); the stock one starts a fresh
``flwr-clientapp`` interpreter per task. :class:`ForkingExecutor` instead forks ClientApp tasks
from a pre-warmed zygote (:mod:`clients.zygote`) that imported flwr, torch, numpy and the app
once. Other task types (none on a SuperNode) go to Flower's ``SubprocessExecutor``, and so does
a ClientApp task whenever the zygote is not available (still warming up past
``--ready-timeout``, crashed, or refusing to fork): a task is never lost to the executor.

How the executor gets in: ``run_superexec`` (Flower's whole loop: Runtime API client, SuperExec
auth, health server, signal handlers, plugin) builds its executor by calling the name
``get_executor`` in its own module, and Flower 1.42 has no other extension point (the executor
type is a closed enum; ``--executor-config`` is for Kubernetes only). :func:`main` therefore
rebinds that one name, in this process only, to :func:`executor_factory` and then runs Flower's
own ``flower-superexec`` entry point, so the command line, parsing, validation and loop are
exactly Flower's. :func:`fedgov.flower_hooks.superexec_problems` first verifies that the name
and signatures are those of flwr 1.42; if not, this command stops with one line saying why
(``fedgov site start --stock-executor`` still works) and ``tests/test_flower_hooks.py`` fails.

The task poll interval (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, default 1 s in Flower) is set to
:data:`TASK_POLL_SECONDS` unless the environment sets it; with a doorbell from fedgov's SuperNode
(:mod:`clients.doorbell`, named in ``FEDGOV_TASK_DOORBELL``) the SuperExec instead asks as soon
as the SuperNode rings, and otherwise every 0.5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.supercore import log
from flwr.supercore.constant import (
    TASK_TYPE_TO_APPIO_API_ADDRESS_ARG,
    TASK_TYPE_TO_COMMAND,
    ExecutorType,
    TaskType,
)
from flwr.supercore.superexec.executor import (
    ExecutionSpec,
    LaunchResult,
    SubprocessExecutor,
)

from clients import doorbell
from clients.zygote import (
    CLIENTAPP_ENTRY,
    DEFAULT_PRELOAD,
    GUARDED_CLIENTAPP_ENTRY,
    SINGLE_THREAD_ENVIRONMENT,
)
from fedgov.flower_hooks import (
    install_executor_factory,
    install_superexec_sleep,
    superexec_problems,
    superexec_sleep_problems,
)

TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
#: Seconds between the SuperExec's task polls (Flower: 1 s). Each poll is one loopback HTTP
#: request (~2 ms of CPU for both sides): 50 ms costs ~4 % of a core per idle site and adds
#: 25 ms per message on average.
TASK_POLL_SECONDS = 0.05
READY_TIMEOUT_SECONDS = 60.0
REPLY_TIMEOUT_SECONDS = 10.0
MAX_TASKS = 8
#: After this many zygote crashes within RESTART_WINDOW_SECONDS, stop restarting it.
MAX_RESTARTS = 3
RESTART_WINDOW_SECONDS = 300.0


class ZygoteError(RuntimeError):
    """The zygote is gone, not ready in time, or refused a launch."""


class ZygoteProcess:
    """The SuperExec's handle on a zygote: start, launch, track children, stop."""

    def __init__(
        self,
        preload: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
        bare: bool = False,
        report_exits: bool = False,
    ) -> None:
        parent, child = socket.socketpair()
        modules = DEFAULT_PRELOAD if preload is None else preload
        command = [
            python,
            "-m",
            "clients.zygote",
            "--fd",
            str(child.fileno()),
            "--preload",
            ",".join(modules),
        ]
        if bare:  # tests only: no Flower, no torch
            command.append("--bare")
        zygote_env = dict(os.environ if env is None else env)
        for name, value in SINGLE_THREAD_ENVIRONMENT.items():
            zygote_env.setdefault(name, value)
        try:
            self.popen = subprocess.Popen(
                command, pass_fds=(child.fileno(),), env=zygote_env, stdin=subprocess.DEVNULL
            )
        finally:
            child.close()
        self.channel = parent
        self.ready: dict | None = None
        self.report_exits = report_exits  # log one line per ended task
        self.children: dict[int, float] = {}  # pid -> launch time
        self.warm: dict[int, bool] = {}  # pid -> ran on the preloaded app modules
        self.exits: list[tuple[int, int]] = []  # (pid, exit code) of reaped children
        self._buffer = b""
        self._replies: dict[int, dict] = {}
        self._next_id = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    # ---- messages ------------------------------------------------------------------------------
    def _read(self, timeout: float) -> bool:
        """Read what the zygote sent within ``timeout`` seconds; False once it is gone."""
        readable, _, _ = select.select([self.channel], [], [], max(timeout, 0.0))
        if not readable:
            return True
        try:
            chunk = self.channel.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            return False
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self._handle(json.loads(line))
        return True

    def _handle(self, message: dict) -> None:
        event = message.get("event")
        if event == "ready":
            self.ready = message
            if self.report_exits:
                preloaded = ", ".join(message["preloaded"])
                log(
                    INFO,
                    "fedgov: zygote ready in %.1f s (%d OS thread; preloaded: %s)",
                    message["seconds"],
                    message["threads"],
                    preloaded,
                )
                for what, error in message.get("failed", {}).items():
                    log(WARNING, "fedgov: zygote warm-up: %s: %s", what, error)
        elif event == "exited":
            pid, code = int(message["pid"]), int(message["code"])
            started, warm = self.children.pop(pid, None), self.warm.pop(pid, False)
            self.exits.append((pid, code))
            if started is not None and self.report_exits:
                seconds, cpu = time.monotonic() - started, float(message.get("cpu", 0.0))
                app = "preloaded app" if warm else "app imported from the FAB"
                log(
                    INFO,
                    "fedgov: ClientApp task (pid %s) ended: exit %s, %.2f s, %.2f s CPU, %s",
                    pid,
                    code,
                    seconds,
                    cpu,
                    app,
                )
        elif "id" in message:
            self._replies[int(message["id"])] = message

    def poll(self) -> None:
        """Take in what the zygote reported, without waiting."""
        while self._read(0.0) and self._has_pending_bytes():
            pass

    def _has_pending_bytes(self) -> bool:
        readable, _, _ = select.select([self.channel], [], [], 0)
        return bool(readable)

    def wait_ready(self, timeout: float) -> dict:
        """Wait for the warm-up to finish; the zygote's ready report."""
        deadline = time.monotonic() + timeout
        while self.ready is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ZygoteError(f"the zygote was not ready within {timeout:.0f} s")
            if not self._read(min(left, 0.5)) or not self.alive():
                raise ZygoteError(f"the zygote exited during warm-up (code {self.popen.poll()})")
        return self.ready

    def launch(
        self,
        argv: Sequence[str],
        *,
        entry: str = CLIENTAPP_ENTRY,
        fab_hash: str | None = None,
        quiet: bool = False,
        timeout: float = REPLY_TIMEOUT_SECONDS,
    ) -> dict:
        """Fork a child that runs ``entry`` with ``sys.argv = argv``; the zygote's reply."""
        self._next_id += 1
        request_id = self._next_id
        request = {
            "op": "launch",
            "id": request_id,
            "entry": entry,
            "argv": list(argv),
            "fab_hash": fab_hash,
            "quiet": quiet,
        }
        try:
            self.channel.sendall((json.dumps(request) + "\n").encode())
        except OSError as error:
            raise ZygoteError(f"the zygote is unreachable ({error})") from None
        deadline = time.monotonic() + timeout
        while request_id not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ZygoteError(f"no answer from the zygote within {timeout:.0f} s")
            if not self._read(min(left, 0.5)):
                raise ZygoteError("the zygote exited")
        reply = self._replies.pop(request_id)
        if "error" in reply:
            raise ZygoteError(f"the zygote could not fork: {reply['error']}")
        self.children[int(reply["pid"])] = time.monotonic()
        self.warm[int(reply["pid"])] = bool(reply.get("warm"))
        return reply

    def close(self, timeout: float = 15.0) -> None:
        """Ask the zygote to stop (it stops its children first); kill it if it does not."""
        with contextlib.suppress(OSError):
            self.channel.sendall(b'{"op": "stop"}\n')
        with contextlib.suppress(OSError):
            self.channel.shutdown(socket.SHUT_WR)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        with contextlib.suppress(OSError):
            self.poll()
        self.channel.close()
        self.children.clear()


def _task_argv(spec: ExecutionSpec) -> list[str]:
    """The task's command line, exactly as Flower's SubprocessExecutor builds it."""
    command = TASK_TYPE_TO_COMMAND[spec.task_type]
    args = [
        shutil.which(command) or command,
        TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
        spec.runtime_api_address,
        "--token",
        spec.token,
    ]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


class ForkingExecutor:
    """A Flower ``Executor`` that forks ClientApp tasks from a warm zygote.

    - capacity: at most ``max_tasks`` forked ClientApps at once; at capacity the ClientApp task
      type is left out of ``get_eligible_capacity`` (so the SuperExec does not acquire one) and
      ``launch`` answers ``capacity_rejected``;
    - children are reaped by the zygote and counted out when it reports them;
    - ``close()`` stops the zygote, which SIGTERMs running children (Flower's handlers then
      report the task as stopped) and SIGKILLs them after a grace period;
    - a crashed zygote is restarted (``MAX_RESTARTS`` times per ``RESTART_WINDOW_SECONDS``);
      meanwhile, and whenever a fork fails, tasks go to the stock subprocess executor.
    """

    def __init__(
        self,
        preload: Sequence[str] | None = None,
        max_tasks: int = MAX_TASKS,
        ready_timeout: float = READY_TIMEOUT_SECONDS,
        zygote_factory: Callable[[], ZygoteProcess] | None = None,
        fallback: SubprocessExecutor | None = None,
        entry: str = GUARDED_CLIENTAPP_ENTRY,
    ) -> None:
        if max_tasks < 1:
            raise ValueError("max_tasks must be at least 1")
        self.entry = entry
        self.max_tasks = max_tasks
        self.ready_timeout = ready_timeout
        self._factory = zygote_factory or (lambda: ZygoteProcess(preload, report_exits=True))
        self.fallback = fallback or SubprocessExecutor()
        self.forked = 0
        self.fell_back = 0
        self._restarts: list[float] = []
        self._closed = False
        self.zygote: ZygoteProcess | None = self._factory()

    # ---- the zygote ----------------------------------------------------------------------------
    def _healthy_zygote(self) -> ZygoteProcess | None:
        """The running zygote, restarted if it died (within limits); None when unavailable."""
        if self._closed:
            return None
        zygote = self.zygote
        if zygote is not None and zygote.alive():
            return zygote
        if zygote is not None:
            log(
                ERROR, "fedgov zygote (pid %s) exited with code %s", zygote.pid, zygote.popen.poll()
            )
            with contextlib.suppress(Exception):
                zygote.close(timeout=1)
            self.zygote = None
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_SECONDS]
        if len(self._restarts) >= MAX_RESTARTS:
            return None
        self._restarts.append(now)
        log(WARNING, "fedgov: restarting the ClientApp zygote")
        self.zygote = self._factory()
        return self.zygote

    def running(self) -> int:
        """Forked ClientApps not yet reaped."""
        if self.zygote is None:
            return 0
        with contextlib.suppress(OSError, ValueError):
            self.zygote.poll()
        if not self.zygote.alive():
            self.zygote.children.clear()
        return len(self.zygote.children)

    # ---- Flower's Executor interface ---------------------------------------------------------
    def get_eligible_capacity(
        self,
        supported_task_types: set[TaskType],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[TaskType], set[str]]:
        """Every task type, except ClientApps while ``max_tasks`` forked ones are running."""
        del insecure, root_certificates_path
        if self.running() >= self.max_tasks:
            return set(supported_task_types) - {TaskType.CLIENT_APP}, set()
        return set(supported_task_types), set()

    def wait_for_capacity(
        self,
        task_type: TaskType | None = None,
        *,
        fab_hash: str | None = None,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> None:
        """Block until one more ClientApp may be forked (other task types never wait)."""
        del fab_hash, insecure, root_certificates_path
        while task_type in (None, TaskType.CLIENT_APP) and self.running() >= self.max_tasks:
            time.sleep(0.05)

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork a ClientApp task from the zygote; anything else (or on trouble) as Flower does."""
        if spec.task_type != TaskType.CLIENT_APP:
            return self.fallback.launch(spec)
        if self.running() >= self.max_tasks:
            return LaunchResult.capacity_rejected(
                f"{self.max_tasks} ClientApp processes are already running"
            )
        zygote = self._healthy_zygote()
        reason = "the zygote is unavailable (restarted too often)"
        if zygote is not None:
            try:
                if zygote.ready is None:
                    zygote.wait_ready(self.ready_timeout)
                zygote.launch(
                    _task_argv(spec),
                    entry=self.entry,
                    fab_hash=spec.fab_hash,
                    quiet=spec.suppress_output,
                )
                self.forked += 1
                return LaunchResult.accepted()
            except (ZygoteError, OSError, ValueError) as error:
                reason = str(error)
        log(WARNING, "fedgov: task %s starts as a fresh process: %s", spec.task_id, reason)
        self.fell_back += 1
        return self.fallback.launch(spec)

    def reconcile(self) -> None:
        """Take in reaped children; notice (and replace) a dead zygote."""
        if self.zygote is not None and not self.zygote.alive():
            self._healthy_zygote()
        self.running()

    def close(self) -> None:
        """Stop the zygote and its children."""
        self._closed = True
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None
        self.fallback.close()


# ---- the command ---------------------------------------------------------------------------


def executor_factory(
    preload: Sequence[str] | None, max_tasks: int, ready_timeout: float
) -> Callable[..., object]:
    """A drop-in for Flower's ``get_executor`` that returns a :class:`ForkingExecutor` for the
    default (subprocess) executor type and defers to Flower for any other."""
    from flwr.supercore.superexec.executor.factory import get_executor as flower_get_executor

    def get_executor(
        executor_type: ExecutorType,
        executor_config: dict | None = None,
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> object:
        if executor_type != ExecutorType.SUBPROCESS:
            return flower_get_executor(
                executor_type,
                executor_config,
                insecure=insecure,
                root_certificates_path=root_certificates_path,
            )
        executor = ForkingExecutor(preload, max_tasks, ready_timeout)
        assert executor.zygote is not None
        log(INFO, "fedgov: ClientApp tasks fork from a warm zygote (pid %s)", executor.zygote.pid)
        return executor

    return get_executor


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """fedgov's own options; everything else is left for flower-superexec's parser."""
    parser = argparse.ArgumentParser(
        prog="python -m clients.superexec",
        allow_abbrev=False,
        description="flower-superexec with ClientApp tasks forked from a warm zygote. "
        "Every other option is flower-superexec's.",
    )
    parser.add_argument(
        "--stock-executor",
        action="store_true",
        help="Flower's own executor (a fresh interpreter per task), for comparison",
    )
    parser.add_argument(
        "--preload",
        action="append",
        default=None,
        metavar="MODULE",
        help=f"module the zygote imports (repeatable; default: {', '.join(DEFAULT_PRELOAD)})",
    )
    parser.add_argument(
        "--max-tasks",
        type=int,
        default=MAX_TASKS,
        help="most ClientApp processes at once (default: %(default)s)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT_SECONDS,
        help="seconds a task waits for the zygote's warm-up before starting "
        "as a fresh process (default: %(default)s)",
    )
    return parser.parse_known_args(list(argv))


def main(argv: Sequence[str] | None = None) -> None:
    options, rest = parse_args(sys.argv[1:] if argv is None else argv)
    from flwr.supercore.cli.flower_superexec import flower_superexec

    if not options.stock_executor:
        problems = superexec_problems()
        if problems:  # the executor could not be injected: say so and stop
            raise SystemExit("clients.superexec: " + "; ".join(problems))
        poll = TASK_POLL_SECONDS
        bell = os.environ.get(doorbell.DOORBELL_ENV)
        if bell and doorbell.available():
            if problems := superexec_sleep_problems():
                log(WARNING, "fedgov: no doorbell, polling instead (%s)", "; ".join(problems))
            else:
                install_superexec_sleep(doorbell.Listener(bell).sleep)
                poll = doorbell.SAFETY_POLL_SECONDS  # the SuperNode rings when a task waits
                log(
                    INFO,
                    "fedgov: the SuperNode rings when a task waits (else a poll per %s s)",
                    poll,
                )
        os.environ.setdefault(TASK_POLL_ENV, str(poll))
        install_executor_factory(
            executor_factory(options.preload, options.max_tasks, options.ready_timeout)
        )
    sys.argv = [str(Path(sys.executable).parent / "flower-superexec"), *rest]
    flower_superexec()


if __name__ == "__main__":
    main()
