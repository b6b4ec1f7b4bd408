"""The site runtime: the zygote (fork, reap, warm-up, same code as the FAB), the forking
executor's Flower ``Executor`` semantics (capacity, fallback, restart, close) and the site
daemon's command lines. Real processes, no SuperNode: each task runs a probe entry point that
reports what it saw; the ClientApp path itself runs in tests/test_federation_tls.py."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from clients.daemon import load_site_settings, superexec_command, supernode_command
from clients.superexec import ForkingExecutor, ZygoteProcess, parse_args
from clients.zygote import AppSnapshot, app_packages

PROBE = """
import json, os, sys, time

def main():
    out = os.environ["PROBE_DIR"]
    token = sys.argv[sys.argv.index("--token") + 1] if "--token" in sys.argv else sys.argv[1]
    report = {"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv,
              "threads": len(os.listdir("/proc/self/task")),
              "modules": sorted(m for m in ("fakeapp", "torch._dynamo", "opacus.accountants")
                                if m in sys.modules)}
    if "numpy" in sys.modules:
        report["numpy"] = float(sys.modules["numpy"].random.rand())
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        report["torch"] = float(torch.rand(1))
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        started = time.perf_counter()
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        report["first_step_seconds"] = time.perf_counter() - started
    with open(os.path.join(out, token + ".json"), "w") as handle:
        json.dump(report, handle)
    if token.startswith("sleep"):
        time.sleep(60)
    sys.exit(int(token.rpartition("-")[2]) if token.startswith("exit") else 0)
"""


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory) -> Path:
    """A folder with the probe module and a fake app package ``fakeapp``."""
    root = tmp_path_factory.mktemp("probe")
    (root / "probe.py").write_text(textwrap.dedent(PROBE))
    (root / "fakeapp").mkdir()
    (root / "fakeapp" / "__init__.py").write_text("VALUE = 1\n")
    (root / "fakeapp" / "part.py").write_text("PART = 2\n")
    (root / "out").mkdir()
    return root


def _env(probe_dir: Path, flwr_home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PROBE_DIR": str(probe_dir / "out")}
    env["PYTHONPATH"] = os.pathsep.join([str(probe_dir), env.get("PYTHONPATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def _report(probe_dir: Path, token: str, timeout: float = 30) -> dict:
    path = probe_dir / "out" / f"{token}.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"the probe {token} did not report"
        time.sleep(0.02)
    time.sleep(0.05)
    return json.loads(path.read_text())


def _wait_exits(zygote: ZygoteProcess, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(zygote.exits) < count:
        assert time.monotonic() < deadline, f"exits so far: {zygote.exits}"
        zygote._read(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in "ZX"


@pytest.fixture(scope="module")
def warm_zygote(probe_dir):
    """A real zygote: Flower's ClientApp runtime and torch imported and warmed up."""
    zygote = ZygoteProcess(preload=[], env=_env(probe_dir))
    try:
        zygote.wait_ready(120)
        yield zygote
    finally:
        zygote.close()


def test_zygote_forks_warm_single_threaded_children_and_reaps_them(warm_zygote, probe_dir):
    ready = warm_zygote.ready
    assert ready["threads"] == 1, ready  # forks only from a single-threaded process
    assert ready["tuned"] is True and ready["failed"] == {}, ready
    replies = [
        warm_zygote.launch(["flwr-clientapp", f"exit-{code}"], entry="probe:main")
        for code in (0, 3)
    ]
    reports = [_report(probe_dir, f"exit-{code}") for code in (0, 3)]
    _wait_exits(warm_zygote, 2)
    assert sorted(warm_zygote.exits) == sorted(
        (reply["pid"], code) for reply, code in zip(replies, (0, 3), strict=True)
    )
    assert warm_zygote.children == {}
    for reply, report in zip(replies, reports, strict=True):
        assert report["pid"] == reply["pid"] and report["ppid"] == warm_zygote.pid
        assert report["threads"] == 1
        assert "torch._dynamo" in report["modules"]  # imported once, in the zygote
        assert "opacus.accountants" in report["modules"]  # a DP task's accountant, warm too
        assert report["first_step_seconds"] < 0.5, report
        assert not _alive(report["pid"])  # reaped: no zombie left
    assert reports[0]["argv"] == ["flwr-clientapp", "exit-0"]
    # Every child draws its own random numbers, as a fresh interpreter would.
    assert reports[0]["numpy"] != reports[1]["numpy"]
    assert reports[0]["torch"] != reports[1]["torch"]


