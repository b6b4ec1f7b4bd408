"""The keys of the records fedgov sends: every message is a Flower RecordDict, nothing else.

Server → site (train/evaluate): ``ARRAYS`` (ArrayRecord, the global weights) and ``CONFIG``
(ConfigRecord: ``server-round``, ``fedgov-run-id`` in a train config, plus ``proximal-mu`` under
FedProx). ``fedgov-run-id`` is fedgov's id of the run, the same before and after a resume (Flower
gives the resumed run a new run id); a site keys its ledger spends and receipts by it.
Site → server, train: ``ARRAYS`` (updated weights), ``METRICS`` (``train_loss``,
``num-examples``, ``steps``) and ``SITE`` (ConfigRecord: ``site-id``).
Train and evaluate in one message: a train ``CONFIG`` with ``evaluate-first`` true asks the site to
evaluate the weights it received on its test split before training; the train reply's ``METRICS``
then also holds ``eval_loss``, ``eval_accuracy`` and ``eval-num-examples`` (a plain train decline
carries them in a ``METRICS`` of its own; a SecAgg+ masked input beside its train metrics). A
site that ignores the flag (an older app), or whose evaluation failed or was not finite, or whose
policy keeps eval metrics home, sends none, and the server asks it with an evaluate message.
Site → server, evaluate: ``METRICS`` (``eval_loss``, ``eval_accuracy``, ``num-examples``), ``SITE``.
Site → server, query: ``SITE`` (``site-id``, ``num-train``, ``num-test``).
Site → server, a refusal to train: ``SITE`` and ``DECLINE`` (ConfigRecord: ``reason`` plus any
details such as ε spent and cap); the server records it and carries on with the other sites.
Under sample-level DP a train reply also carries ``RECEIPT`` (ConfigRecord: ``payload``, the
receipt's canonical JSON; ``signature`` and ``public-key``, Ed25519 bytes, see privacy/receipts.py),
and a budget decline carries the same as ``receipt-payload``/``receipt-signature``/
``receipt-public-key`` (hex) inside ``DECLINE``.
Server → site under site-level DP with secure aggregation: ``dp-min-survivors`` in ``CONFIG``, the
survivors secure aggregation guarantees before unmasking; each site sizes its noise share by it.
Secure aggregation (``secagg=secaggplus``) replaces the train message by five stages,
``train.secagg_setup`` … ``train.secagg_unmask``; their records are in privacy/secagg/records.py.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
DECLINE = "decline"
RECEIPT = "receipt"

NUM_EXAMPLES = "num-examples"  # the weight Flower's strategies average by
SITE_ID = "site-id"
SERVER_ROUND = "server-round"
DP_MIN_SURVIVORS = "dp-min-survivors"
RUN_ID = "fedgov-run-id"
EVALUATE_FIRST = "evaluate-first"  # train config: evaluate the received weights first (bool)
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
EVAL_NUM_EXAMPLES = "eval-num-examples"  # train reply: the test rows the eval metrics are over
MAX_REASON_CHARS = 300  # a reason a site sends is cut to this many characters, on one line
MAX_SITE_ID_CHARS = 100


def train_config(run_id: str) -> ConfigRecord:
    """The config a train message starts from: fedgov's run id (the strategy adds the round)."""
    return ConfigRecord({RUN_ID: run_id} if run_id else {})


def config_run_id(config: ConfigRecord, fallback: object) -> str:
    """fedgov's run id a train config carries, or ``fallback`` (Flower's run id) without one."""
    return str(config.get(RUN_ID, "") or fallback)


def site_record(site_id: str, **fields: int | float | str) -> ConfigRecord:
    """The ConfigRecord identifying the replying site."""
    return ConfigRecord({SITE_ID: site_id, **fields})


def reply_site_id(reply: Message) -> str:
    """The site id a reply carries ("" when the reply has none or an unusable one, e.g. an error
    reply, a number, or more than ``MAX_SITE_ID_CHARS`` characters)."""
    if reply.has_error() or SITE not in reply.content.config_records:
        return ""
    site_id = reply.content.config_records[SITE].get(SITE_ID)
    if not isinstance(site_id, str) or not 0 < len(site_id) <= MAX_SITE_ID_CHARS:
        return ""
    return site_id


def decline_content(site_id: str, reason: str, **details: int | float | str) -> RecordDict:
    """The reply content of a site that refuses this round."""
    return RecordDict(
        {SITE: site_record(site_id), DECLINE: ConfigRecord({"reason": reason, **details})}
    )


def decline_reason(reply: Message) -> str | None:
    """The reason a reply declines the round (one line, at most ``MAX_REASON_CHARS``), or None
    when it does not decline. A decline without a readable reason still declines."""
    if reply.has_error() or DECLINE not in reply.content.config_records:
        return None
    reason = reply.content.config_records[DECLINE].get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return f"declined without a reason (reason = {bounded(repr(reason), 40)})"
    return bounded(reason)


def bounded(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` on one line and at most ``limit`` characters (for reasons a site sends)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    if len(lines) > 1:
        line = f"{lines[0]} … {line}"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def is_app_refusal(reply: Message) -> bool:
    """Whether a reply declines because the site refused to run this run's app (not approved
    there: clients/app_guard.py), rather than declining one round."""
    if reply.has_error() or DECLINE not in reply.content.config_records:
        return False
    return reply.content.config_records[DECLINE].get("refused") == "app"
