"""Shared test setup: Flower and Ray stay offline and quiet; helpers to run simulations; test tiers.

**Test tiers.** Markers (registered in pyproject.toml) say what a test needs beyond this process:
``process`` (real SuperLink/SuperNode/server processes or subprocesses of fedgov), ``ray`` (a Ray
simulation), ``external`` (PostgreSQL, Chromium). Each of them implies ``slow``. They are applied
here, centrally, from the tables below (by module, by test, by the fixtures a test uses), so a new
test in an existing module inherits its module's tier. ``make test-fast`` deselects all four;
``make test`` (CI) runs everything.

A test outside every heavy tier that starts such a process anyway is failed at teardown, naming
the command it started (an audit hook watches ``subprocess.Popen``): the fast tier stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fedgov.deploy import FLOWER_ENVIRONMENT

for _name, _value in FLOWER_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)

HEAVY_TIERS = ("process", "ray", "external")

#: module → tiers of every test in it (and of every test added to it later).
MODULE_TIERS: dict[str, tuple[str, ...]] = {
    "test_cli": ("process",),  # `python -m fedgov ...` per test
    "test_crash_recovery": ("process",),
    "test_deployment": ("process",),
    "test_federation_tls": ("process",),
    "test_secagg_deployment": ("process",),
    "test_resume": ("process", "ray"),  # `python -m simulations.run` subprocesses
    "test_simulation": ("ray",),
    "test_secagg_simulation": ("ray",),
    "test_serving": ("process", "ray"),  # module fixtures: a Ray run, then `fedgov serve`
    "test_registry_demo": ("process", "ray"),  # the demo's Ray run, then `fedgov serve`
    "test_registry_postgres": ("external",),  # a throwaway PostgreSQL server
    "test_engine_failures": ("ray",),
    # modules of the other branches of this round of work (real processes or fedgov subprocesses
    # from module fixtures or helpers, which the fixture table below cannot see)
    "test_malicious_coordinator": ("process",),
    "test_registry_insiders": ("process",),
    "test_serving_abuse": ("process",),
    "test_console": ("process", "ray"),
    "test_federation_own_data": ("process",),
    "test_control_api_lockdown": ("process",),
    "test_coordinator_admin": ("process",),
    "test_process_guard": ("process",),
    "test_process_lifetime": ("process",),
}

#: module::test (parametrisations included) → tiers, for modules that are otherwise fast.
TEST_TIERS: dict[str, tuple[str, ...]] = {
    "test_deploy_settings::test_site_budget_reads_the_ledger_and_recomputes_epsilon": ("process",),
    "test_privacy_report::test_cli_prints_every_format_and_fails_a_tampered_report": ("process",),
    "test_privacy_report::test_cli_errors_are_one_line": ("process",),
    "test_privacy_report::test_headless_chromium_renders_the_report_with_its_plot": ("external",),
    "test_privacy_simulation::test_a_config_error_stops_the_runner_in_one_line": ("process",),
    "test_privacy_site::test_a_site_killed_mid_round_keeps_every_spend_after_restart": ("process",),
    "test_registry::test_concurrent_publishers_get_distinct_versions_and_nothing_is_corrupted": (
        "process",
    ),
    "test_registry::test_mistakes_are_one_line_without_a_traceback": ("process",),
    "test_registry_postgres::test_concurrent_publishers_on_postgresql": ("process",),
    "test_simulation::test_multirun_sweep_writes_one_run_per_combination": ("process",),
    "test_site_status::test_status_imports_nothing_heavy": ("process",),  # issue 16b's branch
    "test_tiers::test_the_fast_tier_leaves_out_exactly_the_heavy_tests_of_real_modules": (
        "process",
    ),
    "test_tiers::test_a_fast_test_that_starts_a_python_process_fails_naming_the_command": (
        "process",
    ),
}

#: module::test → slow only: property tests that take the longest of the fast tier (measured with
#: --durations: 25-65 s each on a loaded 2-core machine, most of the fast tier's time there).
SLOW_TESTS = {
    "test_privacy_maths::test_prv_epsilon_matches_a_pld_accountant_within_one_percent",
    "test_privacy_maths::test_noise_for_a_target_spends_at_most_the_target",
    "test_privacy_maths::test_rdp_epsilon_matches_numerical_integration_within_one_percent",
    "test_privacy_maths::test_epsilon_grows_with_steps_and_falls_with_noise",
    "test_privacy_site::test_a_ledger_never_lets_epsilon_pass_its_cap",
}

#: fixture → tiers of every test that uses it, directly or through another fixture.
FIXTURE_TIERS: dict[str, tuple[str, ...]] = {
    "processes": ("process",),  # tests/processes.py: real processes on 127.0.0.1
    "simulate": ("ray",),  # a Flower simulation on Ray, in this process
    "warm_zygote": ("process",),  # clients/zygote.py's process (tests/test_site_runtime.py)
    "probe_dir": ("process",),  # the zygote's probe tasks (tests/test_site_runtime.py)
    "postgres_url": ("external",),
}

#: module → per-test timeout in seconds where the default (pyproject.toml) is too short.
MODULE_TIMEOUTS: dict[str, float] = {
    "test_crash_recovery": 1800,  # two whole deployed runs of up to 400 s each, plus starts
}


def _name(item: pytest.Item) -> str:
    """The test function's name, without a parametrisation's ``[...]``."""
    return getattr(item, "originalname", None) or item.name.partition("[")[0]


def tiers_of(item: pytest.Item) -> set[str]:
    """The heavy tiers ``item`` belongs to, from the tables above and its own markers."""
    module = Path(str(item.fspath)).stem
    tiers = set(MODULE_TIERS.get(module, ()))
    tiers.update(TEST_TIERS.get(f"{module}::{_name(item)}", ()))
    for fixture in getattr(item, "fixturenames", ()):
        tiers.update(FIXTURE_TIERS.get(fixture, ()))
    tiers.update(tier for tier in HEAVY_TIERS if item.get_closest_marker(tier))
    return tiers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add the tier markers (and ``slow`` with any of them) to every collected test."""
    for item in items:
        tiers = tiers_of(item)
        for tier in sorted(tiers):
            item.add_marker(getattr(pytest.mark, tier))
        slow = f"{Path(str(item.fspath)).stem}::{_name(item)}" in SLOW_TESTS
        if (tiers or slow) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
        timeout = MODULE_TIMEOUTS.get(Path(str(item.fspath)).stem)
        if timeout and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(timeout))


