"""The counters behind the API's limits: requests per window per organization, failed
authentications per client address (both with the ``limits`` library's moving window), and
concurrent requests per organization (a counting semaphore).

Where they live (:func:`storage_url`): in Redis when the broker is Redis or
``LORAFORGE_RATE_LIMIT_STORAGE_URL`` names one, so every API process (``--workers N``, or API
processes on several machines) counts against the same numbers; in this process's memory
otherwise, which is only right for a single API process (``loraforge api`` refuses more).

The concurrency semaphore is ours: ``limits`` counts events in windows, not requests in flight,
and redis-py offers a lock but no counting semaphore. In Redis it is a sorted set per
organization (member: a request's token, score: when its slot expires), acquired and released
by one Lua script each, so a process that dies holding slots loses them after
``concurrency_slot_seconds`` instead of forever.

If Redis cannot be reached the request is let through (logged): a limit that fails closed would
make a Redis hiccup an outage of the whole API.

An address found not locked out is not asked about again for ``_CLEAR_SECONDS``: the question cost
a Redis round trip on every request (12% of the API's CPU at 100 rps, profiled with py-spy). A
failure counted by this process forgets the address at once, so within one process the lock-out
is exact; one counted by another API process takes effect here within ``_CLEAR_SECONDS``.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from loraforge.settings import Settings

log = logging.getLogger(__name__)

_REDIS_SCHEMES = ("redis://", "rediss://", "redis+unix://")
_SLOTS_PREFIX = "loraforge:inflight:"
# How long an address found not locked out is taken to stay so (see the module docstring), and
# how many such addresses are remembered (the memo starts over past it).
_CLEAR_SECONDS = 1.0
_MAX_CLEAR = 10_000


def storage_url(settings: Settings) -> str:
    """Where the counters live: the setting, else the Redis broker, else ``memory://``."""
    if settings.rate_limit_storage_url:
        return settings.rate_limit_storage_url
    if settings.broker_url.startswith(_REDIS_SCHEMES):
        return settings.broker_url
    return "memory://"


def shared_across_processes(settings: Settings) -> bool:
    """Whether every API process sees the same counters (not this process's memory)."""
    return not settings.rate_limits or not storage_url(settings).startswith(("memory://", "async+memory://"))


def duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format: ``120ms``, ``8.64s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest}s"


@dataclass(frozen=True)
class Decision:
    """One request counted against a window: allowed or not, and the window's state after it."""

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float

    def headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*-requests`` headers."""
        return [
            (b"x-ratelimit-limit-requests", str(self.limit).encode()),
            (b"x-ratelimit-remaining-requests", str(self.remaining).encode()),
            (b"x-ratelimit-reset-requests", duration(self.reset_seconds).encode()),
        ]

    @property
    def retry_after(self) -> int:
        """Whole seconds until a request would be counted again (at least 1)."""
        return max(1, math.ceil(self.reset_seconds))


_last_warning = [0.0]


def _unavailable(what: str, exc: BaseException) -> None:
    """Log that the counters could not be reached (at most every 10 s: it may be every request)."""
    if time.monotonic() - _last_warning[0] > 10:
        _last_warning[0] = time.monotonic()
        log.warning("rate-limit counters unavailable (%s: %s); letting requests through", what, exc)


# A slot that could not be taken because the counters were unreachable: nothing to give back.
UNHELD = ""


class Slots(Protocol):
    """A counting semaphore per key."""

    async def acquire(self, key: str, limit: int) -> str | None:
        """A token if fewer than ``limit`` are held for ``key``, else None."""

    async def release(self, key: str, token: str) -> None:
        """Give back the slot ``token`` holds."""


class MemorySlots:
    """In-flight requests per key in this process (one event loop: no lock needed)."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    async def acquire(self, key: str, limit: int) -> str | None:
        held = self._held.get(key, 0)
        if held >= limit:
            return None
        self._held[key] = held + 1
        return key

    async def release(self, key: str, token: str) -> None:
        held = self._held.get(key, 0) - 1
        if held > 0:
            self._held[key] = held
        else:
            self._held.pop(key, None)


# KEYS[1]: the org's sorted set; ARGV: now, expiry, limit, token. Drops lapsed slots first.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  redis.call('EXPIRE', KEYS[1], math.ceil(ARGV[2] - ARGV[1]) + 1)
  return 1
