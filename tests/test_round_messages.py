"""Train and evaluate in one message, through the real round loop and the real ClientApp.

Each round's train message asks the sites to evaluate the weights they received first
(``evaluate-first``), so round r's federated evaluation comes back with round r+1's train replies
and one evaluate exchange after the last round evaluates the final model: rounds + 1 exchanges
that evaluate, not 2 × rounds. Every test counts the exchanges the grid was asked for (one push
each) and recomputes each round's eval metrics here, from the exact weights that round produced
(as central evaluation saw them) evaluated on each site's test split: what the old separate
evaluate message gave.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from inprocess import InProcessGrid
from test_secagg_app import SITES, make_cfg

from clients.app import app as client_app
from clients.site_data import load_site_data
from clients.update import site_model
from fedgov import messages as keys
from fedgov.config import RunConfig, to_flower_config
from fedgov.evaluation import EvalResult, evaluate
from fedgov.models import initial_model
from fedgov_data.federation import simulated_federation
from privacy.secagg import records
from server.privacy_round import PrivacyRound
from server.round_context import RoundContext
from server.rounds import RoundRecord, RunResult, run_rounds
from strategies.registry import build_strategy

TRAIN, EVALUATE, QUERY = "train", "evaluate", "query"
MASKED = records.MESSAGE_TYPES["masked_input"]


@pytest.fixture(autouse=True)
def server_identity():
    """Messages the round loop creates are stamped as the ServerApp's (node 0)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class CountingGrid(InProcessGrid):
    """The in-process grid, noting each push (one exchange) and every request as delivered."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pushes: list[list[str]] = []  # message types of each non-empty push
        self.requests: list[tuple[int, Message]] = []  # (node, request) as the site got it
        self.tamper_request = self._note

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if messages:
            self.pushes.append(sorted(m.metadata.message_type for m in messages))
        return super().push_messages(messages)

    def _note(self, node_id: int, message: Message) -> Message:
        self.requests.append((node_id, message))
        return message


class Run:
    """A federation of synthetic sites; ``outputs[r - 1]`` is round r's output (central eval)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        n = cfg.federation.num_sites
        schema = simulated_federation(cfg).pool.schema
        model = initial_model("mlp", schema.input_shape, len(schema.classes), 64, cfg.seed)
        self.initial = ArrayRecord(model.state_dict())
        self.node_configs = [{"partition-id": i, "num-partitions": n} for i in range(n)]
        self.grid = CountingGrid(client_app, self.node_configs, to_flower_config(cfg))
        self.outputs: list[ArrayRecord] = []

    def run(self, privacy: PrivacyRound | None = None) -> RunResult:
        def central(arrays: ArrayRecord) -> EvalResult:
            self.outputs.append(ArrayRecord({k: arrays[k] for k in arrays}))
            return EvalResult(loss=0.0, accuracy=0.0, num_examples=1)

        strategy = build_strategy(self.cfg.strategy)
        context = RoundContext(self.grid, self.cfg, strategy, privacy)
        return run_rounds(context, self.initial, central)

    def exchanges(self) -> list[list[str]]:
        """The pushes of the rounds (discovery's queries left out)."""
        return [push for push in self.grid.pushes if set(push) != {QUERY}]

    def expected_eval(self, record: RoundRecord) -> tuple[float, float]:
        """Round ``record``'s output evaluated here on each of its ``eval_sites``' test split,
        weighted by test rows (the strategy's weighted mean)."""
        arrays = self.outputs[record.round - 1]
        results = []
        for node_config in self.node_configs:
            site = load_site_data(self.cfg, node_config)
            if site.site_id in record.eval_sites:
                results.append(evaluate(site_model(self.cfg, site, arrays), site.test))
        total = sum(r.num_examples for r in results)
        loss = sum(r.loss * r.num_examples for r in results) / total
        accuracy = sum(r.accuracy * r.num_examples for r in results) / total
        return loss, accuracy

    def evaluated_weights(self, server_round: int) -> list[ArrayRecord]:
        """The weights each site was asked to evaluate for ``server_round``'s output."""
        found = []
        for _, message in self.grid.requests:
            config = message.content.config_records.get(keys.CONFIG, {})
            asked = config.get(keys.EVALUATE_FIRST) is True
            of_round = int(config.get(keys.SERVER_ROUND, 0)) - (1 if asked else 0)
            is_eval = message.metadata.message_type == EVALUATE or asked
            if is_eval and of_round == server_round:
                found.append(message.content.array_records[keys.ARRAYS])
        return found


