"""The API's ``/metrics``: its requests (multi-process) and gauges read from the database.

See ``ops/metrics.py`` for the whole picture.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import Job, WebhookDelivery
from loraforge.db.session import session_scope
from loraforge.ops.metrics import multiprocess, request_histogram
from loraforge.ops.presence import live_workers
from loraforge.planner.pools import resolve_pools
from loraforge.settings import Settings

JOB_STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")


class DatabaseCollector(Collector):
    """Gauges read from the database at scrape time (the same from every API process)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings, self.sessions = settings, sessions

    def collect(self) -> Iterable[Metric]:
        with session_scope(self.sessions) as session:
            by_status = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all()
            )
            plans = session.execute(select(Job.plan).where(Job.status == "queued")).scalars().all()
            deliveries = dict(
                session.execute(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status))
                .tuples()
                .all()
            )
        jobs = GaugeMetricFamily("loraforge_jobs", "Fine-tuning jobs by status", labels=["status"])
        for status in sorted({*JOB_STATUSES, *by_status}):
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs
        try:
            pools = [pool.name for pool in resolve_pools(self.settings)]
        except Exception:  # noqa: BLE001 - a failed GPU detection must not break the scrape
            pools = []
        depth: dict[str, int] = dict.fromkeys(pools, 0)
        for plan in plans:
            pool = str((plan or {}).get("pool") or "unplanned")
            depth[pool] = depth.get(pool, 0) + 1
        queue = GaugeMetricFamily(
            "loraforge_queue_depth",
            "Queued jobs waiting for a worker, by the pool they are planned onto",
            labels=["pool"],
        )
        for pool, count in sorted(depth.items()):
            queue.add_metric([pool], count)
        yield queue
        workers = GaugeMetricFamily(
            "loraforge_workers_live", "Live worker processes serving each pool", labels=["pool"]
        )
        live: dict[str, int] = dict.fromkeys(pools, 0)
        for worker in live_workers(self.settings, self.sessions):
            for pool in worker.pools:
                live[pool] = live.get(pool, 0) + 1
        for pool, count in sorted(live.items()):
            workers.add_metric([pool], count)
        yield workers
        hooks = GaugeMetricFamily(
            "loraforge_webhook_deliveries", "Webhook deliveries by status", labels=["status"]
        )
        for status, count in sorted(deliveries.items()):
            hooks.add_metric([status], count)
        yield hooks


class ApiMetrics:
    """The API process's metrics (``ops/metrics.py``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = request_histogram(self.registry)

    def render(self, settings: Settings, sessions: sessionmaker[Session]) -> bytes:
        """The exposition text: this API's requests (every process's, in multiprocess mode) and
        the database gauges."""
        if multiprocess():
            processes = CollectorRegistry()
            MultiProcessCollector(processes)
        else:
            processes = self.registry
        database = CollectorRegistry(auto_describe=False)
        database.register(DatabaseCollector(settings, sessions))
        return generate_latest(processes) + generate_latest(database)
