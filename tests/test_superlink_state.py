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
