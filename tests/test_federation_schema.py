"""A federation on its own schema, run in process against the real ClientApp (tests/inprocess.py).

The sites hold CSVs of a dataset fedgov does not bundle (tests/own_data.py: 30 features, 2
classes). The coordinator builds the model from the federation's schema, leaves out a site whose
schema differs and a site whose data is invalid (each with its reason, no path or row sent),
evaluates centrally only on its own hold-out of that schema, and says when no site trained.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from flwr.supercore.task_identity import TaskIdentity
from inprocess import InProcessGrid
from own_data import CLASSES, FEATURES, SCHEMA_NAME, TARGET, blank_a_cell, write_sites
from safetensors.numpy import load_file

from clients.app import app as client_app
from fedgov.config import RunConfig, from_flower_config, to_flower_config
from fedgov.datasets import DatasetSchema, load_dataset, schema_digest, schema_to_json
from fedgov.errors import ConfigError, FedgovError
from fedgov_data.connector import load_schema_file
from fedgov_data.federation import federation_schema, simulated_federation
from privacy.report import summary_paragraph
from server.app import run_federation
from server.registry.publish import _default_model_name
from server.rounds import RoundRecord, RunResult, run_outcome

SITES = ["hosp-a", "hosp-b", "hosp-c", "hosp-d"]


@pytest.fixture(autouse=True)
def server_identity():
    """Messages the round loop creates are stamped as the ServerApp's (node 0)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


# ---- the schema and its digest ----------------------------------------------------------------


def test_schema_digest_follows_meaning_not_layout(tmp_path):
    files = write_sites(tmp_path, ["a"], rows_per_site=50)
    schema = load_schema_file(files["a"][1])
    assert schema.input_shape == (30,)  # derived: schema.yaml leaves input_shape out
    data = yaml.safe_load(files["a"][1].read_text())
    # Same meaning, other layout: keys reordered, defaults written out, JSON instead of YAML.
    spelled_out = {
        "classes": data["classes"],
        "target": data["target"],
        "name": data["name"],
        "input_shape": [30],
        "site_column": None,
        "features": [{**f, "log1p": False} for f in reversed(data["features"])][::-1],
    }
    (tmp_path / "same.json").write_text(json.dumps(spelled_out))
    assert schema_digest(load_schema_file(tmp_path / "same.json")) == schema_digest(schema)
    # The digest is SHA-256 of the canonical JSON of the schema's dict form.
    import hashlib

    canonical = json.dumps(schema.to_dict(), sort_keys=True, separators=(",", ":"))
    assert schema_digest(schema) == hashlib.sha256(canonical.encode()).hexdigest()
    # Any change to what the model sees changes it: a constant, the class order, a feature.
    changed_std = json.loads(json.dumps(data))
    changed_std["features"][3]["std"] *= 1.01
    swapped = {**data, "classes": list(reversed(data["classes"]))}
    fewer = {**data, "features": data["features"][:-1]}
    digests = {
        schema_digest(DatasetSchema.from_dict(d)) for d in (data, changed_std, swapped, fewer)
    }
    assert len(digests) == 4


def test_the_run_config_carries_the_schema_and_refuses_a_bad_one(tmp_path):
    files = write_sites(tmp_path, ["a"], rows_per_site=50)
    schema = load_schema_file(files["a"][1])
    cfg = RunConfig()
    cfg.dataset.schema = schema_to_json(schema)
    # Through Flower's flat run config and back: the same schema, not the bundled dataset's.
    assert federation_schema(from_flower_config(to_flower_config(cfg))) == schema
    assert federation_schema(RunConfig()) == load_dataset("randhie").schema
    broken = to_flower_config(cfg) | {"dataset.schema": '{"name": "x", "features": []}'}
    with pytest.raises(ConfigError, match=r"^dataset\.schema: schema: key 'target' is missing$"):
        from_flower_config(broken)
    with pytest.raises(ConfigError, match=r"^dataset\.schema: not valid JSON"):
        from_flower_config(to_flower_config(cfg) | {"dataset.schema": "name: x"})
    with pytest.raises(ConfigError, match=r"^dataset\.holdout: .* needs the federation's schema"):
        from_flower_config(to_flower_config(RunConfig()) | {"dataset.holdout": "h.csv"})


# ---- a run on the federation's own schema -----------------------------------------------------


def _federation(tmp_path, holdout_rows: int = 120):
    """Four sites: a and b valid, c with another schema (one std differs), d with a blank cell."""
    files = write_sites(tmp_path / "data", SITES, rows_per_site=150, holdout_rows=holdout_rows)
    other = yaml.safe_load(files["hosp-c"][1].read_text())
    other["features"][0]["std"] = other["features"][0]["std"] * 2
    files["hosp-c"][1].write_text(yaml.safe_dump(other))
    blank_a_cell(files["hosp-d"][0], FEATURES[7], row=5)
    configs = []
    for site in SITES:
        site_dir = tmp_path / "sites" / site
        site_dir.mkdir(parents=True)
        data, schema = files[site]
        configs.append(
            {
                "data-path": str(data),
                "schema-path": str(schema),
                "site-id": site,
                "site-dir": str(site_dir),
            }
        )
    schema = load_schema_file(files["hosp-a"][1])
    cfg = RunConfig(rounds=2, seed=3, output_dir=str(tmp_path / "run"), progress=False)
    cfg.dataset.schema = schema_to_json(schema)
    if holdout_rows:
        cfg.dataset.holdout = str(files["holdout"][0])
    cfg.federation.num_sites, cfg.federation.round_timeout = 2, 30.0
    cfg = from_flower_config(to_flower_config(cfg))
    grid = InProcessGrid(client_app, configs, to_flower_config(cfg))
    return cfg, grid, files, schema


