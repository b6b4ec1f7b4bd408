"""The HTTP API of a served model (FastAPI): health, model summary, predictions, Prometheus metrics.

- ``GET /healthz`` → ``{"status": "ok", "model": "NAME:VERSION", "alias": ...}``
- ``GET /v1/model`` → the manifest summary, privacy summary and how the model was verified
- ``POST /v1/predict {"instances": [...]}`` → ``{"predictions": [label, ...], "class_indices",
  "probabilities", "model"}``; an instance that does not fit the input schema → 422 naming it
- ``GET /metrics`` → Prometheus text: requests by path and status, latency histograms
- ``GET /docs``, ``GET /openapi.json`` → FastAPI's usual OpenAPI schema and UI
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field

from server.serving.inputs import InputError
from server.serving.verify import ServedModel

MAX_INSTANCES = 4096
KNOWN_PATHS = ("/healthz", "/v1/model", "/v1/predict", "/metrics", "/docs", "/openapi.json")
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


def create_app(served: ServedModel) -> FastAPI:
    """The FastAPI app serving ``served`` (already verified and loaded)."""
    record = served.record
    metrics = ServingMetrics(served)
    app = FastAPI(
        title=f"fedgov: {record.name}@{served.alias}",
        version=str(record.version),
        description=(
            f"Predictions of {record.ref} (alias '{served.alias}'), verified at start: manifest "
            f"signature, artifact hashes, approvals under the policy, audit chain. Input: "
            f"{served.spec.describe()['instance']}."
        ),
    )
    classes = served.classes
    summary = served.summary()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the model is loaded and verified."""
        return {"status": "ok", "model": record.ref, "alias": served.alias}

    @app.get("/v1/model")
    def model_info() -> dict[str, Any]:
        """The manifest summary, the privacy summary and how the model was verified at start."""
        return summary

    @app.post("/v1/predict", response_model=PredictResponse)
    def predict(request: PredictRequest) -> PredictResponse:
        """Class labels and probabilities for each instance."""
        try:
            batch = served.spec.prepare(request.instances)
        except InputError as error:
            metrics.rejected.inc()
            raise HTTPException(status_code=422, detail=str(error)) from None
        logits = np.asarray(served.predictor(batch), dtype=np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        indices = logits.argmax(axis=1)
        metrics.instances.inc(len(indices))
        return PredictResponse(
            predictions=[classes[i] for i in indices],
            class_indices=indices.tolist(),
            probabilities=probabilities.tolist(),
            model=record.ref,
        )

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        """Prometheus exposition format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app
