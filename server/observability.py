"""What the coordinator shows its operators: a status file per run, Prometheus metrics, JSON logs.

The ServerApp writes ``<run dir>/status.json`` after every round (atomically). ``fedgov server
start --metrics-port P`` serves ``GET /metrics`` in Prometheus' text format from the status files
of the runs launched with ``fedgov run`` (listed in ``state/runs.txt``), and ``--log-format json``
turns the SuperLink's log into one JSON object per line.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from fedgov.atomic import atomic_write_json

STATUS_FILE = "status.json"
RUNS_INDEX = "runs.txt"


def round_status(
    run_id: str,
    rounds_planned: int,
    records: list[Any],
    site_epsilon: float | None,
    max_sample_epsilon: float | None,
) -> dict[str, Any]:
    """The run's status after its latest round (pure; ``records`` are the RoundRecords so far)."""
    last = records[-1]
    return {
        "run_id": run_id,
        "rounds_planned": rounds_planned,
        "rounds_completed": len(records),
        "last_round": last.round,
        "sites_connected": last.sites_connected,
        "participants": len(last.participants),
        "declines_total": sum(len(r.declined) for r in records),
        "failures_total": sum(len(r.failures) for r in records),
        "aborted_rounds": sum(1 for r in records if getattr(r, "aborted", False)),
        "last_round_seconds": last.seconds,
        # the latest evaluated round's: a round's evaluation comes with the next round's replies
        "eval_accuracy": next(
            (r.eval_accuracy for r in reversed(records) if r.eval_accuracy is not None), None
        ),
        "site_level_epsilon": site_epsilon,
        "max_sample_level_epsilon": max_sample_epsilon,
        "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_status(run_dir: str | Path, status: dict[str, Any]) -> None:
    """Atomically replace the run's ``status.json``."""
    atomic_write_json(Path(run_dir) / STATUS_FILE, status)


def remember_run(state_dir: str | Path, run_dir: str | Path) -> None:
    """Add a run directory to the coordinator's index (what ``/metrics`` reports on)."""
    index = Path(state_dir) / RUNS_INDEX
    index.parent.mkdir(parents=True, exist_ok=True)
    known = set(index.read_text().split("\n")) if index.exists() else set()
    if str(run_dir) not in known:
        with index.open("a") as handle:
            handle.write(f"{run_dir}\n")


def read_statuses(state_dir: str | Path) -> list[dict[str, Any]]:
    """The status of every indexed run that has completed a round."""
    index = Path(state_dir) / RUNS_INDEX
    statuses = []
    if not index.exists():
        return statuses
    for line in index.read_text().splitlines():
        path = Path(line.strip()) / STATUS_FILE
        try:
            statuses.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # not started yet, or being replaced right now
    return statuses


#: status.json key → (Prometheus metric name without the fedgov_ prefix, help text).
METRICS = {
    "rounds_completed": ("rounds_completed", "Rounds completed"),
    "rounds_planned": ("rounds_planned", "Rounds planned"),
    "sites_connected": ("sites_connected", "Sites connected in the last round"),
    "participants": ("round_participants", "Sites whose update counted in the last round"),
    "declines_total": ("declines", "Site declines so far (privacy budget)"),
    "failures_total": ("failures", "Site failures so far"),
    "aborted_rounds": ("aborted_rounds", "Rounds aborted (secure aggregation below threshold)"),
    "last_round_seconds": ("last_round_seconds", "Duration of the last round in seconds"),
    "eval_accuracy": ("eval_accuracy", "Federated evaluation accuracy of the last evaluated round"),
    "site_level_epsilon": ("site_level_epsilon", "Site-level DP epsilon spent by the federation"),
    "max_sample_level_epsilon": (
        "max_sample_level_epsilon",
        "Largest sample-level epsilon of a site",
    ),
}


def prometheus_text(statuses: Iterable[dict[str, Any]]) -> bytes:
    """Prometheus exposition of the runs' statuses (one label set per run)."""
    registry = CollectorRegistry()
    gauges = {
        key: Gauge(f"fedgov_{name}", description, ["run_id"], registry=registry)
        for key, (name, description) in METRICS.items()
    }
    for status in statuses:
        for key, gauge in gauges.items():
            value = status.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                gauge.labels(run_id=str(status.get("run_id", ""))).set(value)
    return generate_latest(registry)


class MetricsServer:
    """``GET /metrics`` on ``host:port`` from ``collect()``, in a background thread."""

    def __init__(self, collect: Callable[[], bytes], host: str, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = collect()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FLOWER_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*(.*)$")


def json_log_line(line: str, component: str) -> str | None:
    """One JSON log object for a line of Flower's console log (None for a blank line)."""
    text = _ANSI.sub("", line).rstrip()
    if not text.strip():
        return None
    match = _FLOWER_LEVEL.match(text.strip())
    level, message = (match.group(1), match.group(2)) if match else ("INFO", text.strip())
    return json.dumps(
        {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "level": level,
            "component": component,
            "message": message,
        }
    )