def _numpy_accuracy(weights: dict[str, np.ndarray], csv, schema_yaml) -> float:
    """The MLP's accuracy on a CSV, computed here with pandas + numpy only."""
    spec = yaml.safe_load(schema_yaml.read_text())
    table = pd.read_csv(csv)
    x = np.stack(
        [(table[f["name"]].to_numpy(float) - f["mean"]) / f["std"] for f in spec["features"]], 1
    )
    for layer in (0, 2, 4):
        x = x @ weights[f"layers.{layer}.weight"].T.astype(float) + weights[f"layers.{layer}.bias"]
        x = np.maximum(x, 0) if layer < 4 else x
    labels = table[TARGET].map({c: i for i, c in enumerate(spec["classes"])}).to_numpy()
    return float((x.argmax(1) == labels).mean())


def test_a_run_on_the_sites_schema_leaves_out_the_other_schema_and_the_bad_data(tmp_path):
    cfg, grid, files, schema = _federation(tmp_path)
    run_federation(grid, cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["participants"] for r in metrics["rounds"]] == [["hosp-a", "hosp-b"]] * 2
    left_out = metrics["sites_left_out"]
    assert set(left_out) == {"hosp-c", "hosp-d"}
    assert left_out["hosp-d"] == "declined: data invalid"  # no path, column or row
    assert left_out["hosp-c"].startswith("its schema differs from the federation's (digest ")
    assert schema_digest(load_schema_file(files["hosp-c"][1]))[:12] in left_out["hosp-c"]
    assert metrics["schema"] == {
        "name": SCHEMA_NAME,
        "digest": schema_digest(schema),
        "target": TARGET,
        "classes": list(CLASSES),
        "features": list(FEATURES),
    }
    assert metrics["outcome"] == {"trained": True, "reason": ""}
    assert metrics["central_evaluation"] == f"coordinator hold-out {files['holdout'][0]} (120 rows)"
    # Central accuracy is the final model's on the coordinator's hold-out, recomputed here.
    weights = load_file(str(run / "model.safetensors"))
    assert weights["layers.0.weight"].shape == (64, 30)
    assert weights["layers.4.weight"].shape == (2, 32)
    expected = _numpy_accuracy(weights, *files["holdout"])
    assert metrics["final"]["central_eval_accuracy"] == pytest.approx(expected, abs=1e-9)
    # The site with the blank cell keeps the exact error for its operator.
    activity = json.loads((tmp_path / "sites" / "hosp-d" / "activity.json").read_text())
    assert activity["outcome"] == "declined"
    assert activity["reason"] == (
        f"data invalid: site data {files['hosp-d'][0]}: column '{FEATURES[7]}' has 1 missing "
        "value(s), first at row 5 (expected a value in every row)"
    )


