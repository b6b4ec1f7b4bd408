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

Everything the site's ClientApp needs reaches it through the node config (``site-id``,
``data-path``, ``schema-path``, ``site-dir``, ``epsilon-cap``), never through the server's messages.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clients.connector import load_schema_file, read_site_table
from fedgov.deploy import flower_environment, flower_tool, read_yaml_mapping, write_file
from fedgov.errors import ConfigError, FedgovError

SITE_KEYS = (
    "site_id", "coordinator", "ca_cert", "auth_key", "data", "schema", "epsilon_cap", "port",
    "insecure",
)  # fmt: skip
EXIT_NOT_CONNECTED = 305  # flower-supernode: the SuperLink refused or could not be reached


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
        }


def create_node_auth_key(private_path: str | Path) -> Path:
    """A site's SuperNode authentication key pair (ECDSA P-384, OpenSSH public key).

    Writes the private key (OpenSSH format, as flower-supernode loads it; mode 0600) at
    ``private_path`` and the public key next to it as ``<name>.pub``; returns the public key's
    path, which the coordinator registers.
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
    public_key = create_node_auth_key(out / "keys" / "node.key")
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
    }
    config_path.write_text(yaml.safe_dump(fields, sort_keys=False))
    load_site_settings(config_path)  # what we wrote must read back
    return config_path, public_key


def check_site(settings: SiteSettings, insecure: bool) -> int:
    """Validate everything before connecting: data against schema, key, CA. Returns row count."""
    if not settings.schema.is_file():
        raise FedgovError(f"site {settings.site_id}: schema file {settings.schema} does not exist")
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


def supernode_command(
    settings: SiteSettings, insecure: bool, max_wait_seconds: float | None = None
) -> list[str]:
    """The flower-supernode command line; it reconnects with back-off while the coordinator
    is away (for ``max_wait_seconds`` in total, or forever when None)."""
    node_config = " ".join(
        f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}"
        for key, value in settings.node_config().items()
    )
    command = [
        flower_tool("flower-supernode"),
        "--superlink", settings.coordinator,
        "--node-config", node_config,
        "--host", "127.0.0.1",
        "--port", str(settings.port),
    ]  # fmt: skip
    if max_wait_seconds is not None:
        command += ["--max-wait-time", str(max_wait_seconds)]
    if insecure:
        command.append("--insecure")
    else:
        command += [
            "--root-certificates", str(settings.ca_cert),
            "--auth-supernode-private-key", str(settings.auth_key),
        ]  # fmt: skip
    return command


def site_environment(settings: SiteSettings) -> dict[str, str]:
    """Environment of the SuperNode: Flower offline, this venv's tools first on PATH."""
    return flower_environment(settings.site_dir / "flwr-home")


def explain_supernode_exit(settings: SiteSettings, code: int, log_tail: str) -> str:
    """One line saying why the SuperNode stopped, from its exit code and last log lines."""
    if "CERTIFICATE_VERIFY_FAILED" in log_tail:
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
    if code == EXIT_NOT_CONNECTED:
        return f"site {settings.site_id}: could not connect to {settings.coordinator}"
    return f"site {settings.site_id}: the SuperNode exited with code {code}"


#: Log lines after which the SuperNode cannot succeed by retrying: stop at once and say why.
FATAL_PATTERNS = ("Failed to activate SuperNode", "CERTIFICATE_VERIFY_FAILED")


def run_supernode(settings: SiteSettings, insecure: bool, max_wait_seconds: float | None) -> int:
    """Run the SuperNode in the foreground, echoing its log; a failure ends in one line."""
    process = subprocess.Popen(
        supernode_command(settings, insecure, max_wait_seconds),
        env=site_environment(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1, start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    tail: list[str] = []
    fatal = False
    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                sys.stderr.write(line)
                tail = [*tail[-40:], line]
                if any(pattern in line for pattern in FATAL_PATTERNS):
                    fatal = True
                    break
            elif process.poll() is not None:
                break  # the SuperNode exited; its helpers may still hold the pipe open
    except KeyboardInterrupt:
        _stop(process)
        return 130
    code = process.poll()
    _stop(process)
    code = process.returncode if code is None else code
    if fatal or code != 0:
        raise FedgovError(explain_supernode_exit(settings, code, "".join(tail)))
    return 0


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
