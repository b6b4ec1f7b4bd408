"""The coordinator: a Flower SuperLink with TLS, node authentication and a persistent state.

``server.yaml`` (all paths relative to the file's folder)::

    federation: hospitals        # name used by `fedgov run` and `fedgov server add-site`
    host: 127.0.0.1              # address the SuperLink listens on (sites connect here)
    port: 9092
    certs: certs                 # ca.crt, server.crt, server.key (`fedgov server certs`)
    database: state/superlink.db # the SuperLink's state: the registered sites are kept
                                 # in state/superlink.db.nodes.json (server/superlink_state.py)
    insecure: false              # plain HTTP: only behind the explicit --insecure flag
    schema: schema.yaml          # optional: the sites' agreed schema (`fedgov run --schema`)
    holdout: holdout.csv         # optional: the coordinator's hold-out (`fedgov run --holdout`)

This module turns the file into typed settings and command lines; the CLI runs them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedgov.deploy import flower_environment as flower_env
from fedgov.deploy import read_yaml_mapping
from fedgov.errors import ConfigError, FedgovError
from fedgov.instance_lock import check_port_free, hold_lock
from fedgov.process_guard import ProcessGuard, exit_with_parent, stop_groups

SERVER_KEYS = ("federation", "host", "port", "certs", "database", "insecure", "schema", "holdout")


@dataclass(frozen=True)
class ServerSettings:
    """The coordinator's settings, with paths resolved against ``server.yaml``'s folder."""

    config_path: Path
    federation: str
    host: str
    port: int
    certs: Path
    database: Path
    insecure: bool
    schema: Path | None = None  # the federation's schema file, used by `fedgov run`
    holdout: Path | None = None  # the coordinator's hold-out of that schema

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def local_address(self) -> str:
        """Where the coordinator's own ``flwr`` calls reach its SuperLink: its Control API
        answers only this host (server/superlink.py), so a wildcard host goes via loopback."""
        wildcards = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}
        return f"{wildcards.get(self.host, self.host)}:{self.port}"

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of the coordinator's own `flwr` CLI calls (connection + app cache)."""
        return self.config_path.parent / "flwr-home"

    @property
    def ca_cert(self) -> Path:
        return self.certs / "ca.crt"


def load_server_settings(path: str | Path) -> ServerSettings:
    """Read and check ``server.yaml``; a mistake raises ConfigError naming the field."""
    data = read_yaml_mapping(path, "server config")
    unknown = sorted(set(data) - set(SERVER_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(SERVER_KEYS)})")
    base = Path(path).resolve().parent
    port = data.get("port", 9092)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{path}: port must be a whole number in 1..65535, got {port!r}")
    return ServerSettings(
        config_path=Path(path).resolve(),
        federation=str(data.get("federation", "fedgov")),
        host=str(data.get("host", "127.0.0.1")),
        port=port,
        certs=(base / str(data.get("certs", "certs"))).resolve(),
        database=(base / str(data.get("database", "state/superlink.db"))).resolve(),
        insecure=bool(data.get("insecure", False)),
        schema=_optional_path(base, data.get("schema")),
        holdout=_optional_path(base, data.get("holdout")),
    )


def _optional_path(base: Path, value: object) -> Path | None:
    """A path from ``server.yaml`` resolved against its folder; absent or empty → None."""
    return (base / str(value)).resolve() if value not in (None, "") else None


def write_server_config(path: str | Path, **fields: Any) -> Path:
    """Write a ``server.yaml`` with ``fields`` over the defaults."""
    defaults: dict[str, Any] = {
        "federation": "fedgov",
        "host": "127.0.0.1",
        "port": 9092,
        "certs": "certs",
        "database": "state/superlink.db",
        "insecure": False,
    }
    defaults.update(fields)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(defaults, sort_keys=False))
    return path


def check_server_files(settings: ServerSettings, insecure: bool) -> None:
    """Fail before starting when a certificate or key is missing."""
    if insecure:
        return
    for name in ("ca.crt", "server.crt", "server.key"):
        if not (settings.certs / name).is_file():
            raise FedgovError(
                f"certs: {settings.certs / name} is missing "
                f"(create them with: fedgov server certs --out {settings.certs})"
            )


