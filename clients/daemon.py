"""The site daemon: a Flower SuperNode started from the site's own ``site.yaml``.

``site.yaml`` (paths relative to its folder, which is also the site's state folder)::

    site_id: hosp-a
    coordinator: coordinator.example.org:9092
    ca_cert: ca.crt                  # the federation's CA (verifies the coordinator)
    auth_key: keys/node.key          # this site's node-authentication key (its .pub is registered)
    data: data/admissions.csv        # the site's own CSV or Parquet...
    schema: data/schema.yaml         # ...and the schema it must match
    epsilon_cap: 8.0                 # the most ε (sample-level) this site will ever spend
    port: 9094                       # local port of the SuperNode's runtime API
    insecure: false

The daemon keeps ``daemon.json`` in the site folder up to date (its pid, its helpers' pids, how
it ended) and its SuperNode keeps ``supernode.json`` (its node id and last contact with the
coordinator) for ``fedgov site status`` (clients/site_status.py). Restarted after being
killed, it first ends the session its predecessor left open at the coordinator
(:func:`end_stale_session`), which would otherwise refuse the site's key for up to a minute.

Everything the site's ClientApp needs reaches it through the node config (``site-id``,
``data-path``, ``schema-path``, ``site-dir``, ``epsilon-cap`` and the run policy: ``delta``,
``require-dp``, ... see clients/site_policy.py), never through the server's messages.

Runtimes (``fedgov site start``; per-round seconds in ``python -m benchmarks.deployment``):

- ``zygote+fast-poll`` (default): two processes, started, watched and stopped together: the
  SuperNode (:mod:`clients.supernode`: Flower's ``flower-supernode --isolation process`` with its
  fixed 3 s / 0.5 s pauses bounded while a run is on) and the SuperExec (:mod:`clients.superexec`:
  Flower's ``flower-superexec`` whose executor forks each ClientApp task from a warm zygote);
  the SuperNode rings the SuperExec when a task waits (:mod:`clients.doorbell`). They share a
  fresh per-start secret (``keys/superexec.secret``, mode 0600), so only this
  site's SuperExec can take tasks from the SuperNode's local Runtime API;
- ``zygote`` (``--stock-supernode``): the same, with Flower's own SuperNode pauses;
- ``stock`` (``--stock-executor``): Flower's defaults: the SuperNode with ``--isolation
  subprocess``, which starts Flower's SuperExec, one fresh interpreter per message.

In every runtime the SuperNode runs through :mod:`clients.supernode`, which records its own
contact with the SuperLink in ``supernode.json`` (clients/site_status.py); nothing reads
Flower's log text to tell whether the site is connected.
"""

from __future__ import annotations

# ``fedgov site status`` reads site.yaml through this module: nothing heavy (torch, pandas,
# Flower) is imported at module level; the functions that need it import it themselves.
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clients import doorbell
from clients.site_policy import POLICY_KEYS, SitePolicy, policy_from_yaml
from clients.supernode import FLOWER_PAUSES_FLAG
from fedgov.deploy import flower_environment, read_yaml_mapping, write_file
from fedgov.errors import ConfigError, FedgovError
from fedgov.instance_lock import check_port_free, hold_lock
from fedgov.process_guard import ProcessGuard, exit_with_parent, stop_leftovers

if TYPE_CHECKING:
    from clients.site_status import DaemonStatus

SITE_KEYS = (
    "site_id",
    "coordinator",
    "ca_cert",
    "auth_key",
    "data",
    "schema",
    "epsilon_cap",
    "port",
    "insecure",
    *POLICY_KEYS,  # the site's run policy (clients/site_policy.py, docs/operators.md)
)
EXIT_NOT_CONNECTED = 305  # flower-supernode: the SuperLink refused or could not be reached
#: The runtimes of ``fedgov site start`` (module docstring): ClientApps forked from the zygote
#: with bounded SuperNode pauses, the same with Flower's pauses, and Flower's defaults.
ZYGOTE_FAST_POLL, ZYGOTE, STOCK = "zygote+fast-poll", "zygote", "stock"
RUNTIMES = (ZYGOTE_FAST_POLL, ZYGOTE, STOCK)
SUPEREXEC_SECRET = "keys/superexec.secret"
LOCK_FILE = "daemon.lock"  # held (flock) by the running daemon: one daemon per site folder
EXIT_DRAIN_SECONDS = 2.0  # how long to read a stopped process's last lines


