"""The governed model registry: signed, immutable model versions, approvals, aliases, an audit log.

Layout of a registry folder (``--registry DIR``, default ``./.fedgov/registry``)::

    DIR/registry.db          metadata (SQLite by default; any SQLAlchemy URL with --db)
    DIR/artifacts/sha256/..  artifacts, content-addressed by their sha256, read-only
    DIR/keys/                keys generated on first use (the publisher's, the registry's own)
    DIR/policy.yaml          the governance policy (or --policy FILE / $FEDGOV_POLICY)

Pure logic (canonical JSON and digests, policy gates, the audit hash chain) lives in
``manifest``, ``policy`` and ``audit``; ``store`` and ``artifacts`` do the IO; ``governance``
and ``publish`` combine them.
"""
