"""The coordinator's SuperLink state: Flower's in-memory state, the registered sites on disk.

:func:`use_memory_state` (run by :mod:`server.superlink`) serves the SuperLink from Flower's
``InMemoryLinkState``, whose node registrations alone are written (atomically, at every
register / unregister) to ``<database>.nodes.json`` and restored with the same node ids when the
coordinator restarts: runs and in-flight messages need not outlive the SuperLink, since
``fedgov run --resume`` continues from fedgov's own checkpoint as a new run. Measured with
``python -m benchmarks.deployment --privacy --secagg`` (3 sites, same machine, same time): the
SuperLink's CPU per round fell from 6.0 s to 2.6 s; Flower's SQLite state wrote every message
and object of every round to its file. If Flower's classes differ from those checked by
:func:`state_problems`, the SQLite state below is used as before.

The SQLite state, with a writer that does not give up under the sites' load:

The cause of ``sqlite3.OperationalError: database is locked`` in a busy SuperLink: Flower 1.42's
SQL state (``flwr.supercore.sql_mixin``) keeps its state in one SQLite file (WAL mode) that every
request thread writes to (nodes pulling and claiming messages, replies stored, heartbeats, the
ServerApp pushing), and gives each writer a busy timeout of 5 s (``SQLITE_PRAGMAS``): a writer
that waits longer than that for the file's single write lock fails with "database is locked"
instead of waiting on. Under the sites' load on a loaded machine, where the thread holding the
lock is often descheduled (one process, one GIL, many request threads on a few shared cores),
a wait of 5 s is reached: the 5-site run that died after round 1 failed so. (The read-then-write
pattern of Flower's sessions is not the cause: pysqlite begins its transaction only at the first
write, so no stale read snapshot is upgraded; tests/test_superlink_state.py checks both.)

The fix: a busy timeout of :data:`BUSY_TIMEOUT_SECONDS` for the SuperLink's SQLite files, so a
writer waits its turn; the state's file, and so the sites' registered keys, stay as they were.
:func:`install` applies it; ``fedgov server start`` runs :mod:`server.superlink`, which installs it
before it runs Flower's ``flower-superlink``.
"""

from __future__ import annotations

import base64
import inspect
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

#: Seconds a SuperLink writer waits for SQLite's write lock before "database is locked".
BUSY_TIMEOUT_SECONDS = 120


def install() -> None:
    """Apply the longer busy timeout to Flower's SQL state in this process (before its engines
    are created: Flower sets its pragmas on every new connection from ``SQLITE_PRAGMAS``)."""
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(BUSY_TIMEOUT_SECONDS * 1000) if name == "busy_timeout" else value)
        for name, value in sql_mixin.SQLITE_PRAGMAS
    )


# ---- the state backend: Flower's in-memory state, with the sites' registrations on disk ------

#: Beside the ``database`` path: the registered sites' keys and node ids (JSON, atomic writes).
NODES_SUFFIX = ".nodes.json"


def nodes_path(database: str | Path) -> Path:
    """Where a SuperLink whose ``--database`` is ``database`` keeps its registered nodes."""
    return Path(str(database) + NODES_SUFFIX)


def _node_entry(node: Any) -> dict[str, Any]:
    return {
        "node_id": int(node.node_id),
        "owner_aid": node.owner_aid,
        "owner_name": node.owner_name,
        "public_key": base64.b64encode(node.public_key).decode(),
        "heartbeat_interval": float(node.heartbeat_interval),
        "registered_at": node.registered_at,
    }


def read_nodes(path: Path) -> list[dict[str, Any]]:
    """The registrations kept at ``path`` (none when absent)."""
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("nodes", []))


def nodes_from_sqlite(database: Path) -> list[dict[str, Any]]:
    """The still-registered nodes of a Flower SQLite state (the backend before this one), so
    that a coordinator upgraded in place keeps its sites."""
    if not database.is_file():
        return []
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT node_id, owner_aid, owner_name, public_key, heartbeat_interval, "
            "registered_at FROM node WHERE status != ?",
            ("unregistered",),
        ).fetchall()
    except sqlite3.Error:
        return []
    finally:
        connection.close()
    return [
        {
            "node_id": node_id + 2**64 if node_id < 0 else node_id,  # stored as signed int64
            "owner_aid": owner_aid,
            "owner_name": owner_name,
            "public_key": base64.b64encode(public_key).decode(),
            "heartbeat_interval": float(heartbeat_interval),
            "registered_at": registered_at or "",
        }
        for node_id, owner_aid, owner_name, public_key, heartbeat_interval, registered_at in rows
    ]


