"""``fedgov site status``: is the site's daemon running, is it connected, what did it last do.

Three small JSON files in the site folder, each replaced atomically (temporary file, fsync,
rename), so a reader never sees half a file. All three are fedgov's own records; nothing is read
from Flower's log text:

- ``daemon.json``, written by ``fedgov site start`` (:class:`DaemonStatus`, clients/daemon.py):
  the daemon's pid (and its start time, so a reused pid is not mistaken for it), the SuperNode's
  and SuperExec's pids, the coordinator, the runtime, and ``running``, or ``stopped`` (with why,
  from the helpers' exit codes) when the daemon ends by itself. A daemon killed outright cannot
  say so: its pid is then gone, which is what :func:`read_status` checks.
- ``supernode.json``, written by the SuperNode process itself (:class:`SuperNodeContact`,
  clients/supernode.py, through :func:`fedgov.flower_hooks.install_supernode_contact`): its pid,
  the node id the coordinator gave it, when it last pulled from or pushed to the SuperLink, when
  the last message arrived and whether it is answering one. The SuperNode's loop pulls at least
  every 3 s while connected and waits for the ClientApp between a message and its reply, so no
  contact for :data:`CONTACT_FRESH_SECONDS` while not answering a message means the connection
  is lost (Flower retries it with back-off).
- ``activity.json``, written by the ClientApp after every train request it answers
  (:func:`record_activity`, clients/update.py): fedgov's run id, the round, ``trained`` or
  ``declined`` (with the reason) and the site's ε after it.

ε spent against the cap comes from the site's own ledger (clients/budget.py), not from these files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DAEMON_FILE = "daemon.json"
SUPERNODE_FILE = "supernode.json"
ACTIVITY_FILE = "activity.json"
#: Where the daemon tells its SuperNode to keep ``supernode.json`` (the SuperNode's environment).
SUPERNODE_STATE_ENV = "FEDGOV_SUPERNODE_STATE"
#: A connected SuperNode pulls at least every 3 s (Flower's idle pause); no contact for this
#: long, while it is not answering a message, means the connection is lost.
CONTACT_FRESH_SECONDS = 15.0
#: The SuperNode writes ``supernode.json`` at most this often (from a thread, off its loop).
CONTACT_WRITE_SECONDS = 1.0


def _now() -> float:
    return time.time()


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (Linux /proc), None elsewhere/gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def process_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` runs and, when ``start_ticks`` is known, is the process that wrote it."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if Path("/proc").is_dir():
        fields = _stat_fields(pid)
        if fields is None or fields[0] in "ZX":  # gone, or a zombie: it has exited
            return False
        if start_ticks is not None and int(fields[19]) != start_ticks:
            return False  # the pid now belongs to another process
    return True


class DaemonStatus:
    """The daemon's side: ``daemon.json``: its pid, its helpers' pids, and how it ended."""

    def __init__(self, site_dir: str | Path, site_id: str, coordinator: str, runtime: str) -> None:
        self.path = Path(site_dir) / DAEMON_FILE
        pid = os.getpid()
        self.data: dict[str, Any] = {
            "site_id": site_id,
            "pid": pid,
            "pid_start": process_start_ticks(pid),
            "coordinator": coordinator,
            "runtime": runtime,
            "started_at": _now(),
            "state": "running",
            "state_since": _now(),
            "processes": {},
            "stopped_reason": None,
        }

    def write(self) -> None:
        from fedgov.atomic import atomic_write_json

        self.data["updated_at"] = _now()
        atomic_write_json(self.path, self.data)

    def started(self, processes: Mapping[str, int]) -> None:
        """The daemon's helpers are running (name → pid)."""
        self.data["processes"] = {
            name: {"pid": pid, "pid_start": process_start_ticks(pid)}
            for name, pid in processes.items()
        }
        self.write()

    def _state(self, state: str) -> None:
        if self.data["state"] != state:
            self.data["state"], self.data["state_since"] = state, _now()

    def stopped(self, reason: str) -> None:
        self._state("stopped")
        self.data["stopped_reason"] = reason
        self.write()


