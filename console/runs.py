"""Run folders as the console sees them: found under ``--runs DIR``, read, and re-verified.

Pure functions of the files (nothing is written). A run folder is any folder (up to
:data:`MAX_DEPTH` levels under the runs root) holding ``metrics.json`` or
``privacy_report.json``. Its privacy report is re-verified from its own content with
:func:`privacy.report.verify_report` (the ``verification`` stored in the file is not trusted),
and each receipt is marked verified or failed: a failed receipt is shown, never used.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from privacy.receipts import Receipt, fingerprint
from privacy.report import verify_report

METRICS_FILE = "metrics.json"
REPORT_FILE = "privacy_report.json"
#: the run's files the console links to (and serves, read-only), by name
REPORT_FILES = (
    "privacy_report.html",
    "privacy_report.json",
    "metrics.json",
    "plots/accuracy.png",
    "plots/loss.png",
    "plots/participation.png",
)
MAX_DEPTH = 3
#: the key engineer 11's reports carry for the neighbouring relation (shown only when present)
NEIGHBOURING_KEYS = ("neighbouring_relation", "neighboring_relation", "neighbouring")

#: run folder → (its files' fingerprint, its loaded data); one entry per folder
_cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
_loading = threading.Lock()  # one verification at a time: concurrent first loads share it


def find_run_dirs(root: Path) -> list[Path]:
    """Every run folder under ``root`` (``root`` itself included), sorted by path."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            if depth == 0:
                raise
            found.append(folder)  # unreadable: listed, with its error, by load_run
            return
        names = {e.name for e in entries}
        if METRICS_FILE in names or REPORT_FILE in names:
            found.append(folder)
        if depth >= MAX_DEPTH:
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                if entry.name in ("plots", "sites", "keys", "registry", "artifacts"):
                    continue
                walk(Path(entry.path), depth + 1)

    walk(root, 0)
    return sorted(found)


def run_key(root: Path, run_dir: Path) -> str:
    """The run's stable id in URLs: its path under the runs root (``.`` for the root itself)."""
    relative = run_dir.relative_to(root).as_posix()
    return relative or "."


def load_run(root: Path, run_dir: Path) -> dict[str, Any]:
    """The run's data for the console (cached while its files are unchanged).

    Never raises on bad input: an unreadable or malformed file gives ``{"error": "..."}``.
    """
    stamp = _stamp(run_dir)
    cached = _cache.get(str(run_dir))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    with _loading:
        cached = _cache.get(str(run_dir))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            data = _load(root, run_dir)
        except Exception as error:  # malformed input: one clear message, never a crash
            data = {
                "key": run_key(root, run_dir),
                "path": str(run_dir),
                "error": _one_line(error, run_dir),
            }
        _cache[str(run_dir)] = (stamp, data)
    return data


def _stamp(run_dir: Path) -> tuple[int, int]:
    """A fingerprint of the run's files: summed mtimes (ns) and sizes."""
    mtime = size = 0
    for name in (METRICS_FILE, REPORT_FILE):
        try:
            stat = (run_dir / name).stat()
        except OSError:
            continue
        mtime += stat.st_mtime_ns
        size += stat.st_size
    return mtime, size


