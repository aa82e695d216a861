"""The one HTTP client of the engine protocol (``contracts.engine``), ours or a vLLM/SGLang server.

One :class:`EngineClient` per engine URL, with an async face (the API, in its event loop) and a
blocking ``*_sync`` face (the Celery worker's threads). Both faces go through the same checks
(``_loaded``, ``_unloaded``, ``_ok``), so what counts as success — including vLLM's 400 "has
already been loaded", which means the adapter is there — is decided once. Connection pools are
kept for the client's life: close with :meth:`EngineClient.aclose` / :meth:`EngineClient.close`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loraforge.contracts.engine import (
    ALREADY_LOADED,
    MODEL_NOT_FOUND,
    VLLM_NOT_LOADED,
    EngineHealth,
    LoadLoRAAdapterRequest,
    ModelList,
    UnloadLoRAAdapterRequest,
)

LOAD, UNLOAD, CHAT = "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/chat/completions"


class EngineUnavailable(Exception):
    """The engine could not be reached (connection refused, timeout, broken stream)."""


class EngineRequestError(Exception):
    """The engine answered with a non-2xx status.

    Attributes:
        status_code: the HTTP status.
        body: the parsed JSON body (an OpenAI error envelope from our engine and vLLM).
        text: the raw body, for messages.
    """

    def __init__(self, status_code: int, body: dict[str, Any], text: str = "") -> None:
        self.status_code = status_code
        self.body = body
        self.text = text
        super().__init__(f"engine returned {status_code}: {self.message}")

    @property
    def error(self) -> dict[str, Any]:
        """The envelope's ``error`` object (empty if the body had none)."""
        inner = self.body.get("error")
        return inner if isinstance(inner, dict) else {}

    @property
    def code(self) -> str | None:
        """``error.code``; ``"model_not_found"`` means: load the adapter and retry."""
        code = self.error.get("code")
        return None if code is None else str(code)

    @property
    def message(self) -> str:
        """``error.message`` (older vLLM puts it at the top level; FastAPI's default says ``detail``)."""
        return str(
            self.error.get("message") or self.body.get("message") or self.body.get("detail") or self.body
        )

    @property
    def model_not_found(self) -> bool:
        """True when the request named a model the engine has not loaded (ours or vLLM's wording)."""
        return self.status_code == 404 and (self.code == MODEL_NOT_FOUND or VLLM_NOT_LOADED in self.message)


def _parse(content: bytes, reason: str = "") -> dict[str, Any]:
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    text = content.decode(errors="replace").strip() or reason
    return {"error": {"message": text, "type": "engine_error", "param": None, "code": None}}


def _refused(response: httpx.Response) -> EngineRequestError:
    return EngineRequestError(
        response.status_code, _parse(response.content, response.reason_phrase), response.text
    )


def _loaded(response: httpx.Response) -> None:
    if response.status_code != 200 and not (response.status_code == 400 and ALREADY_LOADED in response.text):
        raise _refused(response)


def _unloaded(response: httpx.Response) -> bool:
    if response.status_code == 404:
        return False
    if response.status_code != 200:
        raise _refused(response)
    return True


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        raise _refused(response)
    return _parse(response.content, response.reason_phrase)


@dataclass(frozen=True)
class EngineReply:
    """A complete answer to a chat request (any status), to be relayed as is."""

    status_code: int
    content: bytes
    content_type: str

    def json(self) -> dict[str, Any]:
        """The body as JSON (an error envelope when it was not JSON)."""
        return _parse(self.content)

    @property
    def model_not_found(self) -> bool:
        """The engine has not loaded the model this request named: load it and ask again."""
        return self.status_code == 404 and EngineRequestError(404, self.json()).model_not_found


