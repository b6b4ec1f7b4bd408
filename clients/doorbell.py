"""A doorbell from the SuperNode to the SuperExec: "a task is waiting", so that it asks now.

Flower's SuperExec asks the SuperNode's Runtime API for a task every poll interval; each ask is
an HTTP request that costs both processes CPU (~20 per second per site at a 50 ms interval: a
sizeable share of a small site's CPU while it trains). With the doorbell, the SuperNode
(:mod:`clients.supernode`) rings once per message it has stored (its task is then ready, the
message's objects pulled), and the SuperExec (:mod:`clients.superexec`) sleeps between polls on
the doorbell instead of a fixed pause: it asks at once when rung and otherwise only every
:data:`SAFETY_POLL_SECONDS`.

The doorbell is a Linux abstract-namespace Unix datagram socket whose random name the site
daemon passes to both processes in :data:`DOORBELL_ENV`: no file, nothing to clean up. A ring
is a best-effort, non-blocking datagram: a lost or spurious ring only means a poll later or an
extra poll, never a lost task.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import sys
import time

DOORBELL_ENV = "FEDGOV_TASK_DOORBELL"
#: The SuperExec's poll interval when it has a doorbell (a safety net: the bell should ring).
SAFETY_POLL_SECONDS = 0.5


def available() -> bool:
    """Abstract-namespace Unix sockets exist on Linux only."""
    return sys.platform.startswith("linux") and hasattr(socket, "AF_UNIX")


def new_name() -> str:
    return f"fedgov-doorbell-{os.getpid()}-{secrets.token_hex(8)}"


def _address(name: str) -> bytes:
    return b"\0" + name.encode()


class Bell:
    """The SuperNode's side: ring after each stored message."""

    def __init__(self, name: str) -> None:
        self._address = _address(name)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    def ring(self) -> None:
        with contextlib.suppress(OSError):  # nobody listening (yet), or a full queue: fine
            self._socket.sendto(b"!", self._address)

    def close(self) -> None:
        self._socket.close()


class Listener:
    """The SuperExec's side: a ``sleep`` that returns early when the bell rings."""

    def __init__(self, name: str) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(_address(name))
        self._socket.setblocking(False)
        self.rings = 0

    def sleep(self, seconds: float) -> None:
        """Wait up to ``seconds``, less if the bell rings (rings since the last wait count)."""
        deadline = time.monotonic() + max(seconds, 0.0)
        while True:
            if self._drain():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(InterruptedError):
                select.select([self._socket], [], [], left)

    def _drain(self) -> bool:
        rung = False
        while True:
            try:
                self._socket.recv(64)
            except (BlockingIOError, InterruptedError):
                return rung
            except OSError:
                return rung
            rung = True
            self.rings += 1

    def close(self) -> None:
        self._socket.close()