def _one_line(error: Exception, run_dir: Path) -> str:
    if isinstance(error, PermissionError):
        return f"{run_dir}: cannot be read (permission denied)"
    if isinstance(error, json.JSONDecodeError):
        return f"{run_dir}: a file is not valid JSON (line {error.lineno}: {error.msg})"
    if isinstance(error, OSError):
        return f"{run_dir}: cannot be read ({error.strerror or error})"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{run_dir}: malformed run files ({type(error).__name__}: {text})"


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _load(root: Path, run_dir: Path) -> dict[str, Any]:
    metrics = _read_json(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).exists() else None
    report = _read_json(run_dir / REPORT_FILE) if (run_dir / REPORT_FILE).exists() else None
    if metrics is not None and not isinstance(metrics, dict):
        raise ValueError(f"{METRICS_FILE} is not a JSON object")
    if report is not None and not isinstance(report, dict):
        raise ValueError(f"{REPORT_FILE} is not a JSON object")
    config = (metrics or {}).get("config") or {}
    run_id = str((report or {}).get("run_id") or config.get("run_id") or run_dir.name)
    finished = (report or {}).get("generated_at") or _mtime_iso(run_dir / METRICS_FILE)
    data: dict[str, Any] = {
        "key": run_key(root, run_dir),
        "path": str(run_dir),
        "run_id": run_id,
        "finished_at": finished,
        "error": None,
        "config": _config_summary(config),
        "rounds_planned": config.get("rounds"),
        "rounds": [_round(r) for r in (metrics or {}).get("rounds", [])],
        "final": dict((metrics or {}).get("final") or {}),
        "wall_seconds": (metrics or {}).get("wall_seconds"),
        "sites": dict((metrics or {}).get("sites") or {}),
        "files": [name for name in REPORT_FILES if (run_dir / name).is_file()],
        "privacy": privacy_view(report) if report is not None else None,
    }
    data["participation"] = participation(data)
    return data


def _mtime_iso(path: Path) -> str | None:
    import time

    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))
    except OSError:
        return None


def _config_summary(config: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "dataset.name",
        "model.name",
        "strategy.name",
        "privacy.name",
        "secagg.name",
        "privacy.site_epsilon_cap",
        "privacy.target_epsilon",
    )
    return {k: config[k] for k in keep if k in config}


def _round(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "round": int(record["round"]),
        "participants": list(record.get("participants") or []),
        "declined": dict(record.get("decline_reasons") or {})
        or {s: "" for s in record.get("declined") or []},
        "failures": dict(record.get("failures") or {}),
        "dropouts": {
            site: "; ".join(f"{k}: {v}" for k, v in (info or {}).items())
            if isinstance(info, dict)
            else str(info)
            for site, info in (record.get("dropouts") or {}).items()
        },
        "aborted": bool(record.get("aborted")),
        "abort_reason": record.get("abort_reason"),
        "train_loss": record.get("train_loss"),
        "eval_accuracy": record.get("eval_accuracy"),
        "central_eval_accuracy": record.get("central_eval_accuracy"),
    }


def participation(run: dict[str, Any]) -> dict[str, dict[str, dict[str, str]]]:
    """site → round → {"status": trained|declined|refused|dropped|not asked, "reason"}.

    ``declined``: the site said no (its budget, its data); ``refused``: it answered with an error
    or not before the timeout; ``dropped``: its masked input is not in the secure sum.
    """
    sites: set[str] = set(run["sites"])
    for r in run["rounds"]:
        sites |= set(r["participants"]) | set(r["declined"]) | set(r["failures"])
        sites |= set(r["dropouts"])
    if run.get("privacy") and run["privacy"].get("sample_level"):
        sites |= set(run["privacy"]["sample_level"]["sites"])
    matrix: dict[str, dict[str, dict[str, str]]] = {site: {} for site in sorted(sites)}
    for r in run["rounds"]:
        key = str(r["round"])
        for site in matrix:
            if site in r["dropouts"]:
                cell = {"status": "dropped", "reason": r["dropouts"][site]}
            elif site in r["participants"]:
                cell = {"status": "trained", "reason": ""}
            elif site in r["declined"]:
                cell = {"status": "declined", "reason": r["declined"][site]}
            elif site in r["failures"]:
                cell = {"status": "refused", "reason": r["failures"][site]}
            else:
                cell = {"status": "not asked", "reason": ""}
            matrix[site][key] = cell
    return matrix


