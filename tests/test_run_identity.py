"""fedgov's run id: a resumed run (new Flower run id) is the same run to the sites' ledgers.

The ClientApp's train handler is called directly with real records, as a SuperNode calls it. A
round asked again after its update left the site (the coordinator died before it used the reply)
must release the very same bits and count once; a retry whose bits differ is a new spend.
"""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients import app as client_app
from clients.site_privacy import reserve_round
from fedgov import messages
from fedgov.config import RunConfig, to_flower_config
from fedgov.models import initial_model
from fedgov_data.federation import simulated_federation
from privacy.accounting import epsilon
from privacy.ledger import PENDING, RELEASED, SiteLedger
from privacy.receipts import PRIVATE_KEY_FILE, Receipt

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7


def _cfg() -> RunConfig:
    cfg = RunConfig(rounds=4, seed=4)
    cfg.dataset.name, cfg.federation.num_sites = "synthetic", 3
    cfg.privacy.name = "sample_dp"
    return cfg


def _start(cfg: RunConfig) -> ArrayRecord:
    schema = simulated_federation(cfg).pool.schema
    return ArrayRecord(initial_model("mlp", schema.input_shape, 2, 64, 0).state_dict())


def _train(cfg, site_dir, arrays, server_round, flower_run_id, fedgov_run_id=None) -> Message:
    config = messages.train_config(fedgov_run_id) if fedgov_run_id else ConfigRecord()
    config[messages.SERVER_ROUND] = server_round
    message = Message(
        RecordDict({messages.CONFIG: config, messages.ARRAYS: arrays}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    message.metadata.__dict__["_message_id"] = f"m-{server_round}"
    node = {"partition-id": 0, "num-partitions": 3, "site-dir": str(site_dir), "epsilon-cap": 50.0}
    context = Context(
        run_id=flower_run_id,
        node_id=7,
        node_config=node,
        state=RecordDict(),
        run_config=to_flower_config(cfg),
    )
    return client_app.train(message, context)


def _receipt(reply: Message) -> Receipt:
    assert messages.decline_reason(reply) is None, messages.decline_reason(reply)
    receipt = Receipt.from_record(reply.content.config_records[messages.RECEIPT])
    assert receipt.verify()
    return receipt


def _bits(reply: Message) -> dict[str, bytes]:
    arrays = reply.content.array_records[messages.ARRAYS]
    return {name: array.numpy().tobytes() for name, array in arrays.items()}


def test_a_round_retried_after_a_resume_releases_the_same_bits_and_counts_once(tmp_path):
    cfg, site_dir = _cfg(), tmp_path / "site"
    arrays = _start(cfg)
    first = _train(cfg, site_dir, arrays, 1, flower_run_id=41, fedgov_run_id="run-a")
    # The coordinator died before using that reply; the resumed run (Flower run 97) asks again.
    again = _train(cfg, site_dir, arrays, 1, flower_run_id=97, fedgov_run_id="run-a")
    assert _bits(again) == _bits(first)  # same key, run, round and input: same noise, same bits
    assert _receipt(again).payload == _receipt(first).payload
    ledger = SiteLedger(site_dir, "site-00", PRIVATE_KEY_FILE)
    spends = ledger.read().spends
    assert [(s.run_id, s.round, s.status) for s in spends] == [("run-a", 1, RELEASED)]
    assert spends[0].update_sha256 == _receipt(first).payload["update_sha256"]
    second = _train(
        cfg,
        site_dir,
        first.content.array_records[messages.ARRAYS],
        2,
        flower_run_id=97,
        fedgov_run_id="run-a",
    )
    spends = ledger.read().spends
    assert [(s.run_id, s.round) for s in spends] == [("run-a", 1), ("run-a", 2)]
    assert _receipt(second).payload["epsilon"] == pytest.approx(
        epsilon([s.entry for s in spends], 1e-5), rel=1e-9
    )
    # the site's status file says what it last did, under fedgov's run id
    import json

    activity = json.loads((site_dir / "activity.json").read_text())
    assert (activity["run"], activity["flower_run"], activity["round"]) == ("run-a", "97", 2)
    assert activity["outcome"] == "trained"
    assert activity["epsilon"] == pytest.approx(spends[-1].epsilon_after)


def test_without_fedgov_s_run_id_spends_are_keyed_by_flower_s(tmp_path):
    cfg, site_dir = _cfg(), tmp_path / "site"
    arrays = _start(cfg)
    _receipt(_train(cfg, site_dir, arrays, 1, flower_run_id=41))
    _receipt(_train(cfg, site_dir, arrays, 1, flower_run_id=97))  # another run: a new spend
    spends = SiteLedger(site_dir, "site-00", PRIVATE_KEY_FILE).read().spends
    assert [(s.run_id, s.round) for s in spends] == [("41", 1), ("97", 1)]


def test_a_retry_that_releases_other_bits_is_a_new_spend_within_the_cap(tmp_path):
    cfg, site_dir, digest = _cfg(), tmp_path / "site", "ab" * 32
    node = {"site-dir": str(site_dir), "epsilon-cap": 50.0}
    ledger = SiteLedger(site_dir, "site-00", PRIVATE_KEY_FILE)
    first = reserve_round(cfg, node, "site-00", 777, "run-a", 1, digest)
    first.release("11" * 32)
    same = reserve_round(cfg, node, "site-00", 777, "run-a", 1, digest)
    assert same.repeat and same.spend.status == RELEASED
    same.release("11" * 32)
    assert len(ledger.read().spends) == 1
    other = reserve_round(cfg, node, "site-00", 777, "run-a", 1, digest)
    receipt = other.release("22" * 32)  # not the bits released before: counted again
    spends = ledger.read().spends
    assert [(s.round, s.status, s.update_sha256) for s in spends] == [
        (1, RELEASED, "11" * 32),
        (1, RELEASED, "22" * 32),
    ]
    assert receipt.payload["epsilon"] == pytest.approx(epsilon([s.entry for s in spends], 1e-5))
    # and over the cap such a retry is refused, with its decline recorded
    tight = {"site-dir": str(site_dir), "epsilon-cap": spends[-1].epsilon_after + 1e-6}
    retry = reserve_round(cfg, tight, "site-00", 777, "run-a", 1, digest)
    from clients.site_privacy import BudgetRefusal

    with pytest.raises(BudgetRefusal, match="did not reproduce its released update"):
        retry.release("33" * 32)
    state = ledger.read()
    assert len(state.spends) == 2 and state.declines[-1].round == 1
    assert PENDING not in {s.status for s in state.spends}
