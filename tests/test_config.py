"""The run config: Hydra composition, Flower's flat run config, and errors that name the field."""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fedgov.config import RunConfig, from_flower_config, from_mapping, to_flower_config
from fedgov.errors import ConfigError
from simulations.run import CONF_DIR, compose_config
from strategies.registry import STRATEGIES, build_strategy
from strategies.run_config import load_run_config

ROOT = Path(__file__).resolve().parent.parent


def _compose(*overrides: str):
    return compose_config(list(overrides))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_pyproject_flower_config_is_the_flattened_run_config():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "clients.app:app"}

    def flatten(node: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in node.items():
            if isinstance(value, dict):
                out.update(flatten(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    assert flatten(app["config"]) == to_flower_config(RunConfig())


def test_default_composition_is_the_default_run_config():
    cfg = from_mapping(OmegaConf.to_container(_compose(), resolve=True))
    assert cfg == RunConfig()


def test_every_group_option_composes_into_a_valid_run_config():
    assert _options("strategy") == sorted(STRATEGIES)
    for dataset, strategy in itertools.product(_options("dataset"), _options("strategy")):
        model = "cnn" if dataset in ("digits", "mnist5k") else "mlp"
        composed = _compose(f"dataset={dataset}", f"strategy={strategy}", f"model={model}")
        cfg = from_mapping(OmegaConf.to_container(composed, resolve=True))
        assert (cfg.dataset.name, cfg.strategy.name, cfg.model.name) == (dataset, strategy, model)
        assert type(build_strategy(cfg.strategy)).__name__.lower() == strategy


def test_group_values_reach_the_strategy():
    cfg = from_mapping(
        OmegaConf.to_container(_compose("strategy=fedprox", "strategy.proximal_mu=0.5"))
    )
    assert build_strategy(cfg.strategy).proximal_mu == 0.5
    cfg = from_mapping(OmegaConf.to_container(_compose("strategy=fedtrimmedavg")))
    assert build_strategy(cfg.strategy).beta == 0.2


def test_flower_config_round_trip_keeps_types():
    cfg = RunConfig(rounds=7, seed=3)
    cfg.federation.sites_per_round = 0.5
    cfg.strategy.name = "krum"
    flat = to_flower_config(cfg)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert from_flower_config(flat) == cfg


def test_misspelt_key_is_refused_by_the_schema():
    with pytest.raises(ConfigCompositionException) as info:
        _compose("federation.num_site=3")
    assert "Key 'num_site' not in 'FederationConfig'" in str(info.value.__cause__)


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(Exception) as info:
        _compose("strategy=fedproxx")
    message = str(info.value)
    assert "fedproxx" in message
    for option in _options("strategy"):
        assert option in message


@pytest.mark.parametrize(
    ("flat", "field"),
    [
        ({"rounds": 0}, "rounds"),
        ({"strategy.name": "fedsgd"}, "strategy.name"),
        ({"dataset.name": "imagenet"}, "dataset.name"),
        ({"dataset.alpha": 0.0}, "dataset.alpha"),
        ({"federation.sites_per_round": 2.5}, "federation.sites_per_round"),
        ({"strategy.trim_beta": 0.5}, "strategy.trim_beta"),
        ({"train.lr": -1.0}, "train.lr"),
        ({"rounds": "three"}, "rounds"),
        ({"model.name": "cnn"}, "model.name"),  # cnn on the tabular default dataset
        ({"model.name": "gabor"}, "model.name"),  # so is gabor
        ({"federation.num_site": 3}, "federation.num_site"),
    ],
)
def test_bad_values_name_the_field(flat, field):
    with pytest.raises(ConfigError) as info:
        load_run_config(flat)
    message = str(info.value)
    assert message.startswith(field) or f"'{field}'" in message
    assert "\n" not in message


def test_the_image_dp_preset_composes_into_a_dp_run_of_the_gabor_model():
    composed = _compose("dataset=mnist5k", "privacy=sample_dp_images", "rounds=15")
    cfg = from_mapping(OmegaConf.to_container(composed, resolve=True))
    assert (cfg.model.name, cfg.privacy.name, cfg.privacy.target_epsilon) == (
        "gabor",
        "sample_dp",
        8,
    )
    assert (cfg.train.batch_size, cfg.train.lr, cfg.rounds) == (320, 2.0, 15)
