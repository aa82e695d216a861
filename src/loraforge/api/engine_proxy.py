"""Forward chat requests to an engine replica that serves the model's base, hot-loading the
adapter on that replica if it does not know it yet (engine restarted, evicted, or load missed).

Replicas of one base (``LORAFORGE_ENGINES``: base -> URLs) are chosen least-loaded first, ties
broken round-robin, by :class:`ReplicaBalancer`; a replica that refuses the connection is skipped
and the next one tried (failover). Any server speaking vLLM's adapter protocol can be a replica.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi.responses import Response, StreamingResponse

from loraforge.errors import ServiceUnavailableError

TIMEOUT = httpx.Timeout(600.0, connect=5.0)


class ReplicaBalancer:
    """Least-loaded replica choice with round-robin tie-breaks, counted per URL in this process."""

    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def order(self, urls: list[str]) -> list[str]:
        """``urls`` in the order to try them: fewest requests in flight first, rotating ties."""
        if len(urls) < 2:
            return list(urls)
        with self._lock:
            shift = next(self._turn) % len(urls)
            rotated = urls[shift:] + urls[:shift]
            return sorted(rotated, key=lambda url: self._in_flight.get(url, 0))  # stable: keeps rotation

    def acquire(self, url: str) -> None:
        """Count one more request in flight on ``url`` (pair with :meth:`release`)."""
        with self._lock:
            self._in_flight[url] = self._in_flight.get(url, 0) + 1

    def release(self, url: str) -> None:
        """One request on ``url`` is over."""
        with self._lock:
            self._in_flight[url] -= 1

    def in_flight(self, url: str) -> int:
        """Requests in flight on ``url`` now."""
        with self._lock:
            return self._in_flight.get(url, 0)


def balancer_for(state: Any) -> ReplicaBalancer:
    """The app's balancer (``app.state.replica_balancer``), created on first use."""
    balancer = getattr(state, "replica_balancer", None)
    if balancer is None:
        balancer = state.replica_balancer = ReplicaBalancer()
    return balancer


def _not_loaded(status: int, body: bytes) -> bool:
    """The replica does not know the model: ours says ``model_not_found``, vLLM "does not exist"."""
    return status == 404 and (b"model_not_found" in body or b"does not exist" in body)


async def _load(client: httpx.AsyncClient, url: str, name: str, path: str) -> None:
    resp = await client.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    if resp.status_code != 200 and "has already been loaded" not in resp.text:  # vLLM's idempotence
        raise ServiceUnavailableError(f"The engine could not load `{name}`: {resp.text[:300]}")


async def _open(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], adapter: tuple[str, str] | None
) -> httpx.Response:
    for attempt in range(2):
        request = client.build_request("POST", f"{url}/v1/chat/completions", json=payload)
        resp = await client.send(request, stream=True)
        if attempt == 0 and adapter is not None and resp.status_code == 404:
            body = await resp.aread()
            await resp.aclose()
            if _not_loaded(resp.status_code, body):
                await _load(client, url, *adapter)
                continue
            return httpx.Response(resp.status_code, content=body, headers=resp.headers)
        return resp
    raise AssertionError("unreachable")


async def forward_chat(
    urls: list[str],
    payload: dict[str, Any],
    adapter: tuple[str, str] | None,
    *,
    balancer: ReplicaBalancer | None = None,
    api_key: str | None = None,
) -> Response:
    """Send ``payload`` to the best reachable replica in ``urls``.

    Args:
        urls: the replicas serving the model's base.
        payload: the chat request body.
        adapter: ``(name, path)`` of the fine-tuned model being asked for, or None for a base model.
        balancer: replica choice and in-flight counts (a fresh one: plain order).
        api_key: bearer key the engines require, if any.

    Raises:
        ServiceUnavailableError: no replica could be reached.
    """
    balancer = balancer or ReplicaBalancer()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    client = httpx.AsyncClient(timeout=TIMEOUT, headers=headers)
    last_error: Exception | None = None
    for url in balancer.order(urls):
        balancer.acquire(url)
        try:
            resp = await _open(client, url, payload, adapter)
        except httpx.TransportError as exc:  # failover: try the next replica
            balancer.release(url)
            last_error = exc
            continue
        except BaseException:
            balancer.release(url)
            await client.aclose()
            raise
        if resp.status_code != 200 or not payload.get("stream"):
            try:
                body = await resp.aread()
            finally:
                await resp.aclose()
                await client.aclose()
                balancer.release(url)
            return Response(
                body,
                status_code=resp.status_code,
                media_type=resp.headers.get("content-type", "application/json"),
            )

        async def relay(resp: httpx.Response = resp, url: str = url) -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()
                await client.aclose()
                balancer.release(url)

        return StreamingResponse(
            relay(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )
    await client.aclose()
    raise ServiceUnavailableError(f"No engine serving this model is reachable ({last_error}).")
