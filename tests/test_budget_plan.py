"""Budgets planned before they are spent (privacy/planning.py and the discovery query).

Before a DP-SGD run the coordinator asks every site its ε spent, cap and δ, projects the ε the
run spends at each site with the σ the site will pick, prints it, and refuses a run that would
take a site past ``privacy.budget_share`` of its remaining budget unless confirmed.
"""

from __future__ import annotations

import json
import math

import pytest
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inprocess import InProcessGrid
from own_data import write_sites

from clients.app import app as client_app
from clients.site_privacy import plan_dp_sgd
from fedgov.config import RunConfig, from_flower_config, to_flower_config
from fedgov.datasets import schema_to_json
from fedgov.errors import ConfigError
from fedgov_data.connector import load_schema_file
from privacy.accounting import independent_epsilon, steps_per_round
from privacy.planning import SiteBudget, SitePlan, check_budget_plan, plan_lines, plan_site
from server.app import run_federation


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _cfg(**privacy) -> RunConfig:
    cfg = RunConfig(rounds=3)
    cfg.privacy.name = "sample_dp"
    for key, value in privacy.items():
        setattr(cfg.privacy, key, value)
    return cfg


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(40, 5000),
    sigma=st.floats(0.6, 4.0),
    rounds=st.integers(1, 6),
    batch=st.sampled_from([16, 32, 64]),
)
def test_the_projected_epsilon_is_what_the_site_will_spend(rows, sigma, rounds, batch):
    cfg = _cfg(noise_multiplier=sigma)
    cfg.rounds, cfg.train.batch_size = rounds, min(batch, rows)
    plan = plan_site(cfg, SiteBudget("s", rows, 1.0, 8.0, 1e-5), rounds)
    # The σ the site itself picks (clients.site_privacy), and ε recomputed without Opacus.
    site = plan_dp_sgd(cfg, rows, 1e-5)
    assert plan.noise_multiplier == site.noise_multiplier == sigma
    rate, steps = steps_per_round(rows, cfg.train.batch_size, cfg.train.local_epochs)
    expected = independent_epsilon([(sigma, rate, steps * rounds)], 1e-5)
    assert plan.epsilon_run == pytest.approx(expected, rel=0.01)
    assert plan.epsilon_left == 7.0
    assert plan.share == pytest.approx(plan.epsilon_run / 7.0)


def test_a_target_plans_sigma_so_the_run_spends_the_target():
    cfg = _cfg(target_epsilon=1.0)
    plan = plan_site(cfg, SiteBudget("s", 400, 0.0, 8.0, 1e-5), cfg.rounds)
    assert plan.noise_multiplier == plan_dp_sgd(cfg, 400, 1e-5).noise_multiplier
    assert 0.99 <= plan.epsilon_run <= 1.0
    unreachable = plan_site(_cfg(target_epsilon=1e-4), SiteBudget("t", 400, 0, 8, 1e-5), 3)
    assert unreachable.noise_multiplier is None and math.isinf(unreachable.epsilon_run)
    assert plan_lines([unreachable], 3) == [
        "privacy plan: site t: cannot train (privacy.target_epsilon 0.0001 is unreachable)"
    ]


