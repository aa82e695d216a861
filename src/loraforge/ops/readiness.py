"""The checks behind the API's ``/readyz``: can this deployment take and run work right now?

Each check has a name and says ``ok`` or ``error`` with a reason:

* ``database``: a ``SELECT 1``;
* ``broker``: a connection to the Celery broker (Redis: a ``PING``; the embedded filesystem
  broker: its queue folder is writable);
* ``object_store``: the blob store answers (:func:`storage_probe`);
* ``workers:<pool>``: at least one worker process serving the pool beat recently
  (``ops.presence``), for every configured train pool;
* ``engines:<base model>``: at least one engine of each served base model answers ``/health``
  (200 only once its model is loaded).

``/readyz`` is 200 only when every check is ok, else 503, with the list either way. Every probe
is bounded (:data:`PROBE_TIMEOUT_SECONDS`) and they run concurrently, so a dead dependency makes
``/readyz`` slow by one timeout, not by their sum. ``/healthz`` checks nothing but the process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.session import session_scope
from loraforge.engines import EngineFleet
from loraforge.engines.fleet import routes_from_settings
from loraforge.ops.presence import live_after, live_workers
from loraforge.planner.pools import resolve_pools
from loraforge.settings import Settings
from loraforge.storage.blobs import BlobStore

PROBE_TIMEOUT_SECONDS = 3.0


class Check(BaseModel):
    """One dependency: ok, or an error with the reason."""

    name: str
    status: Literal["ok", "error"]
    reason: str | None = None


class Readiness(BaseModel):
    """``GET /readyz``: ``ok`` when every check is."""

    status: Literal["ok", "unavailable"]
    checks: list[Check]


def storage_probe(settings: Settings) -> None:
    """Raise unless the blob store answers: its root can be listed.

    The one place that knows how to probe the store (object storage brings its own probe).
    """
    store = BlobStore(str(settings.blobs_dir))
    store.fs.ls(store.root, detail=False)


def broker_probe(settings: Settings) -> None:
    """Raise unless the Celery broker takes a connection."""
    if not settings.broker_url:  # the embedded filesystem broker (``queue/celery_app.py``)
        folder = settings.home / "broker" / "queue"
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise RuntimeError(f"the broker folder {folder} is missing or not writable")
        return
    from kombu import Connection

    with Connection(
        settings.broker_url,
        connect_timeout=PROBE_TIMEOUT_SECONDS,
        transport_options={"socket_timeout": PROBE_TIMEOUT_SECONDS},
    ) as conn:
        conn.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT_SECONDS)
        client = getattr(conn.default_channel, "client", None)
        if client is not None and hasattr(client, "ping"):
            client.ping()


def database_probe(sessions: sessionmaker[Session]) -> None:
    """Raise unless the database answers a query."""
    with session_scope(sessions) as session:
        session.execute(text("SELECT 1"))


def worker_checks(settings: Settings, sessions: sessionmaker[Session]) -> list[Check]:
    """One check per configured train pool: a live worker serves it."""
    pools = [pool.name for pool in resolve_pools(settings)]
    serving: dict[str, int] = dict.fromkeys(pools, 0)
    for worker in live_workers(settings, sessions):
        for pool in worker.pools:
            if pool in serving:
                serving[pool] += 1
    window = f"{live_after(settings):g} s"
    return [
        Check(name=f"workers:{pool}", status="ok")
        if count
        else Check(
            name=f"workers:{pool}", status="error", reason=f"no worker serving pool {pool} beat in {window}"
        )
        for pool, count in serving.items()
    ]


async def _probe(name: str, probe: Callable[[], None]) -> Check:
    try:
        await asyncio.wait_for(asyncio.to_thread(probe), PROBE_TIMEOUT_SECONDS)
    except TimeoutError:
        return Check(name=name, status="error", reason=f"no answer within {PROBE_TIMEOUT_SECONDS:g} s")
    except Exception as exc:  # noqa: BLE001 - any failure is this dependency's reason
        return Check(name=name, status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
    return Check(name=name, status="ok")


async def _engines(fleet: EngineFleet, base: str) -> Check:
    name, reasons = f"engines:{base}", []
    for url in fleet.urls(base):
        try:
            await asyncio.wait_for(fleet.client(url).health(), PROBE_TIMEOUT_SECONDS)
            return Check(name=name, status="ok")
        except TimeoutError:
            reasons.append(f"{url}: no answer within {PROBE_TIMEOUT_SECONDS:g} s")
        except Exception as exc:  # noqa: BLE001 - down, loading (503) or refusing
            reasons.append(f"{url}: {type(exc).__name__}: {exc}"[:300])
    return Check(name=name, status="error", reason="; ".join(reasons) or "no engine is configured")


async def _workers(settings: Settings, sessions: sessionmaker[Session]) -> list[Check]:
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(worker_checks, settings, sessions), PROBE_TIMEOUT_SECONDS
        )
    except Exception as exc:  # noqa: BLE001 - e.g. GPU detection failed: the pools are unknown
        return [Check(name="workers", status="error", reason=f"{type(exc).__name__}: {exc}"[:500])]


async def readiness(settings: Settings, sessions: sessionmaker[Session], fleet: EngineFleet) -> Readiness:
    """Run every check concurrently.

    Args:
        settings: the deployment's settings (pools, broker, store, engines).
        sessions: the database.
        fleet: the API's engine fleet (its clients probe the engines).

    Returns:
        The report; ``status`` is ``ok`` only when every check is.
    """
    singles = await asyncio.gather(
        _probe("database", lambda: database_probe(sessions)),
        _probe("broker", lambda: broker_probe(settings)),
        _probe("object_store", lambda: storage_probe(settings)),
        *(_engines(fleet, base) for base in routes_from_settings(settings)),
    )
    checks = [*singles[:3], *await _workers(settings, sessions), *singles[3:]]
    ok = all(check.status == "ok" for check in checks)
    return Readiness(status="ok" if ok else "unavailable", checks=checks)
