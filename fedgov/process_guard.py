"""Helpers that live and die with the command that started them (``fedgov site start``,
``fedgov server start``), even when that command is killed with SIGKILL.

Three layers, each enough on its own for the processes fedgov starts directly:

- :func:`exit_with_parent`: run in the child between fork and exec, it asks Linux to send the
  child SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), so a SuperNode or SuperLink
  stops as if a service manager stopped it (a SuperNode then ends its session at the
  coordinator). Flower's own children (``flower-superexec``, ``flwr-clientapp``,
  ``flwr-serverapp``) watch their parent's pid and stop when it is gone.
- :class:`ProcessGuard`: a tiny watcher process (``python -m fedgov.process_guard``) that holds
  the read end of a pipe whose write end only the starting command holds. When that command
  ends, however it ends, the pipe closes and the watcher stops the process groups it was told
  about: SIGTERM, then SIGKILL after :data:`GRACE_SECONDS`.
- :func:`stop_leftovers`: a restarted command stops the helpers its dead predecessor recorded
  (pid and start time, so that a reused pid is never signalled) before it starts its own.

Linux only for the first layer (elsewhere it does nothing); the others use POSIX process groups.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping

#: How long the watcher waits between SIGTERM and SIGKILL (seconds).
GRACE_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def exit_with_parent() -> None:
    """``preexec_fn`` of a helper: SIGTERM it when the process that started it dies (Linux)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), None when
    the process is gone (Linux)."""
    try:
        text = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - one short read
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (Linux /proc), None when gone."""
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] in "ZX" else int(fields[19])


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs. An exited process its parent has not yet
    collected (a zombie) counts as gone: ``killpg(pgid, 0)`` alone would wait out the whole
    grace period for a helper that stopped at once."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    members = _group_states(pgid)
    return members is None or any(state != "Z" for state in members)


def _group_states(pgid: int) -> list[str] | None:
    """The states (``R``, ``S``, ``Z``, ...) of group ``pgid``'s processes from /proc; None
    where /proc cannot tell."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    members = (_stat_fields(int(entry)) for entry in entries if entry.isdigit())
    return [fields[0] for fields in members if fields is not None and int(fields[2]) == pgid]


def stop_groups(pgids: Iterable[int], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every process group in ``pgids``, SIGKILL what is left after ``grace`` seconds."""
    groups = set(pgids)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_group_alive(pgid) for pgid in groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def stop_leftovers(recorded: Mapping[str, Mapping[str, object]], grace: float = 5.0) -> list[str]:
    """Stop the helpers a dead predecessor recorded (name → {pid, pid_start}); return the names
    of those that were still running. A pid whose start time differs is another process: left
    alone."""
    groups, names = [], []
    for name, info in recorded.items():
        pid, start = info.get("pid"), info.get("pid_start")
        if not isinstance(pid, int) or pid <= 1 or not isinstance(start, int):
            continue
        if _start_ticks(pid) != start:
            continue
        try:
            if os.getpgid(pid) != pid:  # fedgov starts each helper as its own group's leader
                continue
        except ProcessLookupError:
            continue
        groups.append(pid)
        names.append(name)
    if groups:
        stop_groups(groups, grace)
    return names


class ProcessGuard:
    """The watcher of the helpers' process groups (see the module docstring)."""

    def __init__(self) -> None:
        self._watcher = subprocess.Popen(
            [sys.executable, "-m", "fedgov.process_guard"],
            stdin=subprocess.PIPE,
            text=True,
            start_new_session=True,  # neither a terminal's Ctrl-C nor a group kill reaches it
        )

    @property
    def pid(self) -> int:
        return self._watcher.pid

    def watch(self, pgid: int) -> None:
        """Stop process group ``pgid`` when the command holding this guard ends."""
        assert self._watcher.stdin is not None
        self._watcher.stdin.write(f"{pgid}\n")
        self._watcher.stdin.flush()

    def close(self) -> None:
        """The command ends normally: the watcher stops what is left and exits."""
        if self._watcher.stdin is not None and not self._watcher.stdin.closed:
            self._watcher.stdin.close()
        try:
            self._watcher.wait(timeout=GRACE_SECONDS + 5)
        except subprocess.TimeoutExpired:
            self._watcher.kill()
            self._watcher.wait()


def _watch() -> None:
    """The watcher: read group ids until the pipe closes (or SIGTERM), then stop those groups."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()

    def on_term(signum: int, frame: object) -> None:
        raise EOFError

    signal.signal(signal.SIGTERM, on_term)
    try:
        for line in sys.stdin:
            if line.strip().isdigit():
                groups.add(int(line))
    except (EOFError, OSError):
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop_groups(groups)


if __name__ == "__main__":
    _watch()
