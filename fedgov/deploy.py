"""Small shared pieces of the deployment commands: YAML settings files and Flower's tools."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from fedgov.errors import ConfigError

#: Set for every Flower process fedgov starts and every run it simulates (the one definition:
#: the simulation engine, the tests and the benchmarks use it): no telemetry, no update check,
#: no `uv sync`, no Ray usage statistics.
FLOWER_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """The environment of a Flower process fedgov starts: offline, quiet, this venv's tools."""
    env = dict(os.environ)
    # Set, these make Flower also start legacy gRPC APIs on 0.0.0.0 default ports.
    env.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)
    env.pop("FLWR_INTERNAL_GRPC_FLEET_API", None)
    env.update(FLOWER_ENVIRONMENT)
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONUNBUFFERED"] = "1"
    # SuperLink and SuperNode start flower-superexec, flwr-serverapp and flwr-clientapp by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def flower_tool(name: str) -> str:
    """The path of a Flower command installed beside this interpreter (or just its name)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing or malformed file raises one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what}: {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} must hold a mapping of keys to values")
    return data


def toml_value(value: bool | int | float | str) -> str:
    """A run-config value as Flower's ``--run-config`` parses it (TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def write_file(path: Path, payload: bytes, private: bool) -> None:
    """Write ``payload``; ``private`` files (keys) get mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(payload)
