"""``fedgov console``: serve the read-only governance console on 127.0.0.1."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from pathlib import Path

from fedgov.errors import FedgovError
from server.registry.checkpoint import ANCHOR_ENV, read_checkpoint

DEFAULT_PORT = 8090


def add_commands(commands: argparse._SubParsersAction) -> None:
    console = commands.add_parser(
        "console",
        help="serve the read-only governance console (budgets, runs, models, approvals)",
        description=(
            "Serve a read-only web console over a model registry and a folder of run outputs: "
            "the federation's privacy budget per site across runs, each run's guarantees and "
            "participation, each model version's lineage, gates and approvals, a privacy "
            "budget statement (HTML/PDF), JSON twins (?format=json) and /metrics."
        ),
    )
    console.add_argument("--registry", required=True, help="the registry folder")
    console.add_argument(
        "--runs", required=True, help="folder holding run outputs (searched 3 levels deep)"
    )
    console.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help="TCP port (default: %(default)s)"
    )
    console.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s; any other needs --token-file)",
    )
    console.add_argument(
        "--token-file",
        help="file holding a bearer token that every request must carry (Authorization: "
        "Bearer TOKEN, or HTTP Basic with the token as password)",
    )
    console.add_argument(
        "--anchor",
        default=os.environ.get(ANCHOR_ENV) or None,
        help="a checkpoint of the registry's audit chain kept outside it (fedgov registry "
        f"checkpoint): the models pages say whether the chain extends it (default: ${ANCHOR_ENV})",
    )
    console.set_defaults(handler=_serve)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got '{text}'") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {value}")
    return value


def read_token(path: str) -> str:
    """The token in ``path`` (stripped); refuses an unreadable, empty or short one."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise FedgovError(f"--token-file: {path} cannot be read ({reason})") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise FedgovError(
            f"--token-file: {path} must hold one token of at least 16 characters without "
            "spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def check_sources(registry: str, runs: str) -> tuple[Path, Path]:
    """Both folders exist (the registry may still be empty: the models page says so)."""
    runs_root = Path(runs).resolve()
    if not runs_root.is_dir():
        raise FedgovError(f"--runs: {runs_root} is not a folder (expected a folder of run outputs)")
    registry_path = Path(registry).resolve()
    if not registry_path.is_dir():
        raise FedgovError(f"--registry: {registry_path} is not a folder (expected a registry)")
    return registry_path, runs_root


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from console.app import create_app
    from console.pages import Sources

    registry_path, runs_root = check_sources(args.registry, args.runs)
    token = read_token(args.token_file) if args.token_file else None
    if token is None and not _is_loopback(args.host):
        raise FedgovError(
            f"--host {args.host}: serving beyond this machine needs --token-file (the console "
            "shows privacy budgets and approvals)"
        )
    with socket.socket() as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as error:
            raise FedgovError(
                f"--port {args.port}: cannot listen on {args.host} ({error.strerror})"
            ) from None
    anchor = None
    if args.anchor:
        anchor = Path(args.anchor).resolve()
        read_checkpoint(anchor)  # a file that is no checkpoint: one line now, not on every page
    app = create_app(Sources(registry_path, runs_root, anchor), token, warm=True)
    print(
        f"fedgov console: http://{args.host}:{args.port}/ (read-only; registry {registry_path}, "
        f"runs {runs_root}{', token required' if token else ''}); Ctrl-C stops it",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
