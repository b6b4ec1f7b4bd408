"""Seconds per round on a real federation: Flower's stock SuperNode against fedgov's site daemon.

    python -m benchmarks.deployment [--rounds 4] [--runtimes stock,zygote,zygote+fast-poll]
                                    [--dataset randhie]
                                    [--sites 3[,10]] [--privacy] [--secagg] [--keep] [--json PATH]

``--privacy`` / ``--secagg`` run every configuration twice: plain and with sample-level DP at
each site and/or SecAgg+ (``privacy=sample_dp``, ``secagg=secaggplus``); ``--sites 3,10`` runs
each site count; a closing summary lists s/round and CPU-s/round of every configuration.

Each runtime gets a fresh federation on 127.0.0.1 built with fedgov's own code paths: the CA and
server certificate (``fedgov server certs``' function), a coordinator (``fedgov server start``:
a SuperLink with TLS and SuperNode authentication), the ``--sites`` largest natural sites of
``--dataset`` each as its own CSV + schema (``fedgov site init``'s function), their keys
registered (``fedgov server add-site``'s function), the site daemons (``fedgov site start``) and
the run (``fedgov run dataset=... federation.num_sites=... rounds=...``). Same app, same data,
same config; only the site runtime differs:

- ``stock``: ``fedgov site start --stock-executor``: Flower's SuperNode loop with ``--isolation
  subprocess`` and Flower's SuperExec: a fresh ClientApp interpreter per message, Flower's
  pauses (3 s after an empty pull, 0.5 s polls for the reply, 1 s SuperExec polls);
- ``zygote``: ``--stock-supernode``: fedgov's forking SuperExec, Flower's own SuperNode pauses;
- ``zygote+fast-poll``: the default daemon: forking SuperExec and the SuperNode's pauses bounded.

Timing starts once every site has joined (and, for fedgov's runtimes, its zygote has warmed up:
a site daemon does that once, when it starts). A round is as many messages per site as the
round code sends (a plain round: train and evaluate; under SecAgg+ its stages too).
Reported: seconds per round (median of rounds 2..N; round 1 separately, as it absorbs the first
task of a new app on each site), messages per site per round, each site's busy time per round
(from receiving a message to having sent its reply, by the timestamps of the SuperNode's log
lines, read as they are written), from these the overhead per message outside the sites, and
CPU seconds per round of every process of the federation (SuperLink, SuperNodes, ClientApps,
ServerApp...): on a machine with few cores a round is CPU-bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from clients.daemon import STOCK, ZYGOTE, ZYGOTE_FAST_POLL

RUNTIMES = (STOCK, ZYGOTE, ZYGOTE_FAST_POLL)
RUNTIME_FLAGS = {STOCK: ["--stock-executor"], ZYGOTE: ["--stock-supernode"], ZYGOTE_FAST_POLL: []}
LABELS = {
    STOCK: "stock Flower (subprocess isolation)",
    ZYGOTE: "fedgov executor, Flower pauses",
    ZYGOTE_FAST_POLL: "fedgov daemon",
}
TARGET_SECONDS = 3.0
LIMIT_SECONDS = 6.0
TAG_VARIABLE = "FEDGOV_BENCHMARK_TAG"
START_TIMEOUT = 90.0
FEDGOV = [sys.executable, "-m", "fedgov"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RECEIVING = re.compile(r"Receiving: (\S+) message")
SENT = "Sent successfully"


# ---- processes: logs with timestamps, nothing left behind -----------------------------------


@dataclass
class Started:
    name: str
    popen: subprocess.Popen
    log_path: Path
    lines: list[tuple[float, str]] = field(default_factory=list)

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


class Processes:
    """Started processes (each a new session, tagged), their output timestamped line by line."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        self.started: list[Started] = []

    def start(self, name: str, argv: list[str], cwd: Path) -> Started:
        env = {**os.environ, TAG_VARIABLE: self.tag, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        started = Started(name, popen, self.log_dir / f"{name}.log")
        self.started.append(started)

        def pump() -> None:
            assert popen.stdout is not None
            with open(started.log_path, "w") as log:
                for line in popen.stdout:
                    stamp, clean = time.monotonic(), ANSI.sub("", line)
                    started.lines.append((stamp, clean))
                    log.write(f"{stamp:.3f} {clean}")
                    log.flush()

        threading.Thread(target=pump, daemon=True).start()
        return started

    def _tagged(self) -> set[int]:
        tag = f"{TAG_VARIABLE}={self.tag}".encode()
        found = set()
        for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if tag in (entry / "environ").read_bytes().split(b"\0"):
                        stat = (entry / "stat").read_text()
                        if stat[stat.rindex(")") + 2] not in "ZX":
                            found.add(int(entry.name))
        return found

    def stop_all(self, grace: float = 15.0) -> None:
        """Ask politely (SIGTERM: the daemons stop their SuperNode and SuperExec), then kill."""
        for proc in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.popen.poll() is None for p in self.started):
            time.sleep(0.1)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.popen.pid, sig)
            for pid in self._tagged():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            end = time.monotonic() + 5
            while time.monotonic() < end and self._tagged():
                time.sleep(0.1)
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)


