"""What differential privacy costs in fedgov: DP-SGD step time and federated accuracy at each ε.

    python -m benchmarks.privacy_utility [--quick] [--repeats 21] [--skip-accuracy] [--skip-opacus]

1. **Step time.** One thread (``torch.set_num_threads(1)``), the same data and model for every
   variant: non-private SGD (``clients.training.train_local``: a shuffled batch per step) against
   DP-SGD (``clients.dp_training.train_local_dp``: Poisson-sampled batches of the same expected
   size, per-record clipping, Gaussian noise) with fedgov's fused per-record clipping and with
   Opacus' grad-sample modes. Every timed run starts from the same weights (one non-private epoch
   in) and is short; the variants alternate run by run, so load from other processes on a shared
   machine hits all of them alike. Seconds per step are the median over ``--repeats`` runs, in
   wall time and in this thread's CPU time; each variant is warmed up first.
   - tabular MLP 40→128→64→2 on 5,000 rows at batch 256 (target: DP ≤ 2× non-private);
   - fedgov's small CNN on the 5,000 MNIST digits (28×28) at batch 64 (target: ≤ 1.3×).
2. **Accuracy at ε ∈ {1, 3, 8, ∞}.** Real runs of the simulation engine (Ray): sample-level DP with
   ``privacy.target_epsilon`` = ε (each site picks σ to spend ε over the run, δ = 1e-5), against
   the same recipe without DP (ε = ∞); central accuracy on the held-out rows.
   - RAND HIE, 6 natural sites (hospital-like), MLP;
   - MNIST-5k split iid over 5 sites: the small CNN, a linear head on fixed Gabor features
     (``model=gabor``, the DP-friendly image model) and logistic regression.
   DP runs and non-private runs each use their own tuned settings (``Recipe``). The target is
   ≥ 0.97 of the non-private federated accuracy at ε = 8, judged against the best non-private
   accuracy of any recipe on the same data set.

Each DP run uses fresh site folders (a fresh ledger per site) under a temporary directory. DP noise
comes from each site's secret key, so accuracies vary a little from run to run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

EPSILONS = (1.0, 3.0, 8.0, None)  # None = no DP (ε = ∞)
OPACUS_MODES = ("hooks", "ghost", "ew")


# ---- 1. step time --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepCase:
    name: str
    target: float
    batch_size: int
    steps: int


def _tabular_rows():
    import numpy as np

    from fedgov.datasets import Dataset, DatasetSchema

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 40)).astype(np.float32)
    y = (x[:, :5].sum(axis=1) + 0.5 * rng.normal(size=5000) > 0).astype(np.int64)
    schema = DatasetSchema("bench", (), "y", ("0", "1"), (40,), None)
    return Dataset(x=x, y=y, site=np.full(5000, "", dtype=object), schema=schema)


def _image_rows():
    from fedgov.datasets import load_dataset

    return load_dataset("mnist5k")


def _part(rows, count: int):
    """``count`` random rows of ``rows`` in a fresh C-ordered array, as a site's rows are held.

    NumPy's fancy indexing may give a length-1 axis (the channel of grey images) a stride of 1,
    which PyTorch reads as channels-last; the CNN then runs channels-last, with ≈ 10× faster
    max-pooling on CPU. A site's rows (``clients.site_data``) and the DP variant's rows are
    ordinary NCHW arrays, so the plain variant's part must be one too.
    """
    import numpy as np

    from fedgov.datasets import Dataset

    index = np.random.default_rng(0).permutation(len(rows.y))[:count]
    x = np.empty((len(index), *rows.x.shape[1:]), dtype=rows.x.dtype)
    x[...] = rows.x[index]
    return Dataset(x=x, y=rows.y[index], site=rows.site[index], schema=rows.schema)


_TRAINED: dict[str, dict] = {}


def _model(case: str, rows=None):
    """The model both variants time from: after one non-private epoch on ``rows`` (if given).

    A federated round starts from the global model, not from random weights; and on CPU some
    kernels (max-pooling's comparisons) run at a speed that depends on the activations, which
    drift apart within a few steps of random weights. Starting every timed run of every
    variant from the same trained weights compares the steps on equal terms.
    """
    import copy

    import torch

    from fedgov.models import MLP, SmallCNN

    torch.manual_seed(0)
    model = MLP(40, 2, 128) if case == "mlp" else SmallCNN((1, 28, 28), 10, 16)
    if rows is None:
        return model
    if case not in _TRAINED:
        from clients.training import train_local
        from fedgov.config import TrainConfig

        train_local(model, rows, TrainConfig(batch_size=64, lr=0.05), seed=0)
        _TRAINED[case] = copy.deepcopy(model.state_dict())
    model.load_state_dict(_TRAINED[case])
    return model


def _time_variant(
    case: str, rows, variant: str, batch_size: int, steps: int
) -> tuple[float, float]:
    """(wall, CPU) seconds per step of one timed run of ``variant`` (plain, fused, Opacus mode).

    Both kinds of run take exactly ``steps`` steps: the plain one one epoch over a random
    ``steps · batch_size`` rows (shuffled batches of ``batch_size``), the DP one ``steps`` Poisson-
    sampled batches of expected size ``batch_size`` from all rows. Model and data are built before
    the clock starts; optimizer, clipper and (for Opacus) ``make_private`` count. Opacus modes run
    four times as many steps, so that ``make_private``'s set-up weighs less on their step time.
    """
    from clients.dp_training import DpSgdPlan, train_local_dp
    from clients.training import train_local
    from fedgov.config import TrainConfig

    n = len(rows.y)
    model = _model(case, rows)
    if variant == "plain":
        part = _part(rows, steps * batch_size)  # random: the images are stored class by class
        settings = TrainConfig(local_epochs=1, batch_size=batch_size, lr=0.05)
        wall, cpu = time.perf_counter(), time.thread_time()
        result = train_local(model, part, settings, seed=1)
        return (time.perf_counter() - wall) / result.steps, (
            time.thread_time() - cpu
        ) / result.steps
    rate = 1.0 / -(-n // batch_size)  # as privacy.accounting.steps_per_round
    settings = TrainConfig(batch_size=batch_size, lr=0.05)
    if variant != "fused":  # longer runs: amortise make_private, which is not a step's cost
        steps *= 4
    plan = DpSgdPlan(1.0, rate, steps, 1.0, n)
    wall, cpu = time.perf_counter(), time.thread_time()
    train_local_dp(
        model, rows, settings, plan, sampling_seed=1, noise_seed=2, grad_sample_mode=variant
    )
    return (time.perf_counter() - wall) / plan.steps, (time.thread_time() - cpu) / plan.steps


def step_times(repeats: int, quick: bool, opacus: bool = True) -> list[dict[str, object]]:
    """Per-step times of every variant, timed in short runs interleaved with the plain ones.

    The machine may be shared: load that comes and goes hits whichever run is on the CPU, so the
    runs are short (≈ 0.1–0.3 s), the variants alternate run by run (order reversed every other
    repetition, ``plain`` always next to ``fused``), and each variant's time is the median of its
    ``repeats`` runs. ``ratio`` is wall time over plain's; ``cpu`` the same with this thread's CPU
    time (``time.thread_time``), which a descheduled process does not accrue.
    """
    import torch

    torch.set_num_threads(1)
    cases = [
        ("mlp", "tabular MLP 40→128→64→2, batch 256", 2.0, 256, 20 if quick else 40),
        ("cnn", "small CNN, MNIST 28×28, batch 64", 1.3, 64, 8 if quick else 16),
    ]
    rows_of = {"mlp": _tabular_rows(), "cnn": _image_rows()}
    variants = ("plain", "fused", *(OPACUS_MODES if opacus else ()))
    table = []
    for case, label, target, batch, steps in cases:
        rows = rows_of[case]
        for variant in variants:  # warm-up: lazy imports, allocator, Opacus' first hooks
            for _ in range(3):
                _time_variant(case, rows, variant, batch, steps)
        samples: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for repeat in range(repeats):
            order = variants if repeat % 2 == 0 else tuple(reversed(variants))
            for variant in order:
                samples[variant].append(_time_variant(case, rows, variant, batch, steps))
        plain_wall = statistics.median(wall for wall, _ in samples["plain"])
        plain_cpu = statistics.median(cpu for _, cpu in samples["plain"])
        for variant in variants:
            wall = statistics.median(w for w, _ in samples[variant])
            cpu = statistics.median(c for _, c in samples[variant])
            table.append(
                {
                    "case": label,
                    "variant": variant,
                    "ms_per_step": 1000 * wall,
                    "ratio": wall / plain_wall,
                    "cpu_ratio": cpu / plain_cpu,
                    "target": target,
                }
            )
    return table


# ---- 2. accuracy at each ε -----------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """A federation and model; ``public``/``private``: settings for the runs without / with DP.

    Each side gets its own tuned settings: DP-SGD wants larger batches, fewer steps and a step
    size matched to the clipping norm, while the non-private baseline is trained to convergence
    (not handicapped by the DP recipe's short schedule).
    """

    label: str
    overrides: dict[str, object]
    public: dict[str, object]
    private: dict[str, object]


MNIST_5K = {"dataset.name": "mnist5k", "dataset.partitioner": "iid", "federation.num_sites": 5}
RECIPES = (
    Recipe(
        "RAND HIE, 6 natural sites, MLP",
        {
            "dataset.name": "randhie",
            "model.name": "mlp",
            "federation.num_sites": 6,
            "rounds": 10,
            "train.batch_size": 256,
            "train.lr": 0.5,
        },
        {},
        {},
    ),
    Recipe(
        "MNIST-5k, 5 iid sites, small CNN",
        {**MNIST_5K, "model.name": "cnn"},
        {"rounds": 30, "train.batch_size": 32, "train.lr": 0.05},
        {"rounds": 15, "train.batch_size": 128, "train.lr": 0.5, "privacy.max_grad_norm": 1.0},
    ),
    Recipe(
        "MNIST-5k, 5 iid sites, Gabor features+linear",
        {**MNIST_5K, "model.name": "gabor"},
        {"rounds": 30, "train.batch_size": 128, "train.lr": 0.1},
        # conf/privacy/sample_dp_images.yaml
        {"rounds": 15, "train.batch_size": 320, "train.lr": 2.0, "privacy.max_grad_norm": 1.0},
    ),
    Recipe(
        "MNIST-5k, 5 iid sites, logistic regression",
        {
            **MNIST_5K,
            "model.name": "logreg",
            "rounds": 15,
            "train.batch_size": 128,
            "train.lr": 0.5,
        },
        {},
        {},
    ),
)


def _run(recipe: Recipe, eps: float | None, work: Path, quick: bool) -> dict[str, object]:
    import json

    from fedgov.config import RunConfig, from_flower_config, to_flower_config
    from simulations.engine import run_simulation

    side = recipe.public if eps is None else recipe.private
    flat = {**to_flower_config(RunConfig()), **recipe.overrides, **side, "progress": False}
    if quick:
        flat["rounds"] = max(2, int(flat["rounds"]) // 3)
    name = f"{recipe.overrides['dataset.name']}-{recipe.overrides['model.name']}-{eps or 'inf'}"
    flat["output_dir"] = str(work / name)
    if eps is not None:
        flat.update(
            {
                "privacy.name": "sample_dp",
                "privacy.target_epsilon": eps,
                "privacy.site_epsilon_cap": eps,
                "federation.sites_dir": str(work / name / "sites"),
            }
        )
    cfg = from_flower_config(flat)
    started = time.perf_counter()
    run_simulation(cfg)
    seconds = time.perf_counter() - started
    metrics = json.loads((Path(cfg.output_dir) / "metrics.json").read_text())
    spent = None
    if eps is not None:
        report = json.loads((Path(cfg.output_dir) / "privacy_report.json").read_text())
        spent = max(site["epsilon"] for site in report["sample_level"]["sites"].values())
    return {
        "accuracy": metrics["final"]["central_eval_accuracy"],
        "seconds": seconds,
        "epsilon_spent": spent,
    }


def accuracies(quick: bool, only: str = "") -> list[dict[str, object]]:
    """Every recipe at every ε. ``of_own``: accuracy over the recipe's own non-private one;
    ``of_best``: over the best non-private accuracy of any recipe on the same data set (the
    federation trained as well as this benchmark knows how), which the target is judged on."""
    rows = []
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fedgov-privacy-bench-") as tmp:
        for recipe in RECIPES:
            if only and only.lower() not in recipe.label.lower():
                continue
            results = {eps: _run(recipe, eps, Path(tmp), quick) for eps in EPSILONS}
            baseline = results[None]["accuracy"]
            dataset = str(recipe.overrides["dataset.name"])
            best[dataset] = max(best.get(dataset, 0.0), baseline)
            for eps, result in results.items():
                rows.append(
                    {
                        "recipe": recipe.label,
                        "dataset": dataset,
                        "epsilon": eps,
                        **result,
                        "of_own": result["accuracy"] / baseline,
                    }
                )
    for row in rows:
        row["of_best"] = row["accuracy"] / best[row["dataset"]]
    return rows


# ---- the tables ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed runs per variant")
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--skip-accuracy", action="store_true", help="step times only")
    parser.add_argument("--skip-opacus", action="store_true", help="time fedgov's DP-SGD only")
    parser.add_argument("--only", default="", help="accuracy: recipes whose label contains this")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from simulations.engine import quiet_flower_logs, set_flower_environment

    set_flower_environment()
    quiet_flower_logs()
    print(
        f"DP-SGD step time (1 thread, median of {args.repeats} interleaved runs; ratio to "
        "non-private in wall time, and in this thread's CPU time)"
    )
    print(f"{'case':<38} {'variant':<8} {'ms/step':>8} {'ratio':>6} {'cpu':>6}  target")
    for row in step_times(args.repeats, args.quick, opacus=not args.skip_opacus):
        mark = (
            "" if row["variant"] == "plain" else ("ok" if row["ratio"] <= row["target"] else "over")
        )
        print(
            f"{row['case']:<38} {row['variant']:<8} {row['ms_per_step']:>8.3f} "
            f"{row['ratio']:>5.2f}× {row['cpu_ratio']:>5.2f}×  ≤ {row['target']}× {mark}",
            flush=True,
        )
    if args.skip_accuracy:
        return
    print("\nFederated central accuracy by ε (sample-level DP, δ = 1e-5; ∞ = no DP); 'of ∞':")
    print("over the recipe's own non-private accuracy; 'of best': over the best non-private one")
    print("on the same data set (the target: ≥ 0.97 at ε = 8)")
    print(
        f"{'recipe':<46} {'ε':>4} {'spent':>6} {'accuracy':>9} {'of ∞':>6} {'of best':>7} "
        f"{'seconds':>8}"
    )
    for row in accuracies(args.quick, args.only):
        eps = "∞" if row["epsilon"] is None else f"{row['epsilon']:g}"
        spent = "-" if row["epsilon_spent"] is None else f"{row['epsilon_spent']:.2f}"
        note = ""
        if row["epsilon"] == 8.0:
            note = "  ok (≥ 0.97)" if row["of_best"] >= 0.97 else "  below 0.97"
        print(
            f"{row['recipe']:<46} {eps:>4} {spent:>6} {row['accuracy']:>9.4f} "
            f"{row['of_own']:>6.3f} {row['of_best']:>7.3f} {row['seconds']:>8.1f}{note}",
            flush=True,
        )


if __name__ == "__main__":
    main()
