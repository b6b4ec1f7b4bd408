"""Processes that die together and start once: a site daemon and a coordinator, as real processes.

A daemon (``fedgov site start``) killed with SIGKILL takes its SuperNode, SuperExec and the
SuperExec's zygote with it, and starts again on the same folder and port; a second start on a
running site folder is refused in one line without touching the folder; a taken port is named
in one line. The same for ``fedgov server start`` and its SuperLink. Everything on 127.0.0.1,
stopped by the ``processes`` fixture (which also fails the test if anything outlives it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import yaml
from processes import FEDGOV, PROC, ProcessGroup, Started, fedgov, free_ports, port_is_open

from fedgov.datasets import load_dataset, load_table

pytestmark = pytest.mark.slow

START_TIMEOUT = 120.0
DEATH_TIMEOUT = 30.0
HOSPITAL = "hosp-30061"


def _ticks(pid: int) -> int | None:
    """The start time of a live (non-zombie) ``pid`` in clock ticks, None when gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] in "ZX" else int(fields[19])


def _tree(root: int) -> set[tuple[int, int]]:
    """(pid, start ticks) of ``root`` and every live process descended from it, or sharing a
    session with one of them (helpers lead their own sessions)."""
    table: dict[int, tuple[int, int, int]] = {}  # pid -> (ppid, session, ticks)
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            if fields[0] not in "ZX":
                table[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    ours, grew = {root}, True
    while grew:
        sessions = {table[pid][1] for pid in ours if pid in table} - {table[root][1]}
        found = {p for p, (ppid, sid, _) in table.items() if ppid in ours or sid in sessions}
        grew = bool(found - ours)
        ours |= found
    return {(pid, table[pid][2]) for pid in ours if pid in table}


def _alive(tree: set[tuple[int, int]]) -> list[int]:
    return sorted(pid for pid, ticks in tree if _ticks(pid) == ticks)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr  # one line, never a traceback
    return lines[0]


def _site(tmp_path: Path, port: int, coordinator_port: int) -> Path:
    """A site folder (its hospital's own CSV and schema) whose daemon runs without TLS."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    table = load_table("medpar")
    table[table["provnum"] == HOSPITAL].drop(columns=["provnum"]).to_csv(
        data / "admissions.csv", index=False
    )
    (data / "schema.yaml").write_text(yaml.safe_dump(load_dataset("medpar").schema.to_dict()))
    folder = tmp_path / "site"
    made = fedgov(
        "site",
        "init",
        "--site-id",
        "hosp-a",
        "--data",
        str(data / "admissions.csv"),
        "--schema",
        str(data / "schema.yaml"),
        "--coordinator",
        f"127.0.0.1:{coordinator_port}",
        "--port",
        str(port),
        "--out",
        str(folder),
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr
    return folder


def _start_site(processes: ProcessGroup, folder: Path, name: str) -> Started:
    """``fedgov site start`` (no coordinator listens: its SuperNode keeps retrying), waited for
    until its SuperExec's zygote is up."""
    daemon = processes.start(
        name, [*FEDGOV, "site", "start", "--config", "site.yaml", "--insecure"], cwd=folder
    )
    processes.wait_for_log(daemon, r"ClientApp tasks fork from a warm zygote", START_TIMEOUT)
    return daemon


def test_a_killed_site_daemon_takes_its_helpers_along_and_starts_again(tmp_path, processes):
    site_port, nobody = free_ports(2)
    folder = _site(tmp_path, site_port, nobody)
    daemon = _start_site(processes, folder, "daemon")
    processes.wait_until(
        lambda: port_is_open("127.0.0.1", site_port),
        START_TIMEOUT,
        "the SuperNode's runtime API",
        [daemon],
    )
    tree = _tree(daemon.pid)
    helpers = json.loads((folder / "daemon.json").read_text())["processes"]
    assert {"supernode", "superexec"} <= set(helpers)
    assert {info["pid"] for info in helpers.values()} <= {pid for pid, _ in tree}
    # the daemon, its SuperNode, SuperExec, the zygote and the process guard (at least)
    assert len(tree) >= 4, processes.describe({pid for pid, _ in tree})

    # A second start on the running site folder is refused in one line; nothing in the folder
    # is touched: the SuperExec's secret, and daemon.json still names the running daemon (which
    # itself updates the file as its SuperNode retries).
    secret = folder / "keys" / "superexec.secret"
    before = (secret.read_bytes(), secret.stat().st_mtime_ns)
    owner = ("pid", "pid_start", "started_at", "processes")

    def daemon_json() -> dict:
        data = json.loads((folder / "daemon.json").read_text())
        return {key: data[key] for key in owner}

    running = daemon_json()
    second = fedgov("site", "start", "--config", "site.yaml", "--insecure", cwd=folder)
    assert second.returncode == 2
    line = _one_line(second.stderr)
    assert f"a daemon already runs from {folder}" in line and f"pid {daemon.pid}" in line
    assert (secret.read_bytes(), secret.stat().st_mtime_ns) == before
    assert daemon_json() == running and running["pid"] == daemon.pid

    # SIGKILL to the daemon alone: no chance to clean up. Every process of its tree ends.
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.popen.wait(timeout=10)
    processes.wait_until(lambda: not _alive(tree), DEATH_TIMEOUT, "the killed daemon's tree to end")
    assert _alive(tree) == []
    status = json.loads(fedgov("site", "status", "--json", cwd=folder).stdout)
    assert (status["running"], status["processes"]) == (
        False,
        {"supernode": False, "superexec": False},
    )

    # It starts again at once on the same folder and port.
    again = _start_site(processes, folder, "restarted")
    processes.wait_until(
        lambda: port_is_open("127.0.0.1", site_port),
        START_TIMEOUT,
        "the restarted SuperNode's runtime API",
        [again],
    )
    status = json.loads(fedgov("site", "status", "--json", cwd=folder).stdout)
    assert (status["running"], status["pid"]) == (True, again.pid), status
    assert status["processes"] == {"supernode": True, "superexec": True}
    assert not ({pid for pid, _ in _tree(again.pid)} & {pid for pid, _ in tree})


def test_a_taken_port_is_named_in_one_line(tmp_path):
    site_port, nobody = free_ports(2)
    folder = _site(tmp_path, site_port, nobody)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", site_port))
        squatter.listen()
        refused = fedgov("site", "start", "--config", "site.yaml", "--insecure", cwd=folder)
        assert refused.returncode == 2
        line = _one_line(refused.stderr)
        assert f"port {site_port} on 127.0.0.1 is already in use" in line
        assert "--port" in line
        assert not (folder / "daemon.json").exists()
        assert not (folder / "keys" / "superexec.secret").exists()


def _coordinator(tmp_path: Path, port: int) -> Path:
    folder = tmp_path / "coordinator"
    folder.mkdir()
    made = fedgov("server", "certs", "--out", "certs", cwd=folder)
    assert made.returncode == 0, made.stderr
    (folder / "server.yaml").write_text(
        yaml.safe_dump({"federation": "hospitals", "host": "127.0.0.1", "port": port})
    )
    return folder


def test_a_killed_coordinator_takes_its_superlink_along_and_starts_once(tmp_path, processes):
    port = free_ports(1)[0]
    folder = _coordinator(tmp_path, port)
    start = [*FEDGOV, "server", "start", "--config", "server.yaml"]
    link = processes.start("coordinator", start, cwd=folder)
    processes.wait_for_port(link, port, START_TIMEOUT)
    tree = _tree(link.pid)
    assert any("server.superlink" in line for line in processes.describe({p for p, _ in tree}))

    second = fedgov("server", "start", "--config", "server.yaml", cwd=folder)
    assert second.returncode == 2
    line = _one_line(second.stderr)
    assert "a coordinator already runs on the state" in line and f"pid {link.pid}" in line

    os.kill(link.pid, signal.SIGKILL)
    link.popen.wait(timeout=10)
    processes.wait_until(lambda: not _alive(tree), DEATH_TIMEOUT, "the killed SuperLink to end")
    assert not port_is_open("127.0.0.1", port)

    again = processes.start("restarted", start, cwd=folder)
    processes.wait_for_port(again, port, START_TIMEOUT)

    # Another coordinator (its own state) on the same port: one line naming the port.
    (folder / "other.yaml").write_text(
        yaml.safe_dump({"federation": "x", "port": port, "database": "state2/superlink.db"})
    )
    clash = fedgov("server", "start", "--config", "other.yaml", cwd=folder)
    assert clash.returncode == 2
    line = _one_line(clash.stderr)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "`port:`" in line