@dataclass(frozen=True)
class SiteSettings:
    """A site's settings with paths resolved against ``site.yaml``'s folder."""

    config_path: Path
    site_id: str
    coordinator: str
    ca_cert: Path
    auth_key: Path
    data: Path
    schema: Path
    epsilon_cap: float
    port: int
    insecure: bool
    policy: SitePolicy = field(default_factory=SitePolicy)

    @property
    def site_dir(self) -> Path:
        return self.config_path.parent

    def node_config(self) -> dict[str, str | float]:
        """What the ClientApp reads about this site (Flower's --node-config)."""
        return {
            "site-id": self.site_id,
            "data-path": str(self.data),
            "schema-path": str(self.schema),
            "site-dir": str(self.site_dir),
            "epsilon-cap": self.epsilon_cap,
            **self.policy.node_config(),  # delta, require-dp, max-rounds-per-run...
        }


def create_node_auth_key(private_path: str | Path, site_id: str | None = None) -> Path:
    """A site's SuperNode authentication key pair (ECDSA P-384, OpenSSH public key).

    Writes the private key (OpenSSH format, as flower-supernode loads it; mode 0600) at
    ``private_path`` and the public key next to it as ``<name>.pub``, with ``site_id`` as its
    comment (``fedgov server add-site`` names the site by it); returns the public key's path,
    which the coordinator registers.
    """
    private_path = Path(private_path)
    key = ec.generate_private_key(ec.SECP384R1())
    write_file(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        private=True,
    )
    public_path = private_path.with_name(private_path.name + ".pub")
    write_file(
        public_path,
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + (f" {site_id}".encode() if site_id else b"")
        + b"\n",
        private=False,
    )
    return public_path


def load_site_settings(path: str | Path) -> SiteSettings:
    """Read and check ``site.yaml``; a mistake raises ConfigError naming the field."""
    data = read_yaml_mapping(path, "site config")
    unknown = sorted(set(data) - set(SITE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(SITE_KEYS)})")
    for required in ("site_id", "coordinator", "data", "schema"):
        if not data.get(required):
            raise ConfigError(f"{path}: '{required}' is required")
    base = Path(path).resolve().parent
    cap = data.get("epsilon_cap", 8.0)
    if not isinstance(cap, (int, float)) or isinstance(cap, bool) or cap <= 0:
        raise ConfigError(f"{path}: epsilon_cap must be a number > 0, got {cap!r}")
    port = data.get("port", 9094)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{path}: port must be a whole number in 1..65535, got {port!r}")
    coordinator = str(data["coordinator"])
    if ":" not in coordinator:
        raise ConfigError(f"{path}: coordinator must be HOST:PORT, got '{coordinator}'")
    return SiteSettings(
        config_path=Path(path).resolve(),
        site_id=str(data["site_id"]),
        coordinator=coordinator,
        ca_cert=(base / str(data.get("ca_cert", "ca.crt"))).resolve(),
        auth_key=(base / str(data.get("auth_key", "keys/node.key"))).resolve(),
        data=(base / str(data["data"])).resolve(),
        schema=(base / str(data["schema"])).resolve(),
        epsilon_cap=float(cap),
        port=port,
        insecure=bool(data.get("insecure", False)),
        policy=policy_from_yaml(data, str(path)),
    )


