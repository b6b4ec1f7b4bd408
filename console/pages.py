"""The data of every console page (each page's JSON twin), from the registry and the runs folder.

:class:`Sources` names the two inputs; each method returns a plain, JSON-safe dict and never
raises on bad input: an unreadable registry or run folder becomes an ``error`` entry with one
clear message. Nothing here writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from console import registry_view
from console.budget import federation_budget
from console.runs import load_run, load_runs, resolve_run_dir
from console.statement import statement_data
from fedgov.errors import FedgovError


class NotFound(FedgovError):
    """The URL names no run, model or version; the message says what exists."""


@dataclass(frozen=True)
class Sources:
    """The registry folder and the folder of run outputs the console shows."""

    registry: Path
    runs_root: Path
    anchor: Path | None = None  # a registry checkpoint kept outside the registry (--anchor)

    # ---- runs ---------------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        try:
            return load_runs(self.runs_root)
        except OSError as error:
            return [
                {
                    "key": ".",
                    "path": str(self.runs_root),
                    "error": f"--runs: {self.runs_root} cannot be read ({error.strerror or error})",
                }
            ]

    def federation(self) -> dict[str, Any]:
        runs = self.runs()
        return json_safe({"runs_root": str(self.runs_root), "budget": federation_budget(runs)})

    def runs_page(self) -> dict[str, Any]:
        return json_safe({"root": str(self.runs_root), "runs": self.runs()})

    def run(self, key: str) -> dict[str, Any]:
        run_dir = resolve_run_dir(self.runs_root, key)
        if run_dir is None:
            raise NotFound(f"no run '{key}' under {self.runs_root} (see /runs)")
        return json_safe(load_run(self.runs_root, run_dir))

    # ---- registry -----------------------------------------------------------------------------
    def models(self, only: tuple[str, int] | None = None) -> dict[str, Any]:
        try:
            registry = registry_view.open_registry(self.registry)
        except registry_view.RegistryUnavailable as error:
            return {"registry": str(self.registry), "error": str(error), "models": []}
        try:
            overview = registry_view.registry_overview(registry, only, self.anchor)
            return json_safe({**overview, "error": None})
        except FedgovError as error:
            return {"registry": str(self.registry), "error": str(error), "models": []}
        finally:
            registry.close()

    def version(self, name: str, version: int) -> dict[str, Any]:
        models = self.models(only=(name, version))
        if models.get("error"):
            raise FedgovError(models["error"])
        model = next((m for m in models["models"] if m["name"] == name), None)
        if model is None:
            raise NotFound(f"model '{name}' is not in the registry (see /models)")
        entry = next((v for v in model["versions"] if v["version"] == version), None)
        if entry is None:
            raise NotFound(f"{name}:{version} does not exist (latest is {model['latest']})")
        run_id = str(entry["lineage"]["run_id"])
        run = next((r for r in self.runs() if not r.get("error") and r["run_id"] == run_id), None)
        return {
            "version": entry,
            "aliases": model["aliases"],
            "audit": models["audit"],
            "run": run["key"] if run else None,
        }

    def statement(self, name: str, version: int) -> dict[str, Any]:
        entry = self.version(name, version)["version"]
        registry = registry_view.open_registry(self.registry)
        try:
            manifest = registry_view.version_manifest(registry, name, version) or {}
        finally:
            registry.close()
        return json_safe(statement_data(entry, manifest, self.runs()))


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN or ∞)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [json_safe(v) for v in value]
    return value
