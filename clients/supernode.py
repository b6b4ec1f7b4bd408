"""fedgov's SuperNode: Flower's ``flower-supernode``, its fixed pauses bounded while a run is on.

    python -m clients.supernode <flower-supernode options>

Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a fixed
``time.sleep(3)`` whenever a pull from the SuperLink finds no message, and ``time.sleep(0.5)``
between looks at its own state while waiting for the ClientApp's reply. A round of the
fedgov app sends each site a train and an evaluate message; after answering one, a site
pulls at once, finds nothing (the server is still waiting for the other sites), and sleeps
3 s: every message costs at least ~3 s whatever the app and the executor do.

This entry point runs Flower's own ``flower-supernode`` (same options, same loop) after
rebinding, in this process only, names in that module's namespace
(:func:`fedgov.flower_hooks.install_supernode_pauses`):

- ``time.sleep`` becomes :meth:`BoundedSleep.sleep`: a 3 s "no message" pause becomes a short
  poll with a back-off from :data:`FAST_POLL_SECONDS` to :data:`MAX_POLL_SECONDS` while a
  message arrived within the last :data:`HOT_WINDOW_SECONDS`, and stays Flower's 3 s on an
  idle site; the 0.5 s waits for a local reply become :data:`LOCAL_POLL_SECONDS` (they read
  the SuperNode's in-memory state);
- ``_pull_and_store_message`` is wrapped to note when a message arrived;
- ``pull_objects`` retries a message's not-yet-uploaded objects after 20 ms, not 1 s.

With ``--flower-pauses`` (runtimes ``zygote`` and ``stock``) the pauses stay Flower's. In every
runtime, :func:`record_contact` notes each pull from and push to the SuperLink in the site's
``supernode.json`` (:class:`clients.site_status.SuperNodeContact`), which ``fedgov site status``
reads instead of Flower's log text.

With a doorbell (:mod:`clients.doorbell`, named in ``FEDGOV_TASK_DOORBELL`` by the site daemon)
it also rings fedgov's SuperExec once per stored message.

No installed file is changed. flwr is pinned to 1.42.0; :func:`fedgov.flower_hooks.
supernode_problems` verifies the version, the names, the signatures and that the loop still
calls ``time.sleep(3)`` / ``time.sleep(0.5)``. If anything differs, the SuperNode starts
unmodified (Flower's pauses) with a warning; ``tests/test_flower_hooks.py`` fails loudly.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from logging import WARNING
from pathlib import Path

from clients import doorbell
from clients.site_status import SUPERNODE_STATE_ENV, SuperNodeContact
from fedgov.flower_hooks import (
    install_supernode_contact,
    install_supernode_pauses,
    supernode_contact_problems,
    supernode_problems,
)

#: ``python -m clients.supernode --flower-pauses ...``: leave Flower's pauses as they are (the
#: ``zygote`` and ``stock`` runtimes); the SuperNode still records its contact for site status.
FLOWER_PAUSES_FLAG = "--flower-pauses"

#: First pause after a message, growing ×BACKOFF per empty pull up to MAX_POLL_SECONDS.
FAST_POLL_SECONDS = 0.02
MAX_POLL_SECONDS = 0.2
BACKOFF = 1.5
#: How long after the last message the site keeps polling fast (then Flower's 3 s again).
HOT_WINDOW_SECONDS = 60.0
#: Pauses of Flower's loop shorter than this are local waits (for the ClientApp's reply).
IDLE_THRESHOLD_SECONDS = 1.0
LOCAL_POLL_SECONDS = 0.01


class BoundedSleep:
    """The pause policy (see the module docstring); ``sleeper`` and ``clock`` for tests."""

    def __init__(
        self,
        fast: float = FAST_POLL_SECONDS,
        cap: float = MAX_POLL_SECONDS,
        hot_window: float = HOT_WINDOW_SECONDS,
        local: float = LOCAL_POLL_SECONDS,
        sleeper: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fast, self.cap, self.hot_window, self.local = fast, cap, hot_window, local
        self._sleep, self._clock = sleeper, clock
        self._lock = threading.Lock()
        self.last_message = clock()  # a freshly started site is expected to get work soon
        self.interval = fast

    def message_arrived(self) -> None:
        with self._lock:
            self.last_message = self._clock()
            self.interval = self.fast

    def pause_for(self, seconds: float) -> float:
        """How long to pause where Flower's loop asks for ``seconds``."""
        if seconds < IDLE_THRESHOLD_SECONDS:
            return min(seconds, self.local)
        with self._lock:
            if self._clock() - self.last_message > self.hot_window:
                return seconds  # an idle site: Flower's own pause
            pause = self.interval
            self.interval = min(self.interval * BACKOFF, self.cap)
            return min(pause, seconds)

    def sleep(self, seconds: float) -> None:
        self._sleep(self.pause_for(seconds))


def record_contact() -> bool:
    """Record this SuperNode's contact with the SuperLink in the file the site daemon named
    (``FEDGOV_SUPERNODE_STATE``); False (logged) when none is named or Flower's loop differs."""
    from flwr.supercore import log

    path = os.environ.get(SUPERNODE_STATE_ENV)
    if not path:
        return False
    problems = supernode_contact_problems()
    if problems:
        log(WARNING, "fedgov: site status cannot see this SuperNode (%s)", "; ".join(problems))
        return False
    contact = SuperNodeContact(path)
    install_supernode_contact(contact.pulled, contact.pushed)
    contact.start()
    return True


def main() -> None:
    from flwr.supercore import log
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flower_pauses = FLOWER_PAUSES_FLAG in sys.argv[1:]
    argv = [arg for arg in sys.argv[1:] if arg != FLOWER_PAUSES_FLAG]
    problems = [] if flower_pauses else supernode_problems()  # flower_pauses: zygote, stock
    if problems:
        log(WARNING, "fedgov: SuperNode pauses left as Flower's (%s)", "; ".join(problems))
    elif not flower_pauses:
        policy = BoundedSleep()
        bell_name = os.environ.get(doorbell.DOORBELL_ENV)
        bell = doorbell.Bell(bell_name) if bell_name and doorbell.available() else None

        def message_arrived() -> None:
            policy.message_arrived()
            if bell is not None:
                bell.ring()  # the SuperExec asks for the task now, not at its next poll

        install_supernode_pauses(policy.sleep, message_arrived)
    record_contact()
    sys.argv = [str(Path(sys.executable).parent / "flower-supernode"), *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