def init_site(
    out_dir: str | Path,
    site_id: str,
    data: str | Path,
    schema: str | Path,
    coordinator: str,
    ca_cert: str | Path | None = None,
    epsilon_cap: float = 8.0,
    port: int = 9094,
) -> tuple[Path, Path]:
    """Write ``site.yaml`` and the site's node-authentication key; return (config, public key)."""
    out = Path(out_dir).resolve()
    config_path = out / "site.yaml"
    if config_path.exists():
        raise FedgovError(f"site init: {config_path} already exists (keep it, or remove it first)")
    out.mkdir(parents=True, exist_ok=True)
    public_key = create_node_auth_key(out / "keys" / "node.key", site_id)
    from privacy.site_state import open_site_state

    # The Ed25519 receipt key and an empty privacy ledger bound to it (site_key.pem, ...).
    open_site_state(out, site_id)
    # The app installed here is the one app this site runs until its operator approves another.
    from clients.app_approval import approve_installed_app

    approve_installed_app(out, site_id, comment="the app installed at site init")
    fields: dict[str, Any] = {
        "site_id": site_id,
        "coordinator": coordinator,
        "ca_cert": os.path.relpath(Path(ca_cert).resolve(), out) if ca_cert else "ca.crt",
        "auth_key": "keys/node.key",
        "data": os.path.relpath(Path(data).resolve(), out),
        "schema": os.path.relpath(Path(schema).resolve(), out),
        "epsilon_cap": float(epsilon_cap),
        "port": port,
        "insecure": False,
        "delta": policy_from_yaml({}, "").delta,  # this site's δ: every ε it computes uses it
    }
    config_path.write_text(yaml.safe_dump(fields, sort_keys=False))
    load_site_settings(config_path)  # what we wrote must read back
    return config_path, public_key


def check_site(settings: SiteSettings, insecure: bool) -> int:
    """Validate everything before connecting: data against schema, key, CA. Returns row count."""
    if not settings.schema.is_file():
        raise FedgovError(f"site {settings.site_id}: schema file {settings.schema} does not exist")
    from fedgov_data.connector import load_schema_file, read_site_table  # pandas: not for status

    schema = load_schema_file(settings.schema)
    _, labels = read_site_table(settings.data, schema)
    if insecure:
        return len(labels)
    if not settings.auth_key.is_file():
        raise FedgovError(f"site {settings.site_id}: key {settings.auth_key} does not exist")
    try:
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key

        load_ssh_private_key(settings.auth_key.read_bytes(), password=None)
    except (ValueError, OSError) as error:
        raise FedgovError(
            f"site {settings.site_id}: key {settings.auth_key} is unreadable ({error}); expected "
            "the OpenSSH private key written by `fedgov site init`"
        ) from None
    if not settings.ca_cert.is_file():
        raise FedgovError(f"site {settings.site_id}: CA certificate {settings.ca_cert} is missing")
    try:
        from cryptography import x509

        x509.load_pem_x509_certificate(settings.ca_cert.read_bytes())
    except ValueError:
        raise FedgovError(
            f"site {settings.site_id}: {settings.ca_cert} is not a PEM certificate (expected the "
            "federation's ca.crt)"
        ) from None
    return len(labels)


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def supernode_command(
    settings: SiteSettings,
    insecure: bool,
    max_wait_seconds: float | None = None,
    runtime: str = ZYGOTE_FAST_POLL,
) -> list[str]:
    """The SuperNode's command line; it reconnects with back-off while the coordinator
    is away (for ``max_wait_seconds`` in total, or forever when None).

    ``runtime`` (see the module docstring): every runtime runs Flower's SuperNode through
    ``python -m clients.supernode`` (which records its contact with the SuperLink for ``fedgov
    site status``), ``zygote`` and ``stock`` with Flower's pauses (``--flower-pauses``); all but
    ``stock`` with ``--isolation process`` (the SuperExec is :func:`superexec_command`'s).
    """
    _check_runtime(runtime)
    node_config = " ".join(
        f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}"
        for key, value in settings.node_config().items()
    )
    command = [sys.executable, "-m", "clients.supernode"]
    if runtime != ZYGOTE_FAST_POLL:
        command.append(FLOWER_PAUSES_FLAG)
    command += [
        "--superlink",
        settings.coordinator,
        "--node-config",
        node_config,
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.port),
    ]
    if max_wait_seconds is not None:
        command += ["--max-wait-time", str(max_wait_seconds)]
    if insecure:
        command.append("--insecure")
    else:
        command += [
            "--root-certificates",
            str(settings.ca_cert),
            "--auth-supernode-private-key",
            str(settings.auth_key),
        ]
    if runtime == STOCK:
        command += ["--isolation", "subprocess"]
    else:
        secret = settings.site_dir / SUPEREXEC_SECRET
        command += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    return command


