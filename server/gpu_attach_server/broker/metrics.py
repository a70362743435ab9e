"""Prometheus ``/metrics``: grants, refusals by reason, the queue, waits, lease durations, and
each GPU's allocated share, leases and running cells.

Authenticated: the admin token, or a scrape-only token (``GPU_ATTACH_METRICS_TOKEN``) that can
read the metrics and nothing else. Each app has its own registry, so two brokers in one process
(the tests) do not share counters.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .core import Broker, BrokerEvents

_WAIT_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)


class PrometheusEvents(BrokerEvents):
    """The broker's events as Prometheus counters and histograms."""

    def __init__(self, registry: CollectorRegistry):
        self.grants = Counter("gpu_attach_grants", "leases granted", registry=registry)
        self.refusals = Counter("gpu_attach_refusals", "requests refused or dropped from the queue, by reason",
                                ["reason"], registry=registry)
        self.wait = Histogram("gpu_attach_queue_wait_seconds", "time from request to grant (0 when granted at once)",
                              buckets=_WAIT_BUCKETS, registry=registry)
        self.held = Histogram("gpu_attach_lease_duration_seconds", "time from grant to end, by how it ended",
                              ["state"], buckets=_HOLD_BUCKETS, registry=registry)

    def granted(self, waited_s: float) -> None:
        self.grants.inc()
        self.wait.observe(waited_s)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def ended(self, state: str, held_s: float) -> None:
        self.held.labels(state).observe(held_s)


class PoolCollector:
    """Read at scrape time: the queue's length and each GPU's allocated share (no per-grant cost)."""

    def __init__(self, broker: Broker):
        self.broker = broker

    def collect(self):
        queue = GaugeMetricFamily("gpu_attach_queue_length", "requests waiting in the queue")
        queue.add_metric([], len(self.broker.queue_view()["entries"]))
        yield queue
        share = GaugeMetricFamily("gpu_attach_gpu_allocated_share", "share of the GPU's memory held by leases",
                                  labels=["gpu", "pool", "agent"])
        leases = GaugeMetricFamily("gpu_attach_gpu_leases", "granted leases on the GPU", labels=["gpu", "pool", "agent"])
        running = GaugeMetricFamily("gpu_attach_gpu_running_cells",
                                    "leases on the GPU whose cell was running at the agent's last heartbeat "
                                    "(held but idle = leases - running)", labels=["gpu", "pool", "agent"])
        for g in self.broker.pool()["gpus"]:
            labels = [g["id"], g["pool"], g["agent"]]
            share.add_metric(labels, g["used_share"])
            leases.add_metric(labels, len(g["leases"]))
            ran = self.broker.running.get(g["agent"], frozenset())
            running.add_metric(labels, sum(lid in ran for lid in g["leases"]))
        yield share
        yield leases
        yield running


def metrics_route(app: FastAPI, broker: Broker, who, metrics_token: str | None) -> None:
    """Add ``GET /metrics`` to ``app`` and route the broker's events into its registry."""
    registry = CollectorRegistry()
    broker.events = PrometheusEvents(registry)
    registry.register(PoolCollector(broker))
    expected = f"Bearer {metrics_token}".encode() if metrics_token else None

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        401: {"description": "missing or unknown bearer token"},
        403: {"description": "needs the admin token or the metrics token"}})
    async def metrics(request: Request):
        presented = request.headers.get("authorization", "").encode()
        if not (expected and hmac.compare_digest(presented, expected)):
            if who(request).role != "admin":
                raise HTTPException(403, "/metrics needs the admin token or the metrics token (GPU_ATTACH_METRICS_TOKEN)")
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
