"""Crash recovery on real processes on 127.0.0.1, set up with fedgov's own commands.

A coordinator (``fedgov server start``, TLS and site keys on) and three hospital sites
(``fedgov site init`` / ``fedgov site start``, each with its own folder, ledger and ε cap) train
a small MLP on medpar under sample-level DP, so every round spends real ε at every site.

- The whole coordinator (``fedgov server start``, its SuperLink and SuperExec, the ServerApp, and
  the ``fedgov run`` that launched the run) is SIGKILLed after the round-1 checkpoint of a
  3-round run, while the sites train round 2; it restarts (``fedgov server start``, same state
  database), the sites reconnect by themselves, and the run resumes with
  ``fedgov run --resume RUN_DIR``. An uninterrupted run of the same config on copies of the same
  site folders (same keys, fresh ledgers) is the reference: final weights equal to 1e-6 and every
  site's ledger ε equal to 1e-9 (relative), each round counted once.
- A site is SIGKILLed (its daemon, SuperNode, SuperExec and the forked train task) while it trains
  round 2 of a plain (no secure aggregation) run: the round completes with the other two, the
  site restarts with ``fedgov site start``, rejoins in a later round, and its ledger still holds
  every spend it made before the kill (round 2's pending spend included), none twice.

Both check ``fedgov site status`` against what happened. Runtime: 1.5 to 4.5 minutes each here
(10 minutes on a heavily loaded machine); the coordinator test runs three rounds, the fewest that
leave a round the killed run had not reached (checkpointed after round 1 or 2, resumed to 3).
"""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from processes import FEDGOV, PROC, ProcessGroup, Started, fedgov, free_ports, kill_tree

from fedgov.datasets import load_dataset, load_table
from fedgov.records import load_safetensors
from privacy.accounting import epsilon
from privacy.ledger import LEDGER_FILE, PENDING, RELEASED, LedgerState
from privacy.report import verify_report

pytestmark = pytest.mark.slow

HOSPITALS = ("hosp-30061", "hosp-30006", "hosp-30088")
ROUNDS = 3  # the coordinator test's run: killed after round 1 (or 2), resumed to the end
START_TIMEOUT = 90.0
RUN_TIMEOUT = 400.0
# Sample-level DP at every site; fixed seed and run id, so a replay draws the same noise.
RUN = [
    "dataset=medpar",
    "federation.num_sites=3",
    "privacy=sample_dp",
    "seed=11",
    "progress=true",
    "run_id=crash-recovery",
    "privacy.noise_multiplier=1.0",  # a fixed σ (fedgov run would plan σ for ε 1 per run)
]


