"""``python -m simulations.run [hydra overrides]``: one simulated federated run (or a sweep, -m).

Examples::

    python -m simulations.run strategy=fedprox rounds=10
    python -m simulations.run dataset=mnist5k model=cnn federation.num_sites=10 rounds=20
    python -m simulations.run -m strategy=fedavg,fedprox seed=0,1,2
    python -m simulations.run strategy._target_=examples.fedavgm.FedAvgM  # see docs/extending.md

The run directory (``hydra.run.dir``) receives metrics.json, model.safetensors and plots/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedgov.config import hydra_schema
from fedgov.errors import FedgovError
from strategies.run_config import run_config_from_mapping

ConfigStore.instance().store(name="run_schema", node=hydra_schema())

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra ``overrides``, as the command line would."""
    from hydra import compose, initialize_config_dir

    if not (CONF_DIR / "config.yaml").is_file():
        raise FedgovError(f"config: {CONF_DIR}/config.yaml is missing (install fedgov with -e)")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_from_hydra(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the simulation described by a composed Hydra config; return ``metrics.json``'s data."""
    import json

    from simulations.engine import run_simulation
    from simulations.plots import write_plots

    run_cfg = run_config_from_mapping(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    run_cfg.output_dir = str(Path(run_dir).resolve())
    run_simulation(run_cfg)
    metrics_path = Path(run_cfg.output_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    write_plots(run_cfg.output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final federated accuracy (for sweepers)."""
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = run_from_hydra(cfg, run_dir)
    except FedgovError as error:
        print(f"fedgov: error: {error}", file=sys.stderr)
        sys.exit(2)
    final = metrics["final"]
    print(
        f"[fedgov] done: eval_accuracy {final['eval_accuracy']:.4f}"
        + (
            f" · central_accuracy {final['central_eval_accuracy']:.4f}"
            if final["central_eval_accuracy"] is not None
            else ""
        )
        + f" · {metrics['wall_seconds']:.1f} s · outputs in {run_dir}",
        flush=True,
    )
    return final["eval_accuracy"]


if __name__ == "__main__":
    main()
