"""fedgov's simulation against a plain Flower FedAvg app at scale: wall time, peak memory, accuracy.

    python -m benchmarks.simulation_scale [--sites 100] [--rounds 10] [--repeats 1] [--quick]

Both variants do the same work on the same data: the ``synthetic`` dataset split into ``--sites``
natural sites (``simulated_federation``), fedgov's MLP with the same initial weights, one local SGD
epoch per round (batch 32, lr 0.05, momentum 0.9) with the same shuffling seeds, training and local
evaluation on every site every round, and central evaluation on the same held-out rows. The plain
variant is ``benchmarks._plain_flower_app`` (``FedAvg.start`` + ``flwr.simulation.run_simulation``);
the fedgov variant is ``simulations.engine.run_simulation``. Both run on Ray with one CPU per site.

Each run is a fresh ``python -m benchmarks.simulation_scale --variant ...`` subprocess, so Ray
starts fresh every time and memory is measured per run: the parent samples the resident memory
(RSS and PSS, from /proc) of the subprocess's whole process tree, Ray's raylet/GCS/workers
included, and the child reports ``getrusage`` max RSS (its own and that of the processes it
reaped). The order of a pair alternates (plain, fedgov / fedgov, plain / ...) to spread drift
over both variants.

``--quick`` is 10 sites × 3 rounds. The target is fedgov ≤ 1.3× plain in median wall seconds and in
median peak process-tree memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedgov.deploy import FLOWER_ENVIRONMENT

VARIANTS = ("plain", "fedgov")
TARGET_RATIO = 1.3
SEED = 0
HIDDEN = 64
LOCAL_EPOCHS = 1
BATCH_SIZE = 32
LR = 0.05
MOMENTUM = 0.9
TEST_FRACTION = 0.2

# Every run sets fedgov's Flower environment, plus one thread per BLAS pool.
FLOWER_ENV = {**FLOWER_ENVIRONMENT, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---- one variant, inside its own subprocess -----------------------------------------------------


def _maxrss_mb() -> tuple[float, float]:
    """(this process's max RSS, the largest reaped descendant's max RSS) in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def _run_fedgov(sites: int, rounds: int, work: Path) -> dict[str, object]:
    from fedgov.config import RunConfig
    from simulations.engine import run_simulation

    output = work / "fedgov-output"
    cfg = RunConfig(rounds=rounds, seed=SEED, output_dir=str(output), progress=False)
    cfg.dataset.name, cfg.dataset.partitioner = "synthetic", "natural"
    cfg.dataset.test_fraction = TEST_FRACTION
    cfg.model.name, cfg.model.hidden = "mlp", HIDDEN
    cfg.strategy.name = "fedavg"
    cfg.train.local_epochs, cfg.train.batch_size = LOCAL_EPOCHS, BATCH_SIZE
    cfg.train.lr, cfg.train.momentum = LR, MOMENTUM
    cfg.federation.num_sites, cfg.federation.sites_per_round = sites, 0.0
    started = time.perf_counter()
    run_simulation(cfg)
    seconds = time.perf_counter() - started
    metrics = json.loads((output / "metrics.json").read_text())
    return {
        "sim_seconds": seconds,
        "eval_accuracy": metrics["final"]["eval_accuracy"],
        "central_eval_accuracy": metrics["final"]["central_eval_accuracy"],
        "rounds_done": len(metrics["rounds"]),
        "round_seconds": [r["seconds"] for r in metrics["rounds"]],
    }


