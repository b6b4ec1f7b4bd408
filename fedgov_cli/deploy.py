"""``fedgov server ...``, ``fedgov site ...`` and ``fedgov run``: a real federation's commands."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fedgov.errors import FedgovError


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the deployment commands on the top-level ``fedgov`` parser."""
    _add_server(commands)
    _add_site(commands)
    _add_run(commands)


# ---- coordinator ----------------------------------------------------------------------------


def _add_server(commands: argparse._SubParsersAction) -> None:
    server = commands.add_parser(
        "server", help="run the coordinator (a Flower SuperLink with TLS and site authentication)"
    )
    actions = server.add_subparsers(dest="server_command", metavar="ACTION", required=True)

    certs = actions.add_parser(
        "certs",
        help="create the federation's CA and the coordinator's TLS certificate",
        description="Write ca.crt, ca.key, server.crt and server.key into --out. "
        "Give every site ca.crt; keep ca.key and server.key on the coordinator.",
    )
    certs.add_argument("--out", default="certs", help="folder for the files (default: %(default)s)")
    certs.add_argument(
        "--host",
        action="append",
        default=None,
        help="host name or IP address the sites use to reach the coordinator (repeatable; "
        "127.0.0.1 and localhost are always added: the coordinator's own calls use them)",
    )
    certs.add_argument("--federation", default="fedgov", help="federation name in the certificates")
    certs.add_argument("--overwrite", action="store_true", help="replace existing files")
    certs.set_defaults(handler=_server_certs)

    start = actions.add_parser(
        "start",
        help="start the coordinator from server.yaml (TLS and site authentication on)",
        description="Start a Flower SuperLink with TLS, SuperNode authentication and a "
        "persistent state database, as server.yaml says. Runs until interrupted.",
    )
    start.add_argument(
        "--config", default="server.yaml", help="server config (default: %(default)s)"
    )
    start.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP and no site authentication (testing only: prints a warning)",
    )
    start.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics (rounds, sites, declines, ε) on this port at /metrics",
    )
    start.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the metrics endpoint (default: %(default)s)",
    )
    start.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one JSON object per log line, for log collectors (default: %(default)s)",
    )
    start.set_defaults(handler=_server_start)

    add_site = actions.add_parser(
        "add-site",
        help="register a site's public key so its daemon may join",
        description="Register a site's node-authentication public key (keys/node.key.pub, "
        "written by `fedgov site init`) with the running coordinator.",
    )
    add_site.add_argument("public_key", metavar="PUBKEY", help="the site's node.key.pub")
    add_site.add_argument(
        "--site-id",
        default=None,
        help="the site's name (default: the key's comment, written by `fedgov site init`)",
    )
    add_site.add_argument(
        "--config", default="server.yaml", help="server config (default: %(default)s)"
    )
    add_site.set_defaults(handler=_server_add_site)

    sites = actions.add_parser(
        "sites",
        help="list the sites: name, node id, online or offline",
        description="Every node the coordinator knows (Flower's list), with the site name "
        "`fedgov server add-site` recorded for it in sites.json beside the state database.",
    )
    sites.add_argument(
        "--config", default="server.yaml", help="server config (default: %(default)s)"
    )
    sites.add_argument("--json", action="store_true", help="machine-readable output")
    sites.set_defaults(handler=_server_sites)

    remove = actions.add_parser(
        "remove-site",
        help="unregister a site's key: it can no longer join",
        description="Unregister the site's key at the coordinator (Flower's `flwr supernode "
        "unregister`) and forget its name. Give the site id (or its node id).",
    )
    remove.add_argument("site", metavar="SITE", help="site id (as `fedgov server sites` lists)")
    remove.add_argument(
        "--config", default="server.yaml", help="server config (default: %(default)s)"
    )
    remove.set_defaults(handler=_server_remove_site)

    renew = actions.add_parser(
        "renew-cert",
        help="issue a new server.crt (same key, same CA) before the old one expires",
        description="Sign a fresh server.crt with the federation's ca.key for the coordinator's "
        "existing server.key; sites keep their ca.crt. Restart the coordinator to use it.",
    )
    renew.add_argument("--certs", default="certs", help="certificate folder (default: %(default)s)")
    renew.add_argument(
        "--host",
        action="append",
        default=None,
        help="host names or addresses to certify (repeatable; default: those of the old "
        "certificate)",
    )
    renew.add_argument("--days", type=int, default=None, help="validity in days (default: 825)")
    renew.set_defaults(handler=_server_renew_cert)


