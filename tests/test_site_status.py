"""``fedgov site status`` on real files: daemon.json written as the daemon writes it, real pids
(this process, alive; a finished child, gone), activity.json and a real ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clients.daemon import ZYGOTE_FAST_POLL
from clients.site_privacy import reserve_round
from clients.site_status import (
    ACTIVITY_FILE,
    DAEMON_FILE,
    RECONNECT_GRACE_SECONDS,
    DaemonStatus,
    format_status,
    previous_daemon_crashed,
    previous_node_id,
    read_status,
    record_activity,
)
from fedgov.config import RunConfig
from fedgov_cli.main import main

SITE = "hosp-a"


def _site(tmp_path: Path, cap: float = 8.0) -> Path:
    folder = tmp_path / SITE
    folder.mkdir()
    settings = {"site_id": SITE, "coordinator": "127.0.0.1:9092", "data": "d.csv",
                "schema": "s.yaml", "epsilon_cap": cap}  # fmt: skip
    (folder / "site.yaml").write_text(yaml.safe_dump(settings))
    return folder


def _spend(folder: Path, server_round: int) -> float:
    cfg = RunConfig()
    cfg.privacy.name = "sample_dp"
    budget = reserve_round(cfg, {"site-dir": str(folder), "epsilon-cap": 8.0}, SITE, 500,
                           "run-7", server_round, "ab" * 32)  # fmt: skip
    budget.release("cd" * 32)
    return budget.spend.epsilon_after


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _status(folder: Path, *args: str, capsys) -> tuple[int, str, str]:
    code = main(["site", "status", "--config", str(folder / "site.yaml"), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_running_connected_site_says_so_with_its_last_round_and_epsilon(tmp_path, capsys):
    folder = _site(tmp_path)
    # this process is the daemon
    daemon = DaemonStatus(folder, SITE, "127.0.0.1:9092", ZYGOTE_FAST_POLL)
    daemon.write()
    daemon.started({"supernode": daemon.data["pid"]})
    assert read_status(folder, SITE, 8.0).connection == "connecting"
    daemon.observe("INFO :      SuperNode ID: 4242\n")
    daemon.observe("INFO :      Receiving: train message (ID: 77)\n")
    spent = _spend(folder, 1)
    spent = _spend(folder, 2)
    record_activity(folder, run_id="run-7", flower_run_id=99, server_round=2, outcome="trained",
                    epsilon=spent)  # fmt: skip
    code, out, _ = _status(folder, capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"site {SITE}: running (pid {daemon.data['pid']}, since ")
    assert lines[1] == "connection: connected to 127.0.0.1:9092 as node 4242"
    assert lines[2].startswith("last task: run run-7 round 2: trained, ")
    assert lines[-1] == f"privacy: ε spent {spent:.3f} of cap 8"
    code, out, _ = _status(folder, "--json", capsys=capsys)
    report = json.loads(out)
    assert (report["running"], report["connected"], report["node_id"]) == (True, True, 4242)
    assert report["processes"] == {"supernode": True}
    assert (report["last"]["run"], report["last"]["round"]) == ("run-7", 2)
    assert report["last"]["outcome"] == "trained"
    assert report["epsilon_spent"] == pytest.approx(spent) and report["epsilon_cap"] == 8.0
    assert report["last_activity_at"] >= report["last"]["at"]


def test_a_lost_coordinator_reads_reconnecting_until_the_retry_goes_through(tmp_path):
    folder = _site(tmp_path)
    daemon = DaemonStatus(folder, SITE, "127.0.0.1:9092", ZYGOTE_FAST_POLL)
    daemon.observe("SuperNode ID: 5\n")
    daemon.observe("WARNING :   Connection attempt failed, retrying in 3.50 seconds\n")
    saved = json.loads((folder / DAEMON_FILE).read_text())
    assert saved["state"] == "reconnecting"
    retry_at = saved["retry_at"]
    soon = read_status(folder, SITE, 8.0, now=retry_at + 1)
    assert (soon.running, soon.connection, soon.connected) == (True, "reconnecting", False)
    assert "connection: lost; reconnecting" in format_status(soon, now=retry_at + 1)
    later = read_status(folder, SITE, 8.0, now=retry_at + RECONNECT_GRACE_SECONDS + 1)
    assert later.connected  # no failed attempt since: the retry went through
    daemon.observe("Sent successfully\n")
    assert json.loads((folder / DAEMON_FILE).read_text())["state"] == "connected"


def test_a_killed_daemon_a_stopped_one_and_a_site_never_started(tmp_path, capsys):
    folder = _site(tmp_path)
    code, out, _ = _status(folder, capsys=capsys)
    assert code == 0
    assert out.splitlines()[0] == f"site {SITE}: not running (never started from {folder})"
    assert "last task: none yet" in out and "privacy: ε spent 0.000 of cap 8" in out

    daemon = DaemonStatus(folder, SITE, "127.0.0.1:9092", ZYGOTE_FAST_POLL)
    daemon.data["pid"], daemon.data["pid_start"] = _dead_pid(), None
    daemon.observe("SuperNode ID: 5\n")  # it was connected when it was killed
    record_activity(folder, run_id="r", flower_run_id=1, server_round=3, outcome="declined",
                    reason="privacy budget exhausted", epsilon=7.9)  # fmt: skip
    code, out, _ = _status(folder, capsys=capsys)
    assert out.splitlines()[0].endswith("is gone: killed or crashed)")
    assert "last task: run r round 3: declined (privacy budget exhausted)" in out
    report = json.loads(_status(folder, "--json", capsys=capsys)[1])
    assert (report["running"], report["connected"], report["connection"]) == (
        False, False, "not running"
    )  # fmt: skip

    daemon.stopped("the SuperNode exited with code 0")
    code, out, _ = _status(folder, capsys=capsys)
    assert "stopped: the SuperNode exited with code 0)" in out.splitlines()[0]

    # a live pid that another process now holds (its start time differs) is not the daemon
    if Path("/proc").is_dir():
        reused = {**daemon.data, "pid": os.getpid(), "pid_start": -5}
        (folder / DAEMON_FILE).write_text(json.dumps(reused))
        assert not read_status(folder, SITE, 8.0).running


def test_a_restarted_daemon_knows_whether_its_predecessor_was_killed(tmp_path):
    folder = _site(tmp_path)
    assert (previous_node_id(folder), previous_daemon_crashed(folder)) == (None, False)
    daemon = DaemonStatus(folder, SITE, "127.0.0.1:9092", ZYGOTE_FAST_POLL)
    daemon.observe("SuperNode ID: 77\n")
    assert (previous_node_id(folder), previous_daemon_crashed(folder)) == (77, False)  # alive
    daemon.data["pid"], daemon.data["pid_start"] = _dead_pid(), None
    daemon.write()
    assert previous_daemon_crashed(folder)  # gone without saying so: its session may be open
    daemon.stopped("interrupted (Ctrl-C or SIGTERM)")
    assert not previous_daemon_crashed(folder)


def test_damaged_files_and_ledger_are_reported_not_raised(tmp_path, capsys):
    folder = _site(tmp_path)
    (folder / ACTIVITY_FILE).write_text("{half")
    (folder / "privacy_ledger.json").write_text("[]")
    code, out, _ = _status(folder, capsys=capsys)
    assert code == 0
    assert "privacy: ledger unusable: site hosp-a: privacy ledger" in out
    assert f"problem: {folder / ACTIVITY_FILE} is unreadable (JSONDecodeError)" in out


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "does not exist"),
        ("site_id: [", "is not valid YAML at line 1"),
        ("site_id: a\ncoordinator: h:1\ndata: d\nschema: s\nport_: 3\n", "unknown key 'port_'"),
        ("site_id: a\ncoordinator: h:1\ndata: d\nschema: s\nepsilon_cap: -1\n", "epsilon_cap"),
    ],
)
def test_a_missing_or_invalid_config_is_one_line(tmp_path, capsys, content, expected):
    config = tmp_path / "site.yaml"
    if content is not None:
        config.write_text(content)
    assert main(["site", "status", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err
    assert err.startswith("fedgov: error: ")


def test_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["site", "status", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--json" in out and "--config" in out


def test_status_imports_nothing_heavy(tmp_path):
    """`fedgov site status` answers from a few small files: no torch, pandas or Flower (torch
    alone took 20-30 s to import on a loaded machine)."""
    folder = _site(tmp_path)
    probe = (
        "import sys\n"
        "from fedgov_cli.main import main\n"
        f"code = main(['site', 'status', '--config', {str(folder / 'site.yaml')!r}, '--json'])\n"
        "heavy = sorted({'torch', 'pandas', 'flwr', 'opacus'} & set(sys.modules))\n"
        "print('HEAVY', heavy, code)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "HEAVY [] 0" in result.stdout, result.stdout
