"""The serving engine end to end on CPU: a LoRA trained here, served over HTTP, read by the openai SDK."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from openai import BadRequestError, NotFoundError, OpenAI
from peft import PeftModel

from loraforge.adapters.format import read_manifest, write_manifest
from loraforge.catalog import load_catalog
from loraforge.catalog.loading import load_model, load_tokenizer
from loraforge.engines import EngineClient, EngineRequestError
from loraforge.ops.metrics import EngineMetrics
from loraforge.serving.adapter_store import AdapterStore
from loraforge.serving.app import create_engine_app, run_engine
from loraforge.serving.engine import Engine, GenerationResult, load_engine
from loraforge.serving.errors import AdapterNotLoaded, BaseModelMismatch, UnknownBaseModel
from loraforge.settings import Settings
from loraforge.storage import BlobStore, LocalCache
from loraforge.storage.sealed import put_dir, unseal
from tests.net import serve_in_thread
from tests.unit.lora_helpers import ANSWER, PROMPT, SYSTEM, train_adapter

BASE = "loraforge/tiny-llama"
ADAPTER = "ft:tiny-llama:refund:ftjob-test"
REF = "adapters/ftjob-test"  # the adapter's key in the adapter store: what lora_path names


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    entry = load_catalog().get(BASE)
    models_dir = tmp_path_factory.mktemp("models")
    adapter_dir = tmp_path_factory.mktemp("adapters") / "refund"
    train_adapter(entry, models_dir, adapter_dir)
    return entry, models_dir, adapter_dir


def _engine(tiny, **kwargs) -> Engine:
    entry, models_dir, _ = tiny
    return Engine(load_model(entry, models_dir), load_tokenizer(entry, models_dir), entry, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny) -> Engine:
    return _engine(tiny, max_loaded_adapters=4)


@pytest.fixture(scope="module")
def blobs(tiny, tmp_path_factory) -> BlobStore:
    """The adapter store, holding the trained adapter under ``REF``."""
    store = BlobStore(str(tmp_path_factory.mktemp("store")))
    put_dir(store, tiny[2], REF)
    return store


@pytest.fixture(scope="module")
def adapter_store(blobs, tmp_path_factory) -> AdapterStore:
    return AdapterStore(LocalCache(blobs, tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def http(engine, adapter_store) -> TestClient:
    return TestClient(create_engine_app(engine, adapter_store=adapter_store))


@pytest.fixture(scope="module")
def sdk(http) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def loaded(http, tiny) -> str:
    response = http.post("/v1/load_lora_adapter", json={"lora_name": ADAPTER, "lora_path": REF})
    assert response.status_code == 200, response.text
    assert response.text == f"Success: LoRA adapter '{ADAPTER}' added successfully."
    return ADAPTER


def _sse_events(text: str) -> list[str]:
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events  # the SDK crashes on data-less events
    return [e.removeprefix("data: ") for e in events]


def test_load_is_idempotent_and_listed(http, loaded, tiny):
    again = http.post("/v1/load_lora_adapter", json={"lora_name": loaded, "lora_path": REF})
    assert again.status_code == 200
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    cards = {card["id"]: card for card in models["data"]}
    assert cards[BASE]["object"] == "model" and isinstance(cards[BASE]["created"], int)
    # No locations: an adapter's root is its name, not a directory or a key.
    assert cards[loaded]["parent"] == BASE and cards[loaded]["root"] == loaded
    assert str(tiny[2].parent) not in json.dumps(models)
    assert http.get(f"/v1/models/{loaded}").json()["id"] == loaded
    health = http.get("/health").json()
    assert {k: health[k] for k in ("status", "base_model", "adapters")} == {
        "status": "ok",
        "base_model": BASE,
        "adapters": [loaded],
    }
    assert set(health["stats"]) == {"batches", "requests", "largest_batch"}


def test_adapter_answers_trained_json_and_base_does_not(sdk, loaded):
    completion = sdk.chat.completions.create(model=loaded, messages=PROMPT, temperature=0)
    choice = completion.choices[0]
    assert choice.message.content == ANSWER and choice.finish_reason == "stop"
    assert completion.id.startswith("chatcmpl-") and completion.model == loaded
    assert isinstance(completion.created, int) and completion.object == "chat.completion"
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    base = sdk.chat.completions.create(model=BASE, messages=PROMPT, temperature=0, max_tokens=24)
    assert base.choices[0].message.content != ANSWER


def test_stream_matches_non_stream(sdk, http, loaded):
    stream = sdk.chat.completions.create(
        model=loaded, messages=PROMPT, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1
    raw = http.post(
        "/v1/chat/completions", json={"model": loaded, "messages": PROMPT, "temperature": 0, "stream": True}
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(raw.text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_served_output_equals_peft_generate(engine, loaded, tiny):
    entry, models_dir, adapter_dir = tiny
    tok = load_tokenizer(entry, models_dir)
    reference = PeftModel.from_pretrained(load_model(entry, models_dir), str(adapter_dir)).eval()
    for messages in (PROMPT, [{"role": "user", "content": "Where is my package? It is late."}]):
        template = read_manifest(adapter_dir).chat_template
        enc = tok.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            expected = reference.generate(**enc, max_new_tokens=40, do_sample=False)[
                0, enc["input_ids"].shape[1] :
            ]
        served = engine.generate(loaded, messages, max_tokens=40, temperature=0)
        assert list(served.token_ids) == expected.tolist()
        assert served.prompt_tokens == enc["input_ids"].shape[1]
    with torch.inference_mode():  # the base path (adapter disabled) equals a bare base model
        bare = load_model(entry, models_dir).generate(**enc, max_new_tokens=16, do_sample=False)
    served_base = engine.generate(BASE, messages, max_tokens=16, temperature=0)
    assert list(served_base.token_ids) == bare[0, enc["input_ids"].shape[1] :].tolist()


def test_unload_then_model_not_found(sdk, http, tiny):
    name = "ft:tiny-llama:temp:ftjob-unload"
    assert http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": REF}).status_code == 200
    response = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert (
        response.status_code == 200
        and response.text == f"Success: LoRA adapter '{name}' removed successfully."
    )
    with pytest.raises(NotFoundError) as info:
        sdk.chat.completions.create(model=name, messages=PROMPT)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    again = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert again.status_code == 404 and again.json()["error"]["param"] == "lora_name"


def test_unknown_fields_and_nulls_are_accepted(http, loaded):
    body = {
        "model": loaded,
        "messages": [{"role": "developer", "content": SYSTEM}, PROMPT[1]],
        "max_tokens": None, "stop": None, "seed": None, "stream": None, "stream_options": None, "n": None,
        "temperature": 0, "top_p": None, "metadata": {"a": "b"}, "store": True, "frobnicate": 3,
    }  # fmt: skip
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER, "refusal": None}
    assert body["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": PROMPT}, "model"),
        ({"model": BASE}, "messages"),
        ({"model": BASE, "messages": PROMPT, "temperature": 5}, "temperature"),
        ({"model": BASE, "messages": [{"role": "robot", "content": "hi"}]}, "messages.[0].role"),
        ({"model": BASE, "messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
        ({"model": BASE, "messages": PROMPT, "n": 2, "stream": True}, "n"),
        (
            {"model": BASE, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.[0].content",
        ),
    ],
)
def test_bad_requests_get_400_envelope(http, body, param):
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_sdk_errors_and_unparseable_json(sdk, http):
    with pytest.raises(BadRequestError) as info:
        sdk.chat.completions.create(model=BASE, messages=PROMPT, n=2, stream=True)
    assert info.value.param == "n"
    broken = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and "error" in broken.json()
    assert http.get("/v1/nope").json()["error"]["message"]


def test_stop_strings_length_and_content_parts(sdk, http, loaded):
    cut = sdk.chat.completions.create(model=loaded, messages=PROMPT, temperature=0, stop=['"priority"'])
    assert cut.choices[0].message.content == '{"label": "refund", ' and cut.choices[0].finish_reason == "stop"
    streamed = sdk.chat.completions.create(
        model=loaded, messages=PROMPT, temperature=0, stop='"priority"', stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == '{"label": "refund", '
    short = sdk.chat.completions.create(model=loaded, messages=PROMPT, temperature=0, max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    parts = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}, PROMPT[1]]
    assert (
        sdk.chat.completions.create(model=loaded, messages=parts, temperature=0).choices[0].message.content
        == ANSWER
    )


def test_sampling_with_seed_is_reproducible(sdk):
    def sample() -> str:
        kwargs = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 12}
        return sdk.chat.completions.create(model=BASE, messages=PROMPT, **kwargs).choices[0].message.content

    assert sample() == sample()


def test_load_errors(http, tiny, blobs, tmp_path):
    def load(path: Path | str) -> tuple[int, dict]:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(path)})
        error = response.json()["error"]
        # Never a location: not the store's folder, not the engine's cache, not the path sent.
        assert str(tmp_path) not in error["message"] and blobs.root not in error["message"]
        return response.status_code, error

    # Paths are refused, even the adapter's own directory: only store keys are loaded.
    for path in (tiny[2], tmp_path / "missing", "../adapters/ftjob-test", "adapters/../../etc"):
        status, error = load(path)
        assert (status, error["code"], error["param"]) == (400, "invalid_lora_path", "lora_path"), path
    status, error = load("adapters/ftjob-nothing-here")
    assert (status, error["code"]) == (404, "adapter_not_found")
    other = tmp_path / "other-base"
    shutil.copytree(tiny[2], other)
    write_manifest(
        other, read_manifest(other).model_copy(update={"base_model": "meta-llama/Llama-3.1-8B-Instruct"})
    )
    put_dir(blobs, other, "adapters/ftjob-other")
    status, error = load("adapters/ftjob-other")
    assert status == 400 and error["code"] == "base_model_mismatch"
    (other / "manifest.json").unlink()
    put_dir(blobs, other, "adapters/ftjob-nomanifest")
    status, error = load("adapters/ftjob-nomanifest")
    assert status == 400 and error["code"] == "invalid_adapter"
    unseal(blobs, "adapters/ftjob-other")  # an upload that never finished is not an adapter
    assert load("adapters/ftjob-other")[0] == 404
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "lora_path"
    response = http.post("/v1/load_lora_adapter", json={"lora_name": BASE, "lora_path": REF})
    assert response.status_code == 400 and response.json()["error"]["code"] == "adapter_conflict"


@pytest.mark.slow  # generates on several adapters
def test_engine_lru_eviction_and_typed_errors(tiny):
    metrics = EngineMetrics()
    engine = _engine(tiny, max_loaded_adapters=2, metrics=metrics)
    with pytest.raises(AdapterNotLoaded):
        engine.generate("a", PROMPT)
    for name in ("a", "b"):
        assert engine.load_adapter(name, tiny[2]) is True
    assert engine.load_adapter("a", tiny[2]) is False  # idempotent
    engine.generate("a", PROMPT, max_tokens=2)  # "a" is now the most recently used
    engine.load_adapter("c", tiny[2])
    assert engine.loaded_adapters() == ["a", "c"]
    assert engine.generate("c", PROMPT, temperature=0).text == ANSWER
    for name in ("a", "c"):
        engine.unload_adapter(name)  # removing the last one returns to the bare base model
    assert engine.loaded_adapters() == []
    assert engine.generate(BASE, PROMPT, max_tokens=4, temperature=0).completion_tokens == 4
    engine.load_adapter("d", tiny[2])
    assert engine.generate("d", PROMPT, temperature=0).text == ANSWER
    # a, b, c (evicting b), d: four loads, one eviction, each load timed (``/metrics``).
    sample = metrics.registry.get_sample_value
    assert sample("loraforge_engine_adapter_loads_total") == 4
    assert sample("loraforge_engine_adapter_evictions_total") == 1
    assert sample("loraforge_engine_adapter_load_seconds_count") == 4
    with pytest.raises(AdapterNotLoaded):
        engine.unload_adapter("zzz")
    mismatch = engine.entry.model_copy(update={"id": "other/model", "aliases": []})
    with pytest.raises(BaseModelMismatch):
        Engine(engine._model, engine._tokenizer, mismatch).load_adapter("e", tiny[2])


@pytest.mark.slow  # generates on several adapters
def test_concurrent_generation_with_hot_loading(engine, loaded, tiny):
    results: dict[str, list] = {"adapter": [], "base": []}
    errors: list[BaseException] = []

    def guard(fn):
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        return run

    def adapter() -> None:
        results["adapter"] += [engine.generate(loaded, PROMPT, temperature=0).text for _ in range(3)]

    def base() -> None:
        results["base"] += [engine.generate(BASE, PROMPT, temperature=0, max_tokens=8).text for _ in range(3)]

    def churn() -> None:
        for _ in range(3):
            engine.load_adapter("ft:tiny-llama:churn:x", tiny[2])
            engine.unload_adapter("ft:tiny-llama:churn:x")

    threads = [threading.Thread(target=guard(fn)) for fn in (adapter, base, churn)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert results["adapter"] == [ANSWER] * 3 and len(set(results["base"])) == 1
    assert engine.loaded_adapters() == [loaded]


def test_stream_cancel_stops_generation(engine):
    cancel = threading.Event()
    items = []
    for item in engine.run_stream(engine.prepare(BASE, PROMPT, max_tokens=200, temperature=0), cancel=cancel):
        items.append(item)
        cancel.set()  # as the app does when the client disconnects
    assert isinstance(items[-1], GenerationResult) and items[-1].completion_tokens < 200


def test_factory_lifespan_and_api_key(tmp_path):
    settings = Settings(home=tmp_path)
    app = create_engine_app(lambda: load_engine(settings, BASE, max_loaded_adapters=2), api_key="sekret")
    with TestClient(app) as client:  # the factory runs at startup, in the background
        answer = client.get("/health")
        deadline = time.monotonic() + 60
        while answer.status_code == 503 and time.monotonic() < deadline:
            assert answer.json()["error"]["code"] == "engine_not_ready"  # honest while loading
            time.sleep(0.05)
            answer = client.get("/health")
        health = answer.json()
        assert (health["status"], health["base_model"], health["adapters"]) == ("ok", BASE, [])
        denied = client.get("/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
    with pytest.raises(UnknownBaseModel):
        run_engine(settings, "nope/not-in-catalog")


def test_an_engine_that_cannot_load_its_model_says_why_and_asks_to_stop() -> None:
    failures: list[BaseException] = []

    def factory():  # type: ignore[no-untyped-def]
        raise OSError("no weights at /models/nope")

    with TestClient(create_engine_app(factory, on_load_failure=failures.append)) as client:
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.02)
        answer = client.get("/health")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "engine_not_ready"
    message = answer.json()["error"]["message"]
    assert "could not load its base model: OSError: no weights at /models/nope" in message
    assert [type(exc) for exc in failures] == [OSError]


@pytest.mark.slow  # a live engine server
def test_engine_client_against_live_server(engine, adapter_store):
    name = "ft:tiny-llama:client:ftjob-client"
    payload = {"model": name, "messages": PROMPT, "temperature": 0}

    async def scenario() -> None:
        async with EngineClient(url, timeout=30) as client:
            status, body = await client.chat(payload)
            assert status == 404 and body["error"]["code"] == "model_not_found"
            with pytest.raises(EngineRequestError) as info:
                async for _ in client.stream_chat(payload):
                    pass
            assert info.value.model_not_found
            await client.load_adapter(name, REF)
            assert name in (await client.health()).adapters and name in await client.models()
            status, body = await client.chat(payload)
            assert status == 200 and body["choices"][0]["message"]["content"] == ANSWER
            raw = b"".join([chunk async for chunk in client.stream_chat(payload)]).decode()
            events = _sse_events(raw)
            assert events[-1] == "[DONE]"
            text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2])
            assert text == ANSWER
            assert await client.unload_adapter(name) is True and await client.unload_adapter(name) is False

    with serve_in_thread(create_engine_app(engine, adapter_store=adapter_store), lifespan="off") as url:
        asyncio.run(scenario())
        EngineClient(url).load_adapter_sync(name, REF)
        assert name in engine.loaded_adapters()
        assert EngineClient(url).unload_adapter_sync(name) is True


def test_client_and_app_import_without_torch():
    code = (
        "import sys, loraforge.engines, loraforge.serving.app\n"
        "heavy = ('torch', 'transformers', 'peft', 'loraforge.serving.engine')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
