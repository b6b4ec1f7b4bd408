"""Where the fedgov Flower app lives: the project folder ``flwr run`` builds the FAB from."""

from __future__ import annotations

from pathlib import Path

from fedgov.errors import ConfigError


def app_dir() -> Path:
    """The Flower app's directory: the project root holding ``pyproject.toml``."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"flower app: no pyproject.toml in {root} (install fedgov with pip -e)")
    return root
