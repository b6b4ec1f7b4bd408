"""Serving a governed model over HTTP: verify on start (``verify``), then the API (``app``), and
re-verify every ``--reverify-seconds`` while serving (:class:`Reverifier`)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

from fedgov.errors import FedgovError
from server.registry.errors import RegistryError
from server.registry.manifest import ModelRef, parse_ref
from server.registry.registry import Registry

DEFAULT_REVERIFY_SECONDS = 30.0


def serve(
    ref_text: str,
    *,
    registry_path: str | Path,
    db_url: str | None = None,
    policy_path: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    runtime: str = "onnx",
    anchor_path: str | Path | None = None,
    reverify_seconds: float = DEFAULT_REVERIFY_SECONDS,
    token_file: str | Path | None = None,
    public_scopes: str = "",
    max_body_bytes: int = 4 * 1024 * 1024,
    key_path: str | Path | None = None,
) -> None:
    """Verify ``NAME@ALIAS``, optionally log ``serve_start`` (signed with ``key_path``), serve
    until stopped, re-verifying every ``reverify_seconds``."""
    import uvicorn

    from server.registry.checkpoint import ANCHOR_ENV, read_checkpoint
    from server.registry.signing import load_key
    from server.serving.app import create_app, load_tokens
    from server.serving.verify import load_for_serving

    ref = parse_ref(ref_text, allow_version=False)
    auth = load_tokens(token_file, public_scopes) if token_file else None
    if public_scopes and not token_file:
        raise FedgovError("--public: only meaningful with --token-file")
    anchor_file = anchor_path or os.environ.get(ANCHOR_ENV)
    anchor = (
        read_checkpoint(anchor_file, "--anchor" if anchor_path else f"${ANCHOR_ENV}")
        if anchor_file
        else None
    )
    key = load_key(key_path) if key_path else None
    registry = Registry(registry_path, db_url)
    policy = registry.load_policy(policy_path)
    served = load_for_serving(registry, ref, policy, runtime, anchor)
    listener = _bind(host, port)
    bound_port = listener.getsockname()[1]
    if key is not None:
        principal = policy.principal_for_key(key.public_key)
        if principal is None:
            raise RegistryError(f"--key: key {key.key_id} is no principal's key in {policy.source}")
        with registry.store.write() as tx:
            tx.audit(
                action="serve_start",
                subject=str(ref),
                actor=principal.name,
                key=key,
                details={
                    "version": served.record.version,
                    "manifest_sha256": served.record.manifest_sha256,
                    "policy_sha256": policy.sha256,
                    "address": f"{host}:{bound_port}",
                    "runtime": runtime,
                },
            )
    registry.close()
    print(
        f"fedgov serve: {ref} → {served.record.ref} verified (signature, "
        f"{len(served.record.manifest['artifacts'])} artifact hashes, approvals by "
        f"{', '.join(served.approvers) or 'none required'}, audit chain of "
        f"{served.audit_entries} entries"
        + (f", extends checkpoint {anchor.seq}" if anchor else "")
        + f"); re-verified every {reverify_seconds:g} s; "
        + ("bearer tokens required; " if auth else "")
        + f"listening on http://{host}:{bound_port}",
        flush=True,
    )
    reverifier = Reverifier(
        served, ref, registry_path, db_url, policy_path, anchor, reverify_seconds
    )
    reverifier.start()
    config = uvicorn.Config(
        create_app(served, auth, max_body_bytes),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        reverifier.stop()
    sys.stdout.flush()


class Reverifier(threading.Thread):
    """Re-runs the start-up verification every ``seconds``; on failure sets
    ``served.withdrawn`` (predictions stop, /healthz says why), on success clears it."""

    def __init__(self, served, ref: ModelRef, registry_path, db_url, policy_path, anchor, seconds):
        super().__init__(name="fedgov-reverify", daemon=True)
        self.served = served
        self.ref = ref
        self.registry_path = registry_path
        self.db_url = db_url
        self.policy_path = policy_path
        self.anchor = anchor
        self.seconds = seconds
        self._stop_event = threading.Event()

    def check_once(self) -> str | None:
        """One verification; the reason it failed, or None."""
        from server.serving.verify import check_served

        try:
            registry = Registry(self.registry_path, self.db_url)
            try:
                policy = registry.load_policy(self.policy_path)
                check_served(registry, self.ref, policy, self.anchor, self.served.record)
            finally:
                registry.close()
        except FedgovError as error:
            return str(error).removeprefix("serve refused: ")
        except Exception as error:  # a broken registry must withdraw the model, not the thread
            return f"re-verification failed ({type(error).__name__})"
        return None

    def run(self) -> None:
        while not self._stop_event.wait(self.seconds):
            reason = self.check_once()
            if reason is not None and self.served.withdrawn != reason:
                print(f"fedgov serve: withdrawn: {reason}", file=sys.stderr, flush=True)
            self.served.withdrawn = reason
            if reason is None:
                self.served.verified_at = time.time()

    def stop(self) -> None:
        self._stop_event.set()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise RegistryError(f"--port: cannot listen on {host}:{port} ({error.strerror})") from None
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener
