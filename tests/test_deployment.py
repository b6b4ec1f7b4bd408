"""The fedgov app on Flower's deployment runtime: a SuperLink, three SuperNodes and ``flwr run``.

Everything listens on 127.0.0.1 on free ports, writes under ``tmp_path`` (``FLWR_HOME`` included)
and is stopped by the ``processes`` fixture, which also fails the test if anything outlives it.
Stock deployment is slow (a fresh ClientApp interpreter per message): expect ~20 s per round.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import (
    LOOPBACK,
    ProcessGroup,
    free_ports,
    listening_addresses,
    port_is_open,
)
from safetensors.numpy import load_file

from fedgov.config import RunConfig
from fedgov.deploy import flower_environment
from fedgov.evaluation import evaluate
from fedgov.models import build_model
from fedgov_data.federation import simulated_federation

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NUM_SITES = 3
ROUNDS = 2
CONNECTION = "fedgov-test"
START_TIMEOUT = 60.0  # seconds for the SuperLink to listen and each SuperNode to register
RUN_TIMEOUT = 240.0  # seconds for the whole run, once started


def _write_connection(flwr_home: Path, port: int) -> None:
    """Make ``CONNECTION`` (the default) point `flwr` at the SuperLink's Control API."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{LOOPBACK}:{port}"\ninsecure = true\n'
    )


def _synthetic_config() -> RunConfig:
    cfg = RunConfig(rounds=ROUNDS)
    cfg.dataset.name, cfg.dataset.partitioner = "synthetic", "natural"
    cfg.federation.num_sites = NUM_SITES
    return cfg


def test_two_rounds_on_a_superlink_with_three_supernodes(
    tmp_path: Path, processes: ProcessGroup
) -> None:
    for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} is not installed next to {sys.executable}")
    flwr_home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    processes.env = flower_environment(flwr_home)
    link_port, *node_ports = free_ports(1 + NUM_SITES)
    began = time.monotonic()

    # One port serves the SuperLink's Fleet, Control and Runtime (ServerAppIo) HTTP APIs.
    superlink = processes.start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--host",
            LOOPBACK,
            "--port",
            str(link_port),
            "--database",
            str(tmp_path / "superlink.db"),
            "--isolation",
            "subprocess",
        ],
    )
    processes.wait_for_port(superlink, link_port, START_TIMEOUT)
    supernodes = []
    for index, port in enumerate(node_ports):
        supernode_argv = [
            str(BIN / "flower-supernode"),
            "--insecure",
            "--superlink",
            f"{LOOPBACK}:{link_port}",
            # the SuperNode's own Runtime (ClientAppIo) HTTP API, for its SuperExec and apps
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--node-config",
            f"partition-id={index} num-partitions={NUM_SITES}",
        ]
        supernodes.append(processes.start(f"supernode-{index}", supernode_argv))
    for node in supernodes:
        processes.wait_for_log(node, r"SuperNode ID: \d+", START_TIMEOUT)
    listening = listening_addresses(processes.live_pids())
    assert {port for _, port in listening} >= {link_port, *node_ports}, listening
    assert {host for host, _ in listening} == {LOOPBACK}, listening
    started = time.monotonic()

    _write_connection(flwr_home, link_port)
    run_config = (
        f"rounds={ROUNDS} dataset.name='synthetic' dataset.partitioner='natural' "
        f"federation.num_sites={NUM_SITES} output_dir={json.dumps(str(run_dir))}"
    )
    flwr_run = processes.start_flwr_run(tmp_path, CONNECTION, run_config)
    metrics_path = run_dir / "metrics.json"  # written atomically, after the last round
    processes.wait_until(
        lambda: metrics_path.exists() or not flwr_run.running(),
        RUN_TIMEOUT,
        "the run's metrics.json",
        must_keep_running=[superlink, *supernodes],
    )
    assert metrics_path.exists(), f"the run ended without metrics.json\n{processes.logs_report()}"
    finished = time.monotonic()
    assert processes.wait_for_exit(flwr_run, 60) == 0, processes.logs_report()
    run_ended = time.monotonic()
    run_id = re.search(r"Successfully started run (\d+)", flwr_run.log_text())
    assert run_id, processes.logs_report()
    flwr_ls = processes.start(
        "flwr-ls",
        [str(BIN / "flwr"), "ls", CONNECTION, "--run-id", run_id[1], "--format", "json"],
        cwd=tmp_path,
    )
    assert processes.wait_for_exit(flwr_ls, 60) == 0, processes.logs_report()
    listed = json.loads(flwr_ls.log_text()[flwr_ls.log_text().index("{") :])
    assert [run["status"] for run in listed["runs"]] == ["finished:completed"], listed
    assert (flwr_home / "apps").is_dir()  # flwr installed the FAB under FLWR_HOME

    metrics = json.loads(metrics_path.read_text())
    federation = simulated_federation(_synthetic_config())
    site_ids = list(federation.site_ids)
    assert site_ids == ["site-00", "site-01", "site-02"]
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for record in rounds:
        assert sorted(record["participants"]) == site_ids, record
        assert record["failures"] == {} and record["declined"] == [], record
        assert math.isfinite(record["train_loss"]), record
        assert 0.0 <= record["eval_accuracy"] <= 1.0, record
    # Each node served exactly its partition of the split (rows stay at the site; counts do not).
    assert sorted(metrics["sites"]) == site_ids
    for index, site_id in enumerate(site_ids):
        site = metrics["sites"][site_id]
        assert site["num_train"] + site["num_test"] == len(federation.partitions[index])

    # The saved weights are the final global model: they reproduce the last central evaluation.
    tensors = load_file(run_dir / "model.safetensors")
    schema = federation.pool.schema
    cfg = _synthetic_config()
    model = build_model(cfg.model.name, schema.input_shape, len(schema.classes), cfg.model.hidden)
    assert sorted(tensors) == sorted(model.state_dict())
    assert all(np.isfinite(array).all() for array in tensors.values())
    model.load_state_dict({name: torch.from_numpy(array) for name, array in tensors.items()})
    central = evaluate(model, federation.holdout)
    assert central.accuracy == pytest.approx(rounds[-1]["central_eval_accuracy"], abs=1e-6)
    assert central.loss == pytest.approx(rounds[-1]["central_eval_loss"], rel=1e-5)

    stopping = time.monotonic()
    left = processes.stop_all()
    stopped = time.monotonic()
    assert not left, f"processes outlived stop_all: {left}"
    assert not port_is_open(LOOPBACK, link_port)
    per_round = ", ".join(f"{r['seconds']:.1f}" for r in rounds)
    print(
        f"\n[deployment] start-up {started - began:.1f} s · run {finished - started:.1f} s "
        f"(ServerApp wall {metrics['wall_seconds']:.1f} s; rounds {per_round} s) · "
        f"flwr run exits {run_ended - finished:.1f} s later · stop {stopped - stopping:.1f} s"
    )