def superexec_command(settings: SiteSettings, supernode_pid: int | None = None) -> list[str]:
    """fedgov's SuperExec for the SuperNode's local Runtime API (runtimes ``zygote*``).

    Like the SuperExec a stock SuperNode starts itself: plain HTTP on 127.0.0.1 (the Runtime
    API never leaves the machine), stopping when the SuperNode's process does.
    """
    command = [
        sys.executable,
        "-m",
        "clients.superexec",
        "--insecure",
        "--runtime-api-address",
        f"127.0.0.1:{settings.port}",
        "--superexec-auth-secret-file",
        str(settings.site_dir / SUPEREXEC_SECRET),
    ]
    if supernode_pid is not None:
        command += ["--parent-pid", str(supernode_pid)]
    return command


def write_superexec_secret(settings: SiteSettings) -> Path:
    """A fresh random secret shared by this start's SuperNode and SuperExec (mode 0600)."""
    path = settings.site_dir / SUPEREXEC_SECRET
    write_file(path, secrets.token_hex(32).encode(), private=True)
    return path


def site_environment(settings: SiteSettings) -> dict[str, str]:
    """Environment of the SuperNode: Flower offline, this venv's tools first on PATH."""
    return flower_environment(settings.site_dir / "flwr-home")


def explain_supernode_exit(settings: SiteSettings, code: int, log_tail: str) -> str:
    """One line saying why the SuperNode stopped, from its exit code and last log lines."""
    if "address already in use" in log_tail.lower():
        return (
            f"site {settings.site_id}: port {settings.port} on 127.0.0.1 is already in use; "
            f"{PORT_FIX}"
        )
    if "CERTIFICATE_VERIFY_FAILED" in log_tail:
        problem = coordinator_certificate_problem(settings)
        if problem and problem != "is not signed by":
            advice = (
                "ask the coordinator to renew it: fedgov server renew-cert"
                if problem.startswith(("expired", "is not valid before"))
                else "ask the coordinator to renew it for that name: fedgov server renew-cert "
                "--host NAME"
            )
            return (
                f"site {settings.site_id}: the coordinator's certificate at "
                f"{settings.coordinator} {problem}; {advice}"
            )
        return (
            f"site {settings.site_id}: the coordinator's certificate at {settings.coordinator} is "
            f"not signed by {settings.ca_cert} (wrong CA file?)"
        )
    if "Failed to activate SuperNode" in log_tail:
        return (
            f"site {settings.site_id}: the coordinator at {settings.coordinator} refused this "
            f"site's key (ask the coordinator to run: fedgov server add-site "
            f"{settings.auth_key}.pub)"
        )
    # Flower's process exits with 1 on any error; its own exit code is in the log.
    if code == EXIT_NOT_CONNECTED or f"Exit Code: {EXIT_NOT_CONNECTED}" in log_tail:
        return f"site {settings.site_id}: could not connect to {settings.coordinator}"
    return f"site {settings.site_id}: the SuperNode exited with code {code}"


def coordinator_certificate_problem(settings: SiteSettings) -> str | None:
    """Why the coordinator's certificate fails verification against this site's ``ca.crt``
    (``expired on ...``, ``is not signed by``, ...): fetched from the coordinator without
    verifying it, only to name the problem. None when it cannot be fetched or looks right."""
    import ssl

    from fedgov.certs import certificate_problem

    host, _, port = settings.coordinator.rpartition(":")
    try:
        pem = ssl.get_server_certificate((host.strip("[]"), int(port)), timeout=10)
        return certificate_problem(pem.encode(), settings.ca_cert.read_bytes(), host.strip("[]"))
    except (OSError, ValueError):
        return None


