"""``fedgov demo``: a federation of hospital sites trained end to end on embedded defaults."""

from __future__ import annotations

import sys
from pathlib import Path

from fedgov.errors import FedgovError

# The demo's embedded defaults, as Hydra overrides of conf/config.yaml.
DEMO_OVERRIDES = [
    "dataset=randhie",  # 6 natural sites of the RAND Health Insurance Experiment
    "model=mlp",
    "strategy=fedavg",
    "federation.num_sites=6",
    "seed=0",
    # Sample-level DP at every hospital: DP-SGD with σ chosen to spend ε = 3 over the run, each
    # site enforcing its own cap of 8 across runs (its ledger persists under DIR/sites).
    "privacy=sample_dp",
    "privacy.target_epsilon=3.0",
    "privacy.site_epsilon_cap=8.0",
    # SecAgg+: the server learns only the sum of the hospitals' updates, never one of them.
    "secagg=secaggplus",
]


def run_demo(out: str | Path, rounds: int = 5) -> dict:
    """Run the demo federation; everything goes under ``out``; returns metrics.json's data."""
    from simulations.run import compose_config, run_from_hydra

    out = Path(out).resolve()
    run_dir = out / "run"
    if out.exists() and not out.is_dir():
        raise FedgovError(f"--out: {out} exists and is not a folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    from server.registry.demo import prepare_keys, registry_overrides

    public_keys = prepare_keys(out)  # demo principals' keys under DIR/keys (made once)
    cfg = compose_config(
        [
            *DEMO_OVERRIDES,
            f"rounds={rounds}",
            f"federation.sites_dir={out / 'sites'}",
            *registry_overrides(out),
        ]
    )
    print(
        f"fedgov demo: {rounds} rounds of federated training across 6 hospital sites "
        "(RAND HIE, Flower simulation engine)",
        flush=True,
    )
    metrics = run_from_hydra(cfg, run_dir)
    print_summary(metrics, run_dir)
    print_privacy(run_dir, out / "sites")
    print_governance(out, run_dir, public_keys)
    print_console(out)
    return metrics


def print_console(out: Path) -> None:
    """The command that opens the governance console over this demo's registry and runs."""
    import os
    import shlex

    def shown(path: Path) -> str:
        relative = os.path.relpath(path)
        return shlex.quote(relative if not relative.startswith("..") else str(path))

    sys.stdout.write(
        "\n Governance console (privacy budgets, runs, approvals; read-only, 127.0.0.1):\n"
        f"   fedgov console --registry {shown(out / 'registry')} --runs {shown(out)}\n"
    )
    sys.stdout.flush()


def print_governance(out: Path, run_dir: Path, public_keys: dict[str, str]) -> None:
    """Write the demo policy for the published candidate; print the commands to govern it."""
    from server.registry.demo import demo_policy, governance_commands, write_policy
    from server.registry.governance import gate_report
    from server.registry.registry import Registry

    registry = Registry(out / "registry")
    with registry.store.read() as session:
        candidates = [
            v
            for v in registry.store.versions(session)
            if v.manifest["lineage"].get("run_dir") == str(run_dir)
        ]
    if not candidates:
        raise FedgovError(f"demo: the run in {run_dir} published no model to {registry.path}")
    record = candidates[-1]
    policy_path = write_policy(out, demo_policy(public_keys, record.manifest))
    policy = registry.load_policy(policy_path)
    with registry.store.read() as session:
        gates = gate_report(registry, session, record, policy, "production")
    registry.close()
    write = sys.stdout.write
    write(f"\n registry        {registry.path}\n")
    write(
        f"   candidate     {record.ref} (manifest sha256 {record.manifest_sha256[:16]}…, "
        "signed by fl-server)\n"
    )
    write(
        f"   policy        {policy_path} (signed version {policy.version}; alice and bob "
        "sign policy changes)\n"
    )
    write(f"   keys          {out / 'keys'} (demo principals: {', '.join(public_keys)})\n")
    write("   gates of @production now:\n")
    for gate in gates.results:
        write(f"     {'ok  ' if gate.passed else 'todo'} {gate.gate}: {gate.detail}\n")
    write("\n Govern it: approve (2 of 3, one the privacy officer), promote, serve:\n")
    for what, command in governance_commands(out, record.ref):
        write(f"   # {what}\n   {command}\n")
    sys.stdout.flush()


def print_summary(metrics: dict, run_dir: Path) -> None:
    """A short per-round table and the paths the run wrote."""
    write = sys.stdout.write
    write("\n round  sites  train loss  site accuracy  hold-out accuracy\n")
    for r in metrics["rounds"]:
        write(
            f" {r['round']:>5}  {len(r['participants']):>5}  {_num(r['train_loss']):>10}"
            f"  {_num(r['eval_accuracy']):>13}  {_num(r['central_eval_accuracy']):>17}\n"
        )
    sites = ", ".join(
        f"{site} ({info['num_train']} rows)" for site, info in metrics["sites"].items()
    )
    write(f"\n sites: {sites}\n")
    secure = [r for r in metrics["rounds"] if r.get("secagg")]
    if secure:
        dropped = sum(len(r.get("dropouts") or {}) for r in secure)
        aborted = sum(1 for r in secure if r.get("aborted"))
        write(
            f" secure aggregation: SecAgg+ in {len(secure)} rounds; the server saw only the sum "
            f"of the sites' updates (threshold {secure[-1]['secagg']['threshold']} of "
            f"{secure[-1]['secagg']['sites']}; {dropped} dropouts, {aborted} aborted rounds)\n"
        )
    write(f" wall time: {metrics['wall_seconds']:.1f} s\n\n")
    write(f" run directory   {run_dir}\n")
    for name in (
        "metrics.json",
        "model.safetensors",
        "plots/accuracy.png",
        "plots/loss.png",
        "plots/participation.png",
    ):
        write(f"   {name:<24} {run_dir / name}\n")
    sys.stdout.flush()


def print_privacy(run_dir: Path, sites_dir: Path) -> None:
    """Each site's ε against its cap, and where the privacy report is."""
    import json

    report_path = run_dir / "privacy_report.json"
    if not report_path.is_file():
        return
    report = json.loads(report_path.read_text())
    write = sys.stdout.write
    sample = report.get("sample_level") or {}
    write("\n privacy (sample-level DP, each site enforcing its own cap)\n")
    for site_id, site in sample.get("sites", {}).items():
        declined = ", ".join(map(str, site["declined_rounds"])) or "none"
        write(
            f"   {site_id:<10} ε {site['epsilon']:.2f} of cap {site['cap']:g}"
            f" · declined rounds: {declined}\n"
        )
    verified = report.get("verification", {}).get("ok")
    write(f"   receipts verified: {'yes' if verified else 'NO'}\n")
    write(f"   privacy report   {run_dir / 'privacy_report.html'}\n")
    write(f"                    {report_path}\n")
    write(f"   site ledgers     {sites_dir}/<site-id>/privacy_ledger.json (kept across runs)\n")
    write(f"   re-verify        fedgov privacy report {run_dir} --format md\n")
    sys.stdout.flush()


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
