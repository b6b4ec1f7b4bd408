"""The HTTP API of a served model (FastAPI): health, model summary, predictions, Prometheus metrics.

- ``GET /healthz`` → ``{"status": "ok", "model": "NAME:VERSION", "alias": ...}``; 503 with
  ``"status": "withdrawn"`` and the reason once re-verification failed
- ``GET /v1/model`` → the manifest summary, privacy summary and how the model was verified
- ``POST /v1/predict {"instances": [...]}`` → ``{"predictions": [label, ...], "class_indices",
  "probabilities", "model"}``; an instance that does not fit the input schema, or whose values
  overflow after normalisation, → 422 naming it (never echoing the input); a body over the
  size limit → 413
- ``GET /metrics`` → Prometheus text: requests by path and status, latency histograms
- ``GET /docs``, ``GET /openapi.json`` → FastAPI's usual OpenAPI schema and UI

With bearer tokens (:class:`TokenAuth`), ``/v1/*``, ``/metrics`` and the docs are three scopes
that a token may or may not cover; ``/healthz`` is always open. The request body is read with a
size limit, then parsed, checked, predicted and encoded in a worker thread: the event loop only
moves bytes, so a large or slow request never stalls ``/healthz``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field

from fedgov.errors import FedgovError
from server.serving.inputs import InputError, bounded
from server.serving.verify import ServedModel

MAX_INSTANCES = 4096
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
KNOWN_PATHS = ("/healthz", "/v1/model", "/v1/predict", "/metrics", "/docs", "/openapi.json")
SCOPES = ("api", "metrics", "docs")
MIN_TOKEN_LENGTH = 16
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class PredictRequest(BaseModel):
    """Instances to predict: tabular rows (a list in feature order, or an object by feature name)
    of raw values, or images (pixels in [0, 1]); see ``GET /v1/model`` for this model's format."""

    model_config = ConfigDict(extra="forbid")
    instances: list[Any] = Field(min_length=1, max_length=MAX_INSTANCES)


class PredictResponse(BaseModel):
    predictions: list[str] = Field(description="the predicted class label of each instance")
    class_indices: list[int] = Field(description="the predicted class index of each instance")
    probabilities: list[list[float]] = Field(description="class probabilities, in class order")
    model: str = Field(description="NAME:VERSION that answered")