class SuperNodeContact:
    """The SuperNode's side: ``supernode.json``, fed by the SuperNode loop's own calls
    (:func:`fedgov.flower_hooks.install_supernode_contact`) and written from a thread at most
    every :data:`CONTACT_WRITE_SECONDS`, so the loop itself never waits for the disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        pid = os.getpid()
        self.data: dict[str, Any] = {
            "pid": pid,
            "pid_start": process_start_ticks(pid),
            "node_id": None,
            "connected_at": None,
            "last_contact_at": None,
            "last_message_at": None,
            "answering_since": None,
        }
        self._lock = threading.Lock()
        self._changed = threading.Event()

    def pulled(self, node_id: int, message_arrived: bool) -> None:
        """A pull from the SuperLink returned (with a message for this site or without)."""
        now = _now()
        with self._lock:
            first = self.data["node_id"] != node_id
            self.data["node_id"] = node_id
            self.data["connected_at"] = self.data["connected_at"] or now
            self.data["last_contact_at"] = now
            if message_arrived:
                self.data["last_message_at"] = now
                self.data["answering_since"] = now
        self._changed.set()
        if first:  # the node id at once: status and a restarted daemon read it
            with contextlib.suppress(OSError):  # never an error inside Flower's loop
                self.write()

    def pushed(self, node_id: int) -> None:
        """The replies to the messages this site answered went out to the SuperLink."""
        with self._lock:
            self.data["node_id"] = node_id
            self.data["last_contact_at"] = _now()
            self.data["answering_since"] = None
        self._changed.set()

    def write(self) -> None:
        from fedgov.atomic import atomic_write_json

        with self._lock:
            data = dict(self.data)
            self._changed.clear()
        data["updated_at"] = _now()
        atomic_write_json(self.path, data)

    def start(self) -> None:
        """Write the file now, then whenever it changed, from a daemon thread."""
        self.write()

        def keep_writing() -> None:
            while True:
                self._changed.wait()
                time.sleep(CONTACT_WRITE_SECONDS)
                with contextlib.suppress(OSError):  # best effort: the site keeps being served
                    self.write()

        threading.Thread(target=keep_writing, name="fedgov-contact", daemon=True).start()


def previous_node_id(site_dir: str | Path) -> int | None:
    """The node id the site's last SuperNode connected as (None: it never connected)."""
    data, _ = _read_json(Path(site_dir) / SUPERNODE_FILE)
    node_id = (data or {}).get("node_id")
    return node_id if isinstance(node_id, int) else None


def previous_daemon_crashed(site_dir: str | Path) -> bool:
    """Whether the site's last daemon ended without saying so (killed or crashed)."""
    data, _ = _read_json(Path(site_dir) / DAEMON_FILE)
    if not data or data.get("state") == "stopped":
        return False
    return not process_alive(data.get("pid"), data.get("pid_start"))


def record_run_outcome(
    site_dir: str | Path, flower_run_id: object, outcome: str, reason: str
) -> None:
    """What the site did with a whole run before any round (``declined``: its data; ``refused``:
    the app), as its last activity; a status file that cannot be written never stops the site."""
    with contextlib.suppress(OSError):
        record_activity(
            site_dir,
            run_id=str(flower_run_id),
            flower_run_id=flower_run_id,
            server_round=0,
            outcome=outcome,
            reason=reason,
        )


def record_activity(
    site_dir: str | Path,
    *,
    run_id: str,
    flower_run_id: object,
    server_round: int,
    outcome: str,
    reason: str = "",
    epsilon: float | None = None,
) -> None:
    """The ClientApp's side: what the site last did with a train request (``activity.json``)."""
    from fedgov.atomic import atomic_write_json

    atomic_write_json(
        Path(site_dir) / ACTIVITY_FILE,
        {
            "run": run_id,
            "flower_run": str(flower_run_id),
            "round": server_round,
            "outcome": outcome,
            "reason": reason,
            "epsilon": epsilon,
            "at": _now(),
            "pid": os.getpid(),
        },
    )


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(content, None), (None, None) when absent, or (None, why) when unreadable."""
    if not path.exists():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{path} is unreadable ({type(error).__name__})"
    if not isinstance(data, dict):
        return None, f"{path} is not a JSON object"
    return data, None


@dataclass(frozen=True)
class SiteStatus:
    """What ``fedgov site status`` reports."""

    site_id: str
    site_dir: Path
    running: bool
    connection: str  # connected | connecting | reconnecting | stopped | not running | unknown
    daemon: dict[str, Any] | None
    supernode: dict[str, Any] | None
    processes: dict[str, bool]  # helper name → alive
    activity: dict[str, Any] | None
    epsilon_spent: float | None
    epsilon_cap: float
    ledger_problem: str | None
    problems: list[str]

    @property
    def connected(self) -> bool:
        return self.running and self.connection == "connected"

    @property
    def last_activity_at(self) -> float | None:
        times = [
            t
            for t in (
                (self.activity or {}).get("at"),
                (self.supernode or {}).get("last_message_at"),
            )
            if isinstance(t, (int, float))
        ]
        return max(times) if times else None

    def as_dict(self) -> dict[str, Any]:
        daemon = self.daemon or {}
        return {
            "site_id": self.site_id,
            "site_dir": str(self.site_dir),
            "running": self.running,
            "connected": self.connected,
            "connection": self.connection,
            "coordinator": daemon.get("coordinator"),
            "node_id": (self.supernode or {}).get("node_id"),
            "last_contact_at": (self.supernode or {}).get("last_contact_at"),
            "pid": daemon.get("pid"),
            "started_at": daemon.get("started_at"),
            "processes": self.processes,
            "stopped_reason": daemon.get("stopped_reason"),
            "last_activity_at": self.last_activity_at,
            "last": self.activity,
            "epsilon_spent": self.epsilon_spent,
            "epsilon_cap": self.epsilon_cap,
            "ledger_problem": self.ledger_problem,
            "problems": self.problems,
        }


def _connection(supernode: dict[str, Any] | None, processes: Any, now: float) -> str:
    """connected | connecting | reconnecting, from the running SuperNode's ``supernode.json``."""
    own = processes.get("supernode") if isinstance(processes, dict) else None
    if not supernode or not isinstance(own, dict) or supernode.get("pid") != own.get("pid"):
        return "connecting"  # this daemon's SuperNode has not reached the SuperLink yet
    if supernode.get("answering_since") is not None:
        return "connected"  # waiting for the ClientApp's reply: the loop does not pull meanwhile
    last = supernode.get("last_contact_at")
    if not isinstance(last, (int, float)):
        return "connecting"
    return "connected" if now - last <= CONTACT_FRESH_SECONDS else "reconnecting"


