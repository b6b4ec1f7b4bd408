"""SecAgg+ on real processes: a SuperLink and SuperNodes on 127.0.0.1.

A coordinator that forges the roster (its own signature over a roster with a site it controls)
is refused by every site before anything is shared.

In the dropout test the fourth SuperNode is killed (SIGKILL, with everything it started) the
moment it receives the masked-input request, after it has shared its keys: its pairwise masks
are already inside the other three sites' inputs. The round must still complete, and the
unmasked sum must be exactly the sum of the other three sites' quantised updates, which this
test recomputes itself. A second round follows; its key stages ride on the first round's masked
input and unmask exchanges, so the sites' contexts in the SuperNodes hold two rounds at
once, and its sum must be exact too.

The dropout test's sites run fedgov's site runtime (``fedgov site start``'s default: Flower's
SuperNode through ``python -m clients.supernode`` and fedgov's SuperExec forking each ClientApp
task from a warm zygote), so that its ~12 exchanges per site do not each start a fresh
interpreter (~10 s apiece on a loaded 2-core machine, most of the test's time); the roster test's
sites are stock ``flower-supernode`` processes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from processes import LOOPBACK, ProcessGroup, free_ports, kill_tree
from safetensors.numpy import load_file

from clients import doorbell
from clients.site_data import load_site_data
from clients.update import compute_update
from fedgov import messages as keys
from fedgov.config import RunConfig, to_flower_config
from fedgov.deploy import flower_environment
from fedgov.models import initial_model
from fedgov_data.federation import simulated_federation
from privacy.secagg.layout import VectorLayout
from privacy.secagg.masking import ring_dtype
from privacy.secagg.quantise import dequantise_mean, quantise

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NUM_SITES = 4
KILLED = 3  # partition 3 = site-03
STAGE_TIMEOUT = 90.0  # secagg.timeout: how long the server waits for each stage's replies
START_TIMEOUT = 60.0
RUN_TIMEOUT = 600.0  # a stock SuperNode starts a fresh ClientApp per message: slow when loaded
CONNECTION = "fedgov-secagg-test"


def _config(run_dir: Path) -> RunConfig:
    cfg = RunConfig(rounds=2, output_dir=str(run_dir), progress=False)
    cfg.dataset.name, cfg.dataset.partitioner = "synthetic", "natural"
    cfg.federation.num_sites, cfg.federation.round_timeout = NUM_SITES, 120.0
    cfg.secagg.name, cfg.secagg.timeout = "secaggplus", STAGE_TIMEOUT
    return cfg


def _expected_ring_sum(
    cfg: RunConfig,
    survivors: list[str],
    summary: dict,
    start: ArrayRecord | None = None,
    server_round: int = 1,
) -> tuple[np.ndarray, ArrayRecord, VectorLayout]:
    """Σ of the survivors' quantised updates from ``start`` (default: the initial model), each
    recomputed here as its site computes it."""
    torch.set_num_threads(1)  # as the ClientApp does: the same float operations, the same bits
    federation = simulated_federation(cfg)
    if start is None:
        schema = federation.pool.schema
        model = initial_model(
            cfg.model.name, schema.input_shape, len(schema.classes), cfg.model.hidden, cfg.seed
        )
        start = ArrayRecord(model.state_dict())
    layout = VectorLayout.of(start)
    total = np.zeros(layout.length, dtype=ring_dtype(cfg.secagg.bits))
    for site_id in survivors:
        node_config = {
            "partition-id": federation.site_ids.index(site_id),
            "num-partitions": NUM_SITES,
        }
        site = load_site_data(cfg, node_config)
        context = Context(
            run_id=1,
            node_id=1,
            node_config=node_config,
            state=RecordDict(),
            run_config=to_flower_config(cfg),
        )
        config = ConfigRecord({keys.SERVER_ROUND: server_round})
        update = compute_update(cfg, site, start, config, context)
        weight = min(int(update.metrics[keys.NUM_EXAMPLES]), summary["weight_scale"])
        quantised, _ = quantise(
            layout.update_vector(update.arrays, start),
            clip_range=cfg.secagg.clip_range,
            weight=weight,
            max_weight=summary["weight_scale"],
            scale=summary["scale"],
            bits=cfg.secagg.bits,
        )
        np.add(total, quantised, out=total)
    return total, start, layout


def _start_federation(
    tmp_path: Path, processes: ProcessGroup, node_configs: list[str], fedgov_runtime: bool = False
) -> tuple[Path, list]:
    """A SuperLink and one SuperNode per ``node_configs`` entry on 127.0.0.1, and a Flower
    connection ``CONNECTION`` to it; (FLWR_HOME, the SuperNodes).

    ``fedgov_runtime``: each SuperNode is fedgov's (``python -m clients.supernode``, process
    isolation) with fedgov's forking SuperExec (``python -m clients.superexec``), as
    ``fedgov site start`` runs them (clients/daemon.py); each SuperExec is started as
    ``superexec-<index>`` and is the SuperNode's ``.superexec``. Else stock
    ``flower-supernode`` processes that start Flower's SuperExec themselves."""
    for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} is not installed next to {sys.executable}")
    flwr_home = tmp_path / "flwr-home"
    processes.env = flower_environment(flwr_home)
    link_port, *node_ports = free_ports(1 + len(node_configs))
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
    for index, (port, node_config) in enumerate(zip(node_ports, node_configs, strict=True)):
        options = [
            "--insecure",
            "--superlink",
            f"{LOOPBACK}:{link_port}",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--node-config",
            node_config,
        ]
        if not fedgov_runtime:
            supernodes.append(
                processes.start(f"supernode-{index}", [str(BIN / "flower-supernode"), *options])
            )
            continue
        secret = tmp_path / f"superexec-{index}.secret"
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)
        env = {doorbell.DOORBELL_ENV: doorbell.new_name()} if doorbell.available() else {}
        isolation = ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        node = processes.start(
            f"supernode-{index}",
            [sys.executable, "-m", "clients.supernode", *options, *isolation],
            env=env,
        )
        node.superexec = processes.start(  # type: ignore[attr-defined]
            f"superexec-{index}",
            [
                sys.executable,
                "-m",
                "clients.superexec",
                "--insecure",
                "--runtime-api-address",
                f"{LOOPBACK}:{port}",
                "--superexec-auth-secret-file",
                str(secret),
                "--parent-pid",
                str(node.pid),
            ],
            env=env,
        )
        supernodes.append(node)
    for node in supernodes:
        processes.wait_for_log(node, r"SuperNode ID: \d+", START_TIMEOUT)
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{LOOPBACK}:{link_port}"\ninsecure = true\n'
    )
    return flwr_home, [superlink, *supernodes]


