"""One running instance per folder, and a free port before anything starts.

``fedgov site start`` and ``fedgov server start`` take an exclusive lock (``flock``) on a lock
file in their state folder before they write anything there. The kernel drops the lock when the
holder ends, however it ends (SIGKILL included), so a stale lock never blocks a restart; a
second start while the first runs is refused at once, in one line. The lock's file descriptor
is not inherited by the helpers (Python opens files non-inheritable), so a leftover helper
cannot hold it either.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from fedgov.errors import FedgovError

_HELD: dict[Path, IO[str]] = {}


def hold_lock(path: str | Path, refusal: str) -> None:
    """Hold an exclusive lock on ``path`` for the rest of this process's life.

    Idempotent within a process. When another process holds it, raises FedgovError with
    ``refusal`` (which may name ``{pid}``, the holder's pid as it wrote it in the file).
    """
    path = Path(path).resolve()
    if path in _HELD:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held open on purpose until the process ends
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise FedgovError(refusal.format(pid=holder)) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD[path] = handle


def release_lock(path: str | Path) -> None:
    """Give up a lock taken by :func:`hold_lock` (tests; a process's end does the same)."""
    handle = _HELD.pop(Path(path).resolve(), None)
    if handle is not None:
        handle.close()


def check_port_free(host: str, port: int, what: str, fix: str) -> None:
    """Raise FedgovError in one line when ``host:port`` cannot be listened on.

    ``what`` names the listener (``site hosp-a's runtime API``), ``fix`` the option to change.
    Binds with SO_REUSEADDR like the servers themselves, so a port in TIME_WAIT counts as free.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise FedgovError(
                    f"{what}: port {port} on {host} is already in use (by another site, "
                    f"coordinator or program); {fix}"
                ) from None
            raise FedgovError(
                f"{what}: cannot listen on {host}:{port} ({error.strerror}); {fix}"
            ) from None