def _server_certs(args: argparse.Namespace) -> int:
    from fedgov.certs import create_federation_certs

    hosts = list(dict.fromkeys([*(args.host or []), "127.0.0.1", "localhost"]))
    paths = create_federation_certs(args.out, hosts, args.federation, overwrite=args.overwrite)
    print(f"CA certificate (give to every site): {paths.ca_cert}")
    print(f"server certificate for {', '.join(hosts)}: {paths.server_cert}")
    print(f"private keys (keep on the coordinator): {paths.ca_key}, {paths.server_key}")
    return 0


def _server_start(args: argparse.Namespace) -> int:
    from server.coordinator import (
        check_server_files,
        claim_coordinator,
        load_server_settings,
        run_superlink,
        write_flwr_connection,
    )

    settings = load_server_settings(args.config)
    insecure = args.insecure or settings.insecure
    if settings.insecure and not args.insecure:
        raise FedgovError(
            f"{settings.config_path}: insecure: true needs the explicit --insecure flag as well"
        )
    if insecure:
        print(
            "fedgov: WARNING: insecure mode: no TLS and no site authentication; anyone who can "
            f"reach {settings.address} can join and read the traffic. Use it for tests only.",
            file=sys.stderr,
        )
    check_server_files(settings, insecure)
    claim_coordinator(settings)  # one coordinator per state, a free port: before anything else
    settings.database.parent.mkdir(parents=True, exist_ok=True)
    write_flwr_connection(settings, insecure)
    print(
        f"fedgov: coordinator '{settings.federation}' on {settings.address} "
        f"({'insecure' if insecure else 'TLS, site authentication on'}); state {settings.database}",
        file=sys.stderr,
        flush=True,
    )
    return run_superlink(settings, insecure, args.log_format, args.metrics_host, args.metrics_port)


def _server_add_site(args: argparse.Namespace) -> int:
    from server.coordinator import load_server_settings
    from server.sites import add_site

    site = add_site(load_server_settings(args.config), Path(args.public_key), args.site_id)
    print(
        f"site {site['site_id']} registered successfully as node {site['node_id']}; it may join now"
    )
    return 0


def _server_sites(args: argparse.Namespace) -> int:
    import json

    from server.coordinator import load_server_settings
    from server.sites import list_sites

    sites = list_sites(load_server_settings(args.config))
    if args.json:
        print(json.dumps(sites, indent=2))
        return 0
    if not sites:
        print("no sites added yet (fedgov server add-site PUBKEY)")
    for site in sites:
        name = site["site_id"] or "(not added by fedgov)"
        print(f"{name:<24} node {site['node_id']:<22} {site['status']}")
    return 0


def _server_remove_site(args: argparse.Namespace) -> int:
    from server.coordinator import load_server_settings
    from server.sites import remove_site

    removed = remove_site(load_server_settings(args.config), args.site)
    name = f"site {removed['site_id']}" if removed["site_id"] else "a site"
    print(f"{name} (node {removed['node_id']}) removed: its key can no longer join")
    return 0


def _server_renew_cert(args: argparse.Namespace) -> int:
    from fedgov.certs import renew_server_cert

    cert = renew_server_cert(args.certs, args.host, days=args.days)
    print(
        f"server certificate renewed: {cert.path}, valid until {cert.not_after:%Y-%m-%d %H:%M} "
        f"UTC for {', '.join(cert.hosts)}; restart the coordinator (fedgov server start) to use it"
    )
    return 0


# ---- site daemon ----------------------------------------------------------------------------