def test_a_supernode_killed_mid_round_leaves_the_exact_sum_of_the_other_three(
    tmp_path: Path, processes: ProcessGroup
) -> None:
    run_dir = tmp_path / "run"
    node_configs = [f"partition-id={i} num-partitions={NUM_SITES}" for i in range(NUM_SITES)]
    _, (superlink, *supernodes) = _start_federation(
        tmp_path, processes, node_configs, fedgov_runtime=True
    )

    cfg = _config(run_dir)
    run_config = " ".join(
        [
            "rounds=2",
            "dataset.name='synthetic'",
            "dataset.partitioner='natural'",
            f"federation.num_sites={NUM_SITES}",
            "federation.round_timeout=120.0",
            "secagg.name='secaggplus'",
            f"secagg.timeout={STAGE_TIMEOUT}",
            f"output_dir={json.dumps(str(run_dir))}",
        ]
    )
    flwr_run = processes.start_flwr_run(tmp_path, CONNECTION, run_config)
    victim = supernodes[KILLED]
    # It has shared its keys (setup and share_keys done): kill it as the masked input is asked.
    processes.wait_for_log(victim, r"Receiving: train\.secagg_masked_input", RUN_TIMEOUT)
    killed_at = time.monotonic()
    kill_tree(victim.pid)
    kill_tree(victim.superexec.pid)  # and its SuperExec, with the zygote and any task
    victim.popen.wait(timeout=10)
    victim.superexec.popen.wait(timeout=10)
    assert not victim.running() and not victim.superexec.running()

    metrics_path = run_dir / "metrics.json"
    survivors_running = [
        superlink,
        *(p for n in supernodes if n is not victim for p in (n, n.superexec)),
    ]
    processes.wait_until(
        lambda: metrics_path.exists() or not flwr_run.running(),
        RUN_TIMEOUT,
        "the run's metrics.json",
        must_keep_running=survivors_running,
    )
    assert metrics_path.exists(), f"no metrics.json\n{processes.logs_report()}"
    assert processes.wait_for_exit(flwr_run, 60) == 0, processes.logs_report()
    finished = time.monotonic()

    record, second = json.loads(metrics_path.read_text())["rounds"]
    survivors = ["site-00", "site-01", "site-02"]
    assert not record["aborted"], record
    assert record["participants"] == survivors
    # Silent until the stage timeout, or reported by the SuperLink once its heartbeats lapsed
    (dropout,) = record["dropouts"].values()
    assert list(record["dropouts"]) == ["site-03"] and dropout["stage"] == "masked_input"
    assert dropout["reason"] == "no reply" or "Node Unavailable" in dropout["reason"], dropout
    summary = record["secagg"]
    assert summary["sites"] == NUM_SITES and summary["threshold"] == 3
    # site-03 shared its keys, so the sum needed its mask key rebuilt from the others' shares
    expected, start, layout = _expected_ring_sum(cfg, survivors, summary)
    assert summary["sum_sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()
    assert summary["total_weight"] == sum(
        len(load_site_data(cfg, {"partition-id": i, "num-partitions": NUM_SITES}).train.y)
        for i in range(3)
    )
    assert record["eval_accuracy"] is not None  # the three live sites evaluated it
    after_first = _moved(cfg, layout, start, expected, summary)

    # Round 2: site-03 was asked for round 2's keys with round 1's masked input, and is gone
    assert not second["aborted"], second
    assert second["participants"] == survivors
    if second["sites_connected"] == NUM_SITES:  # the SuperLink still listed it: same draw
        assert second["secagg"]["pipelined_stages"] == ["setup", "share_keys"]
        assert list(second["dropouts"]) == ["site-03"]
        assert second["dropouts"]["site-03"]["stage"] == "setup"
    else:  # it was dropped from the SuperLink's list: a new draw, with key stages of its own
        assert second["secagg"]["pipelined_stages"] == [] and second["dropouts"] == {}
    summary = second["secagg"]
    expected, _, _ = _expected_ring_sum(cfg, survivors, summary, after_first, server_round=2)
    assert summary["sum_sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()
    # and the saved model is round 1's model moved by exactly round 2's sum's mean
    saved = load_file(run_dir / "model.safetensors")
    for name, array in _moved(cfg, layout, after_first, expected, summary).items():
        assert np.array_equal(saved[name], array.numpy()), name
    print(
        f"\n[secagg deployment] the run finished {finished - killed_at:.1f} s after the kill "
        f"(stage timeout {STAGE_TIMEOUT:.0f} s); round 2 stages {summary['stage_seconds']}"
    )


def _moved(
    cfg: RunConfig, layout: VectorLayout, start: ArrayRecord, ring_sum: np.ndarray, summary: dict
) -> ArrayRecord:
    """``start`` moved by the weighted mean update that ``ring_sum`` encodes."""
    mean = dequantise_mean(
        ring_sum,
        clip_range=cfg.secagg.clip_range,
        total_weight=summary["total_weight"],
        max_weight=summary["weight_scale"],
        scale=summary["scale"],
        bits=cfg.secagg.bits,
    )
    return layout.apply(start, mean)


def test_sites_refuse_a_roster_the_coordinator_signed_itself_over_real_processes(
    tmp_path: Path, processes: ProcessGroup
) -> None:
    """Three sites with identity keys and trust anchors (quorum 2 of 3 governance keys). The
    coordinator names a roster it signed with a key of its own, listing a fourth site it holds
    the key of: every site refuses at setup, no key is shared, the round aborts."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privacy.receipts import create_site_key, public_key_bytes
    from privacy.secagg import roster

    sites = 3
    governance = [Ed25519PrivateKey.generate() for _ in range(3)]
    identities, node_configs = {}, []
    for index in range(sites):
        site_id, site_dir = f"site-{index:02d}", tmp_path / "sites" / f"site-{index:02d}"
        identities[site_id] = public_key_bytes(create_site_key(site_dir))
        anchor = roster.TrustAnchor(site_id, tuple(public_key_bytes(k) for k in governance), 2)
        roster.save_anchor(site_dir, anchor)
        node_configs.append(f'partition-id={index} num-partitions={sites} site-dir="{site_dir}"')
    coordinator_key = Ed25519PrivateKey.generate()
    identities["site-03"] = public_key_bytes(coordinator_key)  # a site the coordinator plays
    forged = tmp_path / "forged-roster.json"
    forged.write_bytes(roster.sign_roster(roster.Roster(1, identities), [coordinator_key]))
    _, running = _start_federation(tmp_path, processes, node_configs)

    run_dir = tmp_path / "run"
    run_config = " ".join(
        [
            "rounds=1",
            "dataset.name='synthetic'",
            "dataset.partitioner='natural'",
            f"federation.num_sites={sites}",
            "federation.round_timeout=120.0",
            "secagg.name='secaggplus'",
            f"secagg.timeout={STAGE_TIMEOUT}",
            f"secagg.roster={json.dumps(str(forged))}",
            f"output_dir={json.dumps(str(run_dir))}",
        ]
    )
    flwr_run = processes.start_flwr_run(tmp_path, CONNECTION, run_config)
    metrics_path = run_dir / "metrics.json"
    processes.wait_until(
        lambda: metrics_path.exists() or not flwr_run.running(),
        RUN_TIMEOUT,
        "the run's metrics.json",
        must_keep_running=running,
    )
    assert metrics_path.exists(), f"no metrics.json\n{processes.logs_report()}"
    assert processes.wait_for_exit(flwr_run, 60) == 0, processes.logs_report()
    (record,) = json.loads(metrics_path.read_text())["rounds"]
    assert record["aborted"] and record["abort_reason"].startswith("setup: only 0 of 3 sites")
    assert record["participants"] == []
    assert sorted(record["dropouts"]) == ["site-00", "site-01", "site-02"]
    for dropout in record["dropouts"].values():
        assert dropout["stage"] == "setup"
        assert "roster v1 carries 0 valid governance signature(s)" in dropout["reason"], dropout
    assert record["secagg"]["stage_seconds"].get("share_keys") is None  # nothing was shared