class ServingMetrics:
    """The Prometheus series of one app (its own registry, so apps in one process stay apart)."""

    def __init__(self, served: ServedModel) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fedgov_http_requests",
            "HTTP requests by path, method and status code",
            ["path", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fedgov_http_request_duration_seconds",
            "HTTP request latency in seconds, by path",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.instances = Counter(
            "fedgov_predict_instances", "Instances predicted", registry=self.registry
        )
        self.rejected = Counter(
            "fedgov_predict_rejected",
            "Predict requests refused for invalid input (422)",
            registry=self.registry,
        )
        info = Gauge(
            "fedgov_model_info",
            "The served model version (value 1)",
            ["name", "version", "alias", "manifest_sha256"],
            registry=self.registry,
        )
        info.labels(
            served.record.name,
            str(served.record.version),
            served.alias,
            served.record.manifest_sha256,
        ).set(1)


class _MetricsMiddleware:
    """Counts every request and times it (pure ASGI: no per-request task as BaseHTTPMiddleware)."""

    def __init__(self, app: Any, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_with_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.metrics.requests.labels(path, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


@dataclass
class TokenAuth:
    """Bearer tokens and the scopes each covers; ``public`` scopes need no token."""

    tokens: dict[str, frozenset[str]] = field(default_factory=dict)  # sha256(token) → scopes
    public: frozenset[str] = frozenset(SCOPES)

    def decide(self, scope: str, authorization: bytes | None) -> int:
        """200 when the request may proceed, 401 without a valid token, 403 when its token does
        not cover ``scope``."""
        if scope in self.public:
            return 200
        if not authorization or not authorization.startswith(b"Bearer "):
            return 401
        digest = hashlib.sha256(authorization[7:].strip()).hexdigest()
        granted = None
        for known, scopes in self.tokens.items():
            if hmac.compare_digest(known, digest):
                granted = scopes
        if granted is None:
            return 401
        return 200 if scope in granted else 403


def load_tokens(path: str | Path, public: str = "") -> TokenAuth:
    """Read ``--token-file``: lines ``SCOPES TOKEN`` (SCOPES a comma list of api, metrics,
    docs); blank lines and ``#`` comments are skipped. A mistake is one line naming the line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise FedgovError(f"--token-file: {path} does not exist") from None
    except (OSError, UnicodeDecodeError):
        raise FedgovError(f"--token-file: {path} cannot be read as text") from None
    tokens: dict[str, frozenset[str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise FedgovError(f"--token-file: {path} line {number}: expected 'SCOPES TOKEN'")
        scopes = frozenset(parts[0].split(","))
        if not scopes <= set(SCOPES):
            raise FedgovError(
                f"--token-file: {path} line {number}: scopes are a comma list of "
                f"{', '.join(SCOPES)}"
            )
        if len(parts[1]) < MIN_TOKEN_LENGTH or not parts[1].isascii():
            raise FedgovError(
                f"--token-file: {path} line {number}: a token needs at least "
                f"{MIN_TOKEN_LENGTH} ASCII characters"
            )
        tokens[hashlib.sha256(parts[1].encode()).hexdigest()] = scopes
    if not tokens:
        raise FedgovError(f"--token-file: {path} holds no token")
    opened = frozenset(p for p in public.split(",") if p)
    if not opened <= set(SCOPES):
        raise FedgovError(f"--public: expected a comma list of {', '.join(SCOPES)}")
    return TokenAuth(tokens, opened)


def scope_of(path: str) -> str | None:
    """The token scope that covers ``path`` (None: open to everyone)."""
    if path == "/healthz":
        return None
    if path == "/metrics":
        return "metrics"
    if path in ("/openapi.json", "/redoc") or path.startswith("/docs"):
        return "docs"
    return "api"


class _AuthMiddleware:
    """Refuses a request its bearer token does not cover, before any of its body is read."""

    def __init__(self, app: Any, auth: TokenAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            needed = scope_of(scope["path"])
            if needed is not None:
                header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
                status = self.auth.decide(needed, header)
                if status != 200:
                    detail = (
                        "a bearer token is required (Authorization: Bearer TOKEN)"
                        if status == 401
                        else f"this token does not cover '{needed}'"
                    )
                    await _send_json(send, status, {"detail": detail}, status == 401)
                    return
        await self.app(scope, receive, send)


async def _send_json(send: Any, status: int, body: dict, challenge: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if challenge:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class BodyTooLarge(Exception):
    """The request body exceeds the limit."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (BodyTooLarge) as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (
        not (declared.isascii() and declared.isdigit()) or int(declared) > limit
    ):
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    served: ServedModel,
    auth: TokenAuth | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving ``served`` (already verified and loaded)."""
    record = served.record
    metrics = ServingMetrics(served)
    app = FastAPI(
        title=f"fedgov: {record.name}@{served.alias}",
        version=str(record.version),
        description=(
            f"Predictions of {record.ref} (alias '{served.alias}'), verified at start and "
            "re-verified periodically: manifest signature, artifact hashes, approvals under the "
            f"policy, audit chain. Input: {served.spec.describe()['instance']}."
        ),
    )
    classes = served.classes
    summary = served.summary()

    def withdrawn() -> Response | None:
        if served.withdrawn is None:
            return None
        return _json(503, {"detail": f"model withdrawn: {served.withdrawn}"})

    @app.get("/healthz")
    def healthz() -> Response:
        """Liveness and verification: 200 while the model verifies, 503 with the reason after
        a re-verification failed."""
        if served.withdrawn is not None:
            return _json(
                503,
                {
                    "status": "withdrawn",
                    "model": record.ref,
                    "alias": served.alias,
                    "reason": served.withdrawn,
                },
            )
        return _json(200, {"status": "ok", "model": record.ref, "alias": served.alias})

    @app.get("/v1/model")
    def model_info() -> Any:
        """The manifest summary, the privacy summary and how the model was verified at start."""
        return withdrawn() or summary

    def answer(body: bytes) -> bytes:
        """Parse, check, predict and encode (in a worker thread); InputError → 422."""
        instances = _instances(body)
        batch = served.spec.prepare(instances)
        logits = np.asarray(served.predictor(batch), dtype=np.float64)
        finite = np.isfinite(logits).all(axis=1)
        if not finite.all():
            raise InputError(
                f"instances[{int(np.flatnonzero(~finite)[0])}]: the model's output is not finite "
                "for these values (too large)"
            )
        shifted = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        indices = logits.argmax(axis=1)
        metrics.instances.inc(len(indices))
        return json.dumps(
            {
                "predictions": [classes[i] for i in indices],
                "class_indices": indices.tolist(),
                "probabilities": probabilities.tolist(),
                "model": record.ref,
            }
        ).encode()

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
        responses={413: {"description": "body too large"}, 422: {"description": "bad input"}},
    )
    async def predict(request: Request) -> Response:
        """Class labels and probabilities for each instance."""
        refused = withdrawn()
        if refused is not None:
            return refused
        try:
            body = await read_body(request, max_body_bytes)
        except BodyTooLarge:
            metrics.rejected.inc()
            return _json(413, {"detail": f"request body over {max_body_bytes} bytes"})
        try:
            payload = await run_in_threadpool(answer, body)
        except InputError as error:
            metrics.rejected.inc()
            return _json(422, {"detail": bounded(str(error))})
        return Response(payload, media_type="application/json")

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        """Prometheus exposition format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if auth is not None:
        app.add_middleware(_AuthMiddleware, auth=auth)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)  # outermost: counts refusals too
    return app


def _json(status: int, body: dict) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _instances(body: bytes) -> list[Any]:
    """The ``instances`` of a predict body; InputError (bounded, no input echoed) otherwise."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise InputError("body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:
        where = f" at byte {error.pos}" if isinstance(error, json.JSONDecodeError) else ""
        raise InputError(f"body: not valid JSON{where}") from None
    if not isinstance(data, dict) or set(data) != {"instances"}:
        raise InputError('body: expected an object with exactly one key, "instances"')
    instances = data["instances"]
    if not isinstance(instances, list) or not 1 <= len(instances) <= MAX_INSTANCES:
        raise InputError(f"instances: expected a list of 1 to {MAX_INSTANCES} instances")
    return instances