def test_a_run_past_the_share_of_a_remaining_budget_is_refused_unless_confirmed():
    plans = [SitePlan("hosp-a", 1.0, 0.9, 6.0), SitePlan("hosp-b", 1.0, 3.2, 4.0)]
    cfg = _cfg(budget_share=0.5)
    with pytest.raises(ConfigError) as refused:
        check_budget_plan(cfg, plans)
    assert str(refused.value) == (
        "privacy plan: this run would spend ε 3.2 at site hosp-b, 80% of its remaining budget 4, "
        "above privacy.budget_share 0.5; lower rounds, raise privacy.noise_multiplier or set "
        "privacy.target_epsilon, or confirm with privacy.budget_confirmed=true"
    )
    check_budget_plan(_cfg(budget_share=0.9), plans)  # within the share
    check_budget_plan(_cfg(budget_share=0.5, budget_confirmed=True), plans)  # confirmed
    check_budget_plan(_cfg(budget_share=0.0), plans)  # no check (the simulation default)
    assert plan_lines(plans, 3) == [
        "privacy plan: site hosp-a: σ 1, projected ε 0.9 over 3 round(s) of its remaining 6 (15%)",
        "privacy plan: site hosp-b: σ 1, projected ε 3.2 over 3 round(s) of its remaining 4 (80%)",
    ]
    with pytest.raises(ConfigError, match=r"^privacy\.budget_share: 1\.5 must be in \[0, 1\]"):
        from_flower_config(to_flower_config(_cfg()) | {"privacy.budget_share": 1.5})


# ---- through the real ClientApp: the planning query and a refused run --------------------------


def _federation(tmp_path, rows=(150, 150, 5), **privacy):
    names = [f"hosp-{c}" for c in "abc"[: len(rows)]]
    files = {}
    for name, count in zip(names, rows, strict=True):
        files.update(write_sites(tmp_path / "data" / name, [name], rows_per_site=count))
    configs = []
    for name in names:
        site_dir = tmp_path / "sites" / name
        site_dir.mkdir(parents=True)
        data, schema = files[name]
        configs.append(
            {
                "data-path": str(data),
                "schema-path": str(schema),
                "site-id": name,
                "site-dir": str(site_dir),
                "epsilon-cap": 4.0,
            }
        )
    cfg = RunConfig(rounds=2, seed=1, output_dir=str(tmp_path / "run"), progress=True)
    cfg.dataset.schema = schema_to_json(load_schema_file(files[names[0]][1]))
    cfg.federation.num_sites, cfg.federation.round_timeout = 2, 30.0
    cfg.privacy.name, cfg.privacy.budget_share = "sample_dp", 0.5
    for key, value in privacy.items():
        setattr(cfg.privacy, key, value)
    cfg = from_flower_config(to_flower_config(cfg))
    return cfg, InProcessGrid(client_app, configs, to_flower_config(cfg))


def test_the_coordinator_refuses_a_run_that_would_exhaust_a_site_before_any_spend(tmp_path, capsys):
    cfg, grid = _federation(tmp_path, noise_multiplier=0.7)
    with pytest.raises(ConfigError, match=r"^privacy plan: this run would spend ε \d"):
        run_federation(grid, cfg)
    err = capsys.readouterr().err
    assert "[fedgov] privacy plan: site hosp-a: σ 0.7, projected ε" in err
    assert "of its remaining 4 (" in err
    # Nothing was spent: no site's ledger holds a spend, and no round ran.
    for site in ("hosp-a", "hosp-b"):
        ledger = tmp_path / "sites" / site / "privacy_ledger.json"
        assert not ledger.exists() or json.loads(ledger.read_text())["spends"] == []
    assert not (tmp_path / "run" / "metrics.json").exists()
    # The site with 5 rows declined discovery with its reason; it never reached the plan.
    assert (
        "[fedgov] site hosp-c left out: declined: too few rows: 5 (dataset.min_site_rows 10)" in err
    )


def test_a_modest_target_passes_the_plan_and_the_sites_spend_what_was_projected(tmp_path, capsys):
    cfg, grid = _federation(tmp_path, rows=(150, 150), target_epsilon=1.0)
    run_federation(grid, cfg)
    err = capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["participants"] for r in metrics["rounds"]] == [["hosp-a", "hosp-b"]] * 2
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    for site in ("hosp-a", "hosp-b"):
        spent = report["sample_level"]["sites"][site]["epsilon"]
        assert 0.99 <= spent <= 1.0  # the projected ε of the run, spent
        assert f"[fedgov] privacy plan: site {site}: σ " in err
