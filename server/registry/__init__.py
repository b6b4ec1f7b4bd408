"""The governed model registry: signed, immutable model versions, approvals, aliases, an audit log.

Layout of a registry folder (``--registry DIR``, default ``./.fedgov/registry``)::

    DIR/registry.db          metadata (SQLite by default; any SQLAlchemy URL with --db)
    DIR/artifacts/sha256/..  artifacts, content-addressed by their sha256, read-only
    DIR/policy.yaml          a copy of the signed policy version in force (the chain itself is
                             in the audit log; a file that is not its head is refused)

No private key lives in the folder: principals keep theirs, and a publishing server's default
key is ``~/.fedgov/keys/publisher.key`` (``$FEDGOV_KEYS_DIR``).

Pure logic (canonical JSON and digests, policy gates, the audit hash chain, the signed policy
chain, the replay of the log under the policy in force, checkpoints) lives in ``manifest``,
``policy``, ``audit``, ``policy_chain``, ``replay`` and ``checkpoint``; ``store`` and
``artifacts`` do the IO; ``governance`` and ``publish`` combine them.
"""
