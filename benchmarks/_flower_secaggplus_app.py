"""Flower 1.42's own SecAgg+, the baseline ``benchmarks.secagg`` measures fedgov's against.

Flower's SecAgg+ runs only on the legacy path, so this app is written that way: a ``ServerApp``
whose ``main`` wraps a legacy ``FedAvg`` in a ``LegacyContext`` and runs ``DefaultWorkflow`` with
``SecAggPlusWorkflow`` as its fit workflow, and a ``ClientApp(client_fn=...)`` of ``NumPyClient``s
with ``secaggplus_mod``. Without ``FEDGOV_BENCH_FLOWER_SECAGG`` it is the same app with Flower's
default fit workflow (its plain round). It does the same work as the fedgov runs it is compared
with: the sites, rows, model, initial weights, local training and evaluation of
``benchmarks._plain_flower_app`` (whose settings, in ``FEDGOV_BENCH_PLAIN_APP``, it reads), every
site training and evaluating every round, and a central evaluation per round.
"""

from __future__ import annotations

import itertools
import json
import os
import time

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

from benchmarks._plain_flower_app import _evaluate, _new_model, _site, _train, settings
from clients.training import site_round_seed
from fedgov_data.federation import simulated_federation

SECAGG_ENV = "FEDGOV_BENCH_FLOWER_SECAGG"  # JSON {"num_shares": n, "threshold": t}, or unset


def _secagg() -> dict | None:
    raw = os.environ.get(SECAGG_ENV)
    return json.loads(raw) if raw else None


def _load(model: torch.nn.Module, parameters: list[np.ndarray]) -> torch.nn.Module:
    names = list(model.state_dict())
    state = {n: torch.from_numpy(np.asarray(p)) for n, p in zip(names, parameters, strict=True)}
    model.load_state_dict(state)
    return model


class SiteClient(NumPyClient):
    """One simulated site: fedgov's rows for its partition, the same training and evaluation."""

    def __init__(self, partition_id: int) -> None:
        self.site_id, self.train_rows, self.test_rows = _site(partition_id)

    def fit(self, parameters, config):
        torch.set_num_threads(1)
        model = _load(_new_model(), parameters)
        server_round = int(config.get("server-round", 0))
        seed = site_round_seed(settings().seed, server_round, self.site_id)
        loss, steps = _train(model, self.train_rows, seed)
        weights = [v.detach().numpy().copy() for v in model.state_dict().values()]
        return weights, len(self.train_rows.y), {"train_loss": loss, "steps": steps}

    def evaluate(self, parameters, config):
        torch.set_num_threads(1)
        loss, accuracy = _evaluate(_load(_new_model(), parameters), self.test_rows)
        return loss, len(self.test_rows.y), {"eval_accuracy": accuracy}


def client_fn(context: Context):
    return SiteClient(int(context.node_config["partition-id"])).to_client()


client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if _secagg() else [])
server_app = ServerApp()


@server_app.main()
def main(grid, context: Context) -> None:
    torch.set_num_threads(1)
    s = settings()
    holdout = simulated_federation(s.run_config()).holdout
    central_model = _new_model()
    stamps: list[float] = []  # each central evaluation: round 0 (the start), then every round
    accuracy: list[float] = []

    def central(server_round, parameters, config):
        stamps.append(time.perf_counter())
        loss, acc = _evaluate(_load(central_model, parameters), holdout)
        accuracy.append(acc)
        return loss, {"central_eval_accuracy": acc}

    initial = [v.numpy() for v in _new_model(initial=True).state_dict().values()]
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=s.sites,
        min_evaluate_clients=s.sites,
        min_available_clients=s.sites,
        initial_parameters=ndarrays_to_parameters(initial),
        evaluate_fn=central,
        on_fit_config_fn=lambda server_round: {"server-round": server_round},
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=s.rounds), strategy=strategy
    )
    secagg = _secagg()
    fit_workflow = (
        SecAggPlusWorkflow(
            num_shares=secagg["num_shares"], reconstruction_threshold=secagg["threshold"]
        )
        if secagg
        else None
    )
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    final = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    result = {
        "round_seconds": [b - a for a, b in itertools.pairwise(stamps)],
        "central_eval_accuracy": accuracy[-1] if accuracy else None,
        "rounds_done": len(stamps) - 1,
        # "Secure aggregation halted" keeps the old weights without a word: check they moved
        "moved": any(not np.array_equal(a, b) for a, b in zip(initial, final, strict=True)),
    }
    with open(s.result_path, "w") as handle:
        json.dump(result, handle)