#: Log lines after which the SuperNode cannot succeed by retrying: stop at once and say why.
ACTIVATION_REFUSED = "Failed to activate SuperNode"
FATAL_PATTERNS = (ACTIVATION_REFUSED, "CERTIFICATE_VERIFY_FAILED")
#: A site killed outright stays "online" at the coordinator until its heartbeats lapse (Flower
#: 1.42: twice its 30 s heartbeat interval after the last one), and until then the coordinator
#: refuses to activate the site's key again, with the same message as for an unknown key. A
#: site that was connected before (``supernode.json`` knows its node) therefore retries that long.
REACTIVATION_WINDOW_SECONDS = 100.0
REACTIVATION_PAUSE_SECONDS = 5.0


PORT_FIX = "give this site another port (`fedgov site start --port N`, or `port:` in site.yaml)"


def claim_site(settings: SiteSettings) -> None:
    """Make this process the site's only daemon, before it changes anything in the folder.

    Takes the site folder's lock (a second ``fedgov site start`` is refused at once, in one
    line), stops what a killed predecessor left running (recorded in ``daemon.json``) and
    checks that the SuperNode's port is free (one line naming it and ``--port`` if not).
    Idempotent within a process.
    """
    from clients.site_status import DAEMON_FILE, _read_json

    hold_lock(
        settings.site_dir / LOCK_FILE,
        f"site {settings.site_id}: a daemon already runs from {settings.site_dir} (pid {{pid}}); "
        "stop it first (`fedgov site status` shows it)",
    )
    recorded, _ = _read_json(settings.site_dir / DAEMON_FILE)
    helpers = (recorded or {}).get("processes")
    if isinstance(helpers, dict):
        stopped = stop_leftovers({k: v for k, v in helpers.items() if isinstance(v, dict)})
        if stopped:
            print(
                f"fedgov: site {settings.site_id}: stopped the {' and '.join(stopped)} its "
                "killed daemon left running",
                file=sys.stderr,
                flush=True,
            )
    check_port_free("127.0.0.1", settings.port, f"site {settings.site_id}", PORT_FIX)


class ActivationRefused(FedgovError):
    """The coordinator refused to activate this site's key (unknown, or still marked online)."""


