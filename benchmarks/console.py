"""The governance console's page load times over a registry of 50 versions and 20 runs.

    python -m benchmarks.console [--versions 50] [--runs 20] [--repeats 5] [--out DIR]

The fixture is built with the real parts, not copies: 6 sites with their own Ed25519 keys sign
DP-SGD receipts for 20 runs of 5 rounds each (σ = 1.0, each site's sampling rate from its size;
ε from Opacus' RDP accountant over each site's cumulative history, so sites decline once the
next round would pass their cap of 6), each run's ``privacy_report.json`` is built by
``privacy.report.report_document`` and its ``metrics.json`` names who trained and who declined.
50 versions of a small MLP are published into a fresh registry (signed manifest, ONNX export,
the run's privacy report embedded), approved and promoted under a demo-style policy by the real
registry functions. Then ``fedgov console`` starts on a free 127.0.0.1 port and each page is
fetched once cold (the first request re-verifies every receipt) and ``--repeats`` times warm.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITES = {
    "site-1": 2861,
    "site-2": 2569,
    "site-3": 1550,
    "site-4": 2004,
    "site-5": 1661,
    "site-6": 2275,
}
ROUNDS = 5
SIGMA = 1.0
CAP = 6.0
DELTA = 1e-5


def build_runs(root: Path, runs: int) -> list[str]:
    """``runs`` run folders of 5 rounds with signed receipts; returns their run ids."""
    from fedgov.records import atomic_write_json
    from privacy.accounting import epsilon
    from privacy.receipts import create_site_key, sign
    from privacy.report import report_document

    keys = {site: create_site_key(root / "sites" / site) for site in SITES}
    history: dict[str, list[list[float]]] = {site: [] for site in SITES}
    run_ids = []
    for index in range(1, runs + 1):
        run_id = f"bench-run-{index:02d}"
        run_ids.append(run_id)
        per_site: dict[str, dict] = {site: {"receipts": [], "declines": []} for site in SITES}
        rounds = []
        for server_round in range(1, ROUNDS + 1):
            participants, declines = [], {}
            for site, rows in SITES.items():
                rate, steps = 32 / rows, rows // 32
                before = epsilon(history[site], DELTA)
                after = epsilon([*history[site], [SIGMA, rate, steps]], DELTA)
                if after > CAP:
                    reason = f"privacy budget exhausted: ε = {after:.4g} > cap {CAP:g}"
                    payload = {
                        "kind": "decline",
                        "site": site,
                        "run": run_id,
                        "round": server_round,
                        "reason": "privacy budget exhausted",
                        "delta": DELTA,
                        "accountant": "rdp",
                        "epsilon": before,
                        "epsilon_requested": after,
                        "cap": CAP,
                        "history": history[site],
                    }
                    per_site[site]["declines"].append(
                        {
                            "round": server_round,
                            "reason": reason,
                            "epsilon_spent": before,
                            "cap": CAP,
                            "receipt": sign(keys[site], payload).to_json(),
                        }
                    )
                    declines[site] = reason
                    continue
                history[site] = [*history[site], [SIGMA, rate, steps]]
                payload = {
                    "kind": "dp-sgd",
                    "site": site,
                    "run": run_id,
                    "round": server_round,
                    "steps": steps,
                    "noise_multiplier": SIGMA,
                    "sample_rate": rate,
                    "max_grad_norm": 1.0,
                    "delta": DELTA,
                    "accountant": "rdp",
                    "epsilon": after,
                    "cap": CAP,
                    "history": history[site],
                }
                per_site[site]["receipts"].append(sign(keys[site], payload).to_json())
                participants.append(site)
            rounds.append(
                {
                    "round": server_round,
                    "participants": participants,
                    "declined": sorted(declines),
                    "decline_reasons": declines,
                    "failures": {},
                    "dropouts": {},
                    "aborted": False,
                    "central_eval_accuracy": 0.78,
                }
            )
        run_dir = root / "runs" / f"run-{index:02d}"
        run_dir.mkdir(parents=True)
        report = report_document(
            run_id=run_id,
            rounds=ROUNDS,
            delta=DELTA,
            accountant="rdp",
            secure_aggregation=True,
            sample_level={
                "noise_multiplier": SIGMA,
                "target_epsilon": 0.0,
                "max_grad_norm": 1.0,
                "grad_sample_mode": "fused",
                "sites": per_site,
            },
            site_level=None,
        )
        assert report["verification"]["ok"], report["verification"]["problems"]
        atomic_write_json(run_dir / "privacy_report.json", report)
        atomic_write_json(
            run_dir / "metrics.json",
            {
                "rounds": rounds,
                "final": {"central_eval_accuracy": 0.78},
                "wall_seconds": 1.0,
                "sites": {s: {"num_train": n, "num_test": n // 4} for s, n in SITES.items()},
                "config": {
                    "run_id": run_id,
                    "rounds": ROUNDS,
                    "privacy.name": "sample_dp",
                    "secagg.name": "secaggplus",
                },
            },
        )
    return run_ids


def build_registry(root: Path, run_ids: list[str], versions: int) -> None:
    """``versions`` published versions, half approved by two, every tenth promoted."""
    import torch
    import yaml
    from safetensors.torch import save as safetensors_bytes

    from fedgov.datasets import DatasetSchema, FeatureSpec
    from fedgov.models import build_model
    from server.registry.governance import decide, promote
    from server.registry.manifest import ModelRef
    from server.registry.publish import ModelSpec, publish_model
    from server.registry.registry import Registry
    from server.registry.signing import generate_key

    schema = DatasetSchema(
        name="bench",
        features=(FeatureSpec("age", "float", 50.0, 10.0), FeatureSpec("visits", "int", 2.0, 1.5)),
        target="outcome",
        classes=("no", "yes"),
        input_shape=(2,),
        site_column=None,
    )
    roles = {
        "server": ["publisher"],
        "alice": ["clinical-lead"],
        "bob": ["privacy-officer"],
        "carol": ["data-steward"],
        "dana": ["release-manager"],
    }
    keys = {name: generate_key() for name in roles}
    registry = Registry(root / "registry", create=True)
    policy_path = root / "registry" / "policy.yaml"
    approvers = ["clinical-lead", "privacy-officer", "data-steward"]
    policy_path.write_text(
        yaml.safe_dump(
            {
                "principals": {
                    n: {"public_key": keys[n].public_key, "roles": r} for n, r in roles.items()
                },
                "aliases": {
                    "production": {
                        "quorum": 2,
                        "approver_roles": approvers,
                        "required_roles": ["privacy-officer"],
                        "promoter_roles": ["release-manager"],
                        "gates": {"max_epsilon": 10.0},
                    },
                    "staging": {"quorum": 1, "approver_roles": approvers},
                },
            }
        )
    )
    policy = registry.load_policy()
    for index in range(versions):
        run_id = run_ids[index % len(run_ids)]
        report = json.loads(
            (root / "runs" / f"run-{run_id[-2:]}" / "privacy_report.json").read_text()
        )
        torch.manual_seed(index)
        model = build_model("mlp", schema.input_shape, 2, 8)
        record = publish_model(
            registry,
            name="bench-mlp",
            weights=safetensors_bytes({k: v.contiguous() for k, v in model.state_dict().items()}),
            spec=ModelSpec("mlp", 8),
            schema=schema,
            run_config={"rounds": ROUNDS},
            lineage={
                "run_id": run_id,
                "dataset": "bench",
                "strategy": "fedavg",
                "rounds": ROUNDS,
                "rounds_completed": ROUNDS,
                "sites": sorted(SITES),
                "seed": index,
                "sites_per_round": [len(SITES)] * ROUNDS,
                "code_commit": None,
                "secure_aggregation": {"enabled": True, "settings": {}},
            },
            metrics={"final": {"central_eval_accuracy": 0.78}},
            privacy_report=report,
            key=keys["server"],
        )
        ref = ModelRef(record.name, record.version)
        if index % 2 == 0:
            decide(registry, ref, "approve", keys["alice"], policy, comment="looks right")
            decide(registry, ref, "approve", keys["bob"], policy, comment="budget ok")
        if index % 10 == 0:
            promote(registry, ref, "production", keys["dana"], policy)
    registry.close()


def time_pages(url: str, pages: list[str], repeats: int) -> list[tuple[str, float, float]]:
    """(page, cold seconds, warm median seconds) of each page."""
    import httpx

    rows = []
    with httpx.Client(timeout=600) as client:
        for page in pages:
            started = time.perf_counter()
            response = client.get(url + page)
            cold = time.perf_counter() - started
            if response.status_code != 200:
                raise SystemExit(f"{page}: HTTP {response.status_code}: {response.text[:200]}")
            warm = []
            for _ in range(repeats):
                started = time.perf_counter()
                client.get(url + page).raise_for_status()
                warm.append(time.perf_counter() - started)
            rows.append((page, cold, statistics.median(warm)))
    return rows


def _wait_for_port(server: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"fedgov console exited with status {server.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"fedgov console did not listen on port {port} within {timeout:g} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.console",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--versions", type=int, default=50, help="versions (default: 50)")
    parser.add_argument("--runs", type=int, default=20, help="run folders (default: 20)")
    parser.add_argument("--repeats", type=int, default=5, help="warm loads per page (default: 5)")
    parser.add_argument("--out", help="build the fixture here (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedgov-console-bench-") as tmp:
        root = Path(args.out or tmp)
        started = time.perf_counter()
        run_ids = build_runs(root, args.runs)
        build_registry(root, run_ids, args.versions)
        print(
            f"fixture: {args.versions} versions, {args.runs} runs × {ROUNDS} rounds × "
            f"{len(SITES)} sites, built in {time.perf_counter() - started:.1f} s"
        )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        argv = [
            sys.executable,
            "-m",
            "fedgov",
            "console",
            "--registry",
            str(root / "registry"),
            "--runs",
            str(root / "runs"),
            "--port",
            str(port),
        ]
        with open(root / "console.log", "wb") as log:
            server = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for_port(server, port, timeout=120)
            last = f"/models/bench-mlp/{args.versions}"
            pages = [
                "/",
                "/runs",
                f"/runs/run-{args.runs:02d}",
                "/models",
                last,
                f"{last}/statement",
                "/metrics",
                "/?format=json",
                "/models?format=json",
                f"{last}/statement.pdf",
            ]
            rows = time_pages(f"http://127.0.0.1:{port}", pages, args.repeats)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        print(f"{'page':<34} {'cold s':>8} {'warm s (median of ' + str(args.repeats) + ')':>24}")
        for page, cold, warm in rows:
            print(f"{page:<34} {cold:>8.3f} {warm:>24.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