class EngineStream:
    """A 200 Server-Sent-Events answer, relayed chunk by chunk (``data: ...\\n\\n`` up to ``[DONE]``).

    Iterate it once; the connection (and whatever :meth:`on_close` registered) is released when the
    iteration ends or :meth:`aclose` is called.
    """

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._callbacks: list[Callable[[], None]] = []
        self._closed = False

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once when the stream is closed (e.g. release the replica)."""
        self._callbacks.append(callback)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine stream from {self._response.url} failed: {exc!r}") from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the connection and run the close callbacks (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._response.aclose()
        finally:
            for callback in self._callbacks:
                callback()


class EngineClient:
    """Talk to one engine.

    Args:
        base_url: e.g. ``http://127.0.0.1:8100`` (without ``/v1``).
        timeout: read timeout in seconds (generation can be long); connecting times out after 5 s.
        api_key: sent as ``Authorization: Bearer`` when the engine requires one.
        transport: optional async transport (tests: ``httpx.ASGITransport(app)``).
    """

    def __init__(
        self,
        base_url: str,
        timeout: float = 600.0,
        *,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = httpx.Timeout(timeout, connect=5.0)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport
        self._lock = threading.Lock()
        self._sync: httpx.Client | None = None
        self._async: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None

    # ------------------------------------------------------------------------------ pools
    def _async_client(self) -> httpx.AsyncClient:
        # An AsyncClient's connections belong to the event loop that opened them: a caller in
        # another loop (tests running ``asyncio.run`` twice) gets a fresh pool rather than a dead one.
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=self._timeout,
                headers=self._headers,
                transport=self._transport,
            )
            self._async = (loop, client)
        return self._async[1]

    def _sync_client(self) -> httpx.Client:
        with self._lock:  # the worker unloads from side threads; one pool for all of them
            if self._sync is None:
                self._sync = httpx.Client(
                    base_url=self.base_url, timeout=self._timeout, headers=self._headers
                )
            return self._sync

    async def aclose(self) -> None:
        """Close the connection pools (the async one only if it belongs to the running loop)."""
        pool, self._async = self._async, None
        if pool is not None and pool[0] is asyncio.get_running_loop():
            await pool[1].aclose()
        self.close()

    def close(self) -> None:
        """Close the blocking connection pool."""
        with self._lock:
            pool, self._sync = self._sync, None
        if pool is not None:
            pool.close()

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            return await self._async_client().request(method, path, json=body)
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine at {self.base_url} unreachable: {exc!r}") from exc

    def _request_sync(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            return self._sync_client().request(method, path, json=body)
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine at {self.base_url} unreachable: {exc!r}") from exc

    # ---------------------------------------------------------------------- adapter protocol
    async def load_adapter(self, name: str, path: str | Path) -> None:
        """Hot-load an adapter (idempotent, also against vLLM).

        Raises:
            EngineRequestError: the engine refused it (bad dir, other base model, ...).
            EngineUnavailable: the engine is down.
        """
        body = LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path)).model_dump()
        _loaded(await self._request("POST", LOAD, body))

    def load_adapter_sync(self, name: str, path: str | Path) -> None:
        """Blocking :meth:`load_adapter`, for the Celery worker."""
        body = LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path)).model_dump()
        _loaded(self._request_sync("POST", LOAD, body))

    async def unload_adapter(self, name: str) -> bool:
        """Unload an adapter; returns False if it was not loaded.

        Raises:
            EngineRequestError: any other refusal.
            EngineUnavailable: the engine is down.
        """
        body = UnloadLoRAAdapterRequest(lora_name=name).model_dump(exclude_none=True)
        return _unloaded(await self._request("POST", UNLOAD, body))

    def unload_adapter_sync(self, name: str) -> bool:
        """Blocking :meth:`unload_adapter`, for the Celery worker (e.g. when an adapter is deleted)."""
        body = UnloadLoRAAdapterRequest(lora_name=name).model_dump(exclude_none=True)
        return _unloaded(self._request_sync("POST", UNLOAD, body))

    async def health(self) -> EngineHealth:
        """``GET /health``.

        Raises:
            EngineRequestError: non-200 (e.g. 503 while loading).
            EngineUnavailable: the engine is down.
        """
        return EngineHealth.model_validate(_ok(await self._request("GET", "/health")))

    async def models(self) -> list[str]:
        """Ids of the models the engine serves now (the base model and loaded adapters)."""
        listed = ModelList.model_validate(_ok(await self._request("GET", "/v1/models")))
        return [card.id for card in listed.data]

    # ---------------------------------------------------------------------------------- chat
    async def send_chat(self, payload: Mapping[str, Any]) -> EngineReply | EngineStream:
        """Send a chat request as is: a 200 to ``stream: true`` is an :class:`EngineStream`, any
        other answer an :class:`EngineReply` (errors included, so they can be relayed).

        Raises:
            EngineUnavailable: the engine is down, or broke before the answer was read.
        """
        client = self._async_client()
        try:
            response = await client.send(client.build_request("POST", CHAT, json=dict(payload)), stream=True)
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine at {self.base_url} unreachable: {exc!r}") from exc
        if response.status_code == 200 and payload.get("stream"):
            return EngineStream(response)
        try:
            content = await response.aread()
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine at {self.base_url} broke off: {exc!r}") from exc
        finally:
            await response.aclose()
        content_type = response.headers.get("content-type", "application/json")
        return EngineReply(response.status_code, content, content_type)

    async def chat(self, payload: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Non-streaming chat completion; returns ``(status, json)`` so errors can be relayed as is.

        Raises:
            EngineUnavailable: the engine is down.
        """
        reply = await self.send_chat({**payload, "stream": False})
        assert isinstance(reply, EngineReply)  # a non-streaming request always gets a reply
        return reply.status_code, reply.json()

    async def stream_chat(self, payload: Mapping[str, Any]) -> AsyncIterator[bytes]:
        """Streaming chat completion: yield the raw SSE bytes (``data: ...\\n\\n`` up to ``[DONE]``).

        The status is checked before the first byte is yielded, so awaiting the first item is
        enough to learn whether to hot-load and retry.

        Raises:
            EngineRequestError: non-200 answer (``.model_not_found`` for an unloaded adapter).
            EngineUnavailable: the engine is down or the stream broke.
        """
        answer = await self.send_chat({**payload, "stream": True})
        if isinstance(answer, EngineReply):
            raise EngineRequestError(
                answer.status_code, answer.json(), answer.content.decode(errors="replace")
            )
        async for chunk in answer:
            yield chunk


__all__ = ["EngineClient", "EngineReply", "EngineRequestError", "EngineStream", "EngineUnavailable"]
