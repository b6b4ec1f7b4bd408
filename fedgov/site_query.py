"""The discovery query's extra fields: what a site tells the coordinator before any round.

Site → server, in the query reply's ``SITE`` record (besides ``site-id``, ``num-train``,
``num-test``, see fedgov/messages.py): ``schema-digest``, the SHA-256 of the site's schema
(``fedgov.datasets.schema_digest``), which the coordinator compares with the federation's.
A site that cannot take part answers with ``DECLINE`` instead (``reason``: a short phrase such as
``data invalid``; never a file path, a row or a value: the exact error stays in the site's own
``activity.json``).

Under DP-SGD the same reply answers the coordinator's budget plan (privacy/planning.py):
``epsilon-spent`` (from the site's own ledger), ``epsilon-cap`` and ``delta`` (its node config,
else the run's δ). A site with no budget set, or a ledger it cannot read, sends none of them (it
will decline the DP rounds anyway).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SCHEMA_DIGEST = "schema-digest"
#: The reason a site with a data file that fails validation sends (the details stay local).
DATA_INVALID = "data invalid"
EPSILON_SPENT = "epsilon-spent"
EPSILON_CAP = "epsilon-cap"
DELTA = "delta"


def budget_of(site: Mapping[str, Any]) -> tuple[float, float, float] | None:
    """(ε spent, cap, δ) from a query reply's site record, None when it sent none."""
    try:
        return float(site[EPSILON_SPENT]), float(site[EPSILON_CAP]), float(site[DELTA])
    except (KeyError, TypeError, ValueError):
        return None