#: Process kinds for the CPU breakdown, by command line (first match wins).
KINDS = (
    ("serverapp", "flwr-serverapp"),
    ("superlink", "flower-superlink"),
    ("superlink", "server.superlink"),
    ("process guards", "fedgov.process_guard"),
    ("clientapp (stock)", "flwr-clientapp"),
    ("zygote + forked ClientApps", "clients.zygote"),
    ("site superexec", "clients.superexec"),
    ("site superexec", "flower-superexec --insecure"),
    ("superlink superexec", "flower-superexec"),
    ("supernode", "supernode"),
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """CPU seconds of every process under the started ones, by kind, sampled while a run is on.

    Each process counts its own CPU time (user + system), from 0 for processes started during
    the run; forked ClientApps count as the zygote's kind. The last < 0.25 s of a process that
    exits between two samples is missed, so the numbers are lower bounds.
    """

    def __init__(self, roots: list[int]) -> None:
        self.roots = set(roots)
        self.first: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], float] = {}
        self.kind: dict[tuple[int, int], str] = {}
        self._initial = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        table: dict[int, tuple[int, int, float]] = {}  # pid -> (ppid, start time, CPU seconds)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
                table[int(entry.name)] = (int(fields[1]), int(fields[19]), cpu)
        ours = set(self.roots)
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _, _) in table.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    grew = True
        for pid in ours & set(table):
            _, started, cpu = table[pid]
            key = (pid, started)  # a reused pid is another process
            if key not in self.kind:
                with contextlib.suppress(OSError):
                    command = (Path("/proc") / str(pid) / "cmdline").read_bytes()
                    text = command.replace(b"\0", b" ").decode(errors="replace")
                    self.kind[key] = next((k for k, p in KINDS if p in text), "other")
            self.first.setdefault(key, cpu if self._initial else 0.0)
            self.last[key] = cpu

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.25)

    def start(self) -> None:
        self._initial = True
        self._sample()
        self._initial = False
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """CPU seconds per kind since :meth:`start`."""
        self._stop.set()
        self._thread.join()
        self._sample()
        used: dict[str, float] = {}
        for key, cpu in self.last.items():
            kind = self.kind.get(key, "other")
            used[kind] = used.get(kind, 0.0) + cpu - self.first[key]
        return dict(sorted(used.items(), key=lambda item: -item[1]))


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _wait(condition, timeout: float, what: str, processes: list[Started]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in processes:
            if proc.popen.poll() is not None:
                raise RuntimeError(
                    f"{proc.name} exited ({proc.popen.returncode}) waiting for "
                    f"{what}:\n{proc.text()[-3000:]}"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ---- one runtime ----------------------------------------------------------------------------


def site_files(root: Path, dataset: str, count: int) -> list[tuple[str, Path, Path]]:
    """The ``count`` largest natural sites of ``dataset``: (site id, CSV, schema) each.

    A dataset with fewer natural sites than ``count`` (randhie has 6) is cut, in the order of its
    natural sites, into ``count`` contiguous parts of near-equal size (``part-01``, ...).
    """
    import numpy as np

    from fedgov.datasets import load_dataset, load_table

    table = load_table(dataset)
    schema = load_dataset(dataset).schema
    column = schema.site_column
    natural = table[column].value_counts().index
    if count <= len(natural):
        parts = [(str(site), table[table[column] == site]) for site in natural[:count]]
    else:
        ordered = table.sort_values(column, kind="stable")
        chunks = np.array_split(np.arange(len(ordered)), count)
        parts = [(f"part-{k + 1:02d}", ordered.iloc[rows]) for k, rows in enumerate(chunks)]
    sites = []
    for site_id, rows in parts:
        folder = root / "data" / site_id
        folder.mkdir(parents=True, exist_ok=True)
        rows.drop(columns=[column]).to_csv(folder / "rows.csv", index=False)
        (folder / "schema.yaml").write_text(yaml.safe_dump(schema.to_dict()))
        sites.append((str(site_id), folder / "rows.csv", folder / "schema.yaml"))
    return sites


def node_service_seconds(log: list[tuple[float, str]]) -> dict[str, list[float]]:
    """Per message type: seconds from 'Receiving: X message' to the next 'Sent successfully'."""
    found: dict[str, list[float]] = {}
    pending: tuple[str, float] | None = None
    for stamp, line in log:
        if match := RECEIVING.search(line):
            pending = (match[1], stamp)
        elif SENT in line and pending is not None:
            found.setdefault(pending[0], []).append(stamp - pending[1])
            pending = None
    return found


#: ``--privacy`` and ``--secagg``: the Hydra overrides of the private variant.
PRIVACY_OVERRIDES = ["privacy=sample_dp"]
SECAGG_OVERRIDES = ["secagg=secaggplus"]
#: A benchmark site's ε cap: high enough that no round is declined for budget.
BENCH_EPSILON_CAP = 1000.0


def run_runtime(
    runtime: str,
    work: Path,
    sites: list[tuple[str, Path, Path]],
    dataset: str,
    rounds: int,
    overrides: list[str] | None = None,
) -> dict[str, object]:
    """One federation with ``runtime`` at every site and one run of ``rounds`` rounds
    (``overrides``: extra Hydra overrides, e.g. DP and SecAgg+); its timings and CPU."""
    from clients.daemon import init_site
    from fedgov.certs import create_federation_certs
    from server.coordinator import load_server_settings, write_server_config
    from server.sites import add_site

    work.mkdir(parents=True)
    processes = Processes(work / "logs")
    link_port, *site_ports = _free_ports(1 + len(sites))
    coordinator = work / "coordinator"
    create_federation_certs(coordinator / "certs", ["127.0.0.1"], "bench")
    config = write_server_config(coordinator / "server.yaml", federation="bench", port=link_port)
    try:
        link = processes.start(
            "coordinator", [*FEDGOV, "server", "start", "--config", str(config)], coordinator
        )
        _wait(lambda: _port_open(link_port), START_TIMEOUT, "the coordinator", [link])
        settings = load_server_settings(config)
        daemons = []
        for (site_id, data, schema), port in zip(sites, site_ports, strict=True):
            site_config, public_key = init_site(
                work / "sites" / site_id,
                site_id,
                data,
                schema,
                f"127.0.0.1:{link_port}",
                coordinator / "certs" / "ca.crt",
                epsilon_cap=BENCH_EPSILON_CAP,
                port=port,
            )
            add_site(settings, public_key, site_id)
            daemons.append(
                processes.start(
                    f"site-{site_id}",
                    [
                        *FEDGOV,
                        "site",
                        "start",
                        "--config",
                        str(site_config),
                        *RUNTIME_FLAGS[runtime],
                    ],
                    site_config.parent,
                )
            )
        for daemon in daemons:
            _wait(
                lambda d=daemon: "SuperNode ID" in d.text(),
                START_TIMEOUT,
                f"{daemon.name} to join",
                [link, *daemons],
            )
            if runtime != STOCK:  # a site daemon warms up once, when it starts: not timed
                _wait(
                    lambda d=daemon: "fedgov: zygote ready" in d.text(),
                    START_TIMEOUT,
                    f"{daemon.name}'s zygote",
                    [link, *daemons],
                )
        run_dir = work / "run"
        sampler = CpuSampler([proc.popen.pid for proc in processes.started])
        sampler.start()
        started = time.monotonic()
        run = processes.start(
            "fedgov-run",
            [
                *FEDGOV,
                "run",
                "--config",
                str(config),
                "--out",
                str(run_dir),
                f"dataset={dataset}",
                f"federation.num_sites={len(sites)}",
                f"rounds={rounds}",
                "progress=false",
                *(overrides or []),
            ],
            coordinator,
        )
        # DP + SecAgg+ rounds on a loaded shared machine took up to ~60 s each.
        _wait(lambda: run.popen.poll() is not None, 300 + 120 * rounds, "the run", [link, *daemons])
        wall = time.monotonic() - started
        cpu = sampler.stop()
        if run.popen.returncode != 0:
            raise RuntimeError(f"fedgov run failed:\n{run.text()[-3000:]}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
    finally:
        processes.stop_all()
    service: dict[str, list[float]] = {}
    for daemon in daemons:
        for kind, seconds in node_service_seconds(daemon.lines).items():
            service.setdefault(kind, []).extend(seconds)
    # A site's busy seconds per round: every message of the rounds (not the discovery query),
    # summed per site, divided by the rounds, median over the sites.
    busy = [
        sum(
            s
            for kind, times in node_service_seconds(d.lines).items()
            if kind != "query"
            for s in times
        )
        / rounds
        for d in daemons
    ]
    per_round = sum(len(v) for k, v in service.items() if k != "query") / len(daemons) / rounds
    round_seconds = [float(r["seconds"]) for r in metrics["rounds"]]
    failures = [r["failures"] for r in metrics["rounds"] if r["failures"]]
    return {
        "runtime": runtime,
        "sites": len(sites),
        "overrides": list(overrides or []),
        "round_seconds": round_seconds,
        "steady_round_seconds": statistics.median(round_seconds[1:] or round_seconds),
        "first_round_seconds": round_seconds[0],
        "run_wall_seconds": wall,
        "cpu_seconds": cpu,
        "cpu_seconds_per_round": sum(cpu.values()) / len(round_seconds),
        "cpu_seconds_per_round_by_process": {k: v / len(round_seconds) for k, v in cpu.items()},
        "service_seconds": {k: statistics.median(v) for k, v in service.items()},
        "site_busy_seconds_per_round": statistics.median(busy) if busy else 0.0,
        "messages_per_round": per_round,
        "failures": failures,
        "final_eval_accuracy": metrics["rounds"][-1].get("eval_accuracy"),
    }


# ---- the table ------------------------------------------------------------------------------


def verdict(seconds: float) -> str:
    if seconds <= TARGET_SECONDS:
        return f"meets the target (≤ {TARGET_SECONDS:g} s per round)"
    if seconds <= LIMIT_SECONDS:
        return f"misses the {TARGET_SECONDS:g} s target (acceptable: ≤ {LIMIT_SECONDS:g} s)"
    return f"FAILS: above {LIMIT_SECONDS:g} s per round"


def table(results: list[dict[str, object]], sites: int, dataset: str, rounds: int) -> str:
    header = (
        f"{sites} sites on 127.0.0.1, TLS + SuperNode authentication, dataset={dataset}, "
        f"{rounds} rounds"
    )
    lines = [header, ""]
    row = "{:<36} {:>8} {:>8} {:>9} {:>11} {:>13} {:>10}"
    lines.append(
        row.format(
            "runtime", "s/round", "round 1", "msg/round", "site busy", "overhead/msg", "CPU/round"
        )
    )
    for result in results:
        steady = float(result["steady_round_seconds"])  # type: ignore[arg-type]
        per_round = float(result.get("messages_per_round") or 0.0)  # type: ignore[arg-type]
        busy = float(result.get("site_busy_seconds_per_round") or 0.0)  # type: ignore[arg-type]
        overhead = (steady - busy) / per_round if per_round else 0.0
        result["overhead_per_message"] = overhead
        lines.append(
            row.format(
                LABELS[str(result["runtime"])],
                f"{steady:.2f}",
                f"{float(result['first_round_seconds']):.2f}",  # type: ignore[arg-type]
                f"{per_round:.1f}",
                f"{busy:.2f}",
                f"{overhead:.2f}",
                f"{float(result['cpu_seconds_per_round']):.1f} s",  # type: ignore[arg-type]
            )
        )
    lines.append("")
    lines.append("CPU seconds per round (whole run ÷ rounds), by process:")
    for result in results:
        per = result["cpu_seconds"]
        parts = ", ".join(
            f"{kind} {seconds / rounds:.2f}" for kind, seconds in per.items() if seconds >= 0.05
        )  # type: ignore[union-attr]
        lines.append(f"  {LABELS[str(result['runtime'])]}: {parts}")
    lines.append("")
    by_runtime = {r["runtime"]: r for r in results}
    if STOCK in by_runtime and ZYGOTE_FAST_POLL in by_runtime:
        stock = float(by_runtime[STOCK]["steady_round_seconds"])  # type: ignore[arg-type]
        ours = float(by_runtime[ZYGOTE_FAST_POLL]["steady_round_seconds"])  # type: ignore[arg-type]
        lines.append(
            f"fedgov daemon vs stock Flower: {stock:.2f} → {ours:.2f} s per round "
            f"({stock / ours:.1f}× faster)"
        )
    if ZYGOTE_FAST_POLL in by_runtime:
        ours = float(by_runtime[ZYGOTE_FAST_POLL]["steady_round_seconds"])  # type: ignore[arg-type]
        lines.append(f"target: {verdict(ours)}")
    lines.append(
        "msg/round: messages each site answers per round; site busy: a site's seconds from "
        "receiving a message to having sent its reply, summed over a round (median over "
        "sites); overhead/msg = (s/round − site busy) ÷ msg/round: delivery, the SuperNode's "
        "pull, the server's poll and aggregation; CPU/round: all processes of the federation, "
        "whole run (discovery included) ÷ rounds (load average at the end: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.deployment", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds per runtime (default: 4)")
    parser.add_argument(
        "--sites",
        default="3",
        help="number of sites, or a comma-separated list of them, e.g. 3,10 (default: 3)",
    )
    parser.add_argument(
        "--privacy",
        action="store_true",
        help="also run every configuration with sample-level DP at each site (privacy=sample_dp)",
    )
    parser.add_argument(
        "--secagg",
        action="store_true",
        help="also run every configuration with SecAgg+ (secagg=secaggplus)",
    )
    parser.add_argument(
        "--dataset", default="randhie", help="a dataset with natural sites (default: randhie)"
    )
    parser.add_argument(
        "--runtimes",
        default=",".join(RUNTIMES),
        help=f"comma-separated, in order (default: {','.join(RUNTIMES)})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder and logs")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    args = parser.parse_args(argv)
    try:
        args.sites = [int(n) for n in str(args.sites).split(",") if n.strip()]
    except ValueError:
        parser.error(f"--sites: whole numbers separated by commas, got {args.sites!r}")
    if not args.sites or min(args.sites) < 2:
        parser.error("--sites: at least 2 sites per federation")
    private = [
        *(PRIVACY_OVERRIDES if args.privacy else []),
        *(SECAGG_OVERRIDES if args.secagg else []),
    ]
    args.variants = [[], private] if private else [[]]
    args.runtimes = [name.strip() for name in args.runtimes.split(",") if name.strip()]
    unknown = sorted(set(args.runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown runtime {unknown[0]!r} (known: {', '.join(RUNTIMES)})")
    return args


def variant_label(overrides: list[str]) -> str:
    """``plain``, or what the private variant turns on (``DP + SecAgg+``)."""
    parts = []
    if any(o.startswith("privacy=") for o in overrides):
        parts.append("DP")
    if any(o.startswith("secagg=") for o in overrides):
        parts.append("SecAgg+")
    return " + ".join(parts) or "plain"


def summary(results: list[dict[str, object]]) -> str:
    """Every configuration run: sites, variant, runtime, s/round, CPU-s/round."""
    row = "{:>5}  {:<14} {:<36} {:>8} {:>8} {:>11}  {}"
    lines = [
        row.format(
            "sites",
            "variant",
            "runtime",
            "s/round",
            "round 1",
            "CPU-s/round",
            "of which (CPU-s/round)",
        )
    ]
    for result in results:
        by_process = result.get("cpu_seconds_per_round_by_process") or {}
        top = ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in list(by_process.items())[:4])  # type: ignore[union-attr]
        lines.append(
            row.format(
                int(result["sites"]),  # type: ignore[call-overload]
                variant_label(result["overrides"]),  # type: ignore[arg-type]
                LABELS[str(result["runtime"])],
                f"{float(result['steady_round_seconds']):.2f}",  # type: ignore[arg-type]
                f"{float(result['first_round_seconds']):.2f}",  # type: ignore[arg-type]
                f"{float(result['cpu_seconds_per_round']):.1f}",  # type: ignore[arg-type]
                top,
            )
        )
    lines.append(
        f"(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
        "timings on a shared machine vary with its load)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="fedgov-deploy-bench-"))
    results = []
    try:
        for count in args.sites:
            sites = site_files(base / f"{count}-sites", args.dataset, count)
            for overrides in args.variants:
                label = variant_label(overrides)
                for runtime in args.runtimes:
                    print(
                        f"{count} sites, {label}, {LABELS[runtime]}: {args.rounds} rounds ...",
                        end=" ",
                        flush=True,
                    )
                    work = base / f"{count}-sites" / label.replace(" + ", "-") / runtime
                    result = run_runtime(runtime, work, sites, args.dataset, args.rounds, overrides)
                    results.append(result)
                    rounds = ", ".join(f"{s:.1f}" for s in result["round_seconds"])  # type: ignore[attr-defined]
                    by_process = ", ".join(
                        f"{kind} {seconds:.1f}"
                        for kind, seconds in list(
                            result["cpu_seconds_per_round_by_process"].items()
                        )[:4]  # type: ignore[attr-defined]
                    )
                    print(
                        f"rounds {rounds} s; CPU-s/round "
                        f"{float(result['cpu_seconds_per_round']):.1f} ({by_process}); "  # type: ignore[arg-type]
                        f"load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
                    if args.json:  # what finished so far, should a later configuration not
                        args.json.write_text(json.dumps(results, indent=2))
                    if result["failures"]:
                        print(f"  site failures: {result['failures']}", flush=True)
    finally:
        if args.keep:
            print(f"work folder and logs: {base}")
        else:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    for count in args.sites:
        for overrides in args.variants:
            group = [r for r in results if r["sites"] == count and r["overrides"] == overrides]
            if group:
                print()
                print(f"[{variant_label(overrides)}]")
                print(table(group, count, args.dataset, args.rounds))
    if len(results) > len(args.runtimes):
        print()
        print(summary(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
