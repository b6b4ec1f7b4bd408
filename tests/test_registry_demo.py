"""``fedgov demo`` publishes a candidate and prints governance commands that work as printed."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import httpx
import pytest
from processes import free_port, managed_processes

from fedgov_cli.demo import run_demo
from fedgov_cli.main import main
from server.registry.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


def test_demo_publishes_a_candidate_and_its_printed_commands_govern_and_serve_it(tmp_path, capsys):
    out = tmp_path / "demo"
    run_demo(out, rounds=1)
    printed = capsys.readouterr().out
    assert "candidate     randhie-mlp:1" in printed
    assert "todo quorum: 0 of 2 required approvals" in printed
    todo = [line.strip() for line in printed.splitlines() if line.strip().startswith("todo ")]
    assert [line.split(":")[0] for line in todo] == ["todo quorum", "todo required_roles"], (
        f"the demo's run does not meet its own policy's gates (server/registry/demo.py): {todo}"
    )
    assert (out / "registry" / "policy.yaml").is_file()
    assert sorted(p.name for p in (out / "keys").glob("*.key")) == [
        "alice.key",
        "bob.key",
        "carol.key",
        "dana.key",
        "fl-server.key",
    ]
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in (out / "keys").glob("*.key"))

    commands = [
        shlex.split(line.strip())[1:]
        for line in printed.splitlines()
        if line.strip().startswith(("fedgov registry ", "fedgov serve "))
    ]
    assert [c[:2] for c in commands] == [
        ["registry", "show"],
        ["registry", "approve"],
        ["registry", "approve"],
        ["registry", "promote"],
        ["registry", "audit"],
        ["registry", "checkpoint"],
        ["serve", "randhie-mlp@production"],
    ]
    *governance, serve = commands
    for argv in governance:
        assert main(argv) == 0, (argv, capsys.readouterr())
    result = capsys.readouterr().out
    assert "randhie-mlp@production → randhie-mlp:1 by dana" in result
    assert "audit chain intact: 5 entries" in result  # publish, policy, 2 approvals, promote
    assert "checkpoint of entry 5" in result
    registry = Registry(out / "registry")
    assert registry.load_policy().version == 1
    assert [v.principal for v in registry.policy_chain().head_version.signatures] == [
        "alice",
        "bob",
    ]
    registry.close()

    port = free_port()
    serve[serve.index("--port") + 1] = str(port)
    with managed_processes(tmp_path / "logs") as group:
        proc = group.start("serve", [sys.executable, "-m", "fedgov", *serve], cwd=ROOT)
        group.wait_for_port(proc, port, timeout=60)
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
    assert health == {"status": "ok", "model": "randhie-mlp:1", "alias": "production"}


@pytest.mark.slow
def test_the_serving_benchmark_runs_and_reports_latency_and_publish_time(capsys):
    from benchmarks.serving import main as benchmark

    assert benchmark(["--requests", "40", "--repeats", "1", "--concurrency", "2"]) == 0
    out = capsys.readouterr().out
    assert "-parameter MLP (weights 40.2 MB" in out and "s median of 1" in out
    rows = [
        line.split()
        for line in out.splitlines()
        if line.startswith(("onnx ", "torch ")) and "/" not in line
    ]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("onnx", "1", "40"),
        ("onnx", "32", "40"),
        ("torch", "1", "40"),
        ("torch", "32", "40"),
    ]
    assert all(float(r[5]) <= float(r[6]) for r in rows)  # p50 ≤ p99
