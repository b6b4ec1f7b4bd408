"""The registry on disk (SQLite): publish, verify, approve, promote, roll back, audit, export.

Commands run through ``fedgov_cli.main.main`` in this process (the real parser and handlers); one
test runs the console entry point as a subprocess to check that errors stay one line.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from registry_support import (
    TOY_SCHEMA,
    concurrent_publish,
    make_governance,
    privacy_report,
    publish_toy,
    toy_weights,
)

from fedgov_cli.main import main
from server.registry.governance import verify_audit
from server.registry.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def world(tmp_path):
    """A registry with a policy, keys for every principal and one published candidate."""
    governance = make_governance(tmp_path)
    registry = Registry(tmp_path / "registry", create=True)
    record = publish_toy(registry, governance.keys["server"], report=privacy_report(3.0))
    yield registry, governance, record
    registry.close()


def run_cli(capsys, registry: Registry, *args: str) -> tuple[int, str, str]:
    """``fedgov ARGS --registry DIR``; returns (exit code, stdout, stderr)."""
    command, *rest = args
    if command == "serve":
        argv = [*args, "--registry", str(registry.path)]
    else:
        argv = ["registry", command, *rest, "--registry", str(registry.path)]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _approve(capsys, registry, governance, *names, ref="toy-mlp:1"):
    for name in names:
        code, _, err = run_cli(
            capsys, registry, "approve", ref, "--key", str(governance.key_paths[name])
        )
        assert code == 0, err


def _promote(capsys, registry, governance, ref="toy-mlp:1", who="dana", alias="production"):
    return run_cli(
        capsys, registry, "promote", ref, "--alias", alias, "--key", str(governance.key_paths[who])
    )


# ---- publishing ---------------------------------------------------------------------------------


def test_a_published_version_is_signed_complete_and_verifies(world, capsys):
    registry, _, record = world
    manifest = record.manifest
    assert (manifest["name"], manifest["version"]) == ("toy-mlp", 1)
    assert set(manifest["artifacts"]) == {"weights", "onnx", "model_card"}
    assert manifest["artifacts"]["weights"]["sha256"] == _sha256(toy_weights(0))
    assert manifest["input_schema"]["features"][2] == TOY_SCHEMA.features[2].to_dict()
    assert manifest["input_schema"]["classes"] == ["no", "yes"]
    assert manifest["lineage"]["sites_per_round"] == [3, 3, 3]
    assert manifest["privacy_report"]["site_level"]["epsilon"] == 3.0
    assert manifest["model"]["onnx_max_abs_diff"] < 1e-5
    card = registry.artifacts.read_verified(manifest["artifacts"]["model_card"]["sha256"]).decode()
    assert card.startswith("# Model card: toy-mlp version 1") and "ε = 3" in card

    code, out, _ = run_cli(capsys, registry, "verify", "toy-mlp:1")
    assert code == 0
    assert "ok   signature" in out and "ok   publisher: signed by server" in out
    assert out.strip().endswith("toy-mlp:1 verified")


def test_one_changed_byte_in_the_weights_fails_verify(world, capsys):
    registry, _, record = world
    weights = registry.artifacts.path_of(record.manifest["artifacts"]["weights"]["sha256"])
    _flip_one_byte(weights)
    code, out, err = run_cli(capsys, registry, "verify", "toy-mlp:1")
    assert code == 2
    assert "FAIL artifact weights: sha256 mismatch" in out
    assert err.strip().startswith("fedgov: error: verify toy-mlp:1 failed: artifact weights")
    # ... and nothing that needs a verified version proceeds: no approval, no export.
    code, _, err = run_cli(
        capsys,
        registry,
        "export",
        "toy-mlp:1",
        "--format",
        "safetensors",
        "--out",
        str(registry.path / "w.safetensors"),
    )
    assert code == 2 and "export refused" in err
    assert not (registry.path / "w.safetensors").exists()


def test_an_edited_manifest_in_the_database_fails_verify(world, capsys):
    registry, _, _ = world
    with sqlite3.connect(registry.path / "registry.db") as db:
        text = db.execute("SELECT manifest FROM model_versions").fetchone()[0]
        edited = text.replace('"central_eval_accuracy":0.8', '"central_eval_accuracy":0.99')
        assert edited != text
        db.execute("UPDATE model_versions SET manifest = ?", (edited,))
    code, out, _ = run_cli(capsys, registry, "verify", "toy-mlp:1")
    assert code == 2 and "FAIL manifest" in out


def test_a_governed_registry_refuses_a_publish_by_a_key_its_policy_does_not_list(world):
    registry, governance, _ = world
    from server.registry.errors import RegistryError

    with pytest.raises(
        RegistryError, match=r"publish refused: key .* is not a publisher in policy"
    ):
        publish_toy(registry, governance.keys["mallory"], seed=5)
    with registry.store.read() as session:
        assert len(registry.store.versions(session)) == 1


def test_versions_are_immutable_and_numbered_in_order(world):
    registry, governance, first = world
    second = publish_toy(registry, governance.keys["server"], seed=1)
    assert second.version == 2
    assert second.manifest_sha256 != first.manifest_sha256
    with registry.store.read() as session:
        again = registry.store.resolve(session, _ref("toy-mlp:1"))
    assert again.manifest_sha256 == first.manifest_sha256
    assert again.manifest == first.manifest


# ---- approvals ----------------------------------------------------------------------------------


def test_an_approval_signed_by_a_key_outside_the_policy_is_rejected(world, capsys):
    registry, governance, _ = world
    code, _, err = run_cli(
        capsys, registry, "approve", "toy-mlp:1", "--key", str(governance.key_paths["mallory"])
    )
    assert code == 2
    assert "is not in the policy" in err and err.count("\n") == 1
    with registry.store.read() as session:
        assert registry.store.decisions(session) == []


def test_a_forged_approval_row_does_not_count(world, capsys):
    """An approval inserted straight into the database, signed by a key outside the policy."""
    registry, governance, record = world
    from server.registry.manifest import decision_message

    mallory = governance.keys["mallory"]
    for principal, key in (("bob", mallory), ("alice", mallory)):
        signature = key.sign(decision_message("approve", "toy-mlp", 1, record.manifest_sha256))
        with registry.store.write() as tx:
            tx.add_decision(
                name="toy-mlp",
                version=1,
                decision="approve",
                principal=principal,
                public_key=key.public_key,
                manifest_sha256=record.manifest_sha256,
                signature=signature,
                comment="",
                audit_seq=0,
            )
    code, _, err = _promote(capsys, registry, governance)
    assert code == 2 and "the audit log does not verify: approve #1 of toy-mlp:1 has no" in err
    code, out, _ = run_cli(capsys, registry, "show", "toy-mlp:1")
    assert out.count("ignored: decision") == 2 and "no valid audit entry" in out
    assert "FAIL quorum: 0 of 2" in out


def test_a_decision_for_another_manifest_digest_does_not_count(world, capsys):
    registry, governance, _ = world
    from server.registry.manifest import decision_message

    bob = governance.keys["bob"]
    signature = bob.sign(decision_message("approve", "toy-mlp", 1, "0" * 64))
    with registry.store.write() as tx:
        tx.add_decision(
            name="toy-mlp",
            version=1,
            decision="approve",
            principal="bob",
            public_key=bob.public_key,
            manifest_sha256="0" * 64,
            signature=signature,
            comment="",
            audit_seq=0,
        )
    _approve(capsys, registry, governance, "alice")
    code, _, err = _promote(capsys, registry, governance)
    assert code == 2 and "approve #1 of toy-mlp:1 has no matching 'approve' audit entry" in err
    code, out, _ = run_cli(capsys, registry, "show", "toy-mlp:1")
    assert "FAIL quorum: 1 of 2 required approvals (alice)" in out


# ---- promotion ----------------------------------------------------------------------------------


def test_promotion_without_quorum_is_refused_naming_the_gate(world, capsys):
    registry, governance, _ = world
    _approve(capsys, registry, governance, "bob")
    code, _, err = _promote(capsys, registry, governance)
    assert code == 2
    assert err.strip() == (
        "fedgov: error: promote toy-mlp:1 to 'production' refused: "
        "gate quorum: 1 of 2 required approvals (bob)"
    )
    _approve(capsys, registry, governance, "alice")
    code, out, err = _promote(capsys, registry, governance)
    assert code == 0, err
    assert out.startswith("toy-mlp@production → toy-mlp:1 by dana (was unset)")


def test_promotion_above_the_epsilon_gate_is_refused_naming_the_gate(world, capsys):
    registry, governance, _ = world
    publish_toy(registry, governance.keys["server"], seed=1, report=privacy_report(9.5))
    _approve(capsys, registry, governance, "alice", "bob", ref="toy-mlp:2")
    code, _, err = _promote(capsys, registry, governance, ref="toy-mlp:2")
    assert code == 2
    assert "refused: gate max_epsilon: ε = 9.5 > 8" in err


def test_promotion_without_a_privacy_report_is_refused_by_the_epsilon_gate(world, capsys):
    registry, governance, _ = world
    publish_toy(registry, governance.keys["server"], seed=1, report=None)
    _approve(capsys, registry, governance, "alice", "bob", ref="toy-mlp:2")
    code, _, err = _promote(capsys, registry, governance, ref="toy-mlp:2")
    assert code == 2
    assert "gate max_epsilon: no privacy report in the manifest" in err


def test_every_unmet_gate_is_named(world, capsys):
    registry, governance, _ = world
    governance.write_policy(
        {
            "quorum": 2,
            "required_roles": ["privacy-officer"],
            "promoter_roles": ["release-manager"],
            "gates": {
                "min_metrics": {"central_eval_accuracy": 0.95},
                "require_secure_aggregation": True,
            },
        }
    )
    publish_toy(registry, governance.keys["server"], seed=1, secure_aggregation=False)
    _approve(capsys, registry, governance, "alice")
    run_cli(capsys, registry, "reject", "toy-mlp:2", "--key", str(governance.key_paths["carol"]))
    code, _, err = _promote(capsys, registry, governance, ref="toy-mlp:2", who="alice")
    assert code == 2
    for gate in (
        "quorum",
        "required_roles",
        "rejections: rejected by carol",
        "promoter_roles",
        "min_metrics.central_eval_accuracy",
        "require_secure_aggregation",
    ):
        assert f"gate {gate}" in err
    assert err.count("\n") == 1


def test_a_later_approval_replaces_a_rejection(world, capsys):
    registry, governance, _ = world
    run_cli(capsys, registry, "reject", "toy-mlp:1", "--key", str(governance.key_paths["bob"]))
    _approve(capsys, registry, governance, "alice")
    code, _, err = _promote(capsys, registry, governance)
    assert code == 2 and "rejected by bob" in err
    _approve(capsys, registry, governance, "bob")
    code, _, err = _promote(capsys, registry, governance)
    assert code == 0, err


def test_rollback_moves_the_alias_back_and_is_audited(world, capsys):
    registry, governance, _ = world
    publish_toy(registry, governance.keys["server"], seed=1, report=privacy_report(2.0))
    for ref in ("toy-mlp:1", "toy-mlp:2"):
        _approve(capsys, registry, governance, "alice", "bob", ref=ref)
        assert _promote(capsys, registry, governance, ref=ref)[0] == 0
    code, out, _ = _promote(capsys, registry, governance, ref="toy-mlp:1")
    assert code == 0 and "(rolled back from version 2)" in out
    with registry.store.read() as session:
        assert registry.store.resolve(session, _ref("toy-mlp@production")).version == 1
    code, out, _ = run_cli(capsys, registry, "audit", "--verify", "--json")
    entries = json.loads(out)["entries"]
    promotions = [e["details"] for e in entries if e["action"] == "promote"]
    assert [(p["version"], p["previous_version"], p["rollback"]) for p in promotions] == [
        (1, None, False),
        (2, 1, False),
        (1, 2, True),
    ]


def test_an_alias_the_policy_does_not_govern_is_refused(world, capsys):
    registry, governance, _ = world
    code, _, err = _promote(capsys, registry, governance, alias="canary")
    assert code == 2
    assert "alias 'canary' is not governed by" in err


# ---- audit --------------------------------------------------------------------------------------


def _governed(capsys, registry, governance):
    _approve(capsys, registry, governance, "alice", "bob")
    assert _promote(capsys, registry, governance)[0] == 0
    code, out, _ = run_cli(capsys, registry, "audit", "--verify")
    assert code == 0 and "audit chain intact: 5 entries" in out


def test_a_deleted_audit_entry_is_detected(world, capsys):
    registry, governance, _ = world
    _governed(capsys, registry, governance)
    with sqlite3.connect(registry.path / "registry.db") as db:
        db.execute("DELETE FROM audit_log WHERE seq = 2")
    code, out, err = run_cli(capsys, registry, "audit", "--verify")
    assert code == 2
    assert "FAIL audit entry 3: follows entry 1; entry 2 missing (deleted)" in out
    assert err.startswith("fedgov: error: audit log verification failed: audit entry 3")


def test_a_deleted_last_audit_entry_is_detected(world, capsys):
    registry, governance, _ = world
    _governed(capsys, registry, governance)
    with sqlite3.connect(registry.path / "registry.db") as db:
        db.execute("DELETE FROM audit_log WHERE seq = 5")
    code, out, _ = run_cli(capsys, registry, "audit", "--verify")
    assert code == 2
    assert "entries deleted from the end" in out
    assert "alias toy-mlp@production → 1 has no matching 'promote' audit entry" in out


def test_an_edited_or_reordered_audit_entry_is_detected(world, capsys):
    registry, governance, _ = world
    _governed(capsys, registry, governance)
    db_path = registry.path / "registry.db"
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE audit_log SET actor = 'carol' WHERE seq = 4")
    code, out, _ = run_cli(capsys, registry, "audit", "--verify")
    assert code == 2 and "audit entry 4 (approve toy-mlp:1): content does not match" in out
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE audit_log SET actor = 'bob' WHERE seq = 4")
    assert run_cli(capsys, registry, "audit", "--verify")[0] == 0
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE audit_log SET seq = 99 WHERE seq = 2")
        db.execute("UPDATE audit_log SET seq = 2 WHERE seq = 3")
        db.execute("UPDATE audit_log SET seq = 3 WHERE seq = 99")
    code, out, _ = run_cli(capsys, registry, "audit", "--verify")
    assert code == 2 and "its link does not match the previous entry's hash" in out


def test_an_alias_moved_in_the_database_without_the_audit_log_is_detected(world, capsys):
    registry, governance, _ = world
    _governed(capsys, registry, governance)
    publish_toy(registry, governance.keys["server"], seed=1)
    with sqlite3.connect(registry.path / "registry.db") as db:
        db.execute("UPDATE aliases SET version = 2 WHERE alias = 'production'")
    report = verify_audit(registry)
    assert report.problems == [
        "alias toy-mlp@production → 2 has no matching 'promote' audit entry (entry 5)"
    ]


# ---- list, show, export, keygen -----------------------------------------------------------------


def test_list_and_show_as_json(world, capsys):
    registry, governance, record = world
    _governed(capsys, registry, governance)
    code, out, _ = run_cli(capsys, registry, "list", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 1
    assert rows[0] | {"created_at": None} == rows[0] | {
        "name": "toy-mlp",
        "version": 1,
        "aliases": ["production"],
        "approvals": ["alice", "bob"],
        "rejections": [],
        "epsilon": 3.0,
        "central_eval_accuracy": 0.8,
        "created_at": None,
    }
    code, out, _ = run_cli(capsys, registry, "show", "toy-mlp@production", "--json")
    shown = json.loads(out)
    assert shown["manifest_sha256"] == record.manifest_sha256
    assert shown["manifest"] == record.manifest
    assert shown["gates"]["production"]["passed"] is True
    assert [d["principal"] for d in shown["decisions"]] == ["alice", "bob"]
    code, out, _ = run_cli(capsys, registry, "list")
    assert "toy-mlp:1" in out and "@production" in out and "alice, bob" in out


def test_export_writes_verified_onnx_that_predicts_like_torch(world, capsys, tmp_path):
    import onnx
    import onnxruntime
    from safetensors.torch import load_file

    from fedgov.models import build_model

    registry, _, record = world
    out_onnx, out_weights = tmp_path / "m.onnx", tmp_path / "m.safetensors"
    assert (
        run_cli(
            capsys, registry, "export", "toy-mlp:1", "--format", "onnx", "--out", str(out_onnx)
        )[0]
        == 0
    )
    assert (
        run_cli(
            capsys,
            registry,
            "export",
            "toy-mlp:1",
            "--format",
            "safetensors",
            "--out",
            str(out_weights),
        )[0]
        == 0
    )
    assert _sha256(out_onnx.read_bytes()) == record.manifest["artifacts"]["onnx"]["sha256"]
    onnx.checker.check_model(onnx.load(str(out_onnx)))

    model = build_model("mlp", (3,), 2, 8)
    model.load_state_dict(load_file(str(out_weights)))
    x = np.random.default_rng(1).normal(size=(64, 3)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(out_onnx), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"input": x})[0]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-5)
    assert (onnx_logits.argmax(1) == torch_logits.argmax(1)).all()


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path, capsys):
    path = tmp_path / "k" / "erin.key"
    assert main(["registry", "keygen", str(path)]) == 0
    out = capsys.readouterr().out
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    public = (tmp_path / "k" / "erin.key.pub").read_text().strip()
    assert f"public_key: {public}" in out
    assert main(["registry", "keygen", str(path)]) == 2  # never overwrites a key
    assert "already exists" in capsys.readouterr().err


# ---- concurrency --------------------------------------------------------------------------------


def test_concurrent_publishers_get_distinct_versions_and_nothing_is_corrupted(tmp_path, capsys):
    governance = make_governance(tmp_path)
    path = tmp_path / "registry"
    Registry(path, create=True).close()
    published = concurrent_publish(path, "", governance.key_paths["server"], processes=3, each=3)
    assert sorted(published) == list(range(1, 10))
    registry = Registry(path)
    for version in published:
        code, out, _ = run_cli(capsys, registry, "verify", f"toy-mlp:{version}")
        assert code == 0, out
    report = verify_audit(registry)
    assert report.ok, report.problems
    assert [e.action for e in report.entries] == ["policy"] + ["publish"] * 9
    with registry.store.read() as session:
        stored = {v.version: v.manifest_sha256 for v in registry.store.versions(session)}
    assert stored == published


# ---- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["registry", "--help"],
        *[
            ["registry", a, "--help"]
            for a in (
                "list",
                "show",
                "verify",
                "approve",
                "reject",
                "promote",
                "audit",
                "export",
                "keygen",
                "checkpoint",
                "init",
                "policy",
            )
        ],
        *[
            ["registry", "policy", a, "--help"]
            for a in ("propose", "sign", "apply", "show", "history")
        ],
        ["serve", "--help"],
    ],
)
def test_every_registry_command_has_help(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    assert "usage: fedgov" in capsys.readouterr().out


def test_mistakes_are_one_line_without_a_traceback(tmp_path):
    def fedgov(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fedgov", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "FEDGOV_REGISTRY": str(tmp_path / "none")},
        )

    for args, expected in [
        (["registry", "list"], "fedgov: error: --registry: no registry at"),
        (["registry", "show", "m-1"], "fedgov: error: model reference 'm-1': expected"),
        (["registry", "show", "m:1"], "fedgov: error: --registry: no registry at"),
        (["serve", "m:1"], "fedgov: error: model reference 'm:1': expected NAME@ALIAS"),
        (["serve", "m@production", "--port", "70000"], "argument --port: expected a port number"),
        (["registry", "approve", "m:1", "--key", str(tmp_path / "k")], "--key: "),
        (["registry", "show", "randhie-mlp:99999999999999999999999"], "a number from 1 to"),
        (["registry", "show", "randhie-mlp:²"], "the version must be ASCII digits"),
        (["registry", "show", "evil\n:1"], "model reference 'evil\\n:1': 'evil\\n' must be"),
    ]:
        result = fedgov(*args)
        assert result.returncode == 2, result
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert expected in lines[-1], result.stderr


# ---- helpers ------------------------------------------------------------------------------------


def _ref(text: str):
    from server.registry.manifest import parse_ref

    return parse_ref(text)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _flip_one_byte(path: Path, offset: int = 100) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---- an image model -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_an_image_model_publishes_exports_and_serves_pixel_instances(tmp_path):
    from fastapi.testclient import TestClient
    from safetensors.torch import save

    from fedgov.datasets import DIGITS_MEAN, DIGITS_STD, load_dataset
    from fedgov.models import build_model
    from server.registry.governance import decide, promote
    from server.registry.publish import ModelSpec, publish_model
    from server.serving.app import create_app
    from server.serving.verify import load_for_serving

    governance = make_governance(tmp_path)
    governance.write_policy({"quorum": 1})
    registry = Registry(tmp_path / "registry", create=True)
    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("cnn", digits.schema.input_shape, 10, 16).eval()
    record = publish_model(
        registry,
        name="digits-cnn",
        weights=save({k: v.contiguous() for k, v in model.state_dict().items()}),
        spec=ModelSpec("cnn", 16),
        schema=digits.schema,
        run_config={},
        lineage={
            "run_id": "r",
            "strategy": "fedavg",
            "rounds": 1,
            "rounds_completed": 1,
            "seed": 0,
            "sites": ["a"],
            "sites_per_round": [1],
            "secure_aggregation": {"enabled": False},
        },
        metrics={"final": {}},
        privacy_report=None,
        key=governance.keys["server"],
    )
    assert record.manifest["input_schema"]["kind"] == "image"
    assert record.manifest["input_schema"]["preprocessing"]["mean"] == DIGITS_MEAN
    assert record.manifest["model"]["onnx_max_abs_diff"] < 1e-5
    policy = registry.load_policy()
    decide(registry, _ref("digits-cnn:1"), "approve", governance.keys["alice"], policy)
    promote(registry, _ref("digits-cnn:1"), "production", governance.keys["dana"], policy)
    served = load_for_serving(registry, _ref("digits-cnn@production"), policy)
    registry.close()

    x = digits.x[:40]
    pixels = (x.astype(np.float64) * DIGITS_STD + DIGITS_MEAN).clip(0, 1)
    body = {"instances": [p[0].tolist() for p in pixels]}  # H×W lists
    answer = TestClient(create_app(served)).post("/v1/predict", json=body).json()
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-5)
    assert answer["class_indices"] == expected.argmax(axis=1).tolist()
    bad = TestClient(create_app(served)).post("/v1/predict", json={"instances": [[[0.5] * 7] * 8]})
    assert bad.status_code == 422 and "expected an image of shape [1, 8, 8]" in bad.json()["detail"]


# ---- the governed policy on the command line ----------------------------------------------------


def test_init_propose_sign_apply_show_and_history(tmp_path, capsys):
    import yaml

    governance = make_governance(tmp_path / "keys-only")
    fresh = tmp_path / "fresh"
    plain = governance.write_plain_policy(tmp_path / "policy.yaml")
    key = {name: str(path) for name, path in governance.key_paths.items()}
    reg = ["--registry", str(fresh)]

    def fedgov(*args: str) -> tuple[int, str]:
        code = main(["registry", *args, *reg])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    code, out = fedgov("init", str(plain), "--key", key["alice"])
    assert code == 2 and "check policy-quorum: 1 of 2 required governance signatures" in out
    code, out = fedgov("init", str(plain), "--key", key["alice"], "--key", key["bob"])
    assert code == 0 and "policy version 1 in force" in out and "signed by alice, bob" in out
    code, out = fedgov("init", str(plain), "--key", key["alice"], "--key", key["bob"])
    assert code == 2 and "already has policy version 1" in out

    changed = governance.policy_data({"quorum": 1})
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(changed))
    proposal = str(tmp_path / "proposal.yaml")
    assert fedgov("policy", "propose", str(tmp_path / "new.yaml"), "--out", proposal)[0] == 0
    code, out = fedgov("policy", "sign", proposal, "--key", key["mallory"])
    assert code == 2 and "is not a governance signer under policy version 1" in out
    code, out = fedgov("policy", "sign", proposal, "--key", key["alice"])
    assert code == 0 and "1 of 2 required governance signatures (alice)" in out
    code, out = fedgov("policy", "apply", proposal, "--key", key["alice"])
    assert code == 2 and "check policy-quorum: 1 of 2" in out
    code, out = fedgov("policy", "sign", proposal, "--key", key["carol"])
    assert code == 0 and "ready to apply" in out
    code, out = fedgov("policy", "apply", proposal, "--key", key["carol"])
    assert code == 0 and "policy version 2 in force" in out
    code, out = fedgov("policy", "apply", proposal, "--key", key["carol"])
    assert code == 2 and "check policy-version" in out  # applied once only

    code, out = fedgov("policy", "history", "--json")
    history = json.loads(out)
    assert [(h["version"], h["signers"]) for h in history] == [
        (1, ["alice", "bob"]),
        (2, ["alice", "carol"]),
    ]
    code, out = fedgov("policy", "show", "--version", "1", "--json")
    assert json.loads(out)["policy"]["aliases"]["production"]["quorum"] == 2
    code, out = fedgov("policy", "show", "--json")
    shown = json.loads(out)
    assert shown["version"] == 2 and shown["sha256"] == history[1]["sha256"]
    assert (fresh / "policy.yaml").read_text().count("version: 2") == 1
    code, out = fedgov("audit", "--verify")
    assert code == 0 and "audit chain intact: 2 entries" in out


def test_decisions_are_judged_under_the_policy_in_force_when_they_were_made(world, capsys):
    """Bob's approval under version 1 survives the rotation of his key in version 2; alice's
    stops counting once version 3 removes her."""
    from registry_support import PRINCIPALS

    from server.registry.governance import gate_report, resolve
    from server.registry.signing import generate_key

    registry, governance, record = world
    _approve(capsys, registry, governance, "alice", "bob")
    governance.keys["bob"] = generate_key()  # bob's new key; his old approval stays valid
    governance.write_policy(signers=("alice", "carol"))
    policy = registry.load_policy()
    assert policy.version == 2
    with registry.store.read() as session:
        report = gate_report(registry, session, record, policy, "production")
    assert report.passed and report.approvers == ["alice", "bob"]
    without_alice = {k: v for k, v in PRINCIPALS.items() if k != "alice"}
    governance.write_policy(
        {"quorum": 1, "approver_roles": ["privacy-officer", "data-steward"]},
        without_alice,
        signers=("bob", "carol"),
    )
    policy = registry.load_policy()
    with registry.store.read() as session:
        report = gate_report(
            registry, session, resolve(registry, _ref("toy-mlp:1")), policy, "production"
        )
    assert report.approvers == ["bob"]  # alice's approval no longer counts; bob's still does
    assert verify_audit(registry).ok
