"""The registry and serving path, timed: publishing a 10M-parameter model, and ``/v1/predict``.

    python -m benchmarks.serving [--requests 3000] [--concurrency 8] [--quick]

1. Publish: a fedgov MLP on RAND HIE's 16 features, widened to about 10 million parameters
   (hidden 4466), published into a fresh registry ``--repeats`` times: safetensors weights, the
   ONNX export and its ONNX Runtime check, the model card, content-addressed storage, the signed
   manifest and the audit entry. Also timed: ``verify`` (re-hashing every artifact) and the
   serve-start verification + ONNX load of the same version.
2. Serve: the demo-sized MLP (hidden 64) is published, approved and promoted, ``fedgov serve``
   starts on a free 127.0.0.1 port (one uvicorn worker), and a load generator in this process
   (``--concurrency`` asyncio keep-alive HTTP/1.1 connections, a fixed number of requests, bounded
   by ``--max-seconds``) posts ``{"instances": [...]}`` bodies of 1 and 32 rows, each with a
   bearer token (``--token-file``; ``--no-auth`` serves without). Each request's latency is
   measured from sending to the last byte of the response. Side by side: the ONNX Runtime
   runtime (the default) and the torch runtime.

The load generator shares the machine's CPUs with the server, so requests per second are a
floor for a dedicated client; p50/p99 include queueing at the chosen concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIG_HIDDEN = 4466  # 16·h + h + h·(h/2) + h/2 + 2·(h/2) + 2 ≈ 10.0M parameters


BENCH_TOKEN = "benchmark-token-0123456789abcdef"


def _governed_registry(root: Path):
    """A registry governed by a one-approver policy (signed version 1); returns (registry,
    keys)."""
    from server.registry.governance import apply_policy, propose_policy
    from server.registry.registry import Registry
    from server.registry.signing import generate_key, write_key

    keys = {}
    for name in ("server", "alice"):
        keys[name] = generate_key()
        write_key(root / "keys" / f"{name}.key", keys[name])
    registry = Registry(root / "registry", create=True)
    policy = {
        "principals": {
            "server": {"public_key": keys["server"].public_key, "roles": ["publisher"]},
            "alice": {"public_key": keys["alice"].public_key, "roles": ["approver"]},
        },
        "aliases": {"production": {"quorum": 1}},
        "governance": {"quorum": 1, "signer_roles": ["approver"]},
    }
    version = propose_policy(registry, policy, "benchmark policy").with_signature(
        keys["alice"], "alice"
    )
    apply_policy(registry, version, keys["alice"])
    return registry, keys


def _publish(registry, key, hidden: int, seed: int = 0):
    import torch
    from safetensors.torch import save

    from fedgov.datasets import load_dataset
    from fedgov.models import build_model
    from server.registry.publish import ModelSpec, publish_model

    schema = load_dataset("randhie").schema
    torch.manual_seed(seed)
    model = build_model("mlp", schema.input_shape, len(schema.classes), hidden)
    started = time.perf_counter()
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
    record = publish_model(
        registry,
        name=f"bench-mlp-{hidden}",
        weights=weights,
        spec=ModelSpec("mlp", hidden),
        schema=schema,
        run_config={},
        lineage={
            "run_id": f"benchmark-{seed}",
            "strategy": "fedavg",
            "rounds": 1,
            "rounds_completed": 1,
            "seed": seed,
            "sites": ["site-1"],
            "sites_per_round": [1],
            "secure_aggregation": {"enabled": False},
            "code_commit": None,
        },
        metrics={"final": {"central_eval_accuracy": 0.78}},
        privacy_report=None,
        key=key,
    )
    return record, time.perf_counter() - started


def bench_publish(repeats: int) -> dict:
    from server.registry.governance import verify_version
    from server.registry.manifest import parse_ref
    from server.serving.verify import load_for_serving

    with tempfile.TemporaryDirectory(prefix="fedgov-bench-") as tmp:
        registry, keys = _governed_registry(Path(tmp))
        seconds = []
        for i in range(repeats):
            record, elapsed = _publish(registry, keys["server"], BIG_HIDDEN, seed=i)
            seconds.append(elapsed)
        started = time.perf_counter()
        report = verify_version(registry, record, registry.load_policy())
        verify_seconds = time.perf_counter() - started
        assert report.ok, report.checks
        _approve_and_promote(registry, record, keys)
        started = time.perf_counter()
        load_for_serving(registry, parse_ref(f"{record.name}@production"), registry.load_policy())
        serve_start_seconds = time.perf_counter() - started
        artifacts = record.manifest["artifacts"]
        registry.close()
    return {
        "parameters": record.manifest["model"]["parameters"],
        "publish_seconds": seconds,
        "weights_bytes": artifacts["weights"]["bytes"],
        "onnx_bytes": artifacts["onnx"]["bytes"],
        "verify_seconds": verify_seconds,
        "serve_start_seconds": serve_start_seconds,
    }


def _approve_and_promote(registry, record, keys) -> None:
    from server.registry.governance import decide, promote
    from server.registry.manifest import parse_ref

    policy = registry.load_policy()
    decide(registry, parse_ref(record.ref), "approve", keys["alice"], policy)
    promote(registry, parse_ref(record.ref), "production", keys["alice"], policy)


# ---- load generation ----------------------------------------------------------------------------


async def _client(
    host, port, body: bytes, count: int, deadline: float, latencies: list[float], auth: bool
):
    reader, writer = await asyncio.open_connection(host, port)
    token = f"Authorization: Bearer {BENCH_TOKEN}\r\n" if auth else ""
    request = (
        f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"{token}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        for _ in range(count):
            if time.perf_counter() > deadline:
                return
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            if status != 200:
                raise RuntimeError(f"/v1/predict answered {status}")
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def _load(
    host, port, body, requests, concurrency, max_seconds, auth
) -> tuple[list[float], float]:
    latencies: list[float] = []
    per_client = -(-requests // concurrency)
    # Warm-up: one request per connection is not counted.
    await asyncio.gather(*(_client(host, port, body, 1, float("inf"), [], auth) for _ in range(2)))
    started = time.perf_counter()
    deadline = started + max_seconds
    await asyncio.gather(
        *(
            _client(host, port, body, per_client, deadline, latencies, auth)
            for _ in range(concurrency)
        )
    )
    return latencies, time.perf_counter() - started


def bench_serving(
    requests: int, concurrency: int, max_seconds: float, auth: bool = True
) -> tuple[list[dict], int]:
    from fedgov.datasets import load_table

    rows = load_table("randhie").head(32)
    features = [c for c in rows.columns if c not in ("binexp", "site")]
    instances = [[_number(v) for v in row] for row in rows[features].itertuples(index=False)]
    results = []
    with tempfile.TemporaryDirectory(prefix="fedgov-bench-") as tmp:
        registry, keys = _governed_registry(Path(tmp))
        record, _ = _publish(registry, keys["server"], 64)
        _approve_and_promote(registry, record, keys)
        registry.close()
        for runtime in ("onnx", "torch"):
            ref = f"{record.name}@production"
            with _server(registry.path, ref, runtime, Path(tmp), auth) as port:
                for batch in (1, 32):
                    body = json.dumps({"instances": instances[:batch]}).encode()
                    latencies, wall = asyncio.run(
                        _load("127.0.0.1", port, body, requests, concurrency, max_seconds, auth)
                    )
                    results.append(_summary(runtime, batch, latencies, wall))
    return results, record.manifest["model"]["parameters"]


@contextlib.contextmanager
def _server(registry_path: Path, ref: str, runtime: str, logs: Path, auth: bool = True):
    """``fedgov serve`` on a free loopback port, stopped (SIGTERM, then SIGKILL) on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = logs / f"serve-{runtime}.log"
    argv = [
        sys.executable,
        "-m",
        "fedgov",
        "serve",
        ref,
        "--registry",
        str(registry_path),
        "--port",
        str(port),
        "--runtime",
        runtime,
    ]
    if auth:
        tokens = logs / "tokens.txt"
        tokens.write_text(f"api {BENCH_TOKEN}\n")
        argv += ["--token-file", str(tokens)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"fedgov serve exited: {log_path.read_text()}")
            with socket.socket() as probe:
                probe.settimeout(0.5)
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("fedgov serve did not start listening within 60 s")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _number(value):
    value = value.item() if hasattr(value, "item") else value
    return int(value) if float(value).is_integer() else float(value)


