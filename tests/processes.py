"""Real processes in tests: free ports, logs in files, bounded waits, nothing left behind.

Flower's SuperLink and SuperNode start helpers of their own (``flower-superexec``, one
``flwr-serverapp`` / ``flwr-clientapp`` per task), some of them in a new session, so stopping the
process group of what a test started is not enough. Every process started here therefore carries a
tag in its environment, which its descendants inherit; teardown terminates, then kills, every
process that carries the tag or shares a session with a started one, however deep or re-parented.

Linux reads the tags from ``/proc``; elsewhere only the started processes' groups are stopped.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

TAG_VARIABLE = "FEDGOV_TEST_PROCESS_TAG"
PROC = Path("/proc")
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
LOOPBACK = "127.0.0.1"
FEDGOV = [sys.executable, "-m", "fedgov"]  # the fedgov command, as an operator runs it


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` right now.

    The sockets stay bound until all are chosen, so the ports differ from one another; another
    program may still take one before the caller binds it (acceptable on a test machine).
    """
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port(host: str = LOOPBACK) -> int:
    """One TCP port that is free on ``host`` right now."""
    return free_ports(1, host)[0]


def port_is_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@dataclass
class Started:
    """A process started by :class:`ProcessGroup`, its output going to ``log_path``."""

    name: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class ProcessGroup:
    """Starts processes with logs in ``log_dir`` and stops all of them and their descendants."""

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        self.env = dict(os.environ if env is None else env)
        self.started: list[Started] = []

    # ---- starting and waiting ------------------------------------------------------------------
    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> Started:
        """Start ``argv`` in a new session with stdout and stderr in ``log_dir/<name>.log``."""
        log_path = self.log_dir / f"{name}.log"
        child_env = {**self.env, **(env or {}), TAG_VARIABLE: self.tag}
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_terminate_with_parent,
            )
        started = Started(name, list(argv), popen, log_path)
        self.started.append(started)
        return started

    def start_flwr_run(self, folder: Path, connection: str, run_config: str) -> Started:
        """``flwr run`` of a copy of the app in ``folder`` (:func:`app_copy`) on the SuperLink
        connection ``connection`` with ``run_config``, streaming the run's logs."""
        flwr = Path(sys.executable).parent / "flwr"
        argv = [str(flwr), "run", str(app_copy(folder)), connection, "--run-config", run_config]
        return self.start("flwr-run", [*argv, "--stream"], cwd=folder)

    def wait_until(
        self,
        condition: Callable[[], bool],
        timeout: float,
        what: str,
        must_keep_running: Sequence[Started] = (),
        interval: float = 0.2,
    ) -> float:
        """Poll ``condition`` until true; return the seconds waited.

        Fails (with the logs) after ``timeout`` seconds, or as soon as a process in
        ``must_keep_running`` exits.
        """
        started_at = time.monotonic()
        deadline = started_at + timeout
        while True:
            if condition():
                return time.monotonic() - started_at
            for proc in must_keep_running:
                if not proc.running():
                    pytest.fail(
                        f"{proc.name} exited with code {proc.popen.returncode} while waiting "
                        f"for {what}\n{self.logs_report()}"
                    )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs_report()}"
                )
            time.sleep(interval)

    def wait_for_port(
        self, proc: Started, port: int, timeout: float, host: str = LOOPBACK
    ) -> float:
        """Wait until ``proc`` (still running) accepts connections on ``host:port``."""
        return self.wait_until(
            lambda: port_is_open(host, port), timeout, f"{proc.name} on {host}:{port}", [proc]
        )

    def wait_for_log(self, proc: Started, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until ``proc``'s log matches the regular expression ``pattern``; return it."""
        found: list[re.Match[str]] = []

        def matched() -> bool:
            match = re.search(pattern, proc.log_text())
            if match:
                found.append(match)
            return match is not None

        self.wait_until(matched, timeout, f"{pattern!r} in {proc.name}'s log", [proc])
        return found[0]

    def wait_for_exit(self, proc: Started, timeout: float) -> int:
        """Wait for ``proc`` to exit; return its exit code (fails with the logs on a timeout)."""
        try:
            return proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{proc.name} still running after {timeout:.0f} s\n{self.logs_report()}")

    def logs_report(self, lines: int = 40) -> str:
        """The last ``lines`` of every log, for failure messages."""
        return "\n".join(
            f"---- {proc.name} ({proc.log_path}) ----\n{proc.log_tail(lines)}"
            for proc in self.started
        )

    # ---- finding and stopping ------------------------------------------------------------------
    def live_pids(self) -> set[int]:
        """Every live process that is ours: started here, tagged, or in a started session."""
        pids = {proc.pid for proc in self.started if proc.running()}
        if not PROC.is_dir():
            return pids
        sessions = {proc.pid for proc in self.started}  # start_new_session: sid == pid
        tag = f"\0{TAG_VARIABLE}={self.tag}\0".encode()
        for entry in PROC.iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            status = _stat(pid)
            if status is None or status[0] in "ZX":  # gone, or a zombie (already dead)
                continue
            if status[2] in sessions or tag in _environ(pid):
                pids.add(pid)
        return {pid for pid in pids if _alive(pid)}

    def describe(self, pids: set[int]) -> list[str]:
        """``pid command line`` for each of ``pids`` (for assertion messages)."""
        return [f"{pid} {_cmdline(pid)}" for pid in sorted(pids)]

    def stop_all(self, grace: float = 10.0, kill_wait: float = 5.0) -> list[str]:
        """SIGTERM everything of ours, SIGKILL what is left after ``grace`` seconds.

        Returns the processes still alive ``kill_wait`` seconds after SIGKILL (empty when all is
        well).
        """
        groups = {proc.pid for proc in self.started}  # start_new_session: pgid == pid
        signalled: dict[int, set[int]] = {signal.SIGTERM: set(), signal.SIGKILL: set()}
        term_deadline = time.monotonic() + grace
        kill_deadline = term_deadline + kill_wait
        while True:
            for proc in self.started:
                proc.popen.poll()  # reap what we started, so that it stops counting as alive
            pids = self.live_pids()
            if not pids or time.monotonic() > kill_deadline:
                break
            sig = signal.SIGTERM if time.monotonic() < term_deadline else signal.SIGKILL
            done = signalled[sig]
            if not done:
                for pgid in groups:
                    _signal_group(pgid, sig)
                done.update(pid for pid in pids if _group(pid) in groups)
            # Processes in other groups (or spawned since the last scan) one by one.
            for pid in pids - done:
                _signal(pid, sig)
                done.add(pid)
            time.sleep(0.1)
        for proc in self.started:
            with suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=1)
        return self.describe(self.live_pids())