end
return 0
"""


class RedisSlots:
    """In-flight requests per key in Redis, shared by every API process; slots expire."""

    def __init__(self, url: str, slot_seconds: float) -> None:
        import redis.asyncio

        self._redis: Any = redis.asyncio.Redis.from_url(url.removeprefix("async+"))
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._slot_seconds = slot_seconds

    async def acquire(self, key: str, limit: int) -> str | None:
        token = uuid.uuid4().hex
        stamp = time.time()
        try:
            got = await self._acquire(
                keys=[_SLOTS_PREFIX + key], args=[stamp, stamp + self._slot_seconds, limit, token]
            )
        except Exception as exc:  # Redis down: let the request through (module docstring)
            _unavailable("concurrency", exc)
            return UNHELD
        return token if got else None

    async def release(self, key: str, token: str) -> None:
        if token == UNHELD:
            return
        try:
            await self._redis.zrem(_SLOTS_PREFIX + key, token)
        except Exception as exc:  # the slot expires after slot_seconds anyway
            _unavailable("concurrency", exc)

    async def aclose(self) -> None:
        await self._redis.aclose()


class Throttle:
    """The API's counters (see the module docstring).

    Args:
        url: a ``limits`` storage URL (``memory://``, ``redis://host:6379/0``).
        window_seconds: the window requests per minute are counted over.
        auth_failures_per_minute: failed authentications per address before a lock-out (0: none).
        slot_seconds: how long a Redis concurrency slot outlives a process that died holding it.
    """

    def __init__(self, url: str, window_seconds: int, auth_failures_per_minute: int, slot_seconds: float):
        async_url = url if url.startswith("async+") else "async+" + url
        options = {"implementation": "redispy"} if "redis" in async_url.split("://", 1)[0] else {}
        self._limiter = MovingWindowRateLimiter(storage_from_string(async_url, **options))
        self._window = window_seconds
        self._auth = RateLimitItemPerMinute(auth_failures_per_minute) if auth_failures_per_minute else None
        # address -> monotonic time until which it is taken as not locked out
        self._clear: dict[str, float] = {}
        self.slots: Slots = (
            RedisSlots(async_url, slot_seconds) if async_url.startswith("async+redis") else MemorySlots()
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Throttle | None:
        """The settings' throttle, or None when ``rate_limits`` is off."""
        if not settings.rate_limits:
            return None
        return cls(
            storage_url(settings),
            settings.rate_limit_window_seconds,
            settings.auth_failures_per_minute,
            settings.concurrency_slot_seconds,
        )

    def _item(self, requests_per_minute: int) -> RateLimitItem:
        per_window = math.ceil(requests_per_minute * self._window / 60)
        return RateLimitItemPerSecond(per_window, self._window)

    async def hit_requests(self, org_id: str, requests_per_minute: int) -> Decision | None:
        """Count one request of ``org_id`` against its limit (None: the counters are unreachable)."""
        item = self._item(requests_per_minute)
        try:
            allowed = await self._limiter.hit(item, "requests", org_id)
            stats = await self._limiter.get_window_stats(item, "requests", org_id)
        except Exception as exc:
            _unavailable("requests", exc)
            return None
        reset = max(0.0, stats.reset_time - time.time())
        return Decision(allowed, item.amount, max(0, stats.remaining), reset)

    async def auth_lockout(self, address: str) -> float | None:
        """Seconds until ``address`` may try a key again, or None if it may now."""
        if self._auth is None:
            return None
        clock = time.monotonic()
        if self._clear.get(address, 0.0) > clock:
            return None
        try:
            if await self._limiter.test(self._auth, "auth-failures", address):
                if len(self._clear) >= _MAX_CLEAR:
                    self._clear.clear()
                self._clear[address] = clock + _CLEAR_SECONDS
                return None
            stats = await self._limiter.get_window_stats(self._auth, "auth-failures", address)
        except Exception as exc:
            _unavailable("authentication", exc)
            return None
        return max(1.0, stats.reset_time - time.time())

    async def auth_failed(self, address: str) -> None:
        """Count a request from ``address`` whose key was unknown."""
        if self._auth is None:
            return
        self._clear.pop(address, None)
        try:
            await self._limiter.hit(self._auth, "auth-failures", address)
        except Exception as exc:
            _unavailable("authentication", exc)

    @property
    def auth_failures_per_minute(self) -> int:
        return self._auth.amount if self._auth is not None else 0

    async def aclose(self) -> None:
        """Close the Redis connections, if any."""
        if isinstance(self.slots, RedisSlots):
            await self.slots.aclose()
