"""fedgov's SuperLink (server/superlink.py): which of Flower's routes a peer may reach, in process.

The app is Flower 1.42's own SuperLink app (``flwr.superlink.main.create_app``) with fedgov's
middleware installed through Flower's extension hook, asked over ASGI from given peer
addresses. The real-process attack is tests/test_control_api_lockdown.py.
"""

from __future__ import annotations

import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.superlink import hook_problems, install, local_peers


@pytest.fixture(scope="module")
def app():
    from flwr.superlink import extensions, main

    saved = extensions.get_middleware, main.create_app
    install(local_peers("127.0.0.1"))
    try:
        yield main.create_app()
    finally:
        extensions.get_middleware, main.create_app = saved


def _client(app, peer: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

        return TestClient(app, client=(peer, 40000))


def test_the_hook_exists_on_this_flower():
    assert hook_problems() == []


@pytest.mark.parametrize("peer", ["127.0.0.2", "10.1.2.3", "::ffff:10.1.2.3", "2001:db8::5"])
def test_another_host_reaches_fleet_and_health_only(app, peer):
    client = _client(app, peer)
    for path in (
        "/v1/control/register-supernode",
        "/v1/control/list-runs",
        "/v1/control/start-run",
        "/v1/runtime/pull-messages",
        "/docs",
        "/openapi.json",
        "//v1/control/list-runs",
        "/V1/control/list-runs",
    ):
        reply = client.post(path, content=b"") if "/v1" in path.lower() else client.get(path)
        assert reply.status_code == 403, (path, reply.status_code)
        assert "answer only its own host" in reply.json()["detail"]
    assert client.get("/health").status_code == 200
    # Fleet routes reach Flower (which then answers for itself: here, a malformed request).
    assert client.post("/v1/fleet/pull-messages", content=b"").status_code != 403


@pytest.mark.parametrize("peer", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
def test_the_coordinators_own_host_reaches_everything(app, peer):
    client = _client(app, peer)
    assert client.get("/docs").status_code == 200
    assert client.post("/v1/control/list-runs", content=b"").status_code != 403


def test_a_specific_bind_address_counts_as_local_a_wildcard_does_not():
    assert local_peers("10.0.0.5") == {"127.0.0.1", "::1", "10.0.0.5"}
    assert local_peers("0.0.0.0") == local_peers("::") == {"127.0.0.1", "::1"}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.text(alphabet="/abcdefghilnoprstuvwxyz-_.1V", min_size=1, max_size=30))
def test_any_other_path_is_refused_to_another_host(app, path):
    path = "/" + path.lstrip("/") if not path.startswith("//") else path
    reply = _client(app, "192.0.2.7").post(path, content=b"")
    if path == "/health" or path.startswith("/v1/fleet/"):
        assert reply.status_code != 403
    else:
        assert reply.status_code == 403, path


def test_the_task_cleanup_runs_at_most_once_per_interval():
    from server.superlink import ThrottledCall

    ran: list[object] = []
    now = [100.0]
    throttled = ThrottledCall(ran.append, 1.0, clock=lambda: now[0])
    for step in (0.0, 0.3, 0.6, 0.99, 1.0, 1.5, 2.2, 2.3):
        now[0] = 100.0 + step
        throttled("state")
    assert (throttled.calls, throttled.runs) == (8, 3)  # at 0.0, 1.0 and 2.2
    assert ran == ["state"] * 3


def test_the_bound_applies_to_flowers_own_state_class():
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    from server.superlink import bound_task_cleanup

    original = SqlCoreState._cleanup_expired_task_tokens
    try:
        throttled = bound_task_cleanup(interval=3600)
        assert throttled is not None and throttled.method is original
        seen: list[object] = []
        throttled.method = seen.append  # what Flower's cleanup would be given
        SqlCoreState._cleanup_expired_task_tokens("a state")  # type: ignore[arg-type]
        SqlCoreState._cleanup_expired_task_tokens("a state")  # type: ignore[arg-type]
        assert seen == ["a state"] and throttled.calls == 2
    finally:
        SqlCoreState._cleanup_expired_task_tokens = original  # type: ignore[method-assign]


def test_flowers_path_specific_middlewares_pass_other_paths_on_in_their_source():
    from server.superlink import scope_problems

    assert scope_problems() == []


@pytest.fixture()
def scoped_app(monkeypatch):
    """Flower's app with its middlewares scoped, each scoped one's dispatch recording calls."""
    from flwr.superlink import extensions, main

    from server.superlink import PATH_SCOPES, scope_middleware

    saved = extensions.get_middleware, main.create_app, main._get_middleware
    install(local_peers("127.0.0.1"))
    assert scope_middleware() is True  # before the recorders below change the source
    calls: list[tuple[str, str]] = []
    for middleware in saved[2]():
        cls = middleware.cls
        if cls.__name__ in PATH_SCOPES:

            def recording(self, request, call_next, _name=cls.__name__, _flower=cls.dispatch):
                calls.append((_name, request.url.path))
                return _flower(self, request, call_next)

            monkeypatch.setattr(cls, "dispatch", recording)
    try:
        yield main.create_app(), calls
    finally:
        extensions.get_middleware, main.create_app, main._get_middleware = saved


def test_scoped_middlewares_run_on_their_own_paths_only(scoped_app):
    from flwr.supercore.protobuf.translation import PROTOBUF_MEDIA_TYPE

    app, calls = scoped_app  # an empty body is each request type with its defaults
    client = _client(app, "127.0.0.1")
    control = {
        "ControlSensitiveResponseMiddleware",
        "ControlAuthenticationMiddleware",
        "ControlLicenseMiddleware",
        "ControlEventLogMiddleware",
    }
    fleet = {"NodeAuthMiddleware", "FleetEventLogMiddleware"}
    for path, expected in (
        ("/v1/fleet/pull-messages", fleet),
        ("/v1/control/list-runs", control),
        ("/v1/runtime/pull-messages", set()),
    ):
        calls.clear()
        client.post(path, content=b"", headers={"content-type": PROTOBUF_MEDIA_TYPE})
        seen = {name for name, _ in calls}  # the outermost may refuse before the next runs
        assert (seen and seen <= expected) if expected else not seen, (path, seen)


def test_a_fleet_request_without_a_node_signature_is_still_refused(scoped_app):
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.protobuf.translation import PROTOBUF_MEDIA_TYPE

    app, calls = scoped_app
    body = PullMessagesRequest(node=Node(node_id=5)).SerializeToString()
    reply = _client(app, "10.1.2.3").post(
        "/v1/fleet/pull-messages", content=body, headers={"content-type": PROTOBUF_MEDIA_TYPE}
    )
    assert reply.status_code == 401
    assert reply.json()["detail"] == "Invalid SuperNode authentication"
    assert ("NodeAuthMiddleware", "/v1/fleet/pull-messages") in calls