class _Recorder:
    """Stands in for Flower's SubprocessExecutor: records what falls back to it."""

    def __init__(self) -> None:
        self.launched: list[ExecutionSpec] = []
        self.closed = False

    def launch(self, spec):
        from flwr.supercore.superexec.executor import LaunchResult

        self.launched.append(spec)
        return LaunchResult.accepted()

    def close(self) -> None:
        self.closed = True


def _spec(token: str, task_type: TaskType = TaskType.CLIENT_APP, task_id: int = 1):
    return ExecutionSpec(
        task_type=task_type,
        runtime_api_address="127.0.0.1:1",
        token=token,
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=os.getpid(),
        suppress_output=False,
        task_id=task_id,
    )


def _bare_executor(probe_dir: Path, **options) -> tuple[ForkingExecutor, _Recorder]:
    fallback = _Recorder()
    executor = ForkingExecutor(
        zygote_factory=lambda: ZygoteProcess(preload=[], env=_env(probe_dir), bare=True),
        fallback=fallback,  # type: ignore[arg-type]
        entry="probe:main",
        **options,
    )
    return executor, fallback


def test_executor_capacity_fallback_and_close(probe_dir):
    executor, fallback = _bare_executor(probe_dir, max_tasks=1)
    try:
        everything = set(TaskType)
        assert executor.get_eligible_capacity(everything) == (everything, set())
        assert executor.launch(_spec("sleep-a")).status == LaunchResultStatus.ACCEPTED
        report = _report(probe_dir, "sleep-a")
        # The task's command line is Flower's, token and all; the child is the zygote's.
        assert report["argv"][1:5] == ["--runtime-api-address", "127.0.0.1:1", "--token", "sleep-a"]
        assert report["ppid"] == executor.zygote.pid
        # At capacity: no ClientApp is acquired, and one launched anyway is refused.
        assert executor.get_eligible_capacity(everything)[0] == everything - {TaskType.CLIENT_APP}
        refused = executor.launch(_spec("sleep-b", task_id=2))
        assert refused.status == LaunchResultStatus.CAPACITY_REJECTED
        # Other task types never fork: Flower's subprocess executor starts them.
        assert executor.launch(_spec("s", TaskType.SERVER_APP, 3)).status == "accepted"
        assert [spec.token for spec in fallback.launched] == ["s"]
        zygote = executor.zygote
        executor.close()  # stops the zygote, which stops its running child
        assert zygote.popen.returncode is not None
        assert not _alive(report["pid"])
        assert fallback.closed
    finally:
        executor.close()


def test_reaped_children_free_capacity_and_a_dead_zygote_is_replaced(probe_dir):
    executor, fallback = _bare_executor(probe_dir, max_tasks=1, ready_timeout=30)
    try:
        assert executor.launch(_spec("quick-1")).status == "accepted"
        _report(probe_dir, "quick-1")
        deadline = time.monotonic() + 20
        while executor.running():
            assert time.monotonic() < deadline
            executor.reconcile()
            time.sleep(0.05)
        assert TaskType.CLIENT_APP in executor.get_eligible_capacity(set(TaskType))[0]
        first = executor.zygote
        first.popen.kill()
        first.popen.wait()
        executor.reconcile()  # notices, starts a new zygote
        assert executor.zygote is not first and executor.zygote.alive()
        assert executor.launch(_spec("quick-2", task_id=2)).status == "accepted"
        assert _report(probe_dir, "quick-2")["ppid"] == executor.zygote.pid
        assert executor.forked == 2 and fallback.launched == []
    finally:
        executor.close()


