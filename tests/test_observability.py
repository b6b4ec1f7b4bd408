"""The coordinator's status files, Prometheus exposition and JSON log lines."""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime

from server.observability import (
    MetricsServer,
    json_log_line,
    prometheus_text,
    read_statuses,
    remember_run,
    round_status,
    write_status,
)
from server.rounds import RoundRecord


def _records() -> list[RoundRecord]:
    first = RoundRecord(round=1, participants=["a", "b"], sites_connected=3, seconds=2.5)
    first.declined = ["c"]
    second = RoundRecord(round=2, participants=["a"], sites_connected=3, seconds=1.5)
    second.declined, second.failures, second.eval_accuracy = ["b", "c"], {"d": "timeout"}, 0.8
    return [first, second]


def test_status_counts_the_rounds_so_far():
    status = round_status("42", 5, _records(), site_epsilon=1.25, max_sample_epsilon=None)
    assert status["rounds_completed"] == 2 and status["rounds_planned"] == 5
    assert status["declines_total"] == 3 and status["failures_total"] == 1
    assert status["participants"] == 1 and status["sites_connected"] == 3
    assert status["last_round_seconds"] == 1.5 and status["eval_accuracy"] == 0.8
    assert status["site_level_epsilon"] == 1.25 and status["max_sample_level_epsilon"] is None


def test_metrics_endpoint_reports_every_indexed_run(tmp_path):
    for run_id, rounds in (("7", 1), ("8", 2)):
        run_dir = tmp_path / f"run-{run_id}"
        write_status(run_dir, round_status(run_id, 4, _records()[:rounds], 0.5, 2.0))
        remember_run(tmp_path / "state", run_dir)
        remember_run(tmp_path / "state", run_dir)  # listed once
    remember_run(tmp_path / "state", tmp_path / "not-started")
    assert [s["run_id"] for s in read_statuses(tmp_path / "state")] == ["7", "8"]

    server = MetricsServer(
        lambda: prometheus_text(read_statuses(tmp_path / "state")), "127.0.0.1", 0
    ).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
            body = r.read().decode()
    finally:
        server.stop()
    assert 'fedgov_rounds_completed{run_id="7"} 1.0' in body
    assert 'fedgov_rounds_completed{run_id="8"} 2.0' in body
    assert 'fedgov_declines{run_id="8"} 3.0' in body
    assert 'fedgov_site_level_epsilon{run_id="8"} 0.5' in body
    assert "fedgov_eval_accuracy" in body and 'fedgov_eval_accuracy{run_id="7"}' not in body


def test_flower_log_lines_become_json():
    record = json.loads(
        json_log_line("\x1b[93mWARNING \x1b[0m:   Connection failed\n", "superlink")
    )
    assert record["level"] == "WARNING" and record["message"] == "Connection failed"
    assert record["component"] == "superlink"
    assert datetime.fromisoformat(record["time"]).tzinfo is not None
    assert json.loads(json_log_line("plain text", "superlink"))["level"] == "INFO"
    assert json_log_line("   \n", "superlink") is None