def _add_site(commands: argparse._SubParsersAction) -> None:
    site = commands.add_parser("site", help="set up and run a site's daemon (a Flower SuperNode)")
    actions = site.add_subparsers(dest="site_command", metavar="ACTION", required=True)

    init = actions.add_parser(
        "init",
        help="write site.yaml and the site's keys",
        description="Create a site folder: site.yaml, keys/node.key (+ .pub to send to the "
        "coordinator). The data is validated against its schema first.",
    )
    init.add_argument("--site-id", required=True, help="this site's name, e.g. hosp-a")
    init.add_argument("--data", required=True, help="the site's CSV or Parquet file")
    init.add_argument("--schema", required=True, help="schema file (YAML/JSON) the data must match")
    init.add_argument("--coordinator", required=True, help="the coordinator's HOST:PORT")
    init.add_argument("--ca", default=None, help="the federation's ca.crt")
    init.add_argument(
        "--epsilon-cap", type=float, default=8.0, help="ε this site will never exceed"
    )
    init.add_argument("--port", type=int, default=9094, help="local runtime API port")
    init.add_argument("--out", default=".", help="site folder (default: current folder)")
    init.add_argument(
        "--governance-anchor",
        metavar="FILE",
        default=None,
        help="governance's public keys and quorum (`fedgov roster governance-anchor`): this "
        "site then accepts a SecAgg+ roster only with that quorum of their signatures",
    )
    init.set_defaults(handler=_site_init)

    start = actions.add_parser(
        "start",
        help="validate the site's data and config, then join the federation",
        description="Check data, schema, key and CA first (one line on any problem), then run "
        "the SuperNode, reconnecting with back-off while the coordinator is away.",
    )
    start.add_argument("--config", default="site.yaml", help="site config (default: %(default)s)")
    start.add_argument("--insecure", action="store_true", help="no TLS (tests only)")
    start.add_argument(
        "--max-wait",
        type=float,
        default=None,
        help="give up after this many seconds without the coordinator (default: never)",
    )
    start.add_argument("--check", action="store_true", help="only validate, do not connect")
    start.add_argument(
        "--port",
        type=int,
        default=None,
        help="local port of the SuperNode's runtime API, over site.yaml's `port` (two sites on "
        "one host need two ports)",
    )
    start.add_argument(
        "--stock-executor",
        action="store_true",
        help="run Flower's stock SuperNode (a fresh ClientApp interpreter per message and "
        "Flower's fixed pauses), for comparison; default: fedgov's SuperNode and forking SuperExec",
    )
    start.add_argument(
        "--stock-supernode",
        action="store_true",
        help="keep fedgov's forking SuperExec but Flower's own SuperNode pauses (3 s per empty "
        "pull), for comparison",
    )
    start.set_defaults(handler=_site_start)

    budget = actions.add_parser(
        "budget",
        help="show what this site's privacy ledger has spent against its cap",
        description="Read the site's own ledger (privacy_ledger.json in the site folder): ε spent "
        "(recomputed from its history), the cap from site.yaml, every spend and decline.",
    )
    budget.add_argument("--config", default="site.yaml", help="site config (default: %(default)s)")
    budget.add_argument("--json", action="store_true", help="machine-readable output")
    budget.set_defaults(handler=_site_budget)

    status = actions.add_parser(
        "status",
        help="say whether the site's daemon runs and is connected, and what it last did",
        description="Read the site folder: the daemon's daemon.json (its pid, checked alive), "
        "its SuperNode's supernode.json (node id, last contact), the last train request answered "
        "(activity.json: run, round, trained or declined) and ε spent against the cap (the "
        "ledger). Exit 0 whatever the state; --json for scripts.",
    )
    status.add_argument("--config", default="site.yaml", help="site config (default: %(default)s)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_site_status)

    from fedgov_cli.site_apps import add_apps_command
    from fedgov_cli.site_ledger import add_ledger_command

    add_apps_command(actions)  # fedgov site apps list|show|approve|revoke
    add_ledger_command(actions)  # fedgov site ledger journal|restore


def _site_init(args: argparse.Namespace) -> int:
    from clients.daemon import init_site
    from fedgov_data.connector import load_schema_file, read_site_table

    anchor = None
    if args.governance_anchor:  # checked before anything is written
        from privacy.secagg.roster import RosterError, read_governance_anchor

        try:
            anchor = read_governance_anchor(args.governance_anchor, args.site_id)
        except RosterError as error:
            raise FedgovError(f"--governance-anchor: {error}") from None
    _, labels = read_site_table(args.data, load_schema_file(args.schema))
    config, public_key = init_site(
        args.out,
        args.site_id,
        args.data,
        args.schema,
        args.coordinator,
        args.ca,
        args.epsilon_cap,
        args.port,
    )
    print(f"site {args.site_id}: {len(labels)} rows valid; config {config}")
    print(f"send this public key to the coordinator (fedgov server add-site): {public_key}")
    if anchor is not None:
        from privacy.receipts import PUBLIC_KEY_FILE
        from privacy.secagg.roster import save_anchor

        path = save_anchor(config.parent, anchor)
        identity = (config.parent / PUBLIC_KEY_FILE).read_text().strip()
        print(f"trust anchor {path} (quorum {anchor.quorum} of {len(anchor.governance_keys)})")
        print(f"send this identity key to governance (fedgov roster add): {identity}")
    return 0


def _site_start(args: argparse.Namespace) -> int:
    import dataclasses

    from clients.daemon import (
        STOCK,
        ZYGOTE,
        ZYGOTE_FAST_POLL,
        check_site,
        claim_site,
        load_site_settings,
        run_site,
    )

    settings = load_site_settings(args.config)
    if args.port is not None:
        if not 1 <= args.port <= 65535:
            raise FedgovError(f"--port must be in 1..65535, got {args.port}")
        settings = dataclasses.replace(settings, port=args.port)
    insecure = args.insecure or settings.insecure
    if not args.check:
        claim_site(settings)  # one daemon per site folder, a free port: before anything else
    rows = check_site(settings, insecure)
    print(
        f"fedgov: site {settings.site_id}: {rows} rows valid; joining {settings.coordinator}"
        + (" (insecure)" if insecure else ""),
        file=sys.stderr,
        flush=True,
    )
    if args.check:
        return 0
    runtime = STOCK if args.stock_executor else ZYGOTE if args.stock_supernode else ZYGOTE_FAST_POLL
    return run_site(settings, insecure, args.max_wait, runtime)


def _site_budget(args: argparse.Namespace) -> int:
    import json

    from clients.budget import format_budget, read_budget
    from clients.daemon import load_site_settings

    settings = load_site_settings(args.config)
    summary = read_budget(settings.site_dir, settings.site_id, settings.epsilon_cap)
    print(json.dumps(summary.as_dict(), indent=2) if args.json else format_budget(summary))
    return 0


def _site_status(args: argparse.Namespace) -> int:
    import json

    from clients.daemon import load_site_settings
    from clients.site_status import format_status, read_status

    settings = load_site_settings(args.config)
    status = read_status(settings.site_dir, settings.site_id, settings.epsilon_cap)
    print(json.dumps(status.as_dict(), indent=2) if args.json else format_status(status))
    return 0


# ---- runs -----------------------------------------------------------------------------------


def _add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="train on the real federation from the same Hydra config a simulation uses",
        description="Compose conf/ with the given Hydra overrides (exactly as "
        "`python -m simulations.run` does) and launch it on the coordinator with `flwr run`.",
    )
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. rounds=5 strategy=fedprox")
    run.add_argument("--config", default="server.yaml", help="server config (default: %(default)s)")
    run.add_argument(
        "--out", default=None, help="run directory (default: runs/<time> by server.yaml)"
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue an interrupted run from its last checkpoint, with the config it started "
        "with (no overrides)",
    )
    run.add_argument(
        "--schema",
        metavar="FILE",
        default=None,
        help="the sites' agreed schema.yaml: the model's inputs and classes come from it and a "
        "site with another schema is left out (default: server.yaml's schema:, else the bundled "
        "dataset's schema)",
    )
    run.add_argument(
        "--holdout",
        metavar="FILE",
        default=None,
        help="the coordinator's own CSV/Parquet of the same schema for central evaluation "
        "(with --schema; default: server.yaml's holdout:; without one there is no central "
        "evaluation)",
    )
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from clients.app_approval import copy_project
    from fedgov.config import to_flower_config
    from fedgov.deploy import flower_tool
    from fedgov.project import app_dir
    from server.coordinator import flower_environment, load_server_settings
    from server.observability import remember_run
    from simulations.plots import write_plots
    from simulations.run import compose_config
    from strategies.run_config import run_config_from_mapping

    settings = load_server_settings(args.config)
    if args.resume:
        if args.overrides or args.out or args.schema or args.holdout:
            raise FedgovError(
                "run --resume: takes no overrides, --out, --schema or --holdout (the run keeps "
                "its config)"
            )
        run_dir = Path(args.resume).resolve()
        cfg = _interrupted_run_config(run_dir)
    else:
        composed = compose_config(list(args.overrides))
        cfg = run_config_from_mapping(OmegaConf.to_container(composed, resolve=True))  # type: ignore[arg-type]
        schema = args.schema or (str(settings.schema) if settings.schema else None)
        holdout = args.holdout or (str(settings.holdout) if settings.holdout else None)
        _federation_data(cfg, schema, holdout)
        _deployment_privacy_defaults(cfg, list(args.overrides))
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        run_dir = Path(args.out or settings.config_path.parent / "runs" / stamp).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
    cfg.output_dir = str(run_dir)
    # A file, not `key=value` words: Flower's word parser cuts a value at its first quote, and
    # dataset.schema is JSON text. Every value is a TOML basic string, integer, float or bool.
    config_file = run_dir / "run_config.toml"
    config_file.write_text(
        "".join(f"{json.dumps(k)} = {_toml(v)}\n" for k, v in to_flower_config(cfg).items())
    )
    if not _listening(settings.local_address):
        raise FedgovError(_not_running(settings))
    remember_run(settings.database.parent, run_dir)  # reported by the coordinator's /metrics
    (run_dir / "failure.json").unlink(missing_ok=True)
    # `flwr run` builds the FAB from a copy of the app's files (the same FAB, byte for byte):
    # from the project folder it would walk the virtual environment inside it first.
    with tempfile.TemporaryDirectory(prefix="fedgov-app-") as staging:
        command = [
            flower_tool("flwr"),
            "run",
            str(copy_project(app_dir(), Path(staging))),
            settings.federation,
            "--run-config",
            str(config_file),
            "--stream",
        ]
        result = subprocess.run(command, env=flower_environment(settings), cwd=os.getcwd())
    metrics = run_dir / "metrics.json"
    failure = _read_json(run_dir / "failure.json")
    if failure is not None:
        raise FedgovError(f"run failed: {failure.get('reason', 'unknown cause')}")
    if (result.returncode != 0 or not metrics.is_file()) and not _listening(settings.local_address):
        raise FedgovError(f"run failed: {_not_running(settings)} (it stopped during the run)")
    if result.returncode != 0 or not metrics.is_file():
        raise FedgovError(
            f"run: the federation '{settings.federation}' did not finish the run "
            f"(flwr run exited {result.returncode}; see its output above)"
        )
    outcome = (_read_json(metrics) or {}).get("outcome") or {"trained": True}
    if not outcome.get("trained", True):
        raise FedgovError(str(outcome.get("reason") or "run failed: no site trained"))
    write_plots(run_dir)
    print(f"fedgov: run finished; outputs in {run_dir}")
    return 0


