"""A site's own privacy budget: ledger, cap, receipts, failing closed, surviving a kill -9.

The ClientApp's train handler is called directly with real records (no Flower runtime), as a
SuperNode would call it; ε values are checked against an accountant that shares no code with
Opacus (``privacy.accounting.independent_epsilon``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from clients import app as client_app
from clients.site_data import load_site_data
from clients.site_privacy import reserve_round
from fedgov import messages
from fedgov.config import RunConfig, to_flower_config
from fedgov.models import initial_model
from fedgov.records import arrays_to_numpy, save_safetensors
from fedgov_data.federation import simulated_federation
from privacy.accounting import epsilon, independent_epsilon, steps_per_round
from privacy.ledger import LEDGER_FILE, PENDING, RELEASED, SiteLedger
from privacy.receipts import PRIVATE_KEY_FILE, Receipt, create_site_key, sign

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7


def _cfg(name: str = "sample_dp", **privacy: object) -> RunConfig:
    cfg = RunConfig(rounds=5, seed=4)
    cfg.dataset.name, cfg.federation.num_sites = "synthetic", 3
    cfg.privacy.name = name
    for key, value in privacy.items():
        setattr(cfg.privacy, key, value)
    return cfg


def _node(site_dir: Path, cap: float | None = 3.0, **extra: object) -> dict:
    node = {"partition-id": 0, "num-partitions": 3, "site-dir": str(site_dir), **extra}
    if cap is not None:
        node["epsilon-cap"] = cap
    return node


def _start(cfg: RunConfig) -> ArrayRecord:
    schema = simulated_federation(cfg).pool.schema
    return ArrayRecord(initial_model("mlp", schema.input_shape, 2, 64, 0).state_dict())


def _train(cfg, node, arrays, server_round, run_id=42, **config) -> Message:
    content = RecordDict(
        {"config": ConfigRecord({"server-round": server_round, **config}), "arrays": arrays}
    )
    message = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = f"m-{server_round}"
    context = Context(
        run_id=run_id,
        node_id=7,
        node_config=node,
        state=RecordDict(),
        run_config=to_flower_config(cfg),
    )
    return client_app.train(message, context)


def _plan(cfg: RunConfig) -> tuple[float, int]:
    rows = len(load_site_data(cfg, {"partition-id": 0, "num-partitions": 3}).train.y)
    return steps_per_round(rows, cfg.train.batch_size, cfg.train.local_epochs)


# ---- the cap ------------------------------------------------------------------------------------
def test_site_spends_until_its_cap_then_declines_in_the_right_round(tmp_path):
    cfg, cap = _cfg(noise_multiplier=1.0), 3.0
    rate, steps = _plan(cfg)
    # Independently: the first round whose cumulative ε would exceed the cap.
    expected_decline = next(
        r for r in range(1, 50) if independent_epsilon([(1.0, rate, steps * r)], 1e-5) > cap
    )
    assert 2 <= expected_decline <= 6
    arrays = _start(cfg)
    trained, declined = [], []
    for server_round in range(1, expected_decline + 2):
        reply = _train(cfg, _node(tmp_path / "site", cap), arrays, server_round)
        if messages.decline_reason(reply) is not None:
            decline = reply.content.config_records["decline"]
            assert decline["cap"] == cap
            assert decline["epsilon_spent"] <= cap
            assert decline["epsilon_requested"] > cap
            declined.append(server_round)
            continue
        receipt = Receipt.from_record(reply.content.config_records["receipt"])
        assert receipt.verify()
        payload = receipt.payload
        assert (payload["round"], payload["steps"], payload["sample_rate"]) == (
            server_round,
            steps,
            rate,
        )
        assert payload["epsilon"] <= cap
        reproduced = independent_epsilon(payload["history"], 1e-5)
        assert abs(reproduced - payload["epsilon"]) / reproduced < 0.01
        assert payload["history"] == [[1.0, rate, steps * server_round]]
        assert "train_loss" not in reply.content.metric_records["metrics"]  # not private
        trained.append(server_round)
        arrays = reply.content.array_records["arrays"]
    assert trained == list(range(1, expected_decline))
    assert declined == [expected_decline, expected_decline + 1]
    ledger = json.loads((tmp_path / "site" / LEDGER_FILE).read_text())
    assert [s["round"] for s in ledger["spends"]] == trained
    assert all(s["status"] == RELEASED for s in ledger["spends"])
    assert [d["round"] for d in ledger["declines"]] == declined


def test_the_servers_run_config_and_messages_cannot_raise_the_cap(tmp_path):
    cfg = _cfg(site_epsilon_cap=1000.0, noise_multiplier=0.8)
    reply = _train(cfg, _node(tmp_path / "s", cap=0.5), _start(cfg), 1, **{"epsilon-cap": 1e6})
    assert "privacy budget exhausted" in messages.decline_reason(reply)
    assert reply.content.config_records["decline"]["cap"] == 0.5
    assert not reply.content.array_records


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        ({"site-dir": ""}, "node config 'site-dir'"),
        ({"epsilon-cap": None}, "node config 'epsilon-cap' is not set"),
        ({"epsilon-cap": "lots"}, "'epsilon-cap': 'lots' is not a number"),
        ({"epsilon-cap": -1.0}, "'epsilon-cap': -1.0 must be a number > 0"),
        ({"delta": 0.5}, "privacy.delta: 0.5 must be in (0, 1/n)"),
    ],
)
def test_a_site_without_a_usable_budget_declines_and_says_why(tmp_path, node, reason):
    cfg = _cfg()
    settings = {**_node(tmp_path / "s"), **node}
    settings = {k: v for k, v in settings.items() if v is not None}
    reply = _train(cfg, settings, _start(cfg), 1)
    assert reason in messages.decline_reason(reply)
    assert not reply.content.array_records


def test_target_epsilon_picks_a_noise_that_spends_it_over_the_planned_rounds(tmp_path):
    cfg = _cfg(target_epsilon=2.0)
    cfg.rounds = 3
    rate, steps = _plan(cfg)
    arrays = _start(cfg)
    for server_round in (1, 2, 3):
        reply = _train(cfg, _node(tmp_path / "s", cap=8.0), arrays, server_round)
        arrays = reply.content.array_records["arrays"]
    payload = Receipt.from_record(reply.content.config_records["receipt"]).payload
    assert payload["history"] == [[payload["noise_multiplier"], rate, 3 * steps]]
    assert 2.0 * 0.99 <= payload["epsilon"] <= 2.0
    assert independent_epsilon(payload["history"], 1e-5) == pytest.approx(2.0, rel=0.01)


# ---- failing closed -----------------------------------------------------------------------------
def _two_rounds(cfg, site_dir) -> None:
    arrays = _start(cfg)
    for server_round in (1, 2):
        reply = _train(cfg, _node(site_dir, cap=50.0), arrays, server_round)
        arrays = reply.content.array_records["arrays"]


def _tamper_epsilon(path: Path) -> None:
    data = json.loads(path.read_text())
    data["spends"][0]["steps"] = 1  # as if less had been spent
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / LEDGER_FILE).unlink(), "missing but the site's key exists"),
        (lambda d: (d / LEDGER_FILE).write_text('{"format": "fedgov-priv'), "unreadable"),
        (lambda d: _tamper_epsilon(d / LEDGER_FILE), "fails its checksum"),
        (lambda d: (d / PRIVATE_KEY_FILE).unlink(), "key"),
        (lambda d: (d / PRIVATE_KEY_FILE).write_bytes(b"garbage"), "unreadable"),
    ],
)
def test_a_damaged_ledger_fails_closed_and_never_starts_over(tmp_path, damage, reason):
    cfg = _cfg()
    site_dir = tmp_path / "site"
    _two_rounds(cfg, site_dir)
    damage(site_dir)
    for server_round in (3, 4):
        reply = _train(cfg, _node(site_dir, cap=50.0), _start(cfg), server_round)
        declined = messages.decline_reason(reply)
        assert declined is not None and "failing closed" in declined and reason in declined
        assert not reply.content.array_records


def test_another_sites_ledger_is_refused(tmp_path):
    cfg = _cfg()
    _two_rounds(cfg, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LEDGER_FILE).write_bytes((tmp_path / "a" / LEDGER_FILE).read_bytes())
    node = {**_node(tmp_path / "b", cap=50.0), "site-id": "someone-else"}
    reply = _train(cfg, node, _start(cfg), 3)
    assert "belongs to site 'site-00'" in messages.decline_reason(reply)


def test_a_retry_of_an_interrupted_round_counts_once_and_an_interruption_counts(tmp_path):
    """A pending spend (training started, nothing released) is counted; retrying the same round
    with the same weights replaces it instead of adding a second spend."""
    cfg = _cfg()
    site_dir = tmp_path / "site"
    arrays = _start(cfg)
    digest = "ab" * 32
    node = _node(site_dir, cap=50.0)
    first = reserve_round(cfg, node, "site-00", 777, "run-1", 1, digest)  # then "crash"
    ledger = SiteLedger(site_dir, "site-00", PRIVATE_KEY_FILE)
    assert [s.status for s in ledger.read().spends] == [PENDING]
    again = reserve_round(cfg, node, "site-00", 777, "run-1", 1, digest)
    assert len(ledger.read().spends) == 1
    assert again.spend.epsilon_after == first.spend.epsilon_after
    again.release("00" * 32)
    later = reserve_round(cfg, node, "site-00", 777, "run-1", 2, digest)
    assert [s.round for s in ledger.read().spends] == [1, 2]
    assert later.spend.epsilon_after == pytest.approx(
        epsilon([first.spend.entry, later.spend.entry], 1e-5)
    )
    del arrays


# ---- receipts -----------------------------------------------------------------------------------
def test_receipts_verify_only_unchanged_and_with_their_key(tmp_path):
    key = create_site_key(tmp_path / "k")
    receipt = sign(key, {"run": "r", "round": 1, "epsilon": 1.25, "history": [[1.0, 0.1, 3]]})
    assert receipt.verify()
    assert Receipt.from_record(receipt.to_record()).verify()
    assert Receipt.from_json(json.loads(json.dumps(receipt.to_json()))).verify()
    forged = Receipt({**receipt.payload, "epsilon": 0.5}, receipt.signature, receipt.public_key)
    assert not forged.verify()
    other = create_site_key(tmp_path / "other")
    from privacy.receipts import public_key_bytes

    assert not receipt.verify(expected_public_key=public_key_bytes(other))
    with pytest.raises(FileExistsError):
        create_site_key(tmp_path / "k")  # a key is never overwritten


def test_a_budget_decline_carries_a_signed_receipt_of_what_was_spent(tmp_path):
    cfg = _cfg(noise_multiplier=1.0)
    node = _node(tmp_path / "s", cap=3.0)
    arrays = _start(cfg)
    for server_round in range(1, 10):
        reply = _train(cfg, node, arrays, server_round)
        if messages.decline_reason(reply):
            break
        arrays = reply.content.array_records["arrays"]
    decline = reply.content.config_records["decline"]
    receipt = Receipt(
        json.loads(decline["receipt-payload"]),
        bytes.fromhex(decline["receipt-signature"]),
        bytes.fromhex(decline["receipt-public-key"]),
    )
    assert receipt.verify() and receipt.payload["kind"] == "decline"
    assert receipt.payload["epsilon"] == pytest.approx(decline["epsilon_spent"])
    assert independent_epsilon(receipt.payload["history"], 1e-5) == pytest.approx(
        decline["epsilon_spent"], rel=0.01
    )


# ---- site-level DP at the site ------------------------------------------------------------------
def test_site_level_dp_releases_a_clipped_update_with_equal_weight(tmp_path):
    cfg = _cfg("site_dp", clipping_norm=0.05)
    start = _start(cfg)
    reply = _train(cfg, _node(tmp_path / "s"), start, 1)
    released, base = (arrays_to_numpy(r) for r in (reply.content.array_records["arrays"], start))
    norm = np.sqrt(sum(float(((released[k] - base[k]) ** 2).sum()) for k in base))
    assert norm == pytest.approx(0.05, rel=1e-4)  # one epoch moves it further: clipped to C
    assert reply.content.metric_records["metrics"]["num-examples"] == 1
    assert "receipt" not in reply.content.config_records  # no sample-level spend


def test_under_secure_aggregation_a_site_adds_its_noise_share_or_refuses(tmp_path):
    cfg = _cfg("site_dp", clipping_norm=1.0, site_noise_multiplier=2.0)
    cfg.secagg.name = "secaggplus"
    start = _start(cfg)
    refused = _train(cfg, _node(tmp_path / "s"), start, 1)
    assert "dp-min-survivors" in messages.decline_reason(refused)
    reply = _train(cfg, _node(tmp_path / "s"), start, 1, **{"dp-min-survivors": 4})
    released, base = (arrays_to_numpy(r) for r in (reply.content.array_records["arrays"], start))
    moved = np.concatenate([(released[k] - base[k]).ravel() for k in base])
    # the clipped update has norm ≤ 1 over ~1.5k values; the share is N(0, (z·C/√t)²) = N(0, 1)
    assert moved.std() == pytest.approx(2.0 * 1.0 / np.sqrt(4), rel=0.08)


# ---- a killed site process keeps every spend ----------------------------------------------------
@pytest.mark.slow
def test_a_site_killed_mid_round_keeps_every_spend_after_restart(tmp_path):
    cfg = _cfg(noise_multiplier=3.0)
    cfg.train.local_epochs = 40  # about a second per round: time to kill it mid-training
    (tmp_path / "run_config.json").write_text(json.dumps(to_flower_config(cfg)))
    save_safetensors(tmp_path / "global.safetensors", _start(cfg))
    ledger_path = tmp_path / "site" / LEDGER_FILE
    worker = [sys.executable, str(ROOT / "tests" / "privacy_site_worker.py"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    first = subprocess.Popen(
        [*worker, "1", "2", "3"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if ledger_path.exists():
                spends = json.loads(ledger_path.read_text())["spends"]
                if any(s["round"] == 3 and s["status"] == PENDING for s in spends):
                    break
            assert first.poll() is None, "the site finished before it could be killed"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(timeout=30)
    after_kill = json.loads(ledger_path.read_text())["spends"]
    assert [(s["round"], s["status"]) for s in after_kill] == [
        (1, RELEASED),
        (2, RELEASED),
        (3, PENDING),
    ]
    counted = epsilon(
        [(s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in after_kill], 1e-5
    )
    assert counted > after_kill[1]["epsilon_after"]  # the interrupted round is counted

    restarted = subprocess.run(
        [*worker, "3", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "round 4 done" in restarted.stdout
    spends = json.loads(ledger_path.read_text())["spends"]
    assert [(s["round"], s["status"]) for s in spends] == [(r, RELEASED) for r in (1, 2, 3, 4)]
    history = [(s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in spends]
    assert spends[-1]["epsilon_after"] == pytest.approx(epsilon(history, 1e-5))
    assert independent_epsilon(history, 1e-5) == pytest.approx(
        spends[-1]["epsilon_after"], rel=0.01
    )
    torch.set_num_threads(1)


@settings(max_examples=12, deadline=None)
@given(
    spends=st.lists(
        st.tuples(st.floats(0.6, 3.0), st.floats(0.01, 0.5), st.integers(1, 60)),
        min_size=1,
        max_size=5,
    ),
    cap=st.floats(0.5, 12.0),
)
def test_a_ledger_never_lets_epsilon_pass_its_cap(spends, cap):
    """Whatever the rounds ask for, a reservation is granted exactly when it stays within the cap,
    and the ledger's ε is always the composition of what it granted."""
    import tempfile

    from privacy.ledger import Spend

    with tempfile.TemporaryDirectory() as folder:
        ledger = SiteLedger(folder, "site", PRIVATE_KEY_FILE)
        granted: list[tuple[float, float, int]] = []
        for server_round, (sigma, rate, steps) in enumerate(spends, start=1):
            spend = Spend("run", server_round, sigma, rate, steps, 1e-5, "rdp", 0.0, "in")
            reservation = ledger.reserve(spend, cap)
            would_be = epsilon([*granted, (sigma, rate, steps)], 1e-5)
            assert reservation.epsilon_after == pytest.approx(would_be)
            assert (reservation.spend is not None) == (would_be <= cap)
            if reservation.spend is not None:
                granted.append((sigma, rate, steps))
            assert epsilon(ledger.read().history(), 1e-5) <= cap
        state = ledger.read()
        assert [s.entry for s in state.spends] == granted
        assert len(state.declines) == len(spends) - len(granted)
