"""Forward chat requests to the engine that serves the model's base, hot-loading the adapter
on the engine if it does not know it yet (engine restarted, evicted, or load missed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi.responses import Response, StreamingResponse

from loraforge.errors import ServiceUnavailableError

TIMEOUT = httpx.Timeout(600.0, connect=5.0)


def _not_loaded(status: int, body: bytes) -> bool:
    return status == 404 and b"model_not_found" in body


async def _load(client: httpx.AsyncClient, url: str, name: str, path: str) -> None:
    resp = await client.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    if resp.status_code != 200:
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


async def forward_chat(urls: list[str], payload: dict[str, Any], adapter: tuple[str, str] | None) -> Response:
    """Send ``payload`` to the first reachable engine in ``urls``.

    Args:
        adapter: ``(name, path)`` of the fine-tuned model being asked for, or None for a base model.
    """
    client = httpx.AsyncClient(timeout=TIMEOUT)
    last_error: Exception | None = None
    for url in urls:
        try:
            resp = await _open(client, url, payload, adapter)
        except httpx.TransportError as exc:
            last_error = exc
            continue
        if resp.status_code != 200 or not payload.get("stream"):
            body = await resp.aread()
            await resp.aclose()
            await client.aclose()
            return Response(
                body,
                status_code=resp.status_code,
                media_type=resp.headers.get("content-type", "application/json"),
            )

        async def relay(resp: httpx.Response = resp) -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()
                await client.aclose()

        return StreamingResponse(
            relay(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )
    await client.aclose()
    raise ServiceUnavailableError(f"No engine serving this model is reachable ({last_error}).")
