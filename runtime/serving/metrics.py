"""The service's Prometheus metrics (``/metrics``), one registry per application."""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from starlette.responses import Response


class Metrics:
    def __init__(self, max_batch: int):
        disable_created_metrics()  # *_created series only clutter a scrape
        self.registry = r = CollectorRegistry()
        self.requests = Counter("clipinspect_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("clipinspect_errors", "Requests answered with an error, by code",
                              ["code"], registry=r)
        self.latency = Histogram("clipinspect_request_seconds", "Request latency (server side)",
                                 ["endpoint"], registry=r,
                                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64))
        self.inference = Histogram("clipinspect_batch_inference_seconds",
                                   "Inference time of one batch", registry=r,
                                   buckets=(.01, .025, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32))
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})
        self.batch_size = Histogram("clipinspect_batch_size", "Images per inference batch",
                                    registry=r, buckets=[b for b in buckets if b <= max_batch])
        self.queue_depth = Gauge("clipinspect_queue_depth", "Requests waiting for the worker",
                                 registry=r)
        self.rejected = Counter("clipinspect_queue_rejections",
                                "Requests refused because the queue was full", registry=r)
        self.connections_closed = Counter(
            "clipinspect_connections_closed", "Connections closed or refused by the server's "
            "connection limits, by reason", ["reason"], registry=r)

    def watch_shadow(self, shadow) -> None:
        """Gauges of the shadow bundle's agreement with the active one (.shadow.Shadow), read
        at each scrape; NaN until there is something to compare."""
        def read(key: str):
            return lambda: float("nan") if (v := shadow.state()[key]) is None else float(v)
        for key, text in (("verdict_agreement", "Share of parts where the shadow bundle's "
                           "verdict equals the served one"),
                          ("score_correlation", "Pearson correlation of shadow and served "
                           "image scores"),
                          ("scored", "Parts the shadow bundle scored"),
                          ("dropped", "Parts not offered to the shadow bundle (its backlog "
                           "was full)")):
            Gauge(f"clipinspect_shadow_{key}", text, registry=self.registry).set_function(
                read(key))

    def exposition(self) -> Response:
        """The scrape: every series in Prometheus' text format."""
        return Response(generate_latest(self.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})
