"""HTTP client for an engine speaking vLLM's adapter protocol (ours, vLLM or SGLang).

Imports httpx only (no torch, nothing else from ``loraforge.serving``): the API process and the
Celery worker use it. Async methods share one ``httpx.AsyncClient`` (use it from one event loop and
``aclose()`` it); the ``*_sync`` methods open a short-lived ``httpx.Client``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx

# vLLM answers 400 with this text when the name is already loaded; ours answers 200 (idempotent).
_VLLM_ALREADY_LOADED = "has already been loaded"


class EngineUnavailable(Exception):
    """The engine could not be reached (connection refused, timeout, broken stream)."""


class EngineRequestError(Exception):
    """The engine answered with a non-2xx status.

    Attributes:
        status_code: the HTTP status.
        body: the parsed JSON body (an OpenAI error envelope from our engine and vLLM).
    """

    def __init__(self, status_code: int, body: dict[str, Any]) -> None:
        self.status_code = status_code
        self.body = body
        super().__init__(f"engine returned {status_code}: {self.message}")

    @property
    def error(self) -> dict[str, Any]:
        inner = self.body.get("error")
        return inner if isinstance(inner, dict) else {}

    @property
    def code(self) -> str | None:
        """``error.code``; ``"model_not_found"`` means: load the adapter and retry."""
        code = self.error.get("code")
        return None if code is None else str(code)

    @property
    def message(self) -> str:
        return str(self.error.get("message") or self.body.get("detail") or self.body)

    @property
    def model_not_found(self) -> bool:
        """True when the request named a model the engine has not loaded (ours or vLLM's wording)."""
        return self.status_code == 404 and (
            self.code == "model_not_found" or "does not exist" in self.message
        )


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    text = response.text.strip() or response.reason_phrase
    return {"error": {"message": text, "type": "engine_error", "param": None, "code": None}}


def _already_loaded(response: httpx.Response) -> bool:
    return response.status_code == 400 and _VLLM_ALREADY_LOADED in response.text


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
        self._client: httpx.AsyncClient | None = None

    def _async(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=self._timeout,
                headers=self._headers,
                transport=self._transport,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the shared async connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._async().request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine at {self.base_url} unreachable: {exc!r}") from exc

    async def load_adapter(self, name: str, path: str | Path) -> None:
        """Hot-load an adapter (idempotent, also against vLLM).

        Raises:
            EngineRequestError: the engine refused it (bad dir, other base model, ...).
            EngineUnavailable: the engine is down.
        """
        response = await self._request(
            "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
        )
        if response.status_code != 200 and not _already_loaded(response):
            raise EngineRequestError(response.status_code, _json_body(response))

    async def unload_adapter(self, name: str) -> bool:
        """Unload an adapter; returns False if it was not loaded.

        Raises:
            EngineRequestError: any other refusal.
            EngineUnavailable: the engine is down.
        """
        response = await self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise EngineRequestError(response.status_code, _json_body(response))
        return True

    async def health(self) -> dict[str, Any]:
        """``GET /health`` as JSON.

        Raises:
            EngineRequestError: non-200 (e.g. 503 while loading).
            EngineUnavailable: the engine is down.
        """
        response = await self._request("GET", "/health")
        if response.status_code != 200:
            raise EngineRequestError(response.status_code, _json_body(response))
        return _json_body(response)

    async def models(self) -> list[str]:
        """Ids of the models the engine serves now (the base model and loaded adapters)."""
        response = await self._request("GET", "/v1/models")
        if response.status_code != 200:
            raise EngineRequestError(response.status_code, _json_body(response))
        return [str(card["id"]) for card in _json_body(response).get("data", [])]

    async def chat(self, payload: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Non-streaming chat completion; returns ``(status, json)`` so errors can be relayed as is.

        Raises:
            EngineUnavailable: the engine is down.
        """
        body = {**payload, "stream": False}
        response = await self._request("POST", "/v1/chat/completions", json=body)
        return response.status_code, _json_body(response)

    async def stream_chat(self, payload: Mapping[str, Any]) -> AsyncIterator[bytes]:
        """Streaming chat completion: yield the raw SSE bytes (``data: ...\\n\\n`` up to ``[DONE]``).

        The status is checked before the first byte is yielded, so awaiting the first item is
        enough to learn whether to hot-load and retry.

        Raises:
            EngineRequestError: non-200 answer (``.model_not_found`` for an unloaded adapter).
            EngineUnavailable: the engine is down or the stream broke.
        """
        body = {**payload, "stream": True}
        try:
            async with self._async().stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise EngineRequestError(response.status_code, _json_body(response))
                async for chunk in response.aiter_raw():
                    yield chunk
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine stream from {self.base_url} failed: {exc!r}") from exc

    def load_adapter_sync(self, name: str, path: str | Path) -> None:
        """Blocking :meth:`load_adapter`, for the Celery worker."""
        try:
            with httpx.Client(base_url=self.base_url, timeout=self._timeout, headers=self._headers) as client:
                response = client.post(
                    "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
                )
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine at {self.base_url} unreachable: {exc!r}") from exc
        if response.status_code != 200 and not _already_loaded(response):
            raise EngineRequestError(response.status_code, _json_body(response))

    def unload_adapter_sync(self, name: str) -> bool:
        """Blocking :meth:`unload_adapter`, for the Celery worker (e.g. when an adapter is deleted)."""
        try:
            with httpx.Client(base_url=self.base_url, timeout=self._timeout, headers=self._headers) as client:
                response = client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine at {self.base_url} unreachable: {exc!r}") from exc
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise EngineRequestError(response.status_code, _json_body(response))
        return True


__all__ = ["EngineClient", "EngineRequestError", "EngineUnavailable"]