#: Seconds between SIGTERM and SIGKILL when a test's processes are stopped at its end. The test
#: has asserted what it asserts by then, so nothing depends on a graceful stop; a test that checks
#: one (an exit status, a log line) stops that process itself first. Measured on a loaded 2-core
#: machine: ``fedgov server start`` takes 30 s or more to exit on SIGTERM (it waits out its
#: SuperLink group's 30-s grace, its own SuperLink exited but not yet reaped), a site daemon
#: 10 s or more (its process guard's grace), so a 10-s grace here was spent in full by such tests.
TEARDOWN_GRACE_SECONDS = 3.0


@contextmanager
def managed_processes(
    log_dir: Path, env: Mapping[str, str] | None = None
) -> Iterator[ProcessGroup]:
    """A :class:`ProcessGroup` whose processes are all stopped on exit, failure or not
    (SIGTERM, then SIGKILL after :data:`TEARDOWN_GRACE_SECONDS`).

    On a clean exit it raises AssertionError if anything survived; after a failure it only stops
    (so the original error is the one reported). Use it from a fixture::

        @pytest.fixture
        def processes(tmp_path):
            with managed_processes(tmp_path / "logs") as group:
                yield group
    """
    group = ProcessGroup(log_dir, env)
    try:
        yield group
    finally:
        left = group.stop_all(grace=TEARDOWN_GRACE_SECONDS)
    assert not left, f"processes outlived the test: {left}"


