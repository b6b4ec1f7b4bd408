"""A real federation on the sites' own data, set up as docs/operators.md says, on 127.0.0.1.

Five hospitals each hold a CSV of a dataset fedgov does not bundle (tests/own_data.py: 30
features, 2 classes) and their own copy of the agreed schema.yaml. The coordinator is given that
schema and its own hold-out file (``schema:`` and ``holdout:`` in server.yaml, as the operators
guide writes it); the run uses DP-SGD and SecAgg+ for 3
rounds and publishes the model. One site's file gets a blank cell after its daemon started: it
declines ("data invalid", nothing more reaches the coordinator) and the other four train. A run
given another schema leaves every site out and ends with one line saying why.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from own_data import CLASSES, FEATURES, SCHEMA_NAME, blank_a_cell, write_sites
from processes import FEDGOV, fedgov, free_ports

from clients.site_status import read_status
from fedgov.datasets import schema_digest
from fedgov_data.connector import load_schema_file

pytestmark = pytest.mark.slow

SITES = ["hosp-a", "hosp-b", "hosp-c", "hosp-d", "hosp-e"]
BROKEN = "hosp-e"
ROWS_PER_SITE = 160
CONNECT_TIMEOUT = 240.0
ROUNDS = 3  # the trained run, as the issue asks: SecAgg+ state carried between rounds


def _wait_connected(folders: list[Path], processes) -> None:
    """Until every site's status (daemon.json, supernode.json) says it is connected."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while time.monotonic() < deadline:
        states = [read_status(folder, folder.name, 8.0).connection for folder in folders]
        if all(state == "connected" for state in states):
            return
        time.sleep(1.0)
    pytest.fail(f"sites not connected in {CONNECT_TIMEOUT} s: {states}\n{processes.logs_report()}")


