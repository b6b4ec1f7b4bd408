"""fedgov's SuperLink: Flower's ``flower-superlink`` whose Control and Runtime APIs answer only the
coordinator's own host.

    python -m server.superlink <flower-superlink options>

Flower 1.42 serves the Fleet API (what SuperNodes use), the Control API (``flwr run``,
``flwr supernode register``: who may join, what runs) and the Runtime API (the ServerApp's
link) from one HTTP server on one ``--host``/``--port``; its ``--control-api-address`` is
deprecated and ignored. The Control API has no authentication in Flower's open-source
edition, so anyone who reaches the sites' address with the public ``ca.crt`` could register a
key of their own and join, or start a run.

This entry point runs Flower's own ``flower-superlink`` (same options) after adding, in this
process only, one ASGI middleware in front of every route (through Flower's own extension hook
``flwr.superlink.extensions.get_middleware``): a request from any peer other than the
coordinator's own host (``127.0.0.1``, ``::1``, or the specific address given as ``--host``)
is answered ``403`` unless its path is a Fleet route (``/v1/fleet/...``) or ``/health``. The
list is of what remote peers MAY reach, so a route Flower adds later is local-only by default.

It also bounds one cost measured with py-spy during ``python -m benchmarks.deployment``: Flower's
``SqlCoreState._cleanup_expired_task_tokens`` (an UPDATE over the task table, expiring task
claims whose heartbeat lapsed tens of seconds ago) runs inside every run-status lookup, i.e. on
every object a SuperNode pushes or pulls and every poll of ``flwr run --stream``: about 8 % of
the SuperLink's CPU samples. Here it runs at most once per :data:`CLEANUP_INTERVAL_SECONDS` per
process, so a lapsed claim is expired at most that much later; nothing else changes.

It also runs each of Flower's path-specific middlewares (Control API ones, the Fleet API's node
authentication and event log) only on the paths it acts on (:func:`scope_middleware`): every one
is a ``BaseHTTPMiddleware``, and their per-request plumbing was ~40 % of the SuperLink's CPU in
a profile; each passes any other request straight on, which :func:`scope_problems` checks in
Flower's source before anything is scoped (else Flower's stack is left as it is).

It also serves the SuperLink's state from memory, the registered sites' keys kept on disk
(:mod:`server.superlink_state`: Flower's SQLite state was half the SuperLink's CPU), and gives
Flower's SQLite writers, where that state is still used, a longer busy timeout (the cause of
"database is locked" under the sites' load).

No installed file is changed. If the hook is missing (another Flower version), the SuperLink
does not start: it refuses rather than run with its Control API open. (The cleanup bound is
left out, with a warning, if its method is missing.)
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fedgov.flower_hooks import source_of, version_problems
from server.superlink_state import install as install_busy_timeout
from server.superlink_state import use_memory_state

#: Paths a peer other than the coordinator's own host may reach (prefixes, or exact paths).
REMOTE_PREFIXES = ("/v1/fleet/",)
REMOTE_PATHS = ("/health",)
LOOPBACK_PEERS = ("127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")

#: The most often Flower's expired-task cleanup runs (seconds; see the module docstring).
CLEANUP_INTERVAL_SECONDS = 1.0

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]


def _normal(address: str) -> str:
    """``address`` in one canonical text form (an IPv4-mapped IPv6 address as IPv4)."""
    try:
        parsed = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return str(parsed)


def local_peers(bind_host: str) -> frozenset[str]:
    """The peer addresses that count as the coordinator's own host for a SuperLink bound to
    ``bind_host``: loopback's two, plus ``bind_host`` itself when it is one specific address
    (the host's own connections to that address come from it; no remote peer can complete a
    TCP handshake from it)."""
    peers = {_normal(peer) for peer in LOOPBACK_PEERS}
    if bind_host not in WILDCARD_HOSTS:
        with contextlib.suppress(ValueError):
            peers.add(_normal(bind_host))
    return frozenset(peers)


def remote_may_reach(path: str) -> bool:
    """Whether a peer from another host may reach ``path``."""
    return path in REMOTE_PATHS or path.startswith(REMOTE_PREFIXES)


class LocalOnlyRoutes:
    """ASGI middleware: every route but the Fleet API and health answers only local peers."""

    def __init__(self, app: ASGIApp, peers: frozenset[str] = frozenset(LOOPBACK_PEERS)) -> None:
        self.app, self.peers = app, peers

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not remote_may_reach(str(scope.get("path", ""))):
            client = scope.get("client")
            peer = _normal(str(client[0])) if client else ""
            if peer not in self.peers:
                body = json.dumps(
                    {
                        "detail": "this SuperLink's Control and Runtime APIs answer only its own "
                        "host; sites reach /v1/fleet/ only",
                    }
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


#: Flower's middlewares whose dispatch acts only on requests under these path prefixes and
#: passes every other request straight on (:func:`scope_problems` checks that in their source).
PATH_SCOPES = {
    "ControlSensitiveResponseMiddleware": ("/v1/control/",),
    "ControlAuthenticationMiddleware": ("/v1/control/",),
    "ControlLicenseMiddleware": ("/v1/control/",),
    "ControlEventLogMiddleware": ("/v1/control/",),
    "NodeAuthMiddleware": ("/v1/fleet/",),
    "FleetEventLogMiddleware": ("/v1/fleet/",),
}
#: What each one's dispatch must contain for :data:`PATH_SCOPES` to hold.
SCOPE_GUARDS = {
    "ControlSensitiveResponseMiddleware": "if _is_control_sensitive_route(request):",
    "ControlAuthenticationMiddleware": "if not _is_control_path(request.url.path) or",
    "ControlLicenseMiddleware": "or not _is_control_path(request.url.path):",
    "ControlEventLogMiddleware": "if not _is_control_path(request.url.path) or",
    "NodeAuthMiddleware": 'if request.url.path.startswith("/v1/fleet/") and',
    "FleetEventLogMiddleware": 'if not request.url.path.startswith("/v1/fleet/"):',
}


class PathScoped:
    """ASGI middleware: runs ``middleware`` for HTTP requests under ``prefixes`` only; any
    other request goes straight to the app, as that middleware would have passed it on."""

    def __init__(self, app: ASGIApp, middleware: Any, prefixes: tuple[str, ...]) -> None:
        cls, args, kwargs = middleware
        self.app, self.prefixes = app, prefixes
        self.inner = cls(app, *args, **kwargs)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not str(scope.get("path", "")).startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        await self.inner(scope, receive, send)


def scope_problems() -> list[str]:
    """Why Flower's middlewares cannot be scoped to their paths here (empty: they can)."""
    from flwr.superlink import main
    from flwr.superlink.routers.control import middlewares as control

    problems = []
    found = {getattr(m.cls, "__name__", ""): m.cls for m in main._get_middleware()}
    for name, guard in SCOPE_GUARDS.items():
        cls = found.get(name)
        source = source_of(cls.dispatch if cls is not None else None)
        if guard not in source:
            problems.append(f"{name}.dispatch changed")
    control_path = source_of(getattr(control, "_is_control_path", None))
    if 'return path.startswith("/v1/control/")' not in control_path:
        problems.append("_is_control_path changed")
    sensitive = getattr(control, "CONTROL_SENSITIVE_ROUTE_KEYS", None) or {("", "")}
    if not all(path.startswith("/v1/control/") for _, path in sensitive):
        problems.append("a sensitive route outside /v1/control/")
    return problems