def read_status(
    site_dir: str | Path, site_id: str, epsilon_cap: float, now: float | None = None
) -> SiteStatus:
    """The site's status from its folder: daemon.json + liveness, supernode.json,
    activity.json, the ledger."""
    from clients.budget import read_budget
    from fedgov.errors import FedgovError

    site_dir = Path(site_dir)
    now = _now() if now is None else now
    problems: list[str] = []
    daemon, problem = _read_json(site_dir / DAEMON_FILE)
    if problem:
        problems.append(problem)
    activity, problem = _read_json(site_dir / ACTIVITY_FILE)
    if problem:
        problems.append(problem)
    supernode, problem = _read_json(site_dir / SUPERNODE_FILE)
    if problem:
        problems.append(problem)
    running, connection, helpers = False, "not running", {}
    if daemon is not None:
        running = process_alive(daemon.get("pid"), daemon.get("pid_start"))
        helpers = {
            name: process_alive(info.get("pid"), info.get("pid_start"))
            for name, info in (daemon.get("processes") or {}).items()
            if isinstance(info, dict)
        }
        state = str(daemon.get("state", "unknown"))
        if not running:
            connection = "stopped" if state == "stopped" else "not running"
        elif helpers and not all(helpers.values()):
            connection = "unknown"
            down = ", ".join(name for name, alive in helpers.items() if not alive)
            problems.append(f"the daemon runs but its {down} is gone")
        else:
            connection = _connection(supernode, (daemon.get("processes") or {}), now)
    try:
        budget = read_budget(site_dir, site_id, epsilon_cap)
        spent, ledger_problem = budget.epsilon_spent, None
    except FedgovError as error:
        spent, ledger_problem = None, str(error)
    return SiteStatus(
        site_id=site_id,
        site_dir=site_dir,
        running=running,
        connection=connection,
        daemon=daemon,
        supernode=supernode,
        processes=helpers,
        activity=activity,
        epsilon_spent=spent,
        epsilon_cap=epsilon_cap,
        ledger_problem=ledger_problem,
        problems=problems,
    )


def _when(timestamp: Any, now: float) -> str:
    if not isinstance(timestamp, (int, float)):
        return "never"
    stamp = dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({_ago(now - timestamp)} ago)"


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def format_status(status: SiteStatus, now: float | None = None) -> str:
    """A few lines for the site's operator."""
    now = _now() if now is None else now
    daemon = status.daemon or {}
    lines = []
    if status.daemon is None:
        lines.append(f"site {status.site_id}: not running (never started from {status.site_dir})")
    elif status.running:
        lines.append(
            f"site {status.site_id}: running (pid {daemon.get('pid')}, since "
            f"{_when(daemon.get('started_at'), now)})"
        )
        where = daemon.get("coordinator")
        if status.connection == "connected":
            node_id = (status.supernode or {}).get("node_id")
            node = f" as node {node_id}" if node_id else ""
            lines.append(f"connection: connected to {where}{node}")
        elif status.connection == "reconnecting":
            since = _when((status.supernode or {}).get("last_contact_at"), now)
            lines.append(f"connection: lost; reconnecting to {where} (last contact {since})")
        else:
            lines.append(f"connection: {status.connection} ({where})")
    else:
        why = daemon.get("stopped_reason") if status.connection == "stopped" else None
        lines.append(
            f"site {status.site_id}: not running (daemon pid {daemon.get('pid')} "
            + (f"stopped: {why})" if why else "is gone: killed or crashed)")
        )
    activity = status.activity
    if activity:
        what = str(activity.get("outcome", "?"))
        if activity.get("reason"):
            what += f" ({activity['reason']})"
        lines.append(
            f"last task: run {activity.get('run')} round {activity.get('round')}: {what}, "
            f"{_when(activity.get('at'), now)}"
        )
    else:
        lines.append("last task: none yet")
    lines.append(f"last activity: {_when(status.last_activity_at, now)}")
    if status.ledger_problem:
        lines.append(f"privacy: ledger unusable: {status.ledger_problem}")
    else:
        lines.append(f"privacy: ε spent {status.epsilon_spent:.3f} of cap {status.epsilon_cap:g}")
    lines.extend(f"problem: {problem}" for problem in status.problems)
    return "\n".join(lines)