def _listening(address: str, seconds: float = 3.0) -> bool:
    """Whether something accepts TCP connections at ``host:port`` within ``seconds``."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=seconds):
            return True
    except OSError:
        return False


def _not_running(settings) -> str:
    return (
        f"the coordinator's SuperLink is not running at {settings.local_address} "
        f"(start it with `fedgov server start --config {settings.config_path}`)"
    )


def _toml(value: bool | int | float | str) -> str:
    """A run-config value as TOML (strings as JSON-escaped basic strings, valid TOML)."""
    if isinstance(value, str):
        return json.dumps(value)
    from fedgov.deploy import toml_value

    return toml_value(value)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _federation_data(cfg, schema_file: str | None, holdout_file: str | None) -> None:
    """Put the federation's schema (and the coordinator's hold-out path) into the run config,
    checking both here so that a mistake stops before anything runs."""
    from fedgov.datasets import schema_to_json
    from fedgov_data.connector import load_schema_file, read_site_table
    from strategies.run_config import check_run_config

    if holdout_file and not schema_file:
        raise FedgovError("run --holdout: needs --schema (the hold-out's schema)")
    if schema_file:
        schema = load_schema_file(schema_file)
        cfg.dataset.schema = schema_to_json(schema)
        if holdout_file:
            read_site_table(holdout_file, schema)
            cfg.dataset.holdout = str(Path(holdout_file).resolve())
        check_run_config(cfg)


#: ε a DP-SGD run spends at each site when the overrides choose neither σ nor a target.
DEFAULT_RUN_EPSILON = 1.0
#: The most of a site's remaining budget a run may plan to spend unless confirmed.
DEFAULT_BUDGET_SHARE = 0.5


def _deployment_privacy_defaults(cfg, overrides: list[str]) -> None:
    """A real site's budget is for life: unless the overrides say otherwise, plan σ for
    ε = DEFAULT_RUN_EPSILON per run (not σ = 1) and refuse a run past DEFAULT_BUDGET_SHARE of a
    site's remaining budget (simulated sites start afresh each run and keep the config's)."""
    from fedgov.config import sample_level_on
    from strategies.run_config import check_run_config

    given = {item.lstrip("+").split("=", 1)[0] for item in overrides}
    if not sample_level_on(cfg):
        return
    if not {"privacy.noise_multiplier", "privacy.target_epsilon"} & given:
        cfg.privacy.target_epsilon = min(DEFAULT_RUN_EPSILON, cfg.privacy.site_epsilon_cap)
    if "privacy.budget_share" not in given:
        cfg.privacy.budget_share = DEFAULT_BUDGET_SHARE
    check_run_config(cfg)


def _interrupted_run_config(run_dir: Path):
    """The config an interrupted run started with (from its checkpoint), set to resume."""
    from server.checkpoint import saved_run_config
    from strategies.run_config import load_run_config

    cfg = load_run_config(saved_run_config(run_dir))
    cfg.resume = True
    return cfg