def test_without_a_coordinator_hold_out_there_is_no_central_evaluation(tmp_path, capsys):
    cfg, grid, _, _ = _federation(tmp_path, holdout_rows=0)
    run_federation(grid, cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(r["central_eval_accuracy"] is None for r in metrics["rounds"])
    why = f"no coordinator hold-out of schema '{SCHEMA_NAME}' was given (fedgov run --holdout FILE)"
    assert metrics["central_evaluation"] == why
    assert f"[fedgov] central evaluation: none ({why})" in capsys.readouterr().err


def test_waiting_for_sites_says_who_is_there_and_fails_naming_those_left_out(tmp_path, capsys):
    cfg, grid, _, _ = _federation(tmp_path)
    cfg.federation.num_sites, cfg.federation.round_timeout, cfg.progress = 3, 1.0, True
    with pytest.raises(FedgovError) as raised:
        run_federation(grid, cfg)
    message = str(raised.value)
    assert message.startswith(
        "federation: only 2 of 3 sites connected within 1 s (federation.round_timeout); "
        "left out: hosp-c: its schema differs"
    )
    assert "hosp-d: declined: data invalid" in message and "\n" not in message
    err = capsys.readouterr().err
    # The seconds left depend on how long discovery took: 1 at most.
    assert re.search(
        r"^\[fedgov\] 2 of 3 sites connected: hosp-a, hosp-b \(2 left out\); waiting up to [01] s$",
        err,
        re.MULTILINE,
    ), err
    assert "[fedgov] site hosp-d left out: declined: data invalid" in err


# ---- outcomes said plainly --------------------------------------------------------------------


def test_a_run_where_no_site_trained_says_why():
    aborted = RunResult(
        arrays=None,  # type: ignore[arg-type]
        rounds=[
            RoundRecord(r, ["a"], aborted=True, abort_reason="too few survivors") for r in (1, 2)
        ],
        sites={},
    )
    assert run_outcome(aborted) == {
        "trained": False,
        "reason": "run failed: all 2 rounds aborted (too few survivors)",
    }
    declined = RunResult(
        arrays=None,  # type: ignore[arg-type]
        rounds=[
            RoundRecord(
                1,
                [],
                declined=["a"],
                decline_reasons={"a": "budget exhausted"},
                failures={"b": "no reply before the timeout"},
            )
        ],
        sites={},
        left_out={"c": "declined: data invalid"},
    )
    assert run_outcome(declined) == {
        "trained": False,
        "reason": "run failed: no site trained in 1 round(s) (a: budget exhausted; b: no reply "
        "before the timeout; c: declined: data invalid)",
    }
    trained = RunResult(None, [RoundRecord(1, []), RoundRecord(2, ["a"])], {})  # type: ignore[arg-type]
    assert run_outcome(trained) == {"trained": True, "reason": ""}


def test_the_privacy_report_of_a_run_where_no_site_trained_does_not_contradict_itself():
    document = {
        "delta": 1e-5,
        "sample_level": {"sites": {}},
        "verification": {"ok": True, "receipts_checked": 0, "receipts_verified": False},
        "secure_aggregation": True,
    }
    text = summary_paragraph(document)
    assert "No site trained in this run" in text
    assert "could NOT" not in text and "each of the 0 sites" not in text


def test_the_published_name_comes_from_the_schema():
    assert _default_model_name(SCHEMA_NAME, "mlp") == "tumour-markers-mlp"
    assert _default_model_name("randhie", "mlp") == "randhie-mlp"  # bundled: as before


# ---- fedgov run: the schema and hold-out are checked before anything runs ---------------------


def test_fedgov_run_checks_the_schema_and_hold_out_in_one_line(tmp_path, capsys):
    from fedgov_cli.main import main

    files = write_sites(tmp_path / "data", ["a"], rows_per_site=40, holdout_rows=30)
    (tmp_path / "server.yaml").write_text("federation: hospitals\nport: 9\n")
    config = str(tmp_path / "server.yaml")

    def run(*args: str) -> str:
        assert main(["run", "--config", config, *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert run("--holdout", str(files["holdout"][0])) == (
        "fedgov: error: run --holdout: needs --schema (the hold-out's schema)"
    )
    missing = tmp_path / "nope.yaml"
    assert run("--schema", str(missing)) == f"fedgov: error: schema file {missing}: file not found"
    semicolons = tmp_path / "holdout.csv"
    semicolons.write_text(files["holdout"][0].read_text().replace(",", ";"))
    assert run("--schema", str(files["a"][1]), "--holdout", str(semicolons)) == (
        f"fedgov: error: site data {semicolons}: has one column only: its values are separated "
        "by semicolons, not commas (expected a comma-separated CSV; save it again with ',' as the "
        "separator)"
    )
    assert run("--resume", str(tmp_path), "--schema", str(files["a"][1])).startswith(
        "fedgov: error: run --resume: takes no overrides, --out, --schema or --holdout"
    )
    # server.yaml's schema: and holdout: (paths beside it) stand in for the flags
    (tmp_path / "server.yaml").write_text("federation: hospitals\nport: 9\nschema: nope.yaml\n")
    assert run() == f"fedgov: error: schema file {missing}: file not found"
    (tmp_path / "server.yaml").write_text(
        f"federation: hospitals\nport: 9\nschema: {files['a'][1]}\nholdout: holdout.csv\n"
    )
    assert run().startswith(f"fedgov: error: site data {semicolons}: has one column only")
    # everything checks out, but no coordinator listens at 127.0.0.1:9: one line, no flwr run
    (tmp_path / "server.yaml").write_text(
        f"federation: hospitals\nport: 9\nschema: {files['a'][1]}\n"
    )
    assert run() == (
        "fedgov: error: the coordinator's SuperLink is not running at 127.0.0.1:9 (start it with "
        f"`fedgov server start --config {tmp_path / 'server.yaml'}`)"
    )


def test_a_deployment_on_a_bundled_dataset_takes_more_sites_than_its_natural_ones():
    """The coordinator needs only the bundled dataset's schema and hold-out, never its site
    split: 10 real sites on randhie (6 natural sites) are not refused."""
    from server.app import central_holdout

    cfg = RunConfig()
    cfg.federation.num_sites = 10
    schema = federation_schema(cfg)
    assert schema == load_dataset("randhie").schema
    rows, note = central_holdout(cfg, schema)
    assert rows is not None
    assert note == f"hold-out of bundled dataset 'randhie' ({len(rows.y)} rows)"
    cfg.federation.num_sites = 6  # the simulation's split keeps the same hold-out
    assert np.array_equal(rows.y, simulated_federation(cfg).holdout.y)