def superlink_command(settings: ServerSettings, insecure: bool) -> list[str]:
    """The SuperLink's command line for these settings: Flower's ``flower-superlink`` through
    :mod:`server.superlink` (Control and Runtime APIs answer only this host)."""
    command = [
        sys.executable,
        "-m",
        "server.superlink",  # flower-superlink, Control API local-only
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--database",
        str(settings.database),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        command.append("--insecure")
    else:
        command += [
            "--ssl-certfile",
            str(settings.certs / "server.crt"),
            "--ssl-keyfile",
            str(settings.certs / "server.key"),
            "--ssl-ca-certfile",
            str(settings.ca_cert),
            "--enable-supernode-auth",
        ]
    return command


def write_flwr_connection(settings: ServerSettings, insecure: bool) -> Path:
    """Write FLWR_HOME/config.toml so the coordinator's `flwr` calls reach its SuperLink."""
    settings.flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{settings.federation}"',
        "",
        f"[superlink.{settings.federation}]",
        f'address = "{settings.local_address}"',
    ]
    if insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{settings.ca_cert}"')
    path = settings.flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def flower_environment(settings: ServerSettings) -> dict[str, str]:
    """The environment for every Flower process the coordinator starts."""
    return flower_env(settings.flwr_home)


def claim_coordinator(settings: ServerSettings) -> None:
    """Make this process the only coordinator of this state, before it starts anything.

    Takes the lock beside the state database (a second ``fedgov server start`` is refused at
    once, in one line) and checks that the SuperLink's port is free (one line naming it).
    """
    hold_lock(
        settings.database.with_name(settings.database.name + ".lock"),
        f"coordinator '{settings.federation}': a coordinator already runs on the state "
        f"{settings.database} (pid {{pid}}); stop it first",
    )
    check_port_free(
        settings.host,
        settings.port,
        f"coordinator '{settings.federation}'",
        f"choose another `port:` in {settings.config_path.name} (and give the sites the new "
        "address)",
    )


def run_superlink(
    settings: ServerSettings,
    insecure: bool,
    log_format: str = "text",
    metrics_host: str = "127.0.0.1",
    metrics_port: int | None = None,
) -> int:
    """Run the SuperLink in the foreground (with /metrics and JSON logs if asked); exit status."""
    from server.observability import MetricsServer, json_log_line, prometheus_text, read_statuses

    claim_coordinator(settings)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: as Ctrl-C
    metrics = None
    if metrics_port is not None:
        state_dir = settings.database.parent
        try:
            metrics = MetricsServer(
                lambda: prometheus_text(read_statuses(state_dir)), metrics_host, metrics_port
            ).start()
        except OSError as error:
            raise FedgovError(
                f"--metrics-port: cannot listen on {metrics_host}:{metrics_port} ({error.strerror})"
            ) from None
        print(f"fedgov: metrics on http://{metrics_host}:{metrics.port}/metrics", file=sys.stderr)
    guard = ProcessGuard()  # stops the SuperLink's group if this command is killed outright
    # The SuperLink leads its own process group and gets SIGTERM from the kernel the moment
    # this command dies, even by SIGKILL; its flower-superexec watches its pid.
    process = subprocess.Popen(
        superlink_command(settings, insecure),
        env=flower_environment(settings),
        stdout=subprocess.PIPE if log_format == "json" else None,
        stderr=subprocess.STDOUT if log_format == "json" else None,
        text=True,
        start_new_session=True,
        preexec_fn=exit_with_parent,
    )
    guard.watch(process.pid)
    try:
        if process.stdout is not None:
            for line in process.stdout:
                if (record := json_log_line(line, "superlink")) is not None:
                    print(record, flush=True)
        return process.wait()
    except KeyboardInterrupt:
        stop_groups([process.pid], grace=30)
        process.wait()
        return 130
    finally:
        guard.close()
        if metrics is not None:
            metrics.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
