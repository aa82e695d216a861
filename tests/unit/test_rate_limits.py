"""The plans' request limits on /v1: 429 in OpenAI's envelope with its rate-limit headers, the
openai SDK's retry honouring Retry-After, concurrent-request slots, the lock-out of an address
that guesses keys, and counters shared by API processes through Redis."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select

from loraforge.api.app import create_app
from loraforge.api.throttle import RedisSlots, Throttle, duration, shared_across_processes
from loraforge.db.models import Organization
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/7"


def _set_limits(settings: Settings, org_name: str, **limits: int | None) -> str:
    engine = make_engine(settings)
    with session_scope(make_sessionmaker(engine)) as session:
        org = session.execute(select(Organization).where(Organization.name == org_name)).scalar_one()
        for name, value in limits.items():
            setattr(org, name, value)
        org_id = org.id
    engine.dispose()
    return org_id


@pytest.fixture
def limited(settings: Settings, dispatcher) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    """The API with a 2-second window (RPM counted in 2 s slices) and 5 failed keys a minute."""
    settings = settings.model_copy(
        update={"rate_limit_window_seconds": 2, "auth_failures_per_minute": 5, "auth_cache_seconds": 0}
    )
    with TestClient(create_app(settings, dispatcher=dispatcher)) as client:
        yield client


def test_over_the_limit_is_a_429_in_the_envelope_with_openais_headers(limited, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key("rpm-org", tier="core")
    _set_limits(settings, "rpm-org", requests_per_minute=60)  # 2 per 2-second window
    auth = {"authorization": f"Bearer {key}"}
    first = limited.get("/v1/files", headers=auth)
    second = limited.get("/v1/models", headers=auth)
    third = limited.get("/v1/fine_tuning/jobs", headers=auth)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    assert third.status_code == 429
    error = third.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "60 per minute" in error["message"] and "rpm-org" in error["message"]
    assert 1 <= int(third.headers["retry-after"]) <= 2
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    time.sleep(float(third.headers["retry-after"]) + 0.1)
    assert limited.get("/v1/files", headers=auth).status_code == 200  # the window moved on


def test_the_sdk_waits_retry_after_and_succeeds_or_raises_without_retries(
    limited, make_key, settings
) -> None:  # type: ignore[no-untyped-def]
    key = make_key("sdk-rpm-org", tier="trial")
    _set_limits(settings, "sdk-rpm-org", requests_per_minute=30)  # 1 per 2-second window
    no_retry = OpenAI(base_url="http://testserver/v1", api_key=key, http_client=limited, max_retries=0)
    no_retry.models.list()
    with pytest.raises(openai.RateLimitError) as exc:
        no_retry.files.list()
    assert exc.value.status_code == 429 and exc.value.code == "rate_limit_exceeded"
    retrying = OpenAI(base_url="http://testserver/v1", api_key=key, http_client=limited, max_retries=3)
    started = time.monotonic()
    assert retrying.files.list().data == []  # 429, then the SDK sleeps Retry-After and tries again
    assert 0.5 < time.monotonic() - started < 10


def test_concurrent_requests_beyond_the_plan_are_refused(limited, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key("busy-org", tier="core")
    org_id = _set_limits(settings, "busy-org", max_concurrent_requests=2)
    slots = limited.app.state.services.throttle.slots  # type: ignore[attr-defined]
    # Two requests of the org in flight elsewhere (another connection, another API process).
    held = [asyncio.run(slots.acquire(org_id, 2)) for _ in range(2)]
    assert all(held)
    refused = limited.get("/v1/models", headers={"authorization": f"Bearer {key}"})
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "2 requests in progress" in refused.json()["error"]["message"]
    asyncio.run(slots.release(org_id, held[0]))
    assert limited.get("/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
    # The request gave its slot back when its response was done: one is still free.
    assert asyncio.run(slots.acquire(org_id, 2)) is not None


def test_an_address_guessing_keys_is_locked_out(limited, make_key) -> None:  # type: ignore[no-untyped-def]
    good = {"authorization": f"Bearer {make_key('guessed-org')}"}
    assert limited.get("/v1/models").status_code == 401  # no key at all: not a guess
    for i in range(5):
        assert limited.get("/v1/models", headers={"authorization": f"Bearer sk-wrong-{i}"}).status_code == 401
    locked = limited.get("/v1/models", headers={"authorization": "Bearer sk-wrong-again"})
    assert locked.status_code == 429
    assert locked.json()["error"]["code"] == "too_many_authentication_failures"
    assert 1 <= int(locked.headers["retry-after"]) <= 60
    # Every key is refused unread while the address is locked out: a guess cannot be confirmed.
    assert limited.get("/v1/models", headers=good).status_code == 429
    assert limited.get("/health").status_code == 200  # nothing outside /v1 is limited


def test_zero_requests_per_minute_suspends_an_org(limited, make_key, settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key("suspended-org")
    _set_limits(settings, "suspended-org", requests_per_minute=0)
    answer = limited.get("/v1/models", headers={"authorization": f"Bearer {key}"})
    assert answer.status_code == 429 and answer.headers["x-should-retry"] == "false"


def test_unlimited_plans_carry_no_request_headers_and_limits_can_be_turned_off(
    api, make_key, settings, dispatcher
) -> None:  # type: ignore[no-untyped-def]
    auth = {"authorization": f"Bearer {make_key('enterprise-org', tier='enterprise')}"}
    answer = api.get("/v1/models", headers=auth)
    assert answer.status_code == 200 and "x-ratelimit-limit-requests" not in answer.headers
    off = settings.model_copy(update={"rate_limits": False})
    trial = {"authorization": f"Bearer {make_key('trial-off-org', tier='trial')}"}
    _set_limits(settings, "trial-off-org", requests_per_minute=0)
    with TestClient(create_app(off, dispatcher=dispatcher)) as client:
        assert client.get("/v1/models", headers=trial).status_code == 200


def test_duration_format_and_where_counters_live(settings: Settings) -> None:
    assert [duration(s) for s in (0.12, 8.642, 59.5, 360)] == ["120ms", "8.64s", "59.5s", "6m0s"]
    assert not shared_across_processes(settings)  # memory: one API process only
    assert shared_across_processes(settings.model_copy(update={"broker_url": "redis://127.0.0.1:6379/0"}))
    assert shared_across_processes(settings.model_copy(update={"rate_limit_storage_url": REDIS_URL}))
    assert shared_across_processes(settings.model_copy(update={"rate_limits": False}))


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _redis_up(), reason="Redis is not running on 127.0.0.1:6379")
def test_redis_counters_and_slots_are_shared_by_api_processes() -> None:
    async def run() -> None:
        # Two throttles, as two API processes build them, on one Redis.
        first, second = (Throttle(REDIS_URL, 60, 3, slot_seconds=1.0) for _ in range(2))
        org = f"org-{uuid.uuid4().hex}"
        decisions = [await t.hit_requests(org, 3) for t in (first, second, first, second)]
        assert [d.allowed for d in decisions if d] == [True, True, True, False]
        assert decisions[3] is not None and decisions[3].retry_after >= 1
        address = f"10.0.0.{uuid.uuid4().int % 250}"
        for throttle in (first, second, first):
            await throttle.auth_failed(address)
        assert await second.auth_lockout(address) is not None
        assert isinstance(first.slots, RedisSlots)
        held = [await first.slots.acquire(org, 2), await second.slots.acquire(org, 2)]
        assert all(held) and await first.slots.acquire(org, 2) is None
        await second.slots.release(org, held[0] or "")
        assert await second.slots.acquire(org, 2) is not None
        await asyncio.sleep(1.2)  # a process that died holding slots loses them when they lapse
        assert await first.slots.acquire(org, 2) is not None
        for throttle in (first, second):
            await throttle.aclose()

    asyncio.run(run())


@pytest.mark.skipif(not _redis_up(), reason="Redis is not running on 127.0.0.1:6379")
def test_a_lockout_counted_by_another_process_takes_effect_within_a_second() -> None:
    async def run() -> None:
        here, there = (Throttle(REDIS_URL, 60, 2, slot_seconds=1.0) for _ in range(2))
        address = f"10.1.0.{uuid.uuid4().int % 250}"
        # Found not locked out: this process does not ask Redis again for a second.
        assert await here.auth_lockout(address) is None
        for _ in range(3):
            await there.auth_failed(address)
        assert await there.auth_lockout(address) is not None  # the counting process: at once
        assert await here.auth_lockout(address) is None
        await asyncio.sleep(1.1)
        assert await here.auth_lockout(address) is not None
        for throttle in (here, there):
            await throttle.aclose()

    asyncio.run(run())
