"""FastAPI dependencies: the app's services, a DB session, and the caller's organization."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from loraforge.catalog import Catalog
from loraforge.contracts.dispatch import Dispatcher
from loraforge.db.models import Organization
from loraforge.db.session import session_scope
from loraforge.engines import EngineFleet
from loraforge.errors import AuthenticationError
from loraforge.orgs import authenticate
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
    # Base model id -> (a pool can train it, an engine serves it), filled on first listing.
    base_model_capabilities: dict[str, tuple[bool, bool]] = field(default_factory=dict)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    """One session per request, committed when the route returns without error."""
    with session_scope(services.sessions) as session:
        yield session


# scope="function": commit before the response is sent, so a client never reads before our write
# lands, and a failed commit is an error response rather than a lost write.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_org(request: Request, services: ServicesDep) -> Organization:
    """The organization of the bearer key; 401 in OpenAI's envelope otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationError(
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    with services.sessions() as session:
        org = authenticate(session, key.strip())
    if org is None:
        raise AuthenticationError(f"Incorrect API key provided: {key[:6]}****{key[-4:]}.")
    return org


OrgDep = Annotated[Organization, Depends(get_org)]
