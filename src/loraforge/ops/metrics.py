"""Prometheus metrics of the API, the engine and the worker (``prometheus-client``).

Every process is its own scrape target, as Prometheus expects:

* **API** ``GET /metrics``: request latency by route template (``/v1/files/{file_id}``, never
  the raw path), plus what the database says at scrape time: jobs by status, queue depth per
  pool (queued jobs planned onto it), live workers per pool, webhook deliveries by status. The
  database numbers are the same whichever API process answers. The request metrics are
  multi-process correct: ``loraforge api`` runs with ``PROMETHEUS_MULTIPROC_DIR`` set (a fresh
  directory of its own unless the operator sets one), so with several uvicorn workers each
  writes its own files and any of them serves the sum (prometheus-client's multiprocess mode).
* **Engine** ``GET /metrics``: request latency by route, adapter loads, evictions and load
  latency, adapters loaded now. One process.
* **Worker**: a small HTTP server in each worker process on ``LORAFORGE_WORKER_METRICS_PORT``
  (0, the default: off) serving ``/metrics`` (job duration by final status, trained tokens per
  second of each running job, webhook delivery failures, jobs running) and ``/healthz``. A
  worker is one process (a Celery threads pool), so no multiprocess mode: its per-job gauge is
  removed when the job's run ends, which multiprocess mode cannot do.

Metric objects live in per-process registries built on first use (no import-time registration
in the global registry), so tests build as many apps as they like. The API's part, which reads the
database, is ``ops/api_metrics.py`` (the engine imports no database code).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import lru_cache
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loraforge.settings import Settings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds: HTTP requests (a chat completion can take a minute), adapter loads, whole jobs.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB_BUCKETS = (10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 259200)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def multiprocess() -> bool:
    """Whether this process writes its metrics to ``PROMETHEUS_MULTIPROC_DIR`` files."""
    return bool(os.environ.get(MULTIPROC_ENV))


def request_histogram(registry: CollectorRegistry) -> Histogram:
    """``loraforge_http_request_duration_seconds{method, route, status}``."""
    return Histogram(
        "loraforge_http_request_duration_seconds",
        "HTTP request latency until the response is complete (streams included), by route template",
        ["method", "route", "status"],
        buckets=REQUEST_BUCKETS,
        registry=registry,
    )


class RequestTimer:
    """ASGI middleware: times every HTTP request and labels it with its route's template.

    A pure ASGI middleware (not ``BaseHTTPMiddleware``), so a streamed response is timed to its
    last chunk and nothing is buffered. The template comes from the route the router matched
    (``scope["route"]``); a request no route matched is ``unmatched``, so random paths cannot
    blow up the label set.
    """

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def remember_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, remember_status)
        finally:
            self.histogram.labels(scope.get("method", ""), route_template(scope), str(status)).observe(
                time.perf_counter() - started
            )


def route_template(scope: Scope) -> str:
    """The template of the route that served ``scope`` (``/v1/files/{file_id}``), or ``unmatched``.

    The router leaves the route it chose in ``scope["route"]``; a route of an included router
    knows only its own part of the path, so the prefix in front of it is what the full path has
    before the part that route's pattern matches.
    """
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if route is None or template is None:
        return "unmatched"
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    path = path.removeprefix(root) if root and path.startswith(root) else path
    pattern = getattr(route, "path_regex", None)
    if pattern is None or pattern.match(path):
        return str(template)
    for cut in (i for i, char in enumerate(path) if char == "/" and i > 0):
        if pattern.match(path[cut:]):
            return path[:cut] + str(template)
    return str(template)


class EngineMetrics:
    """The engine's metrics (module docstring); the engine calls the ``adapter_*`` hooks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = request_histogram(self.registry)
        self.loads = Counter("loraforge_engine_adapter_loads", "Adapters loaded", registry=self.registry)
        self.evictions = Counter(
            "loraforge_engine_adapter_evictions",
            "Adapters evicted to make room (LRU)",
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "loraforge_engine_adapter_load_seconds",
            "Time to load one adapter (read, check, attach)",
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.loaded = Gauge("loraforge_engine_adapters_loaded", "Adapters loaded now", registry=self.registry)

    def adapter_loaded(self, seconds: float) -> None:
        """One adapter was loaded in ``seconds``."""
        self.loads.inc()
        self.load_seconds.observe(seconds)

    def adapter_evicted(self) -> None:
        """One adapter was evicted to make room for another."""
        self.evictions.inc()

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


class WorkerMetrics:
    """One worker process's metrics (module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.job_seconds = Histogram(
            "loraforge_job_duration_seconds",
            "Jobs from their first start to their final state, by that state (jobs this worker finished)",
            ["status"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.tokens_per_second = Gauge(
            "loraforge_job_trained_tokens_per_second",
            "Trained (assistant) tokens per second of each job running on this worker",
            ["job_id"],
            registry=self.registry,
        )
        self.running = Gauge(
            "loraforge_jobs_running", "Jobs training on this worker now", registry=self.registry
        )
        self.webhook_failures = Counter(
            "loraforge_webhook_delivery_failures",
            "Webhook delivery attempts that failed (final: no retry is left)",
            ["final"],
            registry=self.registry,
        )

    def job_ended(self, status: str, seconds: float) -> None:
        """A job this worker ran reached ``status`` after ``seconds`` since its first start."""
        self.job_seconds.labels(status).observe(max(seconds, 0.0))

    def throughput(self, job_id: str, tokens_per_second: float | None) -> None:
        """Set (or, with None, remove) the running job's trained tokens per second."""
        if tokens_per_second is None:
            try:
                self.tokens_per_second.remove(job_id)
            except KeyError:
                pass
        else:
            self.tokens_per_second.labels(job_id).set(tokens_per_second)

    def webhook_failed(self, final: bool) -> None:
        """A delivery attempt failed (``final``: the delivery gave up)."""
        self.webhook_failures.labels("true" if final else "false").inc()

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


@lru_cache
def worker_metrics() -> WorkerMetrics:
    """This worker process's metrics, built on first use (like ``get_settings``)."""
    return WorkerMetrics()


def serve_worker_metrics(settings: Settings, metrics: WorkerMetrics) -> WSGIServer | None:
    """Serve ``/metrics`` and ``/healthz`` on ``worker_metrics_port`` in a daemon thread (0: off).

    Returns:
        The server (``shutdown()`` stops it), or None when the port is 0.
    """
    if not settings.worker_metrics_port:
        return None
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"status": "ok"}']
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics or /healthz\n"]
        start_response("200 OK", [("Content-Type", CONTENT_TYPE)])
        return [metrics.render()]

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
            pass  # one line per scrape would drown the worker's log

    server = make_server(settings.worker_metrics_host, settings.worker_metrics_port, app, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name="loraforge-metrics", daemon=True).start()
    return server
