"""A plain Flower 1.42 FedAvg app: the baseline that ``benchmarks.simulation_scale`` measures.

Written the straightforward way with the Message API: a ``ServerApp`` whose ``main`` calls
``FedAvg(...).start(...)`` and a ``ClientApp`` with ``@app.train()`` / ``@app.evaluate()``. It does
the same work as a fedgov run: every site (fraction 1.0) trains one SGD epoch and evaluates on its
local test split every round, on the same rows (``simulated_federation(cfg).site_rows(i)`` and
``split_train_test``), with the same model, initial weights, hyper-parameters and shuffling seeds,
and the server evaluates the global model on the same central held-out set each round.

Flower's ``run_simulation`` takes app objects and no run config, so the settings travel in the
environment variable ``PLAIN_APP_ENV`` (a JSON object); Ray's workers inherit it from the driver.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

from clients.training import site_round_seed
from fedgov.config import RunConfig
from fedgov.datasets import Dataset, split_train_test
from fedgov.models import build_model, initial_model
from fedgov_data.federation import simulated_federation

PLAIN_APP_ENV = "FEDGOV_BENCH_PLAIN_APP"


@dataclass(frozen=True)
class PlainSettings:
    """What the benchmark asks of the plain app (mirrors the fedgov RunConfig it compares with)."""

    sites: int
    rounds: int
    seed: int
    hidden: int
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    test_fraction: float
    result_path: str  # where the ServerApp writes its final metrics (JSON)

    def run_config(self) -> RunConfig:
        """The fedgov RunConfig whose data this app uses (same dataset and split)."""
        cfg = RunConfig(seed=self.seed)
        cfg.dataset.name, cfg.dataset.partitioner = "synthetic", "natural"
        cfg.dataset.test_fraction = self.test_fraction
        cfg.federation.num_sites = self.sites
        return cfg


def encode_settings(settings: PlainSettings) -> str:
    """The value of ``PLAIN_APP_ENV`` for ``settings``."""
    return json.dumps(settings.__dict__)


@functools.cache
def settings() -> PlainSettings:
    """This process's settings, from the environment."""
    return PlainSettings(**json.loads(os.environ[PLAIN_APP_ENV]))


@functools.cache
def _site(partition_id: int) -> tuple[str, Dataset, Dataset]:
    """(site id, train rows, test rows) of one simulated site, loaded once per process."""
    s = settings()
    federation = simulated_federation(s.run_config())
    rows = federation.site_rows(partition_id)
    train_rows, test_rows = split_train_test(rows, s.test_fraction, s.seed)
    return federation.site_ids[partition_id], train_rows, test_rows


def _new_model(initial: bool = False) -> nn.Module:
    """fedgov's MLP for the synthetic data (with fedgov's seeded initial weights if ``initial``)."""
    s = settings()
    schema = simulated_federation(s.run_config()).pool.schema
    if initial:
        return initial_model("mlp", schema.input_shape, len(schema.classes), s.hidden, s.seed)
    return build_model("mlp", schema.input_shape, len(schema.classes), s.hidden)


def _model(arrays: ArrayRecord) -> nn.Module:
    model = _new_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def _train(model: nn.Module, rows: Dataset, seed: int) -> tuple[float, int]:
    """Standard PyTorch SGD loop; returns (mean batch loss, steps)."""
    s = settings()
    x, y = torch.from_numpy(rows.x), torch.from_numpy(rows.y)
    n = len(y)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum)
    criterion = nn.CrossEntropyLoss()
    model.train()
    total, steps = 0.0, 0
    for _ in range(s.local_epochs):
        order = torch.from_numpy(rng.permutation(n))
        for begin in range(0, n, s.batch_size):
            batch = order[begin : begin + s.batch_size]
            optimizer.zero_grad()
            loss = criterion(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
    return total / max(steps, 1), steps


@torch.no_grad()
def _evaluate(model: nn.Module, rows: Dataset) -> tuple[float, float]:
    """(mean cross-entropy, accuracy)."""
    model.eval()
    x, y = torch.from_numpy(rows.x), torch.from_numpy(rows.y)
    logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    return loss, float((logits.argmax(dim=1) == y).float().mean())


# ---- ClientApp ----------------------------------------------------------------------------------

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    site_id, train_rows, _ = _site(int(context.node_config["partition-id"]))
    model = _model(msg.content["arrays"])
    server_round = int(msg.content["config"]["server-round"])
    loss, steps = _train(model, train_rows, site_round_seed(settings().seed, server_round, site_id))
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(train_rows.y), "steps": steps})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    _, _, test_rows = _site(int(context.node_config["partition-id"]))
    loss, accuracy = _evaluate(_model(msg.content["arrays"]), test_rows)
    metrics = MetricRecord(
        {"eval_loss": loss, "eval_accuracy": accuracy, "num-examples": len(test_rows.y)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


# ---- ServerApp ----------------------------------------------------------------------------------

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    s = settings()
    holdout = simulated_federation(s.run_config()).holdout
    central_model = _new_model()
    stamps: list[float] = []  # when each round's central evaluation ran (round 0 = the start)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        stamps.append(time.perf_counter())
        central_model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = _evaluate(central_model, holdout)
        return MetricRecord({"central_eval_loss": loss, "central_eval_accuracy": accuracy})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=s.sites,
        min_evaluate_nodes=s.sites,
        min_available_nodes=s.sites,
    )
    model = _new_model(initial=True)  # the same initial weights as fedgov's
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=s.rounds,
        train_config=ConfigRecord({"lr": s.lr}),
        evaluate_fn=central_evaluate,
    )
    last_client = result.evaluate_metrics_clientapp.get(s.rounds, {})
    last_server = result.evaluate_metrics_serverapp.get(s.rounds, {})
    final = {
        "eval_accuracy": last_client.get("eval_accuracy"),
        "central_eval_accuracy": last_server.get("central_eval_accuracy"),
        "rounds_done": len(result.evaluate_metrics_clientapp),
        "round_seconds": [b - a for a, b in itertools.pairwise(stamps)],
    }
    with open(s.result_path, "w") as handle:
        json.dump(final, handle)
