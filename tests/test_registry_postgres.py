"""The registry on a real PostgreSQL server, started by the test from Debian's binaries.

The same code as the SQLite path, through a ``postgresql+psycopg://`` URL: publish, approve,
promote, tamper detection, and concurrent publishers. The server is a throwaway cluster in a
temporary folder on a free 127.0.0.1 port (as the ``postgres`` user when run as root, since
PostgreSQL refuses to run as root), stopped and removed at teardown.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import free_port
from registry_support import concurrent_publish, make_governance, privacy_report, publish_toy

from fedgov_cli.main import main
from server.registry.governance import verify_audit
from server.registry.registry import Registry


def _bin_dir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL cluster and database; yields its SQLAlchemy URL."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) are not installed; `make test` installs "
            "Debian's postgresql package when run as root"
        )
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="fedgov-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no 'postgres' user to run PostgreSQL as")
        os.chown(base, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = base / "data", base / "server.log"
    port = free_port()

    def run(*argv: str) -> None:
        result = subprocess.run(
            [*as_user, *argv], capture_output=True, text=True, timeout=120, cwd=base
        )
        assert result.returncode == 0, f"{argv[0]} failed:\n{result.stdout}\n{result.stderr}"

    started = False
    try:
        run(
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "fedgov",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        started = True
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=port, user="fedgov", dbname="postgres", autocommit=True
        ) as connection:
            connection.execute("CREATE DATABASE registry")
        yield f"postgresql+psycopg://fedgov@127.0.0.1:{port}/registry"
    finally:
        if started:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh_db(postgres_url) -> Iterator[str]:
    """The database emptied of registry tables before each test."""
    from sqlalchemy import create_engine

    from server.registry.store import Base

    engine = create_engine(postgres_url)
    Base.metadata.drop_all(engine)
    engine.dispose()
    yield postgres_url


def test_the_governance_flow_on_postgresql(fresh_db, tmp_path, capsys):
    governance = make_governance(tmp_path, db_url=fresh_db)
    registry = Registry(tmp_path / "registry", fresh_db, create=True)
    assert registry.store.engine.dialect.name == "postgresql"
    publish_toy(registry, governance.keys["server"], report=privacy_report(3.0))
    publish_toy(registry, governance.keys["server"], seed=1, report=privacy_report(12.0))
    common = ["--registry", str(registry.path), "--db", fresh_db]

    def fedgov(*args: str) -> tuple[int, str]:
        code = main(["registry", *args, *common])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    for ref in ("toy-mlp:1", "toy-mlp:2"):
        for name in ("alice", "bob"):
            assert fedgov("approve", ref, "--key", str(governance.key_paths[name]))[0] == 0
    assert fedgov("approve", "toy-mlp:1", "--key", str(governance.key_paths["mallory"]))[0] == 2
    dana = str(governance.key_paths["dana"])
    code, out = fedgov("promote", "toy-mlp:2", "--alias", "production", "--key", dana)
    assert code == 2 and "gate max_epsilon: ε = 12 > 8" in out
    code, out = fedgov("promote", "toy-mlp:1", "--alias", "production", "--key", dana)
    assert code == 0, out
    code, out = fedgov("verify", "toy-mlp@production")
    assert code == 0 and "toy-mlp:1 verified" in out
    code, out = fedgov("audit", "--verify")
    assert code == 0 and "audit chain intact: 8 entries" in out

    from sqlalchemy import text

    with registry.store.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_log WHERE seq = 3"))
    code, out = fedgov("audit", "--verify")
    assert code == 2 and "entry 3 missing (deleted)" in out
    registry.close()


def test_concurrent_publishers_on_postgresql(fresh_db, tmp_path):
    governance = make_governance(tmp_path, db_url=fresh_db)
    path = tmp_path / "registry"
    published = concurrent_publish(path, fresh_db, governance.key_paths["server"], 3, 3)
    assert sorted(published) == list(range(1, 10))
    registry = Registry(path, fresh_db)
    report = verify_audit(registry)
    assert report.ok, report.problems
    assert len(report.entries) == 10  # policy version 1, then 9 publishes
    with registry.store.read() as session:
        stored = {v.version: v.manifest_sha256 for v in registry.store.versions(session)}
    assert stored == published
    registry.close()
