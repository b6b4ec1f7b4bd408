"""Shared test setup: Flower and Ray stay offline and quiet; helpers to run simulations."""

from __future__ import annotations

import os

import pytest

for _name, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture
def simulate(tmp_path):
    """Run a simulation from Hydra overrides into a fresh folder; return metrics.json's data."""
    from simulations.run import compose_config, run_from_hydra

    def run(*overrides: str, name: str = "run") -> dict:
        return run_from_hydra(compose_config(["progress=false", *overrides]), tmp_path / name)

    run.root = tmp_path  # type: ignore[attr-defined]
    return run


@pytest.fixture
def processes(tmp_path):
    """Real processes a test starts (tests/processes.py): all stopped when it ends, and the test
    fails if any outlived it."""
    from processes import managed_processes

    with managed_processes(tmp_path / "logs") as group:
        yield group