def end_stale_session(settings: SiteSettings, node_id: int) -> bool:
    """Tell the coordinator that this site's session as ``node_id`` is over, as Flower's SuperNode
    does when it stops normally (a killed one cannot), so that the restarted site is let in at
    once instead of after its old heartbeats lapse. Authenticated with the site's key over TLS,
    through Flower 1.42's own Fleet API client. Returns whether the coordinator agreed; on any
    failure nothing changes (the caller then waits for the session to lapse)."""
    try:
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key
        from flwr.proto.fleet_pb2 import DeactivateNodeRequest
        from flwr.supercore.interceptors.http.runtime_version import (
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supernode.fleet_http_client import FleetHttpClient
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

        key = load_ssh_private_key(settings.auth_key.read_bytes(), password=None)
        interceptors = [
            RuntimeVersionHttpInterceptor(component_name="SuperNode"),
            NodeAuthHttpInterceptor(key, key.public_key()),  # type: ignore[arg-type]
        ]
        with FleetHttpClient.from_server_address(
            settings.coordinator, False, settings.ca_cert.read_bytes(), interceptors
        ) as client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except Exception:  # best effort: waiting for the lapse always works
        return False
    print(
        f"fedgov: site {settings.site_id}: ended this site's previous session (node {node_id}), "
        "left open when its daemon was killed",
        file=sys.stderr,
        flush=True,
    )
    return True


def run_site(
    settings: SiteSettings,
    insecure: bool,
    max_wait_seconds: float | None,
    runtime: str = ZYGOTE_FAST_POLL,
) -> int:
    """:func:`run_supernode`, retrying a refused activation for a while when the site had
    joined before (its previous daemon was killed and the coordinator still counts it online);
    a site that never joined stops at once with one line (its key is not registered)."""
    from clients.site_status import previous_daemon_crashed, previous_node_id

    claim_site(settings)
    node_id = previous_node_id(settings.site_dir)
    if node_id is not None and not insecure and previous_daemon_crashed(settings.site_dir):
        end_stale_session(settings, node_id)  # what a SuperNode does when it stops normally
    deadline = time.monotonic() + REACTIVATION_WINDOW_SECONDS
    while True:
        try:
            return run_supernode(settings, insecure, max_wait_seconds, runtime)
        except ActivationRefused:
            if node_id is None or time.monotonic() > deadline:
                raise
            if not insecure and end_stale_session(settings, node_id):
                continue
        print(
            f"fedgov: site {settings.site_id}: the coordinator still counts this site's previous "
            f"session (node {node_id}) as online, as it does for up to a minute after a crash; "
            f"retrying in {REACTIVATION_PAUSE_SECONDS:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        try:
            time.sleep(REACTIVATION_PAUSE_SECONDS)
        except KeyboardInterrupt:
            return 130


def run_supernode(
    settings: SiteSettings,
    insecure: bool,
    max_wait_seconds: float | None,
    runtime: str = ZYGOTE_FAST_POLL,
) -> int:
    """Run the site's processes in the foreground, echoing their logs; a failure ends in one
    line. With the ``zygote+fast-poll`` and ``zygote`` runtimes these are the SuperNode and fedgov's
    SuperExec: when either stops, the other is stopped too, and both stop when this process
    dies, however it dies (:mod:`fedgov.process_guard`)."""
    _check_runtime(runtime)
    claim_site(settings)
    guard = ProcessGuard()  # stops the helpers' groups if this daemon is killed outright
    try:
        return _run_site_processes(settings, insecure, max_wait_seconds, runtime, guard)
    finally:
        guard.close()


def _run_site_processes(
    settings: SiteSettings,
    insecure: bool,
    max_wait_seconds: float | None,
    runtime: str,
    guard: ProcessGuard,
) -> int:
    """:func:`run_supernode`'s body: start the helpers, watch them, and say how the site ended."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: as Ctrl-C
    helpers = _SiteHelpers(_helper_environment(settings, runtime), guard)
    from clients.site_status import DaemonStatus

    status = DaemonStatus(settings.site_dir, settings.site_id, settings.coordinator, runtime)
    status.write()  # fedgov site status: this daemon's pid; supernode.json: its connection
    try:
        supernode = helpers.start(
            "supernode", supernode_command(settings, insecure, max_wait_seconds, runtime)
        )
        if runtime != STOCK:
            helpers.start("superexec", superexec_command(settings, supernode.pid))
        status.started({name: process.pid for name, process in helpers.processes.items()})
        fatal, stopped = helpers.watch()
    except KeyboardInterrupt:
        _stop_all(helpers.processes)
        status.stopped("interrupted (Ctrl-C or SIGTERM)")
        return 130
    return _site_outcome(settings, helpers, fatal, stopped, status)


def _helper_environment(settings: SiteSettings, runtime: str) -> dict[str, str]:
    """The environment of the site's helpers (SuperNode, SuperExec) for ``runtime``."""
    env = site_environment(settings)
    # Every ClientApp Flower starts by name (stock executor, forking executor's fallback) is the
    # guarded one (clients/app_guard.py): an app the site did not approve never runs.
    from clients.app_guard import write_clientapp_shim

    env["PATH"] = f"{write_clientapp_shim(settings.site_dir)}{os.pathsep}{env.get('PATH', '')}"
    if runtime != STOCK:
        write_superexec_secret(settings)
    if runtime == ZYGOTE_FAST_POLL and doorbell.available():
        env[doorbell.DOORBELL_ENV] = doorbell.new_name()  # the SuperNode rings the SuperExec
    from clients.site_status import SUPERNODE_FILE, SUPERNODE_STATE_ENV

    # The SuperNode records its own contact with the SuperLink there (fedgov site status);
    # the previous SuperNode's record goes first (its node id was read before, by run_site).
    (settings.site_dir / SUPERNODE_FILE).unlink(missing_ok=True)
    env[SUPERNODE_STATE_ENV] = str(settings.site_dir / SUPERNODE_FILE)
    if runtime != STOCK:  # the zygote reads the site's rows once, before forking any task
        from clients.site_data import DATA_ENV, SCHEMA_ENV

        env[DATA_ENV], env[SCHEMA_ENV] = str(settings.data), str(settings.schema)
    return env


class _SiteHelpers:
    """The site's helper processes: started in their own process groups, their output echoed
    and kept (the last lines, for a one-line error), watched until one of them ends."""

    def __init__(self, env: dict[str, str], guard: ProcessGuard) -> None:
        self.env, self.guard = env, guard
        self.processes: dict[str, subprocess.Popen] = {}
        self.lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self.tail: list[str] = []  # the last lines of all helpers together
        self.last_lines: dict[str, list[str]] = {}  # per helper, for the one-line error
        self.finished: set[str] = set()  # helpers whose output ended

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        # Each helper leads its own process group (stopped as a whole), and gets SIGTERM
        # from the kernel the moment this daemon dies, even by SIGKILL.
        process = subprocess.Popen(
            command,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
            preexec_fn=exit_with_parent,
        )
        self.processes[name] = process
        self.guard.watch(process.pid)

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                self.lines.put((name, line))
            self.lines.put((name, None))

        threading.Thread(target=pump, daemon=True).start()
        return process

    def watch(self) -> tuple[bool, str | None]:
        """Echo the helpers' output until a fatal line (→ ``(True, None)``) or until a helper
        exits (→ ``(False, its name)``), having read what it still wrote."""
        exited_at: float | None = None
        while True:
            try:
                name, line = self.lines.get(timeout=0.2)
            except queue.Empty:
                name, line = "", ""
            if line is None:
                self.finished.add(name)
            elif line:
                sys.stderr.write(line)
                self.tail = [*self.tail[-40:], line]
                self.last_lines[name] = [*self.last_lines.get(name, [])[-5:], line]
                if any(pattern in line for pattern in FATAL_PATTERNS):
                    return True, None
            exited = [n for n, p in self.processes.items() if p.poll() is not None]
            if not exited:
                continue
            # Read what the exited process still wrote; its helpers may hold the pipe open.
            exited_at = exited_at or time.monotonic()
            if exited[0] in self.finished or time.monotonic() - exited_at > EXIT_DRAIN_SECONDS:
                return False, exited[0]


def _site_outcome(
    settings: SiteSettings,
    helpers: _SiteHelpers,
    fatal: bool,
    stopped: str | None,
    status: DaemonStatus,
) -> int:
    """Stop every helper and end the site: 0 when the SuperNode finished, else one line."""
    processes = helpers.processes
    codes = {name: process.poll() for name, process in processes.items()}
    _stop_all(processes)
    code = (
        codes["supernode"] if codes["supernode"] is not None else processes["supernode"].returncode
    )
    tail = "".join(helpers.tail)
    if fatal or (stopped == "supernode" and code != 0):
        reason = explain_supernode_exit(settings, code, tail)
        status.stopped(reason)
        if ACTIVATION_REFUSED in tail:
            raise ActivationRefused(reason)
        raise FedgovError(reason)
    if stopped == "superexec":
        said = [line.strip() for line in helpers.last_lines.get("superexec", []) if line.strip()]
        reason = f"site {settings.site_id}: the SuperExec exited with code {codes['superexec']}" + (
            f" ({said[-1]})" if said else ""
        )
        status.stopped(reason)
        raise FedgovError(reason)
    status.stopped(f"the SuperNode exited with code {code}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_all(processes: dict[str, subprocess.Popen]) -> None:
    """Stop every process of the site (each with its own helpers), the SuperExec first."""
    for name in sorted(processes, key=lambda name: name != "superexec"):
        _stop(processes[name])


def _stop(process: subprocess.Popen) -> None:
    """Stop the SuperNode and the helpers it started (its whole process group)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
