"""SecAgg+ on Flower's simulation engine (Ray): the same model as a plain run of the same seed."""

from __future__ import annotations

import numpy as np
import pytest

from fedgov.records import load_safetensors

pytestmark = pytest.mark.slow
FEDERATION = ["dataset=synthetic", "federation.num_sites=3", "rounds=2", "seed=4"]


def test_secure_and_plain_runs_on_ray_give_the_same_model_within_the_quantisation_step(simulate):
    plain = simulate(*FEDERATION, "secagg=off", name="plain")
    secure = simulate(*FEDERATION, "secagg=secaggplus", name="secure")
    assert secure["config"]["secagg.name"] == "secaggplus"
    # the engine played governance: a signed roster and an anchor at every simulated site
    assert secure["config"]["secagg.roster"].endswith("secagg_roster.json")
    for site_id in ("site-00", "site-01", "site-02"):
        assert (simulate.root / "secure" / "sites" / site_id / "secagg_anchor.json").exists()
    for off, on in zip(plain["rounds"], secure["rounds"], strict=True):
        assert on["participants"] == off["participants"] == ["site-00", "site-01", "site-02"]
        assert not on["aborted"] and on["dropouts"] == {} and on["secagg"]["clipped_values"] == 0
        assert on["secagg"]["threshold"] == 2 and on["secagg"]["neighbours"] == 2
        assert on["train_loss"] == pytest.approx(off["train_loss"], rel=1e-6)
        assert on["central_eval_accuracy"] == pytest.approx(off["central_eval_accuracy"], abs=1e-9)
    # round 2's key stages rode on round 1's exchanges: the Ray actors' contexts held both rounds
    assert [r["secagg"]["pipelined_stages"] for r in secure["rounds"]] == [
        [],
        ["setup", "share_keys"],
    ]
    first, second = (
        load_safetensors(simulate.root / name / "model.safetensors") for name in ("plain", "secure")
    )
    bounds = sum(r["secagg"]["quantisation_error_bound"] for r in secure["rounds"])
    assert 0 < bounds < 1e-8
    for name, weights in first.items():
        difference = np.abs(weights - second[name]).max()
        # the quantisation error, plus the plain FedAvg's own float32 sums (a few ulps a round)
        tolerance = bounds + len(secure["rounds"]) * 4 * np.spacing(np.abs(weights).max())
        assert difference <= tolerance, (name, difference, tolerance)
    assert any(not np.array_equal(first[n], second[n]) for n in first)  # really another path
