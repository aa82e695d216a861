"""API keys to organizations, with a short per-process cache.

Every ``/v1`` request names its key; reading the key's organization from the database each time
cost a thread-pool hop and a query per request, most of them for the same few keys. A lookup is
reused for ``auth_cache_seconds`` (5 s by default): a revoked key, a new plan or a changed limit
takes effect in every API process within that time. Unknown keys are not cached (a key created
a moment ago must work at once); failed lookups are rate-limited per address instead
(``api/ratelimit.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from loraforge.db.models import Organization
from loraforge.orgs import authenticate, hash_key
from loraforge.plans import Limits, limits_for

# Bounds the memory a flood of distinct valid keys could take; the cache starts over past it.
_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Caller:
    """A key's organization (detached from any session: read it, do not change it) and limits."""

    org: Organization
    limits: Limits


class KeyCache:
    """Key -> :class:`Caller`, read from the database at most once per ``ttl`` seconds per key.

    Args:
        sessions: the API's session factory.
        ttl: seconds a lookup is reused (0: never).
    """

    def __init__(self, sessions: sessionmaker[Session], ttl: float) -> None:
        self._sessions = sessions
        self._ttl = ttl
        # sha256 of the key (never the key itself) -> (monotonic expiry, caller)
        self._entries: dict[str, tuple[float, Caller]] = {}

    def _load(self, key: str) -> Caller | None:
        with self._sessions() as session:
            org = authenticate(session, key)
            return None if org is None else Caller(org, limits_for(org))

    async def caller(self, key: str) -> Caller | None:
        """The organization ``key`` belongs to and its limits, or None for an unknown or revoked key."""
        digest = hash_key(key)
        clock = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None and entry[0] > clock:
            return entry[1]
        caller = await run_in_threadpool(self._load, key)
        if caller is None:
            self._entries.pop(digest, None)
        elif self._ttl > 0:
            if len(self._entries) >= _MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = (clock + self._ttl, caller)
        return caller
