"""Run the fedgov Flower app on Flower's simulation engine (Ray backend), in this process.

This is what ``flwr run`` does for a simulation federation (``flwr.simulation.app``): the same
ServerApp and ClientApp, loaded from the components in ``pyproject.toml``, with the run config as
Flower's override config. Run in-process, it needs no SuperLink and returns when the run ends.
To use a Ray cluster, set ``federation.ray_address`` (e.g. ``auto`` on a cluster node).

**Each simulated site's own node config.** Flower's simulation engine gives every virtual node the
node config ``{partition-id, num-partitions}`` only. With privacy on, a site also needs what a
real site sets on its SuperNode (``flower-supernode --node-config``): ``site-dir`` (its ledger and
key, here ``<federation.sites_dir or run dir/sites>/<site-id>``), ``epsilon-cap`` (the run's
``privacy.site_epsilon_cap`` stands for every simulated site's own cap) and ``delta``. These reach
the sites through their node config — the Context the engine builds in this process and ships to
the Ray actors with every message — never through the server's messages:
:func:`fedgov.flower_hooks.simulation_node_configs` wraps ``flwr``'s
``vce_api._register_node_info_stores`` for the duration of the run and adds each site's keys to
the node's config before the Contexts exist.

**A loaded machine.** The engine runs with :class:`simulations.backend.PatientRayBackend`
(Ray's start retried, lost actors replaced, failures named by site, round and stage); a run the
engine itself cannot finish raises :class:`simulations.backend.EngineFailure` naming the stage.
Every Flower internal used here is rebound through :mod:`fedgov.flower_hooks`, for this run only.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir, get_project_config
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.telemetry import EventType

from fedgov.config import RunConfig, to_flower_config
from fedgov.deploy import FLOWER_ENVIRONMENT
from fedgov.flower_hooks import (
    run_simulation_engine,
    set_task_identity,
    simulation_backend,
    simulation_node_configs,
)
from fedgov.project import app_dir
from fedgov_data.federation import resolved_num_sites, simulated_federation
from simulations.backend import (
    MESSAGE_TIMEOUT_KEY,
    RAY_ENVIRONMENT,
    SITE_IDS_KEY,
    EngineFailure,
    PatientRayBackend,
)
from simulations.delivery import prompt_delivery
from strategies.run_config import check_run_config


def set_flower_environment(flwr_home: Path | None = None) -> None:
    """Telemetry off, no runtime dependency installation, Ray's settings (each unless already
    set), FLWR_HOME inside the run if given."""
    for name, value in {**FLOWER_ENVIRONMENT, **RAY_ENVIRONMENT}.items():
        os.environ.setdefault(name, value)
    if flwr_home is not None:
        os.environ["FLWR_HOME"] = str(flwr_home)


def quiet_flower_logs() -> None:
    """Flower's own handler prints warnings and errors; its INFO/DEBUG chatter stays out."""
    flower_logger = logging.getLogger("flwr")
    flower_logger.setLevel(logging.WARNING)
    flower_logger.propagate = False


def run_simulation(cfg: RunConfig) -> None:
    """Run ``cfg`` to the end on the Ray simulation engine; outputs go to ``cfg.output_dir``."""
    check_run_config(cfg)
    cfg.federation.num_sites = resolved_num_sites(cfg)  # also checks the data before Ray starts
    node_configs = _privacy_node_configs(cfg)  # also checks δ, batch and target ε per site
    if cfg.secagg.name == "secaggplus" and not cfg.secagg.roster:  # sites check signed keys
        from privacy.secagg.simulated_roster import simulated_roster

        site_ids = simulated_federation(cfg).site_ids
        node_configs = simulated_roster(cfg, list(site_ids), node_configs)
    set_flower_environment()
    quiet_flower_logs()
    project = app_dir()
    components = get_project_config(project)["tool"]["flwr"]["app"]["components"]
    override = to_flower_config(cfg)
    run = Run.create_empty(run_id=secrets.randbits(63))
    run.override_config = override
    run.primary_task_id = secrets.randbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    # Messages the ServerApp creates are stamped with this process's task identity.
    set_task_identity(run.primary_task_id, run.run_id, SUPERLINK_NODE_ID)
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(project, override),
    )
    init_args: dict[str, object] = {"logging_level": "ERROR", "log_to_driver": True}
    if cfg.federation.ray_address:
        init_args["address"] = cfg.federation.ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": 0.0},
        "init_args": init_args,
        SITE_IDS_KEY: list(simulated_federation(cfg).site_ids),
        MESSAGE_TIMEOUT_KEY: float(cfg.federation.round_timeout),
    }
    with (
        simulation_node_configs(node_configs),
        prompt_delivery(),
        simulation_backend(PatientRayBackend),
    ):
        try:
            run_simulation_engine(
                num_supernodes=cfg.federation.num_sites,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                server_app_attr=components["serverapp"],
                client_app_attr=components["clientapp"],
                backend_name="ray",
                backend_config=backend_config,
                app_dir=str(project),
                run=run,
                server_app_context=context,
                is_app=True,
            )
        except RuntimeError as error:
            failure = _engine_failure(error)
            if failure is error:
                raise
            raise failure from error


def _engine_failure(error: RuntimeError) -> RuntimeError:
    """Flower's "An error was encountered. Ending simulation." (and its "Simulation Runtime
    crashed."), replaced by the innermost cause's own words: fedgov's :class:`EngineFailure`
    names the stage; anything else is named as what stopped the engine."""
    causes: list[BaseException] = [error]
    while causes[-1].__cause__ is not None and len(causes) < 20:
        causes.append(causes[-1].__cause__)
    named = next((c for c in causes if isinstance(c, EngineFailure)), None)
    if named is not None:
        return EngineFailure(str(named))
    if len(causes) == 1:
        return error  # not the engine's wrapper: the ServerApp's own error, as it is
    root = causes[-1]
    return EngineFailure(f"simulation engine stopped: {type(root).__name__}: {root}")


def _privacy_node_configs(cfg: RunConfig) -> dict[int, dict[str, Any]]:
    """partition id → the node-config keys each simulated site holds for its privacy budget."""
    if cfg.privacy.name == "none":
        return {}
    from clients.site_data import load_site_data
    from clients.site_privacy import NODE_DELTA, NODE_EPSILON_CAP, NODE_SITE_DIR
    from privacy.planning import check_privacy_plan

    federation = simulated_federation(cfg)
    count = len(federation.site_ids)
    records = {
        site_id: len(load_site_data(cfg, {"partition-id": i, "num-partitions": count}).train.y)
        for i, site_id in enumerate(federation.site_ids)
    }
    check_privacy_plan(cfg, records)
    root = cfg.federation.sites_dir or (
        str(Path(cfg.output_dir) / "sites")
        if cfg.output_dir
        else tempfile.mkdtemp(prefix="fedgov-sites-")
    )
    return {
        index: {
            NODE_SITE_DIR: str(Path(root).resolve() / site_id),
            NODE_EPSILON_CAP: float(cfg.privacy.site_epsilon_cap),
            NODE_DELTA: float(cfg.privacy.delta),
        }
        for index, site_id in enumerate(federation.site_ids)
    }