class Federation:
    """A coordinator and its sites, made and started with fedgov's commands."""

    def __init__(self, root: Path, processes: ProcessGroup) -> None:
        self.root, self.processes = root, processes
        self.coordinator = root / "coordinator"
        self.coordinator.mkdir(parents=True)
        self.port, *self._site_ports = free_ports(1 + 2 * len(HOSPITALS))
        made = fedgov(
            "server", "certs", "--out", "certs", "--host", "127.0.0.1", cwd=self.coordinator
        )
        assert made.returncode == 0, made.stderr
        (self.coordinator / "server.yaml").write_text(
            yaml.safe_dump({"federation": "hospitals", "host": "127.0.0.1", "port": self.port})
        )
        self.start_coordinator("coordinator")
        self.daemons: dict[Path, Started] = {}

    def start_coordinator(self, name: str) -> None:
        self.link = self.processes.start(
            name, [*FEDGOV, "server", "start", "--config", "server.yaml"], cwd=self.coordinator
        )
        self.processes.wait_for_port(self.link, self.port, START_TIMEOUT)

    def init_site(self, site: str, folder: Path, repeat_rows: int = 1) -> Path:
        """A site folder holding its own data (the hospital's rows, ``repeat_rows`` times over),
        schema, keys and ledger; its key registered with the coordinator."""
        data = folder / "data"
        data.mkdir(parents=True)
        table = load_table("medpar")
        rows = table[table["provnum"] == site].drop(columns=["provnum"])
        rows = rows.loc[rows.index.repeat(repeat_rows)]
        rows.to_csv(data / "admissions.csv", index=False)
        (data / "schema.yaml").write_text(yaml.safe_dump(load_dataset("medpar").schema.to_dict()))
        result = fedgov(
            "site",
            "init",
            "--site-id",
            site,
            "--data",
            str(data / "admissions.csv"),
            "--schema",
            str(data / "schema.yaml"),
            "--coordinator",
            f"127.0.0.1:{self.port}",
            "--ca",
            str(self.coordinator / "certs" / "ca.crt"),
            "--epsilon-cap",
            "50",
            "--port",
            str(self._site_ports.pop()),
            "--out",
            str(folder),
            cwd=self.root,
        )
        assert result.returncode == 0, result.stderr
        added = fedgov(
            "server",
            "add-site",
            str(folder / "keys" / "node.key.pub"),
            "--config",
            "server.yaml",
            cwd=self.coordinator,
        )
        assert added.returncode == 0, added.stderr
        return folder

    def start_site(self, folder: Path, name: str) -> Started:
        daemon = self.processes.start(
            name, [*FEDGOV, "site", "start", "--config", "site.yaml"], cwd=folder
        )
        self.daemons[folder] = daemon
        return daemon

    def wait_joined(self, daemon: Started, times: int = 1) -> None:
        self.processes.wait_until(
            lambda: daemon.log_text().count("SuperNode ID:") >= times,
            START_TIMEOUT,
            f"{daemon.name} to join",
            [self.link, daemon],
        )

    def stop_sites(self, folders: list[Path]) -> None:
        """Stop sites' daemons as a service manager does (SIGTERM), all at once, and wait for
        each to exit."""
        daemons = [self.daemons.pop(folder) for folder in folders]
        for daemon in daemons:
            daemon.popen.send_signal(signal.SIGTERM)
        for daemon in daemons:
            assert self.processes.wait_for_exit(daemon, 60) == 130, daemon.log_tail()

    def run(self, name: str, *args: str) -> Started:
        return self.processes.start(
            name, [*FEDGOV, "run", "--config", "server.yaml", *args], cwd=self.coordinator
        )


def _argv(pid: int) -> list[str]:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _ledger(folder: Path) -> LedgerState:
    return LedgerState.from_json(json.loads((folder / LEDGER_FILE).read_text()), folder)


def _ledger_epsilon(folder: Path) -> float:
    state = _ledger(folder)
    return epsilon(state.history(), state.spends[-1].delta, state.spends[-1].accountant)


def _completed_round(run_dir: Path) -> int:
    try:
        return int(pickle.loads((run_dir / "checkpoint.pkl").read_bytes())["completed_round"])
    except (OSError, EOFError, pickle.UnpicklingError, KeyError):
        return 0


