"""FastAPI dependencies: the app's services, a DB session, and the caller's organization."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

from anyio import CapacityLimiter, to_thread
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from loraforge.api.auth import Caller, KeyCache
from loraforge.api.throttle import Throttle
from loraforge.catalog import Catalog
from loraforge.contracts.dispatch import Dispatcher
from loraforge.db.models import Organization
from loraforge.engines import EngineFleet
from loraforge.errors import AuthenticationError
from loraforge.settings import Settings
from loraforge.storage.blobs import BlobStore


@dataclass
class Services:
    """What the routes work with, built once in the app's lifespan."""

    settings: Settings
    sessions: sessionmaker[Session]
    catalog: Catalog
    blobs: BlobStore
    dispatcher: Dispatcher
    # The inference engines: chat is relayed to them, deleted models unloaded from them.
    engines: EngineFleet
    # API keys -> organizations (cached), and the plans' rate limits (None: turned off).
    keys: KeyCache
    throttle: Throttle | None
    # Threads for the request sessions' commits, apart from the routes' (see ``get_session``);
    # None: the shared thread pool.
    commit_threads: CapacityLimiter | None = None
    # Sessions for GET and HEAD requests (``db.session.make_read_sessionmaker``: autocommit on
    # PostgreSQL); None: ``sessions`` for every request.
    read_sessions: sessionmaker[Session] | None = None
    # Base model id -> (a pool can train it, an engine serves it), filled on first listing.
    base_model_capabilities: dict[str, tuple[bool, bool]] = field(default_factory=dict)


async def get_services(request: Request) -> Services:
    # async: a sync dependency costs a thread-pool hop per request for nothing.
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _finish(session: Session, failed: bool) -> None:
    try:
        if failed:
            session.rollback()
        else:
            session.commit()
    finally:
        session.close()


_READS = frozenset({"GET", "HEAD"})


async def get_session(request: Request, services: ServicesDep) -> AsyncIterator[Session]:
    """One session per request, committed when the route returns without error.

    A GET or HEAD on PostgreSQL reads in autocommit (``read_sessions``): there is no
    transaction to end, and closing the session only gives its connection back to the pool, so
    that happens here on the event loop, without a thread.

    Opening a session does no I/O (it connects on first use), so it is made on the event loop.
    The commit or rollback, which may, runs on threads of its own (``commit_threads``): queued
    behind the routes on the shared pool, under a burst every pool thread could be a route waiting
    for a database connection while the sessions holding the connections wait for a thread to
    commit and give them back (a deadlock until the connection pool's 30 s timeout).
    """
    if services.read_sessions is not None and request.method in _READS:
        session = services.read_sessions()
        try:
            yield session
        finally:
            session.close()
        return
    session = services.sessions()
    limiter = services.commit_threads
    try:
        yield session
    except BaseException:
        await to_thread.run_sync(_finish, session, True, limiter=limiter)
        raise
    await to_thread.run_sync(_finish, session, False, limiter=limiter)


# scope="function": commit before the response is sent, so a client never reads before our write
# lands, and a failed commit is an error response rather than a lost write.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

# Where ``RateLimitMiddleware`` leaves the caller it authenticated (request.state).
CALLER_STATE = "loraforge_caller"


def bearer_key(authorization: str) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header, or None."""
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


async def get_org(request: Request, services: ServicesDep) -> Organization:
    """The organization of the bearer key; 401 in OpenAI's envelope otherwise."""
    caller = getattr(request.state, CALLER_STATE, None)
    if isinstance(caller, Caller):  # the middleware looked the key up already
        return caller.org
    key = bearer_key(request.headers.get("authorization", ""))
    if key is None:
        raise AuthenticationError(
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    caller = await services.keys.caller(key)
    if caller is None:
        raise AuthenticationError(f"Incorrect API key provided: {key[:6]}****{key[-4:]}.")
    return caller.org


OrgDep = Annotated[Organization, Depends(get_org)]
