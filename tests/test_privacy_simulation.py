"""Differential privacy end to end on Flower's simulation engine, and its config errors.

Every ε the runs print is reproduced from the run's privacy_report.json by an accountant that
shares no code with Opacus, replaying the receipts the sites signed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from clients.site_data import load_site_data
from fedgov.config import RunConfig, from_flower_config
from fedgov.errors import ConfigError
from privacy.accounting import epsilon, independent_epsilon, steps_per_round
from privacy.planning import check_privacy_plan
from privacy.receipts import Receipt, read_public_key
from strategies.run_config import load_run_config

ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC = ["dataset=synthetic", "federation.num_sites=3"]


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "privacy_report.json").read_text())


# ---- config errors: one line naming the field and the allowed range ----------------------------
@pytest.mark.parametrize(
    ("flat", "field", "allowed"),
    [
        (
            {"privacy.name": "sample_dp", "privacy.target_epsilon": -1.0},
            "privacy.target_epsilon",
            "must be > 0",
        ),
        (
            {"privacy.name": "sample_dp", "privacy.site_epsilon_cap": 0.0},
            "privacy.site_epsilon_cap",
            "must be > 0",
        ),
        ({"privacy.name": "sample_dp", "privacy.delta": 0.0}, "privacy.delta", "(0, 1/n)"),
        ({"privacy.name": "sample_dp", "privacy.delta": 1.0}, "privacy.delta", "(0, 1/n)"),
        (
            {"privacy.name": "sample_dp", "privacy.noise_multiplier": -0.5},
            "privacy.noise_multiplier",
            "must be > 0",
        ),
        (
            {"privacy.name": "site_dp", "privacy.site_noise_multiplier": -1.0},
            "privacy.site_noise_multiplier",
            "must be > 0",
        ),
        (
            {"privacy.name": "sample_dp", "privacy.max_grad_norm": 0.0},
            "privacy.max_grad_norm",
            "must be > 0",
        ),
        (
            {"privacy.name": "site_dp", "privacy.clipping_norm": -1.0},
            "privacy.clipping_norm",
            "must be > 0",
        ),
        (
            {"privacy.name": "sample_dp", "privacy.target_epsilon": 20.0},
            "privacy.target_epsilon",
            "allowed range (0, 8.0]",
        ),
        (
            {"privacy.name": "sample_dp", "privacy.accountant": "gdp"},
            "privacy.accountant",
            "rdp, prv",
        ),
        ({"privacy.name": "site_dp", "strategy.name": "krum"}, "strategy.name", "fedavg"),
        ({"privacy.name": "laplace"}, "privacy.name", "sample_dp"),
    ],
)
def test_bad_privacy_values_are_one_line_naming_the_field(flat, field, allowed):
    with pytest.raises(ConfigError) as info:
        load_run_config(flat)
    message = str(info.value)
    assert message.startswith(field) and allowed in message and "\n" not in message


def _sizes(cfg: RunConfig) -> dict[str, int]:
    return {
        f"site-0{i}": len(load_site_data(cfg, {"partition-id": i, "num-partitions": 3}).train.y)
        for i in range(3)
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"train.batch_size": 5000},
            "train.batch_size: 5000 is larger than site {site}'s {n} "
            "training records; allowed range [1, {n}] with DP-SGD",
        ),
        (
            {"privacy.delta": 0.05},
            "privacy.delta: 0.05 must be in (0, 1/n) = (0, {inverse:.3g}), "
            "n = {n} records at site {site}",
        ),
        (
            {"privacy.target_epsilon": 0.001},
            "privacy.target_epsilon: 0.001 is unreachable in 5 "
            "rounds at site site-00 (it would need σ > 100); allowed range [",
        ),
    ],
)
def test_data_dependent_limits_name_the_field_and_range(changes, message):
    cfg = from_flower_config(
        {
            "dataset.name": "synthetic",
            "federation.num_sites": 3,
            "privacy.name": "sample_dp",
            **changes,
        }
    )
    sizes = _sizes(cfg)
    site = min(sizes, key=lambda s: sizes[s])
    with pytest.raises(ConfigError) as info:
        check_privacy_plan(cfg, sizes)
    expected = message.format(site=site, n=sizes[site], inverse=1 / sizes[site])
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)


def test_a_config_error_stops_the_runner_in_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.run",
            *SYNTHETIC,
            "privacy=sample_dp",
            "privacy.delta=0.5",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("fedgov: error: privacy.delta: 0.5 must be in (0, 1/n)")


# ---- real simulations ----------------------------------------------------------------------------
@pytest.mark.slow
def test_sample_dp_sites_enforce_their_own_cap_and_every_epsilon_reproduces(simulate):
    metrics = simulate(*SYNTHETIC, "rounds=4", "privacy=sample_dp", "privacy.site_epsilon_cap=5.5")
    run = simulate.root / "run"
    report = _report(run)
    cfg = from_flower_config({"dataset.name": "synthetic", "federation.num_sites": 3})
    sizes = _sizes(cfg)
    for site_id, site in report["sample_level"]["sites"].items():
        rate, steps = steps_per_round(sizes[site_id], 32, 1)
        # which round this site must decline in, computed independently
        first_over = next(
            (r for r in range(1, 5) if independent_epsilon([(1.0, rate, steps * r)], 1e-5) > 5.5),
            None,
        )
        assert site["declined_rounds"] == (list(range(first_over, 5)) if first_over else [])
        assert site["epsilon"] <= site["cap"] == 5.5
        for receipt_json in site["receipts"]:
            receipt = Receipt.from_json(receipt_json)
            # signed by the key in the site's own directory, which the server never sees
            assert receipt.verify(read_public_key(run / "sites" / site_id))
            replayed = independent_epsilon(receipt.payload["history"], 1e-5)
            assert abs(replayed - receipt.payload["epsilon"]) / replayed < 0.01
        for record in metrics["rounds"]:
            assert (site_id in record["declined"]) == (record["round"] in site["declined_rounds"])
        ledger = json.loads((run / "sites" / site_id / "privacy_ledger.json").read_text())
        assert len(ledger["spends"]) == len(site["receipts"])
    assert any(site["declined_rounds"] for site in report["sample_level"]["sites"].values())
    assert report["verification"]["ok"] and report["site_level"] is None
    assert (run / "privacy_report.html").read_text().startswith("<!DOCTYPE html>")
    assert all(r["train_loss"] is None for r in metrics["rounds"])  # stays at the sites


@pytest.mark.slow
def test_site_dp_with_poisson_sampled_sites_accounts_the_sampling_rate(simulate):
    metrics = simulate(
        "dataset=synthetic",
        "federation.num_sites=4",
        "federation.sites_per_round=2",
        "rounds=6",
        "privacy=site_dp",
        "privacy.site_noise_multiplier=1.2",
        "privacy.accountant=prv",
    )
    report = _report(simulate.root / "run")
    site_level = report["site_level"]
    assert report["sample_level"] is None and site_level["accountant"] == "prv"
    assert site_level["history"] == [[1.2, 0.5, 6]]
    assert site_level["epsilon"] == pytest.approx(epsilon([(1.2, 0.5, 6)], 1e-5, "prv"))
    assert independent_epsilon([(1.2, 0.5, 6)], 1e-5, "prv") == pytest.approx(
        site_level["epsilon"], rel=0.01
    )
    counts = [len(r["participants"]) for r in metrics["rounds"]]
    assert [row["contributed"] for row in site_level["rounds"]] == counts
    assert all(0 <= c <= 4 for c in counts)  # Poisson: the count varies, no floor


@pytest.mark.slow
def test_both_guarantees_under_secure_aggregation(simulate):
    metrics = simulate(
        "dataset=synthetic",
        "federation.num_sites=4",
        "rounds=2",
        "privacy=both",
        "secagg=secaggplus",
        "privacy.site_epsilon_cap=9",
    )
    report = _report(simulate.root / "run")
    assert report["secure_aggregation"] is True
    assert report["verification"]["ok"], report["verification"]["problems"]
    assert len(report["sample_level"]["sites"]) == 4
    # each site sized its noise share for all 4 survivors, and all 4 survived; each site is
    # protected by the other 3 shares only (add/remove one site): z·√(3/4)
    protected = [row["noise_multiplier"] for row in report["site_level"]["rounds"]]
    assert protected == [pytest.approx(math.sqrt(3 / 4))] * 2
    assert report["site_level"]["neighbouring_relation"].startswith("add/remove one whole site")
    assert report["sample_level"]["neighbouring_relation"].startswith("add/remove one record")
    html = (simulate.root / "run" / "privacy_report.html").read_text()
    assert "Neighbouring relation: add/remove one whole site" in html
    assert all(len(r["participants"]) == 4 and not r["aborted"] for r in metrics["rounds"])
    assert "Secure aggregation was on" in report["summary"]
    # Poisson draws are not known a round ahead: each round runs its own setup
    assert [r["secagg"]["pipelined_stages"] for r in metrics["rounds"]] == [[], []]