def listening_addresses(pids: set[int]) -> set[tuple[str, int]]:
    """The (IPv4/IPv6 address, port) pairs on which ``pids`` hold listening TCP sockets (Linux)."""
    inodes: dict[str, tuple[str, int]] = {}
    for table, width in (("tcp", 8), ("tcp6", 32)):
        path = PROC / "net" / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A":  # TCP_LISTEN
                continue
            address_hex, port_hex = local.split(":")
            inodes[inode] = (_address(address_hex, width), int(port_hex, 16))
    found = set()
    for pid in pids:
        try:
            fds = list((PROC / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found.add(inodes[target[8:-1]])
    return found


def _address(hex_address: str, width: int) -> str:
    """An address as /proc/net/tcp{,6} writes it (little-endian 32-bit words) in text form."""
    raw = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, width, 8))
    return socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, raw)


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, even by SIGKILL (Linux only)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, process group id, session id) of ``pid``, or None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[3])


def _group(pid: int) -> int | None:
    status = _stat(pid)
    return status[1] if status else None


def _environ(pid: int) -> bytes:
    try:
        return b"\0" + (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return b""


def _cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    if PROC.is_dir():
        status = _stat(pid)
        return status is not None and status[0] not in "ZX"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def fedgov(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one ``fedgov`` command to its end in ``cwd``; its output is captured as text."""
    return subprocess.run(
        [*FEDGOV, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def app_copy(folder: Path) -> Path:
    """``folder/app``: a copy of the fedgov app's project files, for ``flwr run``. Flower builds
    the same FAB from it, byte for byte, as from the project folder, without walking the
    virtual environment inside that first (seconds per run; clients.app_approval.copy_project)."""
    from clients.app_approval import copy_project
    from fedgov.project import app_dir

    return copy_project(app_dir(), folder / "app")


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every process descended from it, at once (no chance to clean up);
    returns the pids signalled."""
    children, doomed, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        doomed.append(current)
        todo.extend(children.get(current, []))
    for victim in doomed:
        with suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    return doomed


def _children() -> dict[int, list[int]]:
    """parent pid → the pids of its live children (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            with suppress(OSError, ValueError):
                text = (entry / "stat").read_text()
                parent = int(text[text.rindex(")") + 2 :].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    return children


def init_medpar_site(root: Path, name: str, port: int, link_port: int, ca: Path) -> Path:
    """``fedgov site init`` of site ``name`` under ``root`` on one MedPAR hospital's rows (its
    own CSV and schema), for a coordinator whose Fleet API listens at 127.0.0.1:``link_port``."""
    import yaml

    from fedgov.datasets import load_dataset, load_table

    data = root / "data"
    data.mkdir(exist_ok=True)
    table = load_table("medpar")
    table[table["provnum"] == "hosp-30061"].drop(columns=["provnum"]).to_csv(
        data / "admissions.csv", index=False
    )
    (data / "schema.yaml").write_text(yaml.safe_dump(load_dataset("medpar").schema.to_dict()))
    folder = root / name
    made = fedgov(
        "site",
        "init",
        "--site-id",
        name,
        "--data",
        str(data / "admissions.csv"),
        "--schema",
        str(data / "schema.yaml"),
        "--coordinator",
        f"127.0.0.1:{link_port}",
        "--ca",
        str(ca),
        "--port",
        str(port),
        "--out",
        str(folder),
        cwd=root,
    )
    assert made.returncode == 0, made.stderr
    return folder
