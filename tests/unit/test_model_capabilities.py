"""``/v1/models`` says what this installation can train and serve: on a machine whose only worker
pool is a CPU, the 8B and 70B models stay listed (valid OpenAI ``Model`` objects) but are not
tagged ``fine-tunable``, and only the engine's base is ``servable``; the web form offers what
can be trained, the tiny model first."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi.testclient import TestClient
from openai import OpenAI
from openai.types import Model

from loraforge.api.app import create_app
from loraforge.settings import Settings, TrainPool
from tests.conftest import RecordingDispatcher

TINY = "loraforge/tiny-llama"
LLAMA_8B = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
LLAMA_70B = "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo"


def _client(settings: Settings, make_key, pools: list[TrainPool]) -> Iterator[OpenAI]:  # type: ignore[no-untyped-def]
    app = create_app(settings.model_copy(update={"train_pools": pools}), dispatcher=RecordingDispatcher())
    with TestClient(app) as http:
        yield OpenAI(
            base_url="http://testserver/v1", api_key=make_key("acme"), http_client=http, max_retries=0
        )


def test_a_cpu_only_machine_offers_what_it_can_train_and_serve(settings: Settings, make_key) -> None:  # type: ignore[no-untyped-def]
    cpu_only = [TrainPool(name="cpu", device="cpu", count=1, memory_gib=16)]
    for client in _client(settings, make_key, cpu_only):
        models = {m.id: m for m in client.models.list()}
        tags = {m: (models[m].model_extra or {})["tags"] for m in (TINY, LLAMA_8B, LLAMA_70B)}
        assert tags == {
            TINY: ["base", "fine-tunable", "servable"],
            LLAMA_8B: ["base"],
            LLAMA_70B: ["base"],
        }
        for model in models.values():
            Model.model_validate(model.model_dump())  # still OpenAI's Model
        assert (client.models.retrieve(LLAMA_8B).model_extra or {})["tags"] == ["base"]
        # What the web form offers, in order: the first is its default.
        offered = [m.id for m in client.models.list() if "fine-tunable" in (m.model_extra or {})["tags"]]
        assert offered == [TINY]


def test_a_gpu_pool_makes_the_large_models_fine_tunable(settings: Settings, make_key) -> None:  # type: ignore[no-untyped-def]
    pools = [TrainPool(name="gpu", device="cuda", count=8, memory_gib=80)]
    for client in _client(settings, make_key, pools):
        tags = {m.id: (m.model_extra or {})["tags"] for m in client.models.list()}
        assert "fine-tunable" in tags[LLAMA_8B] and "fine-tunable" in tags[LLAMA_70B]
        assert "servable" not in tags[LLAMA_8B]
