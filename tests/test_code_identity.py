"""The code a run records: its git commit in a checkout, its source digest in a deployment."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from server.registry.publish import code_commit, source_digest

ROOT = Path(__file__).resolve().parent.parent


def _copy_app(to: Path) -> Path:
    """The app's code as a FAB holds it: the packages' sources, no .git."""
    for package in ("fedgov", "server", "clients", "privacy", "strategies", "simulations"):
        shutil.copytree(ROOT / package, to / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", to / "pyproject.toml")
    return to


def test_a_checkout_records_its_commit():
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    commit, _ = code_commit(ROOT)
    assert commit == head and len(commit) == 40


def test_an_installed_app_without_git_records_the_digest_of_its_code(tmp_path):
    app = _copy_app(tmp_path / "app")
    commit, dirty = code_commit(app)
    assert commit is not None and commit.startswith("sha256:") and len(commit) == 7 + 64
    assert dirty is None
    assert commit == source_digest(_copy_app(tmp_path / "same"))  # same code, same digest
    (app / "tests").mkdir()
    (app / "tests" / "test_x.py").write_text("x = 1\n")  # not the app's code
    assert source_digest(app) == commit
    module = app / "server" / "rounds.py"
    module.write_text(module.read_text() + "\n# changed\n")
    assert source_digest(app) != commit
    assert source_digest(tmp_path / "empty") is None


def test_an_app_inside_another_repository_is_not_given_that_repositorys_commit(tmp_path):
    outer = tmp_path / "outer"
    app = _copy_app(outer / "flwr-home" / "apps" / "x")
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(outer),
            "-c",
            "user.name=x",
            "-c",
            "user.email=x@x",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        check=True,
    )
    commit, _ = code_commit(app)
    assert commit == source_digest(app)
