"""The engine batches concurrent requests across adapters, frees unloaded adapters, serves n > 1,
and refuses adapters beyond its serving limits."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import weakref
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from loraforge.catalog import load_catalog
from loraforge.catalog.loading import load_model, load_tokenizer
from loraforge.serving.app import create_engine_app
from loraforge.serving.batching import Pending
from loraforge.serving.engine import Engine
from loraforge.serving.errors import InvalidAdapter
from loraforge.serving.lora import peft_adapter_name
from tests.unit.lora_helpers import ANSWER, ANSWER_B, BASE, PROMPT, train_adapter

# The module trains two adapters, then every test generates with the engine on them.
pytestmark = pytest.mark.slow

# A public name with '.' (every Llama-3.1 fine-tune has one): PEFT itself refuses such keys.
DOTTED = "ft:klusterai/Meta-Llama-3.1-8B-Instruct-Turbo:acme:x.y:abcd1234"
OTHER_PROMPTS = [
    [{"role": "user", "content": "Where is my package? It is late."}],
    PROMPT,
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Refund please, order 77"}],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    entry = load_catalog().get(BASE)
    models_dir = tmp_path_factory.mktemp("models")
    root = tmp_path_factory.mktemp("adapters")
    train_adapter(entry, models_dir, root / "refund", ANSWER, "ftjob-a")
    train_adapter(entry, models_dir, root / "shipping", ANSWER_B, "ftjob-b")
    return entry, models_dir, root


def _engine(tiny, **kwargs) -> Engine:
    entry, models_dir, _ = tiny
    return Engine(load_model(entry, models_dir), load_tokenizer(entry, models_dir), entry, **kwargs)


def test_mixed_batch_equals_each_request_alone(tiny):
    """Rows for two adapters and the base share one generate call; each row equals its solo run."""
    engine = _engine(tiny, batch_window_s=0.3, max_batch_size=8)
    engine.load_adapter("a", tiny[2] / "refund")
    engine.load_adapter(DOTTED, tiny[2] / "shipping")
    plan = [("a", PROMPT), (DOTTED, PROMPT), (BASE, PROMPT), ("a", OTHER_PROMPTS[0])]
    plan += [(DOTTED, OTHER_PROMPTS[2]), (BASE, OTHER_PROMPTS[2])]
    requests = [engine.prepare(m, p, temperature=0, max_tokens=32) for m, p in plan]
    batched = engine.run_many(requests)
    assert engine.scheduler.batches_run == 1 and engine.scheduler.largest_batch == len(plan)
    assert batched[0].text == ANSWER and batched[1].text == ANSWER_B  # no bleed between adapters
    assert batched[2].text not in (ANSWER, ANSWER_B)  # the base row got no adapter
    solo = [engine.run(r) for r in requests]  # one at a time: each its own batch
    assert engine.scheduler.batches_run == 1 + len(plan)
    assert [r.token_ids for r in batched] == [r.token_ids for r in solo]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in solo]
    engine.close()


def test_a_short_row_returns_before_its_long_batch_mate(tiny):
    engine = _engine(tiny, batch_window_s=0.3)
    long, short = (engine.prepare(BASE, PROMPT, temperature=0) for _ in range(2))
    long = replace(long, eos_ids=(), max_new_tokens=300)  # runs to its budget
    short = replace(short, eos_ids=(), max_new_tokens=2)
    rows = [engine.scheduler.submit(Pending(r, r.batch_key())) for r in (long, short)]
    assert rows[1].result.result(timeout=60).completion_tokens == 2
    assert not rows[0].result.done()  # the batch is still generating for the long row
    assert rows[0].result.result(timeout=120).completion_tokens == 300
    assert engine.scheduler.batches_run == 1
    engine.close()


def test_concurrent_http_requests_share_batches(tiny):
    """Plain and streaming requests from many clients at once are coalesced; answers stay right."""
    engine = _engine(tiny, batch_window_s=0.05)
    engine.load_adapter("a", tiny[2] / "refund")
    engine.load_adapter("b", tiny[2] / "shipping")
    http = TestClient(create_engine_app(engine))
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    models = ["a", "b", BASE, "a", "b", "a"]

    def call(i: int) -> None:
        try:
            body = {"model": models[i], "messages": PROMPT, "temperature": 0, "max_tokens": 32}
            if i % 2:  # every other client streams
                raw = http.post("/v1/chat/completions", json={**body, "stream": True}).text
                events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e.strip()]
                chunks = [json.loads(e) for e in events[:-1]]
                results[i] = "".join(
                    c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
                )
            else:
                results[i] = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"][
                    "content"
                ]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    expected = {"a": ANSWER, "b": ANSWER_B}
    assert all(results[i] == expected[m] for i, m in enumerate(models) if m in expected), results
    assert engine.scheduler.largest_batch > 1 and engine.scheduler.batches_run < len(models)
    engine.close()


def test_unload_and_eviction_release_the_adapter_weights(tiny):
    engine = _engine(tiny, max_loaded_adapters=2)
    for name, folder in (("a", "refund"), ("b", "shipping")):
        engine.load_adapter(name, tiny[2] / folder)
    key_a, key_b = peft_adapter_name("a"), peft_adapter_name("b")
    params = dict(engine._model.named_parameters())
    probe_a = weakref.ref(next(p for n, p in params.items() if f".{key_a}." in n))
    probe_b = weakref.ref(next(p for n, p in params.items() if f".{key_b}." in n))
    del params
    engine.generate("a", PROMPT, max_tokens=2)  # "b" becomes the least recently used
    engine.load_adapter("c", tiny[2] / "refund")  # evicts "b"
    gc.collect()
    assert engine.loaded_adapters() == ["a", "c"]
    assert probe_b() is None, "evicted adapter's LoRA tensors are still alive"
    assert not [n for n in engine.lora_parameter_names() if f".{key_b}." in n]
    engine.unload_adapter("a")
    gc.collect()
    assert probe_a() is None, "unloaded adapter's LoRA tensors are still alive"
    assert not [n for n in engine.lora_parameter_names() if f".{key_a}." in n]
    engine.unload_adapter("c")  # the last one: the LoRA layers go entirely
    assert engine.lora_parameter_names() == []
    assert engine.generate(BASE, PROMPT, max_tokens=4, temperature=0).completion_tokens == 4
    engine.close()


def test_n_choices_in_one_batch(tiny):
    engine = _engine(tiny, batch_window_s=0.05)
    engine.load_adapter("a", tiny[2] / "refund")
    http = TestClient(create_engine_app(engine))
    greedy = http.post(
        "/v1/chat/completions", json={"model": "a", "messages": PROMPT, "temperature": 0, "n": 3}
    ).json()
    assert [c["index"] for c in greedy["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in greedy["choices"]} == {ANSWER}
    body = {"model": BASE, "messages": PROMPT, "temperature": 1.0, "n": 3, "seed": 11, "max_tokens": 12}
    first, again = (http.post("/v1/chat/completions", json=body).json() for _ in range(2))
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]]  # seeded: reproducible
    assert len(set(texts)) > 1  # ... and the choices differ (seed + index)
    assert 3 <= first["usage"]["completion_tokens"] <= 36 and first["usage"]["prompt_tokens"] > 0
    engine.close()


def test_adapters_beyond_the_serving_limits_are_refused(tiny, tmp_path):
    engine = _engine(tiny)

    def variant(name: str, **changes: object):
        folder = tmp_path / name
        shutil.copytree(tiny[2] / "refund", folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return folder

    for name, changes, needle in [
        ("rank", {"r": 128}, "max_lora_rank 64"),
        ("dora", {"use_dora": True}, "DoRA"),
        ("save", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ("embed", {"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
    ]:
        with pytest.raises(InvalidAdapter) as info:
            engine.load_adapter(name, variant(name, **changes))
        assert needle in info.value.message
    assert engine.loaded_adapters() == []
    engine.close()


def test_grouped_and_peft_paths_give_the_same_tokens(tiny):
    """The engine's grouped LoRA slots and PEFT's adapter_names loop agree on a mixed batch."""
    engine = _engine(tiny, batch_window_s=0.3, max_batch_size=8)
    engine.load_adapter("a", tiny[2] / "refund")
    engine.load_adapter("b", tiny[2] / "shipping")
    plan = [("a", PROMPT), ("b", OTHER_PROMPTS[2]), (BASE, PROMPT), ("b", PROMPT), ("a", OTHER_PROMPTS[0])]
    requests = [engine.prepare(m, p, temperature=0, max_tokens=32) for m, p in plan]
    grouped = engine.run_many(requests)
    engine.grouped_lora = False
    peft = engine.run_many(requests)
    assert engine.scheduler.batches_run == 2 and engine.scheduler.largest_batch == len(plan)
    assert [r.token_ids for r in grouped] == [r.token_ids for r in peft]
    assert grouped[0].text == ANSWER and grouped[3].text == ANSWER_B
    engine.close()


def test_an_evicted_adapters_slot_serves_the_next_one(tiny):
    """LRU eviction frees the grouped slot; the adapter loaded next reuses it and answers as itself."""
    engine = _engine(tiny, max_loaded_adapters=2, batch_window_s=0.3)
    engine.load_adapter("a", tiny[2] / "refund")
    engine.load_adapter("b", tiny[2] / "shipping")
    slots = engine._host.grouped
    assert slots is not None
    slot_b = slots.slot_of(peft_adapter_name("b"))
    engine.generate("a", PROMPT, max_tokens=2)  # "b" becomes the least recently used
    engine.load_adapter("c", tiny[2] / "refund")  # evicts "b": "c" takes its slot
    assert engine.loaded_adapters() == ["a", "c"]
    assert slots.slot_of(peft_adapter_name("c")) == slot_b and slots.slot_of(peft_adapter_name("b")) is None
    assert slots.num_slots == 3  # slot 0 (base) + max_loaded_adapters: never more
    mixed = engine.run_many([engine.prepare(m, PROMPT, temperature=0) for m in ("c", BASE, "a")])
    assert engine.scheduler.largest_batch == 3
    assert mixed[0].text == ANSWER and mixed[2].text == ANSWER  # not "b"'s shipping answer
    assert mixed[1].text not in (ANSWER, ANSWER_B)
    engine.unload_adapter("a")  # slot 1 is freed; "b" comes back into it
    engine.load_adapter("b", tiny[2] / "shipping")
    assert slots.slot_of(peft_adapter_name("b")) == 1
    both = engine.run_many([engine.prepare(m, PROMPT, temperature=0) for m in ("b", "c")])
    assert [r.text for r in both] == [ANSWER_B, ANSWER]
    engine.close()


def test_a_failed_slot_allocation_leaves_no_half_loaded_adapter(tiny, monkeypatch):
    """If the slot stacks cannot grow (e.g. out of memory), the load fails cleanly: the adapter is
    gone from PEFT too, so loading it again later works."""
    engine = _engine(tiny, batch_window_s=0.0)
    engine.load_adapter("a", tiny[2] / "refund")
    slots = engine._host.grouped
    assert slots is not None
    real_add = type(slots).add

    def out_of_memory(self, name):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(type(slots), "add", out_of_memory)
    with pytest.raises(InvalidAdapter, match="out of memory"):
        engine.load_adapter("b", tiny[2] / "shipping")
    assert engine.loaded_adapters() == ["a"]
    assert peft_adapter_name("b") not in engine._host.model.peft_config
    monkeypatch.setattr(type(slots), "add", real_add)
    engine.load_adapter("b", tiny[2] / "shipping")  # the same name loads now
    out = engine.run_many([engine.prepare(m, PROMPT, temperature=0) for m in ("a", "b")])
    assert [r.text for r in out] == [ANSWER, ANSWER_B]
    engine.close()
