"""The engines of a deployment: which URLs serve which base model, and putting adapters on them.

Every process that talks to engines holds one :class:`EngineFleet`, built once from settings: the
API on its ``Services`` (chat, and unloading a deleted model), each worker process through
:func:`fleet_for` (loading a finished adapter, unloading checkpoints that went away). The fleet
keeps one :class:`~loraforge.engines.client.EngineClient` (and so one connection pool) per URL.

Adapters get onto engines two ways, both here: eagerly after training (:meth:`EngineFleet.load`, on
every replica), and lazily when a chat request names one a replica does not know (engine
restarted, evicted it, or missed the eager load): :meth:`EngineFleet.chat` loads it and retries.
Replicas of one base (``LORAFORGE_ENGINES``: base -> URLs) are chosen by :class:`ReplicaBalancer`;
a replica that cannot be reached is skipped for the next one (failover). Any server speaking
vLLM's adapter protocol can be a replica.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loraforge.contracts.engine import LoadLoRAAdapterRequest
from loraforge.engines.balancer import ReplicaBalancer
from loraforge.engines.client import (
    EngineClient,
    EngineReply,
    EngineRequestError,
    EngineStream,
    EngineUnavailable,
)
from loraforge.errors import ServiceUnavailableError
from loraforge.settings import Settings

log = logging.getLogger(__name__)


def routes_from_settings(settings: Settings) -> dict[str, list[str]]:
    """Base model -> engine URLs: ``settings.engines``, or else the one local engine (``serve``)."""
    if settings.engines:
        return {base: list(urls) for base, urls in settings.engines.items()}
    return {settings.serve_base_model: [f"http://{settings.engine_host}:{settings.engine_port}"]}


class EngineFleet:
    """The engines serving each base model, and the one client of each.

    Args:
        routes: base model id -> URLs of the engines serving it (replicas).
        api_key: bearer key the engines require, if any.
        timeout: read timeout of engine calls in seconds (generation can be long).
        balancer: replica choice and in-flight counts (default: a fresh one).
    """

    def __init__(
        self,
        routes: Mapping[str, Sequence[str]],
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        balancer: ReplicaBalancer | None = None,
    ) -> None:
        self._routes = {base: list(urls) for base, urls in routes.items()}
        self._api_key = api_key
        self._timeout = timeout
        self.balancer = balancer or ReplicaBalancer()
        self._clients: dict[str, EngineClient] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineFleet:
        """The fleet ``settings`` describe (``engines``, ``engine_api_key``)."""
        return cls(routes_from_settings(settings), api_key=settings.engine_api_key or None)

    def urls(self, base_model: str) -> list[str]:
        """The engines that serve ``base_model`` (empty if none)."""
        return list(self._routes.get(base_model, []))

    def client(self, url: str) -> EngineClient:
        """The client of the engine at ``url`` (one per URL, kept for the fleet's life)."""
        with self._lock:
            if url not in self._clients:
                self._clients[url] = EngineClient(url, self._timeout, api_key=self._api_key)
            return self._clients[url]

    # ------------------------------------------------------------------------------- chat (API)
    async def chat(
        self, base_model: str, payload: Mapping[str, Any], adapter: LoadLoRAAdapterRequest | None = None
    ) -> EngineReply | EngineStream:
        """Send a chat request to the best reachable replica of ``base_model``.

        Args:
            base_model: the base the requested model runs on.
            payload: the chat request body, relayed as is.
            adapter: the fine-tuned model asked for (name and directory), loaded into a replica
                that answers "not loaded"; None for a base model.

        Returns:
            The replica's answer; an :class:`EngineStream` holds the replica until it is closed.

        Raises:
            ServiceUnavailableError: no engine serves the base, none could be reached, or the
                chosen one could not load the adapter.
        """
        urls = self.urls(base_model)
        if not urls:
            raise ServiceUnavailableError(
                f"The model `{payload.get('model')}` is not being served by any engine right now."
            )
        last_error: BaseException | None = None
        for url in self.balancer.order(urls):
            self.balancer.acquire(url)
            try:
                answer = await self._chat_on(self.client(url), payload, adapter)
            except EngineUnavailable as exc:  # failover: try the next replica
                self.balancer.release(url)
                last_error = exc.__cause__ or exc
                continue
            except BaseException:
                self.balancer.release(url)
                raise
            if isinstance(answer, EngineStream):
                answer.on_close(functools.partial(self.balancer.release, url))
            else:
                self.balancer.release(url)
            return answer
        raise ServiceUnavailableError(f"No engine serving this model is reachable ({last_error}).")

    async def _chat_on(
        self, client: EngineClient, payload: Mapping[str, Any], adapter: LoadLoRAAdapterRequest | None
    ) -> EngineReply | EngineStream:
        answer = await client.send_chat(payload)
        if adapter is None or not isinstance(answer, EngineReply) or not answer.model_not_found:
            return answer
        try:
            await client.load_adapter(adapter.lora_name, adapter.lora_path)
        except EngineRequestError as exc:
            raise ServiceUnavailableError(
                f"The engine could not load `{adapter.lora_name}`: {exc.text[:300]}"
            ) from exc
        return await client.send_chat(payload)

    # --------------------------------------------------------------------- adapters (worker)
    def load(self, base_model: str, name: str, path: str | Path) -> list[str]:
        """Hot-load adapter ``name`` into every engine serving ``base_model``; return the URLs that failed.

        A failure is not fatal (logged): the API loads an adapter on the first request naming it.
        """
        failed = []
        for url in self.urls(base_model):
            try:
                self.client(url).load_adapter_sync(name, path)
            except Exception as exc:  # any engine failure is reported, not raised
                log.warning("could not load %s into %s: %s", name, url, exc)
                failed.append(url)
        return failed

    def unload(self, base_model: str, names: Sequence[str]) -> None:
        """Unload adapters by name from every engine serving ``base_model`` (best effort, logged)."""
        for url in self.urls(base_model) if names else []:
            client = self.client(url)
            for name in names:
                try:
                    client.unload_adapter_sync(name)
                except Exception as exc:  # an engine that is down has nothing loaded to remove
                    log.info("unload of %s from %s: %s", name, url, exc)

    # ---------------------------------------------------------------------------- lifecycle
    async def aclose(self) -> None:
        """Close every client's connection pools (from the event loop that used them)."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(client.aclose() for client in clients))

    def close(self) -> None:
        """Close every client's blocking connection pool (worker processes, tests)."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


_fleets: dict[tuple[Any, ...], EngineFleet] = {}
_fleets_lock = threading.Lock()


def fleet_for(settings: Settings) -> EngineFleet:
    """This process's fleet for ``settings``, built on first use (the worker's entry point).

    Cached by what it is built from, so every task of a worker process shares its connection
    pools, and settings that name other engines (tests) get their own fleet.
    """
    routes = routes_from_settings(settings)
    key = (tuple(sorted((base, tuple(urls)) for base, urls in routes.items())), settings.engine_api_key)
    with _fleets_lock:
        fleet = _fleets.get(key)
        if fleet is None:
            fleet = _fleets[key] = EngineFleet(routes, api_key=settings.engine_api_key or None)
        return fleet


__all__ = ["EngineFleet", "fleet_for", "routes_from_settings"]