def _round_of(message: Message) -> int:
    return int(message.content.config_records[keys.CONFIG][keys.SERVER_ROUND])


def assert_evaluations_exact(
    run: Run, result: RunResult, asked_twice: dict[int, int] | None = None
) -> None:
    """Each round's eval metrics as recomputed here, from the weights the round produced;
    ``asked_twice``: round → sites asked in a train message and then an evaluate message."""
    for record in result.rounds:
        loss, accuracy = run.expected_eval(record)
        assert record.eval_loss == pytest.approx(loss, rel=1e-12, abs=1e-15), record.round
        assert record.eval_accuracy == pytest.approx(accuracy, rel=1e-12, abs=1e-15)
        weights = run.evaluated_weights(record.round)
        assert len(weights) == len(record.eval_sites) + (asked_twice or {}).get(record.round, 0)
        for arrays in weights:  # the model evaluated is the one the round produced, bit for bit
            for name in arrays:
                np.testing.assert_array_equal(
                    arrays[name].numpy(), run.outputs[record.round - 1][name].numpy()
                )


def test_a_plain_run_sends_one_message_per_site_per_round_and_one_final_evaluate():
    run = Run(make_cfg(secagg="off", rounds=3))
    result = run.run()
    # before: 3 train + 3 evaluate exchanges; now 3 train exchanges (rounds 2 and 3 also
    # evaluate) and one evaluate exchange for the final model
    assert run.exchanges() == [[TRAIN] * 4] * 3 + [[EVALUATE] * 4]
    asked = [
        (_round_of(m), m.content.config_records[keys.CONFIG].get(keys.EVALUATE_FIRST))
        for _, m in run.grid.requests
        if m.metadata.message_type == TRAIN
    ]
    assert asked == [(1, None)] * 4 + [(2, True)] * 4 + [(3, True)] * 4
    assert [r.eval_sites for r in result.rounds] == [SITES] * 3
    assert_evaluations_exact(run, result)


def _without_eval_metrics(request: Message, reply: Message) -> Message:
    """site-01 as an app that ignores ``evaluate-first`` (an older fedgov): no eval metrics."""
    metrics = reply.content.metric_records.get(keys.METRICS) if not reply.has_error() else None
    if reply.metadata.src_node_id != 2 or request.metadata.message_type != TRAIN or not metrics:
        return reply
    kept = {k: v for k, v in metrics.items() if k not in keys_eval()}
    content = RecordDict({**dict(reply.content.items()), keys.METRICS: MetricRecord(kept)})
    return Message(content, reply_to=request)


def keys_eval() -> tuple[str, ...]:
    return (keys.EVAL_LOSS, keys.EVAL_ACCURACY, keys.EVAL_NUM_EXAMPLES)


def test_a_site_that_ignores_the_flag_is_asked_with_an_evaluate_message():
    run = Run(make_cfg(secagg="off", rounds=3))
    run.grid.tamper = _without_eval_metrics
    result = run.run()
    train = [TRAIN] * 4
    assert run.exchanges() == [train, train, [EVALUATE], train, [EVALUATE], [EVALUATE] * 4]
    assert all(r.participants == SITES for r in result.rounds)
    assert_evaluations_exact(run, result, asked_twice={1: 1, 2: 1})


