"""PNG curves of a finished run, drawn from its ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def write_plots(run_dir: str | Path) -> list[Path]:
    """Write ``plots/loss.png``, ``plots/accuracy.png`` and ``plots/participation.png``."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics["rounds"]
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    x = [r["round"] for r in rounds]
    written = []

    def curve(path: Path, title: str, ylabel: str, series: dict[str, str]) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in series.items():
            points = [
                (xi, r[key]) for xi, r in zip(x, rounds, strict=True) if r.get(key) is not None
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    curve(
        out / "loss.png",
        "Loss per round",
        "cross-entropy",
        {
            "train_loss": "train (sites)",
            "eval_loss": "eval (sites)",
            "central_eval_loss": "eval (central hold-out)",
        },
    )
    curve(
        out / "accuracy.png",
        "Accuracy per round",
        "accuracy",
        {"eval_accuracy": "eval (sites)", "central_eval_accuracy": "eval (central hold-out)"},
    )

    sites = sorted(metrics.get("sites", {})) or sorted(
        {s for r in rounds for s in r["participants"] + r.get("declined", [])}
    )
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(x) + 3), max(3, 0.25 * len(sites) + 1.5)))
    status = {"trained": 1.0, "declined": 0.5, "failed": 0.25}
    grid = [[0.0] * len(rounds) for _ in sites]
    for j, r in enumerate(rounds):
        for i, site in enumerate(sites):
            if site in r["participants"]:
                grid[i][j] = status["trained"]
            elif site in r.get("declined", []):
                grid[i][j] = status["declined"]
            elif site in r.get("failures", {}):
                grid[i][j] = status["failed"]
    ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(sites)), sites, fontsize=7 if len(sites) > 20 else 9)
    ax.set_xticks(range(len(x)), [str(v) for v in x])
    ax.set_xlabel("round")
    ax.set_title("Participation per site (dark: trained, mid: declined, light: failed)")
    fig.tight_layout()
    path = out / "participation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
