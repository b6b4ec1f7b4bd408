"""The command lines a person types: help, and one clear line for a mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert lines, result.stdout
    return lines[-1]


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"]])
def test_every_command_has_help(args):
    result = _run("-m", "fedgov", *args)
    assert result.returncode == 0
    assert "usage: fedgov" in result.stdout


def test_simulation_runner_has_help():
    result = _run("-m", "simulations.run", "--help")
    assert result.returncode == 0
    assert "strategy: fedadam, fedavg, fedprox, fedtrimmedavg, krum" in result.stdout


def test_bad_demo_argument_is_one_line():
    result = _run("-m", "fedgov", "demo", "--rounds", "zero")
    assert result.returncode == 2
    assert "argument --rounds: expected a whole number ≥ 1, got 'zero'" in _one_line_error(result)


def test_demo_out_that_is_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _run("-m", "fedgov", "demo", "--out", str(blocker))
    assert result.returncode == 2
    assert _one_line_error(result) == f"fedgov: error: --out: {blocker} exists and is not a folder"


def test_out_of_range_value_names_the_field(tmp_path):
    result = _run("-m", "simulations.run", "rounds=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert _one_line_error(result) == "fedgov: error: rounds: 0 is below its minimum 1"


def test_too_many_natural_sites_names_the_field(tmp_path):
    result = _run(
        "-m",
        "simulations.run",
        "dataset=randhie",
        "federation.num_sites=9",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 2
    line = _one_line_error(result)
    assert line.startswith("fedgov: error: federation.num_sites") and "6" in line


def test_unknown_strategy_lists_the_choices(tmp_path):
    result = _run("-m", "simulations.run", "strategy=fedsgd", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "Could not find 'strategy/fedsgd'" in result.stderr
    for option in ("fedavg", "fedprox", "fedadam", "fedtrimmedavg", "krum"):
        assert option in result.stderr