def test_sites_not_sampled_again_evaluate_in_the_same_exchange_as_the_train_messages():
    run = Run(make_cfg(secagg="off", rounds=4, federation__sites_per_round=2.0))
    result = run.run()
    exchanges = run.exchanges()
    assert len(exchanges) == 4 + 1  # one per round, then the final evaluate
    assert exchanges[-1] == [EVALUATE] * 2
    for server_round, push in enumerate(exchanges[:-1], start=1):
        previous = set(result.rounds[server_round - 2].eval_sites) if server_round > 1 else set()
        chosen = set(result.rounds[server_round - 1].eval_sites)
        assert push.count(TRAIN) == 2
        assert push.count(EVALUATE) == len(previous - chosen)  # asked without training
    assert_evaluations_exact(run, result)


@pytest.mark.parametrize("privacy", ["sample_dp", "site_dp"])
def test_dp_rounds_evaluate_in_the_train_message(privacy):
    cfg = make_cfg(secagg="off", rounds=3, privacy__name=privacy)
    run = Run(cfg)
    result = run.run(PrivacyRound(cfg))
    exchanges = run.exchanges()
    assert len(exchanges) == 3 + 1
    assert all(set(push) <= {TRAIN, EVALUATE} for push in exchanges)
    assert exchanges[-1] == [EVALUATE] * len(result.rounds[-1].eval_sites)
    if privacy == "sample_dp":  # fixed-size sampling: every site trains and evaluates
        assert exchanges[:-1] == [[TRAIN] * 4] * 3
    evaluated = [r for r in result.rounds if r.eval_sites]
    assert evaluated  # Poisson sampling may draw nobody in a round: then nothing to evaluate
    for record in result.rounds:
        if not record.eval_sites:
            assert record.eval_loss is None
    run_evaluated = RunResult(result.arrays, evaluated, result.sites)
    assert_evaluations_exact(run, run_evaluated)


def test_a_secagg_round_carries_the_evaluation_in_its_masked_input():
    run = Run(make_cfg(secagg="secaggplus", rounds=3))
    result = run.run()
    evaluates = [push for push in run.exchanges() if EVALUATE in push]
    assert evaluates == [[EVALUATE] * 4]  # only the final model's, after the last round
    assert run.exchanges()[-1] == [EVALUATE] * 4
    flagged = [
        _round_of(m)
        for _, m in run.grid.requests
        if m.metadata.message_type == MASKED
        and m.content.config_records[keys.CONFIG].get(keys.EVALUATE_FIRST) is True
    ]
    assert flagged == [2] * 4 + [3] * 4
    assert all(r.participants == SITES and not r.aborted for r in result.rounds)
    assert_evaluations_exact(run, result)


def test_a_site_that_keeps_eval_metrics_home_never_sends_them_with_its_update():
    """site-01's policy says report_eval_metrics: false. Asked to evaluate first, it trains and
    sends no eval metrics; the evaluate message it then gets, it declines: the round's eval
    metrics are the other three sites'."""
    from clients.site_policy import SitePolicy

    run = Run(make_cfg(secagg="off", rounds=2))
    run.node_configs[1].update(SitePolicy(report_eval_metrics=False).node_config())
    run.grid = CountingGrid(client_app, run.node_configs, to_flower_config(run.cfg))
    sent: list[Message] = []

    def note(request: Message, reply: Message) -> Message:
        if reply.metadata.src_node_id == 2 and request.metadata.message_type != QUERY:
            sent.append(reply)
        return reply

    run.grid.tamper = note
    result = run.run()
    assert [m.metadata.message_type for m in sent] == [TRAIN, TRAIN, EVALUATE, EVALUATE]
    for reply in sent:
        metrics = reply.content.metric_records.get(keys.METRICS, {})
        assert not set(keys_eval()) & set(metrics), reply.metadata.message_type
    assert all(r.participants == SITES for r in result.rounds)
    others = [site for site in SITES if site != "site-01"]
    for record in result.rounds:
        kept = RoundRecord(record.round, [], eval_sites=others)
        assert (record.eval_loss, record.eval_accuracy) == pytest.approx(run.expected_eval(kept))
