"""Real Flower simulations (Ray engine) of the fedgov app, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgov.config import RunConfig
from fedgov.datasets import load_dataset
from fedgov.evaluation import evaluate
from fedgov.models import build_model
from fedgov.records import load_safetensors
from fedgov_data.federation import simulated_federation
from server.sampling import sample_sites

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC = ["dataset=synthetic", "federation.num_sites=3"]


def _federation(num_sites: int = 3, seed: int = 0):
    cfg = RunConfig(seed=seed)
    cfg.dataset.name, cfg.federation.num_sites = "synthetic", num_sites
    return simulated_federation(cfg)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[dict, Path]:
    """(metrics.json's data, run folder) of ``SYNTHETIC`` for 2 rounds with the default seed and
    strategy (FedAvg): one simulation serves every test below that runs exactly that config."""
    from simulations.run import compose_config, run_from_hydra

    run_dir = tmp_path_factory.mktemp("default-run") / "run"
    return run_from_hydra(
        compose_config(["progress=false", *SYNTHETIC, "rounds=2"]), run_dir
    ), run_dir


def test_three_sites_two_rounds_beat_the_majority_class(default_run):
    metrics, run_dir = default_run
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for record in metrics["rounds"]:
        assert record["participants"] == ["site-00", "site-01", "site-02"]
        assert record["declined"] == [] and record["failures"] == {}
    holdout = _federation().holdout
    majority = np.bincount(holdout.y).max() / len(holdout.y)
    final = metrics["final"]
    assert final["central_eval_accuracy"] > majority + 0.1, (final, majority)
    assert final["eval_accuracy"] > 0.6

    # The saved weights are the model that scored that accuracy on the held-out rows.
    schema = holdout.schema
    model = build_model("mlp", schema.input_shape, len(schema.classes), 64)
    weights = load_safetensors(run_dir / "model.safetensors")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    assert evaluate(model, holdout).accuracy == pytest.approx(final["central_eval_accuracy"])
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert plots == ["accuracy.png", "loss.png", "participation.png"]
    assert metrics["sites"]["site-00"]["num_train"] > 0


def _without_timings(metrics: dict) -> dict:
    rounds = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics["rounds"]]
    return {"rounds": rounds, "final": metrics["final"]}


def test_same_seed_gives_identical_results_and_another_seed_does_not(simulate, default_run):
    # The default seed (0) twice: the module's run of it, then a fresh one; then seed 6.
    first_run, first_dir = default_run
    runs = [first_run] + [
        simulate(*SYNTHETIC, "rounds=2", f"seed={s}", name=f"s{i}") for i, s in ((1, 0), (2, 6))
    ]
    assert runs[1]["config"]["seed"] == runs[0]["config"]["seed"] == 0
    assert _without_timings(runs[0]) == _without_timings(runs[1])
    assert _without_timings(runs[0]) != _without_timings(runs[2])
    first, second = (
        load_safetensors(d / "model.safetensors") for d in (first_dir, simulate.root / "s1")
    )
    assert all(np.array_equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedtrimmedavg", "krum"])
def test_every_strategy_trains(simulate, default_run, strategy):
    # FedAvg is the default strategy: the module's default run is that run.
    if strategy == "fedavg":
        metrics = default_run[0]
    else:
        metrics = simulate(*SYNTHETIC, f"strategy={strategy}", "rounds=2")
    assert metrics["config"]["strategy.name"] == strategy
    assert all(len(r["participants"]) == 3 for r in metrics["rounds"])
    assert metrics["final"]["central_eval_accuracy"] > 0.6


@pytest.mark.parametrize(
    ("dataset", "model", "num_classes"),
    [
        ("randhie", "mlp", 2),
        ("medpar", "logreg", 2),
        ("loans", "mlp", 4),
        ("digits", "cnn", 10),
        ("mnist5k", "mlp", 10),
        ("synthetic", "logreg", 2),
    ],
)
def test_every_dataset_runs(simulate, dataset, model, num_classes):
    metrics = simulate(f"dataset={dataset}", f"model={model}", "federation.num_sites=3", "rounds=1")
    record = metrics["rounds"][0]
    assert len(record["participants"]) == 3 and not record["failures"]
    assert 0.0 <= metrics["final"]["eval_accuracy"] <= 1.0
    weights = load_safetensors(simulate.root / "run" / "model.safetensors")
    schema = load_dataset(dataset).schema
    assert len(schema.classes) == num_classes
    expected = build_model(model, schema.input_shape, num_classes, 64).state_dict()
    assert {k: v.shape for k, v in weights.items()} == {
        k: tuple(v.shape) for k, v in expected.items()
    }


def test_sites_per_round_samples_the_seeded_sites(simulate):
    metrics = simulate(
        "dataset=synthetic",
        "federation.num_sites=5",
        "federation.sites_per_round=2",
        "rounds=3",
        "seed=9",
    )
    sites = [f"site-{i:02d}" for i in range(5)]
    for record in metrics["rounds"]:
        assert record["participants"] == sample_sites(
            sites, 2, seed=9, server_round=record["round"]
        )


def test_multirun_sweep_writes_one_run_per_combination(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.run",
            "-m",
            "strategy=fedavg,fedprox",
            "dataset=synthetic",
            "federation.num_sites=3",
            "rounds=1",
            "progress=false",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    strategies = sorted(
        json.loads(p.read_text())["config"]["strategy.name"] for p in sweep.glob("*/metrics.json")
    )
    assert strategies == ["fedavg", "fedprox"]