def test_app_snapshot_matches_a_fab_only_when_every_shipped_file_is_identical(
    probe_dir, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(probe_dir))
    import fakeapp.part  # noqa: F401

    assert app_packages(["fakeapp.part"]) == {"fakeapp"}  # not from any distribution
    snapshot = AppSnapshot({"fakeapp"})
    assert sorted(snapshot.trees["fakeapp"]) == ["__init__.py", "part.py"]
    fab = tmp_path / "fab"
    (fab / "fakeapp").mkdir(parents=True)
    assert snapshot.matches(tmp_path / "elsewhere")[0]  # the FAB does not ship it
    for name in ("__init__.py", "part.py"):
        (fab / "fakeapp" / name).write_bytes((probe_dir / "fakeapp" / name).read_bytes())
    assert snapshot.matches(fab) == (True, "")
    (fab / "fakeapp" / "part.py").write_text("PART = 3\n")
    assert snapshot.matches(fab)[0] is False
    (fab / "fakeapp" / "part.py").write_bytes((probe_dir / "fakeapp" / "part.py").read_bytes())
    (fab / "fakeapp" / "extra.py").write_text("")
    assert snapshot.matches(fab)[0] is False
    for name in list(sys.modules):
        if name.partition(".")[0] == "fakeapp":
            monkeypatch.delitem(sys.modules, name)


def test_children_run_preloaded_app_modules_only_for_a_matching_installed_fab(probe_dir, tmp_path):
    flwr_home = tmp_path / "flwr-home"
    zygote = ZygoteProcess(preload=["fakeapp"], env=_env(probe_dir, flwr_home), bare=True)
    try:
        assert zygote.wait_ready(60)["app_packages"] == ["fakeapp"]
        # No FAB installed yet (a new app's first task): the child imports the app itself.
        assert (
            zygote.launch(["x", "cold-1"], entry="probe:main", fab_hash="ab" * 32)["warm"] is False
        )
        assert _report(probe_dir, "cold-1")["modules"] == []
        # The FAB Flower installed ships the same files: the preloaded modules are used.
        installed = flwr_home / "apps" / f"pub.fakeapp.1.0.0.{'ab' * 4}"
        (installed / "fakeapp").mkdir(parents=True)
        (installed / "pyproject.toml").write_text("")
        for name in ("__init__.py", "part.py"):
            (installed / "fakeapp" / name).write_bytes((probe_dir / "fakeapp" / name).read_bytes())
        reply = zygote.launch(["x", "warm-1"], entry="probe:main", fab_hash="ab" * 32)
        assert reply["warm"] is True
        assert _report(probe_dir, "warm-1")["modules"] == ["fakeapp"]
        # Another app version (different bytes): dropped again.
        other = flwr_home / "apps" / f"pub.fakeapp.1.0.1.{'cd' * 4}"
        (other / "fakeapp").mkdir(parents=True)
        (other / "pyproject.toml").write_text("")
        (other / "fakeapp" / "__init__.py").write_text("VALUE = 2\n")
        assert (
            zygote.launch(["x", "cold-2"], entry="probe:main", fab_hash="cd" * 32)["warm"] is False
        )
        assert _report(probe_dir, "cold-2")["modules"] == []
    finally:
        zygote.close()


def test_an_app_edited_while_the_zygote_imports_it_is_never_used_warm(probe_dir, tmp_path):
    package = tmp_path / "edited"
    (package / "editedapp").mkdir(parents=True)
    # Importing the package edits one of its files, as a concurrent edit would.
    (package / "editedapp" / "__init__.py").write_text(
        "from pathlib import Path\n(Path(__file__).parent / 'part.py').write_text('PART = 2\\n')\n"
    )
    (package / "editedapp" / "part.py").write_text("PART = 1\n")
    env = _env(probe_dir, tmp_path / "flwr-home")
    env["PYTHONPATH"] = os.pathsep.join([str(package), env["PYTHONPATH"]])
    zygote = ZygoteProcess(preload=["editedapp"], env=env, bare=True)
    try:
        ready = zygote.wait_ready(60)
        assert "editedapp" in ready["failed"]["app snapshot"], ready
        installed = tmp_path / "flwr-home" / "apps" / f"pub.editedapp.1.0.0.{'ef' * 4}"
        (installed / "editedapp").mkdir(parents=True)
        (installed / "pyproject.toml").write_text("")
        for name in ("__init__.py", "part.py"):
            (installed / "editedapp" / name).write_bytes(
                (package / "editedapp" / name).read_bytes()
            )
        assert (
            zygote.launch(["x", "stale-1"], entry="probe:main", fab_hash="ef" * 32)["warm"] is False
        )
    finally:
        zygote.close()


def test_superexec_options_leave_flower_options_to_flower():
    options, rest = parse_args(
        [
            "--insecure",
            "--runtime-api-address",
            "127.0.0.1:9",
            "--max-tasks",
            "2",
            "--preload",
            "clients.app",
            "--parent-pid",
            "7",
        ]
    )
    assert options.max_tasks == 2 and options.preload == ["clients.app"]
    assert not options.stock_executor
    assert rest == ["--insecure", "--runtime-api-address", "127.0.0.1:9", "--parent-pid", "7"]


