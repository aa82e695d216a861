"""The engine fleet and its client: least-loaded replica first, ties round-robin, failover past dead
replicas, a hot-load on a replica that answers vLLM's or our "model not found", eager load and
unload on every replica (vLLM's "already loaded" counts as loaded), and one fleet per worker."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from loraforge.contracts.engine import LoadLoRAAdapterRequest
from loraforge.engines import EngineClient, EngineFleet, EngineReply, EngineStream, ReplicaBalancer, fleet_for
from loraforge.errors import ServiceUnavailableError
from loraforge.settings import Settings
from tests.net import serve_in_thread


def test_least_loaded_first_and_round_robin_ties() -> None:
    balancer = ReplicaBalancer()
    urls = ["a", "b", "c"]
    firsts = [balancer.order(urls)[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    balancer.acquire("a")
    balancer.acquire("b")
    assert balancer.order(urls)[0] == "c"
    balancer.acquire("c")
    balancer.acquire("c")
    assert balancer.order(urls)[-1] == "c" and balancer.in_flight("c") == 2
    for url in ("a", "b", "c", "c"):
        balancer.release(url)
    assert [balancer.in_flight(u) for u in urls] == [0, 0, 0]


def _fake_vllm() -> tuple[FastAPI, list[str]]:
    """Answers chat only for adapters loaded through /v1/load_lora_adapter, with vLLM's 404; a
    second load of a name gets vLLM's 400 "has already been loaded"."""
    app, loaded = FastAPI(), []

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> JSONResponse:
        name = (await request.json())["lora_name"]
        if name in loaded:
            error = {"message": f"The lora adapter '{name}' has already been loaded.", "code": 400}
            return JSONResponse({"error": error}, status_code=400)
        loaded.append(name)
        return JSONResponse("ok")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> PlainTextResponse:
        name = (await request.json())["lora_name"]
        if name not in loaded:
            return PlainTextResponse("not found", status_code=404)
        loaded.remove(name)
        return PlainTextResponse("ok")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        model = body["model"]
        if model not in loaded:  # vLLM's wording and shape (code is an int there)
            error = {"message": f"The model `{model}` does not exist.", "type": "NotFoundError", "code": 404}
            return JSONResponse({"error": error}, status_code=404)
        if body.get("stream"):
            events = [b'data: {"model": "%s"}\n\n' % model.encode(), b"data: [DONE]\n\n"]
            return StreamingResponse(iter(events), media_type="text/event-stream")
        return JSONResponse({"object": "chat.completion", "model": model, "choices": []})

    return app, loaded


def _dead_url() -> str:
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def vllm() -> Iterator[tuple[str, list[str]]]:
    app, loaded = _fake_vllm()
    with serve_in_thread(app) as url:
        yield url, loaded


def test_failover_and_hot_load_on_a_vllm_style_replica(vllm: tuple[str, list[str]]) -> None:
    live, loaded = vllm
    dead = _dead_url()
    balancer = ReplicaBalancer()
    fleet = EngineFleet({"base": [dead, live]}, balancer=balancer)
    payload = {"model": "ft:x", "messages": [{"role": "user", "content": "hi"}]}

    async def scenario() -> EngineReply | EngineStream:
        try:
            return await fleet.chat(
                "base", payload, LoadLoRAAdapterRequest(lora_name="ft:x", lora_path="/adapters/x")
            )
        finally:
            await fleet.aclose()

    response = asyncio.run(scenario())
    assert isinstance(response, EngineReply)
    assert response.status_code == 200 and json.loads(response.content)["model"] == "ft:x"
    assert loaded == ["ft:x"]  # hot-loaded after vLLM's 404, then retried
    assert balancer.in_flight(dead) == 0 and balancer.in_flight(live) == 0


def test_stream_holds_the_replica_until_closed(vllm: tuple[str, list[str]]) -> None:
    live, loaded = vllm
    fleet = EngineFleet({"base": [live]})
    payload = {"model": "ft:s", "messages": [{"role": "user", "content": "hi"}], "stream": True}

    async def scenario() -> bytes:
        try:
            answer = await fleet.chat(
                "base", payload, LoadLoRAAdapterRequest(lora_name="ft:s", lora_path="/a/s")
            )
            assert isinstance(answer, EngineStream) and fleet.balancer.in_flight(live) == 1
            return b"".join([chunk async for chunk in answer])
        finally:
            await fleet.aclose()

    raw = asyncio.run(scenario())
    assert raw.endswith(b"data: [DONE]\n\n") and b'"ft:s"' in raw and loaded == ["ft:s"]
    assert fleet.balancer.in_flight(live) == 0


def test_no_engine_or_none_reachable_is_503() -> None:
    fleet = EngineFleet({"base": [_dead_url()]})
    payload = {"model": "ft:y", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ServiceUnavailableError, match="not being served by any engine"):
        asyncio.run(fleet.chat("other-base", payload))
    with pytest.raises(ServiceUnavailableError, match="No engine serving this model is reachable"):
        asyncio.run(fleet.chat("base", payload))
    assert fleet.balancer.in_flight(fleet.urls("base")[0]) == 0


def test_eager_load_and_unload_on_every_replica(vllm: tuple[str, list[str]]) -> None:
    live, loaded = vllm
    dead = _dead_url()
    fleet = EngineFleet({"base": [live, dead]})
    try:
        assert fleet.load("base", "ft:z", "/adapters/z") == [dead]  # a dead replica is reported
        assert fleet.load("base", "ft:z", "/adapters/z") == [dead]  # vLLM's "already loaded" is fine
        assert loaded == ["ft:z"]
        assert fleet.client(live) is fleet.client(live)  # one client (one pool) per URL
        fleet.unload("base", ["ft:z", "ft:never-loaded"])  # best effort: nothing raised
        assert loaded == []
        assert fleet.load("other-base", "ft:z", "/adapters/z") == []  # no engine serves it
    finally:
        fleet.close()


def test_async_and_sync_faces_agree_on_already_loaded(vllm: tuple[str, list[str]]) -> None:
    live, loaded = vllm

    async def scenario() -> None:
        async with EngineClient(live) as client:
            await client.load_adapter("ft:a", "/a")
            await client.load_adapter("ft:a", "/a")  # vLLM answers 400 "has already been loaded"
            assert await client.unload_adapter("ft:a") is True
            assert await client.unload_adapter("ft:a") is False

    asyncio.run(scenario())
    client = EngineClient(live)
    client.load_adapter_sync("ft:b", "/b")
    client.load_adapter_sync("ft:b", "/b")
    assert loaded == ["ft:b"]
    assert client.unload_adapter_sync("ft:b") is True and client.unload_adapter_sync("ft:b") is False
    client.close()


def test_fleet_from_settings_and_one_per_worker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    local = Settings(home=tmp_path, engine_port=8123, serve_base_model="loraforge/tiny-llama")
    assert EngineFleet.from_settings(local).urls("loraforge/tiny-llama") == ["http://127.0.0.1:8123"]
    assert EngineFleet.from_settings(local).urls("meta-llama/Llama-3.1-8B-Instruct") == []
    routed = Settings(home=tmp_path, engines={"b": ["http://e1", "http://e2"]}, engine_api_key="k")
    assert EngineFleet.from_settings(routed).urls("b") == ["http://e1", "http://e2"]
    assert EngineFleet.from_settings(routed).urls("loraforge/tiny-llama") == []
    assert fleet_for(routed) is fleet_for(routed.model_copy())  # built once per process
    assert fleet_for(routed) is not fleet_for(local)
