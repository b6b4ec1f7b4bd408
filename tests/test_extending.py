"""docs/extending.md's worked examples (examples/), run through the real simulation.

A user strategy (FedAvgM), model (TinyMLP), dataset (a CSV folder with natural sites) and local
objective (weight decay), each one file named by ``_target_``: the federated result must equal an
independent computation (torch's own ``weight_decay``, FedAvgM's update written out in numpy),
plainly and under SecAgg+; under DP-SGD the sites' ε must be what Opacus' accountant gives for
the rounds they report. Registries, ``_target_`` mistakes and the specs' SecAgg/site-DP verdicts
are checked without a simulation.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_errors import simulation_error_lines
from omegaconf import OmegaConf

from examples.clinics import load_clinics
from fedgov.config import from_flower_config, to_flower_config
from fedgov.datasets import Dataset, split_holdout, split_train_test
from fedgov.errors import ConfigError
from fedgov.records import load_safetensors
from simulations.run import CONF_DIR, compose_config
from strategies.run_config import run_config_from_mapping

USER_PLUGINS = [
    "dataset._target_=examples.clinics.load_clinics",
    "model._target_=examples.tiny_mlp.TinyMLP",
    "+model.width=4",
    "strategy._target_=examples.fedavgm.FedAvgM",
    "+strategy.server_lr=1.5",
    "+strategy.server_momentum=0.5",
    "objective._target_=examples.weight_decay.WeightDecay",
    "+objective.weight=0.05",
    "dataset.holdout_fraction=0.2",
]
WIDTH, SERVER_LR, MOMENTUM, DECAY = 4, 1.5, 0.5, 0.05


def _config(*overrides: str):
    return run_config_from_mapping(
        OmegaConf.to_container(compose_config(list(overrides)), resolve=True)
    )


# ---- registries and configs (no simulation) ----------------------------------------------------


def test_fedgov_options_are_registered_and_their_yamls_name_them():
    from fedgov.datasets import DATASET_NAMES, DATASETS
    from fedgov.models import MODELS
    from fedgov.objectives import OBJECTIVES
    from fedgov_data.partitioners import PARTITIONERS
    from strategies.registry import STRATEGIES

    def stems(group: str) -> list[str]:
        return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))

    assert stems("strategy") == sorted(STRATEGIES)
    assert stems("model") == sorted(MODELS)
    assert stems("dataset") == sorted(DATASETS) == sorted(DATASET_NAMES)
    assert stems("objective") == sorted(OBJECTIVES) == ["proximal"]
    assert list(PARTITIONERS) == ["natural", "iid", "dirichlet"]
    # SecAgg+/site-DP compatibility comes from each spec's `aggregate`, nothing else.
    means = {name for name in STRATEGIES if STRATEGIES.resolve(name).serves_a_sum}
    assert means == {"fedavg", "fedprox", "fedadam"}


def test_user_plugins_compose_and_survive_flowers_flat_run_config():
    cfg = _config(*USER_PLUGINS)
    assert cfg.strategy.name == "examples.fedavgm.FedAvgM"
    assert cfg.strategy.options == {"server_lr": 1.5, "server_momentum": 0.5}
    assert (cfg.model.name, cfg.model.options) == ("examples.tiny_mlp.TinyMLP", {"width": 4})
    assert cfg.objective.options == {"weight": 0.05}
    flat = to_flower_config(cfg)
    assert json.loads(flat["strategy.options"]) == {"server_lr": 1.5, "server_momentum": 0.5}
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert from_flower_config(flat) == cfg
    # The same config as a YAML-less flat mapping (how Flower's run config reaches the apps).
    assert from_flower_config(
        {"strategy.name": "fedprox", "strategy.proximal_mu": 0.3}
    ).strategy.options == {"proximal_mu": 0.3}


@pytest.mark.parametrize(
    ("overrides", "start", "expected"),
    [
        (["strategy._target_=nopkg.FedNova"], "strategy._target_", "no module 'nopkg'"),
        (["model._target_=examples.tiny_mlp.ResNet8"], "model._target_", "no attribute 'ResNet8'"),
        (["model._target_=examples.clinics.load_clinics"], "model._target_", "input_shape"),
        (["dataset._target_=examples"], "dataset._target_", "dotted import path"),
        (["strategy=krum", "+strategy.trim_beta=0.1"], "strategy.trim_beta", "num_malicious"),
        (
            ["objective._target_=examples.weight_decay.WeightDecay", "+objective.weight=heavy"],
            "objective.weight",
            "expected float",
        ),
        (["strategy=fedprox", "strategy.proximal_mu=-1"], "strategy.proximal_mu", "minimum 0"),
        (["+model.hiden=8"], "model.hiden", "did you mean 'hidden'?"),
        (["dataset.partitioner=examples.nowhere.split"], "partitioner._target_", "nowhere"),
        (
            ["model._target_=examples.tiny_mlp.TinyMLP", "registry.publish=true"],
            "registry.publish",
            "registered models",
        ),
    ],
)
def test_a_bad_target_or_option_is_one_line_naming_it(overrides, start, expected):
    with pytest.raises(ConfigError) as info:
        _config(*overrides)
    message = str(info.value)
    assert message.startswith(start) and expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("privacy", ["site_dp", "both"])
def test_a_per_update_strategy_is_refused_where_its_spec_forbids(privacy):
    median = "strategy._target_=examples.median.CoordinateMedian"
    with pytest.raises(ConfigError, match="per-update"):
        _config(median, "secagg=secaggplus")
    with pytest.raises(ConfigError, match="site-level DP hides"):
        _config(median, f"privacy={privacy}")
    # FedAvgM declares aggregate = "mean": both are allowed.
    cfg = _config(*USER_PLUGINS, "secagg=secaggplus", f"privacy={privacy}")
    assert cfg.secagg.name == "secaggplus"


@pytest.mark.process
def test_the_cli_reports_a_bad_target_in_one_line_without_a_traceback(tmp_path):
    lines = simulation_error_lines(tmp_path, "strategy._target_=mypkg.FedNova")
    assert lines == [
        "fedgov: error: strategy._target_: cannot import 'mypkg.FedNova': no module 'mypkg' "
        "(expected a StrategySpec or a flwr.serverapp.strategy.Strategy class; is its package "
        "installed, or on PYTHONPATH, at the server and every site?)"
    ]


# ---- the local objective hook: one code path for plain and DP training -------------------------


def _rows(n: int = 48, seed: int = 0) -> Dataset:
    return load_clinics().subset(np.random.default_rng(seed).permutation(210)[:n])


def test_the_objective_in_plain_training_is_torchs_weight_decay():
    from clients.training import train_local
    from examples.tiny_mlp import TinyMLP
    from examples.weight_decay import WeightDecay
    from fedgov.config import TrainConfig

    rows, settings = _rows(), TrainConfig(local_epochs=2, batch_size=16, lr=0.1, momentum=0.9)
    torch.manual_seed(3)
    start = TinyMLP((3,), 2, width=5).state_dict()
    ours = TinyMLP((3,), 2, width=5)
    ours.load_state_dict(start)
    train_local(ours, rows, settings, seed=11, objective=WeightDecay(0.2))
    theirs = _replica_train(start, rows, settings, seed=11, weight_decay=0.2, width=5)
    for name, value in theirs.items():
        torch.testing.assert_close(ours.state_dict()[name], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fused", "hooks"])
def test_the_objective_under_dp_sgd_adds_its_gradient_after_the_noise(mode):
    """One DP-SGD step without momentum: w' = w − η·(noisy gradient + λ·w), the noisy gradient
    being the same (same seeds) as a step without the objective."""
    from clients.dp_training import DpSgdPlan, train_local_dp
    from examples.tiny_mlp import TinyMLP
    from examples.weight_decay import WeightDecay
    from fedgov.config import TrainConfig

    rows, settings = _rows(40), TrainConfig(lr=0.5, momentum=0.0)
    plan = DpSgdPlan(
        noise_multiplier=1.0, sample_rate=0.25, steps=1, max_grad_norm=1.0, num_records=40
    )
    torch.manual_seed(5)
    start = TinyMLP((3,), 2, width=3).state_dict()
    results = {}
    for label, objective in (("plain", None), ("decay", WeightDecay(0.3))):
        model = TinyMLP((3,), 2, width=3)
        model.load_state_dict(start)
        train_local_dp(
            model,
            rows,
            settings,
            plan,
            sampling_seed=7,
            noise_seed=9,
            grad_sample_mode=mode,
            objective=objective,
        )
        results[label] = {k.removeprefix("_module."): v for k, v in model.state_dict().items()}
    for name, w in start.items():
        expected = results["plain"][name] - settings.lr * 0.3 * w
        torch.testing.assert_close(results["decay"][name], expected, atol=1e-6, rtol=1e-5)


# ---- the worked example through the real simulation --------------------------------------------


def _replica_train(
    start: dict, rows: Dataset, settings, *, seed: int, weight_decay: float, width: int = WIDTH
) -> dict:
    """Local training written independently of clients.training: torch's SGD with weight decay."""
    from examples.tiny_mlp import TinyMLP

    model = TinyMLP(rows.schema.input_shape, len(rows.schema.classes), width=width)
    model.load_state_dict(start)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=weight_decay
    )
    x, y = torch.from_numpy(rows.x), torch.from_numpy(rows.y)
    order_rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    for _ in range(settings.local_epochs):
        order = torch.from_numpy(order_rng.permutation(len(y)))
        for begin in range(0, len(y), settings.batch_size):
            batch = order[begin : begin + settings.batch_size]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _site_seed(seed: int, server_round: int, site_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{server_round}:{site_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _independent_run(rounds: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The federated run recomputed by hand: clinics by file, TinyMLP, FedAvgM in numpy."""
    from examples.tiny_mlp import TinyMLP
    from fedgov.config import TrainConfig

    settings = TrainConfig()
    pool, _ = split_holdout(load_clinics(), 0.2, seed)
    sites = {}
    for site in sorted(set(pool.site)):
        train, _ = split_train_test(pool.subset(np.flatnonzero(pool.site == site)), 0.2, seed)
        sites[site] = train
    torch.manual_seed(seed)
    weights = {k: v.numpy().copy() for k, v in TinyMLP((3,), 2, width=WIDTH).state_dict().items()}
    velocity = None
    for server_round in range(1, rounds + 1):
        start = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
        trained = {
            site: _replica_train(
                start, rows, settings, weight_decay=DECAY, seed=_site_seed(seed, server_round, site)
            )
            for site, rows in sites.items()
        }
        total = sum(len(rows.y) for rows in sites.values())
        mean = {
            k: sum(len(sites[s].y) * trained[s][k].numpy().astype(np.float64) for s in sites)
            / total
            for k in weights
        }
        delta = {k: weights[k] - mean[k] for k in weights}
        velocity = (
            delta if velocity is None else {k: MOMENTUM * velocity[k] + delta[k] for k in delta}
        )
        weights = {k: (weights[k] - SERVER_LR * velocity[k]).astype(np.float32) for k in weights}
    return weights


def _final_weights(run_dir: Path) -> dict[str, np.ndarray]:
    return dict(load_safetensors(run_dir / "model.safetensors"))


@pytest.mark.ray
def test_user_plugins_train_exactly_as_computed_by_hand(simulate):
    metrics = simulate(*USER_PLUGINS, "rounds=2", name="plain")
    assert [r["participants"] for r in metrics["rounds"]] == [["east", "north", "south"]] * 2
    weights = _final_weights(simulate.root / "plain")
    # The user model: (3 inputs + 1)·4 hidden + (4 + 1)·2 classes = 26 weights.
    assert sum(w.size for w in weights.values()) == (3 + 1) * WIDTH + (WIDTH + 1) * 2 == 26
    expected = _independent_run(rounds=2)
    assert sorted(weights) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(weights[name], expected[name], atol=2e-5, rtol=1e-4)


@pytest.mark.ray
def test_user_plugins_under_secaggplus_see_only_the_sum_and_agree(simulate):
    metrics = simulate(*USER_PLUGINS, "rounds=1", "secagg=secaggplus", name="secagg")
    assert metrics["rounds"][0]["participants"] == ["east", "north", "south"]
    weights = _final_weights(simulate.root / "secagg")
    expected = _independent_run(rounds=1)
    for name in expected:  # SecAgg+ quantises each update to 32 bits in ±clip_range
        np.testing.assert_allclose(weights[name], expected[name], atol=1e-4)


@pytest.mark.ray
def test_user_plugins_under_sample_dp_account_every_round(simulate):
    from opacus.accountants import RDPAccountant

    simulate(*USER_PLUGINS, "rounds=1", "privacy=sample_dp", "train.batch_size=16", name="dp")
    run_dir = simulate.root / "dp"
    report = json.loads((run_dir / "privacy_report.json").read_text())
    sites = report["sample_level"]["sites"]
    assert sorted(sites) == ["east", "north", "south"]
    for site in sites.values():
        accountant = RDPAccountant()
        (sigma, rate, steps), *later = site["history"]  # one round: one (σ, q, steps)
        assert later == [] and sigma == 1.0 and 0 < rate < 1 and steps >= 1
        accountant.history.append((sigma, rate, steps))
        assert site["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-6)
    # The model trained (DP noise included) and kept the user model's shape.
    weights = _final_weights(run_dir)
    assert sum(w.size for w in weights.values()) == 26
    start = _independent_run(rounds=0)
    assert any(not np.allclose(weights[k], start[k]) for k in start)


def test_a_spec_registered_under_a_short_name_is_built_with_its_own_fields():
    """docs/extending.md's registration: a name, a config dataclass, an aggregate kind."""
    from dataclasses import asdict, dataclass

    from examples.fedavgm import FedAvgM
    from fedgov.config import StrategyConfig
    from strategies.registry import ADDRESS_ALL, STRATEGIES, StrategySpec, build_strategy

    @dataclass
    class FedAvgMConfig:
        server_lr: float = 1.0
        server_momentum: float = 0.9

    spec = StrategySpec(
        build=lambda o: FedAvgM(**ADDRESS_ALL, **asdict(o)),
        config_cls=FedAvgMConfig,
        aggregate="mean",
    )
    STRATEGIES.register("fedavgm", spec)
    try:
        strategy = build_strategy(StrategyConfig("fedavgm", {"server_momentum": 0.25}))
        assert isinstance(strategy, FedAvgM)
        assert (strategy.server_lr, strategy.server_momentum) == (1.0, 0.25)
        assert strategy.fraction_train == 1.0
        with pytest.raises(ConfigError, match=r"^strategy.momentum: not a field"):
            build_strategy(StrategyConfig("fedavgm", {"momentum": 0.25}))
    finally:
        del STRATEGIES.entries["fedavgm"]


def test_the_per_update_example_takes_the_coordinate_median(monkeypatch):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from examples.median import CoordinateMedian
    from fedgov.config import StrategyConfig
    from strategies.registry import build_strategy

    strategy = build_strategy(StrategyConfig("examples.median.CoordinateMedian"))
    assert isinstance(strategy, CoordinateMedian)
    for attribute in ("_task_id", "_run_id", "_node_id"):  # replies are stamped by this task
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    rng = np.random.default_rng(0)
    sites = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(5)]
    replies = [
        Message(
            RecordDict({"arrays": ArrayRecord([w]), "metrics": MetricRecord({"num-examples": 10})}),
            dst_node_id=i + 1,
            message_type="train",
        )
        for i, w in enumerate(sites)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    (median,) = arrays.to_numpy_ndarrays()
    np.testing.assert_array_equal(median, np.median(np.stack(sites), axis=0))


def test_a_deployed_site_imports_no_target_its_operator_did_not_list(tmp_path, monkeypatch):
    """The adversary is the coordinator: its run config names a module that acts on import. A
    deployed site (no partition-id) refuses in one line before importing it; the module the
    site's node config lists is imported as usual."""
    from flwr.app import Context, RecordDict

    from clients import app as client_app

    (tmp_path / "evilmod.py").write_text(
        f"open({str(tmp_path / 'ran')!r}, 'w').write('imported')\n"
        "class Objective:\n    def penalty(self, params, start):\n        return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    flat = to_flower_config(_config())
    flat["objective.name"] = "evilmod.Objective"

    def site(node_config: dict) -> Context:
        return Context(
            run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=flat
        )

    for node_config in ({"data-path": "rows.csv"}, {"plugin-modules": "examples, mypkg"}):
        with pytest.raises(ConfigError) as info:
            client_app._config(site(node_config))
        assert str(info.value).startswith("objective._target_: 'evilmod.Objective' is not from a")
        assert "\n" not in str(info.value)
    assert not (tmp_path / "ran").exists() and "evilmod" not in sys.modules
    # Listed by the site operator (or a simulated site): imported and used.
    for node_config in ({"plugin-modules": "mypkg,evilmod"}, {"partition-id": 0}):
        cfg = client_app._config(site(node_config))
        assert cfg.objective.name == "evilmod.Objective"
    assert (tmp_path / "ran").read_text() == "imported"
    monkeypatch.delitem(sys.modules, "evilmod")
