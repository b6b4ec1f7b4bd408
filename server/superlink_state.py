"""The coordinator's SuperLink, with a SQLite state that does not lock under the sites' load.

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