def _run_plain(sites: int, rounds: int, work: Path) -> dict[str, object]:
    from benchmarks import _plain_flower_app as plain

    result_path = work / "plain-result.json"
    settings = plain.PlainSettings(
        sites=sites,
        rounds=rounds,
        seed=SEED,
        hidden=HIDDEN,
        local_epochs=LOCAL_EPOCHS,
        batch_size=BATCH_SIZE,
        lr=LR,
        momentum=MOMENTUM,
        test_fraction=TEST_FRACTION,
        result_path=str(result_path),
    )
    os.environ[plain.PLAIN_APP_ENV] = plain.encode_settings(settings)  # Ray workers inherit it
    from flwr.simulation import run_simulation

    started = time.perf_counter()
    run_simulation(
        server_app=plain.server_app,
        client_app=plain.client_app,
        num_supernodes=sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    seconds = time.perf_counter() - started
    final = json.loads(result_path.read_text())
    return {"sim_seconds": seconds, **final}


def child_main(variant: str, sites: int, rounds: int, work: Path, result: Path) -> None:
    """Run one variant in this process and write its measurements to ``result`` (JSON)."""
    import torch

    torch.set_num_threads(1)
    runner = _run_fedgov if variant == "fedgov" else _run_plain
    measured = runner(sites, rounds, work)
    rounds_s = list(measured.get("round_seconds") or [])
    steady = rounds_s[1:] or rounds_s  # round 1 also absorbs the actors' start-up
    measured["steady_round_seconds"] = statistics.median(steady) if steady else None
    own, children = _maxrss_mb()
    measured.update(maxrss_self_mb=own, maxrss_children_mb=children)
    result.write_text(json.dumps(measured))


# ---- the parent: subprocesses, memory sampling, the table ---------------------------------------

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def _process_tree(root: int) -> dict[int, int]:
    """pid → start time of ``root`` and all its descendants, read from /proc."""
    parent_of: dict[int, int] = {}
    started: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            info = _stat(int(entry.name))
            if info is not None:
                parent_of[int(entry.name)], started[int(entry.name)] = info
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in started:
            tree[pid] = started[pid]
            todo.extend(children.get(pid, ()))
    return tree


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in KiB; zeros when it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/statm") as handle:
            rss = int(handle.read().split()[1]) * PAGE_KB
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss


def _describe(pid: int) -> str:
    """A short name for ``pid``: Ray's process title, or the program (and Python module/script)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    name = Path(argv[0]).name
    if name.startswith("python"):
        rest = [a for a in argv[1:] if not a.startswith("-")]
        if "-m" in argv:
            return f"python -m {argv[argv.index('-m') + 1]}"
        return f"python {Path(rest[0]).parent.name}/{Path(rest[0]).name}" if rest else name
    return name


@dataclass
class TreeSampler:
    """Samples the summed RSS/PSS of a process tree every ``interval`` seconds, in a thread."""

    root: int
    interval: float = 0.2
    peak_rss_kb: int = 0
    peak_pss_kb: int = 0
    peak_processes: int = 0
    peak_breakdown: list[tuple[str, float]] = field(default_factory=list)  # (process, RSS MB)
    seen: dict[int, int] = field(default_factory=dict)  # pid → start time
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            tree = _process_tree(self.root)
            self.seen.update(tree)
            rss = pss = 0
            per_process = {}
            for pid in tree:
                r, p = _memory_kb(pid)
                rss, pss = rss + r, pss + p
                per_process[pid] = r
            if rss > self.peak_rss_kb:
                self.peak_breakdown = sorted(
                    ((_describe(pid), kb / 1024) for pid, kb in per_process.items()),
                    key=lambda item: -item[1],
                )
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self.peak_processes = max(self.peak_processes, len(tree))
            self._stop.wait(self.interval)


def _leftovers(seen: dict[int, int]) -> list[int]:
    """Processes of a finished run's tree that are still alive (same pid and start time)."""
    alive = []
    for pid, started in seen.items():
        info = _stat(pid)
        if info is not None and info[1] == started:
            alive.append(pid)
    return alive


def _reap_leftovers(seen: dict[int, int], grace: float = 15.0) -> int:
    """Wait for a run's processes (Ray's) to exit; end stragglers. Returns how many were left."""
    deadline = time.monotonic() + grace
    while (alive := _leftovers(seen)) and time.monotonic() < deadline:
        time.sleep(0.25)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _leftovers(seen):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        if _leftovers(seen):
            time.sleep(2.0)
    return len(alive)


def run_variant(
    variant: str, sites: int, rounds: int, work: Path, interval: float
) -> dict[str, object]:
    """Run one variant in a fresh subprocess; return its measurements (``error`` on failure)."""
    work.mkdir(parents=True, exist_ok=True)
    result = work / "result.json"
    log = work / "output.log"
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(work / "flwr-home")}
    command = [sys.executable, "-m", "benchmarks.simulation_scale", "--variant", variant]
    command += ["--sites", str(sites), "--rounds", str(rounds)]
    command += ["--work-dir", str(work), "--result", str(result)]
    root = Path(__file__).resolve().parent.parent
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, interval)
        thread = sampler.start()
        code = proc.wait()
    wall = time.perf_counter() - started
    sampler.stop()
    thread.join()
    leftover = _reap_leftovers(sampler.seen)
    measured: dict[str, object] = {
        "variant": variant,
        "wall_seconds": wall,
        "peak_tree_rss_mb": sampler.peak_rss_kb / 1024,
        "peak_tree_pss_mb": sampler.peak_pss_kb / 1024,
        "peak_processes": sampler.peak_processes,
        "peak_breakdown": [(name, round(mb)) for name, mb in sampler.peak_breakdown],
        "leftover_processes": leftover,
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "log": str(log),
    }
    if code != 0 or not result.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        measured["error"] = f"exit code {code}; output tail:\n{tail}"
        return measured
    measured.update(json.loads(result.read_text()))
    return measured


def _median(runs: list[dict[str, object]], key: str) -> float | None:
    values = [float(r[key]) for r in runs if r.get(key) is not None]  # type: ignore[arg-type]
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


COLUMNS = (
    ("wall_seconds", "wall s", ".1f", True),
    ("sim_seconds", "sim s", ".1f", True),
    ("steady_round_seconds", "round s", ".2f", True),
    ("peak_tree_rss_mb", "tree RSS MB", ".0f", True),
    ("peak_tree_pss_mb", "tree PSS MB", ".0f", True),
    ("maxrss_self_mb", "driver maxRSS MB", ".0f", False),
    ("eval_accuracy", "site acc", ".4f", False),
    ("central_eval_accuracy", "central acc", ".4f", False),
)


