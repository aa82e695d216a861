"""The API's replica choice: least-loaded first, ties round-robin, failover past dead replicas, and a
hot-load on a replica that answers vLLM's or our "model not found"."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from loraforge.api.engine_proxy import ReplicaBalancer, forward_chat
from tests.integration.conftest import free_port


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
    """Answers chat only for adapters loaded through /v1/load_lora_adapter, with vLLM's 404."""
    app, loaded = FastAPI(), []

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> JSONResponse:
        loaded.append((await request.json())["lora_name"])
        return JSONResponse("ok")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        model = (await request.json())["model"]
        if model not in loaded:  # vLLM's wording and shape (code is an int there)
            error = {"message": f"The model `{model}` does not exist.", "type": "NotFoundError", "code": 404}
            return JSONResponse({"error": error}, status_code=404)
        return JSONResponse({"object": "chat.completion", "model": model, "choices": []})

    return app, loaded


def test_failover_and_hot_load_on_a_vllm_style_replica() -> None:
    app, loaded = _fake_vllm()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        balancer = ReplicaBalancer()
        payload = {"model": "ft:x", "messages": [{"role": "user", "content": "hi"}]}
        response = asyncio.run(
            forward_chat(
                [dead, f"http://127.0.0.1:{port}"], payload, ("ft:x", "/adapters/x"), balancer=balancer
            )
        )
        assert response.status_code == 200 and json.loads(response.body)["model"] == "ft:x"
        assert loaded == ["ft:x"]  # hot-loaded after vLLM's 404, then retried
        assert balancer.in_flight(dead) == 0 and balancer.in_flight(f"http://127.0.0.1:{port}") == 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
