"""The accountant registry (privacy.accountants): fedgov's own and a researcher's accountant are
named the same way, used by accounting, planning, config checks and the privacy report, and an
unknown name is one line naming the known ones. The researcher's accountant here is
examples/gdp_accountant.py (μ-GDP, stdlib only); its ε is recomputed with Opacus' GDP code."""

from __future__ import annotations

import sys

import pytest
from cli_errors import simulation_error_lines
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from examples.gdp_accountant import GDP, gdp_mu
from fedgov.errors import ConfigError
from privacy.accountants import ACCOUNTANTS, AccountantSpec
from privacy.accounting import epsilon, independent_epsilon, noise_multiplier_for
from privacy.report import report_document, verify_report
from strategies.run_config import load_run_config

DELTA = 1e-5


def _opacus_gdp(sigma: float, rate: float, steps: int, delta: float = DELTA) -> float:
    """Opacus' GaussianAccountant on one (σ, q, steps): the ε it prints for that history."""
    import warnings

    from opacus.accountants import GaussianAccountant

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "GDP accounting is experimental"
        accountant = GaussianAccountant()
    accountant.history = [(sigma, rate, steps)]
    return accountant.get_epsilon(delta)


@pytest.fixture
def gdp_registered():
    """examples.gdp_accountant.GDP registered as ``gdp`` for the test, then removed."""
    ACCOUNTANTS.register("gdp", GDP)
    yield "gdp"
    del ACCOUNTANTS.entries["gdp"]


def test_fedgovs_own_accountants_are_the_registry_and_the_config_checks_it():
    assert ACCOUNTANTS.names() == ("rdp", "prv")
    for name in ACCOUNTANTS:
        assert load_run_config({"privacy.accountant": name}).privacy.accountant == name
        assert ACCOUNTANTS.resolve(name).independent is not None


@pytest.mark.parametrize("where", ["config", "epsilon"])
def test_an_unknown_accountant_is_one_line_naming_the_known_ones(where):
    with pytest.raises(ConfigError) as info:
        if where == "config":
            load_run_config({"privacy.name": "sample_dp", "privacy.accountant": "rpd"})
        else:
            epsilon([(1.0, 0.1, 10)], DELTA, "rpd")
    message = str(info.value)
    assert message.startswith("privacy.accountant: 'rpd' is not one of rdp, prv"), message
    assert message.endswith("did you mean 'rdp'?") and "\n" not in message


@pytest.mark.process
def test_the_cli_refuses_an_unknown_accountant_in_one_line(tmp_path):
    lines = simulation_error_lines(tmp_path, "privacy=sample_dp", "privacy.accountant=gdp")
    assert len(lines) == 1 and lines[0].startswith(
        "fedgov: error: privacy.accountant: 'gdp' is not one of rdp, prv"
    ), lines


@settings(max_examples=25, deadline=None)
@given(
    sigma=st.floats(0.6, 5.0),
    rate=st.floats(0.001, 0.5),
    steps=st.integers(1, 2000),
)
def test_a_registered_accountant_gives_epsilon_as_opacus_gdp_recomputes_it(sigma, rate, steps):
    # Opacus' solver looks for ε in [0, 500]: μ ≤ 8 keeps ε well inside it.
    assume(gdp_mu(((sigma, rate, steps),)) <= 8)
    ACCOUNTANTS.register("gdp", GDP)
    try:
        spent = epsilon([(sigma, rate, steps)], DELTA, "gdp")
        assert spent == pytest.approx(_opacus_gdp(sigma, rate, steps), rel=1e-6, abs=1e-9)
        assert independent_epsilon([(sigma, rate, steps)], DELTA, "gdp") == pytest.approx(
            spent, rel=1e-6, abs=1e-9
        )
    finally:
        del ACCOUNTANTS.entries["gdp"]


def test_a_registered_accountant_plans_sigma_and_its_config_and_target_are_accepted(
    gdp_registered,
):
    rate, steps = 0.05, 400
    sigma = noise_multiplier_for(2.0, DELTA, rate, steps, gdp_registered)
    # The plan spends at most the target, within 0.5%, by Opacus' own GDP code.
    assert 0.995 * 2.0 <= _opacus_gdp(sigma, rate, steps) <= 2.0 * (1 + 1e-9)
    # ... and differs from the RDP plan: the registered accountant is the one used.
    assert sigma != pytest.approx(noise_multiplier_for(2.0, DELTA, rate, steps, "rdp"), rel=0.01)
    cfg = load_run_config({"privacy.name": "sample_dp", "privacy.accountant": gdp_registered})
    assert cfg.privacy.accountant == "gdp"
    # The _target_ way needs no registration.
    target = "examples.gdp_accountant.GDP"
    assert load_run_config({"privacy.accountant": target}).privacy.accountant == target
    assert epsilon([(sigma, rate, steps)], DELTA, target) == epsilon(
        [(sigma, rate, steps)], DELTA, "gdp"
    )