def scope_middleware() -> bool:
    """Run Flower's path-specific middlewares only on their paths (this process): each one
    is a ``BaseHTTPMiddleware`` (a task group and a memory stream per request), which a
    py-spy profile of the SuperLink under ``python -m benchmarks.deployment`` showed as
    about 40 % of its CPU; a Fleet request passes 3 of Flower's 8 instead of 8, a Runtime
    request 2. False (Flower's stack left as it is, with a warning) if they changed."""
    from flwr.superlink import main

    problems = scope_problems()
    if problems:
        print(
            f"fedgov: SuperLink middlewares left as they are ({'; '.join(problems)})",
            file=sys.stderr,
        )
        return False
    flower_get_middleware = main._get_middleware

    def get_middleware() -> list[Any]:
        from starlette.middleware import Middleware

        scoped = []
        for middleware in flower_get_middleware():
            prefixes = PATH_SCOPES.get(getattr(middleware.cls, "__name__", ""))
            scoped.append(
                Middleware(PathScoped, middleware=middleware, prefixes=prefixes)
                if prefixes
                else middleware
            )
        return scoped

    main._get_middleware = get_middleware
    return True


def hook_problems() -> list[str]:
    """Why the middleware cannot be installed on the Flower found here (empty: it can)."""
    from flwr.superlink import extensions, main

    problems = version_problems()
    if not callable(getattr(extensions, "get_middleware", None)):
        problems.append("flwr.superlink.extensions.get_middleware is missing")
    source = source_of(getattr(main, "_get_middleware", None))
    if "extensions.get_middleware()" not in source:
        problems.append("flwr.superlink.main._get_middleware no longer calls the extension hook")
    return problems