def summarise(
    runs: list[dict[str, object]], sites: int, rounds: int, repeats: int
) -> dict[str, object]:
    """Medians per variant, fedgov/plain ratios and the verdict; prints the table."""
    by_variant = {v: [r for r in runs if r["variant"] == v and "error" not in r] for v in VARIANTS}
    medians = {v: {key: _median(by_variant[v], key) for key, *_ in COLUMNS} for v in VARIANTS}
    ratios = {}
    for key, _, _, is_cost in COLUMNS:
        plain, fedgov = medians["plain"][key], medians["fedgov"][key]
        if is_cost and plain and fedgov is not None:
            ratios[key] = fedgov / plain
    print(f"\n{sites} sites × {rounds} rounds, {repeats} pair(s); medians over runs")
    widths = [8, *(max(len(label), 8) for _, label, _, _ in COLUMNS)]
    header = ["variant", *(label for _, label, _, _ in COLUMNS)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for v in VARIANTS:
        cells = [v, *(_fmt(medians[v][key], spec) for key, _, spec, _ in COLUMNS)]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    cells = [
        "fg/plain",
        *(_fmt(ratios.get(key), ".2f") + "×" * (key in ratios) for key, *_ in COLUMNS),
    ]
    print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    verdicts = {}
    for key, label in (("wall_seconds", "wall time"), ("peak_tree_rss_mb", "peak memory (RSS)")):
        ratio = ratios.get(key)
        verdicts[key] = None if ratio is None else ratio <= TARGET_RATIO
        mark = "n/a" if ratio is None else ("PASS" if ratio <= TARGET_RATIO else "FAIL")
        print(f"target fedgov/plain ≤ {TARGET_RATIO}× {label}: {_fmt(ratio, '.2f')}× {mark}")
    accs = [medians[v]["eval_accuracy"] for v in VARIANTS]
    if None not in accs:
        diff = abs(accs[0] - accs[1])  # type: ignore[operator]
        print(
            f"final site accuracy: plain {accs[0]:.4f}, fedgov {accs[1]:.4f} (|Δ| {diff:.4f}; "
            f"{'same work' if diff <= 0.02 else 'DIFFERENT — check the setups'})"
        )
    for v in VARIANTS:
        if by_variant[v]:
            parts = by_variant[v][0]["peak_breakdown"]  # type: ignore[union-attr]
            shown = ", ".join(f"{name} {mb}" for name, mb in parts[:8])  # type: ignore[union-attr]
            print(f"{v} RSS MB per process at its peak (first run): {shown}")
    busiest = max((max(r["load_avg_1min"]) for r in runs), default=0.0)  # type: ignore[type-var]
    if busiest > (os.cpu_count() or 1):
        print(
            f"note: the machine was busy (1-min load average up to {busiest:.1f} on "
            f"{os.cpu_count()} CPUs): timings are noisy; use --repeats and a quiet machine"
        )
    for r in runs:
        if "error" in r:
            print(f"\n{r['variant']} failed: {r['error']}", file=sys.stderr)
    return {"medians": medians, "ratios": ratios, "pass": verdicts, "runs": runs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="10 sites × 3 rounds")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (order alternates)")
    parser.add_argument("--only", choices=VARIANTS, help="run one variant only")
    parser.add_argument("--sample-interval", type=float, default=0.2, help="memory sampling, s")
    parser.add_argument("--json", type=Path, help="also write all measurements here")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders and logs")
    # internal: one variant inside the subprocess
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sites, args.rounds = 10, 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        child_main(args.variant, args.sites, args.rounds, args.work_dir, args.result)
        return 0
    base = Path(tempfile.mkdtemp(prefix="fedgov-simscale-"))
    runs: list[dict[str, object]] = []
    for pair in range(args.repeats):
        order = VARIANTS if pair % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            if args.only and variant != args.only:
                continue
            print(
                f"[{pair + 1}/{args.repeats}] {variant}: {args.sites} sites × {args.rounds} "
                "rounds ...",
                end=" ",
                flush=True,
            )
            run = run_variant(
                variant, args.sites, args.rounds, base / f"{pair}-{variant}", args.sample_interval
            )
            runs.append(run)
            status = "FAILED" if "error" in run else f"{run['wall_seconds']:.1f} s"
            load = "→".join(f"{v:.1f}" for v in run["load_avg_1min"])  # type: ignore[attr-defined]
            memory = f"peak tree RSS {run['peak_tree_rss_mb']:.0f} MB"
            print(f"{status}, {memory} (load {load})", flush=True)
    summary = summarise(runs, args.sites, args.rounds, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    if args.keep:
        print(f"run folders and logs: {base}")
    else:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