def test_an_opacus_accountant_class_is_a_target_and_a_wrong_object_is_one_line():
    history = [(1.1, 0.02, 300)]
    via_class = epsilon(history, DELTA, "opacus.accountants.RDPAccountant")
    assert via_class == pytest.approx(epsilon(history, DELTA, "rdp"), rel=1e-12)
    with pytest.raises(ConfigError) as info:
        load_run_config({"privacy.accountant": "examples.gdp_accountant.gdp_mu"})
    message = str(info.value)
    assert message.startswith("accountant._target_: <function gdp_mu"), message
    assert "neither an AccountantSpec nor an Opacus accountant class" in message
    assert "\n" not in message


def _site_level_document(accountant: str) -> dict:
    rounds = [
        {
            "round": r,
            "sampled": 4,
            "contributed": 4,
            "sample_rate": 0.4,
            "noise_multiplier": 1.5,
            "aborted": False,
            "note": "",
        }
        for r in (1, 2, 3)
    ]
    return report_document(
        run_id="run-1",
        rounds=3,
        delta=DELTA,
        accountant=accountant,
        secure_aggregation=False,
        sample_level=None,
        site_level={
            "clipping_norm": 1.0,
            "noise_multiplier": 1.5,
            "sampling": "poisson",
            "rounds": rounds,
        },
    )


def test_the_report_uses_a_registered_accountant_and_rechecks_it_independently(gdp_registered):
    document = _site_level_document(gdp_registered)
    site_level = document["site_level"]
    assert site_level["accountant"] == "gdp"
    assert site_level["epsilon"] == pytest.approx(_opacus_gdp(1.5, 0.4, 3), rel=1e-6)
    verification = document["verification"]
    assert verification["ok"] and verification["site_level_verified"], verification
    assert verification["independent_accountant"] == GDP.independent_name
    # A tampered ε is caught by the replay.
    document["site_level"]["epsilon"] *= 1.1
    assert not verify_report(document)["ok"]


def test_an_accountant_without_an_independent_method_is_replayed_only(monkeypatch):
    replay_only = AccountantSpec(epsilon=GDP.epsilon)
    monkeypatch.setitem(ACCOUNTANTS.entries, "gdp_plain", replay_only)
    verification = _site_level_document("gdp_plain")["verification"]
    assert verification["ok"] and verification["max_relative_difference"] == 0.0
    assert "registers no independent method" in verification["independent_accountant"]
    with pytest.raises(ValueError, match="no independent recomputation"):
        independent_epsilon([(1.0, 0.1, 1)], DELTA, "gdp_plain")


def test_a_report_cannot_make_the_verifier_import_its_accountant(tmp_path, monkeypatch):
    """The adversary wrote the report: its accountant is a module that acts on import. The
    verifier re-checks only registered accountants, imports nothing, and says so."""
    (tmp_path / "evilacct.py").write_text(
        f"open({str(tmp_path / 'ran')!r}, 'w').write('imported')\n"
        "from examples.gdp_accountant import GDP\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ACCOUNTANTS.register("gdp", GDP)
    try:
        document = _site_level_document("gdp")
    finally:
        del ACCOUNTANTS.entries["gdp"]
    document["accountant"] = "evilacct.GDP"
    verification = verify_report(document)
    assert not verification["ok"] and verification["site_level_verified"] is False
    assert verification["problems"] == [
        "accountant 'evilacct.GDP' is not registered here (known: rdp, prv); its ε values were "
        "not re-checked"
    ]
    assert not (tmp_path / "ran").exists() and "evilacct" not in sys.modules


@pytest.mark.ray
def test_a_target_accountant_plans_and_accounts_a_real_dp_run(simulate):
    """``privacy.accountant=examples.gdp_accountant.GDP`` through the real simulation: each
    site plans σ for the target ε with it and signs that ε into its receipts; Opacus' GDP code
    recomputes every site's ε from the (σ, q, steps) it reports, and the run's report re-checks
    it independently."""
    import json

    simulate(
        "dataset._target_=examples.clinics.load_clinics",
        "model._target_=examples.tiny_mlp.TinyMLP",
        "+model.width=4",
        "rounds=2",
        "privacy=sample_dp",
        "privacy.accountant=examples.gdp_accountant.GDP",
        "privacy.target_epsilon=3.0",
        "train.batch_size=16",
        name="gdp",
    )
    report = json.loads((simulate.root / "gdp" / "privacy_report.json").read_text())
    assert report["accountant"] == "examples.gdp_accountant.GDP"
    sites = report["sample_level"]["sites"]
    assert sorted(sites) == ["east", "north", "south"]
    for site in sites.values():
        (sigma, rate, steps), *later = site["history"]  # two equal rounds: one merged entry
        assert later == [] and sigma > 0 and 0 < rate < 1 and steps >= 2
        by_opacus = _opacus_gdp(sigma, rate, steps)
        assert site["epsilon"] == pytest.approx(by_opacus, rel=1e-6)
        assert 0.99 * 3.0 <= by_opacus <= 3.0 * (1 + 1e-9)  # planned for the target with GDP
    verification = report["verification"]
    assert verification["ok"], verification["problems"]
    assert verification["independent_accountant"] == GDP.independent_name
