"""Run ``python -m simulations.run`` with a user's mistake and read its one error line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def simulation_error_lines(run_dir: Path, *overrides: str) -> list[str]:
    """The ``fedgov: error:`` lines of a refused ``simulations.run`` (exit 2, no traceback)."""
    result = subprocess.run(
        [sys.executable, "-m", "simulations.run", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("fedgov: error:")]
