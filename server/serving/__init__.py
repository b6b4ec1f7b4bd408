"""Serving a governed model over HTTP: verify on start (``verify``), then the API (``app``)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from server.registry.errors import RegistryError
from server.registry.manifest import parse_ref
from server.registry.registry import Registry


def serve(
    ref_text: str,
    *,
    registry_path: str | Path,
    db_url: str | None = None,
    policy_path: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    runtime: str = "onnx",
) -> None:
    """Verify ``NAME@ALIAS``, log ``serve_start`` in the audit chain, serve until stopped."""
    import uvicorn

    from server.serving.app import create_app
    from server.serving.verify import load_for_serving

    ref = parse_ref(ref_text, allow_version=False)
    registry = Registry(registry_path, db_url)
    policy = registry.load_policy(policy_path)
    served = load_for_serving(registry, ref, policy, runtime)
    listener = _bind(host, port)
    bound_port = listener.getsockname()[1]
    key = registry.registry_key()
    principal = policy.principal_for_key(key.public_key)
    with registry.store.write() as tx:
        tx.audit(
            action="serve_start",
            subject=str(ref),
            actor=principal.name if principal else "registry",
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
        f"{served.audit_entries} entries); listening on http://{host}:{bound_port}",
        flush=True,
    )
    config = uvicorn.Config(
        create_app(served), log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
    uvicorn.Server(config).run(sockets=[listener])
    sys.stdout.flush()


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
