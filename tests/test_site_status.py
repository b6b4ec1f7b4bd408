"""``fedgov site status`` on real files: daemon.json and supernode.json written as the daemon
and the SuperNode write them (through Flower's own SuperNode loop function for the hook), real pids
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
    CONTACT_FRESH_SECONDS,
    DAEMON_FILE,
    SUPERNODE_FILE,
    DaemonStatus,
    SuperNodeContact,
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
    settings = {
        "site_id": SITE,
        "coordinator": "127.0.0.1:9092",
        "data": "d.csv",
        "schema": "s.yaml",
        "epsilon_cap": cap,
    }
    (folder / "site.yaml").write_text(yaml.safe_dump(settings))
    return folder


def _spend(folder: Path, server_round: int) -> float:
    cfg = RunConfig()
    cfg.privacy.name = "sample_dp"
    budget = reserve_round(
        cfg,
        {"site-dir": str(folder), "epsilon-cap": 8.0},
        SITE,
        500,
        "run-7",
        server_round,
        "ab" * 32,
    )
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


def _contact(folder: Path) -> SuperNodeContact:
    """The SuperNode's side, as clients/supernode.py keeps it (this process is the SuperNode)."""
    return SuperNodeContact(folder / SUPERNODE_FILE)


def _saved(folder: Path) -> dict:
    return json.loads((folder / SUPERNODE_FILE).read_text())


def test_a_running_connected_site_says_so_with_its_last_round_and_epsilon(tmp_path, capsys):
    folder = _site(tmp_path)
    # this process is the daemon, and its own SuperNode
    daemon = DaemonStatus(folder, SITE, "127.0.0.1:9092", ZYGOTE_FAST_POLL)
    daemon.write()
    daemon.started({"supernode": daemon.data["pid"]})
    assert read_status(folder, SITE, 8.0).connection == "connecting"
    contact = _contact(folder)
    contact.pulled(4242, message_arrived=False)  # the first contact is written at once
    assert _saved(folder)["node_id"] == 4242
    contact.pulled(4242, message_arrived=True)
    contact.pushed(4242)
    contact.write()
    spent = _spend(folder, 1)
    spent = _spend(folder, 2)
    record_activity(
        folder, run_id="run-7", flower_run_id=99, server_round=2, outcome="trained", epsilon=spent
    )
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
    assert report["last_contact_at"] == _saved(folder)["last_contact_at"]
    assert report["last_activity_at"] >= report["last"]["at"]


def test_a_lost_coordinator_reads_reconnecting_until_contact_resumes(tmp_path):
    folder = _site(tmp_path)
    daemon = DaemonStatus(folder, SITE, "127.0.0.1:9092", ZYGOTE_FAST_POLL)
    daemon.started({"supernode": daemon.data["pid"]})
    contact = _contact(folder)
    contact.pulled(5, message_arrived=False)
    last = _saved(folder)["last_contact_at"]
    fresh = read_status(folder, SITE, 8.0, now=last + CONTACT_FRESH_SECONDS - 1)
    assert (fresh.connection, fresh.connected) == ("connected", True)
    lost = read_status(folder, SITE, 8.0, now=last + CONTACT_FRESH_SECONDS + 1)
    assert (lost.running, lost.connection, lost.connected) == (True, "reconnecting", False)
    text = format_status(lost, now=last + CONTACT_FRESH_SECONDS + 1)
    assert "connection: lost; reconnecting to 127.0.0.1:9092 (last contact " in text
    # A message arrived: the loop waits for the ClientApp's reply and pulls nothing meanwhile.
    contact.pulled(5, message_arrived=True)
    contact.write()
    answering = _saved(folder)["answering_since"]
    assert read_status(folder, SITE, 8.0, now=answering + 10 * CONTACT_FRESH_SECONDS).connected
    contact.pushed(5)  # the reply went out: fresh contact again, and no longer answering
    contact.write()
    saved = _saved(folder)
    assert saved["answering_since"] is None and saved["last_contact_at"] >= answering
    late = saved["last_contact_at"] + CONTACT_FRESH_SECONDS + 1
    assert read_status(folder, SITE, 8.0, now=late).connection == "reconnecting"


def test_a_previous_supernodes_record_is_not_this_ones(tmp_path):
    folder = _site(tmp_path)
    _contact(folder).pulled(9, message_arrived=False)
    daemon = DaemonStatus(folder, SITE, "127.0.0.1:9092", ZYGOTE_FAST_POLL)
    daemon.started({"supernode": _dead_pid()})  # this daemon's SuperNode: another pid
    status = read_status(folder, SITE, 8.0)
    assert status.running and status.connection == "unknown"  # its SuperNode is gone
    daemon.started({"supernode": os.getppid()})  # alive, but not the one that wrote the file
    assert read_status(folder, SITE, 8.0).connection == "connecting"


def test_the_contact_hook_runs_inside_flowers_own_supernode_loop_function(tmp_path, monkeypatch):
    """install_supernode_contact wraps Flower 1.42's ``_pull_and_store_message``: a real call of
    it (a pull that found no message) reports the node id from Flower's real node state."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode import start_client_internal as module
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from fedgov.flower_hooks import install_supernode_contact, supernode_contact_problems

    assert supernode_contact_problems() == []
    for name in ("_pull_and_store_message", "_push_messages"):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    folder = _site(tmp_path)
    contact = _contact(folder)
    install_supernode_contact(contact.pulled, contact.pushed)
    store = ObjectStoreFactory().store()
    state = InMemoryNodeState(store)
    state.set_node_id(31337)
    pulled = module._pull_and_store_message(
        state=state,
        object_store=store,
        node_config={},
        receive=lambda: None,
        get_run=None,
        get_fab=None,
        pull_object=None,
        confirm_message_received=None,
        trusted_entities=None,
    )
    assert pulled is None
    saved = _saved(folder)
    assert (saved["node_id"], saved["last_message_at"], saved["pid"]) == (31337, None, os.getpid())


def test_a_killed_daemon_a_stopped_one_and_a_site_never_started(tmp_path, capsys):
    folder = _site(tmp_path)
    code, out, _ = _status(folder, capsys=capsys)
    assert code == 0
    assert out.splitlines()[0] == f"site {SITE}: not running (never started from {folder})"
    assert "last task: none yet" in out and "privacy: ε spent 0.000 of cap 8" in out

    daemon = DaemonStatus(folder, SITE, "127.0.0.1:9092", ZYGOTE_FAST_POLL)
    daemon.data["pid"], daemon.data["pid_start"] = _dead_pid(), None
    daemon.write()
    _contact(folder).pulled(5, message_arrived=False)  # it was connected when it was killed
    record_activity(
        folder,
        run_id="r",
        flower_run_id=1,
        server_round=3,
        outcome="declined",
        reason="privacy budget exhausted",
        epsilon=7.9,
    )
    code, out, _ = _status(folder, capsys=capsys)
    assert out.splitlines()[0].endswith("is gone: killed or crashed)")
    assert "last task: run r round 3: declined (privacy budget exhausted)" in out
    report = json.loads(_status(folder, "--json", capsys=capsys)[1])
    assert (report["running"], report["connected"], report["connection"]) == (
        False,
        False,
        "not running",
    )

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
    daemon.write()
    _contact(folder).pulled(77, message_arrived=False)
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
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY [] 0" in result.stdout, result.stdout
