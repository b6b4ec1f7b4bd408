"""Crash recovery: a run killed after a round resumes from its checkpoint and ends exactly where
an uninterrupted run with the same seed ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedgov.config import RunConfig
from fedgov.errors import FedgovError
from fedgov.records import load_safetensors
from server.checkpoint import checkpoint_path, load_checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
# FedAdam keeps server-side moments: resuming must restore the strategy's state, not just weights.
RUN = ["dataset=synthetic", "federation.num_sites=3", "strategy=fedadam", "rounds=4", "seed=3"]


def _simulate(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "simulations.run", *RUN, *extra, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    """The uninterrupted run of ``RUN``: the reference of the resumed run, and the finished
    run whose checkpoint a changed config may not resume (one simulation for both tests)."""
    run_dir = tmp_path_factory.mktemp("resume") / "whole"
    whole = _simulate(run_dir)
    assert whole.wait(timeout=600) == 0, whole.stdout.read()
    return run_dir


def test_a_run_killed_after_round_two_resumes_to_the_same_model(tmp_path, whole_run):
    crashed = tmp_path / "crashed"
    victim = _simulate(crashed)
    assert victim.stdout is not None
    for line in victim.stdout:  # the progress line comes after the round's checkpoint
        if line.startswith("[fedgov] round 2/4"):
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (crashed / "metrics.json").exists()
    # The checkpoint holds the last completed round: 2 (3 only on a very slow machine).
    assert checkpoint_path(crashed).is_file()

    resumed = _simulate(crashed, "resume=true")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "[fedgov] resuming" in output
    status = json.loads((crashed / "status.json").read_text())  # counts the rounds before too
    assert (status["rounds_completed"], status["last_round"], status["rounds_planned"]) == (4, 4, 4)

    expected = json.loads((whole_run / "metrics.json").read_text())
    got = json.loads((crashed / "metrics.json").read_text())
    strip = lambda m: [{k: v for k, v in r.items() if k != "seconds"} for r in m["rounds"]]  # noqa: E731
    assert strip(got) == strip(expected)
    assert got["final"] == expected["final"]
    a = load_safetensors(whole_run / "model.safetensors")
    b = load_safetensors(crashed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6)


def test_resume_refuses_a_changed_config_or_a_missing_checkpoint(tmp_path, whole_run):
    with pytest.raises(FedgovError, match="does not exist"):
        load_checkpoint(tmp_path, RunConfig())
    assert checkpoint_path(whole_run).is_file()
    before = {p.name: p.read_bytes() for p in whole_run.iterdir() if p.is_file()}
    changed = _simulate(whole_run, "resume=true", "seed=4")
    output = changed.communicate(timeout=600)[0]
    assert changed.returncode == 2
    assert output.strip().splitlines()[-1] == (
        "fedgov: error: resume: 'seed' was 3 in the interrupted run and is 4 now; a run resumes "
        "only with the config it started with"
    )
    # refused before anything ran: the run's files are as it left them (failure.json says why)
    assert {name: (whole_run / name).read_bytes() for name in before} == before