def test_site_runtimes_command_lines(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "site.yaml").write_text(
        "site_id: hosp-a\ncoordinator: 127.0.0.1:9092\ndata: d.csv\nschema: s.yaml\nport: 9555\n"
    )
    settings = load_site_settings(site / "site.yaml")
    secret = str(site / "keys" / "superexec.secret")
    fedgov = supernode_command(settings, insecure=False)
    assert fedgov[1:3] == ["-m", "clients.supernode"]
    assert fedgov[fedgov.index("--isolation") + 1] == "process"
    assert fedgov[fedgov.index("--superexec-auth-secret-file") + 1] == secret
    assert "--flower-pauses" not in fedgov
    zygote = supernode_command(settings, insecure=False, runtime="zygote")
    assert zygote[1:4] == ["-m", "clients.supernode", "--flower-pauses"] and "process" in zygote
    stock = supernode_command(settings, insecure=False, runtime="stock")
    assert stock[1:4] == ["-m", "clients.supernode", "--flower-pauses"]
    assert stock[stock.index("--isolation") + 1] == "subprocess"
    assert "--superexec-auth-secret-file" not in stock
    superexec = superexec_command(settings, supernode_pid=42)
    assert superexec[1:3] == ["-m", "clients.superexec"]
    assert superexec[superexec.index("--runtime-api-address") + 1] == "127.0.0.1:9555"
    assert superexec[superexec.index("--parent-pid") + 1] == "42"
    assert superexec[superexec.index("--superexec-auth-secret-file") + 1] == secret
    with pytest.raises(ValueError, match="runtime"):
        supernode_command(settings, insecure=False, runtime="fast")


# ---- the site daemon's two processes, started, watched and stopped together ------------------


def _insecure_site(tmp_path: Path) -> Path:
    """A valid site folder whose coordinator (a free port) never answers."""
    import yaml
    from processes import free_ports

    from clients.daemon import init_site
    from fedgov.datasets import load_dataset, load_table

    table = load_table("medpar").head(40).drop(columns=["provnum"])
    table.to_csv(tmp_path / "data.csv", index=False)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(load_dataset("medpar").schema.to_dict()))
    coordinator_port, site_port = free_ports(2)
    config, _ = init_site(
        tmp_path / "site",
        "hosp-a",
        tmp_path / "data.csv",
        tmp_path / "schema.yaml",
        f"127.0.0.1:{coordinator_port}",
        port=site_port,
    )
    return config


def _descendant(processes, pattern: str) -> int | None:
    from processes import _cmdline

    return next((p for p in processes.live_pids() if pattern in _cmdline(p)), None)


@pytest.mark.slow
def test_the_site_stops_both_processes_and_says_why_in_one_line(tmp_path, processes):
    config = _insecure_site(tmp_path)
    command = [
        sys.executable,
        "-m",
        "fedgov",
        "site",
        "start",
        "--config",
        str(config),
        "--insecure",
    ]
    # The SuperNode gives up on an absent coordinator: the SuperExec is stopped with it.
    gives_up = processes.start("gives-up", [*command, "--max-wait", "3"])
    processes.wait_until(
        lambda: _descendant(processes, "clients.superexec") is not None,
        60,
        "the SuperExec to start",
    )
    assert processes.wait_for_exit(gives_up, 90) == 2
    assert (
        gives_up.log_text()
        .strip()
        .splitlines()[-1]
        .endswith(f"could not connect to {load_site_settings(config).coordinator}")
    )
    assert _descendant(processes, "clients.s") is None  # clients.supernode and .superexec gone
    # The SuperExec dies: the SuperNode is stopped and the site says so.
    waits = processes.start("waits", command)
    processes.wait_until(
        lambda: _descendant(processes, "clients.superexec") is not None,
        60,
        "the SuperExec to start",
        [waits],
    )
    os.kill(_descendant(processes, "clients.superexec"), 9)
    assert processes.wait_for_exit(waits, 60) == 2
    assert "the SuperExec exited with code -9" in waits.log_text().strip().splitlines()[-1]
    assert _descendant(processes, "clients.s") is None