def _status(folder: Path) -> dict:
    result = fedgov("site", "status", "--config", "site.yaml", "--json", cwd=folder)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_coordinator_killed_after_round_one_resumes_to_the_uninterrupted_model_and_epsilon(
    tmp_path, processes
):
    if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("Flower's executables are not installed next to this Python")
    federation = Federation(tmp_path, processes)
    sites = [federation.init_site(h, tmp_path / "sites" / h) for h in HOSPITALS]
    # The reference federation: the same sites (same keys: the same DP noise), fresh ledgers.
    copies = [tmp_path / "reference" / folder.name for folder in sites]
    for folder, copy in zip(sites, copies, strict=True):
        shutil.copytree(folder, copy)
        for name in ("daemon.json", "activity.json"):
            (copy / name).unlink(missing_ok=True)

    # 1. the uninterrupted run, then its sites stop (their keys are the others' keys too)
    for copy in copies:
        federation.start_site(copy, f"reference-{copy.name}")
    for copy in copies:
        federation.wait_joined(federation.daemons[copy])
    whole_dir = tmp_path / "runs" / "whole"
    whole = federation.run("run-whole", "--out", str(whole_dir), *RUN, f"rounds={ROUNDS}")
    assert processes.wait_for_exit(whole, RUN_TIMEOUT) == 0, processes.logs_report()
    federation.stop_sites(copies)

    # 2. the same run on the real sites; its ServerApp is killed once round 1 is checkpointed
    for folder in sites:
        federation.start_site(folder, folder.name)
    for folder in sites:
        federation.wait_joined(federation.daemons[folder])
    run_dir = tmp_path / "runs" / "crashed"
    crashed = federation.run("run-crashed", "--out", str(run_dir), *RUN, f"rounds={ROUNDS}")
    processes.wait_until(
        lambda: _completed_round(run_dir) >= 1,
        RUN_TIMEOUT,
        "the round-1 checkpoint",
        [federation.link, crashed],
    )
    # Let round 2 reach the sites (a spend in a ledger) so that its retry is exercised.
    processes.wait_until(
        lambda: (
            any(s.round == 2 for f in sites for s in _ledger(f).spends)
            or _completed_round(run_dir) >= 2
        ),
        60,
        "round 2 at the sites",
        [federation.link, crashed],
        interval=0.02,
    )
    serverapps = [
        pid
        for pid in processes.live_pids()
        if any(Path(arg).name == "flwr-serverapp" for arg in _argv(pid))
    ]
    assert serverapps, processes.describe(processes.live_pids())
    # The whole coordinator dies at once: `fedgov server start`, its SuperLink and SuperExec, the
    # ServerApp, and the `fedgov run` that launched the run.
    doomed = kill_tree(federation.link.pid) + kill_tree(crashed.pid)
    assert set(serverapps) <= set(doomed)
    federation.link.popen.wait(timeout=10)
    crashed.popen.wait(timeout=10)
    killed_after = _completed_round(run_dir)
    assert killed_after in (1, 2)  # a round left to resume either way
    assert not (run_dir / "metrics.json").exists()
    in_flight = {f.name: [s.round for s in _ledger(f).spends] for f in sites}
    print(
        f"\n[crash recovery] coordinator ({len(doomed)} processes) killed after round "
        f"{killed_after}; the sites' spends then: {in_flight}"
    )

    # 3. the coordinator restarts (its state database keeps the sites' keys), the sites reconnect
    # by themselves, and the run resumes: same run id, no round counted twice, and the same model
    # and ε as the uninterrupted run
    federation.start_coordinator("coordinator-restarted")
    resumed = federation.run("run-resumed", "--resume", str(run_dir))
    assert processes.wait_for_exit(resumed, RUN_TIMEOUT) == 0, processes.logs_report()
    said = resumed.log_text() + federation.link.log_text()  # the ServerApp's own lines
    assert f"resuming {run_dir} after round {killed_after}" in said

    whole_metrics = json.loads((whole_dir / "metrics.json").read_text())
    got_metrics = json.loads((run_dir / "metrics.json").read_text())

    def strip(metrics: dict) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in metrics["rounds"]]

    assert strip(got_metrics) == strip(whole_metrics)
    assert [r["participants"] for r in got_metrics["rounds"]] == [sorted(HOSPITALS)] * ROUNDS
    expected = load_safetensors(whole_dir / "model.safetensors")
    got = load_safetensors(run_dir / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6)

    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["run_id"] == "crash-recovery"
    assert verify_report(report)["ok"], verify_report(report)["problems"]
    for folder, copy in zip(sites, copies, strict=True):
        state = _ledger(folder)
        assert [(s.run_id, s.round, s.status) for s in state.spends] == [
            ("crash-recovery", r, RELEASED) for r in range(1, ROUNDS + 1)
        ], folder.name  # round 2, released before the kill and again after, counted once
        assert [(s.round, s.status) for s in _ledger(copy).spends] == [
            (r, RELEASED) for r in range(1, ROUNDS + 1)
        ]
        spent = _ledger_epsilon(folder)
        assert spent == pytest.approx(_ledger_epsilon(copy), rel=1e-9, abs=0)
        assert spent > 1.0  # DP noise at every step: a real spend
        site = report["sample_level"]["sites"][folder.name]
        assert site["epsilon"] == pytest.approx(spent, rel=1e-9)
        status = _status(folder)
        assert (status["running"], status["connected"]) == (True, True), status
        assert (status["last"]["run"], status["last"]["round"]) == ("crash-recovery", ROUNDS)
        assert status["last"]["outcome"] == "trained"
        assert status["epsilon_spent"] == pytest.approx(spent, rel=1e-9)