def test_five_sites_train_on_their_own_schema_with_dp_and_secagg(tmp_path, processes):
    link_port, *site_ports = free_ports(1 + len(SITES))
    files = write_sites(tmp_path / "data", SITES, ROWS_PER_SITE, holdout_rows=200)
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    assert fedgov("server", "certs", "--out", "certs", cwd=coordinator).returncode == 0
    (coordinator / "server.yaml").write_text(
        yaml.safe_dump(
            {
                "federation": "hospitals",
                "host": "127.0.0.1",
                "port": link_port,
                "schema": str(files["hosp-a"][1]),
                "holdout": str(files["holdout"][0]),
            }
        )
    )
    link = processes.start(
        "coordinator", [*FEDGOV, "server", "start", "--config", "server.yaml"], cwd=coordinator
    )
    processes.wait_for_port(link, link_port, timeout=60)
    folders = []
    for site, port in zip(SITES, site_ports, strict=True):
        data, schema = files[site]
        folder = tmp_path / "sites" / site
        made = fedgov(
            "site",
            "init",
            "--site-id",
            site,
            "--data",
            str(data),
            "--schema",
            str(schema),
            "--coordinator",
            f"127.0.0.1:{link_port}",
            "--ca",
            str(coordinator / "certs/ca.crt"),
            "--port",
            str(port),
            "--out",
            str(folder),
            cwd=tmp_path,
        )
        assert made.returncode == 0, made.stderr
        added = fedgov(
            "server",
            "add-site",
            str(folder / "keys" / "node.key.pub"),
            "--config",
            "server.yaml",
            cwd=coordinator,
        )
        assert added.returncode == 0, added.stderr
        processes.start(site, [*FEDGOV, "site", "start"], cwd=folder)
        folders.append(folder)
    _wait_connected(folders, processes)
    # The broken site's export changes under its running daemon: a blank cell in row 5.
    blank_a_cell(files[BROKEN][0], FEATURES[7], row=5)

    # Another schema (one feature's constants differ): every site is left out, one line why.
    other = yaml.safe_load(files["hosp-a"][1].read_text())
    other["features"][0]["mean"] += 1.0
    (coordinator / "other.yaml").write_text(yaml.safe_dump(other))
    failed = fedgov(
        "run",
        "--config",
        "server.yaml",
        "--out",
        str(tmp_path / "failed"),
        "--schema",
        "other.yaml",
        "rounds=1",
        "federation.num_sites=4",
        "federation.round_timeout=10",
        cwd=coordinator,
        timeout=300,
    )
    assert failed.returncode == 2, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert "run failed: federation: only 0 of 4 sites connected within 10 s" in last, last
    assert "hosp-a: its schema differs from the federation's" in last
    assert f"{BROKEN}: declined: data invalid" in last

    # A plan that would spend most of a site's lifetime budget is refused before any spend.
    greedy = fedgov(
        "run",
        "--config",
        "server.yaml",
        "--out",
        str(tmp_path / "greedy"),
        "rounds=3",
        "federation.num_sites=4",
        "privacy=sample_dp",
        "privacy.noise_multiplier=0.5",
        cwd=coordinator,
        timeout=300,
    )
    assert greedy.returncode == 2, greedy.stderr[-3000:]
    last = greedy.stderr.strip().splitlines()[-1]
    assert last.startswith("fedgov: error: run failed: privacy plan: this run would spend ε "), last
    assert "of its remaining budget 8, above privacy.budget_share 0.5" in last
    # The ServerApp's lines reach `fedgov run`'s output through Flower's log stream.
    assert (
        "[fedgov] privacy plan: site hosp-a: σ 0.5, projected ε " in greedy.stdout + greedy.stderr
    )
    for folder in folders:
        ledger = folder / "privacy_ledger.json"
        assert not ledger.exists() or json.loads(ledger.read_text())["spends"] == []

    # The federation's own schema: four sites train under DP-SGD and SecAgg+; one declines.
    # No σ given: `fedgov run` has each site plan σ for ε = 1 over the run.
    run_dir = tmp_path / "run"
    registry = tmp_path / "registry"
    result = fedgov(
        "run",
        "--config",
        "server.yaml",
        "--out",
        str(run_dir),  # the schema and hold-out: server.yaml's
        f"rounds={ROUNDS}",
        "federation.num_sites=4",
        "privacy=sample_dp",
        "secagg=secaggplus",
        "registry.publish=true",
        f"registry.path={registry}",
        cwd=coordinator,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:] + processes.logs_report()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    trained = sorted(set(SITES) - {BROKEN})
    assert [r["participants"] for r in metrics["rounds"]] == [trained] * ROUNDS
    assert all(r["secagg"] and not r["aborted"] for r in metrics["rounds"])
    assert metrics["sites_left_out"] == {BROKEN: "declined: data invalid"}
    digest = schema_digest(load_schema_file(files["hosp-a"][1]))
    assert metrics["schema"]["digest"] == digest
    assert metrics["central_evaluation"].startswith("coordinator hold-out ")
    assert metrics["final"]["central_eval_accuracy"] is not None
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert sorted(report["sample_level"]["sites"]) == trained
    for site in trained:
        assert 0.99 <= report["sample_level"]["sites"][site]["epsilon"] <= 1.0
        assert f"[fedgov] privacy plan: site {site}: σ " in result.stdout + result.stderr

    # Nothing about the broken file reached the coordinator: not its path, not the row.
    coordinator_text = result.stdout + result.stderr + link.log_text()
    assert str(files[BROKEN][0]) not in coordinator_text
    assert "row 5" not in coordinator_text
    # Its operator sees the exact error.
    status = fedgov("site", "status", cwd=tmp_path / "sites" / BROKEN)
    assert status.returncode == 0, status.stderr
    assert (
        f"declined (data invalid: site data {files[BROKEN][0]}: column '{FEATURES[7]}' has 1 "
        "missing value(s), first at row 5" in status.stdout
    ), status.stdout

    # The published model is the sites' model: their schema, classes and a name of its own.
    shown = fedgov(
        "registry",
        "show",
        "tumour-markers-mlp:1",
        "--json",
        "--registry",
        str(registry),
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    manifest = json.loads(shown.stdout)["manifest"]
    schema = manifest["input_schema"]
    assert schema["dataset"] == SCHEMA_NAME
    assert schema["classes"] == list(CLASSES)
    assert [f["name"] for f in schema["features"]] == list(FEATURES)
    assert schema["features"] == load_schema_file(files["hosp-a"][1]).to_dict()["features"]
    assert manifest["lineage"]["dataset"] == SCHEMA_NAME
    assert manifest["lineage"]["sites"] == trained