def persistent_nodes_state_class() -> type:
    """Flower's ``InMemoryLinkState`` whose node registrations (and only those: runs and
    messages are per run, and ``fedgov run --resume`` starts a new run from fedgov's own
    checkpoint) are kept in a JSON file and restored, same node ids, at start."""
    from flwr.proto.node_pb2 import NodeInfo
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.supercore.constant import NodeStatus

    from fedgov.records import atomic_write_bytes

    class PersistentNodesLinkState(InMemoryLinkState):  # type: ignore[misc,valid-type]
        def __init__(self, federation_manager: Any, object_store: Any, path: Path) -> None:
            super().__init__(federation_manager, object_store)
            self.nodes_file = path
            for entry in read_nodes(path):
                key = base64.b64decode(entry["public_key"])
                node_id = int(entry["node_id"])
                self.nodes[node_id] = NodeInfo(
                    node_id=node_id,
                    owner_aid=entry["owner_aid"],
                    owner_name=entry["owner_name"],
                    status=NodeStatus.REGISTERED,
                    registered_at=entry["registered_at"],
                    last_activated_at=None,
                    last_deactivated_at=None,
                    unregistered_at=None,
                    online_until=None,
                    heartbeat_interval=float(entry["heartbeat_interval"]),
                    public_key=key,
                )
                self.node_public_key_to_node_id[key] = node_id
                self.owner_to_node_ids.setdefault(entry["owner_aid"], set()).add(node_id)

        def _save_nodes(self) -> None:
            with self.lock:
                entries = [
                    _node_entry(node)
                    for node in self.nodes.values()
                    if node.status != NodeStatus.UNREGISTERED
                ]
            payload = json.dumps({"nodes": sorted(entries, key=lambda e: e["node_id"])}, indent=1)
            atomic_write_bytes(self.nodes_file, payload.encode())

        def create_node(self, *args: Any, **kwargs: Any) -> int:
            node_id = super().create_node(*args, **kwargs)
            if node_id:
                self._save_nodes()
            return node_id

        def delete_node(self, *args: Any, **kwargs: Any) -> None:
            super().delete_node(*args, **kwargs)
            self._save_nodes()

    return PersistentNodesLinkState


def state_problems() -> list[str]:
    """Why the in-memory state cannot be used on the Flower found here (empty: it can)."""
    from flwr.server.superlink.linkstate import in_memory_linkstate, linkstate_factory
    from flwr.superlink import main

    problems = []
    cls = in_memory_linkstate.InMemoryLinkState
    for name in ("create_node", "delete_node"):
        if name not in cls.__dict__:
            problems.append(f"InMemoryLinkState.{name} is missing")
    try:
        init = inspect.getsource(cls.__init__)
    except (OSError, TypeError):
        init = ""
    for attribute in ("self.nodes:", "self.node_public_key_to_node_id:", "self.owner_to_node_ids:"):
        if attribute not in init:
            problems.append(f"InMemoryLinkState has no {attribute.rstrip(':')}")
    if not callable(getattr(main, "get_objectstore_linkstate_factories", None)):
        problems.append("flwr.superlink.main.get_objectstore_linkstate_factories is missing")
    try:
        factory_init = inspect.getsource(linkstate_factory.LinkStateFactory.__init__)
    except (OSError, TypeError):
        factory_init = ""
    for attribute in (
        "self.state_instance",
        "self._state_lock",
        "self.federation_manager",
        "self.objectstore_factory",
    ):
        if attribute not in factory_init:
            problems.append(f"LinkStateFactory has no {attribute[5:]}")
    return problems


def use_memory_state(database: str) -> bool:
    """Serve the SuperLink from Flower's in-memory state, its node registrations kept in
    :func:`nodes_path` (``database`` itself is no longer written; the registrations of a
    Flower SQLite state found there are carried over once). False, with a warning, if
    Flower's classes changed: the SQLite state is then used as before."""
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    if database in (FLWR_IN_MEMORY_DB_NAME, ":memory:") or database.startswith("sqlite:"):
        return False
    problems = state_problems()
    if problems:
        print(
            f"fedgov: SuperLink state left as Flower's SQLite ({'; '.join(problems)})",
            file=sys.stderr,
        )
        return False
    from flwr.server.superlink.linkstate.linkstate_factory import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink import main

    path = nodes_path(database)
    if not path.is_file() and (carried := nodes_from_sqlite(Path(database))):
        from fedgov.records import atomic_write_bytes

        atomic_write_bytes(path, json.dumps({"nodes": carried}, indent=1).encode())
    state_class = persistent_nodes_state_class()

    class NodesKeptFactory(LinkStateFactory):  # type: ignore[misc,valid-type]
        def state(self) -> Any:
            if self.state_instance is None:
                with self._state_lock:
                    if self.state_instance is None:
                        self.state_instance = state_class(
                            self.federation_manager, self.objectstore_factory.store(), path
                        )
            return self.state_instance

    def factories(_database: str, federation_manager: Any) -> tuple[Any, Any]:
        objects = ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)
        return objects, NodesKeptFactory(FLWR_IN_MEMORY_DB_NAME, federation_manager, objects)

    main.get_objectstore_linkstate_factories = factories
    return True
