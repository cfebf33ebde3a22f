"""Prometheus metrics (prometheus-client): requests, latency, batch sizes, errors by kind, the model version.

One registry per app. With several worker processes (PROMETHEUS_MULTIPROC_DIR set by serve.py), each
process writes its samples to that folder and /metrics sums them, so any worker answers for all.
"""
from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

ENDPOINTS = ("/v1/predict", "/v1/explain", "/v1/model", "/admin/reload", "/healthz", "/readyz", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        disable_created_metrics()  # the *_created samples only double the scrape
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # In multiprocess mode samples go to files; the collector reads them at scrape time.
        self.registry = CollectorRegistry()
        reg = None if self.multiprocess else self.registry
        self.requests = Counter("brain_mri_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=reg)
        self.latency = Histogram("brain_mri_request_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=reg)
        self.batch_size = Histogram("brain_mri_batch_size", "Images per model call", buckets=BATCH_BUCKETS,
                                    registry=reg)
        self.inference = Histogram("brain_mri_inference_seconds", "Seconds per model call",
                                   buckets=LATENCY_BUCKETS, registry=reg)
        self.errors = Counter("brain_mri_errors", "Refused or failed requests by kind", ["kind"], registry=reg)
        self.predictions = Counter("brain_mri_predictions", "Images predicted, by class", ["predicted_class"],
                                   registry=reg)
        self.in_flight = Gauge("brain_mri_requests_in_flight", "Requests admitted and not yet answered",
                               registry=reg, multiprocess_mode="livesum")
        self.model_info = Gauge("brain_mri_model_info", "The model version being served (1)",
                                ["model", "version", "alias", "flavor"], registry=reg, multiprocess_mode="liveall")
        self.reloads = Counter("brain_mri_model_reloads", "Model versions swapped in", registry=reg)

    def endpoint(self, path: str) -> str:
        return path if path in ENDPOINTS else "other"  # bounded label values

    def set_model(self, identity: dict, previous: dict | None) -> None:
        if previous:
            self.model_info.remove(*(str(previous[k]) for k in ("model", "version", "alias", "flavor")))
        self.model_info.labels(*(str(identity[k]) for k in ("model", "version", "alias", "flavor"))).set(1)

    def exposition(self) -> tuple[bytes, str]:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts every HTTP answer (refusals by the guard included) by endpoint and status, with its latency."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = self.metrics.endpoint(scope["path"])
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