def _summary(runtime: str, batch: int, latencies: list[float], wall: float) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "runtime": runtime,
        "batch": batch,
        "requests": len(latencies),
        "requests_per_second": len(latencies) / wall,
        "instances_per_second": len(latencies) * batch / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--requests", type=int, default=3000, help="requests per scenario")
    parser.add_argument("--concurrency", type=int, default=8, help="keep-alive connections")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="cap per scenario")
    parser.add_argument("--repeats", type=int, default=3, help="publishes of the 10M model")
    parser.add_argument("--quick", action="store_true", help="500 requests, 1 publish")
    parser.add_argument(
        "--no-auth", action="store_true", help="serve without bearer tokens (default: with)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.repeats = 500, 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    print(f"fedgov serving benchmark · {os.cpu_count()} CPUs · loopback", flush=True)
    publish = bench_publish(args.repeats)
    median = statistics.median(publish["publish_seconds"])
    print(
        f"\npublish a {publish['parameters']:,}-parameter MLP (weights "
        f"{publish['weights_bytes'] / 1e6:.1f} MB, ONNX {publish['onnx_bytes'] / 1e6:.1f} MB): "
        f"{median:.2f} s median of {args.repeats} "
        f"({', '.join(f'{s:.2f}' for s in publish['publish_seconds'])})\n"
        f"verify it (re-hash every artifact, check the signature): "
        f"{publish['verify_seconds']:.2f} s\n"
        f"serve-start verification + ONNX Runtime load: {publish['serve_start_seconds']:.2f} s",
        flush=True,
    )
    serving, parameters = bench_serving(
        args.requests, args.concurrency, args.max_seconds, auth=not args.no_auth
    )
    print(
        f"\nPOST /v1/predict · demo-sized MLP ({parameters:,} parameters) · {args.concurrency} "
        "concurrent "
        "keep-alive connections · uvicorn, 1 worker · "
        + ("no authentication" if args.no_auth else "bearer token required")
        + "\n"
    )
    header = f"{'runtime':<8} {'batch':>5} {'requests':>8} {'req/s':>8} {'rows/s':>9} "
    print(header + f"{'p50 ms':>7} {'p99 ms':>7}")
    for r in serving:
        print(
            f"{r['runtime']:<8} {r['batch']:>5} {r['requests']:>8} "
            f"{r['requests_per_second']:>8.0f} {r['instances_per_second']:>9.0f} "
            f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}"
        )
    by = {(r["runtime"], r["batch"]): r for r in serving}
    for batch in (1, 32):
        ratio = (
            by[("torch", batch)]["requests_per_second"] / by[("onnx", batch)]["requests_per_second"]
        )
        print(f"torch / onnx requests per second, batch {batch}: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"publish": publish, "serving": serving}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
