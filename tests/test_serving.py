"""Serving: a model trained by a real simulation, published by the ServerApp, approved, promoted,
then served by ``fedgov serve`` on 127.0.0.1 and queried over HTTP; and every refusal to start."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from processes import free_port, managed_processes
from registry_support import PRINCIPALS, Governance, make_governance

from fedgov.datasets import load_dataset, load_table, normalise_frame
from fedgov.models import build_model
from fedgov.records import load_safetensors
from fedgov_cli.main import main
from server.registry.governance import verify_audit
from server.registry.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
MODEL = "randhie-mlp"
PRODUCTION = {
    "quorum": 2,
    "approver_roles": ["clinical-lead", "privacy-officer", "data-steward"],
    "promoter_roles": ["release-manager"],
    "gates": {"min_metrics": {"central_eval_accuracy": 0.6}},
}


@pytest.fixture(scope="module")
def governed(tmp_path_factory):
    """A 3-site, 2-round RAND HIE run published by the ServerApp, approved and promoted."""
    from simulations.run import compose_config, run_from_hydra

    root = tmp_path_factory.mktemp("serving")
    governance = make_governance(root, production=PRODUCTION)
    registry_dir = root / "registry"
    run_dir = root / "run"
    overrides = [
        "progress=false",
        "dataset=randhie",
        "model=mlp",
        "rounds=2",
        "federation.num_sites=3",
        "registry.publish=true",
        f"registry.path={registry_dir}",
        f"registry.signing_key={governance.key_paths['server']}",
    ]
    metrics = run_from_hydra(compose_config(overrides), run_dir)
    for name in ("alice", "carol"):
        assert (
            main(
                [
                    "registry",
                    "approve",
                    f"{MODEL}:1",
                    "--key",
                    str(governance.key_paths[name]),
                    "--registry",
                    str(registry_dir),
                ]
            )
            == 0
        )
    assert (
        main(
            [
                "registry",
                "promote",
                f"{MODEL}:1",
                "--alias",
                "production",
                "--key",
                str(governance.key_paths["dana"]),
                "--registry",
                str(registry_dir),
            ]
        )
        == 0
    )
    return {
        "root": root,
        "registry": registry_dir,
        "run_dir": run_dir,
        "metrics": metrics,
        "governance": governance,
    }


@pytest.fixture(scope="module")
def server(governed, tmp_path_factory):
    """``fedgov serve randhie-mlp@production`` on a free 127.0.0.1 port; stopped at the end."""
    port = free_port()
    with managed_processes(tmp_path_factory.mktemp("serve-logs")) as group:
        proc = group.start(
            "serve",
            [
                sys.executable,
                "-m",
                "fedgov",
                "serve",
                f"{MODEL}@production",
                "--registry",
                str(governed["registry"]),
                "--port",
                str(port),
                "--key",
                str(governed["governance"].key_paths["server"]),
            ],
            cwd=ROOT,
        )
        group.wait_for_port(proc, port, timeout=60)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client, proc


def _trained_model(run_dir: Path):
    schema = load_dataset("randhie").schema
    model = build_model("mlp", schema.input_shape, len(schema.classes), 64)
    weights = {
        k: torch.from_numpy(v) for k, v in load_safetensors(run_dir / "model.safetensors").items()
    }
    model.load_state_dict(weights)
    return model.eval(), schema


def test_the_server_app_published_the_run_with_its_lineage(governed):
    registry = Registry(governed["registry"])
    with registry.store.read() as session:
        (record,) = registry.store.versions(session)
    manifest = record.manifest
    weights = (governed["run_dir"] / "model.safetensors").read_bytes()
    import hashlib

    assert manifest["artifacts"]["weights"]["sha256"] == hashlib.sha256(weights).hexdigest()
    lineage = manifest["lineage"]
    assert lineage["run_dir"] == str(governed["run_dir"].resolve())
    assert lineage["rounds"] == lineage["rounds_completed"] == 2
    assert lineage["sites_per_round"] == [3, 3]
    assert lineage["sites"] == sorted(governed["metrics"]["sites"])
    assert lineage["secure_aggregation"]["enabled"] is False
    assert lineage["code_commit"] is None or len(lineage["code_commit"]) == 40
    assert record.run_id == lineage["run_id"] and lineage["run_id"].isdigit()
    assert manifest["run_config"]["rounds"] == 2
    assert manifest["metrics"]["final"] == governed["metrics"]["final"]
    assert manifest["privacy_report"] is None  # privacy=none: no privacy_report.json
    registry.close()


def test_predictions_over_http_equal_the_trained_model(governed, server):
    client, _ = server
    model, schema = _trained_model(governed["run_dir"])
    table = load_table("randhie").iloc[::97].head(120)  # rows from every site, raw units
    expected_x = normalise_frame(table, schema, source="test rows")
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(expected_x)).double(), dim=1).numpy()
    instances = [
        [_json_number(row[name]) for name in schema.feature_names] for _, row in table.iterrows()
    ]
    response = client.post("/v1/predict", json={"instances": instances})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == f"{MODEL}:1"
    np.testing.assert_allclose(np.array(body["probabilities"]), expected, atol=2e-6)
    labels = [schema.classes[i] for i in expected.argmax(axis=1)]
    assert body["predictions"] == labels
    assert body["class_indices"] == expected.argmax(axis=1).tolist()
    # Both classes occur, so the comparison is not of a constant.
    assert len(set(labels)) == 2
    # Instances as objects keyed by feature name give the same answers.
    by_name = [dict(zip(schema.feature_names, row, strict=True)) for row in instances[:5]]
    keyed = client.post("/v1/predict", json={"instances": by_name}).json()
    assert keyed["probabilities"] == body["probabilities"][:5]


def _json_number(value):
    value = value.item() if hasattr(value, "item") else value
    return int(value) if float(value).is_integer() else float(value)


@pytest.mark.parametrize(
    ("instances", "message"),
    [
        ([[1.0, 2.0]], "instances[0]: expected 16 feature values (coins, idp,"),
        ([[0] * 15 + ["x"]], "instances[0]: feature 'black': expected a number, got str"),
        ([[0] * 15 + [True]], "instances[0]: feature 'black': expected a number, got bool"),
        ([[0.5] + [0] * 15], "instances[0]: feature 'coins': expected a whole number"),
        ([[10**400] + [0] * 15], "instances[0]: feature 'coins': out of range (beyond float64)"),
        ([[0] * 15 + [1e300]], "instances[0]: feature 'black' is out of range: it overflows"),
        ([{"coins": 0}], "instances[0]: missing feature 'idp'"),
        ([[0] * 16, "row"], "instances[1]: expected a list of 16 numbers or an object"),
    ],
)
def test_invalid_instances_get_422_naming_the_instance_and_feature(server, instances, message):
    client, _ = server
    response = client.post("/v1/predict", json={"instances": instances})
    assert response.status_code == 422
    assert response.json()["detail"].startswith(message), response.json()


def test_a_malformed_body_gets_422(server):
    client, _ = server
    for body in ({"instances": []}, {"rows": [[0] * 16]}, [[0] * 16]):
        assert client.post("/v1/predict", json=body).status_code == 422


def test_health_model_summary_openapi_and_metrics(governed, server):
    client, _ = server
    assert client.get("/healthz").json() == {
        "status": "ok",
        "model": f"{MODEL}:1",
        "alias": "production",
    }
    summary = client.get("/v1/model").json()
    assert summary["name"] == MODEL and summary["version"] == 1
    assert summary["privacy"] == {
        "report": False,
        "epsilon": None,
        "delta": None,
        "secure_aggregation": None,
    }
    assert summary["verification"]["approved_by"] == ["alice", "carol"]
    assert summary["input"]["features"][0] == {"name": "coins", "dtype": "int"}
    assert summary["metrics"] == governed["metrics"]["final"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/v1/model", "/v1/predict", "/metrics"} <= set(paths)

    before = _metric(
        client, 'fedgov_http_requests_total{method="POST",path="/v1/predict",status="200"}'
    )
    for _ in range(3):
        assert client.post("/v1/predict", json={"instances": [[0] * 16]}).status_code == 200
    client.post("/v1/predict", json={"instances": [[0]]})
    text = client.get("/metrics").text
    assert (
        _metric(
            client,
            'fedgov_http_requests_total{method="POST",path="/v1/predict",status="200"}',
            text,
        )
        == before + 3
    )
    assert (
        _metric(
            client,
            'fedgov_http_requests_total{method="POST",path="/v1/predict",status="422"}',
            text,
        )
        >= 1
    )
    assert 'fedgov_http_request_duration_seconds_bucket{le="0.005",path="/v1/predict"}' in text
    assert (
        f'fedgov_model_info{{alias="production",manifest_sha256="{summary["manifest_sha256"]}"'
        in text
    )


def _metric(client, series: str, text: str | None = None) -> float:
    text = text if text is not None else client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_serve_start_is_in_the_audit_chain(governed, server):
    registry = Registry(governed["registry"])
    report = verify_audit(registry)
    registry.close()
    assert report.ok, report.problems
    assert [e.action for e in report.entries] == [
        "policy",
        "publish",
        "approve",
        "approve",
        "promote",
        "serve_start",
    ]
    assert report.entries[-1].details["address"].startswith("127.0.0.1:")
    assert report.entries[-1].actor == "server"  # signed with --key, a principal's key


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_the_torch_runtime_answers_like_onnx(governed, server):
    from fastapi.testclient import TestClient

    from server.registry.manifest import parse_ref
    from server.serving.app import create_app
    from server.serving.verify import load_for_serving

    client, _ = server
    registry = Registry(governed["registry"])
    served = load_for_serving(
        registry, parse_ref(f"{MODEL}@production"), registry.load_policy(), runtime="torch"
    )
    registry.close()
    rows = {"instances": [[25, 0, 1.5, 6.9, 0, 3, 1, 0, 0, 8.9, 1.1, 12, 30, 1, 0, 0]]}
    torch_answer = TestClient(create_app(served)).post("/v1/predict", json=rows).json()
    onnx_answer = client.post("/v1/predict", json=rows).json()
    assert torch_answer["predictions"] == onnx_answer["predictions"]
    np.testing.assert_allclose(
        torch_answer["probabilities"], onnx_answer["probabilities"], atol=1e-6
    )


# ---- refusals -----------------------------------------------------------------------------------


@pytest.fixture
def registry_copy(governed, tmp_path):
    """A copy of the governed registry (and its keys) that a test may damage."""
    copy = tmp_path / "registry"
    shutil.copytree(governed["registry"], copy)
    return copy


def _serve_refusal(registry_dir: Path, *extra: str) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedgov",
            "serve",
            f"{MODEL}@production",
            "--registry",
            str(registry_dir),
            "--port",
            str(free_port()),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_serve_refuses_a_weights_file_with_one_changed_byte(registry_copy, capsys):
    registry = Registry(registry_copy)
    with registry.store.read() as session:
        (record,) = registry.store.versions(session)
    weights = registry.artifacts.path_of(record.manifest["artifacts"]["weights"]["sha256"])
    registry.close()
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40
    weights.write_bytes(bytes(data))
    line = _serve_refusal(registry_copy)
    assert line.startswith(
        f"fedgov: error: serve refused: {MODEL}@production → {MODEL}:1: artifact weights: "
        "sha256 mismatch"
    )
    assert main(["registry", "verify", f"{MODEL}:1", "--registry", str(registry_copy)]) == 2
    capsys.readouterr()


def test_serve_refuses_when_an_audit_entry_was_deleted(registry_copy):
    with sqlite3.connect(registry_copy / "registry.db") as db:
        db.execute("DELETE FROM audit_log WHERE seq = 2")
    line = _serve_refusal(registry_copy)
    assert line.startswith("fedgov: error: serve refused: audit entry 3: follows entry 1; entry 2")


def _on_copy(governed, registry_copy: Path) -> Governance:
    g = governed["governance"]
    return Governance(g.root, g.keys, g.key_paths, registry_copy / "policy.yaml", registry_copy)


def test_serve_refuses_when_the_approvals_no_longer_meet_the_policy(governed, registry_copy):
    _on_copy(governed, registry_copy).write_policy({**PRODUCTION, "quorum": 3})
    line = _serve_refusal(registry_copy)
    assert "no longer meets policy version 2" in line
    assert "gate quorum: 2 of 3 required approvals" in line


def test_serve_refuses_an_edited_policy_file(registry_copy):
    policy = yaml.safe_load((registry_copy / "policy.yaml").read_text())
    policy["policy"]["aliases"]["production"]["quorum"] = 0
    (registry_copy / "policy.yaml").write_text(yaml.safe_dump(policy))
    line = _serve_refusal(registry_copy)
    assert "sha256: the file says" in line and "(edited after it was made)" in line


def test_serve_refuses_a_manifest_whose_signer_the_policy_does_not_list(governed, registry_copy):
    without_server = {k: v for k, v in PRINCIPALS.items() if k != "server"}
    _on_copy(governed, registry_copy).write_policy(PRODUCTION, without_server)
    line = _serve_refusal(registry_copy)
    assert "publisher: key" in line and "is not a publisher in policy version 2" in line


def test_serve_refuses_an_alias_moved_outside_governance(registry_copy):
    with sqlite3.connect(registry_copy / "registry.db") as db:
        db.execute("UPDATE aliases SET updated_at = 'x', audit_seq = 2")
    line = _serve_refusal(registry_copy)
    assert "alias randhie-mlp@production → 1 has no matching 'promote' audit entry" in line


def test_serve_refuses_a_version_reference_and_an_unknown_alias(registry_copy):
    assert "expected NAME@ALIAS" in _serve_refusal_args(registry_copy, f"{MODEL}:1")
    assert "no version holds alias 'staging'" in _serve_refusal_args(
        registry_copy, f"{MODEL}@staging"
    )


def _serve_refusal_args(registry_dir: Path, ref: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "fedgov", "serve", ref, "--registry", str(registry_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    return result.stderr.strip()


def test_the_whole_walkthrough_in_json_is_consistent(governed, capsys):
    assert (
        main(
            [
                "registry",
                "show",
                f"{MODEL}@production",
                "--json",
                "--registry",
                str(governed["registry"]),
            ]
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["aliases"] == ["production"]
    assert shown["gates"]["production"]["passed"] is True
