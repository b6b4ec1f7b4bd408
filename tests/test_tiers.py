"""The test tiers of tests/conftest.py: what counts as heavy, and that the guard and the tables
act on real collections (``make test-fast`` deselects every heavy tier)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import HEAVY_TIERS, heavy_command

ROOT = Path(__file__).resolve().parent.parent
FAST = "not slow and not process and not ray and not external"


@pytest.mark.parametrize(
    ("argv", "heavy"),
    [
        ([sys.executable, "-m", "fedgov", "--help"], True),
        ([sys.executable, "tests/privacy_site_worker.py", "1"], True),
        ([sys.executable, "-c", "import fedgov"], True),
        ([sys.executable, "-c", "pass"], False),  # a pid that is surely dead, nothing more
        (["/usr/lib/python3/site-packages/ray/core/src/ray/gcs/gcs_server", "--port=0"], True),
        (["/venv/bin/flower-superlink", "--insecure"], True),
        (["/venv/bin/flwr", "run", "."], True),
        (["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/17/bin/initdb", "-D", "x"], True),
        (["/usr/bin/chromium", "--headless"], True),
        (["openssl", "verify", "-CAfile", "ca.pem", "server.pem"], False),
        ("git status", False),
    ],
)
def test_heavy_commands_are_told_from_light_ones(argv, heavy):
    assert heavy_command(None, argv) is heavy


def _collect(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_fast_tier_leaves_out_exactly_the_heavy_tests_of_real_modules():
    files = ["tests/test_registry.py", "tests/test_simulation.py", "tests/test_privacy_report.py"]
    everything = _collect("--collect-only", *files)
    fast = _collect("--collect-only", "-m", FAST, *files)
    assert everything.returncode == 0 and fast.returncode == 0, everything.stdout + fast.stdout
    ids = {line for line in everything.stdout.splitlines() if "::" in line}
    kept = {line for line in fast.stdout.splitlines() if "::" in line}
    left_out = ids - kept
    assert kept < ids
    assert not any("test_simulation.py" in test for test in kept)  # a Ray module, whole
    assert {test.split("::")[1].partition("[")[0] for test in left_out if "registry" in test} == {
        "test_concurrent_publishers_get_distinct_versions_and_nothing_is_corrupted",
        "test_mistakes_are_one_line_without_a_traceback",
    }
    assert {test.split("::")[1] for test in left_out if "privacy_report" in test} == {
        "test_cli_prints_every_format_and_fails_a_tampered_report",
        "test_cli_errors_are_one_line",
        "test_headless_chromium_renders_the_report_with_its_plot",
    }
    heavy = " or ".join(HEAVY_TIERS)  # every heavy test is also slow: none is left here
    assert _collect("--collect-only", "-m", f"({heavy}) and not slow", *files).returncode == 5


def test_a_fast_test_that_starts_a_python_process_fails_naming_the_command(tmp_path):
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    slow\n    process\n    ray\n    external\n"
    )
    (tmp_path / "test_sample.py").write_text(
        textwrap.dedent(
            """
            import subprocess, sys
            import pytest

            def _start():
                subprocess.run([sys.executable, "-c", "import sys; sys.exit(0)"], check=True)

            def test_unmarked_starts_python():
                _start()

            @pytest.mark.process
            def test_marked_starts_python():
                _start()

            def test_light_command():
                subprocess.run([sys.executable, "-c", "pass"], check=True)
            """
        )
    )
    result = _collect("-rA", "-p", "no:timeout", cwd=tmp_path)
    report = result.stdout
    assert result.returncode == 1, report
    failed = [line for line in report.splitlines() if line.startswith(("ERROR ", "FAILED "))]
    assert len(failed) == 1 and "test_unmarked_starts_python" in failed[0], report
    assert "is in no heavy tier" in report and "import sys; sys.exit(0)" in report
    # `make test-fast`'s selection leaves the marked one out and keeps the light one.
    fast = _collect("--collect-only", "-m", FAST, cwd=tmp_path)
    assert "test_marked_starts_python" not in fast.stdout
    assert "test_light_command" in fast.stdout and "test_unmarked_starts_python" in fast.stdout
