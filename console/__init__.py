"""The governance console: a read-only web view of the federation's privacy budgets, runs and
model approvals (``fedgov console``).

Data (``runs``, ``budget``, ``registry_view`` — the one adapter into the registry —,
``statement``, ``pages``) is kept apart from the HTML (``render``, ``svg``), the HTTP layer
(``app``, ``metrics``) and the browser (``pdf``).
"""
