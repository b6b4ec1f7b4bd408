"""The discovery query's extra fields: what a site tells the coordinator before any round.

Site → server, in the query reply's ``SITE`` record (besides ``site-id``, ``num-train``,
``num-test``, see fedgov/messages.py): ``schema-digest``, the SHA-256 of the site's schema
(``fedgov.datasets.schema_digest``), which the coordinator compares with the federation's.
A site that cannot take part answers with ``DECLINE`` instead (``reason``: a short phrase such as
``data invalid``; never a file path, a row or a value: the exact error stays in the site's own
``activity.json``).
"""

from __future__ import annotations

SCHEMA_DIGEST = "schema-digest"
#: The reason a site with a data file that fails validation sends (the details stay local).
DATA_INVALID = "data invalid"