# ---- the fast tier's guard: no heavy process from a test outside the heavy tiers -----------

_watch: dict[str, list[str] | None] = {"started": None}  # None: the running test may start any
_FLOWER_COMMANDS = ("fedgov", "flwr", "flower-")
_EXTERNAL_COMMANDS = {"initdb", "pg_ctl", "postgres", "chromium", "chromium-browser"}


def _argv(args: object) -> list[str]:
    if isinstance(args, (str, bytes, os.PathLike)):
        return [os.fsdecode(args)]
    return [os.fsdecode(arg) if isinstance(arg, (bytes, os.PathLike)) else str(arg) for arg in args]  # type: ignore[union-attr]


def heavy_command(executable: object, args: object) -> bool:
    """Whether a ``subprocess.Popen(args, executable=executable)`` starts what only a heavy tier
    may start: a Python interpreter running code (``-c pass`` is not), a fedgov or Flower
    command, Ray's own processes, PostgreSQL or Chromium."""
    argv = _argv(args) if args is not None else []
    program = os.fsdecode(executable) if executable is not None else (argv[0] if argv else "")
    base = Path(program).name
    if f"{os.sep}ray{os.sep}" in program or any(f"{os.sep}ray{os.sep}" in arg for arg in argv):
        return True
    if base in _EXTERNAL_COMMANDS or base.startswith(_FLOWER_COMMANDS):
        return True
    if any(Path(arg).name in _EXTERNAL_COMMANDS for arg in argv):  # runuser -u postgres -- initdb
        return True
    if base.startswith("python") or program == sys.executable:
        return not (argv[1:2] == ["-c"] and "import" not in " ".join(argv[2:3]))
    return False


def _audit(event: str, args: tuple) -> None:
    started = _watch["started"]
    if event == "subprocess.Popen" and started is not None and heavy_command(args[0], args[1]):
        started.append(" ".join(_argv(args[1]))[:200])


sys.addaudithook(_audit)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Watch what a fast-tier test starts, from its fixtures' setup on."""
    _watch["started"] = None if tiers_of(item) else []


@pytest.fixture(autouse=True)
def _fast_tier_starts_nothing_heavy(request):
    """Fail a test outside the heavy tiers that started a heavy process (see the module doc)."""
    yield
    started, _watch["started"] = _watch["started"], None
    if started:
        pytest.fail(
            f"{request.node.nodeid} started {started[0]!r} ({len(started)} heavy process(es)) "
            "but is in no heavy tier: add it to MODULE_TIERS / TEST_TIERS / FIXTURE_TIERS in "
            "tests/conftest.py or mark it process, ray or external",
            pytrace=False,
        )


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
