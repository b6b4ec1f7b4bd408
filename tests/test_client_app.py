"""The ClientApp's handlers called directly with real records (no Flower runtime needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients import app as client_app
from clients.site_data import load_site_data
from clients.training import train_local
from fedgov.config import RunConfig, to_flower_config
from fedgov.datasets import load_dataset, load_table, schema_digest
from fedgov.errors import ConfigError
from fedgov.evaluation import evaluate
from fedgov.models import build_model, initial_model
from fedgov_data.federation import simulated_federation


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are stamped with the identity of the task running them (here: site node 7)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7


def _context(cfg: RunConfig, node_config: dict) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config=node_config,
        state=RecordDict(),
        run_config=to_flower_config(cfg),
    )


def _incoming(message_type: str, arrays: ArrayRecord | None, config: dict) -> Message:
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = arrays
    message = Message(content, dst_node_id=7, message_type=message_type)
    message.metadata.__dict__["_message_id"] = "m-1"  # what the grid stamps on push
    return message


def _cfg() -> RunConfig:
    cfg = RunConfig(rounds=1, seed=4)
    cfg.dataset.name, cfg.dataset.partitioner = "synthetic", "natural"
    cfg.federation.num_sites = 3
    return cfg


def test_train_handler_trains_the_sites_rows_and_reports_them():
    cfg = _cfg()
    fed = simulated_federation(cfg)
    schema = fed.pool.schema
    start = initial_model("mlp", schema.input_shape, len(schema.classes), 64, seed=4)
    msg = _incoming(MessageType.TRAIN, ArrayRecord(start.state_dict()), {"server-round": 1})
    reply = client_app.train(msg, _context(cfg, {"partition-id": 1, "num-partitions": 3}))

    site = load_site_data(cfg, {"partition-id": 1, "num-partitions": 3})
    assert site.site_id == fed.site_ids[1] == "site-01"
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == len(site.train.y)
    assert metrics["steps"] == -(-len(site.train.y) // cfg.train.batch_size)
    assert reply.content.config_records["site"]["site-id"] == "site-01"
    returned = reply.content.array_records["arrays"].to_torch_state_dict()
    assert list(returned) == list(start.state_dict())
    assert any(not torch.equal(returned[k], start.state_dict()[k]) for k in returned)


def test_evaluate_handler_matches_a_direct_evaluation():
    cfg = _cfg()
    schema = simulated_federation(cfg).pool.schema
    model = initial_model("mlp", schema.input_shape, len(schema.classes), 64, seed=1)
    msg = _incoming(MessageType.EVALUATE, ArrayRecord(model.state_dict()), {"server-round": 1})
    reply = client_app.evaluate_global(msg, _context(cfg, {"partition-id": 0}))
    expected = evaluate(model, load_site_data(cfg, {"partition-id": 0}).test)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["eval_accuracy"] == pytest.approx(expected.accuracy)
    assert metrics["eval_loss"] == pytest.approx(expected.loss)
    assert metrics["num-examples"] == expected.num_examples


def test_query_handler_says_who_the_site_is_without_data():
    cfg = _cfg()
    msg = _incoming(MessageType.QUERY, None, {})
    reply = client_app.query(msg, _context(cfg, {"partition-id": 2, "num-partitions": 3}))
    record = reply.content.config_records["site"]
    site = load_site_data(cfg, {"partition-id": 2})
    assert dict(record) == {
        "site-id": "site-02",
        "num-train": len(site.train.y),
        "num-test": len(site.test.y),
        "schema-digest": schema_digest(site.schema),
    }
    assert not reply.content.array_records


def test_fedprox_term_pulls_towards_the_start_weights():
    cfg = _cfg()
    rows = load_site_data(cfg, {"partition-id": 0}).train
    schema = rows.schema
    distances = []
    for mu in (0.0, 10.0):
        model = initial_model("mlp", schema.input_shape, len(schema.classes), 64, seed=0)
        start = [p.detach().clone() for p in model.parameters()]
        train_local(model, rows, cfg.train, seed=1, proximal_mu=mu)
        distances.append(
            sum(
                float((p.detach() - s).pow(2).sum())
                for p, s in zip(model.parameters(), start, strict=True)
            )
        )
    assert distances[1] < 0.5 * distances[0]


def test_a_site_with_its_own_csv_trains_on_exactly_its_rows(tmp_path):
    table = load_table("medpar").head(120)
    schema = load_dataset("medpar").schema
    data_path, schema_path = tmp_path / "site.csv", tmp_path / "schema.json"
    table.to_csv(data_path, index=False)
    schema_path.write_text(_json(schema.to_dict()))
    cfg = RunConfig()
    cfg.dataset.name = "medpar"
    node = {"data-path": str(data_path), "schema-path": str(schema_path), "site-id": "hosp-a"}
    site = load_site_data(cfg, node)
    assert site.site_id == "hosp-a"
    assert len(site.train.y) + len(site.test.y) == 120
    assert site.schema == schema


def test_invalid_site_data_declines_and_keeps_the_error_at_the_site(tmp_path):
    table = load_table("medpar").head(50).drop(columns=["los"])
    schema = load_dataset("medpar").schema
    data_path, schema_path = tmp_path / "bad.csv", tmp_path / "schema.json"
    table.to_csv(data_path, index=False)
    schema_path.write_text(_json(schema.to_dict()))
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    cfg = RunConfig()
    cfg.dataset.name = "medpar"
    model = build_model("mlp", schema.input_shape, len(schema.classes))
    node = {
        "data-path": str(data_path),
        "schema-path": str(schema_path),
        "site-id": "hosp-a",
        "site-dir": str(site_dir),
    }
    for handler, message_type, arrays in (
        (client_app.query, MessageType.QUERY, None),
        (client_app.train, MessageType.TRAIN, ArrayRecord(model.state_dict())),
    ):
        reply = handler(_incoming(message_type, arrays, {"server-round": 1}), _context(cfg, node))
        # The coordinator learns only that the data is invalid: no path, column or row.
        assert not reply.has_error()
        assert dict(reply.content.config_records["decline"]) == {"reason": "data invalid"}
        assert dict(reply.content.config_records["site"]) == {"site-id": "hosp-a"}
        assert not reply.content.array_records
        # The site's own activity.json keeps the exact error for `fedgov site status`.
        activity = json.loads((site_dir / "activity.json").read_text())
        assert activity["outcome"] == "declined"
        assert activity["reason"].startswith(f"data invalid: site data {data_path}: column 'los'")


def test_a_node_without_data_settings_is_told_what_is_expected():
    with pytest.raises(ConfigError, match="partition-id"):
        load_site_data(_cfg(), {"something": 1})
    with pytest.raises(ConfigError, match=r"federation\.num_sites"):
        load_site_data(_cfg(), {"partition-id": 0, "num-partitions": 5})


def _json(data: dict) -> str:
    import json

    return json.dumps(data)


def test_train_is_deterministic_for_a_seed():
    cfg = _cfg()
    rows = load_site_data(cfg, {"partition-id": 0}).train
    schema = rows.schema
    states = []
    for _ in range(2):
        model = initial_model("mlp", schema.input_shape, len(schema.classes), 64, seed=0)
        train_local(model, rows, cfg.train, seed=123)
        states.append(np.concatenate([p.detach().numpy().ravel() for p in model.parameters()]))
    assert np.array_equal(states[0], states[1])


def test_a_declining_site_replies_with_its_reason_and_no_weights(monkeypatch):
    from clients import update
    from fedgov import messages

    def refuse(*args, **kwargs):
        raise update.SiteDeclined("budget exhausted", epsilon_spent=7.5, cap=8.0)

    monkeypatch.setattr(client_app, "compute_update", refuse)
    cfg = _cfg()
    schema = simulated_federation(cfg).pool.schema
    model = build_model("mlp", schema.input_shape, len(schema.classes))
    msg = _incoming(MessageType.TRAIN, ArrayRecord(model.state_dict()), {"server-round": 3})
    reply = client_app.train(msg, _context(cfg, {"partition-id": 0}))
    assert messages.decline_reason(reply) == "budget exhausted"
    assert reply.content.config_records["decline"]["cap"] == 8.0
    assert not reply.content.array_records
