"""The import layers of ``.importlinter`` (README: Layout), checked with import-linter in this
process: the source tree keeps them, and the same contracts, applied to a small tree of the same
packages, break on an upward import (inside a function too) and on torch in a light module."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / ".importlinter"
PREFIX = "fx_"  # the fixture tree's packages: fx_fedgov, fx_fedgov_cli, ... (the real ones are
# already imported here, and grimp finds an imported package where it was imported from)


def _root_packages() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    return parser["importlinter"]["root_packages"].split()


def _lint(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    return code, capsys.readouterr().out


def test_the_source_tree_keeps_its_layers(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code, out = _lint(CONFIG, capsys)
    assert code == 0, out
    assert "2 kept, 0 broken" in out


def test_the_only_exception_is_python_m_fedgov_and_nothing_imports_it():
    """``.importlinter`` ignores one import, ``python -m fedgov``'s door to the CLI, and that
    module is a program only: no module imports it. The core's config resolves no plug-in of
    the layers above it (strategy, partitioner, accountant: ``strategies.run_config`` does)."""
    import grimp

    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    ignored = [
        line.split("#")[0].strip()
        for section in parser.sections()
        for line in parser[section].get("ignore_imports", "").splitlines()
        if line.split("#")[0].strip()
    ]
    assert ignored == ["fedgov.__main__ -> fedgov_cli.main"]
    graph = grimp.build_graph(*_root_packages(), cache_dir=None)
    assert graph.find_modules_that_directly_import("fedgov.__main__") == set()
    core_imports = {
        imported
        for module in graph.find_descendants("fedgov") | {"fedgov"}
        if module != "fedgov.__main__"
        for imported in graph.find_modules_directly_imported_by(module)
    }
    above = [
        m
        for m in core_imports
        if m.split(".")[0] in _root_packages() and m.split(".")[0] != "fedgov"
    ]
    assert above == []
    assert graph.find_modules_that_directly_import("strategies.run_config") >= {
        "server.app",
        "clients.app",
        "simulations.engine",
    }


@pytest.fixture
def fixture_tree(tmp_path, monkeypatch):
    """The real contracts, with every root package renamed ``fx_...``, over a tree that holds each
    package and each module the contracts name (all empty, but ``__main__``'s allowed import).
    Returns a function that writes one module and lints the tree."""
    packages = _root_packages()
    names = re.compile(r"\b(" + "|".join(map(re.escape, packages)) + r")\b")
    config = tmp_path / ".importlinter"
    config.write_text(names.sub(lambda m: PREFIX + m[1], CONFIG.read_text()))
    for package in packages:
        (tmp_path / (PREFIX + package)).mkdir()
        (tmp_path / (PREFIX + package) / "__init__.py").write_text("")
    parser = configparser.ConfigParser()
    parser.read(config)
    named = {
        module
        for section in parser.sections()
        for key in ("source_modules", "ignore_imports")
        for line in parser[section].get(key, "").splitlines()
        for module in re.findall(r"[\w.]+", line.split("#")[0])
        if module.startswith(PREFIX)
    }
    for module in named:
        path = tmp_path.joinpath(*module.split(".")).with_suffix(".py")
        if not path.exists():
            path.write_text("")
    (tmp_path / f"{PREFIX}fedgov" / "__main__.py").write_text(f"import {PREFIX}fedgov_cli.main\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def lint_with(module: str, source: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
        path = tmp_path.joinpath(*module.split(".")).with_suffix(".py")
        path.write_text(source)
        return _lint(config, capsys)

    return lint_with


def test_the_contracts_hold_on_a_tree_that_keeps_the_layers(fixture_tree, capsys):
    code, out = fixture_tree(
        "fx_simulations.engine",
        "from fx_clients import site_data\nfrom fx_fedgov_data import federation\n",
        capsys,
    )
    assert code == 0, out


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        # the data splitting imported from the simulation by a deployed site (as it was)
        (
            "fx_clients.site_data",
            "from fx_simulations.federation import simulated_federation\n",
            "fx_clients.site_data -> fx_simulations",
        ),
        # the core reaching up into the CLI from inside a function (as fedgov/cli*.py did)
        (
            "fx_fedgov.config",
            "def schema():\n    from fx_fedgov_cli import deploy\n",
            "fx_fedgov.config -> fx_fedgov_cli",
        ),
        # two packages of one layer: the coordinator importing a site's module
        (
            "fx_server.app",
            "import fx_clients.connector\n",
            "fx_server.app -> fx_clients",
        ),
        # the privacy ledger loading torch and Flower for an atomic write (as it did)
        (
            "fx_privacy.ledger",
            "def write():\n    import torch\n",
            "fx_privacy.ledger is not allowed to import torch",
        ),
    ],
)
def test_an_import_against_the_layers_breaks_the_contracts(
    fixture_tree, capsys, module, source, broken
):
    code, out = fixture_tree(module, source, capsys)
    assert code == 1
    assert broken in " ".join(out.split())
    assert "1 kept, 1 broken" in out