def install(peers: frozenset[str]) -> None:
    """Put :class:`LocalOnlyRoutes` outermost in the SuperLink's app, and check it is there."""
    from flwr.superlink import extensions, main
    from starlette.middleware import Middleware

    flower_middleware = extensions.get_middleware
    flower_create_app = main.create_app

    def get_middleware() -> tuple[Middleware, ...]:
        return (Middleware(LocalOnlyRoutes, peers=peers), *flower_middleware())

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = flower_create_app(*args, **kwargs)
        if not any(m.cls is LocalOnlyRoutes for m in app.user_middleware):
            raise SystemExit("fedgov: the Control API could not be restricted; not starting")
        return app

    extensions.get_middleware = get_middleware
    main.create_app = create_app


class ThrottledCall:
    """Calls ``method`` (of any instance) at most once per ``interval`` seconds in all."""

    def __init__(
        self,
        method: Callable[..., None],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.method, self.interval, self.clock = method, interval, clock
        self.last: float | None = None
        self.calls = self.runs = 0
        self._lock = threading.Lock()

    def __call__(self, instance: object) -> None:
        with self._lock:
            self.calls += 1
            now = self.clock()
            if self.last is not None and now - self.last < self.interval:
                return
            self.last = now
            self.runs += 1
        self.method(instance)


def bound_task_cleanup(interval: float = CLEANUP_INTERVAL_SECONDS) -> ThrottledCall | None:
    """Make Flower's expired-task cleanup run at most once per ``interval`` s (this process)."""
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    method = getattr(SqlCoreState, "_cleanup_expired_task_tokens", None)
    if method is None or list(inspect.signature(method).parameters) != ["self"]:
        print("fedgov: Flower's task cleanup left as it is (method changed)", file=sys.stderr)
        return None
    throttled = ThrottledCall(method, interval)

    def cleanup(self: object) -> None:
        throttled(self)

    SqlCoreState._cleanup_expired_task_tokens = cleanup  # type: ignore[method-assign]
    return throttled


def _bind_host(argv: list[str]) -> str:
    """The value of ``--host`` in flower-superlink's options (Flower's default 127.0.0.1)."""
    for index, arg in enumerate(argv):
        if arg == "--host" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return "127.0.0.1"


def main() -> None:
    problems = hook_problems()
    if problems:
        raise SystemExit(
            "fedgov: cannot restrict the SuperLink's Control API (" + "; ".join(problems) + ")"
        )
    args = sys.argv[1:]
    install(local_peers(_bind_host(args)))
    scope_middleware()
    bound_task_cleanup()
    install_busy_timeout()
    if "--database" in args[:-1]:
        use_memory_state(args[args.index("--database") + 1])
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = [str(Path(sys.executable).parent / "flower-superlink"), *args]
    flower_superlink()


if __name__ == "__main__":
    main()
