"""Prometheus metrics of the server, in their own registry (several servers can share a process, as in tests),
served over plain HTTP by prometheus_client's `start_http_server`.

Exposed: calls by method, final status code and model (those refused before their handler ran too), calls
refused for a missing or wrong token, queue depth, running requests, per-phase latency histograms (queue wait,
text, encode, invert, sample, decode, output encoding, total) and latency per frame; and for the tuning service,
tune jobs by state (the queue length is the `queued` count) and the tuning and export seconds of finished jobs;
errors of the background loops (the repository rescan, the tune jobs' sweep), which log, count and go on.
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600, 1800)
TUNE_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
FRAME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tav_requests", "Calls by method, final status code and model ('-': none or unknown)",
                                ["method", "code", "model"], registry=self.registry)
        self.auth_failures = Counter("tav_auth_failures", "Calls refused for a missing or wrong bearer token",
                                     registry=self.registry)
        self.queue_depth = Gauge("tav_queue_depth", "Requests waiting in the queue", registry=self.registry)
        self.running = Gauge("tav_running_requests", "Requests started and not yet answered (the worker runs one at "
                             "a time; encoding and sending a result overlap the next)", registry=self.registry)
        self.phase_seconds = Histogram("tav_phase_seconds", "Seconds per phase of successful generations",
                                       ["model", "phase"], buckets=PHASE_BUCKETS, registry=self.registry)
        self.frame_seconds = Histogram("tav_seconds_per_frame",
                                       "Generation seconds (text encoding to output encoding) per frame",
                                       ["model"], buckets=FRAME_BUCKETS, registry=self.registry)
        self.tune_jobs = Gauge("tav_tune_jobs", "Tune jobs in the registry by state (every replica reads the same "
                               "registry: aggregate with max, not sum)", ["state"], registry=self.registry)
        self.tune_seconds = Histogram("tav_tune_seconds", "Seconds of the tuning and export stages of jobs that "
                                      "published a model (each job observed once, by one replica)", ["stage"],
                                      buckets=TUNE_BUCKETS, registry=self.registry)
        self.background_errors = Counter("tav_background_errors", "Rounds of a background loop that failed (logged; "
                                         "the loop goes on)", ["loop"], registry=self.registry)
        self._http = None

    def count(self, method: str, code: grpc.StatusCode, model: str = "-") -> None:
        self.requests.labels(method, code.name, model).inc()

    def observe_result(self, model: str, timings: dict[str, float], frames: int) -> None:
        for phase, seconds in timings.items():
            self.phase_seconds.labels(model, phase).observe(seconds)
        self.frame_seconds.labels(model).observe((timings["total"] + timings.get("output", 0.0)) / frames)

    def serve(self, port: int, host: str) -> int:
        """Serve /metrics over HTTP on `host:port` (0: any free port); returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
