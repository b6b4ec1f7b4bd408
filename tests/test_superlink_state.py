"""Why a busy SuperLink said "database is locked", and the fix (server/superlink_state.py).

Real SQLite files set up as Flower 1.42 sets up its state (its own pragma listener: WAL, busy
timeout). A writer that must wait for another's transaction longer than Flower's busy timeout
fails; with the SuperLink's longer timeout it waits and both updates land. The read-then-write
pattern of Flower's sessions alone does not lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from flwr.supercore import sql_mixin
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import OperationalError

from server.superlink_state import BUSY_TIMEOUT_SECONDS, install


def _flower_engine(path):
    """An engine set up as Flower 1.42's SqlMixin sets up its SQLite file."""
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False})
    event.listen(engine, "connect", sql_mixin._set_sqlite_pragmas)
    with engine.begin() as connection:
        connection.execute(
            text("CREATE TABLE IF NOT EXISTS claims (id INTEGER PRIMARY KEY, n INT)")
        )
        connection.execute(text("INSERT OR IGNORE INTO claims VALUES (1, 0)"))
    return engine


def _counter(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(text("SELECT n FROM claims WHERE id = 1")).scalar_one()


def _second_writer_while_the_first_holds_the_lock(engine, hold_seconds: float) -> None:
    """A writes and keeps its transaction open for ``hold_seconds`` (a descheduled thread);
    B writes meanwhile. A adds 10, B adds 1; B's error, if any, is raised."""
    a_holds = threading.Event()
    errors: list[BaseException] = []

    def first_site() -> None:
        with engine.begin() as connection:
            connection.execute(text("UPDATE claims SET n = n + 10 WHERE id = 1"))
            a_holds.set()
            time.sleep(hold_seconds)

    thread = threading.Thread(target=first_site)
    thread.start()
    a_holds.wait()
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE claims SET n = n + 1 WHERE id = 1"))
    except BaseException as error:  # re-raised after A is done
        errors.append(error)
    thread.join()
    if errors:
        raise errors[0]


def test_a_writer_waiting_past_flowers_busy_timeout_gets_database_is_locked(tmp_path):
    busy = dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"]
    assert busy == "5000"  # Flower 1.42's 5 s
    engine = _flower_engine(tmp_path / "stock.db")
    with pytest.raises(OperationalError) as locked:
        _second_writer_while_the_first_holds_the_lock(engine, hold_seconds=int(busy) / 1000 + 1.5)
    assert isinstance(locked.value.orig, sqlite3.OperationalError)
    assert str(locked.value.orig) == "database is locked"
    assert _counter(engine) == 10  # only A's update landed
    engine.dispose()


def test_the_superlinks_longer_busy_timeout_makes_the_writer_wait_and_both_land(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    install()
    engine = _flower_engine(tmp_path / "fixed.db")
    with engine.connect() as connection:
        timeout = connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
        mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar_one()
    assert (timeout, mode) == (BUSY_TIMEOUT_SECONDS * 1000, "wal")
    _second_writer_while_the_first_holds_the_lock(engine, hold_seconds=6.5)
    assert _counter(engine) == 11
    engine.dispose()


def test_reading_then_writing_in_one_session_does_not_lock(tmp_path):
    """Flower's claim pattern (SELECT, another site commits, UPDATE) is not the cause."""
    engine = _flower_engine(tmp_path / "claims.db")
    with engine.begin() as connection:
        connection.execute(text("SELECT n FROM claims WHERE id = 1")).scalar_one()
        with engine.begin() as other:
            other.execute(text("UPDATE claims SET n = n + 1 WHERE id = 1"))
        connection.execute(text("UPDATE claims SET n = n + 10 WHERE id = 1"))
    assert _counter(engine) == 11
    engine.dispose()


# ---- the in-memory state with the registrations on disk ----------------------------------------


@pytest.fixture()
def memory_state(monkeypatch):
    """``use_memory_state(path)`` then a fresh SuperLink state each call (a restart), as
    ``flwr.superlink.main.create_app`` builds it; Flower's factory function restored after."""
    from flwr.superlink import main
    from flwr.superlink.config_loader import get_federation_manager

    from server.superlink_state import use_memory_state

    monkeypatch.setattr(
        main, "get_objectstore_linkstate_factories", main.get_objectstore_linkstate_factories
    )

    def start(database) -> object:
        assert use_memory_state(str(database)) is True
        _, factory = main.get_objectstore_linkstate_factories(
            str(database), get_federation_manager(is_simulation=False)
        )
        return factory.state()

    return start


def test_flowers_in_memory_state_is_what_the_superlink_state_builds_on():
    from server.superlink_state import state_problems

    assert state_problems() == []


def test_registrations_survive_a_restart_with_their_node_ids_and_nothing_else_does(
    memory_state, tmp_path
):
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.supercore.constant import NodeStatus

    from server.superlink_state import nodes_path

    database = tmp_path / "state" / "superlink.db"
    state = memory_state(database)
    assert isinstance(state, InMemoryLinkState)
    kept = state.create_node("aid", "owner", b"key-of-hosp-a", 30.0)
    removed = state.create_node("aid", "owner", b"key-of-hosp-b", 30.0)
    state.delete_node("aid", removed)
    assert not database.exists() and nodes_path(database).is_file()

    restarted = memory_state(database)
    assert restarted is not state
    assert restarted.get_node_id_by_public_key(b"key-of-hosp-a") == kept
    assert restarted.get_node_id_by_public_key(b"key-of-hosp-b") is None
    assert restarted.nodes[kept].status == NodeStatus.REGISTERED
    assert restarted.activate_node(kept, 30.0) is True  # the site reconnects as itself
    with pytest.raises(ValueError, match="already in use"):
        restarted.create_node("aid", "owner", b"key-of-hosp-a", 30.0)


def test_a_coordinator_upgraded_in_place_keeps_the_sites_of_its_sqlite_state(
    memory_state, tmp_path
):
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.config_loader import get_federation_manager

    database = tmp_path / "superlink.db"
    old = SqlLinkState(
        str(database), get_federation_manager(is_simulation=False), ObjectStoreFactory().store()
    )
    old.initialize()
    ids = [old.create_node("aid", "owner", key, 30.0) for key in (b"site-1", b"site-2")]
    old.delete_node("aid", ids[1])

    state = memory_state(database)
    assert state.get_node_id_by_public_key(b"site-1") == ids[0]  # the same (unsigned) node id
    assert state.get_node_id_by_public_key(b"site-2") is None