def privacy_view(report: dict[str, Any]) -> dict[str, Any]:
    """The report's guarantees and every receipt, each re-verified (never trusting the file)."""
    verification = verify_report(report)
    problems = list(verification["problems"])
    sample = report.get("sample_level")
    sites: dict[str, Any] = {}
    if sample:
        for site_id, site in sample["sites"].items():
            # a site-wide problem (several keys, a receipt not matching the update) fails every
            # receipt of the site; a wrong summary ε does not make the signed receipts wrong
            site_wide = [
                p for p in problems if p.startswith(f"{site_id}:") and "reported ε" not in p
            ]
            receipts = []
            raw = list(site.get("receipts") or []) + list(site.get("decline_receipts") or [])
            for data in raw:
                receipts.append(_receipt(site_id, data, problems, site_wide))
            receipts.sort(key=lambda r: (r["round"] or 0, r["kind"] != "dp-sgd"))
            sites[site_id] = {
                "epsilon": site.get("epsilon"),
                "cap": site.get("cap"),
                "delta": site.get("delta", report.get("delta")),
                "epsilon_this_run": site.get("epsilon_this_run"),
                "declined_rounds": list(site.get("declined_rounds") or []),
                "decline_reasons": dict(site.get("decline_reasons") or {}),
                "verified": bool(verification["sites_verified"].get(site_id)),
                "receipts": receipts,
            }
    site_level = report.get("site_level")
    guarantees = {
        "sample_level": bool(sample),
        "site_level": bool(site_level),
        "delta": report.get("delta"),
        "accountant": report.get("accountant"),
        "secure_aggregation": report.get("secure_aggregation"),
        "site_level_epsilon": (site_level or {}).get("epsilon"),
        "target_epsilon": (sample or {}).get("target_epsilon"),
    }
    for holder in (report, sample or {}, site_level or {}):
        for name in NEIGHBOURING_KEYS:
            if holder.get(name) is not None:
                guarantees["neighbouring_relation"] = holder[name]
    return {
        "guarantees": guarantees,
        "summary": report.get("summary"),
        "verification": {
            "ok": bool(verification["ok"]),
            "receipts_checked": verification["receipts_checked"],
            "problems": problems,
            "stored_ok": (report.get("verification") or {}).get("ok"),
        },
        "sample_level": {"sites": sites} if sample else None,
    }


def _receipt(
    site_id: str, data: dict[str, Any], problems: list[str], site_wide: list[str]
) -> dict[str, Any]:
    try:
        receipt = Receipt.from_json(data)
        payload = receipt.payload
        signature_ok = receipt.verify() and payload.get("site") == site_id
    except (KeyError, TypeError, ValueError):
        return {
            "round": None,
            "kind": "unreadable",
            "epsilon": None,
            "cap": None,
            "delta": None,
            "verified": False,
            "problems": ["receipt is malformed"],
        }
    where = f"{site_id} round {payload.get('round')}:"
    mine = [p for p in problems if p.startswith(where)] + site_wide
    if not signature_ok and not any("signature" in p for p in mine):
        mine.append(f"{where} signature does not verify")
    return {
        "round": payload.get("round"),
        "kind": payload.get("kind"),
        "run": payload.get("run"),
        "epsilon": payload.get("epsilon"),
        "cap": payload.get("cap"),
        "delta": payload.get("delta"),
        "reason": payload.get("reason"),
        "key": fingerprint(receipt.public_key),
        "verified": signature_ok and not mine,
        "problems": mine,
    }


def load_runs(root: Path) -> list[dict[str, Any]]:
    """Every run under ``root``, oldest first (by finish time, then path)."""
    runs = [load_run(root, d) for d in find_run_dirs(root)]
    return sorted(runs, key=lambda r: (r.get("finished_at") or "", r["key"]))


_SAFE_KEY = re.compile(r"^[A-Za-z0-9._/-]+$")


def resolve_run_dir(root: Path, key: str) -> Path | None:
    """The run folder a URL key names, or None (no '..', nothing outside the root)."""
    if key == ".":
        return root if root in find_run_dirs(root) else None
    if not _SAFE_KEY.match(key) or ".." in key.split("/"):
        return None
    candidate = (root / key).resolve()
    if root.resolve() not in candidate.parents:
        return None
    return candidate if candidate in [d.resolve() for d in find_run_dirs(root)] else None