def test_a_site_killed_mid_round_rejoins_later_with_its_ledger_intact(tmp_path, processes):
    if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("Flower's executables are not installed next to this Python")
    federation = Federation(tmp_path, processes)
    victim_site = HOSPITALS[1]
    # The victim holds its rows 300 times over, so that its DP-SGD round lasts a few seconds:
    # long enough to be killed in the middle of it.
    sites = {
        h: federation.init_site(h, tmp_path / "sites" / h, 300 if h == victim_site else 1)
        for h in HOSPITALS
    }
    victim = sites[victim_site]
    for folder in sites.values():
        federation.start_site(folder, folder.name)
    for folder in sites.values():
        federation.wait_joined(federation.daemons[folder])

    run_dir = tmp_path / "run"
    run = federation.run(
        "run",
        "--out",
        str(run_dir),
        *RUN,
        "rounds=5",
        "federation.round_timeout=60",
        # Each round waits (≤ 60 s) for all three, so the restarted site is back in round 3
        # however long its restart takes on a loaded machine.
        "federation.min_available_sites=3",
    )

    def training_round_two() -> bool:
        spends = _ledger(victim).spends
        return any(s.round == 2 and s.status == PENDING for s in spends)

    processes.wait_until(
        training_round_two,
        RUN_TIMEOUT,
        f"{victim_site} training round 2",
        [federation.link, run],
        interval=0.01,
    )
    daemon = federation.daemons.pop(victim)
    killed = kill_tree(daemon.pid)
    daemon.popen.wait(timeout=10)
    before = _ledger(victim)
    assert [(s.round, s.status) for s in before.spends] == [(1, RELEASED), (2, PENDING)]
    assert len(killed) >= 4  # the daemon, its SuperNode and SuperExec, the zygote (and task)
    status = _status(victim)
    assert (status["running"], status["connected"]) == (False, False), status
    assert status["last"]["round"] == 1 and status["last"]["outcome"] == "trained"

    # It restarts at once; the coordinator still counts the killed session online for up to a
    # minute (Flower's heartbeats), and the daemon retries until it lets the site in again.
    restarted = federation.start_site(victim, f"{victim_site}-restarted")
    assert processes.wait_for_exit(run, RUN_TIMEOUT) == 0, processes.logs_report()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = {r["round"]: r for r in metrics["rounds"]}
    others = sorted(h for h in HOSPITALS if h != victim_site)
    assert rounds[2]["participants"] == others  # round 2 completed without the killed site
    assert victim_site in rounds[2]["failures"]
    rejoined = [r for r in (3, 4, 5) if victim_site in rounds[r]["participants"]]
    assert rejoined[:1] == [3], f"{victim_site} did not rejoin in round 3: {metrics['rounds']}"
    assert all(rounds[r]["participants"] == sorted(HOSPITALS) for r in range(rejoined[0], 6))

    state = _ledger(victim)
    assert state.spends[:2] == before.spends  # every spend before the kill, unchanged
    later = {s.round: s for s in state.spends[2:]}
    assert len(later) == len(state.spends) - 2  # no round counted twice
    # Every round it rejoined is spent once. (A train request that waited for it at the
    # coordinator after the server stopped waiting may be spent too: never under-counted.)
    assert set(rejoined) <= set(later) and all(r > 2 for r in later)
    assert all(s.status == RELEASED for s in later.values())
    assert state.spends[-1].epsilon_after == pytest.approx(
        epsilon([s.entry for s in state.spends], state.spends[-1].delta), rel=1e-9
    )  # the pending round-2 spend still counts
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert verify_report(report)["ok"], verify_report(report)["problems"]
    assert report["sample_level"]["sites"][victim_site]["epsilon"] == pytest.approx(
        later[max(rejoined)].epsilon_after, rel=1e-9
    )
    status = _status(victim)
    assert (status["running"], status["connected"], status["pid"]) == (True, True, restarted.pid), (
        status
    )
    assert (status["last"]["round"], status["last"]["outcome"]) == (5, "trained")
    assert status["epsilon_spent"] == pytest.approx(_ledger_epsilon(victim), rel=1e-9)
    print(
        f"\n[crash recovery] {victim_site} killed in round 2 ({len(killed)} processes), "
        f"rejoined in round {rejoined[0]}; its ledger: "
        f"{[(s.round, s.status) for s in state.spends]}"
    )
