"""``fedgov serve`` under abuse, as a real process on 127.0.0.1: oversized bodies, values that
overflow, bearer tokens per scope, a 20 s load test, and a rejection made while serving taking
effect within the re-verification period. Tampering and demotion while serving are checked on
the same re-verification code in this process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
from processes import free_port, managed_processes
from registry_support import make_governance, privacy_report, publish_toy

from fedgov_cli.main import main
from server.registry.governance import decide, promote
from server.registry.manifest import parse_ref
from server.registry.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
API_TOKEN = "api-token-0123456789abcdef"
OPS_TOKEN = "ops-token-0123456789abcdef"
BODY_LIMIT = 200_000
REVERIFY_SECONDS = 1.0
ROW = [52.0, 2, 4.5]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("abuse")
    governance = make_governance(root)
    registry = Registry(governance.registry_path)
    publish_toy(registry, governance.keys["server"], report=privacy_report(3.0))
    publish_toy(registry, governance.keys["server"], seed=1, report=privacy_report(3.0))
    policy = registry.load_policy()
    for ref in ("toy-mlp:1", "toy-mlp:2"):
        for name in ("alice", "bob"):
            decide(registry, parse_ref(ref), "approve", governance.keys[name], policy)
    promote(registry, parse_ref("toy-mlp:1"), "production", governance.keys["dana"], policy)
    registry.close()
    return governance


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text(f"# scopes token\napi {API_TOKEN}\nmetrics,docs {OPS_TOKEN}\n")
    port = free_port()
    with managed_processes(tmp_path_factory.mktemp("serve-logs")) as group:
        proc = group.start(
            "serve",
            [
                sys.executable,
                "-m",
                "fedgov",
                "serve",
                "toy-mlp@production",
                "--registry",
                str(world.registry_path),
                "--port",
                str(port),
                "--token-file",
                str(tokens),
                "--max-body-bytes",
                str(BODY_LIMIT),
                "--reverify-seconds",
                str(REVERIFY_SECONDS),
            ],
            cwd=ROOT,
        )
        group.wait_for_port(proc, port, timeout=90)
        headers = {"authorization": f"Bearer {API_TOKEN}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=headers) as c:
            yield c, port


def test_an_oversized_body_gets_413_and_health_stays_responsive(server):
    client, _ = server
    rows = [ROW] * 20_000  # about 260 kB of JSON
    body = json.dumps({"instances": rows}).encode()
    assert len(body) > BODY_LIMIT
    response = client.post("/v1/predict", content=body)
    assert response.status_code == 413
    assert response.json() == {"detail": f"request body over {BODY_LIMIT} bytes"}

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        for start in range(0, len(body), 16_384):
            yield body[start : start + 16_384]

    response = client.post("/v1/predict", content=chunks())
    assert response.status_code == 413
    assert client.get("/healthz").status_code == 200
    assert client.post("/v1/predict", json={"instances": [ROW]}).status_code == 200


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (10**400, "instances[0]: feature 'age': out of range (beyond float64)"),
        (1e300, "instances[0]: feature 'age' is out of range: it overflows float32"),
        (-1e40, "instances[0]: feature 'age' is out of range: it overflows float32"),
    ],
)
def test_values_that_overflow_get_422(server, value, message):
    client, _ = server
    response = client.post("/v1/predict", json={"instances": [[value, 2, 4.5]]})
    assert response.status_code == 422
    assert response.json()["detail"].startswith(message)


def test_errors_never_echo_the_input(server):
    client, _ = server
    secret = "PATIENT-" + "x" * 5000
    for instances in ([[secret, 2, 4.5]], [{"age": 1, "visits": 2, "cost": 3, secret: 4}]):
        response = client.post("/v1/predict", json={"instances": instances})
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert "PATIENT" not in detail and len(detail) <= 300, detail
    response = client.post("/v1/predict", content=b'{"instances": [[1, 2, ' + b"9" * 5000)
    assert response.status_code == 422 and response.json() == {
        "detail": "body: not valid JSON"  # 5000 digits: over Python's int parsing limit
    }
    deep = b'{"instances": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    response = client.post("/v1/predict", content=deep)
    assert response.status_code == 422 and "nested too deeply" in response.json()["detail"]


def test_tokens_cover_the_api_metrics_and_docs_separately(server):
    _, port = server
    base = f"http://127.0.0.1:{port}"
    api = {"authorization": f"Bearer {API_TOKEN}"}
    ops = {"authorization": f"Bearer {OPS_TOKEN}"}
    wrong = {"authorization": "Bearer not-a-token-0123456789"}
    body = {"instances": [ROW]}
    with httpx.Client(base_url=base, timeout=60) as anonymous:
        assert anonymous.get("/healthz").status_code == 200  # always open
        for path in ("/v1/model", "/metrics", "/docs", "/openapi.json"):
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.post("/v1/predict", json=body).status_code == 401
        assert anonymous.post("/v1/predict", json=body, headers=wrong).status_code == 401
        assert anonymous.post("/v1/predict", json=body, headers=ops).status_code == 403
        assert anonymous.post("/v1/predict", json=body, headers=api).status_code == 200
        assert anonymous.get("/v1/model", headers=api).json()["name"] == "toy-mlp"
        assert anonymous.get("/metrics", headers=api).status_code == 403
        metrics = anonymous.get("/metrics", headers=ops)
        assert metrics.status_code == 200 and "fedgov_http_requests_total" in metrics.text
        assert 'status="401"' in metrics.text  # refusals are counted
        assert anonymous.get("/docs", headers=api).status_code == 403
        assert anonymous.get("/openapi.json", headers=ops).json()["paths"]["/v1/predict"]


@pytest.mark.slow
def test_twenty_seconds_of_load_without_an_error(server):
    _, port = server
    statuses = asyncio.run(_load(port, seconds=20.0, connections=4))
    assert sum(statuses.values()) > 0
    assert statuses == {200: sum(statuses.values())}, statuses


async def _load(port: int, seconds: float, connections: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    body = {"instances": [ROW] * 8}

    async def worker() -> None:
        headers = {"authorization": f"Bearer {API_TOKEN}"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=60, headers=headers
        ) as client:
            while time.monotonic() < deadline:
                response = await client.post("/v1/predict", json=body)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    assert len(response.json()["predictions"]) == 8

    await asyncio.gather(*(worker() for _ in range(connections)))
    return statuses


# ---- tampering and demotion, on the same re-verification code -----------------------------------


@pytest.fixture
def copy(world, tmp_path):
    target = tmp_path / "registry"
    shutil.copytree(world.registry_path, target)
    return target


def _reverifier(registry_path: Path):
    from server.serving import Reverifier
    from server.serving.verify import load_for_serving

    registry = Registry(registry_path)
    ref = parse_ref("toy-mlp@production")
    served = load_for_serving(registry, ref, registry.load_policy())
    registry.close()
    return Reverifier(served, ref, registry_path, None, None, None, REVERIFY_SECONDS)


def test_a_tampered_artifact_while_serving_is_caught_by_reverification(world, copy):
    from server.registry.governance import resolve

    checker = _reverifier(copy)
    assert checker.check_once() is None
    registry = Registry(copy)
    record = resolve(registry, parse_ref("toy-mlp:1"))
    onnx = registry.artifacts.path_of(record.manifest["artifacts"]["onnx"]["sha256"])
    registry.close()
    os.chmod(onnx, 0o644)
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    reason = checker.check_once()
    assert reason is not None and "artifact onnx: sha256 mismatch" in reason


def test_a_demotion_while_serving_is_caught_by_reverification(world, copy):
    checker = _reverifier(copy)
    registry = Registry(copy)
    policy = registry.load_policy()
    promote(registry, parse_ref("toy-mlp:2"), "production", world.keys["dana"], policy)
    registry.close()
    reason = checker.check_once()
    assert reason == (
        "toy-mlp@production now names toy-mlp:2, not the served toy-mlp:1 (moved by governance: "
        "restart to serve it)"
    )


def test_token_files_and_public_scopes(tmp_path):
    from fedgov.errors import FedgovError
    from server.serving.app import load_tokens, scope_of

    path = tmp_path / "tokens"
    path.write_text(f"api,docs {API_TOKEN}\n")
    auth = load_tokens(path, public="metrics")
    bearer = f"Bearer {API_TOKEN}".encode()
    assert [scope_of(p) for p in ("/healthz", "/v1/predict", "/metrics", "/docs", "/x")] == [
        None,
        "api",
        "metrics",
        "docs",
        "api",
    ]
    assert auth.decide("metrics", None) == 200  # public
    assert auth.decide("api", None) == 401
    assert auth.decide("api", b"Bearer " + OPS_TOKEN.encode()) == 401
    assert auth.decide("api", bearer) == auth.decide("docs", bearer) == 200
    for text, message in [
        (f"admin {API_TOKEN}", "scopes are a comma list of api, metrics, docs"),
        ("api short", "at least 16 ASCII characters"),
        (f"api {API_TOKEN} extra", "line 1: expected 'SCOPES TOKEN'"),
        ("# nothing\n", "holds no token"),
    ]:
        path.write_text(text)
        with pytest.raises(FedgovError, match=message):
            load_tokens(path)


# ---- last: a rejection withdraws the served model ------------------------------------------------


def test_a_rejection_while_serving_stops_predictions_within_the_reverify_period(world, server):
    """Last in this module: it withdraws the served model."""
    client, _ = server
    assert client.post("/v1/predict", json={"instances": [ROW]}).status_code == 200
    code = main(
        [
            "registry",
            "reject",
            "toy-mlp:1",
            "--key",
            str(world.key_paths["bob"]),
            "--registry",
            str(world.registry_path),
        ]
    )
    assert code == 0
    rejected_at = time.monotonic()
    # Within the period (1 s) plus one verification on this loaded machine: polled, not slept.
    while client.get("/healthz").status_code == 200:
        assert time.monotonic() - rejected_at < 60, "still served a minute after the rejection"
        time.sleep(0.2)
    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.json()["status"] == "withdrawn"
    assert "gate rejections: rejected by bob" in health.json()["reason"]
    response = client.post("/v1/predict", json={"instances": [ROW]})
    assert response.status_code == 503
    assert response.json()["detail"].startswith("model withdrawn: ")
